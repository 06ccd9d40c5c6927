"""A small recommender-style model trained with DataParallel; run under `luoshu launch` by the tests.

    luoshu launch -n N tests/parallel/dp_train.py --runs graph:0.001:sgd,eager:25:adam --out PREFIX

Every worker draws the same global batch of N*B rows per step and trains on its own
slice; every worker writes its final parameters to PREFIX.rank<r>.npz. `train(...)` with world size 1 and batch
N*B is the single-process reference the tests compare against.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import luoshu as ls

VOCAB, FIELDS, DIM, DENSE = 50, 3, 4, 5


class Net(ls.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = ls.nn.Embedding(VOCAB, DIM)
        self.hidden = ls.nn.Linear(FIELDS * DIM + DENSE, 16)
        self.out = ls.nn.Linear(16, 1)

    def forward(self, ids, dense):
        emb = self.embedding(ids).reshape((-1, FIELDS * DIM))
        x = ls.ops.concat([emb, dense], axis=1)
        return self.out(self.hidden(x).relu()).reshape((-1,))


def batches(steps: int, global_batch: int, seed: int = 7):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        ids = rng.integers(0, VOCAB, (global_batch, FIELDS))
        dense = rng.standard_normal((global_batch, DENSE)).astype(np.float32)
        y = (dense[:, 0] + 0.1 * ids[:, 0]).astype(np.float32)
        yield ids, dense, y


def training_graph(model: Net, opt):
    """(graph, its (ids, dense, y) placeholders, the loss, the update) of one MSE training step."""
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, FIELDS), "int64")
        dense = ls.placeholder("dense", (None, DENSE), "float32")
        y = ls.placeholder("y", (None,), "float32")
        loss = ls.nn.functional.mse_loss(model(ids, dense), y)
        train_op = opt.minimize(loss)
    return g, (ids, dense, y), loss, train_op


def train(mode: str, batch: int, steps: int, workers: int, rank: int, bucket_mb: float, optimizer: str,
          data_parallel: bool = True) -> dict:
    """Trains; returns the parameters by name. Parameters start equal on every worker only
    through DataParallel's broadcast: the seed differs per rank on purpose."""
    ls.manual_seed(1234 + 1000 * rank)
    model = Net()
    opt = ls.optim.Adam(model.parameters(), lr=0.01) if optimizer == "adam" else \
        ls.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if mode == "graph":
        g, (ids, dense, y), loss, train_op = training_graph(model, opt)
        if data_parallel:
            ls.parallel.DataParallel(g, bucket_size_mb=bucket_mb)
    else:
        dp = ls.parallel.DataParallel(model, opt, bucket_size_mb=bucket_mb) if data_parallel else None
    lo, hi = rank * batch, (rank + 1) * batch
    for ids_v, dense_v, y_v in batches(steps, workers * batch):
        ids_v, dense_v, y_v = ids_v[lo:hi], dense_v[lo:hi], y_v[lo:hi]
        if mode == "graph":
            g.run([loss, train_op], {ids: ids_v, dense: dense_v, y: y_v})
        else:
            out = model(ls.tensor(ids_v), ls.tensor(dense_v))
            loss_e = ls.nn.functional.mse_loss(out, ls.tensor(y_v))
            if dp is None:
                opt.minimize(loss_e)
            elif mode == "eager-minimize":  # buckets start while backward runs
                dp.minimize(loss_e)
            else:
                loss_e.backward()
                dp.step()
                dp.zero_grad()
    return {name: p.numpy() for name, p in model.named_parameters()}


def parse_run(run: str) -> tuple[str, float, str]:
    """"graph:0.001:sgd" -> (mode, bucket size in MB, optimizer)."""
    mode, bucket_mb, optimizer = run.split(":")
    return mode, float(bucket_mb), optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="graph:25:sgd", help="comma-separated mode:bucket_mb:optimizer")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()
    results = {}
    for run in args.runs.split(","):
        mode, bucket_mb, optimizer = parse_run(run)
        params = train(mode, args.batch, args.steps, ls.distributed.world_size(), ls.distributed.rank(), bucket_mb,
                       optimizer)
        results.update({f"{run}/{name}": value for name, value in params.items()})
    np.savez(f"{args.out}.rank{ls.distributed.rank()}.npz", **results)
    ls.distributed.barrier()
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
