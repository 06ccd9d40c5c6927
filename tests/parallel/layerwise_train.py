"""GPT-2 (float64) trained under the plan the layer-wise search picks over 4 ranks with a budget
that makes it recompute; run under `luoshu launch -n 4` by tests/parallel/test_layerwise.py.

    luoshu launch -n 4 tests/parallel/layerwise_train.py --out PREFIX

The profile's rates are fixed (no timing) and the memory is the plans' own accounting, so every
rank finds the same plan. Rank r writes its losses, the plan's recompute choices and the full
parameters to PREFIX.rank<r>.npz (compared with `hotspa_train.reference`, one process).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import luoshu as ls
from luoshu.data.packing import bucket_batch
from luoshu.parallel import hotspa as H
from luoshu.parallel import hotspa_profile as P
from luoshu.parallel import layerwise as LW
from tests.parallel import hotspa_train as T


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()
    world = ls.distributed.world_size()
    model = T.build("gpt2")
    prof = P.Profile(H.model_spec(model), flops=2e9, layer_overhead_s=1e-5)
    batches = list(T.batches())
    rows = max(bucket_batch(b, [T.MAX_LEN, 0])[0].rows.num_rows for b in batches)
    lengths = [len(s) for s in batches[0]]
    # a budget below every candidate's plan without recompute, above the least any of them needs
    # (each candidate's tp and sp plans measured as they run on these ranks: a collective)
    _, table = LW.search_plan(prof, model, world, rows, T.MAX_LEN, lengths)
    free = min(needs["free_bytes"] for _, _, needs in table)
    least = min(needs["least_bytes"] for _, _, needs in table)
    budget = (free + least) / 2
    plan, _ = LW.search_plan(prof, model, world, rows, T.MAX_LEN, lengths, budget)
    LW.apply_plan(model, plan.recompute)
    hot = ls.parallel.HotSPa(model, [plan.text], [T.MAX_LEN, 0])
    opt = T.optimizer(model)
    losses = [hot.step(seqs, opt).loss for seqs in batches]
    params = {n: v.numpy() for n, v in hot.full_parameters().items()}
    if ls.distributed.rank() == 0:
        print(f"plan {plan.text} recompute {plan.recompute} budget {budget:.0f} memory {plan.memory_bytes:.0f}")
    np.savez(f"{args.out}.rank{ls.distributed.rank()}.npz", losses=np.array(losses),
             recompute=np.array(plan.recompute), strategy=np.array(plan.text), **params)
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
