"""The profiled cost model against measured step times; run under `luoshu launch -n 4` by the tests.

    luoshu launch -n 4 tests/parallel/hotspa_rank.py --out PREFIX [--strategies 'dp4,tp1,pp1;dp2,tp1,pp2']

Every rank trains GPT-2 (2 layers, width 64, float32) on one long-tailed batch under each static
strategy (tp4, dp2·tp2, dp4, dp2·pp2, dp1·tp2·pp2 unless `--strategies` names others: HotSPa
with one strategy, a pipeline's replica in pp micro-batches, every sequence packed into rows of
the longest bound), the strategies interleaved round by round; the step time of a round is the
slowest rank's, and each rank's busy seconds (CPU time, every thread of the process) in it are
kept too. Then `hotspa_profile.profile` measures this machine with the four processes running at
once, and `predict_static` predicts each strategy's step. Rank 0 writes the rounds' times, busy
seconds (rounds x strategies x ranks), the predictions, the cores and the profiled pipeline runs
and stage overheads to PREFIX.npz.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.distributed as torch_dist

import luoshu as ls
from luoshu.data.packing import bucket_batch
from luoshu.models.language import GPT2, GPTConfig
from luoshu.parallel import hotspa_profile

VOCAB, MAX_LEN, SEQS, ROUNDS = 256, 512, 32, 5
STRATEGIES = ["dp1,tp4,pp1", "dp2,tp2,pp1", "dp4,tp1,pp1", "dp2,tp1,pp2", "dp1,tp2,pp2"]


def build():
    ls.manual_seed(0)
    return GPT2(GPTConfig(vocab_size=VOCAB, block_size=MAX_LEN, n_layer=2, n_head=4, n_embd=64))


def batch() -> list[np.ndarray]:
    seqs = ls.data.synthetic_sequences(SEQS - 1, VOCAB, min_len=4, max_len=MAX_LEN, seed=0)
    return [*seqs, np.random.default_rng(0).integers(0, VOCAB, MAX_LEN)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategies", default=";".join(STRATEGIES), help="';'-separated static strategies")
    args = parser.parse_args()
    strategies = [s for s in args.strategies.split(";") if s]
    torch.set_num_threads(1)
    ls.distributed.init()
    seqs = batch()
    jobs = {}
    for s in strategies:
        model = build()
        hot = ls.parallel.HotSPa(model, [s], [MAX_LEN, 0])
        jobs[s] = (hot, ls.optim.AdamW(model.parameters(), lr=1e-4))

    world = ls.distributed.world_size()

    def step(s: str) -> tuple[float, np.ndarray]:
        """(the slowest rank's seconds, every rank's busy seconds) of one step under s."""
        hot, opt = jobs[s]
        torch_dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        hot.step(seqs, opt)
        busy = torch.zeros(world, dtype=torch.float64)
        busy[ls.distributed.rank()] = time.process_time() - cpu
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        torch_dist.all_reduce(seconds, op=torch_dist.ReduceOp.MAX)
        torch_dist.all_reduce(busy)
        return float(seconds[0]), busy.numpy()

    for s in strategies:  # warm-up: plans compiled, process groups made
        step(s)
    measured = np.zeros((ROUNDS, len(strategies)))
    busy = np.zeros((ROUNDS, len(strategies), world))
    for r in range(ROUNDS):  # interleaved, the order rotating from round to round
        for k in [(r + j) % len(strategies) for j in range(len(strategies))]:
            measured[r, k], busy[r, k] = step(strategies[k])
    # profiled at the rows' length and at the row counts the strategies' replicas run
    rows = bucket_batch(seqs, [MAX_LEN, 0])[0].rows.num_rows
    counts = sorted({1} | {math.ceil(rows / ls.parallel.hotspa.parse_strategy(s).dp) for s in strategies})
    prof = hotspa_profile.profile(build(), lengths=(MAX_LEN // 4, MAX_LEN), batches=counts)
    predicted = hotspa_profile.predict_static(prof, seqs, strategies, MAX_LEN)
    if ls.distributed.rank() == 0:
        runs = np.array([(n, b, s, t) for n, points in prof.tp_runs for b, s, t in points])
        np.savez(
            args.out + ".npz", measured=measured, busy=busy, predicted=np.array([predicted[s] for s in strategies]),
            tp_runs=runs, cores=prof.cores, stage_overhead=np.array(prof.stage_overhead_s),
            pipeline_runs=np.array([(n, *p) for n, points in prof.pipeline_runs for p in points]),
            load=np.array(os.getloadavg()),
        )
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
