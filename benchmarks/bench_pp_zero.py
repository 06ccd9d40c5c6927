"""ZeRO over each pipeline stage's DP group: a dp2 x pp2 GPT-2 training step, plain vs zero=1, 2 and 3
(`--tp 2`: dp2 x tp2 x pp2 on 8 processes, each stage tensor parallel, `parallelize`).

The reference is luoshu's own plain pipeline (torch has no ZeRO x pipeline to compare against
on CPU): the same model, mesh, stages, micro-batches and AdamW with clipping, built once per row in
the same processes and stepped in turn (repeats interleaved); median step seconds after warm-up, the
ratios to plain, and rank 0's optimizer-state bytes (ZeRO: 1/dp of the stage's). Float32, Gloo.

    OMP_NUM_THREADS=1 .venv/bin/luoshu launch -n 4 benchmarks/bench_pp_zero.py [--repeats 12]
    OMP_NUM_THREADS=1 .venv/bin/luoshu launch -n 8 benchmarks/bench_pp_zero.py --tp 2 [--zero 0,3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import luoshu as ls
from luoshu.models.language import GPT2, GPTConfig

VOCAB, LENGTH, BATCH = 512, 32, 16


def loss_fn(logits, y):
    return ls.nn.functional.cross_entropy(logits.reshape((-1, VOCAB)), y.reshape((-1,)))


def state_bytes(pipe) -> int:
    return sum(t.numel() * t.element_size() for o in pipe.optimizers() for st in o.state.values()
               for k, t in st.items() if k != "step")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tp", type=int, default=1, help="tensor parallelism inside each stage (4 * tp processes)")
    parser.add_argument("--zero", default="0,1,2,3", help="comma-separated stages, 0: plain (the reference)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()
    mesh = ls.distributed.DeviceMesh(dp=2, tp=args.tp, pp=2)
    stages = [int(z) for z in args.zero.split(",")]
    pipes = {}
    for zero in stages:
        ls.manual_seed(1)
        model = GPT2(GPTConfig(vocab_size=VOCAB, block_size=LENGTH, n_layer=args.layers, n_head=4, n_embd=args.embd))
        if args.tp > 1:  # this row's strategy; its pipeline's plans are compiled under it below
            ls.parallel.parallelize(model, mesh)
        opt = ls.optim.AdamW(model.parameters(), lr=1e-3, max_grad_norm=1.0)
        pipe = ls.parallel.pipeline(model, mesh, micro_batches=4, zero=zero)
        pipe.compile([("ids", (None, LENGTH), "int64")], [("y", (None, LENGTH), "int64")], loss_fn, opt)
        pipes[zero] = pipe
    rng = np.random.default_rng(0)
    times = {zero: [] for zero in pipes}
    for _ in range(args.repeats):
        ids = rng.integers(0, VOCAB, (BATCH, LENGTH))
        y = np.roll(ids, -1, axis=1)
        for zero, pipe in pipes.items():
            ls.distributed.barrier()
            start = time.perf_counter()
            pipe.step([ids], [y])
            times[zero].append(time.perf_counter() - start)
    if ls.distributed.rank() == 0:
        median = {zero: statistics.median(t[args.warmup:]) for zero, t in times.items()}
        base = 0 if 0 in median else stages[0]
        print(f"dp2 x tp{args.tp} x pp2, GPT-2 {args.layers} layers x {args.embd}, batch {BATCH} x {LENGTH}, "
              f"4 micro-batches, median of {len(times[base]) - args.warmup} interleaved steps")
        for zero, seconds in median.items():
            print(f"zero={zero}: {seconds * 1e3:.1f} ms/step ({seconds / median[base]:.2f}x "
                  f"{'plain' if base == 0 else f'zero={base}'}), optimizer state {state_bytes(pipes[zero])} bytes "
                  "on rank 0")
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
