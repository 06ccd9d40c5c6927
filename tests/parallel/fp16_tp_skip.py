"""fp16 with dynamic loss scaling under tensor parallelism, where only one rank's gradients overflow;
run under `luoshu launch -n 2` by the tests.

    luoshu launch -n 2 tests/parallel/fp16_tp_skip.py --out PREFIX

A column-split Linear (tp=2) under fp16 autocast, a `LossScaler` and `optimizer.minimize(loss,
loss_scaler=...)`. At step 1 rank 1 alone feeds an input holding inf: its weight shard's gradient
overflows, rank 0's does not. The overflow check must agree, so both ranks skip that step. Two runs:
"tp-group", where the states pass makes the TP group agree, and "every-worker", where the agreement
is asked for explicitly (`agree_across()`, what `luoshu train` does). Rank r writes, after each step,
its weight shard, the scale and whether the weights moved, to PREFIX.<run>.rank<r>.npz.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import luoshu as ls


class Net(ls.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = ls.nn.Linear(4, 6)

    def forward(self, x):
        return self.fc(x)


def run(mesh, every_worker: bool, out: str) -> None:
    rank = ls.distributed.rank()
    ls.manual_seed(3)
    model = Net()
    ls.parallel.parallelize(model, mesh, plan={"fc": "colwise"})
    opt = ls.optim.SGD(model.parameters(), lr=0.1)
    scaler = ls.optim.LossScaler(init_scale=2.0**10)
    if every_worker:
        scaler.agree_across()
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 4))
        with ls.autocast("float16"):
            loss = ls.ops.sum(model(x).astype("float32") ** 2)
        step = opt.minimize(loss, loss_scaler=scaler)
    rng = np.random.default_rng(0)
    weights, scales, moved = [], [], []
    for i in range(3):
        batch = rng.standard_normal((3, 4)).astype(np.float32)
        if i == 1 and rank == 1:
            batch[0, 0] = np.inf  # only this rank's activations (and weight-shard gradient) overflow
        before = model.fc.weight.value.clone()
        g.run([step], {x: batch})
        after = model.fc.weight.value.clone()
        weights.append(after.numpy())
        scales.append(scaler.get_scale())
        moved.append(not torch.equal(before, after))
    np.savez(f"{out}.rank{rank}.npz", weights=np.stack(weights), scales=np.array(scales), moved=np.array(moved))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()
    mesh = ls.distributed.DeviceMesh(tp=2)
    run(mesh, False, f"{args.out}.tp-group")
    run(mesh, True, f"{args.out}.every-worker")
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
