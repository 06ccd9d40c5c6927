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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from luoshu.compiler import states
from luoshu.compiler.pipeline import partition
from luoshu.distributed import env
from luoshu.distributed.mesh import DeviceMesh
from luoshu.parallel import hot_switch as hs
from luoshu.parallel.hotspa import HotSPaError, mixed_strategy, row_layout
from luoshu.parallel.hotspa import Strategy as CostStrategy
from luoshu.runtime.pipeline import StageRunner

FEEDS = ("ids", "positions", "segment_ids", "labels")


@dataclass
class Segment:
    """Blocks [first, stop) under `tp` (and `sp`) over dp = world / tp replicas."""

    first: int
    stop: int
    tp: int
    sp: bool
    dp: int

    def rows(self, total: int, replica: int) -> slice:
        """The rows replica `replica` owns of `total` (a multiple of dp)."""
        per = total // self.dp
        return slice(replica * per, (replica + 1) * per)


def segments(st: CostStrategy, world: int, blocks: int) -> list[Segment]:
    """The segments of mixed strategy `st` over `world` ranks and a model of `blocks` blocks."""
    if not st.mixed:
        raise HotSPaError(f"mixed tp: strategy {st} has no per-block tp")
    if len(st.layer_tp) != blocks:
        raise HotSPaError(
            f"mixed tp: strategy {st} names {len(st.layer_tp)} blocks, but the model has {blocks} transformer blocks"
        )
    bad = [t for t in st.layer_tp if world % t]
    if bad:
        raise HotSPaError(f"mixed tp: strategy {st}: tp {bad[0]} does not divide the world of {world} ranks")
    out: list[Segment] = []
    for b, (t, sp) in enumerate(zip(st.layer_tp, st.layer_sp)):
        if out and (out[-1].tp, out[-1].sp) == (t, sp):
            out[-1].stop = b + 1
        else:
            out.append(Segment(b, b + 1, t, sp, world // t))
    return out


def rebatch_plan(shape: Sequence[int], itemsize: int, source: Segment, dest: Segment, node_size: int,
                 load: dict | None = None) -> hs.SwitchPlan:
    """The hot-switch plan that moves a (rows, ...) tensor of `shape` from `source`'s replicas'
    rows to `dest`'s (a local slice where a rank already holds its rows)."""
    return hs.plan_hot_switch(shape, itemsize, row_layout(source.dp, source.tp), row_layout(dest.dp, dest.tp),
                              node_size=node_size, load=load)


class MixedTP:
    """One mixed strategy of a `HotSPa` job on this rank: its segments' stage programs, each
    parameter's home layout, and `grads` (one step's forward and backward over every segment).

    Built by HotSPa: `traced` = (graph, feeds, loss) of the model's loss with the segments'
    first blocks at `starts`; `ds_index[s]` the entry of `Tensor.ds` holding segment s's states,
    `strategies[s]` its states.Strategy (None where tp = 1); `world_layout(ds, mesh)` HotSPa's
    parameter layout over a mesh's ranks."""

    def __init__(self, hot, st: CostStrategy, segs: list[Segment], traced, starts: list[int], ds_index: list[int],
                 strategies: list, seg_values: list[list[torch.Tensor]], world_layout):
        self.st, self.segs, self.hot = st, segs, hot
        graph, self.feeds, loss = traced
        self.graph = graph  # the traced loss (its recompute regions: the blocks marked)
        params, rank, world = hot.params, hot.rank, hot.world
        self.meshes = [DeviceMesh(dp=s.dp, tp=s.tp, pp=1, world_size=world, rank=rank) for s in segs]
        self.programs, self.runners = [], []
        for k, strategy in enumerate(strategies):
            for p, v in zip(params, seg_values[k]):
                p._value = v
            program = partition(graph, loss, starts, k, [], rank, params, strategy, colocated=True)
            self.programs.append(program)
            self.runners.append(StageRunner(program))
        ids = {id(p): k for k, p in enumerate(params)}
        self.param_index = [[ids[id(p)] for p in program.params] for program in self.programs]
        readers: list[list[int]] = [[] for _ in params]
        for s, index in enumerate(self.param_index):
            for k in index:
                readers[k].append(s)
        for k, r in enumerate(readers):
            if not r:
                raise HotSPaError(f"mixed tp: strategy {st}: no segment reads parameter {params[k].name}")
        self.readers = readers
        self.home = [r[0] for r in readers]
        self.layouts = [[world_layout(p.ds[ds_index[s]], self.meshes[s]) for p in params] for s in range(len(segs))]
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
        self._rebatch: dict = {}
        for mesh in self.meshes:
            if mesh.dp > 1 and env.is_distributed():
                mesh.process_group("dp")
        self.rebatch_bytes = self.rebatch_messages = 0  # the last step's, over all ranks

    # --- one step ------------------------------------------------------------------------------------
    def _plans(self, boundaries: list, values: list, backward: bool, rows: int) -> list[hs.SwitchPlan]:
        """The re-batch plans of `boundaries` (values: this rank's local tensors) for `rows` rows,
        from the source segment's layout to the destination's (reverse: `backward`)."""
        out, load = [], {}
        for c, v in zip(boundaries, values):
            a, b = (c.dest, c.source) if backward else (c.source, c.dest)
            shape = (rows, *v.shape[1:])
            key = (c.tag, backward, shape, v.element_size())
            if key not in self._rebatch:
                self._rebatch[key] = rebatch_plan(shape, v.element_size(), self.segs[a], self.segs[b],
                                                  self.hot.node_size, load)
            out.append(self._rebatch[key])
        return out

    def _move(self, boundaries: list, values: list, backward: bool, rows: int) -> list[torch.Tensor]:
        if not boundaries:
            return []
        plans = self._plans(boundaries, values, backward, rows)
        for plan in plans:
            self.rebatch_bytes += plan.total_bytes
            self.rebatch_messages += len(plan.messages)
        if not env.is_distributed():
            return list(values)
        return hs.run_switches(plans, values, self.hot.rank, dtype=values[0].dtype)

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

    def grads(self, rows, scale: float, touched: dict) -> tuple[float, list[torch.Tensor]]:
        """(this rank's loss share, each parameter's gradient in its home layout, summed over the
        replicas of every segment that reads it) for the step's packed `rows` (all of them).

        The row layouts split a multiple of lcm(dp) rows; the rows past the real ones exist only
        in the plans (sent as zeros), no replica runs them: a replica left without real rows
        skips its segment's plans (its gradients are zeros)."""
        hot, params = self.hot, self.hot.params
        n = rows.num_rows
        total = n + (-n % math.lcm(*(s.dp for s in self.segs)))
        arrays = dict(zip(FEEDS, (rows.tokens, rows.positions, rows.segment_ids, rows.labels)))
        row_len = rows.tokens.shape[1]
        dtype = self.home_values[0].dtype
        scale_t = torch.tensor(scale, dtype=dtype)
        self.rebatch_bytes = self.rebatch_messages = 0
        home = [p._value for p in params]
        away = hs.run_switches(self._to_away, [home[k] for k, _ in self._away], hot.rank, dtype=dtype) \
            if self._away and env.is_distributed() else [home[k] for k, _ in self._away]
        values_at = [dict() for _ in self.segs]  # segment -> {k: value in its layout} of parameters away
        for (k, s), v in zip(self._away, away):
            values_at[s][k] = v

        def select(s: int) -> None:
            for k in self.param_index[s]:
                params[k]._value = values_at[s].get(k, home[k])

        def box(c, s: int) -> torch.Tensor:
            """Zeros of boundary c's box under segment s (rows, then the row length for a run-time dim)."""
            shape = [d if d is not None else row_len for d in c.tensor.shape]
            shape[0] = total // self.segs[s].dp
            return torch.zeros(shape, dtype=dtype)

        crossing: dict[int, torch.Tensor] = {}  # boundary tag -> this rank's box in its source's layout
        feeds_of, loss = [], 0.0
        try:
            for s, runner in enumerate(self.runners):
                program, mine = self.programs[s], self._mine(s, n, total)
                incoming = [c for c in program.boundaries if c.dest == s]
                arrived = self._move(incoming, [crossing[c.tag] for c in incoming], False, total)
                count = mine.stop - mine.start
                if count == 0:  # no real rows here: nothing to run (the boxes still moved)
                    for c, _ in program.outputs:
                        crossing[c.tag] = box(c, s)
                    feeds_of.append(None)
                    continue
                feeds = {name: torch.from_numpy(np.ascontiguousarray(arrays[name][mine])) for name in FEEDS}
                feeds["scale"] = scale_t
                feeds.update((f"boundary{c.tag}", v[:count]) for c, v in zip(incoming, arrived))
                select(s)
                runner.reset()
                out = runner.forward(0, feeds)
                if out is not None and self.meshes[s].index("tp") == 0:
                    loss = float(out)
                per = total // self.segs[s].dp
                for (c, _), v in zip(program.outputs, runner.outputs):
                    crossing[c.tag] = self._padded(v, per)
                feeds_of.append(feeds)
            del crossing
            seeds: dict[int, torch.Tensor] = {}  # boundary tag -> its gradient's box in its source's layout
            per_segment = []
            for s in reversed(range(len(self.segs))):
                program, feeds = self.programs[s], feeds_of[s]
                inputs = [c for c, _ in program.input_grads]
                if feeds is None:  # no real rows: zero gradients, zero boxes back
                    for c, _ in program.outputs:
                        seeds.pop(c.tag)
                    grads = {k: torch.zeros_like(values_at[s].get(k, home[k])) for k in self.param_index[s]}
                    back = self._move(inputs, [box(c, s) for c in inputs], True, total)
                else:
                    count = feeds["ids"].shape[0]
                    feeds.update((f"boundary{c.tag}.grad", seeds.pop(c.tag)[:count]) for c, _ in program.outputs)
                    select(s)
                    values = self.runners[s].backward(0, feeds)
                    feeds_of[s] = None
                    grads, pos = {}, 0
                    for k, sparse in zip(self.param_index[s], program.sparse):
                        if sparse:
                            grads[k] = hot._rows_block(self.layouts[s][k], k, values[pos], values[pos + 1], dtype,
                                                       touched)
                            pos += 2
                        else:
                            grads[k] = values[pos]
                            pos += 1
                    per = total // self.segs[s].dp
                    back = self._move(inputs, [self._padded(v, per) for v in values[pos:]], True, total)
                seeds.update((c.tag, v) for c, v in zip(inputs, back))
                per_segment.append((s, grads))
        finally:
            for p, v in zip(params, home):
                p._value = v
        out: list = [None] * len(params)
        returning = []
        for s, grads in per_segment:
            index = list(grads)
            summed = hot._all_reduce_flat([grads[k] for k in index], self.meshes[s])
            for k, g in zip(index, summed):
                if s == self.home[k]:
                    out[k] = g
                else:
                    returning.append(((k, s), g))
        if returning:
            got = dict(returning)
            locals_ = [got[ks] for ks in self._away]
            moved = hs.run_switches(self._back_home, locals_, hot.rank, dtype=dtype) \
                if env.is_distributed() else locals_
            for (k, _), g in zip(self._away, moved):
                out[k] = out[k] + g
        return loss, out

    def traffic(self) -> dict:
        """Per boundary (tag): (bytes, messages) of one step's re-batch forward, planned for the last
        step's rows (all ranks; the gradients back move as many)."""
        out = {}
        for (tag, backward, _, _), plan in self._rebatch.items():
            if not backward:
                out[tag] = (plan.total_bytes, len(plan.messages))
        return out


def plan_text(strategy: CostStrategy | None, recompute: Sequence[str], layer_tp: Sequence[int] | None = None,
              layer_sp: Sequence[bool] | None = None) -> str:
    """The HotSPa strategy string of a layer-wise plan (`luoshu train --parallel auto`): where the
    plan gives one tp (and sp flag) per block that is not the same for every block, or its
    strategy is per-block, the per-block strategy with each block's `recompute`
    ("tp[4,2,1,2],sp[..],rc[..]"; sp default: the strategy's flag on every block with tp > 1);
    else the strategy's plain text ("dp2,tp2,pp1,sp"; the blocks are marked for recompute apart).
    `strategy` None: the per-block search's mixed plan (`layerwise.LayerPlan.mixed`)."""
    if strategy is None:
        return str(mixed_strategy(layer_tp, layer_sp, recompute))
    if strategy.mixed and layer_tp is None:
        layer_tp, layer_sp = strategy.layer_tp, strategy.layer_sp
    if layer_tp is not None:
        layer_sp = tuple(layer_sp) if layer_sp is not None else tuple(strategy.sp and t > 1 for t in layer_tp)
        if strategy.mixed or len(set(zip(layer_tp, layer_sp))) > 1:
            return str(mixed_strategy(layer_tp, layer_sp, recompute))
    return f"dp{strategy.dp},tp{strategy.tp},pp{strategy.pp}" + (",sp" if strategy.sp else "")


def segment_strategy(strategy: states.Strategy, index: int, tp: int) -> states.Strategy | None:
    """A segment's states.Strategy (its entry `index` of Tensor.ds), None under tp = 1 (the
    segment's graph runs as it is, on the full values)."""
    return None if tp == 1 else dataclasses.replace(strategy, dp_group=(), strategy=index)


__all__ = ["MixedTP", "Segment", "plan_text", "rebatch_plan", "row_layout", "segments"]
