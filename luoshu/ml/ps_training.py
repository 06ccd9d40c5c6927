"""Factorization machines and logistic regression (an FM with `n_factors=0`) trained on `luoshu.ps` servers.

As HetuML does for sparse high-dimensional models: the parameters live on the servers,
one table row `[w_i, v_i1 .. v_ik]` per feature id (the CSR column index itself, so
hashed ids up to 2^40 and beyond need no dense array anywhere) and the bias as a dense
tensor; the servers run AdaGrad. Each step a worker pulls only the rows its batch
touches, computes the FM's gradient on that compact block, and pushes it back. With N
workers (`luoshu launch -n N --servers S`) the tables use `sync_workers=N`, so one step
applies the summed gradients of N batches, i.e. what one process does at batch N*b.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

from luoshu.ml.base import to_torch
from luoshu.ml.fm import _loss_and_residual


def _compact(Xb: sp.csr_matrix) -> tuple[np.ndarray, sp.csr_matrix]:
    """(the distinct column ids of a batch, the batch with columns renumbered 0..u-1)."""
    ids = np.unique(Xb.indices.astype(np.int64))
    local = sp.csr_matrix(
        (Xb.data, np.searchsorted(ids, Xb.indices).astype(np.int64), Xb.indptr), shape=(Xb.shape[0], len(ids))
    )
    return ids, local


def _connect(est):
    from luoshu import distributed as dist
    from luoshu import ps

    if est.ps_addresses is not None:
        return ps.connect(addresses=est.ps_addresses, worker_rank=dist.rank() if dist.is_initialized() else 0), 1, 0
    dist.init()
    return ps.connect(), dist.world_size(), dist.rank()


def _max_over_workers(value: int, world: int) -> int:
    if world == 1:
        return value
    import torch.distributed as torch_dist

    from luoshu import distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX, group=dist.process_group())
    return int(t)


def rows_over_workers(est, n: int) -> int:
    """The number of rows of every worker's data together (the job's workers under `ps="launch"`)."""
    from luoshu import distributed as dist

    if est.ps is not None:
        dist.init()
    if not dist.is_initialized() or dist.world_size() == 1:
        return n
    import torch.distributed as torch_dist

    t = torch.tensor([n], dtype=torch.int64)
    torch_dist.all_reduce(t, group=dist.process_group())
    return int(t)


def train_fm_on_servers(est, X: sp.csr_matrix, target: torch.Tensor) -> None:
    """Fits `est` (a binary or regression FactorizationMachine) on this worker's rows through the servers."""
    client, world, rank = _connect(est)
    k = int(est.n_factors)
    table, bias = est.ps_table, est.ps_table + "/bias"
    sync = world if world > 1 else None
    seed = 0 if est.random_state is None else int(est.random_state)
    adagrad = ("adagrad", {"lr": float(est.learning_rate), "eps": 1e-10})
    client.create_table(
        table,
        1 + k,
        num_rows=None,
        init=("normal", 0.0, float(est.init_std)) if est.init_std > 0 else ("zeros",),
        optimizer=adagrad,
        dtype="float64",
        sync_workers=sync,
        seed=seed,
    )
    client.create_dense(bias, np.zeros(1), optimizer=adagrad, sync_workers=sync, dtype="float64")
    n = X.shape[0]
    bs = int(est.batch_size)
    steps = _max_over_workers(math.ceil(n / bs), world)  # every worker pushes once per synchronous step
    rng = np.random.default_rng(seed + 7919 * rank)
    est.loss_curve_ = []
    for _ in range(int(est.n_epochs)):
        order = rng.permutation(n)
        total = 0.0
        for step in range(steps):
            rows = np.sort(order[step * bs : (step + 1) * bs])
            if rows.size == 0:  # a worker with fewer rows still takes part in the step
                client.push(table, np.empty(0, dtype=np.int64), np.empty((0, 1 + k))).result()
                client.push_dense(bias, np.zeros(1)).result()
                continue
            ids, Xb = _compact(X[rows])
            pulled, _ = client.pull(table, ids)
            pulled = torch.from_numpy(np.asarray(pulled, dtype=np.float64))
            params = {
                "w0": torch.from_numpy(np.asarray(client.pull_dense(bias), dtype=np.float64)).reshape(1),
                "w": pulled[:, :1].contiguous(),
                "V": pulled[:, 1:].contiguous()[None],
            }
            Xt = to_torch(Xb)
            Z, cache = est._scores(Xt, params)
            loss, R = _loss_and_residual(est.task, 1, Z, target[torch.from_numpy(rows)])
            total += float(loss.sum())
            grads = est._grads(Xt, params, cache, R / (len(rows) * world))
            row_grads = torch.cat([grads["w"], grads["V"][0]], 1).numpy()
            pushes = [client.push(table, ids, row_grads), client.push_dense(bias, grads["w0"].numpy())]
            for f in pushes:
                f.result()
        est.loss_curve_.append(total / max(n, 1))
    # the model for predict/save: the rows of every id this worker's data touched
    ids = np.unique(X.indices.astype(np.int64))
    rows, _ = client.pull(table, ids) if ids.size else (np.empty((0, 1 + k)), None)
    rows = np.asarray(rows, dtype=np.float64)
    est.feature_ids_ = ids
    est.w0_ = np.asarray(client.pull_dense(bias), dtype=np.float64).reshape(1)
    est.w_ = rows[:, :1].copy()
    est.V_ = rows[:, 1:].copy()[None]
    est.loss_curve_ = np.asarray(est.loss_curve_)
    est.n_iter_ = int(est.n_epochs)
    client.close()
