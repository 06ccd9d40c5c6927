"""`pipeline`: pipeline parallelism over the mesh's pp axis, micro-batches run by a GPipe or 1F1B schedule.

The model's repeated layers (the first `ModuleList`: GPT-2's `h`, LLaMA's and BERT's
`layers`) are cut into `pp` stages: balanced by parameter count (`stages=None`) or at the
module names given (the first layer of each stage). What runs before the first layer
(embeddings) joins the first stage and what runs after the last (final norm, head, the
loss) the last one; the model code does not change: each stage's graph is traced from the
model's own forward, with the stage's first layer reading a placeholder (the activation
received from the previous stage) and everything the stage does not need pruned away.

Every rank traces the whole model once; the pipeline partition pass
(`luoshu.compiler.pipeline`) cuts this rank's stage out of it: where a tensor made on one
stage is read on another, the states pass derives a send/recv pair (their gradients are
each other), and the stage graph is split into a forward plan and a backward plan that
consumes the forward's saved activations. The runtime's `ActivationLedger` holds those
per micro-batch (1F1B: at most `pp` at once). Gradients accumulate over the micro-batches
and are scaled once (1/M: each micro-batch's loss is a mean over its rows); a table's
sparse gradient stays rows (so a lazy optimizer touches the rows one whole batch would);
parameters used by several stages (GPT-2's tied embedding) sum their gradients over
those stages; the DP axis averages them once per step, after the last micro-batch, in plain
data parallelism's buckets (`bucket_size_mb`: one asynchronous all-reduce per bucket, started
as it fills, not one per parameter); then the optimizer applies one update, clipping
(`max_grad_norm`) by the norm of the whole model's gradient, summed over the stages and
TP members of this DP replica. A stage may be tensor parallel (`parallelize` the model
first): its graph is localized by the states pass, its gradients are this rank's blocks.

Communication overlaps the compute: the schedule says how many activations and gradients
will arrive on each channel in a step, so their receives are posted ahead of need (two per
channel, into the buffers the plans then read), sends are isends waited on once at the end
of the step, and each stage's backward sends its input gradient before it computes its
weight gradients. `ls.nn.recompute` layers are recomputed inside their stage's backward
(the stage keeps only their inputs per micro-batch). `ls.save` / `ls.load` work directly in
a pipeline job (`gather_stages`, through the checkpoint layout hook of `parallel.checkpoint`).

Data convention: every rank passes the same global batch to `step` (or None for what its
stage does not read); the first stage reads only the inputs and the last only the labels
(`feeds_of` / `feeds` say what a rank's plans read), each rank takes its DP share
(`mesh.batch_slice`) and cuts it into M micro-batches.

ZeRO over the DP axis (`pipeline(..., zero=1 | 2)`, `luoshu.parallel.zero`): each stage's
parameters are sharded over that stage's DP group (the ranks of the same pp and tp
coordinates), and the DP reduction of the stage's accumulated gradients is the ZeRO mode's,
once per step after the last micro-batch: stage 1 all-reduces them (plain data parallelism's
buckets) and each rank updates its 1/dp shard of the optimizer state, stage 2 reduce-scatters
them (a rank keeps only its shard of each bucket), then the updated shards are all-gathered
into the parameters. Clipping's norm is summed over the shards, the stages and the TP members
(each parameter counted once). `ls.save` consolidates each stage's shards over its DP group,
then gathers the stages: the checkpoint holds full tensors and the plain optimizer's state,
and loads into one process (and a plain one into a ZeRO pipeline). Stage 3 (`zero=3`,
`ZeroSync.shard_stage`) also shards the stage's parameters in units (`unit_size_mb`; a parameter
several stages share, the tied table, is a unit of its own laid out alike on each): the forward
and backward plans gather each unit just before its first reader (the next unit's gather
prefetched) and reduce-scatter its gradients right after the last is made, in every micro-batch:
the stage keeps only shard accumulators (1/dp of the gradient bytes; a shared unit's shards sum over
its stages after the last micro-batch), at the cost of M reduce-scatters per unit per step instead
of one and a gather per unit per forward and per backward. With tensor-parallel stages every stage
shards this rank's TP blocks (the units laid out from its local values, alike on its DP peers, who
hold the same blocks); a vocabulary-split shared table's rows are cut to this rank's block before
they are densified into its unit's gradient. Under every ZeRO stage a TP member other than 0 leaves
to member 0 the duplicated parameters its stage plans never read (the row-parallel biases,
`ZeroSync.leave_stage`): it holds no value, shard or optimizer state of them and its backward no
longer makes their gradients. `Pipeline.memory` reports the bytes from the plans'
accounting.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as torch_dist

from luoshu.compiler import states
from luoshu.compiler.pipeline import partition
from luoshu.core import live
from luoshu.core.errors import Error
from luoshu.core.graph import Graph
from luoshu.core.graph import placeholder as make_placeholder
from luoshu.distributed import env
from luoshu.distributed.mesh import DeviceMesh
from luoshu.nn.container import ModuleList
from luoshu.nn.module import Module
from luoshu.ops.comm import shapes_once
from luoshu.optim.optimizer import Optimizer
from luoshu.parallel.data_parallel import DataParallel
from luoshu.runtime.memory import optimizer_state_bytes
from luoshu.runtime.pipeline import SCHEDULES, ActivationLedger, StageRunner, schedule


class PipelineError(Error):
    """A pipeline that cannot be built or run as asked (names the stage, module or sizes)."""


def _layers(model: Module) -> tuple[str, ModuleList]:
    for name, m in model.named_modules():
        if isinstance(m, ModuleList) and len(m) > 0:
            return name, m
    raise PipelineError(f"pipeline: {type(model).__name__} has no ModuleList of layers to cut into stages")


def _balance(sizes: list[int], parts: int) -> list[int]:
    """The first layer of each of `parts` contiguous groups with about equal sums (greedy on prefix sums)."""
    total, starts, acc = sum(sizes), [0], 0
    for i, s in enumerate(sizes[:-1]):
        acc += s
        if len(starts) < parts and acc >= total * len(starts) / parts and len(sizes) - (i + 1) >= parts - len(starts):
            starts.append(i + 1)
    while len(starts) < parts:  # too few layers passed a boundary: take the last ones one by one
        starts.append(len(sizes) - (parts - len(starts)))
    return starts


def stage_starts(model: Module, pp: int, stages=None) -> list[int]:
    """The first layer (index into the model's repeated layers) of each of `pp` stages: balanced by
    parameter count (`stages=None`) or at the module names `stages` gives (each stage's first layer)."""
    prefix, layers = _layers(model)
    if len(layers) < pp:
        raise PipelineError(f"pipeline: {len(layers)} layers in {prefix!r} cannot fill {pp} stages")
    names = [f"{prefix}.{i}" for i in range(len(layers))]
    if stages is None:
        return _balance([sum(p.numel() for p in layer.parameters()) for layer in layers], pp)
    stages = list(stages)
    if len(stages) != pp:
        raise PipelineError(f"pipeline: stages names {len(stages)} modules, one per stage of pp={pp} expected")
    for s in stages:
        if s not in names:
            raise PipelineError(
                f"pipeline: stages names unknown module {s!r}; the layers are {names[0]} .. {names[-1]}"
            )
    starts = [names.index(s) for s in stages]
    if starts[0] != 0 or starts != sorted(set(starts)):
        raise PipelineError(f"pipeline: stages {stages} must start at {names[0]} and increase")
    return starts


@contextlib.contextmanager
def marking(g: Graph, firsts: list):
    """While the model records into `g`: {stage: the position in g.ops where `firsts[stage]` (the
    stage's first layer) begins}, filled as the layers are called (the partition pass's starts)."""
    marks: dict[int, int] = {}
    originals = [layer.forward for layer in firsts]

    def marked(s, forward):
        def first_forward(*args, **kwargs):
            marks.setdefault(s, len(g.ops))
            return forward(*args, **kwargs)

        return first_forward

    for s, layer in enumerate(firsts):
        object.__setattr__(layer, "forward", marked(s, originals[s]))
    try:
        yield marks
    finally:
        for layer in firsts:
            object.__delattr__(layer, "forward")


class Pipeline:
    """One rank's stage of a pipeline-parallel model; `compile` builds its plans, `step` trains one batch."""

    def __init__(self, model: Module, mesh: DeviceMesh, stages=None, micro_batches: int = 1, schedule: str = "1f1b",
                 zero: int = 0, **zero_options):
        if not isinstance(mesh, DeviceMesh):
            raise PipelineError(f"pipeline: mesh must be a DeviceMesh, found {type(mesh).__name__}")
        if schedule not in SCHEDULES:
            raise PipelineError(f"pipeline: unknown schedule {schedule!r}; the schedules are {SCHEDULES}")
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise PipelineError(f"pipeline: micro_batches must be a positive int, found {micro_batches!r}")
        if isinstance(zero, bool) or zero not in (0, 1, 2, 3):
            raise PipelineError(f"pipeline: zero must be 0 (off), 1, 2 or 3, found {zero!r}")
        if set(zero_options) - {"bucket_size_mb"} and not zero:
            raise PipelineError(f"pipeline: {sorted(set(zero_options) - {'bucket_size_mb'})} are ZeRO options; "
                                "they need zero=1, 2 or 3")
        _, layers = _layers(model)
        pp = mesh.pp
        starts = stage_starts(model, pp, stages)
        self.model, self.mesh, self.micro_batches, self.schedule_name = model, mesh, micro_batches, schedule
        self.stage, self.stages = mesh.index("pp"), pp
        ends = starts[1:] + [len(layers)]
        self.layers = layers
        self.first, self.last = starts[self.stage], ends[self.stage] - 1
        self.boundaries = list(zip(starts, ends))
        self.ledger = ActivationLedger()
        self.zero_stage, self.zero_options = zero, zero_options
        self.zero = None  # the ZeRO sync mode over this stage's DP group (compile)
        self._dp_sync = None  # zero=0: plain data parallelism's bucketed all-reduce over that group (compile)
        self._compiled = False

    # --- building --------------------------------------------------------------------
    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    def feeds_of(self) -> tuple[bool, bool]:
        """(needs the inputs, needs the labels) for this rank's stage (after `compile`: what its
        plans read; before: the convention, inputs on the first stage and labels on the last)."""
        if not self._compiled:
            return self.is_first, self.is_last
        return (
            any(ph.name in self.feeds for ph in self.input_phs),
            any(ph.name in self.feeds for ph in self.label_phs),
        )

    def compile(self, inputs: list[tuple], labels: list[tuple], loss_fn, optimizer: Optimizer) -> None:
        """Traces the model and builds this stage's plans. `inputs` / `labels`: (name, shape, dtype)
        of the model's inputs and the loss's extra arguments (batch dim None); `loss_fn(model_output,
        *labels)`."""
        if not isinstance(optimizer, Optimizer):
            raise PipelineError(
                f"pipeline.compile: optimizer must be a luoshu.optim.Optimizer, found {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        g = Graph(name="pipeline")
        firsts = [self.layers[a] for a, _ in self.boundaries]
        with marking(g, firsts) as marks, g:
            self.input_phs = [make_placeholder(n, sh, d) for n, sh, d in inputs]
            self.label_phs = [make_placeholder(n, sh, d) for n, sh, d in labels]
            loss = loss_fn(self.model(*self.input_phs), *self.label_phs)
        if len(marks) != self.stages:
            raise PipelineError(
                f"pipeline: the model's forward called the first layers of stages {sorted(marks)} "
                f"only, of {self.stages}"
            )
        self.graph = g
        mesh = self.mesh
        dp = mesh.index("dp")
        groups = [tuple(mesh.rank_of(pp=s, dp=dp, tp=t) for t in range(mesh.tp)) for s in range(self.stages)]
        params = optimizer.parameters()
        strategy = states.default()
        if strategy is None or not any(
            len(p.ds) > strategy.strategy and not p.ds[strategy.strategy].is_pure_duplicate() for p in params
        ):
            strategy = None
        self.program = partition(
            g, loss, [0] + [marks[s] for s in range(1, self.stages)], self.stage, groups, mesh.rank, params, strategy
        )
        self.params = self.program.params
        ids = {id(p): i for i, p in enumerate(params)}
        self.param_index = [ids[id(p)] for p in self.params]
        self._sparse = self.program.sparse
        self._shared = self._shared_parameters({id(p) for p in self.params})
        self._install_norm(strategy)
        if self.zero_stage or self.mesh.dp > 1:
            # the DP reduction over this stage's DP group: plain data parallelism's buckets (zero=0), or the
            # ZeRO mode's (this stage's parameters sharded over the group; stages 1-2: laid out at the first
            # step; stage 3: now, the stage plans then gather the units and reduce-scatter their gradients)
            sync = DataParallel(optimizer=optimizer, group=self.mesh.group("dp"), broadcast=False,
                                zero=self.zero_stage, **self.zero_options).sync
            self.zero, self._dp_sync = (sync, None) if self.zero_stage else (None, sync)
        left = set()
        if self.zero_stage and strategy is not None:
            # ZeRO x TP: a TP member other than 0 leaves to member 0 the duplicated parameters its plans never
            # read (row-parallel biases): no value, state, shard, gradient or update of them here
            left = self.zero.leave_stage(self.program, self.param_index, groups[self.stage], mesh.index("tp"),
                                         strategy.strategy)
        # what the backward plan fetches, in order: (accumulator, sparse) per parameter (but those left to TP
        # member 0), or at stage 3 the sparse gradients, then one gradient shard per unit (accumulators after
        # the parameters')
        self._fetched = [(k, sparse) for k, sparse in enumerate(self._sparse) if self.param_index[k] not in left]
        if self.zero_stage == 3:
            units = self.zero.shard_stage(self.program, self.param_index,
                                          {self.param_index[pos] for pos, _ in self._shared})
            shared = {pos for pos, _ in self._shared}
            self._fetched = [(k, True) for k, sparse in enumerate(self._sparse) if sparse and k not in shared]
            self._fetched += [(len(self.params) + u, False) for u in range(len(units))]
        self.runner = StageRunner(self.program)
        self.feeds = self.program.feed_names
        self._compiled = True
        self._key = live.register(self)  # ls.save / ls.load find the pipeline of a model (parallel.checkpoint)

    def _install_norm(self, strategy) -> None:
        """Global-norm clipping over the whole model: each stage (and TP member) adds its part of
        the squared norm; a TP-duplicated gradient counts 1/tp on each member, one that several
        stages hold 1/(their number) on each; the sum runs over this DP replica's ranks."""
        opt = self.optimizer
        if opt.max_grad_norm is None or not env.is_distributed() or self.mesh.pp * self.mesh.tp == 1:
            return
        users = {pos: len(u) for pos, u in self._shared}
        weights = {}
        for pos, (i, p) in enumerate(zip(self.param_index, self.params)):
            split = strategy is not None and bool(p.ds) and not p.ds[0].is_pure_duplicate()
            weights[i] = (1.0 if split else 1.0 / self.mesh.tp) / users.get(pos, 1)
        dp = self.mesh.index("dp")
        replica = tuple(self.mesh.rank_of(pp=s, dp=dp, tp=t) for s in range(self.mesh.pp) for t in range(self.mesh.tp))
        env.process_group(replica)  # created by every member in the same order
        opt.shard_norm = states.ShardNorm(weights, replica)

    def _shared_parameters(self, used: set) -> list[tuple[int, tuple]]:
        """(position in self.params, pp ranks using it) of parameters several stages use: each
        stage tells the others which parameters it uses (a collective over the pp group)."""
        if self.stages == 1 or not env.is_distributed():
            return []
        mine = np.zeros(len(self.optimizer.parameters()), np.int64)
        mine[self.param_index] = 1
        everyone = [torch.zeros(len(mine), dtype=torch.int64) for _ in range(self.stages)]
        torch_dist.all_gather(everyone, torch.from_numpy(mine), group=self.mesh.process_group("pp"))
        pp_ranks = self.mesh.group("pp").ranks
        shared = []
        for pos, i in enumerate(self.param_index):
            users = tuple(pp_ranks[s] for s in range(self.stages) if int(everyone[s][i]))
            if len(users) > 1:
                env.process_group(users)  # created in the same order on every user
                shared.append((pos, users))
        return shared

    # --- whole-model views ---------------------------------------------------------------
    def gather_stages(self, with_state: bool = False) -> dict | None:
        """Every parameter (and, `with_state`, its optimizer state) from the stage that trains it,
        so every rank of the pipeline holds the whole model: before an evaluation on every rank
        or a checkpoint (a collective over the pp group; under TP, each member of a stage sends
        its blocks to its counterparts). Returns, `with_state`, the whole model's optimizer state
        dict, which the model's optimizer then holds; under ZeRO the state of each stage's shards
        consolidated over its DP group (the plain optimizer's layout), which stays with the shards:
        the model's optimizer does not take it."""
        if not self._compiled:
            return None
        # ZeRO-3: this stage's parameters whole while they are sent (each rank keeps its shard after)
        with self.zero.gathered_parameters() if self.zero is not None else contextlib.nullcontext():
            return self._gather_stages(with_state)

    def _gather_stages(self, with_state: bool) -> dict | None:
        optimizer = self.optimizer
        # this stage's state whole (ZeRO: gathered over the stage's DP group, a collective there)
        plain = (self.zero.consolidated_state_dict() if self.zero is not None else optimizer.state_dict()) \
            if with_state else None
        if self.stages == 1 or not env.is_distributed():
            return plain
        pg, pp_ranks = self.mesh.process_group("pp"), self.mesh.group("pp").ranks
        params = optimizer.parameters()
        mine = {
            "owned": list(self.param_index),
            "state": plain["meta"]["state"] if plain else None,
            "shapes": {k: (list(v.shape), str(v.dtype)) for k, v in plain["tensors"].items()} if plain else None,
        }
        everyone: list = [None] * len(pp_ranks)
        torch_dist.all_gather_object(everyone, mine, group=pg)
        owner: dict[int, int] = {}
        for stage, info in enumerate(everyone):
            for i in info["owned"]:
                owner.setdefault(i, stage)
        tensors, state = ({}, {}) if with_state else (None, None)
        for i, p in enumerate(params):
            stage = owner.get(i)
            if stage is None:  # no stage trains it: every rank holds its initial (broadcast) value
                continue
            torch_dist.broadcast(p._value, src=pp_ranks[stage], group=pg)
            entry = everyone[stage]["state"].get(str(i)) if with_state else None
            if entry is None:
                continue
            state[str(i)] = entry
            for name in entry["tensors"]:
                key = f"state.{i}.{name}"
                if stage == self.stage:
                    value = plain["tensors"][key].contiguous().clone()
                else:
                    shape, dtype = everyone[stage]["shapes"][key]
                    value = torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")))
                torch_dist.broadcast(value, src=pp_ranks[stage], group=pg)
                tensors[key] = value
        if not with_state:
            return None
        whole = {"tensors": tensors, "meta": {**plain["meta"], "state": state}}
        if self.zero is None:
            optimizer.load_state_dict(whole)
        return whole

    # --- running ---------------------------------------------------------------------
    def step(self, inputs: list | None, labels: list | None) -> float | None:
        """Trains on one global batch; returns the mean loss on the last stage (None elsewhere).
        Every rank passes the same arrays (a rank may pass None for what `feeds_of` says its stage
        does not read). One optimizer update after all micro-batches."""
        if not self._compiled:
            raise PipelineError("pipeline.step: call compile(...) first")
        named = {}
        for phs, arrays, what in ((self.input_phs, inputs, "inputs"), (self.label_phs, labels, "labels")):
            needed = [ph for ph in phs if ph.name in self.feeds]
            if not needed:
                continue
            if arrays is None or len(arrays) != len(phs):
                raise PipelineError(
                    f"pipeline.step: stage {self.stage} reads {[ph.name for ph in needed]}; pass all "
                    f"{len(phs)} {what}, found {None if arrays is None else len(arrays)}"
                )
            named.update((ph.name, (ph, a)) for ph, a in zip(phs, arrays) if ph.name in self.feeds)
        m = self.micro_batches
        size = None
        feeds = {}
        for name, (ph, a) in named.items():
            rows = len(a)
            share = self.mesh.batch_slice(rows)
            local = share.stop - share.start
            if local % m:
                raise PipelineError(
                    f"pipeline: the batch share of {local} rows (global {rows}, dp={self.mesh.dp}) does "
                    f"not divide into {m} micro-batches"
                )
            size = local // m
            feeds[name] = next(iter(self.graph._check_feeds({ph: np.asarray(a)[share]}).values()))
        runner = self.runner
        runner.reset()
        self.ledger = runner.ledger
        losses = []
        accum = [None] * (len(self.params) + (len(self.zero.groups) if self.zero_stage == 3 else 0))
        self.run_schedule(feeds, size, losses, accum)
        self.busy_s = runner.busy_s
        self._apply(accum)
        return float(np.mean(losses)) if losses else None

    def run_schedule(self, feeds: dict, size: int | None, losses: list, accum: list) -> None:
        """This stage's schedule over ``micro_batches`` slices of ``size`` rows of ``feeds``: losses
        appended to ``losses``, gradients accumulated into ``accum`` (one entry per parameter)."""
        steps = schedule(self.schedule_name, self.stage, self.stages, self.micro_batches)
        # the micro-batches share one shape: each boundary sends it once a step; the schedule says
        # which messages will come, so their receives are posted ahead of need
        with shapes_once(), self.runner.receiving(steps):
            self._run_schedule(steps, feeds, size, losses, accum)

    def _run_schedule(self, steps: list, feeds: dict, size: int | None, losses: list, accum: list) -> None:
        """Every micro-batch step of this stage's schedule; the sends complete before it returns."""
        runner = self.runner
        for kind, mb in steps:
            micro = {n: v[mb * size : (mb + 1) * size] for n, v in feeds.items()}
            if kind == "F":
                loss = runner.forward(mb, micro)
                if loss is not None:
                    losses.append(float(loss))
                continue
            values = runner.backward(mb, micro)
            if self.zero_stage == 3:
                self.zero.wait_scatters()  # the units' gradient shards are written
            pos = 0
            for k, sparse in self._fetched:
                if sparse:
                    rows = (values[pos], values[pos + 1])
                    accum[k] = [rows] if accum[k] is None else accum[k] + [rows]
                    pos += 2
                    continue
                v = values[pos]
                accum[k] = v if accum[k] is None else accum[k].add_(v)  # the runner's own buffers: no copy
                pos += 1
        runner.wait_sends()

    def _apply(self, accum: list) -> None:
        m, dp = self.micro_batches, self.mesh.dp
        if self.zero_stage == 3:  # each unit's shards, summed over the micro-batches already
            shards = [acc.div_(m) for acc in accum[len(self.params):]]
            accum = accum[:len(self.params)]
        grads = []
        for k, acc in enumerate(accum):
            if acc is None:  # stage 3: a dense parameter's gradient is its unit's shard; or left to TP member 0
                grads.append(None)
                continue
            if not self._sparse[k]:
                grads.append(acc.div_(m))  # the mean over micro-batches: scaled once
                continue
            rows = torch.cat([i for i, _ in acc])
            values = torch.cat([v for _, v in acc]).div_(m)
            if dp > 1 and env.is_distributed():
                rows, values = self._gather_rows(rows, values)
                values.div_(dp)
            p = self.params[k]
            if p.ds and not p.ds[0].is_pure_duplicate():  # a row-split table keeps its own rows
                local = p._value.shape[0]
                start = states.default().index * local
                keep = (rows >= start) & (rows < start + local)
                rows, values = rows[keep] - start, values[keep]
            grads.append((rows, values))
        if self.zero_stage == 3:
            # a unit several stages share is laid out alike on each: its shards sum over them
            for pos, users in self._shared:
                unit = self.zero.owner[self.param_index[pos]]
                torch_dist.all_reduce(shards[unit.position], group=env.process_group(users))
            self.zero.step_shards(shards, [(i, g) for i, g in zip(self.param_index, grads) if g is not None])
            return
        for pos, users in self._shared:
            if self._sparse[pos]:
                rows, values = grads[pos]
                grads[pos] = torch.zeros_like(self.params[pos]._value).index_add_(0, rows, values)
            torch_dist.all_reduce(grads[pos], group=env.process_group(users))
        if self.zero is not None:
            # The DP reduction of the dense gradients is the shards' (stage 2: a reduce-scatter), a
            # shared table's summed rows among them (as below); the other rows are gathered already.
            pairs = list(zip(self.param_index, grads))
            self.zero.step_accumulated([(i, g) for i, g in pairs if isinstance(g, torch.Tensor)],
                                       [(i, g) for i, g in pairs if isinstance(g, tuple)])
            return
        if self._dp_sync is not None:
            # The mean over DP of the dense gradients (a shared table's summed rows among them; the other
            # rows are gathered already): one asynchronous all-reduce per bucket, each started as it fills.
            sync = self._dp_sync.begin_gradients(self.optimizer)
            for k, g in enumerate(grads):
                if isinstance(g, torch.Tensor):
                    sync.add(k, g)
            reduced = dict(sync.finish())
            grads = [reduced.get(k, g) for k, g in enumerate(grads)]
        self.optimizer.apply_gradients(list(zip(self.param_index, grads)))

    def memory(self, inputs: list | None, labels: list | None) -> dict:
        """Trains one batch as `step` does, with this stage's plans run step by step and their memory
        accounted (`Plan.memory`), and returns this rank's bytes: `parameters` (what its plans read
        between uses: the stage's parameters, or under ZeRO-3 their shards), `optimizer_state` (after
        the step), `gradients` (what the stage keeps and accumulates over the micro-batches: one
        micro-batch's fetched gradients; ZeRO-3: the units' shards), `peak_gradients` (the most
        alive at once inside a backward run, the unit gradients not yet reduce-scattered too),
        `peak_gathered_parameters` (ZeRO-3's whole units), `peak_activations` (inside one run) and
        `saved_activations` (the most the stage keeps between forwards and backwards); `loss`: what
        `step` returns."""
        runner = self.runner
        runner.reports = []
        try:
            loss = self.step(inputs, labels)
            reports = runner.reports
        finally:
            runner.reports = None
        forward = [r for kind, r in reports if kind == "F"]
        backward = [r for kind, r in reports if kind == "B"]
        return {
            "loss": loss,
            "parameters": max(r.parameters for r in forward),
            "optimizer_state": optimizer_state_bytes(self.optimizers()),
            "gradients": max(r.update_gradients for r in backward),
            "peak_gradients": max(r.peak_gradients for r in backward),
            "peak_gathered_parameters": max(r.peak_gathered_parameters for r in forward + backward),
            "peak_activations": max(r.peak_activations for r in forward + backward),
            "saved_activations": self.ledger.peak_bytes,
        }

    def optimizers(self) -> list[Optimizer]:
        """The optimizers this rank steps: under ZeRO the shard optimizers of its stage (and the
        model's, which holds only the state of parameters with sparse gradients), else the model's."""
        return self.zero.optimizers() if self.zero is not None else [self.optimizer]

    def _gather_rows(self, rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every DP peer's sparse rows (unequal counts), in DP order."""
        pg, dp = self.mesh.process_group("dp"), self.mesh.dp
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dp)]
        torch_dist.all_gather(counts, torch.tensor([rows.numel()]), group=pg)
        longest = int(max(c.item() for c in counts))
        pad = longest - rows.numel()
        rows_p = torch.cat([rows, rows.new_zeros(pad)])
        values_p = torch.cat([values, values.new_zeros((pad,) + tuple(values.shape[1:]))])
        all_rows = [torch.empty_like(rows_p) for _ in range(dp)]
        all_values = [torch.empty_like(values_p) for _ in range(dp)]
        torch_dist.all_gather(all_rows, rows_p, group=pg)
        torch_dist.all_gather(all_values, values_p, group=pg)
        n = [int(c.item()) for c in counts]
        return (torch.cat([r[:c] for r, c in zip(all_rows, n)]), torch.cat([v[:c] for v, c in zip(all_values, n)]))


def pipeline_of(module, optimizer=None) -> Pipeline | None:
    """The live compiled pipeline training `module` (or stepping `optimizer`), the latest one if several."""
    found = [
        p
        for p in live.alive()
        if isinstance(p, Pipeline)
        and p._compiled
        and (p.model is module or (optimizer is not None and p.optimizer is optimizer))
    ]
    return max(found, key=lambda p: p._key) if found else None


def pipeline(model: Module, mesh: DeviceMesh, stages=None, micro_batches: int = 1, schedule: str = "1f1b",
             zero: int = 0, **zero_options) -> Pipeline:
    """This rank's stage of `model` cut over `mesh.pp` stages (see the module docstring); `zero=1 | 2 | 3`
    shards each stage over its DP group (`zero_options`: `DataParallel`'s ZeRO options; `bucket_size_mb`,
    the DP all-reduce buckets' bound, with any `zero`)."""
    return Pipeline(model, mesh, stages, micro_batches, schedule, zero, **zero_options)


__all__ = ["Pipeline", "PipelineError", "marking", "pipeline", "pipeline_of", "stage_starts"]
