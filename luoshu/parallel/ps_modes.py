"""The parameter-server sync modes of `luoshu.parallel.DataParallel`: "ps" and "hybrid".

- ps: every parameter lives on the servers. Embedding tables become `luoshu.ps`
  embeddings (read through the HET cache, gradients pushed); dense parameters become
  server dense tensors: each step pushes their gradients and pulls the updated values.
- hybrid: dense parameters stay on the workers and all-reduce (the "allreduce" mode's
  path); embedding tables go to the servers as in ps.

The server applies the worker optimizer's rule and hyperparameters (the same
`luoshu.optim` class), each worker's gradient pushed with scale 1/N, and tables and dense
tensors are synchronous over the N workers (one update per step from all their pushes), so
with `staleness=0` N workers at batch b follow one process at batch N*b exactly.

```python
ls.distributed.init()                               # under `luoshu launch -n N --servers S`
model = ls.models.DCN(cfg); opt = ls.optim.Adam(model.parameters(), lr=1e-3)
dp = ls.parallel.DataParallel(model, opt, mode="hybrid", staleness=2, cache_capacity=50_000)
loss = loss_fn(dp(dense, sparse), label); dp.minimize(loss)   # or build a graph with the same model
ls.ps.prefetch(model, next_sparse)           # optional: pull the next batch's rows early
dp.sync.flush()                          # at the end: write back what the caches hold
```

Options (keyword arguments of `DataParallel`): `client` (default: connect to the launcher's
servers), `staleness`, `cache_capacity`, `cache_policy`, `prefix` (table and tensor names on
the servers), `synchronous` (default True; False: asynchronous updates, bounded only by
the cache's staleness in steps).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from luoshu.core import context, live
from luoshu.core.op import apply, get_opdef
from luoshu.core.tensor import Tensor
from luoshu.distributed import env
from luoshu.distributed.env import DistError
from luoshu.ops.update import update_entries, update_inputs
from luoshu.optim import OPTIMIZERS, optimizer_name
from luoshu.parallel.data_parallel import AllReduceSync, SyncMode, register_sync_mode
from luoshu.ps.client import connect
from luoshu.ps.embedding import ps_embeddings, replace_embeddings


def _server_optimizer(opt, group_index: int = 0) -> tuple[str, dict]:
    """(name, hyperparameters) of a luoshu optimizer, for the server to build the same rule."""
    name = optimizer_name(opt)
    if name is None:
        raise DistError(f"DataParallel: the parameter servers run {sorted(OPTIMIZERS)}; {type(opt).__name__} has no "
                        "server rule")
    if opt.max_grad_norm is not None:
        raise DistError("DataParallel: max_grad_norm (global clipping) is not available with parameters on "
                        "parameter servers")
    group = opt.param_groups[group_index]
    hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
    return name, hyper


class _PSBase(SyncMode):
    """What ps and hybrid share: the client, the tables moved to the servers, their push."""

    OPTIONS = {"client": None, "staleness": 0, "cache_capacity": 0, "cache_policy": "lru", "prefix": "dp/",
               "synchronous": True}

    def __init__(self, dp, **options):
        self.dp = dp
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise DistError(f"DataParallel(mode={dp.mode!r}) has no options {unknown}; its options are "
                            f"{sorted(self.OPTIONS)}")
        options = {**self.OPTIONS, **options}
        client, staleness, prefix = options["client"], options["staleness"], options["prefix"]
        cache_capacity, cache_policy = options["cache_capacity"], options["cache_policy"]
        if dp.module is None or dp.optimizer is None:
            raise DistError(f"DataParallel(mode={dp.mode!r}) wraps a model and its optimizer, "
                            f"DataParallel(model, optimizer, mode={dp.mode!r}), created before the graph is "
                            "built: its embedding tables move to the parameter servers")
        if client is None:
            store, num = env.ps_store()
            if store is None or num == 0:
                raise DistError(f"DataParallel(mode={dp.mode!r}) needs parameter servers: start the job with "
                                "`luoshu launch -n N --servers S script.py`, or pass client=luoshu.ps.connect(...)")
            client = connect(store=store, worker_rank=env.rank())
        self.client, self.prefix = client, prefix
        self.workers = env.group_size(dp.group or None)
        self.sync_workers = self.workers if options["synchronous"] else None
        opt = dp.optimizer
        self.tables = replace_embeddings(dp.module, client, prefix=prefix, optimizer=_server_optimizer(opt),
                                         sync_workers=self.sync_workers, scale=1.0 / self.workers,
                                         cache_capacity=cache_capacity, cache_policy=cache_policy,
                                         staleness=staleness)
        self.tables += [e for e in ps_embeddings(dp.module) if not any(e is t for t in self.tables)]
        # The tables' handles join the optimizer, so its gradients (eager and graph) include theirs.
        in_opt = {id(p) for p in opt.parameters()}
        handles = [e.weight for e in self.tables if id(e.weight) not in in_opt]
        if handles:
            opt.add_param_group({"params": handles})
        self.table_of = {id(e.weight): e for e in self.tables}
        self._key = live.register(self)  # what ps_step / ps_sparse_push name in their attributes

    # --- tables --------------------------------------------------------------------------------
    def push_tables(self, pairs: list) -> None:
        """Pushes (optimizer index, (indices, values)) table gradients and ends every table's
        step (tables without a gradient too: synchronous tables count one push per step)."""
        params = self.dp.optimizer.parameters()
        for i, (indices, values) in pairs:
            self.table_of[id(params[i])].cache.accumulate(indices, values)
        for emb in self.tables:
            emb.cache.end_step()

    def flush(self) -> None:
        """Writes back every gradient the caches still hold (every worker calls it, once)."""
        for emb in self.tables:
            emb.cache.flush()

    def stats(self) -> dict:
        """Each table's cache statistics, by table name."""
        return {e.table: e.stats() for e in self.tables}

    def _split(self, pairs: list) -> tuple[list, list]:
        params = self.dp.optimizer.parameters()
        tables = [(i, g) for i, g in pairs if id(params[i]) in self.table_of]
        rest = [(i, g) for i, g in pairs if id(params[i]) not in self.table_of]
        for i, g in tables:
            if not isinstance(g, tuple):
                raise DistError(f"DataParallel: table {self.table_of[id(params[i])].table!r} got a dense gradient")
        return tables, rest


class PSSync(_PSBase):
    """mode="ps": dense parameters and tables on the servers."""

    def __init__(self, dp, **options):
        super().__init__(dp, **options)
        opt = dp.optimizer
        in_opt = {id(p): i for i, p in enumerate(opt.parameters())}
        self.dense: dict[int, tuple[str, Tensor]] = {}  # optimizer index -> (server name, parameter)
        for name, p in dp.module.named_parameters():
            if id(p) in in_opt:
                self.dense[in_opt[id(p)]] = (self.prefix + name, p)
        self._group_of = {i: opt._group_of[i] for i in self.dense}
        self._placed = False

    def setup(self, params, buffers):
        """Worker 0's dense values go to the servers first; every worker then pulls them."""
        self._placed = True
        opt = self.dp.optimizer
        rank = env.group_rank(self.dp.group or None)
        for turn in (0, 1):
            if (rank == 0) == (turn == 0):
                for i, (name, p) in self.dense.items():
                    self.client.create_dense(name, p.numpy(), optimizer=_server_optimizer(opt, self._group_of[i]),
                                             sync_workers=self.sync_workers)
            if self.workers > 1:
                env.barrier(self.dp.group or None)
        self._pull_dense()
        if self.workers > 1 and buffers:
            AllReduceSync(self.dp).setup([], buffers)

    def _pull_dense(self) -> None:
        futures = [(p, self.client.pull_dense_async(name)) for name, p in self.dense.values()]
        with torch.no_grad():
            for p, future in futures:
                value, _ = future.result(timeout=self.client.timeout_s + 30.0)
                p._value.copy_(torch.from_numpy(np.asarray(value)))

    def synchronize(self, pairs: list) -> None:
        """One step: push every gradient, end the tables' steps, pull the dense values."""
        tables, dense = self._split(pairs)
        scale = 1.0 / self.workers
        if not self._placed:  # DataParallel(..., broadcast=False) skips setup; the servers still need them
            self.setup([], [])
        for i, g in dense:  # checked before anything is sent
            if i not in self.dense:
                raise DistError(f"DataParallel(mode='ps'): parameter {i} of the optimizer is not in the model")
            if isinstance(g, tuple):
                raise DistError(f"DataParallel(mode='ps'): parameter {self.dense[i][0]!r} has a sparse gradient but "
                                "is no parameter-server table; use luoshu.nn.Embedding or luoshu.ps.Embedding for it")
        pushes = []
        for i, g in dense:
            pushes.append(self.client.push_dense(self.dense[i][0], g.detach().cpu().numpy(), scale=scale))
        if self.sync_workers is not None:
            # A synchronous round needs one push from every worker for every tensor.
            got = {i for i, _ in dense}
            for i, (name, p) in self.dense.items():
                if i not in got:
                    pushes.append(self.client.push_dense(name, np.zeros(p.shape, np.float32), scale=scale))
        self.push_tables(tables)
        self._pull_dense()
        for f in pushes:
            f.result(timeout=self.client.timeout_s + 30.0)

    def rewrite_update(self, graph, update_op) -> None:
        live.keep_alive(graph, self)  # the graph runs this mode's update op for as long as it lives
        update_op.opdef = get_opdef("ps_step")
        update_op.attrs = {"strategy": self._key, "params": tuple(update_op.attrs["params"]),
                           "kinds": update_op.attrs["kinds"]}
        graph._plans.clear()

    def reduce_gradients(self, optimizer, pairs):
        self.synchronize(pairs)
        params = optimizer.parameters()
        for i, _ in pairs:  # applied on the servers: nothing left for the local optimizer
            params[i].grad = None
        return []


class HybridSync(_PSBase):
    """mode="hybrid": dense parameters all-reduce between workers, tables on the servers."""

    def __init__(self, dp, **options):
        super().__init__(dp, **options)
        self._allreduce = AllReduceSync(dp)

    def setup(self, params, buffers):
        params = [p for p in params if id(p) not in self.table_of]
        self._allreduce.setup(params, buffers)

    def reduce_gradients(self, optimizer, pairs):
        tables, dense = self._split(pairs)
        self.push_tables(tables)
        params = optimizer.parameters()
        for i, _ in tables:
            params[i].grad = None
        return self._allreduce.reduce_gradients(optimizer, dense)

    def rewrite_update(self, graph, update_op) -> None:
        entries = update_entries(update_op.attrs["params"], update_op.attrs["kinds"], update_op.inputs)
        opt_params = self.dp.optimizer.parameters()
        tables = [e for e in entries if id(opt_params[e.index]) in self.table_of]
        rest = [e for e in entries if id(opt_params[e.index]) not in self.table_of]
        if not tables:
            self._allreduce.rewrite_update(graph, update_op)
            return
        live.keep_alive(graph, self)  # the graph runs this mode's push op for as long as it lives
        table_params, _, sparse_inputs = update_inputs(tables)
        if not rest:
            update_op.opdef = get_opdef("ps_sparse_push")
            update_op.inputs = sparse_inputs
            update_op.attrs = {"strategy": self._key, "params": table_params}
            graph._plans.clear()
            return
        with graph if context.current_graph() is not graph else contextlib.nullcontext():
            # The update reads its first dense gradient through the push: the push runs first.
            carry = apply("ps_sparse_push", *sparse_inputs, rest[0].inputs[0], strategy=self._key,
                          params=table_params)
        rest[0] = rest[0]._replace(inputs=[carry])
        params, kinds, update_op.inputs = update_inputs(rest)
        update_op.attrs = {**update_op.attrs, "params": params, "kinds": kinds}
        graph._plans.clear()
        self._allreduce.rewrite_update(graph, update_op)


register_sync_mode("ps", PSSync)
register_sync_mode("hybrid", HybridSync)

__all__ = ["HybridSync", "PSSync"]
