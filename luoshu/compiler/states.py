"""The distributed-states pass: deduce every tensor's states and turn a logical graph into one rank's local graph.

A logical graph is built with global shapes; parameters (and optionally placeholders)
carry `DStates` in `Tensor.ds[strategy]` (annotated by `luoshu.parallel.parallelize` or
the tensor-parallel layers). Every rank feeds placeholders whole (one annotated otherwise
is sliced in the local graph). `localize_graph` walks the pruned ops in order, the
backward ops too (gradients are ops), and for each op:

1. asks the op's `deduce_states` for its outputs' states given its inputs' states;
2. when the op has no layout for those inputs (`NeedStates`), picks its cheapest layout
   and converts each input with the comm op derived from the (source, destination)
   pair: partial -> duplicate all-reduce, partial -> split reduce-scatter, split ->
   duplicate all-gather, duplicate -> split local slice, split(i) -> split(j)
   all-to-all (`convert`), and where the device group changes (pipeline stages) a
   send/recv pair (`transfer`, used by the pipeline partition pass); an op with no rule
   at all gets duplicate inputs (all-gathered once, with a warning naming the op) and
   so always computes the right values;
3. records the op's local version in the rank's local graph: the same op with local
   attributes (`local_attrs`), or the op's own `localize` (vocabulary-parallel
   embedding and cross entropy, row-split index_add).

An optimizer update wants each gradient in its parameter's states (this is where, with
sequence parallelism, the norm weights' partial gradients are all-reduced over the TP
group); a fetched tensor is made duplicate. The result is a plain define-and-run graph
that the runtime compiles into the rank's plan: one local graph, and so one plan, per
strategy. With a data-parallel group the bucketed gradient all-reduce pass then runs
on the local update (or the pass a ZeRO mode registered in `Strategy.update_passes`, which
shards the optimizer over the DP group).

`simulate` runs the local graphs of all ranks of a group in one process, the
collectives computed from every rank's input; the tests check rules and comm with it.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from luoshu.core import context, live
from luoshu.core.autodiff import eager_gradient_of
from luoshu.core.dstates import DUPLICATE, PARTIAL, DStates
from luoshu.core.errors import Error, GraphError
from luoshu.core.graph import Graph
from luoshu.core.op import Op, apply, get_opdef, set_eager_states
from luoshu.core.tensor import IndexedSlices, Tensor
from luoshu.ops import _states as S
from luoshu.ops.update import update_entries


class StatesError(Error):
    """A distributed-states annotation or conversion that cannot work (names the tensor and sizes)."""


class Shard(NamedTuple):
    """Where a rank sits in its tensor-parallel group: position, group size, the group's ranks."""

    index: int
    size: int
    group: tuple


@dataclass
class Strategy:
    """One parallel strategy as the pass sees it from one rank.

    `group`: the ranks of this rank's tensor-parallel group (in mesh order); `index`: this
    rank's position in it; `sequence_parallel`: activations between TP regions may stay
    split (partial -> split is a reduce-scatter rather than a last resort); `dp_group`:
    ranks that average gradients (the bucketed all-reduce pass), `()` for none;
    `strategy`: which entry of `Tensor.ds` to read.
    """

    group: tuple
    index: int
    sequence_parallel: bool = False
    dp_group: tuple = ()
    bucket_bytes: int = 25 * 2**20
    strategy: int = 0
    # id(fetched tensor) -> the states it is fetched in (default: duplicate); a pipeline stage
    # fetches its parameters' gradients in the parameters' own states.
    fetch_states: dict = field(default_factory=dict)
    # optimizer key -> pass(local graph, local update op) that synchronises that optimizer's
    # gradients over `dp_group` instead of the bucketed all-reduce (ZeRO over the DP axis)
    update_passes: dict = field(default_factory=dict)
    # passes(local graph) run on every local graph once localized (ZeRO-3: gathers of the
    # parameters it shards for readers no update pass rewired)
    graph_passes: list = field(default_factory=list)

    @property
    def shard(self) -> Shard:
        return Shard(self.index, len(self.group), tuple(self.group))


_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DEFAULT: list = [None]
_WARNED: set = set()


def attach(graph: Graph, strategy: Strategy | None) -> None:
    """Makes `graph` compile through the states pass under `strategy` (None detaches)."""
    if strategy is None:
        _ATTACHED.pop(graph, None)
    else:
        _ATTACHED[graph] = strategy
    graph._plans.clear()


def select(graph: Graph, strategy: Strategy, key) -> None:
    """Makes `graph` compile under `strategy` while keeping the plans compiled under others
    (HotSPa: one graph, one cached plan per strategy; `key` tells the strategies apart)."""
    _ATTACHED[graph] = strategy
    graph.strategy_key = key


def set_default(strategy: Strategy | None) -> None:
    """The strategy of graphs with nothing attached that read annotated tensors, and of eager ops on
    them (set by `parallelize`)."""
    _DEFAULT[0] = strategy
    if strategy is None:
        set_eager_states(None, None)
    else:
        set_eager_states(eager_apply, eager_to_states)


def default() -> Strategy | None:
    """The strategy `set_default` installed (None: none)."""
    return _DEFAULT[0]


def strategy_of(graph: Graph, ops: list[Op]) -> Strategy | None:
    s = _ATTACHED.get(graph)
    if s is not None:
        return s
    s = _DEFAULT[0]
    if s is None:
        return None
    for op in ops:
        for t in op.inputs:
            if t.producer is None and len(t.ds) > s.strategy:
                return s
    return None


def states_of(t: Tensor, strategy: int, n: int) -> DStates:
    if len(t.ds) > strategy and t.ds[strategy] is not None:
        ds = t.ds[strategy]
        if ds.device_num != n:
            raise StatesError(
                f"tensor {t.name or t!r} has states over {ds.device_num} devices, but its tensor-parallel group has {n}"
            )
        S.key(ds)
        return ds
    return S.dup(n)


def local_shape(shape, ds: DStates, name: str = "tensor") -> tuple:
    d = S.split_dim(ds)
    if d is None:
        return tuple(shape)
    if d >= len(shape):
        raise StatesError(f"{name}: split on dimension {d}, but it has shape {tuple(shape)}")
    size, n = shape[d], ds.device_num
    if size is not None and size % n:
        raise StatesError(
            f"{name}: dimension {d} of size {size} does not split over the tensor-parallel axis of size {n}"
        )
    return tuple(None if s is None else (s // n if i == d else s) for i, s in enumerate(shape))


def shard_value(value: torch.Tensor, ds: DStates, index: int) -> torch.Tensor:
    """This position's piece of a full value under `ds` (partial: the full value on position 0)."""
    k = S.key(ds)
    if k == DUPLICATE:
        return value
    if k == PARTIAL:
        return value if index == 0 else torch.zeros_like(value)
    return value.chunk(ds.device_num, k)[index].clone()


class _LeafView(Tensor):
    """A local leaf of the local graph: a parameter's local shape, reading its current value."""

    __slots__ = ("_source", "_own")

    def __init__(self, source: Tensor, shape, value=None):
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_own", value)
        super().__init__(shape, source.dtype, source.device, name=source.name, kind=source.kind)

    @property
    def _value(self):
        return self._own if self._own is not None else self._source._value

    @_value.setter
    def _value(self, value):
        if value is not None:
            object.__setattr__(self, "_own", value)


# --- conversions ------------------------------------------------------------------------
def _numel(shape) -> float:
    return float(math.prod(8 if s is None else s for s in shape)) if shape else 1.0


def conversion_cost(src: DStates, dst: DStates, shape, fixed: bool, sequence_parallel: bool) -> float:
    """A relative byte count of the comm that turns `src` into `dst` (parameters move only as a last resort)."""
    if dst is S.WHOLE:
        if S.same(dst, src):
            return 0.0
        dst = S.dup(src.device_num)
    a, b = S.key(src), S.key(dst)
    if a == b:
        return 0.0
    size = _numel(shape)
    if a == DUPLICATE and b == PARTIAL:
        # Free locally, but it defers an all-reduce to wherever the partial result lands:
        # dearer than resolving the other input now, so partials are reduced where they arise.
        return 3.0 * size
    if a == DUPLICATE:  # a local slice
        return 0.01 * size
    if a == PARTIAL:
        cost = 2.0 * size if b == DUPLICATE else (1.0 if sequence_parallel else 4.0) * size
        if sequence_parallel and b == 0 and len(shape) >= 3 and shape[1] is not None and shape[1] > 1:
            # a (batch, sequence, ...) activation: split the sequence, as Megatron-LM does. The batch
            # split ties in bytes here, but a known batch size made the pass pick it (the first
            # candidate), and the backward's (rows, dim) weight gradients then regathered their blocks.
            cost *= 1.01
    else:
        cost = size
    return cost * (1e6 if fixed else 1.0)


def _to_front(x: Tensor, d: int) -> Tensor:
    if d == 0:
        return x
    axes = (d,) + tuple(i for i in range(x.ndim) if i != d)
    return apply("permute", x, axes=axes)


def _from_front(x: Tensor, d: int) -> Tensor:
    if d == 0:
        return x
    axes = tuple(range(1, d + 1)) + (0,) + tuple(range(d + 1, x.ndim))
    return apply("permute", x, axes=axes)


def _shape_attr(shape) -> tuple:
    return tuple(-1 if s is None else s for s in shape)


def convert(x: Tensor, src: DStates, dst: DStates, global_shape, shard: Shard) -> Tensor:
    """Builds (in the current graph) the ops that turn local `x` in states `src` into states `dst`."""
    a, b = S.key(src), S.key(dst)
    group = shard.group
    n = shard.size
    if a == b or n == 1:
        return x
    if a == PARTIAL and b == DUPLICATE:
        return apply("all_reduce", x, reduce="sum", group=group)
    if a == PARTIAL:
        _check_split(global_shape, b, n)
        return _from_front(apply("reduce_scatter", _to_front(x, b), reduce="sum", group=group), b)
    if a >= 0 and b == DUPLICATE:
        return _from_front(apply("all_gather", _to_front(x, a), group=group), a)
    if a == DUPLICATE and b >= 0:
        _check_split(global_shape, b, n)
        chunk = global_shape[b] // n
        starts = (None,) * b + (shard.index * chunk,)
        stops = (None,) * b + ((shard.index + 1) * chunk,)
        return apply("slice", x, starts=starts, stops=stops, steps=(None,) * (b + 1))
    if b == PARTIAL:
        if a >= 0:
            x = convert(x, src, S.dup(n), global_shape, shard)
        # the same op on every member (the members' graphs stay alike): the value on member 0 only
        return x * (1.0 if shard.index == 0 else 0.0)
    # split(a) -> split(b): all-to-all over blocks of dim b
    _check_split(global_shape, b, n)
    shape = list(x.shape)
    y = apply("reshape", x, shape=_shape_attr(shape[:b] + [n, shape[b] // n] + shape[b + 1 :]))
    y = apply("all_to_all", _to_front(y, b), group=group)  # axis 0: the member the block came from
    rest = list(shape)
    rest[b] //= n
    y = _from_front(y, a)  # the source-member axis just before dim a
    merged = rest[:a] + [None if rest[a] is None else rest[a] * n] + rest[a + 1 :]
    return apply("reshape", y, shape=_shape_attr(merged))


def transfer(x: Tensor | None, logical: Tensor, source: tuple, dest: tuple, rank: int, tag: int) -> Tensor | None:
    """The point-to-point comm op where the device group changes: `logical` is made on the ranks
    `source` and read on `dest` (groups of one size, e.g. two pipeline stages' TP groups; member
    i of one talks to member i of the other). On a source rank: `send` local `x` (returns the
    token); on a dest rank: `recv` (returns the received tensor); elsewhere None."""
    source, dest = tuple(source), tuple(dest)
    if len(source) != len(dest):
        raise StatesError(
            f"{logical.name or 'tensor'}: moving from device group {source} to {dest} needs groups of one "
            f"size, found {len(source)} and {len(dest)}"
        )
    header = any(d is None for d in logical.shape)  # run-time sizes travel before the data
    if rank in source:
        if x is None:
            raise StatesError(f"{logical.name or 'tensor'}: rank {rank} sends it but has no local value")
        return apply("send", x, peer=dest[source.index(rank)], tag=tag, header=header)
    if rank in dest:
        shape = tuple(-1 if d is None else d for d in logical.shape)
        return apply(
            "recv", shape=shape, dtype=logical.dtype, device=logical.device, peer=source[dest.index(rank)], tag=tag
        )
    return None


def _check_split(shape, d: int, n: int) -> None:
    if d >= len(shape) or shape[d] is None or shape[d] % n:
        raise StatesError(f"cannot split dimension {d} of shape {tuple(shape)} over {n} devices")


# --- the pass ---------------------------------------------------------------------------
class Localized(NamedTuple):
    graph: Graph
    tensors: dict  # id(logical tensor) -> local tensor
    states: dict  # id(logical tensor) -> DStates
    feeds: dict  # id(local placeholder) -> logical placeholder


def localize_graph(ops: list[Op], fetches: list[Tensor], strategy: Strategy, leaf_values=None) -> Localized:
    """The local graph of one rank for the logical `ops` (a topological order) and `fetches`.

    `leaf_values(t, ds)`, when given, supplies a leaf's local value (the simulation
    shards full values); otherwise a leaf reads the parameter's own (already local) value.
    """
    shard = strategy.shard
    n = shard.size
    local = Graph(name=f"local{shard.index}of{n}")
    tensors: dict[int, Tensor] = {}
    states: dict[int, DStates] = {}
    feeds: dict[int, Tensor] = {}
    cache: dict[int, dict] = {}  # id(logical tensor) -> {wanted states key: its local conversion}

    def leaf(t: Tensor) -> Tensor:
        ds = states_of(t, strategy.strategy, n)
        shape = local_shape(t.shape, ds, t.name or "leaf")
        if t.kind == "placeholder":
            # Every rank feeds the whole value; a placeholder annotated otherwise is sliced here.
            view = Tensor(t.shape, t.dtype, t.device, name=t.name, kind="placeholder")
            feeds[id(view)] = t
            tensors[id(t)], states[id(t)] = view, S.dup(n)
            if not S.same(ds, S.dup(n)):
                tensors[id(t)], states[id(t)] = convert(view, S.dup(n), ds, t.shape, shard), ds
            return tensors[id(t)]
        value = leaf_values(t, ds) if leaf_values is not None else None
        view = _LeafView(t, shape, value)
        tensors[id(t)] = view
        states[id(t)] = ds
        return view

    def get(t: Tensor) -> Tensor:
        found = tensors.get(id(t))
        return found if found is not None else leaf(t)

    def converted(t: Tensor, want: DStates) -> Tensor:
        src = states[id(t)]
        if S.same(src, want):
            return tensors[id(t)]
        out, now = _convert_once(cache.setdefault(id(t), {}), tensors[id(t)], src, want, t.shape, shard)
        if now is not src:
            tensors[id(t)], states[id(t)] = out, now
        return out

    gradient_of = _gradient_of(ops) if strategy.sequence_parallel and n > 1 else {}
    with local:
        for op in ops:
            for t in op.inputs:
                get(t)
                if id(t) in gradient_of and S.key(states[id(t)]) == PARTIAL:
                    _to_primal_split(t, gradient_of[id(t)][1], states, converted)
            if op.opdef.name == "optimizer_update":
                _localize_update(op, tensors, states, converted, shard, strategy)
                continue
            outs, out_ds = localize_op(
                op,
                [states[id(t)] for t in op.inputs],
                [tensors[id(t)] for t in op.inputs],
                lambda i, w, op=op: converted(op.inputs[i], w),
                strategy,
                lambda i, op=op: cache.get(id(op.inputs[i]), {}),
            )
            for t, lt, ds in zip(op.outputs, outs, out_ds):
                tensors[id(t)], states[id(t)] = lt, ds
        for f in fetches:
            get(f)
            if f.kind != "token" and f.producer is not None and f.producer[0].opdef.name != "optimizer_update":
                tensors[id(f)] = converted(f, strategy.fetch_states.get(id(f), S.dup(n)))
    for graph_pass in strategy.graph_passes:
        graph_pass(local)
    return Localized(local, tensors, states, feeds)


def _gradient_of(ops: list[Op]) -> dict:
    """The autodiff records (`Graph.gradient_of`) of the graphs `ops` belong to."""
    found: dict = {}
    for graph in {id(op.graph): op.graph for op in ops if op.graph is not None}.values():
        found.update(getattr(graph, "gradient_of", {}))
    return found


def _to_primal_split(grad: Tensor, primals: list, states: dict, converted) -> None:
    """Under sequence parallelism, a partial gradient of a tensor held split (the sequence split of
    a norm's output or the residual stream) is reduce-scattered into that split where it is first
    read, and read split from then on (`_convert_once`): Megatron-LM's dual of the forward's
    all-gather. Left partial, its first reader (RMSNorm's gy * w) keeps the full-size partial and
    the next reader (gy * x_hat for the weight gradient) reduce-scatters the gradient again."""
    for primal in primals:
        ds = states.get(id(primal))
        if ds is not None and S.key(ds) >= 0 and tuple(primal.shape) == tuple(grad.shape):
            converted(grad, ds)
            return


def leaf_source(t: Tensor) -> Tensor:
    """The logical tensor (a parameter) a local graph's leaf reads; `t` itself for any other."""
    return t._source if isinstance(t, _LeafView) else t


def _convert_once(done: dict, x: Tensor, src: DStates, want: DStates, global_shape, shard: Shard):
    """(`x`, local in states `src`, in states `want`; the states the tensor is in for its later
    readers). Each conversion of a tensor is made once (`done`: wanted states key -> the local
    result, kept per tensor): q, k and v projections of one gathered input share the gather. The
    graph pass and the eager dispatch both convert through here."""
    key = S.key(S.dup(shard.size) if want is S.WHOLE else want)
    if key not in done:
        done[key] = convert_to(x, src, want, global_shape, shard)
    if S.key(src) == PARTIAL and key == DUPLICATE:
        # Once all-reduced, the whole value serves every later reader (a partial costs nothing
        # less to compute on, and a reader wanting it back gets a local mask): readers left on
        # the partial would all-reduce again, or gather their other input (an RMSNorm's
        # x * rsqrt(mean(x * x)), the backward's weight gradients).
        return done[key], S.dup(shard.size)
    if S.key(src) == PARTIAL and key >= 0:
        # Likewise once reduce-scattered (sequence parallelism): later readers take the split value
        # (Megatron-LM's layout after a row-parallel output). Left on the partial, a reader's result
        # would be reduce-scattered once more: RMSNorm's backward reads its output gradient for the
        # input gradient (gy * w) and for the weight gradient (gy * x_hat, split).
        return done[key], want
    return done[key], src


def convert_to(x: Tensor, src: DStates, want: DStates, global_shape, shard: Shard) -> Tensor:
    """`convert`, where `want` may also be `S.WHOLE` (whole values: duplicate unless `src` already is whole)."""
    if S.same(src, want):
        return x
    return convert(x, src, S.dup(shard.size) if want is S.WHOLE else want, global_shape, shard)


def localize_op(op: Op, in_ds: list, inputs: list, converted, strategy: Strategy, made=None) -> tuple[list, list]:
    """One logical op on this rank, in the current mode (a graph being built, or eager): deduces its
    output states from `in_ds` (its inputs' states), converts the inputs it needs in other states
    with `converted(i, wanted states)` (the comm op of the pair), and applies the op's local
    version to the local `inputs`. Returns (local outputs, their states). `made(i)`: the states keys
    input i was already converted to (free to read again). The graph pass and the eager dispatch
    both run every op through here."""
    n = len(strategy.group)
    if op.opdef.sums_inputs and n > 1 and len({S.key(d) for d in in_ds}) > 1:
        return _localize_sum(op, in_ds, inputs, converted, strategy)
    out_ds, want = _deduce(op, in_ds, strategy, made)
    inputs = [x if w is None else converted(i, w) for i, (x, w) in enumerate(zip(inputs, want))]
    in_ds = [
        d if w is None or (w is S.WHOLE and S.same(w, d)) else (S.dup(n) if w is S.WHOLE else w)
        for d, w in zip(in_ds, want)
    ]
    outs = _localize_op(op, inputs, in_ds, out_ds, strategy.shard)
    return outs, [S.dup(n) if ds is None else ds for ds in out_ds]


def _localize_sum(op: Op, in_ds: list, inputs: list, converted, strategy: Strategy) -> tuple[list, list]:
    """`localize_op` for a sum (`sums_inputs`) of inputs in several layouts: the inputs of each layout
    are added locally (a sum of partials is partial, of splits split), each layout's sum is converted
    once to the layout of least comm, and those sums are added. A residual's gradient thus takes its
    partial contributions (an RMSNorm's branches over the q, k and v projections) in one all-reduce,
    as Megatron-LM's `f` does, rather than one each as it joins the whole ones."""
    n = len(strategy.group)
    layouts: dict[int, list[int]] = {}  # layout key -> its inputs, in order of first appearance
    for i, d in enumerate(in_ds):
        layouts.setdefault(S.key(d), []).append(i)
    shape = op.outputs[0].shape

    def cost(target: DStates) -> float:
        total = 0.0
        for members in layouts.values():
            first = op.inputs[members[0]]
            fixed = len(members) == 1 and first.producer is None and first.kind == "variable"
            total += conversion_cost(in_ds[members[0]], target, shape, fixed, strategy.sequence_parallel)
        return total

    target = min([S.dup(n)] + [in_ds[m[0]] for m in layouts.values()], key=cost)
    sums = []
    for members in layouts.values():
        if len(members) == 1:
            sums.append(converted(members[0], target))
        else:
            local = apply(op.opdef, *(inputs[i] for i in members), **op.attrs)
            sums.append(convert_to(local, in_ds[members[0]], target, shape, strategy.shard))
    return [apply(op.opdef, *sums, **op.attrs)], [target]


def _deduce(op: Op, in_ds: list, strategy: Strategy, made=None):
    """(output states, wanted input states or None per input); `made` as `localize_op`'s."""
    n = len(strategy.group)
    io = S.OpIO(tuple(t.shape for t in op.inputs), tuple(t.shape for t in op.outputs))
    nout = len(op.outputs)
    keep = [None] * len(in_ds)
    try:
        out = op.opdef.deduce_states(in_ds, _io=io, **op.attrs)
        return _pad(out, nout, n), keep
    except S.NeedStates as need:
        fixed = [t.producer is None and t.kind == "variable" for t in op.inputs]

        def cost(c):
            # One tensor read twice (x * x) is converted once per wanted states (the pass caches
            # conversions), and once a partial is all-reduced its other readers here read it whole:
            # reading it partial as well defers a second all-reduce, as duplicate -> partial does.
            # A conversion an earlier reader made is free: an RMSNorm under sequence parallelism
            # reduce-scatters x for mean(x * x), and x * rsqrt(...) then reads that split x too,
            # rather than gathering the statistic onto the partial x (an all-reduce later).
            whole = {id(t) for d, w, t in zip(in_ds, c.inputs, op.inputs) if _all_reduces(d, w, n)}
            seen, total = set(), 0.0
            for i, (d, w, t, f) in enumerate(zip(in_ds, c.inputs, op.inputs, fixed)):
                w = d if w is None else w
                if id(t) in whole and not _all_reduces(d, w, n):
                    d = S.dup(n)
                key = (id(t), "whole" if w is S.WHOLE else S.key(w))
                if key not in seen:
                    seen.add(key)
                    if made is None or w is S.WHOLE or S.key(w) not in made(i):
                        total += conversion_cost(d, w, t.shape, f, strategy.sequence_parallel)
            if strategy.sequence_parallel:
                total += _gather_into_partial(in_ds, c.inputs, op.inputs, n)
            return total

        best = min(need.candidates, key=cost)
        return _pad(best.outputs, nout, n), list(best.inputs)
    except Error:
        if all(d is None or S.key(d) == DUPLICATE for d in in_ds):
            return [S.dup(n)] * nout, keep
        if op.opdef.name not in _WARNED:
            _WARNED.add(op.opdef.name)
            warnings.warn(
                f"op '{op.opdef.name}' has no distributed-states rule for inputs "
                f"{[S._show(d) for d in in_ds]}; its inputs are gathered to duplicate",
                stacklevel=2,
            )
        return [S.dup(n)] * nout, [S.dup(n)] * len(in_ds)


def _gather_into_partial(in_ds: list, wants: tuple, inputs: list, n: int) -> float:
    """Under sequence parallelism, what a layout that gathers a split input to meet a partial one
    (kept partial) really costs besides the gather: the partial's reduce-scatter. The gather is
    cheap when the split input is small (an RMSNorm's rsqrt(mean(x * x)) per position), but the op
    then runs full-size on the partial and so does everything after it, gathering each split
    tensor it meets (x for the norm weight's gradient), up to an all-reduce where the partial
    ends. Megatron-LM reduce-scatters the partial where it meets the split region."""
    kept, gathers = 0.0, False
    for d, w, t in zip(in_ds, wants, inputs):
        w = d if w is None else w
        a, b = S.key(d), S.key(S.dup(n) if w is S.WHOLE else w)
        if a == PARTIAL and b == PARTIAL:
            kept = max(kept, _numel(t.shape))
        elif a >= 0 and b == DUPLICATE:
            gathers = True
    return kept if gathers else 0.0


def _all_reduces(src: DStates, want, n: int) -> bool:
    """Whether converting `src` to `want` is an all-reduce (partial to whole)."""
    return want is not None and S.key(src) == PARTIAL and S.key(S.dup(n) if want is S.WHOLE else want) == DUPLICATE


def _pad(out, nout: int, n: int) -> list:
    out = [S.dup(n) if d is None else d for d in list(out)[:nout]]
    return out + [out[0] if out else S.dup(n)] * (nout - len(out))


def _localize_op(op: Op, inputs, in_ds, out_ds, shard: Shard) -> list:
    opdef = op.opdef
    custom = getattr(opdef, "localize", None)
    if custom is not None and shard.size > 1:
        outs = custom(inputs, op.attrs, in_ds, out_ds, shard)
    else:
        attrs = op.attrs
        local_attrs = getattr(opdef, "local_attrs", None)
        if local_attrs is not None and shard.size > 1:
            io = S.OpIO(tuple(t.shape for t in op.inputs), tuple(t.shape for t in op.outputs))
            attrs = local_attrs(dict(attrs), in_ds, out_ds, io)
        outs = apply(opdef, *inputs, **attrs)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    if len(outs) != len(op.outputs):
        raise GraphError(f"states pass: the local '{opdef.name}' gave {len(outs)} outputs, expected {len(op.outputs)}")
    return outs


def _localize_update(op: Op, tensors, states, converted, shard: Shard, strategy: Strategy) -> None:
    """The update reads each gradient in its parameter's states; sparse rows of a row-split table
    are renumbered to its local rows (others dropped)."""
    attrs = op.attrs
    opt = live.lookup(attrs["optimizer"], "optimizer", "states pass")
    params = opt.parameters()
    if getattr(opt, "per_parameter_norms", False) and shard.size > 1:
        split = [p.name for p in params if not states_of(p, strategy.strategy, shard.size).is_pure_duplicate()]
        if split:
            raise StatesError(
                f"{type(opt).__name__} takes norms of whole parameters, but {split[:3]} are split over "
                f"the tensor-parallel axis of size {shard.size}; use another optimizer or tp=1"
            )
    grads = []
    for entry in update_entries(attrs["params"], attrs["kinds"], op.inputs):
        p = params[entry.index]
        want = states_of(p, strategy.strategy, shard.size)
        if entry.kind == "d":
            grads.append(converted(entry.inputs[0], want))
            continue
        indices, values = entry.inputs
        idx, val = converted(indices, S.dup(shard.size)), converted(values, S.dup(shard.size))
        grads += list(_rows_in_states(idx, val, values.shape, p.shape, want, shard))
    if getattr(opt, "max_grad_norm", None) is not None and shard.size > 1:
        opt.shard_norm = _tp_shard_norm(params, strategy)
    if attrs.get("loss_scaler", -1) >= 0 and shard.size > 1:
        scaler = live.lookup(attrs["loss_scaler"], "loss scaler", "states pass")
        if scaler.agreement_group is None:  # TP members hold other gradients: their overflow checks must agree
            scaler.agree_across(shard.group)
    out = apply("optimizer_update", *grads, **attrs)
    tensors[id(op.outputs[0])] = out
    states[id(op.outputs[0])] = S.dup(shard.size)
    update_pass = strategy.update_passes.get(attrs["optimizer"])
    if update_pass is not None:
        update_pass(out.graph, out.producer[0])
    elif len(strategy.dp_group) > 1:
        from luoshu.compiler.gradient_allreduce import insert_gradient_allreduce

        insert_gradient_allreduce(out.graph, out.producer[0], strategy.bucket_bytes, tuple(strategy.dp_group))


# --- eager dispatch ------------------------------------------------------------------------
# In eager mode a tensor of a tensor-parallel model is global as in a logical graph: its shape
# is the global one, `ds` its states, `_value` this rank's local piece. `luoshu.core.op` hands
# every eager op with such an input to `eager_apply`, which runs it through `localize_op` (the
# pass's own step: the same `deduce_states` rules, the same derived comm, run at once on the
# local values). Autodiff records the logical op, so its gradient ops are logical ops too and
# dispatch the same way: the backward's comm follows from the states, as in the graph pass.
# id(eager activation) -> [a weak reference to it, {states key: its local value in those states},
# (local value, states) it is read in from now on, or None for its own]
_EAGER_CONVERTED: dict = {}


def _eager_states(t: Tensor, strategy: Strategy, n: int) -> DStates:
    """The states eager tensor `t` is read in now: those of its conversion later readers take
    (after an all-reduce or a reduce-scatter), else its own."""
    entry = _EAGER_CONVERTED.get(id(t))
    if entry is not None and entry[2] is not None and entry[0]() is t:
        return entry[2][1]
    return states_of(t, strategy.strategy, n)


def _forget(key: int):
    return lambda _: _EAGER_CONVERTED.pop(key, None)


def eager_apply(opdef, tensors: list, attrs: dict, metas) -> tuple | None:
    """(logical op, local output values, each output's `ds` list) of an eager op under the default strategy,
    or None where there is none (or its TP group is one rank) and the op runs as usual."""
    strategy = _DEFAULT[0]
    if strategy is None or len(strategy.group) == 1:
        return None
    shard, n = strategy.shard, len(strategy.group)
    in_ds = [states_of(t, strategy.strategy, n) for t in tensors]
    op = Op(opdef, tensors, attrs)
    device = tensors[0].device if tensors else "cpu"
    op._outputs = [Tensor(m.shape, m.dtype, m.device or device) for m in metas]
    local = [Tensor.from_value(t._value) for t in tensors]
    for i, t in enumerate(tensors):  # an activation all-reduced before is read whole, as in the graph pass
        entry = _EAGER_CONVERTED.get(id(t))
        if entry is not None and entry[2] is not None:
            local[i], in_ds[i] = entry[2]

    def converted(i: int, want: DStates) -> Tensor:
        t = tensors[i]
        if t.kind == "variable":  # a parameter changes in place: converted afresh each time
            return convert_to(local[i], in_ds[i], want, t.shape, shard)
        if S.same(in_ds[i], want):
            return local[i]
        # An activation is converted once per states and read whole once all-reduced, as in the
        # graph pass (the same _convert_once)
        entry = _EAGER_CONVERTED.get(id(t))
        if entry is None:  # keyed by identity (Tensor's == is an op); dropped with the tensor
            entry = _EAGER_CONVERTED[id(t)] = [weakref.ref(t, _forget(id(t))), {}, None]
        out, now = _convert_once(entry[1], local[i], in_ds[i], want, t.shape, shard)
        if now is not in_ds[i]:
            entry[2] = (out, now)
        return out

    with context.no_grad():  # autodiff records the logical op (the caller does), not these
        if strategy.sequence_parallel:  # a partial gradient of a split tensor goes split, as in the graph pass
            for i, t in enumerate(tensors):
                if S.key(in_ds[i]) == PARTIAL:
                    primals = eager_gradient_of(t)
                    _to_primal_split(t, primals, {id(p): _eager_states(p, strategy, n) for p in primals},
                                     lambda g, w, i=i: converted(i, w))
                    entry = _EAGER_CONVERTED.get(id(t))
                    if entry is not None and entry[2] is not None:
                        local[i], in_ds[i] = entry[2]
        outs, out_ds = localize_op(op, in_ds, local, converted, strategy,
                                   lambda i: (_EAGER_CONVERTED.get(id(tensors[i])) or (None, {}))[1])
    return op, [o._value for o in outs], [[None] * strategy.strategy + [d] for d in out_ds]


def eager_to_states(t, like: Tensor):
    """Eager tensor `t` (an eager gradient) in the states of `like` (its parameter), which an
    update reads, as `_localize_update` wants them in the graph (e.g. sequence parallelism's
    partial norm-weight gradients are all-reduced here)."""
    strategy = _DEFAULT[0]
    if strategy is None or len(strategy.group) == 1 or not like.ds or t is None:
        return t
    if len(strategy.dp_group) > 1:
        # the bucketed DP all-reduce is a graph pass: eager gradients would stay this rank's own
        raise StatesError(
            f"eager tensor parallelism covers the TP axis only; this mesh also has a data-parallel axis "
            f"of {len(strategy.dp_group)} ranks (use define-and-run there, or dp=1)"
        )
    n = len(strategy.group)
    want = states_of(like, strategy.strategy, n)
    if isinstance(t, IndexedSlices):  # stays sparse (a sparse update touches only its rows), as in the graph
        dup = S.dup(n)
        with context.no_grad():
            idx, val = (
                convert_to(
                    Tensor.from_value(x._value), states_of(x, strategy.strategy, n), dup, x.shape, strategy.shard
                )
                for x in (t.indices, t.values)
            )
            idx, val = _rows_in_states(idx, val, t.values.shape, like.shape, want, strategy.shard)
        return IndexedSlices(idx, val, t.dense_shape)
    src = states_of(t, strategy.strategy, n)
    if S.same(src, want):
        return t
    with context.no_grad():
        local = convert_to(Tensor.from_value(t._value), src, want, t.shape, strategy.shard)
    out = Tensor(t.shape, t.dtype, t.device, value=local._value)
    out.ds = [None] * strategy.strategy + [want]
    return out


def _rows_in_states(idx: Tensor, val: Tensor, values_shape, param_shape, want: DStates, shard: Shard):
    """A sparse gradient's duplicate (indices, values) for a parameter in states `want`: a row-split
    table keeps its own rows, renumbered to its local rows (the others dropped)."""
    d = S.split_dim(want)
    if d == 0:
        rows = param_shape[0] // shard.size
        return apply("shard_rows", idx, val, start=shard.index * rows, rows=rows)
    if d is not None:
        val = convert(val, S.dup(shard.size), S.split(shard.size, d), values_shape, shard)
    return idx, val


def _tp_shard_norm(params: list, strategy: Strategy) -> ShardNorm:
    """Clipping's norm over a TP group: a split parameter's gradient counts whole on each member,
    a duplicated one 1/n on each of the n members."""
    n = len(strategy.group)
    split = {i for i, p in enumerate(params) if not states_of(p, strategy.strategy, n).is_pure_duplicate()}
    return ShardNorm({i: 1.0 if i in split else 1.0 / n for i in range(len(params))}, strategy.group)


def eager_shard_norm(params: list) -> ShardNorm | None:
    """The clipping norm of an eager optimizer step over `params` under the installed TP strategy
    (None without one, or where no parameter carries distributed states)."""
    strategy = _DEFAULT[0]
    if strategy is None or len(strategy.group) == 1 or not any(p.ds for p in params):
        return None
    return _tp_shard_norm(params, strategy)


class ShardNorm:
    """The global gradient norm of a sharded model for clipping, from each rank's part: the
    squares of gradient i count with `weights[i]` (default 1) and are summed over `group`.
    Tensor parallelism: a split gradient counts whole, a duplicated one 1/n on each of the n
    members; a pipeline adds its stages (a parameter several stages hold, once in all)."""

    def __init__(self, weights: dict, group: tuple):
        self.weights, self.group = dict(weights), tuple(group)

    def __call__(self, indices: list, grads: list) -> torch.Tensor:
        return self.squared(indices, grads).sqrt()

    def squared(self, indices: list, grads: list, device=None) -> torch.Tensor:
        """The squared norm (summed over `group`); `grads` may be pieces of gradient i (ZeRO's
        shards), each counting with `weights[i]`; `device` where there are none on this rank. The
        sum is float64 on every rank: the all-reduce must match where the members hold gradients
        of other dtypes, or none (a pipeline stage without sparse rows)."""
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else device)
        for i, g in zip(indices, grads):
            total += (torch.linalg.vector_norm(g.to(dtype)) ** 2).double() * self.weights.get(i, 1.0)
        if len(self.group) > 1:
            total = get_opdef("all_reduce").compute(total, reduce="sum", group=self.group, async_op=False)
        return total


# --- simulation (one process, every rank of a group) -----------------------------------------
def simulate(
    ops: list[Op],
    fetches: list[Tensor],
    n: int,
    feeds: dict | None = None,
    sequence_parallel: bool = False,
    partial_weights=None,
) -> tuple[list, list, list]:
    """Runs the logical `ops` on n simulated ranks in one process: leaves sharded from their
    full values by their states (a partial leaf as `partial_weights[r]` times its value,
    default all on rank 0), each rank's local graph run in lockstep, every collective
    computed from all ranks' inputs. Returns (per rank: the local values of `fetches`, per
    rank: their deduced states, the local graphs)."""
    feeds = feeds or {}
    weights = partial_weights or [1.0] + [0.0] * (n - 1)

    def piece(value, ds, r):
        if S.key(ds) == PARTIAL:
            return value * weights[r]
        return shard_value(value, ds, r)

    locals_ = [
        localize_graph(
            ops, [], Strategy(tuple(range(n)), r, sequence_parallel), lambda t, ds, r=r: piece(t._value, ds, r)
        )
        for r in range(n)
    ]
    values = [dict() for _ in range(n)]
    for r, loc in enumerate(locals_):
        for lid, ph in loc.feeds.items():
            if id(ph) not in feeds:
                raise GraphError(f"simulate: placeholder {ph.name!r} is not fed")
            values[r][lid] = torch.as_tensor(feeds[id(ph)])  # whole: the local graph slices what it needs
    run_lockstep([loc.graph for loc in locals_], values)
    return (
        [[_value(loc.tensors[id(f)], values[r]) for f in fetches] for r, loc in enumerate(locals_)],
        [[loc.states[id(f)] for f in fetches] for loc in locals_],
        locals_,
    )


def run_lockstep(graphs: list[Graph], values: list[dict]) -> None:
    """Runs the ranks' local graphs (alike in structure) op by op; `values[r]` maps tensor ids to
    values (feeds in, every output added); collectives combine all ranks' inputs."""
    with torch.no_grad():
        for step in range(len(graphs[0].ops)):
            local_ops = [g.ops[step] for g in graphs]
            args = [[_value(t, values[r]) for t in o.inputs] for r, o in enumerate(local_ops)]
            name = local_ops[0].opdef.name
            if any(o.opdef.name != name for o in local_ops):
                raise GraphError(f"run_lockstep: step {step} runs different ops on different ranks")
            if name in _SIMULATED:
                results = _SIMULATED[name](args, local_ops[0].attrs)
            else:
                results = [o.opdef.compute(*a, **o.attrs) for o, a in zip(local_ops, args)]
            for r, (o, res) in enumerate(zip(local_ops, results)):
                res = res if isinstance(res, (tuple, list)) else (res,)
                for t, v in zip(o.outputs, res):
                    values[r][id(t)] = v


def _value(t: Tensor, values: dict):
    v = values.get(id(t))
    return t._value if v is None else v


def _sim_all_reduce(args, attrs):
    reduce = attrs.get("reduce")
    if reduce in ("max", "min"):
        stacked = torch.stack([a[0] for a in args])
        total = stacked.amax(0) if reduce == "max" else stacked.amin(0)
    else:
        total = sum(a[0] for a in args)
    if reduce == "mean":
        total = total / len(args)
    return [total.clone() for _ in args]


def _sim_all_gather(args, attrs):
    full = torch.cat([a[0] for a in args], 0)
    return [full.clone() for _ in args]


def _sim_reduce_scatter(args, attrs):
    total = sum(a[0] for a in args)
    if attrs.get("reduce") == "mean":
        total = total / len(args)
    return [c.clone() for c in total.chunk(len(args), 0)]


def _sim_all_to_all(args, attrs):
    n = len(args)
    blocks = [a[0].chunk(n, 0) for a in args]
    return [torch.cat([blocks[m][r] for m in range(n)], 0) for r in range(n)]


_SIMULATED = {
    "all_reduce": _sim_all_reduce,
    "all_gather": _sim_all_gather,
    "reduce_scatter": _sim_reduce_scatter,
    "all_to_all": _sim_all_to_all,
}


def assemble(values: list, ds_list: list) -> torch.Tensor:
    """The global value from every rank's local value in states `ds` (sum partials, concatenate
    splits, duplicates must agree)."""
    ds = ds_list[0]
    k = S.key(ds)
    if k == PARTIAL:
        return sum(values)
    if k == DUPLICATE:
        for v in values[1:]:
            if v.shape != values[0].shape or not torch.allclose(v, values[0], rtol=1e-12, atol=1e-12):
                raise StatesError("duplicate states, but the ranks hold different values")
        return values[0]
    return torch.cat(values, k)


__all__ = [
    "Shard",
    "ShardNorm",
    "StatesError",
    "Strategy",
    "assemble",
    "attach",
    "convert",
    "convert_to",
    "eager_apply",
    "eager_to_states",
    "leaf_source",
    "localize_graph",
    "localize_op",
    "run_lockstep",
    "select",
    "set_default",
    "shard_value",
    "simulate",
    "transfer",
]
