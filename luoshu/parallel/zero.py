"""ZeRO over the data-parallel axis (Rajbhandari et al. 2020), stages 1, 2 and 3.

`DataParallel(model, opt, zero=1 | 2 | 3)` shards the optimizer state of the dense parameters
over the data-parallel ranks.

Stages 1 and 2 keep the parameters whole, as views of padded flat buffers (one per parameter
group and dtype at stage 1, one per gradient bucket at stage 2), padded to a multiple of the
rank count; rank r owns the r-th contiguous shard of each and an optimizer of the same class and
hyperparameters over it (so its state is 1/dp of the plain run's). Each step:

- stage 1: the gradients take plain data parallelism's path (the bucketed, asynchronous
  all-reduce, `insert_gradient_allreduce` / the eager buckets) and each rank copies its slice of
  them into a gradient shard (1/dp of them) that lives only for the update: between steps
  stage 1 holds no gradient memory beyond plain data parallelism's buckets;
- stage 2: the dense gradients are grouped into buckets of `unit_size_mb` (`BucketFiller`, in
  the order the backward makes them; the layout is fixed at the first step) and each bucket is
  reduce-scattered (mean) as soon as its last gradient exists — the same `zero3_reduce_scatter`
  as stage 3's units, recorded right after that gradient in define-and-run, started from the
  gradient sink in eager — so the bucket's whole gradients die there and a rank keeps only its
  1/dp shard. The transfer is asynchronous: the backward goes on while it runs, and a bucket's
  reduce-scatter waits on the previous one before starting (at most two flat copies in flight);
  the update waits on the last;
- the global gradient norm (for `max_grad_norm`) is the norm over all shards (each rank's
  sum of squares, all-reduced);
- each rank updates its shards, then the shards are all-gathered into the flat buffers, which
  the parameters view.

Stage 3 also shards the parameters: the dense parameters are grouped into units (a layer's
parameters), each unit is one padded flat tensor and a rank keeps only its shard of it between
uses; a parameter's `_value` is then a tensor on the "meta" device (shape, no storage).

- define-and-run: the graph pass below (`rewrite_update`) groups the parameters in the order
  the forward first reads them, `unit_size_mb` at most per unit (the gradient buckets' rule,
  `BucketFiller`), and replaces every reader of a parameter with the output of a
  `zero3_gather` (start the all-gather of the unit into a fresh buffer) and a `zero3_unpack`
  (wait, the parameters as views of it): one pair for the forward's readers and one for the
  backward's, recorded just before the unit's first reader, and the next unit's gather recorded
  right after it — the scheduler runs ready ops in recorded order, so the next unit's
  transfer overlaps this unit's compute and a unit's buffer dies after its last reader. Each
  unit's gradients meet in one `zero3_reduce_scatter` recorded right after the last of them is
  made, so the whole gradients die as soon as the shard exists (stage 2's mechanism).
- eager: each module that owns parameters is a unit, laid out at the end of the first step
  (which runs unsharded and tells the dense parameters from the sparse ones). Its `forward`
  gathers it (starting the next module's gather), frees it after; its outputs pass through a
  `zero3_mark` whose gradient gathers it again when the backward reaches the module (starting
  the previous module's gather); the unit is freed and reduce-scattered once backward has made
  every gradient of it. Parameters of embedding modules, parameters that two modules own, and
  parameters with sparse gradients stay whole (all-reduced, the model's optimizer).

Read or set the parameters of a stage-3 run inside `with dp.sync.gathered_parameters():`
(`model.state_dict()`, `model.load_state_dict(...)`): on exit each rank keeps its shard of
what they hold (stages 1-2: the parameters are whole; under tensor parallelism it also brings
what a TP member left to member 0, see below).

The result equals plain data parallelism up to floating-point summation order: the update
rules are elementwise. Sparse (`IndexedSlices`) gradients — embedding tables — keep the plain
path: their rows are all-gathered and the model's own optimizer updates them lazily.
`consolidated_state_dict()` gathers the shards into the plain optimizer's state-dict layout (a
ZeRO checkpoint loads into a plain run), and `load_state_dict` takes a plain one.

Per-parameter rules cannot run on flat shards: LAMB (its trust ratio is a norm per parameter) is
refused. Dynamic loss scaling (fp16, `minimize(loss, loss_scaler=...)`) unscales the shards; its
overflow check is summed over the DP group, so a step an inf in one rank's shard skips is skipped on
every rank.

Under tensor parallelism (a graph `parallelize` made tensor parallel on a `DeviceMesh(dp=, tp=)`)
stages 1-2 shard each rank's TP shard of a parameter over the mesh's DP group: the states pass
calls this mode's update rewrite on each rank's local graph (`Strategy.update_passes`) instead of
the DP all-reduce, clipping weighs each parameter's pieces as its TP states say (a split
parameter once on each TP member, a duplicated one 1/tp) and sums over both groups, and the
checkpoint hook consolidates over DP, then gathers over TP. Stage 3 shards each rank's TP shards
(its units are laid out from this rank's values) and also registers a pass on every local graph
the strategy compiles (`Strategy.graph_passes`), so the readers of a plan of another fetch set (an
evaluation) gather too. Every stage leaves to TP member 0 the duplicated parameters a member's
local graph never reads (the row-parallel biases: the partial sums get the bias once, on member 0;
`_leave_to_member0`): the other members hold no value, optimizer state or shard of them and
reduce, update and count none of their gradients; clipping weighs such a parameter whole on
member 0, `gathered_parameters()` broadcasts it from there, and the checkpoints (written by rank 0,
TP member 0) hold it as a plain run's do. A later graph that reads one on such a member is refused on
every member (the members tell each other what they read of those parameters, one all-reduce over the
TP group per compiled local graph), so member 0 does not go on alone into a collective.

In a pipeline (`pipeline(..., zero=1 | 2)`) the stage builds this mode over its DP group and hands it
each step's gradients, accumulated over the micro-batches, once after the last (`step_accumulated`):
stage 1 all-reduces them and takes the shard, stage 2 reduce-scatters each bucket; the pipeline's
`ShardNorm` (shards weighed as their parameters, summed over the stages and TP members) then the DP
group give clipping's norm. Stage 3 in a pipeline lays out the units of the stage program at compile
(`shard_stage`: gathers in its forward and backward graphs, a reduce-scatter per unit per micro-batch)
and takes the accumulated shards once a step (`step_shards`); a tensor-parallel stage's program is
this rank's local graphs, so its units hold this rank's TP blocks (every stage, 1-3, alike), and
before any layout the stage leaves to TP member 0 what this member's forward and backward graphs never
read (`leave_stage`, the same `_leave_to_member0` over the stage's TP group): no value, shard, gradient
fetch (the backward no longer makes it), reduction, state or update of a row-parallel bias on the
other members, clipping counting it whole on member 0 (its weight, shared among the stages that hold
it, scaled by tp / keepers), `gathered_parameters()` (`Pipeline.gather_stages`, checkpoints) bringing it
from member 0.

`offload="optimizer"` keeps each shard's optimizer state (and fp32 shard) in pinned host memory
and runs the shard update there, copies to and from the device on a side stream
(`non_blocking`). `offload="parameters"` (stage 3) is accepted and for now does the same: the
device still keeps the parameter shards between uses (moving them to the host is not built). On a
CPU-only run (parameters on the CPU) both are accepted and change nothing.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as torch_dist

from luoshu.compiler import insert_gradient_allreduce, states
from luoshu.compiler.gradient_allreduce import BucketFiller
from luoshu.compiler.passes import prune, reposition
from luoshu.compiler.recompute import apply_recompute
from luoshu.compiler.states import ShardNorm
from luoshu.core import context, dtypes, live
from luoshu.core.op import OpDef, apply, get_opdef, register
from luoshu.core.shapes import numel
from luoshu.core.tensor import RELEASED, Tensor, TensorMeta
from luoshu.distributed import env
from luoshu.distributed.env import DistError
from luoshu.ops.update import update_entries, update_inputs
from luoshu.optim import OPTIMIZERS, optimizer_name
from luoshu.parallel.data_parallel import SYNC_MODES, AllReduceSync, GradientSync, SyncMode

STAGES = (1, 2, 3)
OFFLOADS = (None, "optimizer", "parameters")
_WORK = "_luoshu_zero3_work"  # attribute of a gathered buffer whose all-gather is still running
# torch 2.13 renamed the single-tensor collectives; the old names warn.
_all_gather_single = getattr(torch_dist, "all_gather_single", None) or torch_dist.all_gather_into_tensor
_reduce_scatter_single = getattr(torch_dist, "reduce_scatter_single", None) or torch_dist.reduce_scatter_tensor


def _freed(p: Tensor, shape: tuple, message: str) -> torch.Tensor:
    """What a stage-3 parameter holds between uses: its (this rank's: a TP shard's) shape and dtype,
    no storage, and the `message` a read of it raises (core's `Tensor.value` and eager ops refuse
    meta values)."""
    value = torch.empty(shape, dtype=dtypes.to_torch(p.dtype), device="meta")
    setattr(value, RELEASED, message)
    return value


def _released_message(label: str, p: Tensor) -> str:
    return (f"DataParallel(zero=3): parameter {label} {tuple(p.shape)} {p.dtype} is sharded over the data-parallel "
            "ranks and holds no data outside its module's forward (this rank keeps only its shard); read or set "
            "it inside `with dp.sync.gathered_parameters():`")


def _left_message(label: str, p: Tensor) -> str:
    return (f"DataParallel(zero=...) under tensor parallelism: parameter {label} {tuple(p.shape)} {p.dtype} is kept "
            "on tensor-parallel member 0 only (this member's graphs never read it: a row-parallel bias, added once on "
            "member 0), and this member holds no data of it; read or set it inside "
            "`with dp.sync.gathered_parameters():`")


class _Sharded:
    """What every ZeRO layout shares: parameters `params` at `offsets` (`numels` elements) of one
    padded flat tensor of `padded` elements, rank r owning elements [r*shard_size, (r+1)*shard_size),
    and the reduce-scatter of their gradients into this rank's shard (the one copy of it: stage 2's
    buckets and stage 3's units). `group`: the data-parallel worker ranks (None: every worker)."""

    group: tuple | None

    @property
    def pg(self):
        """The data-parallel process group, looked up (cached by `env`) rather than kept: a layout
        that outlives `luoshu.distributed.shutdown()` must not keep the destroyed group's native
        threads alive until the interpreter's teardown."""
        return env.process_group(self.group)

    def start_reduce_scatter(self, grads: list) -> tuple[torch.Tensor, object, torch.Tensor]:
        """Starts the reduce-scatter (mean over the ranks) of `grads` (in `params` order; None:
        zeros): (this rank's shard, still being written while the work runs; the work, None
        when there is nothing to wait on; the flat copy the transfer reads, to keep alive)."""
        flat = torch.zeros(self.padded, dtype=self.shard.dtype, device=self.device)
        for g, offset, n in zip(grads, self.offsets, self.numels):
            if g is not None:
                flat[offset:offset + n].copy_(g.reshape(-1))
        flat.div_(self.world)
        if self.pg is None:
            return flat, None, flat
        out = flat.new_empty(self.shard_size)
        return out, _reduce_scatter_single(out, flat, group=self.pg, async_op=True), flat

    def gradient_pieces(self) -> list[tuple[int, torch.Tensor]]:
        """(parameter index, its piece of this step's gradient shard) for every parameter this
        rank's shard covers (padding is no parameter's): what clipping's norm weighs per parameter."""
        lo, hi = self.rank * self.shard_size, (self.rank + 1) * self.shard_size
        pieces = []
        for i, offset, n in zip(self.indices, self.offsets, self.numels):
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                pieces.append((i, self.grad_shard[a - lo:b - lo]))
        return pieces


class _FlatGroup(_Sharded):
    """Stages 1-2: dense parameters of one parameter group and dtype (stage 1: all of them;
    stage 2: one gradient bucket of them), the parameters views of one padded flat buffer, this
    rank's shard of it and the optimizer over that shard."""

    def __init__(self, indices: list[int], params: list[Tensor], hyper: dict, opt_class, world: int, rank: int,
                 group: tuple | None, stage: int):
        self.indices = indices
        self.params = params
        self.numels = [p._value.numel() for p in params]
        self.shard_size = -(-sum(self.numels) // world)
        self.padded = self.shard_size * world
        first = params[0]._value
        self.device = first.device
        self.flat = torch.zeros(self.padded, dtype=first.dtype, device=first.device)
        self.offsets = []
        pos = 0
        for p, n in zip(params, self.numels):
            self.flat[pos:pos + n].copy_(p._value.reshape(-1))
            p._value = self.flat[pos:pos + n].view(p._value.shape)  # the parameter now views the flat buffer
            self.offsets.append(pos)
            pos += n
        self.rank, self.world, self.group = rank, world, group
        self.shard = self.flat[rank * self.shard_size:(rank + 1) * self.shard_size]
        self.shard_param = Tensor.from_value(self.shard, requires_grad=True, name="zero_shard", kind="variable")
        self.optimizer = opt_class([self.shard_param])
        self.optimizer.param_groups[0].update(hyper)  # the group's own (already checked) hyperparameters
        # this step's gradient shard (stage 1: this rank's slice of the all-reduced gradients;
        # stage 2: the reduce-scattered shard), dropped after the update
        self.grad_shard = None

    def take_shard(self, got: dict) -> None:
        """Stage 1: this rank's slice of the (all-reduced) gradients `got` (index -> tensor;
        missing: zeros), copied piece by piece: no flat copy of the whole gradient."""
        lo, hi = self.rank * self.shard_size, (self.rank + 1) * self.shard_size
        self.grad_shard = torch.zeros_like(self.shard)
        for i, offset, n in zip(self.indices, self.offsets, self.numels):
            g = got.get(i)
            a, b = max(lo, offset), min(hi, offset + n)
            if g is not None and a < b:
                self.grad_shard[a - lo:b - lo].copy_(g.reshape(-1)[a - offset:b - offset])


class _Unit(_Sharded):
    """Stage 3: the dense parameters of one unit (one layer; one parameter group and dtype).
    Between uses a rank keeps only its shard of their padded flat concatenation."""

    def __init__(self, indices: list[int], params: list[Tensor], hyper: dict, opt_class, world: int, rank: int,
                 group: tuple | None, group_index: int, offload: Offload, labels: list[str]):
        self.indices, self.params, self.group_index = indices, params, group_index
        self.released = [_released_message(label, p) for label, p in zip(labels, params)]
        # this rank's values (under tensor parallelism: its TP shards of the parameters)
        self.shapes = [tuple(p._value.shape) for p in params]
        self.numels = [p._value.numel() for p in params]
        self.offsets, pos = [], 0
        for n in self.numels:
            self.offsets.append(pos)
            pos += n
        self.shard_size = -(-pos // world)
        self.padded = self.shard_size * world
        self.world, self.rank, self.group, self.offload = world, rank, group, offload
        first = params[0]._value
        flat = torch.zeros(self.padded, dtype=first.dtype, device=first.device)
        for p, offset, n in zip(params, self.offsets, self.numels):
            flat[offset:offset + n].copy_(p._value.reshape(-1))
        for p, shape, message in zip(params, self.shapes, self.released):
            p._value = _freed(p, shape, message)
        self.device = first.device
        self.shard = flat[rank * self.shard_size:(rank + 1) * self.shard_size].clone()
        self.shard_param = Tensor.from_value(self.shard, requires_grad=True, name="zero3_shard", kind="variable")
        self.optimizer = opt_class([offload.host_shard(self) if offload.enabled else self.shard_param])
        self.optimizer.param_groups[0].update(hyper)
        self.grad_shard = None  # this step's reduce-scattered gradient, dropped after the update
        self.full = None  # eager: the gathered flat buffer while the parameters are in use
        self.in_flight = None  # eager: a started gather not waited on yet
        self.users = 0  # eager: forward calls of the unit's module under way

    # --- the collectives (both modes) -----------------------------------------------------------
    def start_gather(self) -> torch.Tensor:
        """A fresh padded flat buffer the unit's all-gather writes into (maybe still running)."""
        shard = self.offload.to_device(self)
        flat = shard.new_empty(self.padded)
        if self.pg is None:
            flat.copy_(shard)
        else:
            work = _all_gather_single(flat, shard, group=self.pg, async_op=True)
            setattr(flat, _WORK, work)
        return flat

    def finish_gather(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The parameters' values, views of `flat`, once its gather finished."""
        work = flat.__dict__.pop(_WORK, None)
        if work is not None:
            work.wait()
        return [flat[offset:offset + n].view(shape) for shape, offset, n in zip(self.shapes, self.offsets, self.numels)]

    # --- eager use ------------------------------------------------------------------------------
    def prefetch(self) -> None:
        if self.full is None and self.in_flight is None:
            self.in_flight = self.start_gather()

    def acquire(self) -> None:
        """Makes the parameters whole (waiting on a prefetch, or gathering now)."""
        if self.full is not None:
            return
        flat = self.in_flight if self.in_flight is not None else self.start_gather()
        self.in_flight, self.full = None, flat
        for p, value in zip(self.params, self.finish_gather(flat)):
            p._value = value

    def release(self) -> None:
        if self.full is not None:
            self.full = None
            for p, shape, message in zip(self.params, self.shapes, self.released):
                p._value = _freed(p, shape, message)

    def drain(self) -> None:
        """Drops a prefetch nobody waited on (before the shard changes)."""
        if self.in_flight is not None:
            self.finish_gather(self.in_flight)
            self.in_flight = None

    def reshard_from_parameters(self) -> None:
        """The shard from what the (whole) parameters hold now."""
        flat = torch.zeros(self.padded, dtype=self.shard.dtype, device=self.device)
        for p, offset, n in zip(self.params, self.offsets, self.numels):
            flat[offset:offset + n].copy_(p._value.reshape(-1))
        self.shard.copy_(flat[self.rank * self.shard_size:(self.rank + 1) * self.shard_size])
        self.offload.shard_changed(self)


class Offload:
    """Where the shards' optimizer state (and, stage 3, the parameter shards) live between uses.

    On CUDA (not run here: no GPU was available while writing it) the shard optimizer steps a
    pinned host fp32 copy of the shard: the gradient shard goes to the host and the updated
    shard back to the device with `non_blocking` copies on a side stream, the compute stream
    waiting on an event only where it reads the result. Anywhere else the option is accepted and
    nothing moves."""

    def __init__(self, kind: str | None):
        if kind not in OFFLOADS:
            raise DistError(f"DataParallel: offload must be one of {OFFLOADS}, found {kind!r}")
        self.kind = kind
        self.enabled = False  # set per unit/group once the device is known
        self._stream = None

    def applies_to(self, device: torch.device) -> bool:
        return self.kind is not None and device.type == "cuda"

    def stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def host_shard(self, group) -> Tensor:
        """The optimizer's parameter: a pinned host fp32 copy of `group.shard`."""
        group.host = torch.empty(group.shard.shape, dtype=torch.float32, pin_memory=True)
        group.host.copy_(group.shard)
        group.host_grad = torch.empty_like(group.host, pin_memory=True)
        group.host_param = Tensor.from_value(group.host, requires_grad=True, name="zero_host_shard", kind="variable")
        return group.host_param

    def step(self, group) -> None:
        """One shard update: on the host when offloaded, else on the shard itself."""
        if not self.enabled:
            group.optimizer.apply_gradients([(0, group.grad_shard)])
            return
        stream, compute = self.stream(), torch.cuda.current_stream(group.shard.device)
        stream.wait_stream(compute)  # the gradient shard is complete on the compute stream
        with torch.cuda.stream(stream):
            group.host_grad.copy_(group.grad_shard, non_blocking=True)
        stream.synchronize()  # the host update reads it
        group.optimizer.apply_gradients([(0, group.host_grad.to(group.host.dtype))])
        with torch.cuda.stream(stream):
            group.shard.copy_(group.host, non_blocking=True)
            group.shard.record_stream(stream)
        compute.wait_stream(stream)  # later kernels read the updated shard

    def shard_changed(self, group) -> None:
        if self.enabled:
            group.host.copy_(group.shard)

    def to_device(self, unit) -> torch.Tensor:
        """The shard to gather from: the device copy (host-resident shards are not built yet)."""
        return unit.shard


class ZeroSync(SyncMode):
    """DataParallel's ZeRO sync mode (stages 1, 2 and 3); see the module docstring."""

    def __init__(self, dp, stage: int, *, unit_size_mb: float = 4.0, offload: str | None = None, **options):
        super().__init__(dp, **options)
        if stage not in STAGES:
            raise DistError(f"DataParallel: zero must be one of {STAGES}, found {stage!r}")
        opt = dp.optimizer
        if opt is None:
            raise DistError("DataParallel(zero=...) shards an optimizer: wrap the model and its optimizer, "
                            "DataParallel(model, optimizer, zero=...), or a graph after optimizer.minimize(loss)")
        name = optimizer_name(opt)
        if name is None or name == "lamb":
            raise DistError(f"DataParallel(zero={stage}): {type(opt).__name__} cannot be sharded elementwise; ZeRO "
                            f"runs {sorted(set(OPTIMIZERS) - {'lamb'})}")
        if not isinstance(unit_size_mb, (int, float)) or isinstance(unit_size_mb, bool) or not unit_size_mb > 0:
            raise DistError(f"DataParallel(zero={stage}): unit_size_mb must be a positive number, found "
                            f"{unit_size_mb!r}")
        if offload == "parameters" and stage != 3:
            raise DistError(f"DataParallel(zero={stage}): offload='parameters' needs zero=3 (stages 1-2 keep every "
                            "parameter whole on the device); offload='optimizer' works with every stage")
        # the tensor-parallel strategy the graph compiles under (DataParallel found it), or None
        self.tensor_parallel = getattr(dp, "tensor_parallel", None)
        self.stage = stage
        self.offload = Offload(offload)
        self.unit_bytes = max(1, int(unit_size_mb * 2**20))
        self.plain = AllReduceSync(dp)  # sparse gradients, and the broadcast at setup
        self.groups: list | None = None  # _FlatGroup (stages 1-2) or _Unit (stage 3)
        self.owner: dict[int, object] = {}
        self._loaded = False  # a plain state dict was loaded and still has to reach the shards
        self._loss_scaler = None  # fp16: the update's LossScaler (use_loss_scaler)
        self._logical_graphs: list = []  # under TP: graphs whose cached plans may read what the layout frees
        # under TP (`_leave_to_member0`; a pipeline stage: `leave_stage`): the parameters this TP member
        # leaves to member 0, each with the device its value was on (None: not decided yet), and for each
        # parameter fewer than all TP members keep, how many keep it
        self._left: dict | None = None if self.tensor_parallel is not None else {}
        self._keepers: dict[int, int] = {}
        self._tp_group, self._tp_member = (), 0  # the TP group (member order) and this rank's place in it
        self._gather_depth = 0  # nesting of gathered_parameters() contexts
        self._key = live.register(self)  # what sharded_update and the zero3 ops name in their attributes
        self._scatters: list = []  # (work, flat copy it reads) of the reduce-scatter still in flight
        # stage 3, eager: module -> its unit once laid out, and the order the forward meets units
        self._module_units: dict[int, _Unit] = {}
        self._forward_order: list[_Unit] = []
        self._wrapped = False
        # id(parameter) -> its name in the wrapped model (eager), for the error of a read between uses
        self._names = {id(p): name for name, p in dp.module.named_parameters()} if dp.module is not None else {}
        if stage == 3 and dp.module is not None:
            self._wrap_modules(dp.module)

    # --- SyncMode -------------------------------------------------------------------------------
    def setup(self, params, buffers) -> None:
        if self.tensor_parallel is None:  # `parallelize` gave every rank rank 0's values already
            self.plain.setup(params, buffers)

    def use_loss_scaler(self, loss_scaler) -> None:
        """The dynamic loss scaler of the update (fp16): the shard update unscales every shard and
        skips the step on every rank where any rank's gradients overflow."""
        self._loss_scaler = loss_scaler

    def rewrite_update(self, graph, update_op) -> None:
        if update_op.attrs.get("loss_scaler", -1) >= 0:
            self.use_loss_scaler(live.lookup(update_op.attrs["loss_scaler"], "loss scaler", "DataParallel(zero=...)"))
        live.keep_alive(graph, self)  # the graph runs this mode's update op for as long as it lives
        if self.tensor_parallel is not None:
            # The states pass makes each rank's local graph; this mode rewrites the local update
            # there (the gradients are then this rank's TP shards), in place of the DP all-reduce.
            self.tensor_parallel.update_passes[update_op.attrs["optimizer"]] = self._rewrite_local
            # every local graph: no reader of a parameter left to TP member 0; stage 3: readers gather
            self.tensor_parallel.graph_passes.append(self._check_local_reads)
            self._logical_graphs.append(graph)
            graph._plans.clear()
            return
        self._rewrite(graph, update_op)

    def _rewrite_local(self, graph, update_op) -> None:
        """The tensor-parallel case: `update_op` of a rank's local graph (compiled again for each
        fetch set and feed signature; the shards' layout is made once, at the first). The duplicated
        parameters this TP member's graph never reads are left to member 0 first (`_leave_to_member0`)."""
        live.keep_alive(graph, self)
        entries = update_entries(update_op.attrs["params"], update_op.attrs["kinds"], update_op.inputs)
        if self._left is None:
            strategy = self.tensor_parallel
            self._leave_to_member0([graph], [e.index for e in entries if e.kind == "d"], tuple(strategy.group),
                                   strategy.index, strategy.strategy)
        kept = [e for e in entries if e.index not in self._left]
        update_op.attrs["params"], update_op.attrs["kinds"], update_op.inputs = update_inputs(kept)
        self._rewrite(graph, update_op)

    def _leave_to_member0(self, graphs: list, dense: list[int], tp_group: tuple, member: int, strategy: int) -> None:
        """Tensor parallelism, once (the first local update; a pipeline stage's compile): on a TP
        member other than 0, the duplicated dense parameters of `dense` (optimizer indices) that none
        of its local `graphs` reads (a row-parallel bias: the partial sums get it once, on member 0)
        are left to member 0, which keeps every parameter. This member then holds no value, no
        optimizer state and no shard of them, reduces and updates none of their gradients (the
        graph's op that makes one is pruned), and `gathered_parameters()` brings them from member 0.
        Every member learns how many members keep each parameter (one all-reduce over `tp_group`, in
        TP member order; `member`: this rank's position in it; `strategy`: the states' index), for
        clipping's weights, the broadcast in `gathered_parameters()` and the check of later graphs."""
        n = len(tp_group)
        params = self.dp.optimizer.parameters()
        left = []
        if member != 0:
            index_of = {id(params[i]): i for i in dense}
            read = {i for graph in graphs for i in self._readers(graph, index_of)}
            left = [i for i in dense if i not in read and states.states_of(params[i], strategy, n).is_pure_duplicate()]
        counts = torch.zeros(len(params), dtype=torch.float64)
        for i in left:
            counts[i] = 1.0
        if n > 1 and env.is_distributed():
            counts = get_opdef("all_reduce").compute(counts, reduce="sum", group=tuple(tp_group), async_op=False)
        self._tp_group, self._tp_member = tuple(tp_group), member
        # parameter index -> how many TP members keep it, where fewer than all do
        self._keepers = {i: n - int(c) for i, c in enumerate(counts.tolist()) if c > 0}
        self._left = {i: params[i]._value.device for i in left}
        self._free_left()
        for g in self._logical_graphs:  # plans compiled before may read them
            g._plans.clear()

    def leave_stage(self, program, indices: list[int], tp_group: tuple, member: int, strategy: int) -> set[int]:
        """ZeRO in a tensor-parallel pipeline stage (`pipeline(..., zero=1 | 2 | 3)`), at its compile,
        before `shard_stage`: the duplicated dense parameters of the stage program that this TP
        member's forward and backward graphs never read are left to member 0 (`_leave_to_member0`;
        `indices`: the optimizer index of each of the program's parameters, `tp_group`: the stage's
        TP ranks in member order). Their gradients leave `program.grad_fetches` (the backward no
        longer makes them). Returns the indices left here."""
        dense = [i for i, sparse in zip(indices, program.sparse) if not sparse]
        self._leave_to_member0([program.forward, program.backward], dense, tp_group, member, strategy)
        fetches, pos = [], 0
        for i, sparse in zip(indices, program.sparse):
            width = 2 if sparse else 1
            if i not in self._left:
                fetches += program.grad_fetches[pos:pos + width]
            pos += width
        program.grad_fetches = fetches + program.grad_fetches[pos:]
        return set(self._left)

    def _rewrite(self, graph, update_op) -> None:
        if self.stage == 3:
            if self.groups is not None and self.tensor_parallel is None:
                raise DistError("DataParallel(zero=3) shards the parameters of one update op; this graph has more")
            self._shard_graph(graph, update_op)
        elif self.stage == 2:
            if self.groups is not None and self.tensor_parallel is None:
                raise DistError("DataParallel(zero=2) shards the gradients of one update op; this graph has more")
            self._bucket_graph(graph, update_op)
        else:  # stage 1: plain data parallelism's bucketed all-reduce, then the shard update
            insert_gradient_allreduce(graph, update_op, self.dp.bucket_bytes, self.dp.group)
        update_op.opdef = get_opdef("sharded_update")
        update_op.attrs = {"strategy": self._key, "params": tuple(update_op.attrs["params"]),
                           "kinds": update_op.attrs["kinds"]}
        graph._plans.clear()

    def begin_gradients(self, optimizer) -> GradientSync:
        if self.stage >= 2:
            return _ScatterGradients(self)
        return _AllReducedGradients(self, self.plain.begin_gradients(optimizer))

    def reduce_gradients(self, optimizer, pairs) -> list:
        sync = self.begin_gradients(optimizer)
        for i, g in pairs:
            sync.add(i, g)
        sync.finish()
        params = optimizer.parameters()
        for i, _ in pairs:
            params[i].grad = None
        return []

    # --- the step -------------------------------------------------------------------------------
    def _layout(self, dense_indices: list[int]) -> list[tuple[int, list[int]]]:
        """(parameter group, indices) per (group, dtype), in the order of `dense_indices`."""
        opt = self.dp.optimizer
        params = opt.parameters()
        group_of = {id(p): gi for gi, group in enumerate(opt.param_groups) for p in group["params"]}
        by_key: dict[tuple, list[int]] = {}
        for i in dense_indices:
            by_key.setdefault((group_of[id(params[i])], params[i].dtype), []).append(i)
        return [(gi, indices) for (gi, _), indices in sorted(by_key.items(), key=lambda kv: kv[1][0])]

    def _hyper(self, gi: int) -> dict:
        return {k: v for k, v in self.dp.optimizer.param_groups[gi].items() if k != "params"}

    def _bucket_layout(self, dense_indices: list[int]) -> list[tuple[int, list[int]]]:
        """Stage 2: (parameter group, indices) per gradient bucket, `BucketFiller` over the
        parameters in the order of `dense_indices` (the order their gradients are made)."""
        opt = self.dp.optimizer
        params = opt.parameters()
        group_of = {id(p): gi for gi, group in enumerate(opt.param_groups) for p in group["params"]}
        filler, buckets = BucketFiller(self.unit_bytes), []
        for i in dense_indices:
            p = params[i]  # this rank's bytes (a TP shard's)
            closed = filler.add(i, p._value.numel() * p._value.element_size(), (group_of[id(p)], p.dtype))
            if closed is not None:
                buckets.append(closed)
        buckets += filler.close()
        return [(group_of[id(params[b[0]])], b) for b in buckets]

    def _build(self, layout: list[tuple[int, list[int]]]) -> None:
        """Stages 1-2: one `_FlatGroup` per (parameter group, indices) of `layout`."""
        opt = self.dp.optimizer
        world, rank = env.group_size(self.dp.group or None), env.group_rank(self.dp.group or None)
        params = opt.parameters()
        self.groups = []
        for gi, indices in layout:
            group = _FlatGroup(indices, [params[i] for i in indices], self._hyper(gi), type(opt), world, rank,
                               self.dp.group or None, self.stage)
            group.group_index = gi
            group.position = len(self.groups)
            self.offload.enabled = self.offload.applies_to(group.flat.device)
            if self.offload.enabled:  # the optimizer steps the pinned host copy
                group.optimizer = type(opt)([self.offload.host_shard(group)])
                group.optimizer.param_groups[0].update(self._hyper(gi))
            self.groups.append(group)
            for i in indices:
                self.owner[i] = group
        self.world, self.rank = world, rank
        if self._loaded:
            self._scatter_loaded_state()

    def _build_units(self, units: list[tuple[int, list[int]]]) -> None:
        """Stage 3: shards every unit (a parameter group index and parameter indices)."""
        opt = self.dp.optimizer
        world, rank = env.group_size(self.dp.group or None), env.group_rank(self.dp.group or None)
        params = opt.parameters()
        self.groups = []
        for gi, indices in units:
            device = params[indices[0]]._value.device
            self.offload.enabled = self.offload.applies_to(device)
            unit = _Unit(indices, [params[i] for i in indices], self._hyper(gi), type(opt), world, rank,
                         self.dp.group or None, gi, self.offload, [self._label(i) for i in indices])
            unit.position = len(self.groups)
            self.groups.append(unit)
            for i in indices:
                self.owner[i] = unit
        self.world, self.rank = world, rank
        for graph in self._logical_graphs:  # plans compiled before read the parameters whole
            graph._plans.clear()
        if self._loaded:
            self._scatter_loaded_state()

    def _label(self, i: int) -> str:
        """Parameter `i` of the optimizer, as an error names it."""
        p = self.dp.optimizer.parameters()[i]
        if id(p) in self._names:
            return repr(self._names[id(p)])
        return f"{p.name!r} (index {i} in the optimizer)" if p.name else f"of index {i} in the optimizer"

    def scatter(self, group: _Sharded, grads: list) -> torch.Tensor:
        """Starts the reduce-scatter of one bucket (stage 2) or unit (stage 3) and returns its
        shard, still being written: the backward goes on meanwhile. The one before is waited on
        first, so at most two flat copies are in flight; the update waits on the last."""
        self.wait_scatters()
        out, work, flat = group.start_reduce_scatter(grads)
        if work is not None:
            self._scatters.append((work, flat))
        return out

    def wait_scatters(self) -> None:
        for work, _ in self._scatters:
            work.wait()
        self._scatters = []

    def synchronize(self, pairs: list) -> None:
        """One define-and-run step. Stage 1: the gradients are all-reduced (plain data
        parallelism's buckets); take this rank's slice, update the shards, gather them. Stages 2-3:
        each bucket's (unit's) gradient shard is already reduce-scattered; update the shards."""
        if self.stage >= 2:
            sparse = []
            for i, g in pairs:
                unit = self.owner.get(i)
                if unit is not None and unit.indices[0] == i and not isinstance(g, tuple):
                    unit.grad_shard = g
                else:
                    sparse.append((i, g))
            self._update_shards(sparse)
            return
        self._update_all_reduced(pairs)

    def step_accumulated(self, dense: list, reduced: list) -> None:
        """One step of gradients accumulated outside this mode (a pipeline stage's, over its
        micro-batches), once after the last of them. `dense`: (index, gradient) pairs not reduced
        over the DP group yet, sharded here: stage 1 all-reduces them (plain data parallelism's
        buckets) and takes this rank's slice, stage 2 reduce-scatters each bucket (`BucketFiller`
        in the order of `dense`). `reduced`: gradients already synchronised over the DP group (a
        table's gathered rows), which the model's optimizer applies. The layout is made at the
        first step."""
        if self.stage == 3:
            raise DistError("DataParallel(zero=3): a step of whole gradients accumulated outside the mode is not "
                            "built; a pipeline stage's plans reduce-scatter each micro-batch (shard_stage, "
                            "step_shards)")
        if self.groups is None:
            indices = [i for i, _ in dense]
            self._build(self._bucket_layout(indices) if self.stage == 2 else self._layout(sorted(indices)))
        unknown = sorted({i for i, _ in dense} ^ set(self.owner))
        if unknown:
            raise DistError(f"DataParallel(zero={self.stage}): parameters {unknown} got a dense gradient in one step "
                            "and not in another; ZeRO lays out the parameters at the first step")
        got = dict(dense)
        with torch.no_grad():
            if self.stage == 1:
                sync = self.plain.begin_gradients(self.dp.optimizer)
                for i, g in dense:
                    sync.add(i, g)
                got = dict(sync.finish())
                for group in self.groups:
                    group.take_shard(got)
            else:
                for group in self.groups:
                    group.grad_shard = self.scatter(group, [got[i] for i in group.indices])
        self._update_shards(reduced, reduced=True)

    def _update_all_reduced(self, pairs: list) -> None:
        """Stage 1: `pairs` are all-reduced (dense) and all-gathered (sparse) already."""
        dense = [(i, g) for i, g in pairs if not isinstance(g, tuple)]
        sparse = [(i, g) for i, g in pairs if isinstance(g, tuple)]
        if self.groups is None:
            self._build(self._layout(sorted(i for i, _ in dense)))
        unknown = [i for i, _ in dense if i not in self.owner]
        if unknown:
            raise DistError(f"DataParallel(zero={self.stage}): parameters {unknown} got a dense gradient for the first "
                            "time after the first step; ZeRO lays out the parameters at the first step")
        got = {i: g for i, g in dense}
        with torch.no_grad():
            for group in self.groups:
                group.take_shard(got)
        self._update_shards(sparse, reduced=True)

    def _update_shards(self, plain_pairs: list, reduced: bool = False) -> None:
        """Clips by the norm over every shard and the plain path's gradients (`reduced`: those
        are synchronised already), updates this rank's shards (stages 1-2: and all-gathers them),
        then the plain path."""
        pg = env.process_group(self.dp.group or None)
        opt = self.dp.optimizer
        self.wait_scatters()
        with torch.no_grad():
            gathered = plain_pairs if reduced else self.plain.reduce_gradients(opt, plain_pairs) if plain_pairs else []
            if self._loss_scaler is not None and self._loss_scaler.enabled:
                gathered = self._unscale(gathered, pg)
                if gathered is None:  # an overflow on some rank: every rank skips the step
                    return
            coef = None
            if opt.max_grad_norm is not None:
                # The global norm over every shard and the (replicated) plain-path gradients;
                # under tensor parallelism each parameter's pieces weighed as its TP states say
                # (`opt.shard_norm`, installed by the states pass) and summed over the TP group too.
                pieces = [piece for g in self.groups for piece in g.gradient_pieces()]
                norm = opt.shard_norm if opt.shard_norm is not None else ShardNorm({}, ())
                if self._keepers:
                    # a duplicated parameter left to TP member 0 counts whole over its k keepers, not
                    # 1/n on each of the n members (a pipeline's weight also shares it among stages)
                    n = len(self._tp_group)
                    norm = ShardNorm({**norm.weights, **{i: norm.weights.get(i, 1.0 / n) * n / k
                                                         for i, k in self._keepers.items()}}, norm.group)
                dense_sq = norm.squared([i for i, _ in pieces], [t for _, t in pieces],
                                        device=self.groups[0].device).double()
                if pg is not None:
                    dense_sq = dense_sq.reshape(1)
                    torch_dist.all_reduce(dense_sq, group=pg)
                    dense_sq = dense_sq.reshape(())
                total = (dense_sq + opt.gradient_norm_squared(gathered)).sqrt()
                coef = torch.clamp(opt.max_grad_norm / (total + 1e-6), max=1.0)
                for group in self.groups:
                    group.grad_shard.mul_(coef.to(group.grad_shard.dtype))
            for group in self.groups:
                # the model optimizer's hyperparameters (a scheduler may have changed lr) hold for its shards
                group.optimizer.param_groups[0].update(self._hyper(group.group_index))
                if self.stage == 3:
                    group.drain()
                self.offload.step(group)
                group.grad_shard = None  # the step's own: nothing holds a gradient between steps
                if self.stage <= 2 and pg is not None:
                    torch_dist.all_gather_single(group.flat, group.shard.clone(), group=pg)
        if gathered:
            opt.apply_gradients(gathered, clip_coef=coef)

    def _unscale(self, gathered: list, pg) -> list | None:
        """fp16: divides every gradient shard and the plain path's gradients by the loss scale and
        updates the scale. The overflow check covers every shard: its flag is summed over the DP
        group (and the scaler's agreement group: TP members, the job), so all ranks skip alike.
        Returns the unscaled plain gradients, or None when the step is skipped."""
        scaler = self._loss_scaler
        plain = [g[1] if isinstance(g, tuple) else g for _, g in gathered]
        unscaled, found = scaler._unscaled_copies([group.grad_shard for group in self.groups] + plain)
        if pg is not None:
            found = found.reshape(1)
            torch_dist.all_reduce(found, group=pg)
            found = found.reshape(())
        scaler._update_scale(found)
        if bool(found.item()):
            for group in self.groups:
                group.grad_shard = None
            return None
        for group, value in zip(self.groups, unscaled):
            group.grad_shard = value
        rest = unscaled[len(self.groups):]
        return [(i, (g[0], u) + tuple(g[2:]) if isinstance(g, tuple) else u) for (i, g), u in zip(gathered, rest)]

    # --- stage 3, define-and-run ----------------------------------------------------------------
    def _shard_graph(self, graph, update) -> None:
        """The stage-3 graph pass (see the module docstring): lays out the units of `update`'s
        dense parameters and rewires every reader of them to per-phase gathers."""
        apply_recompute(graph)  # the recomputed forward copies read the backward's gathers
        opt = self.dp.optimizer
        params = opt.parameters()
        entries = update_entries(update.attrs["params"], update.attrs["kinds"], update.inputs)
        dense = [e for e in entries if e.kind == "d"]
        if not dense:
            raise DistError("DataParallel(zero=3): the update has no dense parameter to shard")
        readers = self._readers(graph, {id(params[e.index]): e.index for e in dense})
        # a TP rank's local graph may not read a parameter (a row-parallel bias: added on member 0)
        missing = [] if self.tensor_parallel is not None else [params[e.index] for e in dense if e.index not in readers]
        if missing or any(params[e.index]._value is None for e in dense):
            raise DistError(f"DataParallel(zero=3): parameters {missing} are not read by graph '{graph.name}'")
        position = {id(op): k for k, op in enumerate(graph.ops)}

        def made_at(t) -> int:
            return position.get(id(t.producer[0]), -1) if t.producer is not None else -1

        if self.groups is None:
            # Units: the parameters in the order the program first reads them, filled like buckets.
            group_of = {id(p): gi for gi, group in enumerate(opt.param_groups) for p in group["params"]}
            filler, units = BucketFiller(self.unit_bytes), []
            first_read = {e.index: readers[e.index][0][0] if e.index in readers else len(graph.ops) for e in dense}
            for e in sorted(dense, key=lambda e: first_read[e.index]):
                p = params[e.index]
                closed = filler.add(e.index, p._value.numel() * dtypes.to_torch(p.dtype).itemsize,
                                    (group_of[id(p)], p.dtype))
                if closed is not None:
                    units.append(closed)
            units += filler.close()
            units.sort(key=lambda u: first_read[u[0]])
            self._build_units([(group_of[id(params[u[0]])], u) for u in units])
        elif sorted(self.owner) != sorted(e.index for e in dense):  # a local graph compiled again
            raise DistError(f"DataParallel(zero=3): this update's dense parameters {sorted(e.index for e in dense)} "
                            f"are not the ones laid out at the first ({sorted(self.owner)})")
        # Readers recorded before the first weight gradient are the forward's (the last layer's
        # input gradient may come first: its unit then stays gathered into its backward).
        backward_from = min(made_at(e.inputs[0]) for e in dense)
        before: dict[int, list] = {}  # id(op) -> new ops recorded just before it
        self._gather_readers(graph, readers, (lambda k: k < backward_from, lambda k: k >= backward_from), before)
        self._scatter_graph(graph, update, entries, made_at, before, {})

    def _readers(self, graph, index_of: dict) -> dict[int, list]:
        """Parameter index -> [(position, op)] of the ops of `graph` that read it (`index_of`: id of
        the parameter -> its index); a local graph's leaf stands for the parameter it reads."""
        readers: dict[int, list] = {}
        for k, op in enumerate(graph.ops):
            for t in op.inputs:
                i = index_of.get(id(states.leaf_source(t)))
                if i is not None and (not readers.get(i) or readers[i][-1][1] is not op):
                    readers.setdefault(i, []).append((k, op))
        return readers

    def _gather_readers(self, graph, readers: dict, phases, before: dict) -> None:
        """Per phase (a test on a reader's position: the forward's, the backward's), one
        `zero3_gather` + `zero3_unpack` per unit the phase reads, the readers rewired to the views:
        unit k's wait recorded just before its first reader, unit k+1's gather right after it (in
        `before`, for `reposition`)."""
        position = {id(op): k for k, op in enumerate(graph.ops)}
        with graph:
            for in_phase in phases:
                chain = []
                for unit in self.groups:
                    ops = [(k, op) for i in unit.indices for k, op in readers.get(i, ()) if in_phase(k)]
                    if ops:
                        chain.append((min(k for k, _ in ops), unit, [op for _, op in ops]))
                chain.sort(key=lambda c: c[0])
                starts, waits = [], []
                for _, unit, ops in chain:
                    mark = len(graph.ops)
                    flat = apply("zero3_gather", unit.shard_param, sync=self._key, unit=unit.position)
                    start = graph.ops[mark:]
                    mark = len(graph.ops)
                    views = apply("zero3_unpack", flat, sync=self._key, unit=unit.position)
                    views = views if isinstance(views, tuple) else (views,)
                    wait = graph.ops[mark:]
                    starts.append(start)
                    waits.append(wait)
                    swap = {id(p): v for p, v in zip(unit.params, views)}
                    for op in ops:
                        op.inputs = [swap.get(id(states.leaf_source(t)), t) for t in op.inputs]
                for k, (_, _, ops) in enumerate(chain):
                    first = min(ops, key=lambda op: position[id(op)])
                    recorded = (starts[0] if k == 0 else []) + waits[k] + (starts[k + 1] if k + 1 < len(chain) else [])
                    before.setdefault(id(first), []).extend(recorded)

    def _check_local_reads(self, graph) -> None:
        """Tensor parallelism: run on every local graph the strategy compiles. A graph may not read a
        parameter a TP member left to member 0 on that member; at stage 3, readers of the sharded
        parameters that no update rewired (an evaluation's) read them through gathers. Where some
        member left parameters (every member knows: `_keepers`), the members tell each other what
        they read of them (one all-reduce over the TP group: every member compiles the same local
        graphs), so all of them refuse the graph, not only the reader while member 0 goes on into a
        collective its peers never join."""
        params = self.dp.optimizer.parameters()
        read = self._readers(graph, {id(params[i]): i for i in self._left or ()})
        n = len(self._tp_group)
        if self._keepers and n > 1 and env.is_distributed():
            found = torch.zeros((n, len(params)), dtype=torch.float64)
            found[self._tp_member, sorted(read)] = 1.0
            found = get_opdef("all_reduce").compute(found, reduce="sum", group=self._tp_group, async_op=False)
            readers = {m: [i for i in range(len(params)) if found[m, i]] for m in range(n) if found[m].any()}
        else:
            readers = {self._tp_member: sorted(read)} if read else {}
        if readers:
            where = "; ".join(f"member {m}: {[self._label(i) for i in indices]}" for m, indices in readers.items())
            raise DistError(f"DataParallel(zero={self.stage}): graph '{graph.name}' reads, on tensor-parallel members "
                            f"other than 0, parameters they left to member 0 (their training graphs never read "
                            f"them there) ({where}); every member refuses it (this is member {self._tp_member})")
        if self.stage != 3 or self.groups is None:
            return
        readers = self._readers(graph, {id(params[i]): i for i in self.owner})
        if readers:
            before = {}
            self._gather_readers(graph, readers, (lambda k: True,), before)
            reposition(graph, before, {})

    def _bucket_graph(self, graph, update) -> None:
        """The stage-2 graph pass: the dense gradients in buckets (`BucketFiller`, `unit_size_mb`)
        in the order the backward makes them; each bucket's `zero3_reduce_scatter` recorded right
        after its last gradient is made, the update reading the shards."""
        entries = update_entries(update.attrs["params"], update.attrs["kinds"], update.inputs)
        dense = [e for e in entries if e.kind == "d"]
        if not dense:
            raise DistError("DataParallel(zero=2): the update has no dense gradient to shard")
        params = self.dp.optimizer.parameters()
        unknown = [params[e.index] for e in dense if params[e.index]._value is None or numel(params[e.index].shape)
                   is None]
        if unknown:
            raise DistError(f"DataParallel(zero=2): parameters {unknown} have no value or a run-time shape")
        position = {id(op): k for k, op in enumerate(graph.ops)}

        def made_at(t) -> int:
            return position.get(id(t.producer[0]), -1) if t.producer is not None else -1

        order = sorted(dense, key=lambda e: made_at(e.inputs[0]))
        if self.groups is None:
            self._build(self._bucket_layout([e.index for e in order]))
        elif sorted(self.owner) != sorted(e.index for e in dense):  # a local graph compiled again
            raise DistError(f"DataParallel(zero=2): this update's dense parameters {sorted(e.index for e in dense)} "
                            f"are not the ones laid out at the first ({sorted(self.owner)})")
        self._scatter_graph(graph, update, entries, made_at, {}, {})

    def _scatter_graph(self, graph, update, entries, made_at, before: dict, after: dict) -> None:
        """Stages 2-3: one `zero3_reduce_scatter` per bucket (unit) of `self.groups`, recorded right
        after the last of its gradients is made (so they die there), the new ops of `before` /
        `after` put in place, and `update` reading the shards."""
        self._place_scatters(graph, {e.index: e.inputs[0] for e in entries if e.kind == "d"}, made_at, before, after)
        rest = [e for e in entries if e.kind != "d"]
        dense = [e for e in entries if e.kind == "d"]
        shards = [dense[0]._replace(index=u.indices[0], inputs=[u.grad_tensor]) for u in self.groups]
        update.attrs["params"], update.attrs["kinds"], update.inputs = update_inputs(shards + rest)

    def _place_scatters(self, graph, grad_of: dict, made_at, before: dict, after: dict) -> None:
        """One `zero3_reduce_scatter` per bucket (unit) of `self.groups` over its gradients
        (`grad_of`: parameter index -> gradient tensor of `graph`), recorded right after the last of
        them is made (so they die there; `unit.grad_tensor`: the shard), and the new ops of `before`
        / `after` put in place."""
        with graph:
            for unit in self.groups:
                grads = [grad_of[i] for i in unit.indices]
                mark = len(graph.ops)
                shard = apply("zero3_reduce_scatter", *grads, sync=self._key, unit=unit.position)
                ops = graph.ops[mark:]
                last = max(made_at(g) for g in grads)
                if last < 0:
                    before.setdefault(id(graph.ops[0]), []).extend(ops)
                else:
                    after.setdefault(id(graph.ops[last]), []).extend(ops)
                unit.grad_tensor = shard
        reposition(graph, before, after)

    # --- stage 3, a pipeline stage --------------------------------------------------------------
    def shard_stage(self, program, indices: list[int], alone: set[int]) -> list:
        """Stage 3 in a pipeline (`pipeline(..., zero=3)`): shards the dense parameters of one stage
        program (`luoshu.compiler.pipeline.StageProgram`; `indices`: the optimizer index of each of
        its parameters) and rewrites its plans' graphs. Units: the parameters in the order the
        forward first reads them, filled like buckets (`unit_size_mb`); a parameter of `alone` (one
        several stages share) is a unit of its own, laid out alike on every stage that holds it, so
        their shards cover the same elements. The forward and the backward graph each read every
        unit through one `zero3_gather` + `zero3_unpack` (the next unit's gather recorded right after
        this one's wait: prefetched), and the backward reduce-scatters each unit's gradients right
        after the last of them is made (so the stage never holds a whole gradient beyond one unit's
        at a time). `program.grad_fetches` becomes the sparse gradients' tensors (in parameter
        order), then one gradient shard per unit (this micro-batch's, the mean over the DP group,
        still being written until `wait_scatters`). Returns the units."""
        if self.groups is not None:
            raise DistError("DataParallel(zero=3) shards one stage program; this mode has laid out its units already")
        opt = self.dp.optimizer
        params = opt.parameters()
        # what this TP member left to member 0 (`leave_stage`) has no unit and no gradient fetch here
        dense = [i for i, sparse in zip(indices, program.sparse) if (not sparse or i in alone) and i not in self._left]
        if not dense:
            raise DistError(f"pipeline(zero=3): stage {program.stage} has no dense parameter to shard")
        forward = {id(op) for op in prune(program.forward, program.forward_fetches)}
        readers = self._readers(program.forward, {id(params[i]): i for i in dense})
        readers = {i: [(k, op) for k, op in found if id(op) in forward] for i, found in readers.items()}
        first_read = {i: readers[i][0][0] if readers.get(i) else len(program.forward.ops) for i in dense}
        group_of = {id(p): gi for gi, group in enumerate(opt.param_groups) for p in group["params"]}
        filler, units = BucketFiller(self.unit_bytes), []
        for i in sorted(dense, key=lambda i: first_read[i]):
            p = params[i]
            if i in alone:
                units += filler.close() + [[i]]
                continue
            closed = filler.add(i, p._value.numel() * p._value.element_size(), (group_of[id(p)], p.dtype))
            if closed is not None:
                units.append(closed)
        units += filler.close()
        units.sort(key=lambda u: first_read[u[0]])
        self._build_units([(group_of[id(params[u[0]])], u) for u in units])
        before: dict[int, list] = {}
        self._gather_readers(program.forward, readers, (lambda k: True,), before)
        reposition(program.forward, before, {})
        backward = program.backward
        before = {}
        self._gather_readers(backward, self._readers(backward, {id(params[i]): i for i in dense}), (lambda k: True,),
                             before)
        position = {id(op): k for k, op in enumerate(backward.ops)}
        made_from: dict[int, Tensor] = {}  # id(densified gradient) -> the rows' values it is made from

        def made_at(t) -> int:
            t = made_from.get(id(t), t)
            return position.get(id(t.producer[0]), -1) if t.producer is not None else -1

        grad_of, rest, pos, after = {}, [], 0, {}
        for i, sparse in zip(indices, program.sparse):
            if i in self._left:
                continue
            if not sparse:
                grad_of[i] = program.grad_fetches[pos]
                pos += 1
                continue
            rows, values = program.grad_fetches[pos:pos + 2]
            pos += 2
            if i not in alone:  # a table's rows keep the plain path (gathered over DP, the model's optimizer)
                rest += [rows, values]
                continue
            # a shared table's rows on this stage: its unit's gradient is dense on every stage that holds it
            local = params[i]._value.shape[0]
            with backward:
                mark = len(backward.ops)
                kept = rows, values
                if params[i].ds and not params[i].ds[0].is_pure_duplicate():  # a row-split table: its block's rows
                    kept = apply("shard_rows", rows, values, start=states.default().index * local, rows=local)
                grad_of[i] = apply("sparse_to_dense", *kept, num_rows=local)
            made_from[id(grad_of[i])] = values
            if made_at(values) >= 0:
                after.setdefault(id(backward.ops[made_at(values)]), []).extend(backward.ops[mark:])
        self._place_scatters(backward, grad_of, made_at, before, after)
        program.grad_fetches = rest + [unit.grad_tensor for unit in self.groups]
        return self.groups

    def step_shards(self, shards: list, reduced: list) -> None:
        """One pipeline step at stage 3: `shards`, each unit's gradient shard of the step (the
        micro-batches' reduce-scattered shards accumulated and scaled by the pipeline; a shared
        unit's summed over its stages); `reduced`: gradients already synchronised over the DP group
        (a table's gathered rows), which the model's optimizer applies."""
        for unit, shard in zip(self.groups, shards):
            unit.grad_shard = shard
        self._update_shards(reduced, reduced=True)

    # --- stage 3, eager -------------------------------------------------------------------------
    def _wrap_modules(self, model) -> None:
        """Wraps the forward of every module that owns parameters (see the module docstring)."""
        from luoshu.nn.layers import Embedding, EmbeddingBag  # the tables keep the plain path

        owners: dict[int, list] = {}
        for _, module in model.named_modules():
            for p in module._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), []).append(module)
        self._owners = owners
        self._tables = {id(p) for _, m in model.named_modules() if isinstance(m, (Embedding, EmbeddingBag))
                        for p in m._parameters.values() if p is not None}
        self._modules = [m for _, m in model.named_modules() if any(p is not None for p in m._parameters.values())]
        for module in self._modules:
            forward = module.forward
            object.__setattr__(module, "forward", self._gathering(module, forward))

    def _gathering(self, module, forward):
        def zero3_forward(*args, **kwargs):
            unit = self._module_units.get(id(module))
            if unit is None or context.current_graph() is not None:
                return forward(*args, **kwargs)
            self._enter(unit)
            try:
                out = forward(*args, **kwargs)
            finally:
                unit.users -= 1
                if unit.users == 0:
                    unit.release()
            if not context.is_grad_enabled():
                return out
            if isinstance(out, Tensor):
                return self._mark(out, unit)
            if isinstance(out, tuple):
                return tuple(self._mark(t, unit) if isinstance(t, Tensor) else t for t in out)
            return out

        return zero3_forward

    def _mark(self, t: Tensor, unit: _Unit) -> Tensor:
        if not t.requires_grad:
            return t
        return apply("zero3_mark", t, sync=self._key, unit=unit.position)

    def _enter(self, unit: _Unit) -> None:
        unit.acquire()
        unit.users += 1
        if not unit.seen:
            unit.seen = True
            unit.order = len(self._forward_order)
            self._forward_order.append(unit)
        elif unit.order + 1 < len(self._forward_order):
            self._forward_order[unit.order + 1].prefetch()

    def backward_reached(self, position: int) -> None:
        """The backward reached a unit's module (a zero3_mark's gradient): gather it, and start
        gathering the module the forward ran before it."""
        unit = self.groups[position]
        unit.acquire()
        if unit.seen and unit.order > 0:
            self._forward_order[unit.order - 1].prefetch()

    def _lay_out_eager(self, pairs: list) -> None:
        """End of the first eager step: the units, one per (module, group, dtype) of dense parameters."""
        params = self.dp.optimizer.parameters()
        index = {id(p): i for i, p in enumerate(params)}
        sparse = {i for i, g in pairs if isinstance(g, tuple)}
        units, unit_modules = [], []
        for module in self._modules:
            indices = [index[id(p)] for p in module._parameters.values()
                       if p is not None and id(p) in index and len(self._owners[id(p)]) == 1
                       and id(p) not in self._tables and index[id(p)] not in sparse]
            for gi, group in self._layout(indices):
                units.append((gi, group))
                unit_modules.append(module)
        self._build_units(units)
        for unit, module in zip(self.groups, unit_modules):
            unit.seen = False
            if id(module) in self._module_units:  # a module with two groups: one unit, the first
                raise DistError(f"DataParallel(zero=3): {type(module).__name__} has parameters in two parameter "
                                "groups or dtypes; eager ZeRO-3 gathers one unit per module")
            self._module_units[id(module)] = unit

    def gathered_parameters(self):
        """A context in which every parameter is whole on every rank: stage 3's sharded ones, and
        under tensor parallelism those a TP member left to member 0 (broadcast from it). On exit
        each rank keeps its shard of what they then hold, and drops what it left to member 0
        (stages 1-2 without such parameters: nothing to do)."""
        if (self.stage == 3 and self.groups) or self._keepers:
            return self._gathered()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _gathered(self):
        # re-entrant: `ls.load` gathers, and the optimizer-state load inside it gathers again;
        # only the outermost context gathers and reshards
        depth = self._gather_depth
        self._gather_depth = depth + 1
        units = self.groups if self.stage == 3 and self.groups else []
        if depth == 0:
            for unit in units:
                unit.drain()
                unit.acquire()
            self._bring_from_member0()
        try:
            yield
        finally:
            self._gather_depth = depth
            if depth == 0:
                for unit in units:
                    unit.reshard_from_parameters()
                    unit.release()
                self._free_left()

    def _free_left(self) -> None:
        """What a TP member holds of the parameters it left to member 0: their shapes, no storage."""
        params = self.dp.optimizer.parameters()
        for i in self._left or ():
            p = params[i]
            p._value = _freed(p, tuple(p._value.shape), _left_message(self._label(i), p))

    def _bring_from_member0(self) -> None:
        """Every parameter some TP member left to member 0, broadcast from member 0 over the TP group
        (member 0's is whole: stage 3's units are gathered first)."""
        if not self._keepers:
            return
        group = self._tp_group
        src = sorted(group).index(group[0])  # the broadcast's root: a position by ascending rank
        broadcast = get_opdef("broadcast")
        params = self.dp.optimizer.parameters()
        with torch.no_grad():
            for i in sorted(self._keepers):
                p = params[i]
                value = p._value
                if i in self._left:  # left here: receive into a fresh buffer
                    value = torch.empty(value.shape, dtype=value.dtype, device=self._left[i])
                got = broadcast.compute(value, src=src, group=group, async_op=False)
                if i in self._left:
                    p._value = got


    # --- memory and checkpoints -----------------------------------------------------------------
    def optimizers(self) -> list:
        """The optimizers this rank steps: the shard optimizers (and the model's own, which
        holds the state of parameters with sparse gradients only)."""
        return [g.optimizer for g in self.groups or []] + [self.dp.optimizer]

    def persistent_gradient_bytes(self) -> int:
        """Gradient buffers this mode keeps between steps, outside any plan: none (stage 1's
        all-reduce buckets are the plan's, counted as plain data parallelism's; every stage's
        gradient shard lives only from its reduce until the update)."""
        return 0

    def consolidated_state_dict(self) -> dict:
        """The plain optimizer's `state_dict()` with every shard's state gathered (every rank
        calls it; every rank gets the whole state)."""
        opt = self.dp.optimizer
        plain = opt.state_dict()
        if not self.groups:
            return plain
        pg = env.process_group(self.dp.group or None)
        tensors, state_meta = dict(plain["tensors"]), dict(plain["meta"]["state"])
        for group in self.groups:
            shard = group.optimizer.state_dict()
            entry0 = shard["meta"]["state"].get("0")
            if entry0 is None:
                continue
            step = entry0["step"]
            for name in entry0["tensors"]:
                value = shard["tensors"][f"state.0.{name}"]
                full = torch.empty(group.shard_size * self.world, dtype=value.dtype)
                if pg is None:
                    full.copy_(value)
                else:
                    torch_dist.all_gather_into_tensor(full, value.contiguous(), group=pg)
                for i, offset, p in zip(group.indices, group.offsets, group.params):
                    n = p._value.numel()
                    tensors[f"state.{i}.{name}"] = full[offset:offset + n].view(p._value.shape).clone()
                    entry = state_meta.setdefault(str(i), {"step": step, "tensors": []})
                    entry["tensors"] = sorted(set(entry["tensors"]) | {name})
        return {"tensors": tensors, "meta": {**plain["meta"], "state": state_meta}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Takes a plain optimizer's `state_dict()` (a run without ZeRO, or
        `consolidated_state_dict()`): the model's optimizer checks it whole and nothing changes on
        a mismatch; each shard optimizer then takes its slice (at the first step, when the shards
        are laid out)."""
        with self.gathered_parameters():  # stage 3: the model's optimizer places state where parameters are
            self.dp.optimizer.load_state_dict(state_dict)
            self._loaded = True
            if self.groups is not None:
                self._scatter_loaded_state()

    def _scatter_loaded_state(self) -> None:
        """Moves the loaded state of the sharded parameters from the model's optimizer into the
        shard optimizers (this rank's slice); the model's optimizer keeps only the rest."""
        opt = self.dp.optimizer
        plain = opt.state_dict()
        meta_state, tensors = plain["meta"]["state"], plain["tensors"]
        for i in self._left:  # left to TP member 0, which keeps their state
            for name in meta_state.pop(str(i), {}).get("tensors", ()):
                tensors.pop(f"state.{i}.{name}", None)
        for group in self.groups:
            entries = [meta_state.get(str(i)) for i in group.indices]
            if all(e is None for e in entries):
                continue
            steps = {e["step"] for e in entries if e is not None}
            names = {tuple(e["tensors"]) for e in entries if e is not None}
            if None in entries or len(steps) != 1 or len(names) != 1:
                raise DistError(f"DataParallel(zero={self.stage}): the loaded state holds parameters "
                                f"{group.indices} at different steps or with different state; ZeRO shards them "
                                "as one flat tensor")
            step, names = steps.pop(), names.pop()
            shard_tensors = {}
            for name in names:
                flat = torch.zeros(group.padded, dtype=group.shard.dtype)
                for i, offset, p in zip(group.indices, group.offsets, group.params):
                    flat[offset:offset + p._value.numel()].copy_(tensors[f"state.{i}.{name}"].reshape(-1))
                shard_tensors[f"state.0.{name}"] = flat[self.rank * group.shard_size:
                                                        (self.rank + 1) * group.shard_size].clone()
            shard = group.optimizer.state_dict()
            shard["meta"]["state"] = {"0": {"step": step, "tensors": list(names)}}
            group.optimizer.load_state_dict({"tensors": shard_tensors, "meta": shard["meta"]})
            for i in group.indices:  # the model's optimizer no longer holds what the shards do
                meta_state.pop(str(i), None)
                for name in names:
                    tensors.pop(f"state.{i}.{name}", None)
        opt.load_state_dict(plain)
        self._loaded = False


class _AllReducedGradients(GradientSync):
    """Eager stage 1: plain data parallelism's bucketed all-reduce (`inner`), then the shard update."""

    def __init__(self, mode: ZeroSync, inner: GradientSync):
        super().__init__()
        self.mode, self.inner = mode, inner

    def add(self, index, grad):
        self.pairs.append((index, grad))
        self.inner.add(index, grad)

    def finish(self):
        self.mode._update_all_reduced(self.inner.finish())
        return []


class _ScatterGradients(GradientSync):
    """Eager stages 2-3: each bucket's (unit's) gradients are reduce-scattered (stage 3: and its
    parameters freed) as soon as backward has made all of them; the plain path's at the end.
    The first step lays the buckets out (stage 2: `BucketFiller` in the order the gradients
    came; stage 3: one unit per module) and scatters them all at its end."""

    def __init__(self, mode: ZeroSync):
        super().__init__()
        self.mode = mode
        self.waiting: dict[int, dict] = {}  # unit position -> {index: gradient}
        self.done: set[int] = set()

    def add(self, index, grad):
        self.pairs.append((index, grad))
        unit = self.mode.owner.get(index) if self.mode.groups is not None else None
        if unit is None or isinstance(grad, tuple):
            return
        got = self.waiting.setdefault(unit.position, {})
        got[index] = grad
        if len(got) == len(unit.indices):
            self._scatter_unit(unit)

    def _scatter_unit(self, unit) -> None:
        got = self.waiting.pop(unit.position, {})
        with torch.no_grad():
            unit.grad_shard = self.mode.scatter(unit, [got.get(i) for i in unit.indices])
        if self.mode.stage == 3:
            unit.release()
        self.done.add(unit.position)

    def finish(self):
        mode = self.mode
        if mode.groups is None:
            if mode.stage == 2:
                mode._build(mode._bucket_layout([i for i, g in self.pairs if not isinstance(g, tuple)]))
            else:
                mode._lay_out_eager(self.pairs)
            for index, grad in self.pairs:
                unit = mode.owner.get(index)
                if unit is not None:
                    self.waiting.setdefault(unit.position, {})[index] = grad
        for unit in mode.groups:  # every rank the same units in the same order
            if unit.position not in self.done:
                self._scatter_unit(unit)
        plain = [(i, g) for i, g in self.pairs if i not in mode.owner]
        mode._update_shards(plain)
        return []


def _unit(sync: int, unit: int, op: str) -> _Unit:
    return live.lookup(sync, "ZeRO-3 sync mode", op).groups[unit]


@register
class Zero3Gather(OpDef):
    """ZeRO-3: starts gathering one unit's parameters from every rank's shard into a fresh
    padded flat buffer (the transfer may still run; `zero3_unpack` waits)."""

    name = "zero3_gather"
    attrs = {"sync": -1, "unit": -1}
    differentiable = False
    tested_by = "tests/parallel/test_zero3.py"

    def infer(self, inputs, sync, unit):
        return TensorMeta((_unit(sync, unit, self.name).padded,), inputs[0].dtype)

    def compute(self, shard, sync, unit):
        return _unit(sync, unit, self.name).start_gather()


@register
class Zero3Unpack(OpDef):
    """ZeRO-3: waits for a `zero3_gather`; the unit's parameters as views of its buffer."""

    name = "zero3_unpack"
    attrs = {"sync": -1, "unit": -1}
    differentiable = False
    tested_by = "tests/parallel/test_zero3.py"

    def infer(self, inputs, sync, unit):
        found = _unit(sync, unit, self.name)
        return [TensorMeta(shape, p.dtype) for p, shape in zip(found.params, found.shapes)]

    def compute(self, flat, sync, unit):
        values = _unit(sync, unit, self.name).finish_gather(flat)
        return tuple(values) if len(values) > 1 else values[0]


@register
class Zero3ReduceScatter(OpDef):
    """ZeRO-2/3: one bucket's (unit's) gradients (inputs in its order) reduce-scattered (mean):
    this rank's shard of their padded flat concatenation, the transfer maybe still running
    (the mode's update waits on it)."""

    name = "zero3_reduce_scatter"
    attrs = {"sync": -1, "unit": -1}
    differentiable = False
    tested_by = "tests/parallel/test_zero3.py"

    def infer(self, inputs, sync, unit):
        return TensorMeta((_unit(sync, unit, self.name).shard_size,), inputs[0].dtype)

    def compute(self, *grads, sync, unit):
        return live.lookup(sync, "ZeRO sync mode", self.name).scatter(_unit(sync, unit, self.name), list(grads))


@register
class Zero3Mark(OpDef):
    """Eager ZeRO-3: the identity on a module's output, whose gradient gathers the module's
    parameters again when the backward reaches it."""

    name = "zero3_mark"
    attrs = {"sync": -1, "unit": -1}
    tested_by = "tests/parallel/test_zero3.py"

    def infer(self, inputs, sync, unit):
        return TensorMeta(inputs[0].shape, inputs[0].dtype)

    def compute(self, x, sync, unit):
        return x.view_as(x)

    def gradient(self, op, grads):
        return [apply("zero3_backward_reached", grads[0], **op.attrs)]


@register
class Zero3BackwardReached(OpDef):
    """Eager ZeRO-3: the identity on a gradient that first gathers the unit's parameters."""

    name = "zero3_backward_reached"
    attrs = {"sync": -1, "unit": -1}
    differentiable = False
    tested_by = "tests/parallel/test_zero3.py"

    def infer(self, inputs, sync, unit):
        return TensorMeta(inputs[0].shape, inputs[0].dtype)

    def compute(self, g, sync, unit):
        live.lookup(sync, "ZeRO-3 sync mode", self.name).backward_reached(unit)
        return g.view_as(g)


SYNC_MODES["zero"] = ZeroSync  # DataParallel(..., zero=stage) builds this mode
