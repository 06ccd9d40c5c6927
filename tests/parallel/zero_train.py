"""ZeRO-1/2/3 against plain data parallelism in the same job; run under `luoshu launch -n N`.

    luoshu launch -n 2 tests/parallel/zero_train.py OUT_DIR

Each run trains the same float64 model (an embedding table, so sparse gradients take the
plain path, and two linear layers) for 5 AdamW steps with gradient clipping, in graph and eager
mode, plain and with zero=1, 2 and 3; every rank saves losses, final parameters, its
optimizer-state bytes and the consolidated optimizer state.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch

import luoshu as ls

VOCAB, FIELDS, DIM, DENSE, HIDDEN = 20, 2, 3, 5, 7


class Net(ls.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = ls.nn.Embedding(VOCAB, DIM)
        self.hidden = ls.nn.Linear(FIELDS * DIM + DENSE, HIDDEN)
        self.out = ls.nn.Linear(HIDDEN, 1)

    def forward(self, ids, dense):
        x = ls.ops.concat([self.embedding(ids).reshape((-1, FIELDS * DIM)), dense], axis=1)
        return self.out(self.hidden(x).tanh()).reshape((-1,))


def batches(workers: int, batch: int, steps: int = 5):
    rng = np.random.default_rng(3)
    for _ in range(steps):
        ids = rng.integers(0, VOCAB, (workers * batch, FIELDS))
        dense = rng.standard_normal((workers * batch, DENSE))
        yield ids, dense, dense[:, 0] * 0.5 + 0.1 * ids[:, 0]


def train(mode: str, zero: int, workers: int, rank: int, batch: int = 3, **options) -> dict:
    ls.manual_seed(7)
    model = Net().to(dtype="float64")
    opt = ls.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01, max_grad_norm=0.5)
    lo, hi = rank * batch, (rank + 1) * batch
    losses = []
    if mode == "graph":
        with ls.Graph() as g:
            ids = ls.placeholder("ids", (None, FIELDS), "int64")
            dense = ls.placeholder("dense", (None, DENSE), "float64")
            y = ls.placeholder("y", (None,), "float64")
            loss = ls.nn.functional.mse_loss(model(ids, dense), y)
            step = opt.minimize(loss)
        dp = ls.parallel.DataParallel(g, zero=zero, **options) if zero else ls.parallel.DataParallel(g)
        for i, d, t in batches(workers, batch):
            losses.append(g.run([loss, step], {ids: i[lo:hi], dense: d[lo:hi], y: t[lo:hi]})[0])
    else:
        dp = ls.parallel.DataParallel(model, opt, zero=zero, **options)
        for i, d, t in batches(workers, batch):
            out = loss = ls.nn.functional.mse_loss(dp(ls.tensor(i[lo:hi]), ls.tensor(d[lo:hi])), ls.tensor(t[lo:hi]))
            losses.append(float(out.numpy()))
            dp.minimize(loss)
    with dp.sync.gathered_parameters() if zero else contextlib.nullcontext():  # stage 3: the shards, whole
        result = {f"param/{name}": p.numpy().copy() for name, p in model.named_parameters()}
    result["losses"] = np.array(losses)
    if zero:
        optimizers = dp.sync.optimizers()
        state = dp.sync.consolidated_state_dict()
    else:
        optimizers, state = [opt], opt.state_dict()
    dense_bytes = sum(t.numel() * t.element_size() for o in optimizers for p, st in o.state.items()
                      if p.name != "weight" or p.shape[0] != VOCAB for k, t in st.items() if k != "step")
    result["state_bytes"] = np.array(dense_bytes)
    for key, value in state["tensors"].items():
        result[f"state/{key}"] = value.numpy()
    return result


def memory(zero: int, workers: int, rank: int) -> dict:
    """The plan's accounting of one step of a dense MLP (44 float64 parameters, four tensors):
    parameter, optimizer-state and update-gradient bytes on this rank."""
    ls.manual_seed(1)
    model = ls.nn.Sequential(ls.nn.Linear(4, 6), ls.nn.Tanh(), ls.nn.Linear(6, 2)).to(dtype="float64")
    opt = ls.optim.AdamW(model.parameters(), lr=0.01)
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 4), "float64")
        loss = (model(x) ** 2).mean()
        step = opt.minimize(loss)
    ls.parallel.DataParallel(g, zero=zero) if zero else ls.parallel.DataParallel(g)
    report = g.memory([loss, step], {x: np.full((3, 4), rank + 1.0)})
    return {"parameters": report.parameters, "optimizer_state": report.optimizer_state,
            "update_gradients": report.update_gradients, "gathered": report.peak_gathered_parameters}


LAYERS, WIDTH = 8, 8  # memory_layers: eight 8x8 float64 weights, 512 bytes each


def memory_layers(zero: int, workers: int, rank: int) -> dict:
    """The plan's accounting of one step of eight 8x8 linear layers (no bias, float64): with
    `unit_size_mb` of one weight, ZeRO-2 reduce-scatters each weight's gradient on its own."""
    ls.manual_seed(2)
    layers = []
    for _ in range(LAYERS):
        layers += [ls.nn.Linear(WIDTH, WIDTH, bias=False), ls.nn.Tanh()]
    model = ls.nn.Sequential(*layers).to(dtype="float64")
    opt = ls.optim.AdamW(model.parameters(), lr=0.01)
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, WIDTH), "float64")
        loss = (model(x) ** 2).mean()
        step = opt.minimize(loss)
    if zero:
        ls.parallel.DataParallel(g, zero=zero, unit_size_mb=WIDTH * WIDTH * 8 / 2**20)
    else:
        ls.parallel.DataParallel(g)
    report = g.memory([loss, step], {x: np.full((3, WIDTH), rank + 1.0)})
    return {"update_gradients": report.update_gradients, "peak_gradients": report.peak_gradients}


def main() -> None:
    torch.set_num_threads(1)
    ls.distributed.init()
    rank, workers = ls.distributed.rank(), ls.distributed.world_size()
    results = {}
    for mode in ("graph", "eager"):
        for zero in (0, 1, 2, 3):
            results.update({f"{mode}/{zero}/{k}": v for k, v in train(mode, zero, workers, rank).items()})
        # ZeRO-2 with one reduce-scatter bucket per parameter (1-byte buckets), started mid-backward
        small = train(mode, 2, workers, rank, unit_size_mb=2**-20)
        results.update({f"{mode}/2b/{k}": v for k, v in small.items()})
    for zero in (0, 2, 3):
        results.update({f"memory/{zero}/{k}": np.array(v) for k, v in memory(zero, workers, rank).items()})
    for zero in (0, 1, 2):
        results.update({f"layers/{zero}/{k}": np.array(v) for k, v in memory_layers(zero, workers, rank).items()})
    np.savez(f"{sys.argv[1]}/rank{rank}.npz", **results)
    ls.distributed.barrier()
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
