"""`HotSPa`: one language-model graph trained under several parallel strategies inside each step.

HotSPa (Hetu, SOSP 2024) splits a step's batch by sequence length into buckets and runs each
bucket under its own strategy: long sequences under memory-frugal tensor parallelism, the many
short ones under plain data parallelism. Training stays exactly that of one strategy:

- one logical graph (placeholders with a run-time length; packed rows with reset positions and
  segment ids); every parameter carries one `DStates` per strategy in `Tensor.ds`, the
  distributed-states pass localises the graph for each strategy, and the plan cache keeps one
  compiled plan per (strategy, fetches, feeds) (`Graph.strategy_key`);
- one strategy, the *owner* (by default the one whose model states take least memory per rank),
  holds the parameters and the optimizer state; before a bucket runs under another strategy the
  hot-switch planner's plan moves the parameter slices there (`hot_switch.run_switches`: one
  batch of isend/irecv, one message per peer);
- each bucket's gradients are summed over its strategy's data-parallel group and switched back
  into the owner's layout, where they accumulate; one optimizer step runs there;
- the buckets are visited in the order that makes the parameter switches cheapest
  (`hot_switch.best_order`, starting and ending at the owner);
- a strategy string's "sp" keeps its activations between TP regions split along the sequence,
  its "rc=full" / "rc=selective" recomputes the transformer blocks' (or their attention's)
  activations in the backward (`luoshu.nn.recompute`: the strategies of one setting share a
  graph that the recompute pass rewrites; a pipeline strategy's stages are traced so marked);
- a strategy with pp > 1 runs its bucket as a pipeline (`parallel.pipeline`: the partition
  pass's stage plans, micro-batches over each replica's packed rows, a 1F1B schedule): there a
  parameter lives only on the ranks of the stages that read it, so the planner sends its slices
  from one stage's ranks to every rank of the next strategy, and back; a parameter that several
  stages read (GPT-2's tied embedding) sums its stages' gradients before it goes back. A pipeline
  strategy may be the owner (by default it is whenever its stages hold least): a rank then holds,
  updates and clips over only its stage's shards (the tied table on both its stages, which apply
  the same update); where it holds none of a parameter its value is an empty tensor, and the
  clipping norm, `gather` and `full_optimizer_state` are collectives every rank joins;
- a per-block strategy ("tp[4,2,1,2]", `luoshu.parallel.mixed_tp`) runs each run of blocks with
  one (tp, sp) under its own TP group over all ranks, the activations re-batched between them;
  its parameters each live in the layout of the first segment that reads it, so switches to and
  from it, and its being the owner, go through the same per-parameter layouts. In pipeline stages
  ("pp2,tp[2,1,1,2]") each stage's world / pp ranks run its segments (the split: `stages`, default
  balanced by parameter count), pp micro-batches on the GPipe schedule, the hidden state re-batched
  between the stages' groups by the same planner; a stage's ranks hold only its parameters.

Each rank's loss is the sum of its tokens' cross entropies divided by the step's total target
tokens, so the buckets' gradients add up to the gradient of the whole batch's mean loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as torch_dist

from luoshu.compiler import states
from luoshu.core import context
from luoshu.core.autodiff import gradients
from luoshu.core.dstates import DUPLICATE, DStates
from luoshu.core.errors import Error
from luoshu.core.graph import Graph
from luoshu.core.op import topological_ops
from luoshu.core.tensor import IndexedSlices
from luoshu.data.packing import IGNORE_INDEX, _check_bounds, bucket_batch
from luoshu.distributed import env
from luoshu.distributed.mesh import DeviceMesh
from luoshu.nn import functional as F
from luoshu.nn.module import Module
from luoshu.optim import SGD
from luoshu.parallel import hot_switch as hs
from luoshu.parallel import hotspa_profile, layerwise, mixed_tp, pipeline
from luoshu.parallel.hotspa import ClusterSpec, HotSPaError, model_spec, parse_strategy, predict
from luoshu.parallel.hotspa import Strategy as CostStrategy
from luoshu.parallel.pipeline import Pipeline, _layers, stage_starts
from luoshu.parallel.tensor_parallel import _broadcast, parallelize


@dataclass
class StepReport:
    """What one `HotSPa.step` did: the batch's mean loss, and per visited strategy (in visiting
    order) its tokens, the bytes its switches moved (all ranks, parameters there and gradients
    back) and this rank's seconds in those switches; per pipeline strategy the micro-batches
    this rank's replica ran."""

    loss: float
    order: list[int]
    tokens: dict[int, int] = field(default_factory=dict)
    micro_batches: dict[int, int] = field(default_factory=dict)
    switch_bytes: int = 0
    switch_seconds: float = 0.0
    step_seconds: float = 0.0
    # mixed (per-block tp) strategies: the activations' re-batches between segments, forward and
    # backward (bytes and messages over all ranks)
    rebatch_bytes: int = 0
    rebatch_messages: int = 0


def _strategy_mesh(spec, i: int, world: int, rank: int) -> DeviceMesh:
    if isinstance(spec, str):
        st = parse_strategy(spec)  # an unknown string: HotSPaError
        if st.mixed:  # per-block tp: the first block's mesh names it (mixed_tp runs the segments)
            if world % st.pp:
                raise HotSPaError(
                    f"HotSPa: strategy {i} {spec!r}: pp {st.pp} does not divide the world of {world} ranks"
                )
            group = world // st.pp
            bad = [(b, t) for b, t in enumerate(st.layer_tp) if group % t]
            if bad and st.pp == 1:
                raise HotSPaError(
                    f"HotSPa: strategy {i} {spec!r}: tp {bad[0][1]} does not divide the world of {world} ranks"
                )
            if bad:
                raise HotSPaError(
                    f"HotSPa: strategy {i} {spec!r}: tp {bad[0][1]} of block {bad[0][0]} does not divide the {group} "
                    f"ranks of a pipeline stage (world {world} / pp {st.pp})"
                )
            return DeviceMesh(dp=group // st.layer_tp[0], tp=st.layer_tp[0], pp=st.pp, world_size=world, rank=rank)
        if st.dp * st.tp * st.pp != world:
            raise HotSPaError(
                f"HotSPa: strategy {i} {spec!r} covers {st.dp * st.tp * st.pp} devices, but the world has {world} ranks"
            )
        return DeviceMesh(dp=st.dp, tp=st.tp, pp=st.pp, world_size=world, rank=rank)
    if not isinstance(spec, DeviceMesh):
        raise HotSPaError(
            f"HotSPa: strategy {i} must be a DeviceMesh or a string like 'dp2,tp2,pp1', found {type(spec).__name__}"
        )
    if spec.world_size != world:
        raise HotSPaError(
            f"HotSPa: strategy {i} {spec} covers {spec.world_size} devices, but the world has {world} ranks"
        )
    return spec


def _pipeline_loss(logits, labels, scale):
    """A pipeline strategy's loss: each target token's cross entropy times the step's 1/(target
    tokens), fed per token (`scale`) since a pipeline cuts every feed into micro-batches."""
    vocab = logits.shape[-1]
    tokens = F.cross_entropy(
        logits.reshape((-1, vocab)), labels.reshape((-1,)), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return (tokens * scale.reshape((-1,))).sum()


def _name(mesh: DeviceMesh) -> str:
    return f"dp{mesh.dp},tp{mesh.tp},pp{mesh.pp}"


@contextlib.contextmanager
def _recompute_marks(model: Module, setting):
    """While a strategy's graph records: the model's transformer blocks (its first ModuleList, as
    the pipeline cuts it) marked for activation recompute as the strategy says, every block alike
    or (a sequence) per block (`layerwise.apply_plan`: "full" each block, "selective" its
    attention; "none" everywhere: the model's own marks), then the marks as they were."""
    _, blocks = _layers(model)
    settings = [setting] * len(blocks) if isinstance(setting, str) else list(setting)
    if all(s == "none" for s in settings):
        yield
        return
    saved = [(m, "_recompute" in m.__dict__, m.__dict__.get("_recompute")) for block in blocks for m in block.modules()]
    try:
        layerwise.apply_plan(model, settings)
        yield
    finally:
        for m, had, value in saved:
            if had:
                m.__dict__["_recompute"] = value
            else:
                m.__dict__.pop("_recompute", None)


@dataclass
class _Program:
    """The model's loss and gradients recorded once per recompute setting (the strategies with the
    same setting share the graph; the plan cache keeps one plan per strategy)."""

    graph: Graph
    feeds: tuple
    grads: list
    fetches: list


def _world_layout(ds: DStates, mesh: DeviceMesh, stages: Sequence[int] = (0,)) -> hs.Layout:
    """A parameter's layout over the ranks of the pipeline `stages` that hold it (every rank
    where pp = 1): its TP states inside each TP group, duplicated over DP and those stages (the
    mesh orders ranks pp-major, then dp, tp-minor)."""
    split = [k for k in ds.states if k >= 0]
    ranks = [mesh.rank_of(pp=s, dp=d, tp=t) for s in stages for d in range(mesh.dp) for t in range(mesh.tp)]
    world_states, order = {}, []
    dup = len(stages) * mesh.dp * (1 if split else mesh.tp)
    if dup > 1:
        world_states[DUPLICATE] = dup
        order.append(DUPLICATE)
    if split:
        world_states[split[0]] = mesh.tp
        order.append(split[0])
    return hs.Layout(DStates(len(ranks), world_states, tuple(order)), ranks)


class HotSPa:
    """Trains `model` (a causal language model called as `model(ids, positions=, segment_ids=)`
    returning (B, L, vocab) logits) with bucket i of each step's batch under `strategies[i]`.

    `strategies`: one `DeviceMesh` or string ("dp2,tp2,pp1") per bucket, each covering the
    world, or "auto": the cost model fed by this machine's profile (`hotspa_profile`) picks them
    for a batch with `auto_lengths` (default: one sequence at each bucket's bound), pipeline
    strategies included (each at `layerwise.pipeline_stages`' split unless `stages` names one).
    `bucket_bounds`: strictly descending, ending with 0 (bucket i takes lengths in
    (bounds[i+1], bounds[i]]). `owner`: the strategy index that holds the parameters and
    optimizer state (default: least model-state memory on a rank, from the layouts: a pipeline
    strategy's stages hold only their parameters; ties: the first). `memory_budget`: bytes per
    device; every bucket's strategy must hold its bound in it per the cost model
    (`hotspa.predict`). `node_size`: ranks per node for the planner (default: the launcher's
    local world size). `stages`: {strategy index: the module name of each stage's first layer}
    for pipeline strategies, uniform or per-block ("pp2,tp[..]") (default: balanced by parameter
    count; `layerwise.pipeline_stages` balances uniform ones by the cost model). Create the
    optimizer after `HotSPa` (the parameters then hold the owner's shards) and call
    `step(sequences, optimizer)` once per batch.
    """

    def __init__(
        self,
        model: Module,
        strategies: Sequence,
        bucket_bounds: Sequence[int],
        *,
        owner: int | None = None,
        memory_budget: float | None = None,
        node_size: int | None = None,
        broadcast: bool = True,
        plan: dict | None = None,
        auto_lengths: Sequence[int] | None = None,
        stages: dict | None = None,
    ):
        if not isinstance(model, Module):
            raise HotSPaError(f"HotSPa: expected a luoshu.nn.Module, found {type(model).__name__}")
        bounds = _check_bounds(bucket_bounds)
        env.init()
        if isinstance(strategies, str) and strategies == "auto":  # the profiled cost model picks them
            prof = hotspa_profile.profile(model)
            lengths = list(auto_lengths) if auto_lengths is not None else bounds[:-1]
            memory = float("inf") if memory_budget is None else float(memory_budget)
            # the choice must hold in the profiled bytes (choose_strategies) and in the cost model's
            # own, which the budget check below applies: the smaller of the two budgets
            memory *= min(1.0, prof.activation_scale)
            strategies = hotspa_profile.choose_strategies(prof, env.world_size(), bounds, lengths, memory)
            # a chosen pipeline's split: the one the cost model balances (as `luoshu train` gives it)
            stages = dict(stages or {})
            for i, text in enumerate(strategies):
                st = parse_strategy(text)
                if st.pp > 1 and i not in stages:
                    stages[i] = layerwise.pipeline_stages(model, st, bounds[i])
        elif isinstance(strategies, str):
            raise HotSPaError(f"HotSPa: strategies must be a list (one per bucket) or 'auto', found {strategies!r}")
        strategies = list(strategies)
        if len(strategies) != len(bounds) - 1:
            raise HotSPaError(
                f"HotSPa: bucket bounds {bounds} make {len(bounds) - 1} buckets, which need as many "
                f"strategies; found {len(strategies)}"
            )
        if owner is not None and not (isinstance(owner, int) and 0 <= owner < len(strategies)):
            raise HotSPaError(f"HotSPa: owner must index one of the {len(strategies)} strategies, found {owner!r}")
        world, rank = env.world_size(), env.rank()
        heads = getattr(model_spec(model), "heads", None)
        for i, s in enumerate(strategies):  # a per-block tp must split the attention heads
            st = parse_strategy(s) if isinstance(s, str) else None
            bad = [(b, t) for b, t in enumerate(st.layer_tp if st is not None else ()) if heads and heads % t]
            if bad:
                raise HotSPaError(f"HotSPa: strategy {i} {s!r}: tp {bad[0][1]} of block {bad[0][0]} does not divide "
                                  f"the model's {heads} attention heads")
        meshes = [_strategy_mesh(s, i, world, rank) for i, s in enumerate(strategies)]
        # --- layer-wise search: a given split per pipeline strategy (`layerwise.pipeline_stages`)
        self._stage_names = dict(stages or {})
        wrong = [i for i in self._stage_names if not (isinstance(i, int) and 0 <= i < len(meshes) and meshes[i].pp > 1)]
        if wrong:
            raise HotSPaError(f"HotSPa: stages names strategies {wrong}, which are not pipeline strategies (pp > 1)")
        # ---
        # "…,sp": the strategy's graph keeps activations between TP regions split along the sequence;
        # "…,rc=full|selective": its graph recomputes the blocks' (or their attention's) activations
        parsed = [parse_strategy(s) if isinstance(s, str) else None for s in strategies]
        self.sequence_parallel = [st is not None and st.sp for st in parsed]
        self.recompute = [st.recompute if st is not None else "none" for st in parsed]
        # per-block tp (`mixed_tp`): each one's segments, checked against the model's blocks
        mixed = {i: st for i, st in enumerate(parsed) if st is not None and st.mixed}
        spec = model_spec(model)
        segs_of = {i: mixed_tp.segments(st, world, len(_layers(model)[1]),
                                        stage_starts(model, st.pp, self._stage_names.get(i)))
                   for i, st in mixed.items()}
        if memory_budget is not None:
            if spec is None:
                raise HotSPaError("HotSPa: memory_budget needs a model with a GPT-2 or LLaMA config for the cost model")
            cluster = ClusterSpec(
                gpus_per_node=world, nodes=1, flops=1.0, intra_bw=1.0, inter_bw=1.0, memory=float(memory_budget)
            )
            for i, mesh in enumerate(meshes):
                st = CostStrategy(mesh.dp, mesh.tp, mesh.pp, self.sequence_parallel[i], self.recompute[i])
                if i in mixed:  # the cost model has no per-block strategy: its most demanding block's, throughout
                    st = max((CostStrategy(s.dp, s.tp, mixed[i].pp, s.sp, rc) for s in segs_of[i]
                              for rc in mixed[i].layer_recompute[s.first:s.stop]),
                             key=lambda c: predict(spec, cluster, c, [bounds[i]] * c.dp).memory_bytes)
                p = predict(spec, cluster, st, [bounds[i]] * st.dp)
                if not p.fits:
                    raise HotSPaError(
                        f"HotSPa: bucket {i} (sequences up to {bounds[i]} tokens) under strategy {_name(mesh)} needs "
                        f"{p.memory_bytes / 2**20:.1f} MiB per device per the cost model, more than the budget of "
                        f"{memory_budget / 2**20:.1f} MiB"
                    )
        params = model.parameters()
        if any(p.ds for p in params):
            raise HotSPaError("HotSPa: the model's parameters already carry distributed states; pass a plain model")
        if broadcast:
            _broadcast(model)
        full = [p._value for p in params]
        per_strategy_ds, per_strategy_value, plans_strategy = [], [], []
        try:
            for i, mesh in enumerate(meshes):  # parallelize each strategy from the full values
                for p, v in zip(params, full):
                    p.ds, p._value = [], v
                tp = parallelize(model, mesh, self.sequence_parallel[i], broadcast=False, plan=plan)
                per_strategy_ds.append([p.ds[0] for p in params])
                per_strategy_value.append([p._value for p in params])
                plans_strategy.append(dataclasses.replace(tp.strategy, dp_group=(), strategy=i))
                if mesh.dp > 1 and env.is_distributed():
                    mesh.process_group("dp")
            # a mixed strategy's segments: one more entry of Tensor.ds per (tp, sp), after the strategies'
            seg_index: dict[tuple, int] = {}
            seg_strategy: dict[int, states.Strategy] = {}
            for i in mixed:
                for seg in segs_of[i]:
                    if (seg.tp, seg.sp, mixed[i].pp) in seg_index:
                        continue
                    for p, v in zip(params, full):
                        p.ds, p._value = [], v
                    # inside this rank's pipeline stage (its TP group there)
                    mesh = DeviceMesh(dp=seg.dp, tp=seg.tp, pp=mixed[i].pp, world_size=world, rank=rank)
                    tp = parallelize(model, mesh, seg.sp, broadcast=False, plan=plan)
                    seg_index[(seg.tp, seg.sp, mixed[i].pp)] = j = len(per_strategy_ds)
                    seg_strategy[j] = tp.strategy
                    per_strategy_ds.append([p.ds[0] for p in params])
                    per_strategy_value.append([p._value for p in params])
        except Error:  # a strategy the model cannot take (heads that tp does not divide): the model as it was
            for p, v in zip(params, full):
                p.ds, p._value = [], v
            raise
        finally:
            states.set_default(None)  # graphs compile under a strategy only where HotSPa selects one
        for k, p in enumerate(params):
            p.ds = [ds[k] for ds in per_strategy_ds]
        self.model, self.meshes, self.bounds, self.params = model, meshes, bounds, params
        self.rank, self.world = rank, world
        self.node_size = int(node_size or os.environ.get("LOCAL_WORLD_SIZE", world))
        self._mixed: dict[int, mixed_tp.MixedTP] = {}
        try:
            for i, st in mixed.items():
                self._mixed[i] = m = self._mixed_program(i, st, segs_of[i], seg_index, seg_strategy,
                                                         per_strategy_value)
                per_strategy_value[i] = list(m.home_values)  # each parameter in its home segment's layout
                for p, ds in zip(params, m.home_ds):
                    p.ds[i] = ds
        except Error:  # a plan the model cannot take: the model as it was
            for p, v in zip(params, full):
                p.ds, p._value = [], v
            raise
        # the pipeline strategies' stage programs (traced from the model, as a Pipeline job's)
        self._pipelines: dict[int, Pipeline] = {}
        stages_of: dict[int, list[list[int]]] = {}
        try:
            for i, mesh in enumerate(meshes):
                if mesh.pp > 1 and i not in mixed:
                    for p, v in zip(params, per_strategy_value[i]):
                        p._value = v
                    self._pipelines[i], stages_of[i] = self._stage_program(i, plans_strategy[i])
        except Error:  # a pipeline the model cannot take (fewer layers than stages): the model as it was
            for p, v in zip(params, full):
                p.ds, p._value = [], v
            raise
        self._layouts = [
            list(self._mixed[i].home_layouts) if i in self._mixed else [
                _world_layout(p.ds[i], mesh, stages_of[i][k] if i in stages_of else (0,))
                for k, p in enumerate(params)
            ]
            for i, mesh in enumerate(meshes)
        ]
        # the owner: the least model-state bytes on its most loaded rank (a pipeline stage holds only
        # the parameters it reads), from the layouts, so every rank picks the same; ties: the first
        sizes = [max(self._held_numels(i).values()) for i in range(len(meshes))]
        self.owner = int(np.argmin(sizes)) if owner is None else int(owner)
        # a rank outside a parameter's owner layout (a pipeline stage that does not read it) holds
        # none of it: its owner value is None and the parameter shows an empty tensor
        self._dtype, self._device = full[0].dtype, full[0].device
        self._owner_values = [
            v if self.rank in self._layouts[self.owner][k].boxes(tuple(p.shape)) else None
            for k, (p, v) in enumerate(zip(params, per_strategy_value[self.owner]))
        ]
        self._install_owner_values()
        del full, per_strategy_value
        self._switch_plans: dict[tuple[int, int], list[hs.SwitchPlan]] = {}
        self._itemsize = torch.empty((), dtype=self._dtype).element_size()  # the model's one dtype
        n = len(meshes)
        self._costs = [
            [
                0.0 if b == self.owner or a == b else float(max(self._plans(a, b)[0].values(), default=0))
                for b in range(n)
            ]
            for a in range(n)
        ]
        self._build_programs(plans_strategy)

    # --- set-up -----------------------------------------------------------------------------------
    def _held_numels(self, i: int) -> dict[int, int]:
        """Per rank, the parameter elements it holds in strategy i's layouts."""
        held = dict.fromkeys(range(self.world), 0)
        for k, p in enumerate(self.params):
            for r, box in self._layouts[i][k].boxes(tuple(p.shape)).items():
                held[r] += int(np.prod([b - a for a, b in box], dtype=np.int64))
        return held

    def holds(self, k: int) -> bool:
        """Whether this rank holds a shard of parameter k in the owner's layout."""
        return self._owner_values[k] is not None

    def _install_owner_values(self) -> None:
        """The parameters' values: the owner's shards; an empty tensor where this rank holds none
        (a parameter the optimizer can name; HotSPa never gives it a gradient on this rank)."""
        for p, v in zip(self.params, self._owner_values):
            p._value = v if v is not None else torch.empty(0, dtype=self._dtype, device=self._device)

    def _stage_program(self, i: int, strategy: states.Strategy) -> tuple[Pipeline, list[list[int]]]:
        """Strategy i's pipeline: this rank's stage plans (the partition pass under strategy i's
        states), and per parameter the stages that read it (one all-gather over the world)."""
        mesh = self.meshes[i]
        pipe = Pipeline(self.model, mesh, stages=self._stage_names.get(i), micro_batches=mesh.pp)
        dtype = self.params[0].dtype
        table = (None, None)
        # the optimizer only names the parameters (their order); HotSPa's own one updates the owner's shards
        names = SGD(self.params, lr=0.0)
        states.set_default(strategy)
        try:
            with _recompute_marks(self.model, self.recompute[i]):
                pipe.compile(
                    [("ids", table, "int64"), ("positions", table, "int64"), ("segment_ids", table, "int64")],
                    [("labels", table, "int64"), ("scale", table, dtype)],
                    _pipeline_loss,
                    names,
                )
        finally:
            states.set_default(None)
        used = torch.zeros((self.world, len(self.params)), dtype=torch.int64)
        used[self.rank, pipe.param_index] = 1
        if env.is_distributed():
            torch_dist.all_reduce(used)
        per_stage = mesh.dp * mesh.tp
        stages = [sorted({r // per_stage for r in range(self.world) if used[r, k]}) for k in range(len(self.params))]
        for k, s in enumerate(stages):
            if not s:
                raise HotSPaError(f"HotSPa: strategy {i} {_name(mesh)}: no pipeline stage reads {self.params[k].name}")
        return pipe, stages

    def _mixed_program(self, i: int, st: CostStrategy, segs: list, seg_index: dict, seg_strategy: dict,
                       values: list) -> mixed_tp.MixedTP:
        """Mixed strategy i's segments as co-located stages of the model's loss, traced once with
        the blocks' recompute marks and each segment's first block marked."""
        _, blocks = _layers(self.model)
        index = [seg_index[(seg.tp, seg.sp, st.pp)] for seg in segs]
        with _recompute_marks(self.model, st.layer_recompute):
            g = Graph(name=f"hotspa-mixed{i}")
            with pipeline.marking(g, [blocks[seg.first] for seg in segs]) as marks:
                feeds, loss = self._trace(g)
        strategies = [mixed_tp.segment_strategy(seg_strategy[j], j, seg.tp) for seg, j in zip(segs, index)]
        return mixed_tp.MixedTP(self, st, segs, (g, feeds, loss), [0] + [marks[s] for s in range(1, len(segs))],
                                index, strategies, [values[j] for j in index], _world_layout)

    def _plans(self, a: int, b: int) -> tuple[dict[int, int], list[hs.SwitchPlan]]:
        """(bytes each rank sends, the plan of every parameter) for a switch from strategy a to b."""
        if (a, b) not in self._switch_plans:
            load: dict[int, int] = {}
            self._switch_plans[(a, b)] = [
                hs.plan_hot_switch(
                    tuple(p.shape),
                    self._itemsize,
                    self._layouts[a][k],
                    self._layouts[b][k],
                    node_size=self.node_size,
                    load=load,
                )
                for k, p in enumerate(self.params)
            ]
        plans = self._switch_plans[(a, b)]
        sent: dict[int, int] = {}
        for plan in plans:
            for r, nbytes in plan.send_bytes().items():
                sent[r] = sent.get(r, 0) + nbytes
        return sent, plans

    def _build_programs(self, strategies: list[states.Strategy]) -> None:
        """The loss and gradient graph of every recompute setting the pp = 1 strategies use (the
        pipeline and per-block strategies trace their own stages), and each strategy's states with its
        gradients fetched in their parameter's states under it."""
        by_setting: dict[str, _Program] = {}
        for i, mesh in enumerate(self.meshes):
            if mesh.pp == 1 and i not in self._mixed and self.recompute[i] not in by_setting:
                with _recompute_marks(self.model, self.recompute[i]):
                    by_setting[self.recompute[i]] = self._record()
        self._programs = [None if i in self._mixed else by_setting.get(self.recompute[i])
                          for i in range(len(self.meshes))]
        # a per-block owner runs no whole program; one recorded for the kinds of the gradients
        owner = self._programs[self.owner] or by_setting.get("none") or self._record()
        self.graph, self._grads = owner.graph, owner.grads  # the owner's; every program's grads are alike in kind
        # A table looked up at the fed positions (GPT-2's learned positions) has rows for a gradient here, but
        # the model run alone reads its first rows as a slice, whose gradient is dense: it updates every row
        # (AdamW decays the rows no sequence reached), as one process does, not only the touched ones.
        positions = owner.feeds[1]
        self._dense_rows = {
            k
            for k, gr in enumerate(owner.grads)
            if isinstance(gr, IndexedSlices)
            and any(positions is t for op in topological_ops([gr.indices], owner.graph) for t in op.inputs)
        }
        self._strategies = []
        for i, st in enumerate(strategies):
            program = self._programs[i]
            wanted = {}
            if program is not None:
                wanted = {
                    id(gr): p.ds[i]
                    for p, gr in zip(self.params, program.grads)
                    if gr is not None and not isinstance(gr, IndexedSlices)
                }
            self._strategies.append(dataclasses.replace(st, fetch_states=wanted))

    def _record(self) -> _Program:
        g = Graph(name="hotspa")
        (ids, positions, segments, labels, scale), loss = self._trace(g)
        with g:
            grads = gradients(loss, self.params)
        fetches = [loss]
        for gr in grads:
            if gr is None:
                continue
            fetches += [gr.indices, gr.values] if isinstance(gr, IndexedSlices) else [gr]
        return _Program(g, (ids, positions, segments, labels, scale), grads, fetches)

    def _trace(self, g: Graph) -> tuple[tuple, object]:
        """(the feeds, the loss) of the model recorded into `g`: the packed rows' ids, positions,
        segment ids and labels, and the scale (1 / the step's target tokens) of the summed loss."""
        dtype = self.params[0].dtype
        with g:
            ids = g.placeholder("ids", (None, None), "int64")
            positions = g.placeholder("positions", (None, None), "int64")
            segments = g.placeholder("segment_ids", (None, None), "int64")
            labels = g.placeholder("labels", (None, None), "int64")
            scale = g.placeholder("scale", (), dtype)
            logits = self.model(ids, positions=positions, segment_ids=segments)
            vocab = logits.shape[-1]
            total = F.cross_entropy(
                logits.reshape((-1, vocab)), labels.reshape((-1,)), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            loss = total * scale
        return (ids, positions, segments, labels, scale), loss

    # --- one step ---------------------------------------------------------------------------------
    def _local_grads(self, i: int, rows, scale: float, touched: dict) -> tuple[float, list[torch.Tensor]]:
        """(this rank's loss share, each parameter's local gradient under strategy i) for `rows`;
        the rows of tables with a sparse gradient are marked in `touched[k]`."""
        mesh = self.meshes[i]
        values = [p._value for p in self.params]
        if rows is None:  # this rank's replica got no rows this step: it adds nothing
            return 0.0, [torch.zeros_like(v) for v in values]
        program = self._programs[i]
        states.select(program.graph, self._strategies[i], ("hotspa", i))
        ids, positions, segments, labels, scale_t = program.feeds
        out = program.graph.run(
            program.fetches,
            {
                ids: rows.tokens,
                positions: rows.positions,
                segments: rows.segment_ids,
                labels: rows.labels,
                scale_t: np.asarray(scale, dtype=np.float64),  # converted to the placeholder's dtype
            },
        )
        loss, rest = float(out[0]), out[1:]
        grads = []
        for k, gr in enumerate(program.grads):
            if gr is None:
                grads.append(torch.zeros_like(values[k]))
            elif isinstance(gr, IndexedSlices):  # rows of a table: summed into its local block
                device = values[k].device
                idx, val = torch.from_numpy(rest[0]).to(device), torch.from_numpy(rest[1]).to(device)
                rest = rest[2:]
                grads.append(self._rows_block(self._layouts[i][k], k, idx, val, values[k].dtype, touched))
            else:
                grads.append(torch.from_numpy(rest[0]).to(device=values[k].device, dtype=values[k].dtype))
                rest = rest[1:]
        return (loss if mesh.index("tp") == 0 else 0.0), grads

    def _rows_block(self, layout: hs.Layout, k: int, idx: torch.Tensor, val: torch.Tensor, dtype,
                    touched: dict) -> torch.Tensor:
        """A table's sparse gradient (global row ids, their values) summed into this rank's block of
        parameter k in `layout` (its layout under a strategy or segment); the rows are marked in
        `touched[k]` where the whole model's gradient of k is sparse (a pipeline stage's lookup of
        GPT-2's tied table is rows, the table's gradient is dense)."""
        p = self.params[k]
        dense = torch.zeros(tuple(p.shape), dtype=dtype, device=val.device)
        dense.index_add_(0, idx.reshape(-1), val.reshape(-1, *dense.shape[1:]).to(dtype))
        if k in touched:
            touched[k][idx.reshape(-1).cpu()] = 1
        box = layout.boxes(tuple(p.shape))[self.rank]
        return dense[tuple(slice(a, b) for a, b in box)].contiguous()

    def _pipeline_grads(self, i: int, rows, scale: float, touched: dict) -> tuple[float, list]:
        """Strategy i's pipeline on this replica's `rows`: (the loss share of this rank, each
        parameter's gradient block; None for the parameters its stage does not read). Every stage
        of one replica gets the same rows: they run the same micro-batches (padded with rows that
        have no targets up to a multiple of their count)."""
        pipe = self._pipelines[i]
        grads: list = [None] * len(self.params)
        if rows is None:
            for k in pipe.param_index:
                grads[k] = torch.zeros_like(self.params[k]._value)
            return 0.0, grads
        n = rows.num_rows
        pipe.micro_batches = m = min(pipe.stages, n)
        pad = -n % m
        dtype = self._dtype
        arrays = {
            "ids": rows.tokens,
            "positions": rows.positions,
            "segment_ids": rows.segment_ids,
            "labels": rows.labels,
        }
        feeds = {}
        for name, a in arrays.items():
            fill = IGNORE_INDEX if name == "labels" else 0  # packing's own padding: segment 0, no target
            feeds[name] = torch.from_numpy(np.concatenate([a, np.full((pad, a.shape[1]), fill, a.dtype)]))
        feeds["scale"] = torch.full(tuple(feeds["labels"].shape), scale, dtype=dtype)
        feeds["scale"][n:] = 0
        losses, accum = [], [None] * len(pipe.params)
        pipe.run_schedule(feeds, (n + pad) // m, losses, accum)
        for pos, (k, acc) in enumerate(zip(pipe.param_index, accum)):
            if pipe._sparse[pos]:
                idx = torch.cat([r for r, _ in acc])
                val = torch.cat([v for _, v in acc])
                grads[k] = self._rows_block(self._layouts[i][k], k, idx, val, dtype, touched)
            else:
                grads[k] = acc
        share = float(sum(losses)) if pipe.is_last and self.meshes[i].index("tp") == 0 else 0.0
        return share, grads

    def _dp_sum(self, i: int, grads: list) -> list:
        """Sums the gradients over strategy i's data-parallel group (one flat all-reduce; a
        pipeline stage's members hold the same parameters), then those of parameters that several
        pipeline stages read over those stages."""
        if not env.is_distributed():
            return grads
        out = self._all_reduce_flat(grads, self.meshes[i])
        if i in self._pipelines:
            pipe = self._pipelines[i]
            for pos, users in pipe._shared:
                torch_dist.all_reduce(out[pipe.param_index[pos]], group=env.process_group(users))
        return out

    @staticmethod
    def _all_reduce_flat(grads: list, mesh: DeviceMesh) -> list:
        """The gradients (None: not held) summed over `mesh`'s data-parallel group in one flat all-reduce."""
        if mesh.dp == 1 or not env.is_distributed():
            return list(grads)
        out = list(grads)
        held = [k for k, g in enumerate(grads) if g is not None]
        flat = torch.cat([grads[k].reshape(-1) for k in held])
        torch_dist.all_reduce(flat, group=mesh.process_group("dp"))
        pos = 0
        for k in held:
            out[k] = flat[pos : pos + grads[k].numel()].view(grads[k].shape)
            pos += grads[k].numel()
        return out

    def _switch(self, a: int, b: int, values: list[torch.Tensor]) -> tuple[list[torch.Tensor], int, float]:
        """values in strategy a's layout -> strategy b's (one batch of isend/irecv); (values, bytes, s)."""
        if a == b:
            return values, 0, 0.0
        sent, plans = self._plans(a, b)
        start = time.perf_counter()
        if env.is_distributed():
            out = hs.run_switches(plans, values, self.rank, dtype=self._dtype)
        else:
            out = values
        return out, sum(sent.values()), time.perf_counter() - start

    def order(self, used: Sequence[int]) -> list[int]:
        """The visiting order of the strategies `used` this step: the owner's first, then the one
        whose parameter switches cost least in total (`hot_switch.best_order`)."""
        used = sorted(set(used) | {self.owner})
        sub = [[self._costs[a][b] for b in used] for a in used]
        path, _ = hs.best_order(sub, used.index(self.owner))
        return [used[j] for j in path[:-1]]

    def step(self, sequences: Sequence[np.ndarray], optimizer) -> StepReport:
        """One training step over a global batch of 1-D token sequences (the same on every rank):
        bucketed, packed, each bucket run under its strategy, one optimizer step at the owner."""
        start = time.perf_counter()
        missing = [p.name for p in self.params if id(p) not in optimizer._index]
        if missing:
            raise HotSPaError(
                f"HotSPa.step: the optimizer does not hold parameters {missing[:3]}; create it with "
                "model.parameters() after HotSPa"
            )
        groups = bucket_batch(sequences, self.bounds)
        total = sum(int((gr.rows.labels != IGNORE_INDEX).sum()) for gr in groups)
        if total == 0:
            raise HotSPaError("HotSPa.step: the batch has no target tokens (every sequence has one token or none)")
        used = [i for i, gr in enumerate(groups) if gr.rows.num_rows]
        report = StepReport(0.0, self.order(used))
        accumulated = [None if v is None else torch.zeros_like(v) for v in self._owner_values]
        # a table's sparse gradient updates only the rows some group touched (as one process would)
        touched = {
            k: torch.zeros(p.shape[0], dtype=torch.int32)
            for k, (p, g) in enumerate(zip(self.params, self._grads))
            if isinstance(g, IndexedSlices) and k not in self._dense_rows
        }
        current, loss = self.owner, 0.0
        with context.no_grad():
            for i in report.order:
                gr = groups[i]
                report.tokens[i] = gr.tokens
                if not gr.rows.num_rows:
                    continue
                if i != current:  # parameters there, from wherever they are now
                    here = self._owner_values if current == self.owner else [p._value for p in self.params]
                    values, nbytes, seconds = self._switch(current, i, here)
                    for p, v in zip(self.params, values):
                        p._value = v
                    report.switch_bytes += nbytes
                    report.switch_seconds += seconds
                    current = i
                if i in self._mixed:  # every segment's replicas take their own rows of the bucket
                    share, grads = self._mixed[i].grads(gr.rows, 1.0 / total, touched)
                    if self._mixed[i].pp > 1:
                        report.micro_batches[i] = self._mixed[i].micro_batches
                    report.rebatch_bytes += self._mixed[i].rebatch_bytes
                    report.rebatch_messages += self._mixed[i].rebatch_messages
                    loss += share
                    grads, nbytes, seconds = self._switch(i, self.owner, grads)
                    report.switch_bytes += nbytes
                    report.switch_seconds += seconds
                    self._accumulate(accumulated, grads)
                    continue
                mesh = self.meshes[i]
                mine = np.arange(gr.rows.num_rows)[mesh.index("dp") :: mesh.dp]  # this replica's rows
                rows = None
                if len(mine):
                    r = gr.rows
                    rows = dataclasses.replace(
                        r,
                        tokens=r.tokens[mine],
                        positions=r.positions[mine],
                        segment_ids=r.segment_ids[mine],
                        labels=r.labels[mine],
                    )
                if i in self._pipelines:
                    share, grads = self._pipeline_grads(i, rows, 1.0 / total, touched)
                    report.micro_batches[i] = 0 if rows is None else self._pipelines[i].micro_batches
                else:
                    share, grads = self._local_grads(i, rows, 1.0 / total, touched)
                loss += share
                grads = self._dp_sum(i, grads)
                grads, nbytes, seconds = self._switch(i, self.owner, grads)  # gradients back to the owner
                report.switch_bytes += nbytes
                report.switch_seconds += seconds
                self._accumulate(accumulated, grads)
            self._install_owner_values()
            if touched and env.is_distributed():
                flat = torch.cat(list(touched.values()))
                torch_dist.all_reduce(flat)
                pos = 0
                for mark in touched.values():
                    mark.copy_(flat[pos : pos + len(mark)])
                    pos += len(mark)
            updates = {k: g for k, g in enumerate(accumulated) if g is not None}  # this rank's shards only
            for k, mark in touched.items():
                if k not in updates:
                    continue
                first, last = self._my_box(k)[0]
                rows = torch.nonzero(mark[first:last] > 0).reshape(-1).to(updates[k].device)
                updates[k] = (rows, updates[k].index_select(0, rows))
            pairs = [(optimizer._index[id(self.params[k])], g) for k, g in updates.items()]
            # every rank joins the clipping norm's all-reduce, also one that holds no shard at all
            coef = self._clip_coef(optimizer, updates) if optimizer.max_grad_norm is not None else None
            optimizer.apply_gradients(pairs, clip_coef=coef)
            # the optimizer updated the owner's shards in place; they stay the parameters' values
            self._owner_values = [None if v is None else p._value for p, v in zip(self.params, self._owner_values)]
        if env.is_distributed():
            value = torch.tensor([loss], dtype=torch.float64)
            torch_dist.all_reduce(value)
            loss = float(value[0])
        report.loss = loss
        report.step_seconds = time.perf_counter() - start
        return report

    @staticmethod
    def _accumulate(accumulated: list, grads: list) -> None:
        """Adds a bucket's gradients, in the owner's layout, to the step's (None: not held here)."""
        for acc, g in zip(accumulated, grads):
            if acc is not None:
                acc += g

    def _clip_coef(self, optimizer, updates: dict) -> torch.Tensor:
        """Global-norm clipping's factor over the owner's shards `updates` ({parameter: dense
        gradient or (rows, values)}): each box counted once however many ranks hold it, summed over
        every rank (one all-reduce of a scalar)."""
        total = torch.zeros((), dtype=torch.float64, device=self._device)
        for k, g in updates.items():
            copies = list(self._layouts[self.owner][k].boxes(tuple(self.params[k].shape)).values()).count(
                self._my_box(k))
            dense = g[1] if isinstance(g, tuple) else g
            total += torch.linalg.vector_norm(dense.double()).to(total.device) ** 2 / copies
        if env.is_distributed():
            torch_dist.all_reduce(total)
        return torch.clamp(optimizer.max_grad_norm / (total.sqrt() + 1e-6), max=1.0)

    def _my_box(self, k: int):
        """This rank's box of parameter k in the owner's layout (it must hold one)."""
        return self._layouts[self.owner][k].boxes(tuple(self.params[k].shape))[self.rank]

    def _box(self, k: int) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self._my_box(k))

    def gather(self, k: int, local: torch.Tensor | None) -> torch.Tensor:
        """The full value of a tensor laid out like parameter k in the owner's layout (this rank's
        shard `local`: the parameter itself or an optimizer moment of it; ignored where this rank
        holds none of k); a collective every rank joins, in the same order."""
        p = self.params[k]
        boxes = self._layouts[self.owner][k].boxes(tuple(p.shape))
        dtype = local.dtype if local is not None and self.holds(k) else self._dtype
        full = torch.zeros(tuple(p.shape), dtype=dtype, device=self._device)
        # every box is held by dp copies (a shared parameter's also by its stages): each box summed
        # once, from the lowest rank holding it
        first = {}
        for r in sorted(boxes):
            first.setdefault(boxes[r], r)
        if self.holds(k) and first[boxes[self.rank]] == self.rank:
            full[self._box(k)] = local
        if env.is_distributed():
            torch_dist.all_reduce(full)
        return full

    def shard(self, k: int, full: torch.Tensor) -> torch.Tensor | None:
        """This rank's shard, in the owner's layout, of a full tensor shaped like parameter k (None
        where this rank holds none of k)."""
        if tuple(full.shape) != tuple(self.params[k].shape):
            raise HotSPaError(
                f"HotSPa.shard: parameter {k} has shape {tuple(self.params[k].shape)}, found {tuple(full.shape)}"
            )
        if not self.holds(k):
            return None
        return full[self._box(k)].clone().contiguous()

    def full_optimizer_state(self, optimizer) -> list[dict | None]:
        """Per optimizer parameter index, its full state ({"step": ..., moment name: full tensor}),
        None where no rank has any (no update yet), gathered from the owner's shards: a collective
        every rank joins in the same order, also a rank that holds none of a parameter (a pipeline
        owner's stage that does not read it)."""
        state = optimizer._state
        index = [optimizer._index[id(p)] for p in self.params]
        steps = torch.full((len(self.params),), -1.0, dtype=torch.float64)
        for k, i in enumerate(index):
            if self.holds(k) and state[i] is not None:
                steps[k] = float(state[i]["step"])
        if env.is_distributed():
            torch_dist.all_reduce(steps, op=torch_dist.ReduceOp.MAX)
        out: list[dict | None] = list(state)  # a parameter HotSPa does not train keeps this rank's
        for k, i in enumerate(index):
            out[i] = None
            if steps[k] < 0:
                continue
            mine = state[i] if self.holds(k) else None
            group = optimizer.param_groups[optimizer._group_of[i]]
            entry = {"step": torch.tensor(float(steps[k]), dtype=torch.float32, device=self._device)}
            for name in sorted(optimizer._state_names(group)):
                entry[name] = self.gather(k, None if mine is None else mine[name])
            out[i] = entry
        return out

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter's full value by name, gathered from the owner's shards (a collective)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names.get(id(p), p.name): self.gather(k, p._value) for k, p in enumerate(self.params)}

    def __repr__(self) -> str:
        names = [str(self._mixed[i].st) if i in self._mixed else _name(m) for i, m in enumerate(self.meshes)]
        return f"HotSPa({names}, bounds={self.bounds}, owner={names[self.owner]})"


__all__ = ["HotSPa", "StepReport", "model_spec"]
