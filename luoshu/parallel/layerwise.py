"""Layer-wise strategy search (Galvatron): per layer an activation recompute choice (and, with
`mixed_tp`, its tp and sequence parallelism), per job the (dp, tp, sequence parallel) strategy and
the pipeline's stages, under a per-device memory budget.

`search_plan(prof, model, world, rows, row_len, lengths, budget)` returns the `LayerPlan` the cost
model predicts fastest among every candidate strategy over `world` ranks whose peak fits the
budget; `apply_plan(model, plan)` marks exactly the chosen blocks for recompute
(`luoshu.nn.recompute`: "selective" recomputes a block's attention, "full" the whole block).

The cost model per layer and recompute option:

- memory, measured on this machine by the plans' own accounting (`Graph.memory`) of the model's
  training graph (HotSPa's: packed rows, next-token loss, parameter gradients) with one and with
  two blocks under that option (`measure_layers`): `saved`, the bytes a block keeps from its
  forward until its backward (the two-block peak less the one-block peak), `extra`, what its
  backward adds on top (a fully recomputed block's activations come back then), and `outside`,
  the embeddings', head's and loss's. A stage's peak is taken as outside + Σ saved · in-flight
  micro-batches + the extra of each option its blocks use (once per option: the plans' peaks
  of mixed choices hold both a recomputed block's working set and a selective one's), plus 16
  bytes per parameter it holds (fp32 weight and gradient, AdamW's two moments). It is
  conservative where a fully recomputed block is not the last (the plan has freed the later
  blocks' saved bytes by the time it comes back). Under the job's ranks each candidate's tp
  (and sp) plans are measured as they run, on this rank of that tensor parallelism; bytes
  measured on one device only (`measured=`, or a search for other ranks than this job's) are
  scaled by the ratio of Korthikanti et al.'s formula under that tp
  (`hotspa.layer_activation_bytes`), which under-counts a TP plan's (measured 1.1-2.1x at tp2:
  the outside bytes, and a fully recomputed block's, do not split);
- time: `hotspa.layer_time` of the block under that option (full recompute one more forward,
  selective the attention scores again) over the rows a replica runs; a job's step is
  `hotspa.predict`'s (the profiled whole-model runs, the gradient all-reduce, the update) plus the
  recompute it chooses; a pipeline's step its slowest stage times (m + pp - 1)/m.

Per-block tensor parallelism (`search_plan(..., mixed_tp=True)`, `mixed_plan_for`): the options of
a block are (tp, sp, recompute) over the tp degrees `hotspa_profile.runnable` gives (dividing the
world and the heads; dp = world / tp; sp only with tp > 1), pp = 1; with `pipeline=True` also
inside the stages of each pp > 1 (tp dividing world / pp; the split and the options one program
over stages × layers × options with a budget per stage, `mixed_options(..., pp)`). A block under tp costs 1/layers
of that uniform strategy's predicted step (its compute and TP collectives, its share of the runs'
overheads and head, and of the gradients' all-reduce over its own dp group) plus its recompute,
so a plan whose blocks share one (tp, sp) costs what the uniform search says; it holds that tp's
measured saved bytes (each tp and sp measured once, the cache of `search_plan`) and block states
(16 B/param / tp); the first block also the bytes outside the blocks under its tp. Consecutive
blocks of different (tp, sp) pay `hotspa.transition_time`: the boundary activation re-batched
between the two row layouts forward and its gradient back, priced from the hot-switch planner's
plans (`hotspa.rebatch_bytes`: largest per-rank send over the link's bandwidth plus a latency),
and the all-gather a sequence-parallel side needs. A run of blocks of one (tp, sp) is a *segment*
(one plan of the runtime): its working sets add up (the extras of the options it uses), while the
segments' plans run one after another, so a stage is charged its largest segment's extras.

Search: for each candidate the stage programs are exact dynamic programs over layers × options
(`hotspa.layer_tables`, memory in integer units of budget/`resolution`, rounded up) whose states
are (option, the options its segment has used so far); the largest segment charge is a cap tried
at every value it can take (its units taken from the budget up front, states over it excluded),
which keeps the program exact and its size linear in the number of charges rather than 2^options;
the split into stages a min-max dynamic program over the stages' first layers; on tiny
configurations it equals brute force over every split and choice (the tests). Nothing that
fits: a `HotSPaError` naming the least memory needed and each candidate's.

What the runtime can carry (and so what `luoshu train --parallel auto` searches):

- recompute per block: yes, the marks are per module and the recompute pass rewrites each region;
- sequence parallelism: per job in a uniform plan. It is `states.Strategy.sequence_parallel`, one
  flag of the graph's whole localisation (which conversion the states pass prefers between TP
  regions), so it cannot differ between the blocks of one plan; the search chooses it per
  strategy (a mixed plan per segment, each segment its own plan);
- tp per layer: yes (`luoshu.parallel.mixed_tp`): a mixed plan's segments run as co-located stages,
  activations re-batched between their row layouts by the hot-switch planner; `--parallel auto`
  searches uniform and per-block plans (`mixed_tp=True`), and a mixed plan trains as the per-block
  HotSPa strategy `tp[..],sp[..],rc[..]`; inside pipeline stages too (`pp2,tp[..]`: each stage's
  segments on its own ranks, the hidden state re-batched between the stages' groups, the split the
  search chose as HotSPa's `stages`);
- pipeline: the search chooses pp and the split (`pipeline=True`), and the partition pass
  accepts a given split (`Pipeline(stages=...)`): a hot-switching job's pp > 1 strategies run
  the split `pipeline_stages` balances by the cost model (HotSPa's `stages`). A pipeline strategy
  can own HotSPa's parameters and optimizer state (each stage holding its own, the states this
  search counts per stage), so `--parallel auto` searches pp > 1 too and runs the split it chose.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from luoshu.compiler import states
from luoshu.core.tensor import IndexedSlices
from luoshu.distributed import env
from luoshu.distributed.mesh import DeviceMesh
from luoshu.nn.module import Module
from luoshu.nn.recompute import recompute
from luoshu.parallel import hotspa as H
from luoshu.parallel import hotspa_profile
from luoshu.parallel.pipeline import _layers
from luoshu.parallel.tensor_parallel import COLWISE, MEGATRON_PLAN, parallelize

RECOMPUTE = ("none", "selective", "full")
_SCOPE = {"selective": "attention", "full": "full"}
STATE_BYTES = 16  # per parameter: fp32 weight and gradient, AdamW's two moments


# --- the search over numbers ---------------------------------------------------------------------------
def _states(extra, groups, cap) -> tuple[list[tuple[int, int]], list[int]]:
    """The stage program's states under a cap on a segment's charge: (option c, the options of c's
    group its segment has used so far, as a mask over the group's options with an extra, in order:
    one without adds nothing to a charge), each mask's charge (the Σ of its options' extras) at most
    `cap`; and each option's bit in its group's masks (0 for an option without an extra)."""
    members: dict = {}
    for c, g in enumerate(groups):
        members.setdefault(g, [])
        if extra[c]:
            members[g].append(c)
    bit = [1 << members[g].index(c) if extra[c] else 0 for c, g in enumerate(groups)]
    states = []
    for c, g in enumerate(groups):
        opts = members[g]
        for mask in range(1 << len(opts)):
            if mask & bit[c] == bit[c] and sum(extra[o] for i, o in enumerate(opts) if mask >> i & 1) <= cap:
                states.append((c, mask))
    return states, bit


def _charges(extra, groups) -> list:
    """Every charge a segment can have (the Σ extras of a set of one group's options), ascending."""
    members: dict = {}
    for c, g in enumerate(groups):
        members.setdefault(g, []).append(c)
    return sorted({sum(extra[o] for i, o in enumerate(opts) if mask >> i & 1)
                   for opts in members.values() for mask in range(1, 1 << len(opts))})


def _capped(seconds, saved, extra, groups, transition, units: int, start: int, cap):
    """`hotspa.layer_tables` over layers start.. with `_states(extra, groups, cap)` as its options: a
    state's time and memory its option's, a move between states allowed where it keeps the mask (the
    same group: the mask grows by the new option; another group: a new segment, the mask the new
    option alone) at `transition`'s cost. Returns (states, bests, backs)."""
    states, bit = _states(extra, groups, cap)
    times = [[seconds[i][c] if i > start or mask == bit[c] else math.inf for c, mask in states]
             for i in range(start, len(seconds))]
    memories = [[saved[i][c] for c, _ in states] for i in range(start, len(seconds))]
    moves = [[transition[p][c] if (mc == mp | bit[c] if groups[p] == groups[c] else mc == bit[c]) else math.inf
              for c, mc in states] for p, mp in states]
    bests, backs = H.layer_tables(times, memories, units, moves)
    return states, bests, backs


def _segment_best(seconds, saved, extra, budget: int, start: int, groups, transition) -> list[tuple]:
    """For each end j > start: (least seconds of layers start..j-1 whose Σ saved plus the largest
    charge of a segment fits `budget` units, the cap on the charge that reaches it); (inf, None)
    where none. Exact: a cap at each possible charge, its units taken from the saved bytes' budget."""
    layers = len(seconds)
    out = [(math.inf, None)] * (layers + 1)
    if start >= layers:
        return out
    for cap in _charges(extra, groups):
        if cap > budget:
            break
        _, bests, _ = _capped(seconds, saved, extra, groups, transition, budget - cap, start, cap)
        for j, best in enumerate(bests):
            value = float(best.min())
            if value < out[start + j + 1][0]:
                out[start + j + 1] = (value, cap)
    return out


def _segment_path(seconds, saved, extra, budget: int, start: int, end: int, groups, transition, cap) -> list[int]:
    """The options of layers start..end-1 on `_segment_best`'s path under `cap`."""
    states, bests, backs = _capped(seconds, saved, extra, groups, transition, budget - cap, start, cap)
    best = bests[end - start - 1]
    s, m = np.unravel_index(np.argmin(best), best.shape)
    return [states[x][0] for x in H.layer_path(backs, end - start - 1, s, m)]


def _defaults(seconds, extra, groups, transition):
    k = len(extra)
    if any(len(row) != k for row in seconds):
        raise H.HotSPaError(f"search_stages: every layer needs one time per option ({k} extras), "
                            f"found {[len(row) for row in seconds]}")
    groups = [0] * k if groups is None else list(groups)
    transition = [[0.0] * k for _ in range(k)] if transition is None else [list(row) for row in transition]
    if len(groups) != k or len(transition) != k or any(len(row) != k for row in transition):
        raise H.HotSPaError(f"search_stages: {k} options need {k} groups and a {k}x{k} transition matrix, found "
                            f"{len(groups)} groups and {[len(row) for row in transition]}")
    return groups, transition


def search_stages(
    seconds: Sequence[Sequence[float]],
    saved: Sequence[Sequence[Sequence[int]]],
    extra: Sequence[int],
    budgets: Sequence[int],
    stage_seconds: Sequence[float] | None = None,
    groups: Sequence | None = None,
    transition: Sequence[Sequence[float]] | None = None,
) -> tuple[list[int], list[int], float]:
    """The split of the layers into `len(budgets)` contiguous non-empty stages and an option per
    layer that minimise the slowest stage's time: a stage's time is its layers' `seconds[l][c]`,
    `transition[a][b]` between consecutive layers of the stage under options a then b, and
    `stage_seconds[s]`. Options of equal `groups[c]` (a (tp, sp): default one group) run in one
    plan: a stage's *segments* are its maximal runs of layers of one group, a segment's charge the
    Σ `extra[c]` of the distinct options it uses (a plan's working sets add up), and a stage's
    memory `Σ saved[s][l][c]` (stage s's in-flight copies) plus its largest segment charge (the
    segments' plans run one after another), at most `budgets[s]` (integer units). Returns (the
    first layer of each stage, the option of each layer, the slowest stage's time); HotSPaError
    when nothing fits."""
    pp, layers = len(budgets), len(seconds)
    if layers < pp:
        raise H.HotSPaError(f"search_stages: {layers} layers cannot fill {pp} stages")
    groups, transition = _defaults(seconds, extra, groups, transition)
    fixed = list(stage_seconds) if stage_seconds is not None else [0.0] * pp
    empty = [(math.inf, None)] * (layers + 1)
    # segments[s][i]: stage s starting at layer i (only where the stages before and after fit)
    segments = [[_segment_best(seconds, saved[s], extra, int(budgets[s]), i, groups, transition)
                 if s <= i <= layers - pp + s else empty for i in range(layers)] for s in range(pp)]
    # worst[s][j]: the least slowest-stage time of stages 0..s covering layers 0..j-1
    worst = np.full((pp, layers + 1), math.inf)
    cut = np.full((pp, layers + 1), -1, dtype=np.int64)
    for j in range(1, layers + 1):
        worst[0, j] = segments[0][0][j][0] + fixed[0]
        cut[0, j] = 0
    for s in range(1, pp):
        for j in range(s + 1, layers + 1):
            for i in range(s, j):
                t = max(worst[s - 1, i], segments[s][i][j][0] + fixed[s])
                if t < worst[s, j]:
                    worst[s, j], cut[s, j] = t, i
    if not math.isfinite(worst[pp - 1, layers]):
        raise H.HotSPaError(
            f"search_stages: no split of {layers} layers into {pp} stages fits the budgets {list(budgets)}"
        )
    starts, j = [], layers
    for s in range(pp - 1, -1, -1):
        starts.append(int(cut[s, j]))
        j = starts[-1]
    starts.reverse()
    choices: list[int] = []
    for s, i in enumerate(starts):
        j = starts[s + 1] if s + 1 < pp else layers
        choices += _segment_path(seconds, saved[s], extra, int(budgets[s]), i, j, groups, transition,
                                 segments[s][i][j][1])
    return starts, choices, float(worst[pp - 1, layers])


def stage_charge(picks: Sequence[int], extra, groups) -> float:
    """The largest segment charge of one stage's options `picks` (`search_stages`)."""
    worst, segment = 0, set()
    for i, c in enumerate(picks):
        if i and groups[c] != groups[picks[i - 1]]:
            segment = set()
        segment.add(c)
        worst = max(worst, sum(extra[o] for o in segment))
    return worst


def brute_force_stages(seconds, saved, extra, budgets, stage_seconds=None, groups=None, transition=None) -> float:
    """The slowest-stage time `search_stages` must reach, over every split and every choice."""
    pp, layers, k = len(budgets), len(seconds), len(seconds[0])
    groups, transition = _defaults(seconds, extra, groups, transition)
    fixed = list(stage_seconds) if stage_seconds is not None else [0.0] * pp
    best = math.inf
    for inner in itertools.combinations(range(1, layers), pp - 1):
        bounds = [0, *inner, layers]
        for pick in itertools.product(range(k), repeat=layers):
            worst = 0.0
            for s in range(pp):
                span = list(range(bounds[s], bounds[s + 1]))
                picks = [pick[i] for i in span]
                memory = sum(saved[s][i][pick[i]] for i in span) + stage_charge(picks, extra, groups)
                if memory > budgets[s]:
                    worst = math.inf
                    break
                moves = sum(transition[a][b] for a, b in zip(picks, picks[1:]))
                worst = max(worst, sum(seconds[i][pick[i]] for i in span) + moves + fixed[s])
            best = min(best, worst)
    if not math.isfinite(best):
        raise H.HotSPaError("nothing fits")
    return best


# --- the model's costs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerMemory:
    """Measured activation bytes per recompute option of one block at (rows, row_len) on one rank
    of a plan under tensor parallelism `tp` (with sequence parallelism `sp`) (module docstring)."""

    rows: int
    row_len: int
    saved: dict
    extra: dict
    outside: int
    tp: int = 1
    sp: bool = False


def _copy_with_layers(model: Module, layers: int) -> Module:
    config = model.config
    name = "n_layer" if hasattr(config, "n_layer") else "n_layers"
    copy = type(model)(dataclasses.replace(config, **{name: layers, "recompute": False}))
    return copy.to(dtype=model.parameters()[0].dtype)


def _peak(model: Module, option: str, layers: int, rows: int, row_len: int, mesh, sp: bool) -> int:
    """The peak activation bytes of one run of HotSPa's training graph of a copy of `model` with
    `layers` blocks under `option`, on this rank of `mesh`'s tensor parallelism (a collective)."""
    copy = _copy_with_layers(model, layers)
    _, blocks = _layers(copy)
    if option != "none":
        for block in blocks:
            recompute(block, _SCOPE[option])
    tpar = None
    if mesh is not None and mesh.tp > 1:
        tpar = parallelize(copy, mesh, sp, broadcast=False)
    states.set_default(None)
    try:
        g, fetches, phs, grads = hotspa_profile._lm_graph(copy)
        if tpar is not None:  # the gradients fetched in their parameters' states, as HotSPa's plans
            wanted = {id(gr): p.ds[0] for p, gr in zip(copy.parameters(), grads)
                      if gr is not None and not isinstance(gr, IndexedSlices)}
            states.attach(g, dataclasses.replace(tpar.strategy, dp_group=(), fetch_states=wanted))
        feeds = hotspa_profile._lm_feeds(phs, copy.config.vocab_size, int(rows), int(row_len),
                                         np.random.default_rng(0))
        return int(g.memory(fetches, feeds).peak_activations)
    finally:
        states.set_default(None)


def measure_layers(model: Module, rows: int, row_len: int, mesh=None, sequence_parallel: bool = False) -> LayerMemory:
    """One block's saved and extra activation bytes under each recompute option, and the bytes
    outside the blocks, from the plans' peaks of fresh copies of `model`'s architecture with one
    and with two blocks on `rows` packed rows of `row_len` tokens (one step each). `mesh`: on this
    rank of its tensor parallelism (every rank of the mesh calls it: the plans run collectives)."""
    peaks = {(c, n): _peak(model, c, n, rows, row_len, mesh, sequence_parallel) for c in RECOMPUTE for n in (1, 2)}
    saved = {c: max(peaks[c, 2] - peaks[c, 1], 0) for c in RECOMPUTE}
    outside = min(peaks[c, 1] - saved[c] for c in RECOMPUTE)
    extra = {c: peaks[c, 1] - saved[c] - outside for c in RECOMPUTE}
    tp = 1 if mesh is None else mesh.tp
    return LayerMemory(int(rows), int(row_len), saved, extra, int(outside), tp, bool(sequence_parallel and tp > 1))


def _held(model: Module, tp: int) -> tuple[list[int], int]:
    """(parameters one rank holds per block, outside the blocks) under tp: what the Megatron plan
    splits (a column-parallel layer's weight and bias, a row-parallel one's weight, the tables)
    divided by tp."""
    prefix, blocks = _layers(model)

    def count(module: Module, skip: str | None = None) -> int:
        total = 0
        for name, m in module.named_modules():
            if skip is not None and (name == skip or name.startswith(skip + ".")):
                continue
            leaf = name.rsplit(".", 1)[-1]
            layout = MEGATRON_PLAN.get(leaf)
            for pname, p in m._parameters.items():
                if p is None:
                    continue
                split = layout is not None and (pname == "weight" or layout == COLWISE)
                total += p.numel() // tp if split else p.numel()
        return total

    return [count(b) for b in blocks], count(model, skip=prefix)


@dataclass
class LayerPlan:
    """The search's result: the strategy, each layer's recompute, the stages' first layers, the
    predicted step time and peak memory per device (the worst stage's) and their parts; each
    block's `tp` and `sp` (the strategy's throughout for a uniform plan). A mixed plan (blocks of
    different (tp, sp), `mixed`) has no one strategy (`strategy` None), its blocks cut into `pp`
    stages (one without a pipeline) at `stages`."""

    strategy: H.Strategy | None
    recompute: list[str]
    stages: list[int]
    time_s: float
    memory_bytes: float
    parts: dict = field(default_factory=dict)
    tp: tuple = ()
    sp: tuple = ()
    pp: int = 1

    def __post_init__(self):
        if not self.tp:
            self.tp = (self.strategy.tp,) * len(self.recompute)
            self.sp = (self.strategy.sp,) * len(self.recompute)
        self.tp, self.sp = tuple(int(t) for t in self.tp), tuple(bool(v) for v in self.sp)
        if self.strategy is not None:
            self.pp = self.strategy.pp

    @property
    def mixed(self) -> bool:
        return self.strategy is None

    @property
    def text(self) -> str:
        """'dp2,tp2,pp1,sp' (uniform) or the per-block 'tp[4,2,1],sp[1,0,0]' (mixed; 'pp2,tp[2,1,1]'
        in pipeline stages)."""
        if self.mixed:
            return (f"pp{self.pp}," if self.pp > 1 else "") + "tp[" + ",".join(map(str, self.tp)) + "]" + (
                ",sp[" + ",".join(str(int(v)) for v in self.sp) + "]" if any(self.sp) else "")
        st = self.strategy
        return f"dp{st.dp},tp{st.tp},pp{st.pp}" + (",sp" if st.sp else "")

    def as_dict(self) -> dict:
        return {
            "strategy": self.text,
            "recompute": list(self.recompute),
            "tp": list(self.tp),
            "sp": list(self.sp),
            "pp": self.pp,
            "stages": list(self.stages),
            "predicted_step_s": self.time_s,
            "predicted_memory_bytes": self.memory_bytes,
            **{k: v for k, v in self.parts.items()},
        }


def _candidates(world: int, spec: H.ModelSpec, pipeline: bool) -> list[H.Strategy]:
    out = []
    for st in hotspa_profile.runnable(world, spec):
        for pp in [p for p in range(1, st.dp + 1) if st.dp % p == 0 and p <= spec.layers] if pipeline else [1]:
            for sp in (False, True) if st.tp > 1 else (False,):
                out.append(H.Strategy(st.dp // pp, st.tp, pp, sp=sp))
    return out


def _scale(spec: H.ModelSpec, rows: int, row_len: int, st: H.Strategy, option: str) -> float:
    """Korthikanti et al.'s bytes under st's tp and sp over those of one device (option's formula)."""
    plain = H.layer_activation_bytes(spec, rows, row_len, 1, False, option)
    return H.layer_activation_bytes(spec, rows, row_len, st.tp, st.sp, option) / plain


@dataclass
class _Costs:
    """One strategy's per-option costs of a block (module docstring): seconds per recompute option,
    the activation bytes one in-flight copy saves and the extra its backward adds, the model-state
    bytes of a block (the largest) and outside them, the bytes outside the blocks' activations, and
    the whole step's prediction without recompute."""

    replica_rows: int
    seconds: dict
    saved: dict
    extra: dict
    block_states: float
    per_block: list
    outside_params: int
    outside_bytes: float
    base: H.Prediction
    head_seconds: float


def _costs(prof, model: Module, st: H.Strategy, rows: int, row_len: int, lengths: Sequence[int], measured) -> _Costs:
    spec = prof.spec
    world = st.dp * st.tp * st.pp
    cl = hotspa_profile.cluster(prof, world)
    replica_rows = math.ceil(rows / st.dp)
    mem = measured(replica_rows)
    if (mem.tp, mem.sp) == (st.tp, st.sp):  # measured under this tp and sp: as measured
        scale, extra_scale = dict.fromkeys(RECOMPUTE, 1.0), 1.0
    else:  # measured on one device: Korthikanti et al.'s ratio (conservative for the outside bytes)
        scale = {c: _scale(spec, replica_rows, row_len, st, c) for c in RECOMPUTE}
        extra_scale = _scale(spec, replica_rows, row_len, st, "none")
    per_block, outside = _held(model, st.tp)
    flat = H.Strategy(st.dp, st.tp, st.pp)  # sp moves the same bytes: the profiled runs of tp price both
    return _Costs(
        replica_rows,
        {c: H.layer_time(spec, cl, replica_rows, row_len, st.tp, st.sp, c) for c in RECOMPUTE},
        {c: mem.saved[c] * scale[c] for c in RECOMPUTE},
        {c: mem.extra[c] * extra_scale for c in RECOMPUTE},
        STATE_BYTES * max(per_block),
        per_block,
        outside,
        STATE_BYTES * outside + mem.outside,
        H.predict(spec, cl, flat, lengths, row_len, micro_batches=st.pp),
        6.0 * replica_rows * row_len * spec.hidden * spec.vocab / st.tp / (cl.flops * cl.mfu),
    )


def _units(budget: float, resolution: int) -> float:
    return 1.0 if math.isinf(budget) else max(float(budget) / resolution, 1.0)


def _in_units(nbytes: float, unit: float, budget: float) -> int:
    """Bytes a layer needs in the budget's units, rounded up (0 without a budget)."""
    return 0 if math.isinf(budget) else math.ceil(nbytes / unit)


def plan_for(prof, model: Module, st: H.Strategy, rows: int, row_len: int, lengths: Sequence[int],
             budget: float, measured, resolution: int = 2048) -> LayerPlan | float:
    """The fastest `LayerPlan` under strategy `st` whose every stage fits `budget` bytes, or (when
    none fits) the least bytes per device it needs. `measured(rows)` gives `measure_layers` at this
    replica's rows."""
    layers = prof.spec.layers
    k = _costs(prof, model, st, rows, row_len, lengths, measured)
    m = st.pp  # HotSPa's pipelines run pp micro-batches; a stage keeps up to pp - s of them
    in_flight = [(st.pp - s) / m for s in range(st.pp)]
    stage_fixed = [k.outside_bytes] * st.pp  # conservative: every stage holds them all
    seconds = [[k.seconds[c] for c in RECOMPUTE] for _ in range(layers)]
    stage_seconds = [0.0] * (st.pp - 1) + [k.head_seconds]
    saved_b = [[k.block_states + k.saved[c] * f for c in RECOMPUTE] for f in in_flight]
    extra_b = [k.extra[c] / m for c in RECOMPUTE]
    unit = _units(budget, resolution)
    budgets = [0 if math.isinf(budget) else math.floor((budget - fixed) / unit) for fixed in stage_fixed]
    saved_u = [[[_in_units(b, unit, budget) for b in row] for _ in range(layers)] for row in saved_b]
    extra_u = [_in_units(b, unit, budget) for b in extra_b]
    if min(budgets) < 0:
        return _least(saved_b, extra_b, stage_fixed, layers)
    try:
        starts, picks, slowest = search_stages(seconds, saved_u, extra_u, budgets, stage_seconds)
    except H.HotSPaError:
        return _least(saved_b, extra_b, stage_fixed, layers)
    choices = [RECOMPUTE[c] for c in picks]
    # predicted bytes per stage (unrounded)
    ends = starts[1:] + [layers]
    stage_bytes = []
    for s, (i, j) in enumerate(zip(starts, ends)):
        opts = [RECOMPUTE.index(c) for c in choices[i:j]]
        stage_bytes.append(stage_fixed[s] + sum(saved_b[s][c] for c in opts) + sum(extra_b[c] for c in set(opts)))
    if st.pp == 1:
        time = k.base.time_s + sum(k.seconds[c] - k.seconds["none"] for c in choices)
    else:
        time = k.base.time_s - k.base.parts["pipeline"] + slowest * (m + st.pp - 1) / m
    worst = int(np.argmax(stage_bytes))
    activations = stage_bytes[worst] - STATE_BYTES * (k.outside_params + sum(k.per_block[starts[worst]:ends[worst]]))
    parts = {
        "predicted_stage_bytes": stage_bytes,
        "predicted_activation_bytes": activations,
        "predicted_state_bytes": stage_bytes[worst] - activations,
        "replica_rows": k.replica_rows,
        "row_len": row_len,
    }
    return LayerPlan(st, choices, starts, time, float(stage_bytes[worst]), parts)


def _least(saved_b, extra_b, stage_fixed, layers: int) -> float:
    """The least peak bytes per device any split and choice needs: per stage its fixed bytes and
    its layers under the one option that needs least (a second option only adds its extra); the
    split that makes the neediest stage least (min-max over the stages' lengths; the layers are alike)."""
    pp = len(stage_fixed)

    def need(s: int, n: int) -> float:
        return min(stage_fixed[s] + n * saved_b[s][c] + extra_b[c] for c in range(len(extra_b)))

    worst = [0.0] + [math.inf] * layers  # worst[j]: the least neediest stage over stages so far covering j layers
    for s in range(pp):
        new = [math.inf] * (layers + 1)
        for j in range(s + 1, layers - (pp - 1 - s) + 1):
            new[j] = min(max(worst[i], need(s, j - i)) for i in range(s, j))
        worst = new
    return worst[layers]


@dataclass
class MixedOptions:
    """The options of a mixed plan's blocks, one per (tp, sp, recompute) (`mixed_options`): per layer
    and option the seconds, per stage, layer and option the bytes (`stage_saved`; `saved` stage 0's),
    each option's extra bytes and group (its (tp, sp)), the transition seconds between options, over
    `pp` pipeline stages."""

    options: list  # (tp, sp, recompute)
    seconds: list
    saved: list
    extra: list
    groups: list
    transition: list
    costs: dict  # (tp, sp) -> _Costs
    pp: int = 1
    stage_saved: list = field(default_factory=list)

    def __post_init__(self):
        if not self.stage_saved:
            self.stage_saved = [self.saved]

    def charge(self, picks: Sequence[int]) -> float:
        return stage_charge(picks, self.extra, self.groups)


def mixed_options(prof, model: Module, world: int, rows: int, row_len: int, lengths: Sequence[int],
                  measured, pp: int = 1) -> MixedOptions:
    """Every block's options under per-block tensor parallelism over `world` ranks in `pp` pipeline
    stages of world / pp ranks: each tp of `hotspa_profile.runnable` dividing a stage's ranks (dp =
    (world / pp) / tp inside it), with sp where tp > 1, and each recompute option.
    `measured(rows, strategy)` gives `measure_layers` for that strategy's tp and sp at its replica's
    rows. The cost model (module docstring): without a pipeline a block under tp costs 1/layers of
    the uniform tp strategy's predicted step (its compute, TP collectives, share of the runs'
    overheads and the head, and of the gradients' all-reduce over its own dp group world / tp) plus
    its recompute; it holds the strategy's saved bytes and block states; the first block also what
    lies outside the blocks under its tp; consecutive blocks of different (tp, sp) pay
    `hotspa.transition_time`. With pp > 1 (HotSPa's runtime: pp micro-batches on the GPipe schedule,
    every one in flight on every stage) a block costs its `hotspa.layer_time` over the replica's rows
    times the bubble (m + pp - 1) / m, plus pp/layers of the uniform (dp, tp, pp) step's parts
    outside the pipeline (its stage's share of the gradients' all-reduce and the update), the last
    block also the head; transitions (between the blocks of a stage) are priced inside a stage's
    group and times the bubble; every block holds its saved bytes of all micro-batches and each
    option's extra once per micro-batch's share; the first and the last block (the first and the
    last stage) each hold the bytes outside the blocks."""
    spec = prof.spec
    layers = spec.layers
    group = world // pp
    cl = hotspa_profile.cluster(prof, group)
    options, groups, costs = [], [], {}
    for st in _candidates(world, spec, pp > 1):
        if st.pp != pp:
            continue
        key = (st.tp, st.sp)
        costs[key] = _costs(prof, model, st, rows, row_len, lengths, lambda r, st=st: measured(r, st))
        for c in RECOMPUTE:
            options.append((st.tp, st.sp, c))
            groups.append(len(costs) - 1)
    if pp == 1:
        seconds = [[costs[(t, v)].base.time_s / layers + costs[(t, v)].seconds[c] - costs[(t, v)].seconds["none"]
                    for t, v, c in options] for _ in range(layers)]
        saved = [[costs[(t, v)].block_states + costs[(t, v)].saved[c]
                  + (costs[(t, v)].outside_bytes if i == 0 else 0.0) for t, v, c in options] for i in range(layers)]
        extra = [costs[(t, v)].extra[c] for t, v, c in options]
        transition = [[H.transition_time(spec, cl, rows, row_len, a[:2], b[:2]) for b in options] for a in options]
        return MixedOptions(options, seconds, saved, extra, groups, transition, costs)
    m = pp  # HotSPa's pipelines run pp micro-batches
    bubble = (m + pp - 1) / m
    seconds = []
    for i in range(layers):
        row = []
        for t, v, c in options:
            k = costs[(t, v)]
            outside = k.base.time_s - k.base.parts["pipeline"]
            row.append(bubble * (k.seconds[c] + (k.head_seconds if i == layers - 1 else 0.0)) + pp * outside / layers)
        seconds.append(row)
    ends = (0, layers - 1)
    saved = [[costs[(t, v)].block_states + costs[(t, v)].saved[c]
              + (costs[(t, v)].outside_bytes if i in ends else 0.0) for t, v, c in options] for i in range(layers)]
    extra = [costs[(t, v)].extra[c] / m for t, v, c in options]
    transition = [[bubble * H.transition_time(spec, cl, rows, row_len, a[:2], b[:2]) for b in options]
                  for a in options]
    return MixedOptions(options, seconds, saved, extra, groups, transition, costs, pp, [saved] * pp)


def mixed_plan_for(prof, model: Module, world: int, rows: int, row_len: int, lengths: Sequence[int],
                   budget: float, measured, resolution: int = 2048, pp: int = 1) -> LayerPlan | float:
    """The fastest per-block (tp, sp, recompute) plan over `world` ranks in `pp` pipeline stages
    (`mixed_options`' costs) whose every stage's peak fits `budget` bytes: Σ of its blocks' bytes
    plus its largest segment charge; the stages' split and the blocks' options one exact program
    (`search_stages`; the slowest stage's time); or (when none fits) the least bytes it needs. A plan
    whose blocks share one (tp, sp) comes back as that uniform strategy's."""
    mo = mixed_options(prof, model, world, rows, row_len, lengths, measured, pp)
    unit = _units(budget, resolution)
    units = 0 if math.isinf(budget) else math.floor(budget / unit)
    saved_u = [[[_in_units(b, unit, budget) for b in row] for row in stage] for stage in mo.stage_saved]
    extra_u = [_in_units(b, unit, budget) for b in mo.extra]
    try:
        starts, picks, time = search_stages(mo.seconds, saved_u, extra_u, [units] * pp, None, mo.groups,
                                            mo.transition)
    except H.HotSPaError:
        return _least_mixed(mo)
    ends = starts[1:] + [len(picks)]
    stage_bytes = [sum(mo.stage_saved[s][i][picks[i]] for i in range(a, b)) + mo.charge(picks[a:b])
                   for s, (a, b) in enumerate(zip(starts, ends))]
    worst = int(np.argmax(stage_bytes))
    memory = stage_bytes[worst]
    tp = [mo.options[c][0] for c in picks]
    sp = [mo.options[c][1] for c in picks]
    a, b = starts[worst], ends[worst]
    outside = [i for i in (0, len(picks) - 1) if a <= i < b][:1 if pp == 1 else 2]
    states = sum(STATE_BYTES * mo.costs[(tp[i], sp[i])].outside_params for i in outside) + sum(
        STATE_BYTES * max(_held(model, t)[0]) for t in tp[a:b])
    moves = sum(mo.transition[x][y] for s, (i, j) in enumerate(zip(starts, ends))
                for x, y in zip(picks[i:j], picks[i + 1:j]))
    parts = {
        "predicted_stage_bytes": stage_bytes,
        "predicted_activation_bytes": memory - states,
        "predicted_state_bytes": states,
        "predicted_transition_s": moves,
        "replica_rows": [mo.costs[(t, v)].replica_rows for t, v in zip(tp, sp)],
        "row_len": row_len,
    }
    strategy = None
    if len(set(zip(tp, sp))) == 1:
        strategy = H.Strategy(world // (pp * tp[0]), tp[0], pp, sp=sp[0])
    return LayerPlan(strategy, [mo.options[c][2] for c in picks], starts, time, float(memory), parts, tp, sp,
                     pp)


def _least_mixed(mo: MixedOptions) -> float:
    """The least peak bytes any split into `mo.pp` stages and per-block choice needs: per stage and
    first block, for each cap on a segment's charge, the least Σ bytes of the blocks whose segments
    keep under it (the stage program with bytes for seconds) plus the cap; then the split whose
    neediest stage needs least (min-max over the stages' first blocks)."""
    layers, pp = len(mo.seconds), mo.pp
    zeros = [[0] * len(mo.options) for _ in range(layers)]
    no_moves = [[0.0] * len(mo.options) for _ in mo.options]
    need = {}  # (stage, first, end) -> least bytes
    for s in range(pp):
        for i in range(s, layers - (pp - 1 - s)):
            for cap in _charges(mo.extra, mo.groups):
                _, bests, _ = _capped(mo.stage_saved[s], zeros, mo.extra, mo.groups, no_moves, 0, i, cap)
                for j, best in enumerate(bests):
                    key = (s, i, i + j + 1)
                    need[key] = min(need.get(key, math.inf), cap + float(best.min()))
    worst = [0.0] + [math.inf] * layers  # worst[j]: the least neediest stage of the stages so far over j blocks
    for s in range(pp):
        new = [math.inf] * (layers + 1)
        for j in range(s + 1, layers - (pp - 1 - s) + 1):
            new[j] = min((max(worst[i], need.get((s, i, j), math.inf)) for i in range(s, j)), default=math.inf)
        worst = new
    return worst[layers]


def search_plan(prof, model: Module, world: int, rows: int, row_len: int, lengths: Sequence[int],
                budget: float = math.inf, pipeline: bool = False, resolution: int = 2048,
                measured=None, mixed_tp: bool = False) -> tuple[LayerPlan, list]:
    """The fastest `LayerPlan` over `world` ranks for batches packed into `rows` rows of `row_len`
    tokens (sequences of `lengths`) within `budget` bytes per device; also, per candidate,
    (strategy, its plan or else its least need in bytes, {"free_bytes": its peak without
    recompute, "least_bytes": the least it needs, and for a per-block row "pp": its stages}).
    `pipeline`: pp > 1 candidates too. `mixed_tp`: also the per-block (tp, sp, recompute) search
    (`mixed_plan_for`; its rows' strategy None), with `pipeline` also inside the stages of every pp
    > 1 dividing the world, whose plan wins only where its blocks differ in (tp, sp) and it is
    faster. Raises HotSPaError naming each candidate's least need when none fits."""
    spec = prof.spec
    cache: dict[tuple, LayerMemory] = {}
    # under this job's ranks each candidate's tp (and sp) plans are measured as they will run
    distributed = env.is_distributed() and env.world_size() == world

    def measure(r: int, st: H.Strategy) -> LayerMemory:
        if measured is not None:
            return measured(r)
        tp = st.tp if distributed else 1
        key = (r, tp, st.sp and tp > 1)
        if key not in cache:
            mesh = DeviceMesh(dp=world // tp, tp=tp, world_size=world, rank=env.rank()) if tp > 1 else None
            cache[key] = measure_layers(model, r, row_len, mesh, key[2])
        return cache[key]

    table = []
    searches = [(st, None, lambda memory, st=st: plan_for(prof, model, st, rows, row_len, lengths, memory,
                                                          lambda r: measure(r, st), resolution))
                for st in _candidates(world, spec, pipeline)]
    if mixed_tp:  # per-block (tp, sp, recompute), without a pipeline and (`pipeline`) inside each pp's stages
        for pp in [1] + ([p for p in range(2, min(world, spec.layers) + 1) if world % p == 0] if pipeline else []):
            searches.append((None, pp, lambda memory, pp=pp: mixed_plan_for(
                prof, model, world, rows, row_len, lengths, memory, measure, resolution, pp)))
    for st, pp, plan in searches:
        chosen = plan(budget)
        needs = {"free_bytes": plan(math.inf).memory_bytes, "least_bytes": plan(1.0)}  # without recompute, at least
        if pp is not None:
            needs["pp"] = pp
        table.append((st, chosen, needs))
    fitting = [p for st, p, _ in table if isinstance(p, LayerPlan) and (st is not None or p.mixed)]
    if not fitting:
        def label(st, needs) -> str:
            return str(st) if st is not None else "mixed tp" + (f" pp{needs['pp']}" if needs["pp"] > 1 else "")

        needs = ", ".join(f"{label(st, n)} {need / 2**20:.2f} MiB" for st, need, n in table)
        least = min(need for _, need, _ in table)
        raise H.HotSPaError(
            f"--parallel auto: no strategy over {world} ranks holds {rows} rows of {row_len} tokens in "
            f"{budget / 2**20:.2f} MiB per device per the layer-wise cost model, even with recompute; the least "
            f"memory needed is {least / 2**20:.2f} MiB ({needs}; the search rounds each layer's bytes up to "
            f"1/{resolution} of the budget, so allow about {100 * (spec.layers + 3) / resolution:.1f}% more)"
        )
    return min(fitting, key=lambda p: p.time_s), table


def pipeline_stages(model: Module, st: H.Strategy, row_len: int, lengths: Sequence[int] | None = None,
                    prof=None) -> list[str]:
    """The module name of each stage's first layer for pipeline strategy `st` (HotSPa's `stages`):
    the split that minimises the slowest stage's predicted time (the last stage runs the head too),
    one row of `row_len` tokens per micro-batch. `prof`: a profile's rates (default: FLOP-
    proportional times, which is what the split's balance depends on)."""
    spec = H.model_spec(model)
    if spec is None:
        raise H.HotSPaError(f"pipeline_stages: {type(model).__name__} is not a zoo language model")
    prof = prof or hotspa_profile.Profile(spec, flops=1e12)
    rows = st.dp * st.pp
    zero = LayerMemory(rows, row_len, dict.fromkeys(RECOMPUTE, 0), dict.fromkeys(RECOMPUTE, 0), 0)
    plan = plan_for(prof, model, st, rows, row_len, list(lengths or [row_len] * rows), math.inf, lambda r: zero)
    prefix, _ = _layers(model)
    return [f"{prefix}.{i}" for i in plan.stages]


def apply_plan(model: Module, choices: Sequence[str]) -> Module:
    """Marks block l of `model` for recompute as `choices[l]` says ("none", "selective": its
    attention, "full": the block), clearing any mark it had; returns `model`."""
    _, blocks = _layers(model)
    if len(choices) != len(blocks):
        raise H.HotSPaError(f"apply_plan: {len(blocks)} blocks need as many recompute choices, found {len(choices)}")
    for block, choice in zip(blocks, choices):
        if choice not in RECOMPUTE:
            raise H.HotSPaError(f"apply_plan: recompute choice must be one of {RECOMPUTE}, found {choice!r}")
        recompute(block, "full", enabled=False)
        recompute(block, "attention", enabled=False)
        if choice != "none":
            recompute(block, _SCOPE[choice])
    return model


__all__ = [
    "RECOMPUTE",
    "LayerMemory",
    "LayerPlan",
    "MixedOptions",
    "apply_plan",
    "brute_force_stages",
    "measure_layers",
    "mixed_options",
    "mixed_plan_for",
    "pipeline_stages",
    "plan_for",
    "search_plan",
    "search_stages",
    "stage_charge",
]
