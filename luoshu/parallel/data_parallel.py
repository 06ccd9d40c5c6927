"""`DataParallel`: the same training step on every worker, gradients synchronised by a sync mode.

A sync mode decides how gradients (and parameters) travel between workers. Modes map to
`SyncMode` classes in `SYNC_MODES`; "allreduce" is here, the parameter-server modes
("ps", "hybrid", in `luoshu.parallel.ps_modes`) register theirs with `register_sync_mode`.
A sync mode implements:

- `setup(params, buffers)`: once, before training (allreduce: broadcast worker 0's values);
- `rewrite_update(graph, update_op)`: define-and-run, rewrite one `optimizer_update` op
  (allreduce: the bucketed gradient pass of `luoshu.compiler`);
- `reduce_gradients(optimizer, pairs) -> pairs`: eager, turn local gradients (parameter
  index with a torch tensor, or an `(indices, values)` pair for a sparse one) into
  synchronised ones; `begin_gradients(optimizer)` may return a `GradientSync` that gets
  each gradient while backward still runs (`DataParallel.minimize` feeds it).
"""

from __future__ import annotations

import warnings

from luoshu.compiler import insert_gradient_allreduce, states
from luoshu.compiler.gradient_allreduce import BucketFiller
from luoshu.core import context, live
from luoshu.core.autodiff import gradients
from luoshu.core.errors import Error, GradientError
from luoshu.core.graph import Graph
from luoshu.core.op import apply
from luoshu.core.tensor import IndexedSlices, Tensor
from luoshu.distributed import env
from luoshu.distributed.env import DistError
from luoshu.nn.module import Module
from luoshu.ops.comm import BucketBuffer
from luoshu.optim.optimizer import Optimizer, gradient_value

MODES = ("allreduce", "ps", "hybrid")


class SyncMode:
    """How a `DataParallel` synchronises gradients; subclasses implement `setup`, `rewrite_update` and
    `reduce_gradients`, and may override `begin_gradients` to start work while backward runs."""

    def __init__(self, dp: DataParallel, **options):
        if options:
            raise DistError(f"DataParallel(mode={dp.mode!r}) takes no options {sorted(options)}")
        self.dp = dp

    def setup(self, params: list[Tensor], buffers: list[Tensor]) -> None:
        raise NotImplementedError

    def rewrite_update(self, graph: Graph, update_op) -> None:
        raise NotImplementedError

    def reduce_gradients(self, optimizer: Optimizer, pairs: list) -> list:
        raise NotImplementedError

    def use_loss_scaler(self, loss_scaler) -> None:
        """Eager: the step's loss scaler, for a mode that updates the parameters itself (ZeRO); the
        others hand synchronised gradients to the optimizer, which unscales them."""

    def begin_gradients(self, optimizer: Optimizer) -> GradientSync:
        """Eager: a sink that gets each gradient as soon as backward finishes it."""
        return GradientSync(lambda pairs: self.reduce_gradients(optimizer, pairs))


class GradientSync:
    """Collects `(parameter index, gradient)` as backward produces them; `finish` returns the
    synchronised pairs in the order they came. This base one synchronises everything at the end."""

    def __init__(self, reduce=None):
        self._reduce = reduce
        self.pairs: list = []

    def add(self, index: int, grad) -> None:
        self.pairs.append((index, grad))

    def finish(self) -> list:
        return self._reduce(self.pairs) if self._reduce is not None else self.pairs


class _BucketSync(GradientSync):
    """Eager all-reduce: dense gradients fill buckets in the order backward finishes them, and
    each bucket's asynchronous all-reduce starts as soon as it is full; sparse ones are
    all-gathered at the end. Every worker runs the same backward, so the buckets match."""

    def __init__(self, bucket_bytes: int, group: tuple, buffers: list):
        super().__init__()
        self.bucket_bytes, self.group = bucket_bytes, group
        self.buffers = buffers  # persistent BucketBuffers, one per bucket position, kept across steps
        self.filler = BucketFiller(bucket_bytes)  # holds (index, value) pairs
        self.started: list = []  # ([(index, value)], flat buffer in flight)
        self.sparse: list = []

    def add(self, index, grad):
        self.pairs.append((index, grad))
        if isinstance(grad, tuple):
            self.sparse.append((index, grad))
            return
        closed = self.filler.add((index, grad), grad.numel() * grad.element_size(), grad.dtype)
        if closed is not None:
            self._start(closed)

    def _start(self, entries):
        if len(self.buffers) <= len(self.started):
            self.buffers.append(BucketBuffer())
        key = self.buffers[len(self.started)].key
        with context.no_grad():
            flat = apply("bucket_all_reduce", *[Tensor.from_value(g) for _, g in entries], reduce="mean",
                         group=self.group, buffer=key)
        self.started.append((entries, flat))

    def finish(self):
        for entries in self.filler.close():
            self._start(entries)
        out = {}
        with context.no_grad():
            for entries, flat in self.started:
                pieces = apply("bucket_unpack", flat, shapes=tuple(tuple(g.shape) for _, g in entries))
                pieces = pieces if isinstance(pieces, tuple) else (pieces,)
                for (index, _), piece in zip(entries, pieces):
                    out[index] = piece.value
            for index, (idx, val) in self.sparse:
                gathered = apply("sparse_all_gather", Tensor.from_value(idx), Tensor.from_value(val), reduce="mean",
                                 group=self.group)
                out[index] = (gathered[0].value, gathered[1].value)
        return [(i, out[i]) for i, _ in self.pairs]


class AllReduceSync(SyncMode):
    """Dense gradients: bucketed, asynchronous all-reduce (mean). Sparse: all-gather of rows."""

    @property
    def buffers(self) -> list:
        """The eager path's persistent bucket buffers (a lazy attribute: subclasses keep their __init__)."""
        return self.__dict__.setdefault("_bucket_buffers", [])

    def setup(self, params, buffers):
        if env.group_size(self.dp.group) == 1:
            return
        with context.no_grad():
            for t in list(params) + list(buffers):
                if t._value is not None:
                    t._value.copy_(apply("broadcast", Tensor.from_value(t._value), src=0, group=self.dp.group).value)

    def rewrite_update(self, graph, update_op):
        insert_gradient_allreduce(graph, update_op, self.dp.bucket_bytes, self.dp.group)

    def begin_gradients(self, optimizer):
        if env.group_size(self.dp.group) == 1:
            return GradientSync()
        return _BucketSync(self.dp.bucket_bytes, self.dp.group, self.buffers)

    def reduce_gradients(self, optimizer, pairs):
        sync = self.begin_gradients(optimizer)
        for index, grad in pairs:
            sync.add(index, grad)
        return sync.finish()


SYNC_MODES: dict[str, type[SyncMode]] = {"allreduce": AllReduceSync}


def register_sync_mode(mode: str, cls: type[SyncMode]) -> None:
    """Makes `DataParallel(mode=mode)` use `cls` (the parameter-server modes register here)."""
    if mode not in MODES:
        raise DistError(f"unknown DataParallel mode {mode!r}; the modes are {MODES}")
    SYNC_MODES[mode] = cls


class DataParallel:
    """Trains one model on every worker, each on its own share of the batch.

    Define-and-run: `DataParallel(graph)` rewrites every optimizer update already in the
    graph (or build through `dp.minimize(loss)` inside the graph). Eager: wrap the model
    and its optimizer, call the wrapper like the model, then `dp.minimize(loss)` or
    `loss.backward(); dp.step()`.

    ```python
    ls.distributed.init()
    model, opt = Net(), ls.optim.SGD(net.parameters(), lr=0.1)
    dp = ls.parallel.DataParallel(model, opt, bucket_size_mb=25)  # worker 0's weights everywhere
    loss = loss_fn(dp(x_shard), y_shard)
    dp.minimize(loss)                                         # mean gradient over the workers
    ```

    With the same seed, N workers at batch b each follow exactly the single-process run at
    batch N*b (for a loss that is a mean over the batch). `bucket_size_mb` bounds each
    all-reduce bucket; `group` (a DeviceGroup of worker ranks) defaults to every worker.
    `zero=1 | 2 | 3` shards the optimizer state, then the gradients, then the parameters over
    the workers (`luoshu.parallel.zero`; options `unit_size_mb`, stage 2's reduce-scatter
    buckets and stage 3's units, and
    `offload="optimizer" | "parameters"`). On a graph made tensor parallel by `parallelize`
    (a `DeviceMesh(dp=, tp=)`), `zero=1 | 2 | 3` shards each TP shard over the mesh's DP group.
    """

    def __init__(self, target: Module | Graph | None = None, optimizer: Optimizer | None = None, *,
                 mode: str = "allreduce", bucket_size_mb: float = 25.0, group=None, broadcast: bool = True,
                 zero: int = 0, **options):
        if mode not in MODES:
            raise DistError(f"DataParallel: unknown mode {mode!r}; the modes are {MODES}")
        if mode not in SYNC_MODES:  # luoshu.parallel's __init__ registers every mode
            raise DistError(f"DataParallel: mode {mode!r} is not registered; import luoshu.parallel")
        if not isinstance(bucket_size_mb, (int, float)) or isinstance(bucket_size_mb, bool) or not bucket_size_mb > 0:
            raise DistError(f"DataParallel: bucket_size_mb must be a positive number, found {bucket_size_mb!r}")
        if target is not None and not isinstance(target, (Module, Graph)):
            raise DistError(f"DataParallel wraps a luoshu.nn.Module or a luoshu.Graph, found {type(target).__name__}")
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise DistError(f"DataParallel: optimizer must be a luoshu.optim.Optimizer, found "
                            f"{type(optimizer).__name__}")
        env.init()
        self.mode = mode
        self.bucket_bytes = max(1, int(bucket_size_mb * 2**20))
        self.group = tuple(getattr(group, "ranks", group) or ())
        # a graph that compiles under a tensor-parallel strategy (`parallelize` on a mesh): ZeRO
        # shards over the mesh's DP axis, in each rank's local graph (luoshu.parallel.zero)
        self.tensor_parallel = states.strategy_of(target, target.ops) if isinstance(target, Graph) and zero else None
        if self.tensor_parallel is not None:
            dp_group = tuple(self.tensor_parallel.dp_group) or (env.rank(),)
            if self.group and sorted(self.group) != sorted(dp_group):
                raise DistError(f"DataParallel(zero={zero}): graph '{target.name}' is tensor parallel, so ZeRO shards "
                                f"over its mesh's DP group {dp_group}, found group={self.group}")
            self.group = dp_group
        env.process_group(self.group or None)  # validates the ranks; creating a group is collective
        self.module = target if isinstance(target, Module) else None
        self.optimizer = optimizer
        updates, optimizers = [], {}
        if isinstance(target, Graph):
            updates = [op for op in target.ops if op.opdef.name == "optimizer_update"]
            if not updates:
                raise DistError(f"DataParallel: graph '{target.name}' has no optimizer update to synchronise; "
                                "call optimizer.minimize(loss) inside it first")
            found = (live.lookup(op.attrs["optimizer"], "optimizer", "DataParallel") for op in updates)
            optimizers = {id(o): o for o in found}
            if self.optimizer is None and len(optimizers) == 1:
                self.optimizer = next(iter(optimizers.values()))  # the graph's one optimizer
        if options.get("offload") is not None and not zero:
            raise DistError(f"DataParallel: offload needs zero=1|2|3 (it moves the ZeRO shards' state), found "
                            f"offload={options['offload']!r} with zero={zero!r}")
        if zero:
            if mode != "allreduce":
                raise DistError(f"DataParallel: zero={zero} shards the optimizer of mode='allreduce', not {mode!r}")
            if isinstance(target, Graph) and len(optimizers) != 1:
                raise DistError(f"DataParallel(zero={zero}) shards one optimizer; graph '{target.name}' updates with "
                                f"{len(optimizers)}")
            self.sync = SYNC_MODES["zero"](self, zero, **options)
        else:
            self.sync = SYNC_MODES[mode](self, **options)
        if isinstance(target, Graph):
            if broadcast:
                params = [p for o in optimizers.values() for p in o.parameters()]
                self.sync.setup(params, [])
            for op in updates:
                self.sync.rewrite_update(target, op)
        elif broadcast:
            params = self.module.parameters() if self.module is not None else []
            if optimizer is not None:
                seen = {id(p) for p in params}
                params = list(params) + [p for p in optimizer.parameters() if id(p) not in seen]
            buffers = self.module.buffers() if self.module is not None else []
            self.sync.setup(params, buffers)

    @property
    def strategy(self) -> SyncMode:
        """Former name of `sync`, kept for one release."""
        warnings.warn("DataParallel.strategy is now DataParallel.sync", DeprecationWarning, stacklevel=2)
        return self.sync

    def __repr__(self) -> str:
        return (f"DataParallel(mode={self.mode!r}, workers={env.group_size(self.group or None)}, "
                f"bucket_bytes={self.bucket_bytes})")

    def __call__(self, *args, **kwargs):
        if self.module is None:
            raise DistError("DataParallel: no module to call; wrap one with DataParallel(module, optimizer)")
        return self.module(*args, **kwargs)

    def _need_optimizer(self) -> Optimizer:
        if self.optimizer is None:
            raise DistError("DataParallel: no optimizer; wrap one with DataParallel(module, optimizer)")
        return self.optimizer

    def minimize(self, loss: Tensor, var_list=None, loss_scaler=None):
        """Like `Optimizer.minimize`, with the gradients synchronised across the workers."""
        opt = self._need_optimizer()
        if not isinstance(loss, Tensor):
            raise GradientError(f"minimize takes a loss tensor, found {type(loss).__name__}")
        if loss.graph is not None:
            update = opt.minimize(loss, var_list=var_list, loss_scaler=loss_scaler)
            live.keep_alive(loss.graph, self)
            self.sync.rewrite_update(loss.graph, update.producer[0])
            return update
        params = opt.parameters() if var_list is None else list(var_list)
        index = {id(p): i for i, p in enumerate(opt.parameters())}
        for p in params:
            if id(p) not in index:
                raise Error(f"DataParallel.minimize: {p!r} is not a parameter of the optimizer")
        target = loss_scaler.scale(loss) if loss_scaler is not None else loss
        if loss_scaler is not None:
            self.sync.use_loss_scaler(loss_scaler)
        sync = self.sync.begin_gradients(opt)

        def ready(i: int, grad) -> None:
            if grad is not None:
                sync.add(index[id(params[i])], gradient_value(params[i], grad))

        gradients(target, params, on_ready=ready)
        if not sync.pairs:
            raise GradientError(f"minimize: the loss does not depend on any of the {len(params)} parameters")
        opt.apply_gradients(sync.finish(), loss_scaler)
        return None

    def synchronize_gradients(self) -> None:
        """Eager: replaces every parameter's `.grad` with its synchronised value."""
        opt = self._need_optimizer()
        params = opt.parameters()
        pairs = [(i, gradient_value(p, p.grad)) for i, p in enumerate(params) if p.grad is not None]
        for i, g in self.sync.reduce_gradients(opt, pairs):
            p = params[i]
            if isinstance(g, tuple):
                p.grad = IndexedSlices(Tensor.from_value(g[0]), Tensor.from_value(g[1]), p.shape)
            else:
                p.grad = Tensor.from_value(g)

    def step(self) -> None:
        """Eager, after `loss.backward()`: synchronises the gradients, then the optimizer steps."""
        self.synchronize_gradients()
        self._need_optimizer().step()

    def zero_grad(self) -> None:
        self._need_optimizer().zero_grad()

    def parameters(self) -> list[Tensor]:
        if self.module is not None:
            return self.module.parameters()
        return self._need_optimizer().parameters()

