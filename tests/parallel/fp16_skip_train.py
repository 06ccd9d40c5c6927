"""fp16 with dynamic loss scaling in sharded jobs (tensor parallelism, ZeRO), where only one rank's
gradients overflow; run under `luoshu launch -n 2` by the tests.

    luoshu launch -n 2 tests/parallel/fp16_skip_train.py --out PREFIX

A column-split Linear (tp=2) under fp16 autocast, a `LossScaler` and `optimizer.minimize(loss,
loss_scaler=...)`. At step 1 rank 1 alone feeds an input holding inf: its weight shard's gradient
overflows, rank 0's does not. The overflow check must agree, so both ranks skip that step. Two runs:
"tp-group", where the states pass makes the TP group agree, and "every-worker", where the agreement
is asked for explicitly (`agree_across()`, what `luoshu train` does). Rank r writes, after each step,
its weight shard, the scale and whether the weights moved, to PREFIX.<run>.rank<r>.npz.

ZeRO (`run_zero`): two Linears on two inputs, data parallel over the 2 ranks, plain and with
zero=1, 2; at step 1 rank 1's second input holds inf. After the reduce-scatter of ZeRO-2 only the
shard holding the second Linear has inf. Rank r writes both Linears' weights after each step, the
scale and whether they moved, to PREFIX.zero<N>.rank<r>.npz.
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


class TwoInputs(ls.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = ls.nn.Linear(4, 6)  # 30 elements, then 10: the flat layout puts `second` in one shard
        self.second = ls.nn.Linear(4, 2)

    def forward(self, x1, x2):
        return ls.ops.sum(self.first(x1).astype("float32") ** 2) + ls.ops.sum(self.second(x2).astype("float32") ** 2)


def run_zero(zero: int, out: str) -> None:
    rank = ls.distributed.rank()
    ls.manual_seed(3)
    model = TwoInputs()
    opt = ls.optim.Adam(model.parameters(), lr=0.1)
    scaler = ls.optim.LossScaler(init_scale=2.0**10)
    with ls.Graph() as g:
        x1, x2 = ls.placeholder("x1", (None, 4)), ls.placeholder("x2", (None, 4))
        with ls.autocast("float16"):
            loss = model(x1, x2)
        step = opt.minimize(loss, loss_scaler=scaler)
    ls.parallel.DataParallel(g, zero=zero) if zero else ls.parallel.DataParallel(g)
    rng = np.random.default_rng(1 + rank)
    weights, scales, moved = [], [], []
    for i in range(3):
        a, b = (rng.standard_normal((3, 4)).astype(np.float32) for _ in range(2))
        if i == 1 and rank == 1:
            b[0, 0] = np.inf
        before = [p.value.clone() for p in model.parameters()]
        g.run([step], {x1: a, x2: b})
        after = [p.value.clone() for p in model.parameters()]
        weights.append(np.concatenate([t.numpy().reshape(-1) for t in after]))
        scales.append(scaler.get_scale())
        moved.append(any(not torch.equal(u, v) for u, v in zip(before, after)))
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
    for zero in (0, 1, 2):
        run_zero(zero, f"{args.out}.zero{zero}")
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
