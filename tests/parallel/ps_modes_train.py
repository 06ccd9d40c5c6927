"""DataParallel in the parameter-server modes; run under `luoshu launch -n N --servers S` by the tests.

    luoshu launch -n 2 --servers 1 tests/parallel/ps_modes_train.py --runs ps:eager:sgd --out PREFIX

Parity runs ("mode:graph|eager:optimizer", staleness 0; "...:cache-lru" / "...:cache-lfu" read the
tables through a HET cache smaller than the vocabulary): every worker draws the same global
batch of N*B rows per step and trains on its own slice; `train(..., workers=1,
data_parallel=False)` at batch N*B, with the embedding rows the servers start from, is the
single-process reference. Convergence runs ("ctr:mode:model:staleness"): the synthetic
power-law CTR data, each worker its own shard, then worker 0 scores a held-out set.
Every worker writes its results to PREFIX.rank<r>.npz.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import luoshu as ls
from luoshu import data as ls_data
from luoshu import metrics, models, ps

VOCAB, FIELDS, DIM, DENSE = 40, 3, 4, 5
STEPS = 6
INIT = ("normal", 0.0, 1.0)  # nn.Embedding's initialisation, which the server tables copy


class Net(ls.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = ls.nn.Embedding(VOCAB, DIM)
        self.hidden = ls.nn.Linear(FIELDS * DIM + DENSE, 8)
        self.out = ls.nn.Linear(8, 1)

    def forward(self, ids, dense):
        emb = self.embedding(ids).reshape((-1, FIELDS * DIM))
        x = ls.ops.concat([emb, dense], axis=1)
        return self.out(self.hidden(x).relu()).reshape((-1,))


def batches(steps: int, global_batch: int, seed: int = 11):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        ids = rng.integers(0, VOCAB, (global_batch, FIELDS))
        dense = rng.standard_normal((global_batch, DENSE)).astype(np.float32)
        y = (dense[:, 0] + 0.1 * ids[:, 0]).astype(np.float32)
        yield ids, dense, y


def _optimizer(name: str, params):
    return ls.optim.Adam(params, lr=0.02) if name == "adam" else ls.optim.SGD(params, lr=0.05, momentum=0.9)


def train(run: str, batch: int, workers: int, rank: int, client=None, data_parallel: bool = True) -> dict:
    """One parity run; returns the dense parameters by name and the table rows ("table")."""
    mode, style, opt_name, *cache = run.split(":")  # "...:cache": through a HET cache at staleness 0
    ls.manual_seed(1234 + 1000 * rank)  # different per worker on purpose: worker 0's values must win
    model = Net()
    opt = _optimizer(opt_name, model.parameters())
    prefix = f"{run}/"
    if data_parallel:
        # a cache smaller than the vocabulary, so rows are evicted (and written back) along the way
        options = {"cache_capacity": VOCAB // 3, "staleness": 0, "cache_policy": cache[0][6:] or "lru"} \
            if cache else {}
        dp = ls.parallel.DataParallel(model, opt, mode=mode, client=client, prefix=prefix, **options)
    else:  # the reference: a local table holding the rows the servers start from
        rows = ps.initial_rows(prefix + "embedding", np.arange(VOCAB), DIM, INIT)
        model.embedding.weight.value.copy_(torch.from_numpy(rows))
    if style == "graph":
        with ls.Graph() as g:
            ids = ls.placeholder("ids", (None, FIELDS), "int64")
            dense = ls.placeholder("dense", (None, DENSE), "float32")
            y = ls.placeholder("y", (None,), "float32")
            loss = ls.nn.functional.mse_loss(model(ids, dense), y)
            train_op = dp.minimize(loss) if data_parallel else opt.minimize(loss)
    lo, hi = rank * batch, (rank + 1) * batch
    for step, (ids_v, dense_v, y_v) in enumerate(batches(STEPS, workers * batch)):
        ids_v, dense_v, y_v = ids_v[lo:hi], dense_v[lo:hi], y_v[lo:hi]
        if style == "graph":
            g.run([loss, train_op], {ids: ids_v, dense: dense_v, y: y_v})
            continue
        loss_e = ls.nn.functional.mse_loss(model(ls.tensor(ids_v), ls.tensor(dense_v)), ls.tensor(y_v))
        if not data_parallel:
            opt.minimize(loss_e)
        elif step % 2:  # both eager paths: minimize, and backward + step
            dp.minimize(loss_e)
        else:
            loss_e.backward()
            dp.step()
            dp.zero_grad()
    out = {name: p.numpy() for name, p in model.named_parameters()}
    if data_parallel:
        dp.sync.flush()
        out["table"] = client.pull(prefix + "embedding", np.arange(VOCAB))[0]
        if cache:  # proof that the rows went through the cache (and, smaller than the table, it evicted)
            stats = list(dp.sync.stats().values())
            out["cache_lookups"] = np.array([s["lookups"] for s in stats])
            out["cache_evictions"] = np.array([s["evictions"] for s in stats])
    else:
        out["table"] = out.pop("embedding.weight")
    return out


CTR_SLOTS = [20, 50, 200, 1000, 3000, 5000]


def train_ctr(run: str, batch: int, steps: int, workers: int, rank: int, client) -> dict:
    """Trains a CTR model on power-law synthetic data with a bounded-staleness cache; worker 0
    returns its AUC on held-out data and every worker its cache statistics."""
    _, mode, model_name, staleness = run.split(":")
    data = ls_data.synthetic_ctr(workers * batch * steps + 4000, dense_dim=4, slot_sizes=CTR_SLOTS,
                                 dist="power_law", alpha=1.2, seed=5)
    dense = np.log1p(data["dense"])
    ls.manual_seed(7)
    cfg = models.CTRConfig(dense_dim=4, slot_sizes=CTR_SLOTS, embedding_dim=8, mlp_dims=(32, 16),
                           num_cross_layers=2)
    model = models.DCN(cfg) if model_name == "dcn" else models.WideAndDeep(cfg)
    opt = ls.optim.Adam(model.parameters(), lr=0.01)
    dp = ls.parallel.DataParallel(model, opt, mode=mode, client=client, prefix=f"{run}/", staleness=int(staleness),
                              cache_capacity=2000, cache_policy="lfu")
    n_train = workers * batch * steps
    max_lag = 0
    for step in range(steps):
        lo = (step * workers + rank) * batch
        sl = slice(lo, lo + batch)
        if step + 1 < steps:
            nxt = ((step + 1) * workers + rank) * batch
            ps.prefetch(model, data["sparse"][nxt:nxt + batch])
        logits = dp(ls.tensor(dense[sl]), ls.tensor(data["sparse"][sl]))
        if step % 10 == 0:  # how far behind the servers' rows were the rows just served?
            for emb in dp.sync.tables:
                ids, served = emb.cache.served_versions()
                max_lag = max(max_lag, int((client.pull(emb.table, ids)[1] - served).max()))
        dp.minimize(ls.nn.functional.binary_cross_entropy_with_logits(logits, ls.tensor(data["label"][sl])))
    dp.sync.flush()
    out = {f"stats/{k}": np.array(v["hit_rate"]) for k, v in dp.sync.stats().items()}
    out["max_lag"] = np.array(max_lag)
    if rank == 0:
        with ls.no_grad():
            scores = model(ls.tensor(dense[n_train:]), ls.tensor(data["sparse"][n_train:])).numpy()
        out["auc"] = np.array(metrics.auc(data["label"][n_train:], scores))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="ps:eager:sgd")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--ctr-steps", type=int, default=150)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()  # a server process serves here and exits
    store, _ = ls.distributed.ps_store()
    client = ps.connect(store=store, worker_rank=ls.distributed.rank())
    results = {}
    for run in args.runs.split(","):
        if run.startswith("ctr:"):
            res = train_ctr(run, 64, args.ctr_steps, ls.distributed.world_size(), ls.distributed.rank(), client)
        else:
            res = train(run, args.batch, ls.distributed.world_size(), ls.distributed.rank(), client)
        results.update({f"{run}/{k}": v for k, v in res.items()})
    np.savez(f"{args.out}.rank{ls.distributed.rank()}.npz", **results)
    ls.distributed.barrier()  # every worker is done with the servers: worker 0 stops them
    if ls.distributed.rank() == 0:
        client.shutdown_servers(force=True)
    client.close()
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
