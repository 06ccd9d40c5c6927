"""Per-block tensor parallelism inside one strategy (Galvatron's layer-wise hybrid strategies).

A mixed strategy (`hotspa.Strategy.layer_tp`, strings like "tp[4,4,2,1]") runs block l of the
model under tensor parallelism tp[l] over dp = world / tp[l] replicas, all on the same ranks.
A *segment* is a maximal run of consecutive blocks with equal (tp, sp); the embedding goes with
the first segment, the final norm, head and loss with the last. Rank layout per segment as
everywhere (tp inner): rank r is replica r // tp, member r % tp of that replica's TP group.

- The model's loss is traced once (HotSPa's graph, with each segment's first block marked) and
  the pipeline partition pass cuts it into one co-located stage per segment
  (`compiler.pipeline.partition(..., colocated=True)`), each localised for this rank's position
  in its segment's TP group (its own entry of `Tensor.ds`, appended after HotSPa's strategies)
  and split into a forward and a backward plan (`runtime.pipeline.StageRunner`).
- A step's B packed rows, counted up to B' (a multiple of lcm(dp)), are cut into contiguous
  blocks: replica j of segment k owns rows [j·B'/d_k, (j+1)·B'/d_k) and runs those below B (the
  rows past B exist only as zeros in the plans' boxes; a replica with none skips its segment:
  no compute on padding, at most one row less than an even share). A tensor that
  crosses from segment a to segment b (the hidden state) moves between the two row layouts by
  the hot-switch planner (`rebatch_plan`: rows split over the replicas, duplicated over each TP
  group; a rank that holds a slice itself copies it locally, senders on the receiver's node and
  least loaded first, one message per pair, one batch of isend/irecv per boundary crossing); its
  gradient comes back by the reverse plan. What reads only the feeds (the packed rows' attention
  mask) is recomputed in each segment from its own rows' feeds.
- A parameter lives in the layout of the first segment that reads it (its *home*); another
  segment that reads it (GPT-2's tied table under the head) gets its value there by the planner
  before the step's forwards and sends its gradient back. Each segment's gradients are summed
  over that segment's DP group; since every row's gradient reaches exactly one replica of each
  segment and the loss is the sum of the rows' cross entropies over the step's target tokens,
  the sums are the one-process gradients of the batch's mean loss (no per-segment rescaling).

Each rank runs every segment in turn (forwards in order, backwards in reverse), so a mixed
strategy overlaps nothing between segments; the comm it adds per boundary is the re-batch (0
bytes where the next segment's replicas are sub-blocks of this one's held on the same rank),
and an all-gather where a sequence-parallel segment hands its activation on (boundaries cross
whole per TP group).

With a pipeline ("pp2,tp[2,1,1,2]": `Strategy.pp` > 1) the blocks are cut into pp stages (the
first block of each: `pipeline.stage_starts`, HotSPa's `stages`), stage s on the world / pp ranks
s·world/pp.. of its group; a segment is a maximal run of equal (tp, sp) inside one stage, its dp
= (world / pp) / tp replicas of that group (`Segment.stage`, `first_rank`). A rank runs only its
stage's segments, every one in turn per micro-batch, on the existing schedules
(`runtime.pipeline.schedule`, GPipe: every forward, then every backward, so the blocking
re-batches between stages always meet their peer's in the same order); the step's rows are cut
into min(pp, rows) contiguous micro-batches, each padded and split over every segment's
replicas as above. A tensor that crosses from one stage to a later one moves by the same
planner from the sender's row layout to the receiver's (the layouts name their stage's ranks:
one batch of isend/irecv per pair of stages and micro-batch), its gradient back by the reverse
plan; a parameter read on two stages (GPT-2's tied table) goes from its home stage's layout to
the other's and its gradient back, as between segments. Each micro-batch's gradients accumulate
per segment before the segment's DP sum (inside its stage's group); the stages hold only their
own parameters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist

from luoshu.compiler import states
from luoshu.compiler.pipeline import partition
from luoshu.distributed import env
from luoshu.distributed.mesh import DeviceMesh
from luoshu.parallel import hot_switch as hs
from luoshu.parallel.hotspa import HotSPaError, mixed_strategy, row_layout
from luoshu.parallel.hotspa import Strategy as CostStrategy
from luoshu.runtime.pipeline import StageRunner, schedule

FEEDS = ("ids", "positions", "segment_ids", "labels")


@dataclass
class Segment:
    """Blocks [first, stop) under `tp` (and `sp`) over dp replicas of pipeline stage `stage`, whose
    group is the dp·tp ranks first_rank.. (every rank, first_rank 0, without a pipeline)."""

    first: int
    stop: int
    tp: int
    sp: bool
    dp: int
    stage: int = 0
    first_rank: int = 0

    def rows(self, total: int, replica: int) -> slice:
        """The rows replica `replica` owns of `total` (a multiple of dp)."""
        per = total // self.dp
        return slice(replica * per, (replica + 1) * per)


def segments(st: CostStrategy, world: int, blocks: int, starts: Sequence[int] | None = None) -> list[Segment]:
    """The segments of mixed strategy `st` over `world` ranks and a model of `blocks` blocks; with a
    pipeline (st.pp > 1) `starts` is each stage's first block (default: equal counts)."""
    if not st.mixed:
        raise HotSPaError(f"mixed tp: strategy {st} has no per-block tp")
    if len(st.layer_tp) != blocks:
        raise HotSPaError(
            f"mixed tp: strategy {st} names {len(st.layer_tp)} blocks, but the model has {blocks} transformer blocks"
        )
    pp = st.pp
    if world % pp:
        raise HotSPaError(f"mixed tp: strategy {st}: pp {pp} does not divide the world of {world} ranks")
    group = world // pp
    for b, t in enumerate(st.layer_tp):
        if group % t and pp == 1:
            raise HotSPaError(f"mixed tp: strategy {st}: tp {t} does not divide the world of {world} ranks")
        if group % t:
            raise HotSPaError(f"mixed tp: strategy {st}: tp {t} of block {b} does not divide the {group} ranks of a "
                              f"pipeline stage (world {world} / pp {pp})")
    starts = list(starts) if starts is not None else [blocks * s // pp for s in range(pp)]
    if len(starts) != pp or starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] >= blocks:
        raise HotSPaError(f"mixed tp: strategy {st}: stage starts {starts} must be {pp} increasing first blocks "
                          f"from 0 of the {blocks} blocks")
    out: list[Segment] = []
    for b, (t, sp) in enumerate(zip(st.layer_tp, st.layer_sp)):
        stage = sum(1 for a in starts[1:] if a <= b)
        if out and (out[-1].tp, out[-1].sp, out[-1].stage) == (t, sp, stage):
            out[-1].stop = b + 1
        else:
            out.append(Segment(b, b + 1, t, sp, group // t, stage, stage * group))
    return out


def rebatch_plan(shape: Sequence[int], itemsize: int, source: Segment, dest: Segment, node_size: int,
                 load: dict | None = None) -> hs.SwitchPlan:
    """The hot-switch plan that moves a (rows, ...) tensor of `shape` from `source`'s replicas'
    rows to `dest`'s (a local slice where a rank already holds its rows; point-to-point between
    pipeline stages' groups)."""
    return hs.plan_hot_switch(shape, itemsize, row_layout(source.dp, source.tp, source.first_rank),
                              row_layout(dest.dp, dest.tp, dest.first_rank), node_size=node_size, load=load)


class MixedTP:
    """One mixed strategy of a `HotSPa` job on this rank: its stage's segments' programs, each
    parameter's home layout, and `grads` (one step's forwards and backwards over the micro-batches).

    Built by HotSPa: `traced` = (graph, feeds, loss) of the model's loss with the segments'
    first blocks at `starts`; `ds_index[s]` the entry of `Tensor.ds` holding segment s's states,
    `strategies[s]` its states.Strategy (None where tp = 1); `world_layout(ds, mesh, stages)`
    HotSPa's parameter layout over the ranks of a mesh's pipeline `stages`."""

    def __init__(self, hot, st: CostStrategy, segs: list[Segment], traced, starts: list[int], ds_index: list[int],
                 strategies: list, seg_values: list[list[torch.Tensor]], world_layout):
        self.st, self.segs, self.hot = st, segs, hot
        graph, self.feeds, loss = traced
        self.graph = graph  # the traced loss (its recompute regions: the blocks marked)
        params, rank, world = hot.params, hot.rank, hot.world
        self.pp = st.pp
        self.stage = rank // (world // self.pp)
        self.meshes = [DeviceMesh(dp=s.dp, tp=s.tp, pp=self.pp, world_size=world, rank=rank) for s in segs]
        self.mine = [s for s, seg in enumerate(segs) if seg.stage == self.stage]  # this rank's stage's segments
        self.programs: list = [None] * len(segs)
        self.runners: list = [None] * len(segs)
        for k in self.mine:
            for p, v in zip(params, seg_values[k]):
                p._value = v
            self.programs[k] = program = partition(graph, loss, starts, k, [], rank, params, strategies[k],
                                                   colocated=True)
            self.runners[k] = StageRunner(program)
        ids = {id(p): k for k, p in enumerate(params)}
        self.param_index = [None if program is None else [ids[id(p)] for p in program.params]
                            for program in self.programs]
        # which segments read each parameter: this stage's from its programs, the others' by one all-reduce
        used = torch.zeros((len(segs), len(params)), dtype=torch.int64)
        for s in self.mine:
            used[s, self.param_index[s]] = 1
        if self.pp > 1 and env.is_distributed():
            torch_dist.all_reduce(used, op=torch_dist.ReduceOp.MAX)
        readers = [[s for s in range(len(segs)) if used[s, k]] for k in range(len(params))]
        for k, r in enumerate(readers):
            if not r:
                raise HotSPaError(f"mixed tp: strategy {st}: no segment reads parameter {params[k].name}")
        self.readers = readers
        self.home = [r[0] for r in readers]
        self.layouts = [[world_layout(p.ds[ds_index[s]], self.meshes[s], (segs[s].stage,)) for p in params]
                        for s in range(len(segs))]
        self.home_layouts = [self.layouts[self.home[k]][k] for k in range(len(params))]
        self.home_values = [seg_values[self.home[k]][k] for k in range(len(params))]
        self.home_ds = [params[k].ds[ds_index[self.home[k]]] for k in range(len(params))]
        # parameters several segments read: their value there from home, their gradient back
        self._away = [(k, s) for k, r in enumerate(readers) for s in r[1:]]
        itemsize = params[0]._value.element_size()
        load: dict = {}
        self._to_away = [hs.plan_hot_switch(tuple(params[k].shape), itemsize, self.home_layouts[k],
                                            self.layouts[s][k], node_size=hot.node_size, load=load)
                         for k, s in self._away]
        load = {}
        self._back_home = [hs.plan_hot_switch(tuple(params[k].shape), itemsize, self.layouts[s][k],
                                              self.home_layouts[k], node_size=hot.node_size, load=load)
                           for k, s in self._away]
        # the boundaries (every rank's programs list all of them alike) and the groups moved as one batch:
        # per segment those from its own stage, per pair of stages those between them
        self.cuts = self.programs[self.mine[0]].boundaries
        stage_of = [seg.stage for seg in segs]
        self._within = {d: [c for c in self.cuts if c.dest == d and stage_of[c.source] == stage_of[d]]
                        for d in range(len(segs))}
        self._between = {(a, b): [c for c in self.cuts if stage_of[c.source] == a and stage_of[c.dest] == b]
                         for a in range(self.pp) for b in range(a + 1, self.pp)}
        self._rebatch: dict = {}
        for s in self.mine:
            if self.meshes[s].dp > 1 and env.is_distributed():
                self.meshes[s].process_group("dp")
        self.rebatch_bytes = self.rebatch_messages = 0  # the last step's, over all ranks
        self.micro_batches = 0  # the last step's

    # --- one step ------------------------------------------------------------------------------------
    def _plans(self, group: list, backward: bool, rows: int, row_len: int, itemsize: int) -> list[hs.SwitchPlan]:
        """The re-batch plans of the boundaries `group` (one batch) for `rows` rows, from each source
        segment's layout to its destination's (reverse: `backward`); alike on every rank."""
        key = (tuple(c.tag for c in group), backward, rows, row_len, itemsize)
        if key not in self._rebatch:
            out, load = [], {}
            for c in group:
                a, b = (c.dest, c.source) if backward else (c.source, c.dest)
                shape = [d if d is not None else row_len for d in c.tensor.shape]
                shape[0] = rows
                out.append(rebatch_plan(tuple(shape), itemsize, self.segs[a], self.segs[b], self.hot.node_size, load))
            self._rebatch[key] = out
        return self._rebatch[key]

    def _move(self, group: list, values: list, backward: bool, rows: int, row_len: int, dtype) -> list:
        """The boundaries `group` moved from this rank's boxes `values` in the sources' layouts (None
        where it holds none) to its boxes in the destinations' (None where it needs none)."""
        if not group:
            return []
        plans = self._plans(group, backward, rows, row_len, torch.empty((), dtype=dtype).element_size())
        if not env.is_distributed():
            return list(values)
        return hs.run_switches(plans, values, self.hot.rank, dtype=dtype)

    def _mine(self, s: int, n: int, total: int) -> slice:
        """The real rows (of `n`; the rest up to `total` are the plans' padding) this rank's replica
        of segment s runs."""
        block = self.segs[s].rows(total, self.meshes[s].index("dp"))
        return slice(min(block.start, n), min(block.stop, n))

    @staticmethod
    def _padded(v: torch.Tensor, rows: int) -> torch.Tensor:
        """`v` with zero rows appended up to `rows` (its box in a row layout; the rows no replica runs)."""
        if v.shape[0] == rows:
            return v
        return torch.cat([v, v.new_zeros((rows - v.shape[0], *v.shape[1:]))])

    def grads(self, rows, scale: float, touched: dict) -> tuple[float, list]:
        """(this rank's loss share, each parameter's gradient in its home layout, summed over the
        micro-batches and the replicas of every segment that reads it; None where this rank holds
        none of it) for the step's packed `rows` (all of them).

        Each micro-batch's row layouts split a multiple of lcm(dp) rows; the rows past the real ones
        exist only in the plans (sent as zeros), no replica runs them: a replica left without real
        rows skips its segment's plans (its gradients are zeros)."""
        hot, params = self.hot, self.hot.params
        n = rows.num_rows
        m = self.micro_batches = max(1, min(self.pp, n))
        step = math.lcm(*(s.dp for s in self.segs))
        micro = []  # per micro-batch: (first row, real rows, rows padded to a multiple of every dp)
        for j in range(m):
            a, b = n * j // m, n * (j + 1) // m
            micro.append((a, b - a, (b - a) + (-(b - a) % step)))
        arrays = dict(zip(FEEDS, (rows.tokens, rows.positions, rows.segment_ids, rows.labels)))
        row_len = rows.tokens.shape[1]
        dtype = self.home_values[0].dtype
        scale_t = torch.tensor(scale, dtype=dtype)
        home = [p._value for p in params]
        away = hs.run_switches(self._to_away, [home[k] for k, _ in self._away], hot.rank, dtype=dtype) \
            if self._away and env.is_distributed() else [home[k] for k, _ in self._away]
        values_at = [dict() for _ in self.segs]  # segment -> {k: value in its layout} of parameters away
        for (k, s), v in zip(self._away, away):
            values_at[s][k] = v

        def select(s: int) -> None:
            for k in self.param_index[s]:
                params[k]._value = values_at[s].get(k, home[k])

        def box(c, s: int, total: int) -> torch.Tensor:
            """Zeros of boundary c's box under segment s (rows, then the row length for a run-time dim)."""
            shape = [d if d is not None else row_len for d in c.tensor.shape]
            shape[0] = total // self.segs[s].dp
            return torch.zeros(shape, dtype=dtype)

        def move(group, values, backward, total):
            return self._move(group, values, backward, total, row_len, dtype)

        here, pp = self.stage, self.pp
        boxes: dict[tuple[int, int], torch.Tensor] = {}  # (micro-batch, tag) -> this rank's box of a boundary
        feeds_of: dict[tuple[int, int], dict | None] = {}
        accum: dict[int, dict[int, torch.Tensor]] = {s: {} for s in self.mine}
        loss = 0.0

        def forward(j: int) -> None:
            nonlocal loss
            first, n_j, total = micro[j]
            for a in reversed(range(here)):  # from earlier stages, the nearest first
                group = self._between[(a, here)]
                for c, v in zip(group, move(group, [None] * len(group), False, total)):
                    boxes[(j, c.tag)] = v  # in the destination's layout already
            for s in self.mine:
                program = self.programs[s]
                within = self._within[s]
                for c, v in zip(within, move(within, [boxes.pop((j, c.tag)) for c in within], False, total)):
                    boxes[(j, c.tag)] = v
                incoming = [c for c in self.cuts if c.dest == s]
                arrived = [boxes.pop((j, c.tag)) for c in incoming]
                mine = self._mine(s, n_j, total)
                count = mine.stop - mine.start
                if count == 0:  # no real rows here: nothing to run (the boxes still move)
                    for c, _ in program.outputs:
                        boxes[(j, c.tag)] = box(c, s, total)
                    feeds_of[(j, s)] = None
                    continue
                rows_j = slice(first + mine.start, first + mine.stop)
                feeds = {name: torch.from_numpy(np.ascontiguousarray(arrays[name][rows_j])) for name in FEEDS}
                feeds["scale"] = scale_t
                feeds.update((f"boundary{c.tag}", v[:count]) for c, v in zip(incoming, arrived))
                select(s)
                out = self.runners[s].forward(j, feeds)
                if out is not None and self.meshes[s].index("tp") == 0:
                    loss += float(out)
                per = total // self.segs[s].dp
                for (c, _), v in zip(program.outputs, self.runners[s].outputs):
                    boxes[(j, c.tag)] = self._padded(v, per)
                feeds_of[(j, s)] = feeds
            for b in range(here + 1, pp):  # to later stages, the nearest first
                group = self._between[(here, b)]
                move(group, [boxes.pop((j, c.tag)) for c in group], False, total)

        def backward(j: int) -> None:
            _, _, total = micro[j]
            seeds: dict[int, torch.Tensor] = {}  # tag -> the gradient's box in its source's layout
            for b in range(here + 1, pp):  # the gradients of what went to later stages, the nearest first
                group = self._between[(here, b)]
                seeds.update((c.tag, v) for c, v in zip(group, move(group, [None] * len(group), True, total)))
            back: dict[int, torch.Tensor] = {}  # tag -> an input's gradient box in its destination's layout
            for s in reversed(self.mine):
                program, feeds = self.programs[s], feeds_of.pop((j, s))
                if feeds is None:  # no real rows: zero gradients, zero boxes back
                    for c, _ in program.outputs:
                        seeds.pop(c.tag)
                    back.update((c.tag, box(c, s, total)) for c, _ in program.input_grads)
                else:
                    count = feeds["ids"].shape[0]
                    feeds.update((f"boundary{c.tag}.grad", seeds.pop(c.tag)[:count]) for c, _ in program.outputs)
                    select(s)
                    values = self.runners[s].backward(j, feeds)
                    acc, pos = accum[s], 0
                    for k, sparse in zip(self.param_index[s], program.sparse):
                        if sparse:
                            g = hot._rows_block(self.layouts[s][k], k, values[pos], values[pos + 1], dtype, touched)
                            pos += 2
                        else:
                            g = values[pos]
                            pos += 1
                        acc[k] = g if k not in acc else acc[k] + g
                    per = total // self.segs[s].dp
                    back.update((c.tag, self._padded(v, per)) for (c, _), v in zip(program.input_grads, values[pos:]))
                within = self._within[s]
                seeds.update((c.tag, v) for c, v in zip(within, move(within, [back.pop(c.tag) for c in within],
                                                                        True, total)))
            for a in reversed(range(here)):  # to earlier stages, the nearest first
                group = self._between[(a, here)]
                move(group, [back.pop(c.tag) for c in group], True, total)

        try:
            for s in self.mine:
                self.runners[s].reset()
            for kind, j in schedule("gpipe", here, pp, m):
                (forward if kind == "F" else backward)(j)
        finally:
            for p, v in zip(params, home):
                p._value = v
        # one step's re-batches over all ranks (every rank plans every batch alike)
        self.rebatch_bytes = self.rebatch_messages = 0
        itemsize = torch.empty((), dtype=dtype).element_size()
        groups = [g for g in [*self._within.values(), *self._between.values()] if g]
        for _, _, total in micro:
            for group in groups:
                for backward_ in (False, True):
                    for plan in self._plans(group, backward_, total, row_len, itemsize):
                        self.rebatch_bytes += plan.total_bytes
                        self.rebatch_messages += len(plan.messages)
        out: list = [None] * len(params)
        returning = {}
        for s in reversed(self.mine):
            index = self.param_index[s]
            grads = [accum[s].get(k) if k in accum[s] else torch.zeros_like(values_at[s].get(k, home[k]))
                     for k in index]
            summed = hot._all_reduce_flat(grads, self.meshes[s])
            for k, g in zip(index, summed):
                if s == self.home[k]:
                    out[k] = g
                else:
                    returning[(k, s)] = g
        if self._away:
            locals_ = [returning.get(ks) for ks in self._away]
            moved = hs.run_switches(self._back_home, locals_, hot.rank, dtype=dtype) \
                if env.is_distributed() else locals_
            for (k, _), g in zip(self._away, moved):
                if g is not None:
                    out[k] = out[k] + g
        return loss, out

    def traffic(self) -> dict:
        """Per boundary (tag): (bytes, messages) of one step's re-batch forward, planned for the last
        rows planned (all ranks; the gradients back move as many)."""
        out = {}
        for (tags, backward, _, _, _), plans in self._rebatch.items():
            if not backward:
                for tag, plan in zip(tags, plans):
                    out[tag] = (plan.total_bytes, len(plan.messages))
        return out


def plan_text(strategy: CostStrategy | None, recompute: Sequence[str], layer_tp: Sequence[int] | None = None,
              layer_sp: Sequence[bool] | None = None, pp: int = 1) -> str:
    """The HotSPa strategy string of a layer-wise plan (`luoshu train --parallel auto`): where the
    plan gives one tp (and sp flag) per block that is not the same for every block, or its
    strategy is per-block, the per-block strategy with each block's `recompute`
    ("tp[4,2,1,2],sp[..],rc[..]"; sp default: the strategy's flag on every block with tp > 1);
    else the strategy's plain text ("dp2,tp2,pp1,sp"; the blocks are marked for recompute apart).
    `strategy` None: the per-block search's mixed plan (`layerwise.LayerPlan.mixed`) over `pp`
    pipeline stages ("pp2,tp[2,1,1,2]")."""
    if strategy is None:
        return str(mixed_strategy(layer_tp, layer_sp, recompute, pp))
    if strategy.mixed and layer_tp is None:
        layer_tp, layer_sp = strategy.layer_tp, strategy.layer_sp
    if layer_tp is not None:
        layer_sp = tuple(layer_sp) if layer_sp is not None else tuple(strategy.sp and t > 1 for t in layer_tp)
        if strategy.mixed or len(set(zip(layer_tp, layer_sp))) > 1:
            return str(mixed_strategy(layer_tp, layer_sp, recompute, strategy.pp if strategy.mixed else 1))
    return f"dp{strategy.dp},tp{strategy.tp},pp{strategy.pp}" + (",sp" if strategy.sp else "")


def segment_strategy(strategy: states.Strategy, index: int, tp: int) -> states.Strategy | None:
    """A segment's states.Strategy (its entry `index` of Tensor.ds), None under tp = 1 (the
    segment's graph runs as it is, on the full values)."""
    return None if tp == 1 else dataclasses.replace(strategy, dp_group=(), strategy=index)


__all__ = ["MixedTP", "Segment", "plan_text", "rebatch_plan", "row_layout", "segments"]
