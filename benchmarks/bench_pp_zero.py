"""ZeRO over each pipeline stage's DP group: a dp2 x pp2 GPT-2 training step, plain vs zero=1, 2 and 3.

The reference is luoshu's own plain pipeline (torch has no ZeRO x pipeline to compare against
on CPU): the same model, stages, micro-batches and AdamW with clipping, built three times in the
same processes and stepped in turn (repeats interleaved); median step seconds after warm-up, the
ratios to plain, and rank 0's optimizer-state bytes (ZeRO: 1/dp of the stage's). Float32, Gloo.

    OMP_NUM_THREADS=1 .venv/bin/luoshu launch -n 4 benchmarks/bench_pp_zero.py [--repeats 12]
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()
    mesh = ls.distributed.DeviceMesh(dp=2, pp=2)
    pipes = {}
    for zero in (0, 1, 2, 3):
        ls.manual_seed(1)
        model = GPT2(GPTConfig(vocab_size=VOCAB, block_size=LENGTH, n_layer=4, n_head=4, n_embd=128))
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
        for zero, seconds in median.items():
            print(f"zero={zero}: {seconds * 1e3:.1f} ms/step ({seconds / median[0]:.2f}x plain), "
                  f"optimizer state {state_bytes(pipes[zero])} bytes on rank 0")
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
