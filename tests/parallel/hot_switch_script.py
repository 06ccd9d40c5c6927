"""Runs hot switches between layouts on real processes; run under `luoshu launch -n 4` by the tests.

    luoshu launch -n 4 tests/parallel/hot_switch_script.py OUT_DIR

Every rank builds the same full tensor, keeps its source shard, runs the planned switch (one
batch of isend/irecv per case, then every case fused into one batch with `run_switches`) and
saves what it received for the test to compare with the destination shard it should hold.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import luoshu as ls
from luoshu.parallel.hot_switch import plan_hot_switch, run_switch, run_switches
from tests.parallel.test_hot_switch import CASES, SHAPE


def main() -> None:
    ls.distributed.init()
    rank = ls.distributed.rank()
    full = torch.from_numpy(np.random.default_rng(0).standard_normal(SHAPE))
    results = {}
    for name, (source, destination) in CASES.items():
        plan = plan_hot_switch(SHAPE, 8, source, destination, node_size=2)
        src = source.boxes(SHAPE)
        local = full[tuple(slice(a, b) for a, b in src[rank])].clone() if rank in src else None
        out = run_switch(plan, local, rank, dtype=torch.float64)
        if out is not None:
            results[name] = out.numpy()
    # every case at once, as one model's tensors: one batch of isend/irecv, one message per peer
    plans, locals_ = [], []
    for source, destination in CASES.values():
        plans.append(plan_hot_switch(SHAPE, 8, source, destination, node_size=2, load={}))
        src = source.boxes(SHAPE)
        locals_.append(full[tuple(slice(a, b) for a, b in src[rank])].clone() if rank in src else None)
    for name, out in zip(CASES, run_switches(plans, locals_, rank, dtype=torch.float64)):
        if out is not None:
            results[f"fused {name}"] = out.numpy()
    np.savez(f"{sys.argv[1]}/rank{rank}.npz", **results)
    ls.distributed.barrier()
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
