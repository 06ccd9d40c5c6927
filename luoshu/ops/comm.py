"""Communication operators: all_reduce, all_gather, reduce_scatter, broadcast, reduce, all_to_all.

Each collective runs over a group of worker ranks (`group=()` is every worker) through
torch.distributed; each gradient is the dual collective (all_gather <-> reduce_scatter,
broadcast <-> reduce, all_to_all <-> all_to_all with the splits swapped, all_reduce <->
all_reduce). In a single process (no `luoshu launch`) a group has one member and every
collective is the identity.

Asynchronous collectives (`async_op=True`, and `bucket_all_reduce`) start the transfer
and return its output buffer at once, with the pending work attached to the buffer;
a later `comm_wait` (or `bucket_unpack`) op waits on it. Between the two, the plan keeps
computing: this is how gradient all-reduce overlaps the rest of the backward pass.

The process groups belong to `luoshu.distributed`, which installs the resolver below (the ops
layer does not import the layers above it).
"""

from __future__ import annotations

import contextlib
import operator
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as torch_dist

from luoshu.core import dtypes, live
from luoshu.core.dstates import DUPLICATE, PARTIAL, DStates
from luoshu.core.errors import Error, ExecutionError, OpError
from luoshu.core.op import OpDef, apply, get_opdef, register
from luoshu.core.shapes import numel
from luoshu.core.tensor import Tensor, TensorMeta
from luoshu.ops import _states as S

__all__ = ["all_gather", "all_reduce", "all_to_all", "broadcast", "comm_wait", "posted_recvs", "recv_dual",
           "recv_wait_seconds", "reduce", "reduce_scatter", "shapes_once"]

_REDUCE = ("sum", "mean")
# all_reduce also takes the elementwise max and min over the group (a stabiliser's row maxima)
_ALL_REDUCE = _REDUCE + ("max", "min")
_TORCH_OPS = {"max": torch_dist.ReduceOp.MAX, "min": torch_dist.ReduceOp.MIN}
# torch 2.13 renamed the single-tensor collectives; the old names warn.
_all_gather_single = getattr(torch_dist, "all_gather_single", None) or torch_dist.all_gather_into_tensor
_reduce_scatter_single = getattr(torch_dist, "reduce_scatter_single", None) or torch_dist.reduce_scatter_tensor
_PENDING = "_luoshu_pending"  # attribute of a torch buffer whose collective is still running

# ranks tuple -> (torch process group or None, group size, this worker's index in it)
_group_resolver: Callable | None = None


def set_group_resolver(resolver: Callable) -> None:
    global _group_resolver
    _group_resolver = resolver


# Installed by `luoshu.distributed` too: `entered(ranks)` as a collective starts (per-rank progress),
# `laggards(ranks) -> str` when one fails (which members never arrived; "" if it cannot tell).
_monitor = None


def set_monitor(monitor) -> None:
    global _monitor
    _monitor = monitor


def _group(name: str, ranks: tuple):
    if _group_resolver is None:  # luoshu.distributed not loaded: a single process
        if ranks and tuple(ranks) != (0,):
            raise Error(f"{name}: group {tuple(ranks)} needs luoshu.distributed (a single process has rank 0 only)")
        return None, 1, 0
    return _group_resolver(tuple(ranks))


def _comm_failed(name: str, ranks: tuple, exc: Exception) -> Error:
    who = "its group" if ranks is None else f"worker ranks {tuple(ranks)}" if ranks else "all workers"
    late = ""
    if _monitor is not None:
        try:
            late = _monitor.laggards(ranks)
        except Exception:  # noqa: BLE001 - naming the laggard must never hide the failure itself
            late = ""
    if late:
        return ExecutionError(f"{name} over {who} failed: {late}: {exc}")
    return ExecutionError(f"{name} over {who} failed: a peer process died or did not join within the "
                          f"collective timeout (luoshu launch names a dead process): {exc}")


def _move_states(name: str, ds: DStates | None, source: int, target: int) -> list[DStates | None]:
    """The states after a collective turns the `source` key (partial, or split 0) into `target`."""
    if ds is None:
        return [None]
    if ds.get(source) == 1:
        raise OpError(f"{name}: the input has states {ds.states}, with no {_KEY_NAMES.get(source, source)} part "
                      "for this collective to resolve")
    states = dict(ds.states)
    count = states.pop(source)
    states[target] = states.get(target, 1) * count
    order = [target if k == source else k for k in ds.order]
    order = [k for i, k in enumerate(order) if k not in order[:i]]
    return [DStates(ds.device_num, states, tuple(order))]


_KEY_NAMES = {PARTIAL: "partial", DUPLICATE: "duplicate", 0: "split(0)"}


def _check_group_attr(name: str, group) -> None:
    if not isinstance(group, (tuple, list)) or not all(isinstance(r, int) for r in group):
        raise OpError(f"{name}: group must be a tuple of worker ranks (() = all workers), found {group!r}")


def _check_reduce(name: str, reduce: str, allowed: tuple = _REDUCE) -> None:
    if reduce not in allowed:
        raise OpError(f"{name}: reduce must be one of {allowed}, found {reduce!r}")


def _static_size(name: str, group) -> int | None:
    """The group size when it is known while building (a given group, or a resolved world)."""
    if group:
        return len(group)
    return _group(name, group)[1]


def _attach(buffer: torch.Tensor, work, finish: Callable | None) -> torch.Tensor:
    if work is not None or finish is not None:
        setattr(buffer, _PENDING, (work, finish))
    return buffer


def _finish(buffer: torch.Tensor, name: str) -> torch.Tensor:
    pending = buffer.__dict__.pop(_PENDING, None)
    if pending is not None:
        work, finish = pending
        if work is not None:
            try:
                work.wait()
            except RuntimeError as exc:
                raise _comm_failed(f"{name} (waiting for an asynchronous collective)", None, exc) from exc
        if finish is not None:
            finish()
    return buffer


def _run(name: str, ranks, fn, buffer: torch.Tensor, async_op: bool, finish: Callable | None = None):
    """Runs collective `fn(async_op)` writing into `buffer`; synchronous unless `async_op`."""
    if _monitor is not None:
        _monitor.entered(ranks)
    try:
        work = fn(async_op)
        if not async_op:
            if finish is not None:
                finish()
            return buffer
        return _attach(buffer, work, finish)
    except RuntimeError as exc:
        raise _comm_failed(name, ranks, exc) from exc


@register
class AllReduce(OpDef):
    """Sum (or mean, max, min) of `x` over the group, elementwise, on every member."""

    name = "all_reduce"
    attrs = {"reduce": "sum", "group": (), "async_op": False}

    def infer(self, inputs, reduce, group, async_op):
        _check_reduce(self.name, reduce, _ALL_REDUCE)
        _check_group_attr(self.name, group)
        return TensorMeta(inputs[0].shape, inputs[0].dtype)

    def compute(self, x, reduce, group, async_op):
        pg, size, _ = _group(self.name, group)
        out = x.clone(memory_format=torch.contiguous_format)
        if pg is None:
            return out
        finish = (lambda: out.div_(size)) if reduce == "mean" else None
        op = _TORCH_OPS.get(reduce, torch_dist.ReduceOp.SUM)
        return _run(self.name, group, lambda a: torch_dist.all_reduce(out, op=op, group=pg, async_op=a), out,
                    async_op, finish)

    def gradient(self, op, grads):
        reduce, group = op.attrs["reduce"], op.attrs["group"]
        if reduce in _REDUCE:
            return [apply("all_reduce", grads[0], reduce=reduce, group=group)]
        # max / min: every member's output gradient goes to the members holding the extreme,
        # shared evenly among tied members (as torch.amax / amin share it among tied elements)
        x, y = op.inputs[0], op.outputs[0]
        at = apply("cast", apply("equal", x, y), dtype=x.dtype)
        ties = apply("all_reduce", at, reduce="sum", group=group)
        return [apply("all_reduce", grads[0], reduce="sum", group=group) * at / ties]

    def deduce_states(self, input_ds, reduce="sum", **attrs):
        if reduce not in _REDUCE:  # partial states are sums: a max of partials means nothing
            raise OpError(f"{self.name}: reduce={reduce!r} has no distributed-states rule (partials are sums)")
        return _move_states(self.name, input_ds[0], PARTIAL, DUPLICATE)  # partial -> duplicate


@register
class CommWait(OpDef):
    """Waits for the asynchronous collective that produces `x`; returns `x` complete."""

    name = "comm_wait"

    def infer(self, inputs):
        return TensorMeta(inputs[0].shape, inputs[0].dtype)

    @staticmethod
    def compute(x):
        return _finish(x, "comm_wait")

    def gradient(self, op, grads):
        return [grads[0]]


@register
class AllGather(OpDef):
    """The members' `x` concatenated along axis 0, in group order (equal shapes)."""

    name = "all_gather"
    attrs = {"group": (), "async_op": False}

    def infer(self, inputs, group, async_op):
        _check_group_attr(self.name, group)
        x = inputs[0]
        if x.ndim == 0:
            raise self.shape_error(inputs, "all_gather needs at least one dimension")
        size = _static_size(self.name, group)
        rows = None if x.shape[0] is None else x.shape[0] * size
        return TensorMeta((rows,) + x.shape[1:], x.dtype)

    def compute(self, x, group, async_op):
        pg, size, _ = _group(self.name, group)
        if pg is None:
            return x.clone(memory_format=torch.contiguous_format)
        x = x.contiguous()
        out = x.new_empty((x.shape[0] * size,) + tuple(x.shape[1:]))
        return _run(self.name, group, lambda a: _all_gather_single(out, x, group=pg, async_op=a),
                    out, async_op)

    def gradient(self, op, grads):
        return [apply("reduce_scatter", grads[0], reduce="sum", group=op.attrs["group"])]

    def deduce_states(self, input_ds, **attrs):
        return _move_states(self.name, input_ds[0], 0, DUPLICATE)  # split(0) -> duplicate


@register
class ReduceScatter(OpDef):
    """Sum (or mean) over the group of `x`, split along axis 0: member i keeps block i."""

    name = "reduce_scatter"
    attrs = {"reduce": "sum", "group": (), "async_op": False}

    def infer(self, inputs, reduce, group, async_op):
        _check_reduce(self.name, reduce)
        _check_group_attr(self.name, group)
        x = inputs[0]
        size = _static_size(self.name, group)
        if x.ndim == 0 or (x.shape[0] is not None and x.shape[0] % size):
            raise self.shape_error(inputs, f"axis 0 must split evenly over the {size} group members")
        rows = None if x.shape[0] is None else x.shape[0] // size
        return TensorMeta((rows,) + x.shape[1:], x.dtype)

    def compute(self, x, reduce, group, async_op):
        pg, size, _ = _group(self.name, group)
        if pg is None:
            return x.clone(memory_format=torch.contiguous_format)
        if x.shape[0] % size:
            raise OpError(f"reduce_scatter: axis 0 of shape {tuple(x.shape)} does not split over {size} members")
        x = x.contiguous()
        out = x.new_empty((x.shape[0] // size,) + tuple(x.shape[1:]))
        finish = (lambda: out.div_(size)) if reduce == "mean" else None
        return _run(self.name, group, lambda a: _reduce_scatter_single(out, x, group=pg, async_op=a),
                    out, async_op, finish)

    def gradient(self, op, grads):
        g = apply("all_gather", grads[0], group=op.attrs["group"])
        if op.attrs["reduce"] == "mean":
            g = g / _static_size(self.name, op.attrs["group"])
        return [g]

    def deduce_states(self, input_ds, **attrs):
        return _move_states(self.name, input_ds[0], PARTIAL, 0)  # partial -> split(0)


def _check_root(name: str, root: int, group) -> None:
    size = _static_size(name, group)
    if not isinstance(root, int) or not 0 <= root < size:
        raise OpError(f"{name}: the root must be a position in the group of {size}, found {root!r}")


@register
class Broadcast(OpDef):
    """Member `src`'s `x` on every member (`src`: a position in the group, by ascending rank)."""

    name = "broadcast"
    attrs = {"src": 0, "group": (), "async_op": False}

    def infer(self, inputs, src, group, async_op):
        _check_group_attr(self.name, group)
        _check_root(self.name, src, group)
        return TensorMeta(inputs[0].shape, inputs[0].dtype)

    def compute(self, x, src, group, async_op):
        pg, _, _ = _group(self.name, group)
        out = x.clone(memory_format=torch.contiguous_format)
        if pg is None:
            return out
        src_rank = sorted(group)[src] if group else src
        return _run(self.name, group, lambda a: torch_dist.broadcast(out, src_rank, group=pg, async_op=a), out,
                    async_op)

    def gradient(self, op, grads):
        return [apply("reduce", grads[0], dst=op.attrs["src"], group=op.attrs["group"])]


@register
class Reduce(OpDef):
    """The sum of `x` over the group on member `dst` (a position by ascending rank); zeros elsewhere."""

    name = "reduce"
    attrs = {"dst": 0, "group": ()}

    def infer(self, inputs, dst, group):
        _check_group_attr(self.name, group)
        _check_root(self.name, dst, group)
        return TensorMeta(inputs[0].shape, inputs[0].dtype)

    def compute(self, x, dst, group):
        pg, _, me = _group(self.name, group)
        out = x.clone(memory_format=torch.contiguous_format)
        if pg is None:
            return out
        dst_rank = sorted(group)[dst] if group else dst
        _run(self.name, group, lambda a: torch_dist.reduce(out, dst_rank, group=pg, async_op=a), out, False)
        if me != dst:  # torch leaves the other members' buffers unspecified
            out.zero_()
        return out

    def gradient(self, op, grads):
        return [apply("broadcast", grads[0], src=op.attrs["dst"], group=op.attrs["group"])]


@register
class AllToAll(OpDef):
    """Block j of `x` (axis 0) goes to member j; the output stacks the blocks received, in order.

    Equal blocks by default; `input_splits` / `output_splits` give the rows sent to and
    received from each member for unequal ones.
    """

    name = "all_to_all"
    attrs = {"input_splits": (), "output_splits": (), "group": (), "async_op": False}

    def infer(self, inputs, input_splits, output_splits, group, async_op):
        _check_group_attr(self.name, group)
        x = inputs[0]
        size = _static_size(self.name, group)
        if x.ndim == 0:
            raise self.shape_error(inputs, "all_to_all needs at least one dimension")
        if bool(input_splits) != bool(output_splits):
            raise OpError("all_to_all: give both input_splits and output_splits, or neither")
        if not input_splits:
            if x.shape[0] is not None and x.shape[0] % size:
                raise self.shape_error(inputs, f"axis 0 must split evenly over the {size} group members")
            return TensorMeta(x.shape, x.dtype)
        for what, splits in (("input_splits", input_splits), ("output_splits", output_splits)):
            if len(splits) != size or any(not isinstance(s, int) or s < 0 for s in splits):
                raise OpError(f"all_to_all: {what} must be {size} non-negative ints, found {splits!r}")
        if x.shape[0] is not None and x.shape[0] != sum(input_splits):
            raise self.shape_error(inputs, f"axis 0 must equal sum(input_splits) = {sum(input_splits)}")
        return TensorMeta((sum(output_splits),) + x.shape[1:], x.dtype)

    def compute(self, x, input_splits, output_splits, group, async_op):
        pg, _, _ = _group(self.name, group)
        if pg is None:
            return x.clone(memory_format=torch.contiguous_format)
        x = x.contiguous()
        rows = sum(output_splits) if output_splits else x.shape[0]
        out = x.new_empty((rows,) + tuple(x.shape[1:]))
        ins, outs = (list(input_splits), list(output_splits)) if input_splits else (None, None)
        return _run(self.name, group, lambda a: torch_dist.all_to_all_single(out, x, outs, ins, group=pg, async_op=a),
                    out, async_op)

    def gradient(self, op, grads):
        a = op.attrs
        return [apply("all_to_all", grads[0], input_splits=a["output_splits"], output_splits=a["input_splits"],
                      group=a["group"])]


# --- point to point (pipeline stage boundaries) --------------------------------------------
# The pipeline partition pass derives these where the device group changes (a tensor made on
# one stage, read on another): `send` on the producer's side, `recv` on the consumer's. Their
# gradients are each other: the gradient of a send is a recv of the gradient from the peer (tag
# + GRAD_TAG), and a recv's dual (`recv_dual`) sends the gradient of what it received back.
GRAD_TAG = 2  # data tag t, shape header t + 1; the gradient's data t + 2, its header t + 3
_RECV_WAIT = [0.0]  # seconds spent inside recv (waiting for a peer): the pipeline's bubble


def recv_wait_seconds() -> float:
    """Seconds every `recv` of this process has spent so far (mostly waiting for its peer)."""
    return _RECV_WAIT[0]


# Inside `shapes_once`: (direction, peer, tag) -> the run-time shape already exchanged there.
_SHAPES: list[dict | None] = [None]


@contextlib.contextmanager
def shapes_once() -> Iterator[None]:
    """Inside this scope a run-time shape crosses each (peer, tag) once: the first `send` with
    `header` there sends it and the first `recv` receives it; later messages on that channel
    reuse it and travel as data alone (one message instead of two, and no blocking header
    recv). Both peers must run the same messages in the scope and every message on a channel
    must have the first one's shape: a pipeline step, whose micro-batches share one shape
    (a send that breaks this raises instead of sending a wrong size)."""
    outer, _SHAPES[0] = _SHAPES[0], {}
    try:
        yield
    finally:
        _SHAPES[0] = outer


# Inside `posted_recvs`: (peer, tag) -> the channel's receives posted ahead of their `recv`.
_POSTED: list[dict | None] = [None]


class _Channel:
    """The receives of one (peer, tag) channel that a schedule knows will come: `left` not posted yet,
    `queue` posted (irecv into their own buffer, in message order), `header` the posted receive of
    the run-time shape (a channel whose shape is not known yet)."""

    __slots__ = ("peer", "tag", "shape", "dtype", "device", "left", "depth", "queue", "header")

    def __init__(self, peer: int, tag: int, shape: tuple, dtype: str, device, count: int, depth: int):
        self.peer, self.tag, self.shape, self.dtype, self.device = peer, tag, tuple(shape), dtype, device
        self.left, self.depth, self.queue, self.header = count, depth, [], None

    def top_up(self) -> None:
        """Posts receives until `depth` are outstanding (once the shape is known)."""
        while self.left > 0 and len(self.queue) < self.depth and all(d != -1 for d in self.shape):
            out = torch.empty(self.shape, dtype=dtypes.to_torch(self.dtype), device=self.device)
            try:
                self.queue.append((torch_dist.irecv(out, self.peer, tag=self.tag), out))
            except RuntimeError as exc:
                raise _comm_failed(f"recv from worker {self.peer}", (self.peer,), exc) from exc
            self.left -= 1


@contextlib.contextmanager
def posted_recvs(channels: dict, depth: int = 2) -> Iterator[None]:
    """Receives posted ahead of need: `channels` maps (peer, tag) -> (shape, dtype, device, count),
    the `count` messages a schedule knows will arrive there in this scope. Up to `depth` of them
    stay posted (irecv into the buffer the `recv` op then returns: no copy) while the plans compute,
    so a sender's data lands at once instead of waiting for the receiver to ask; each `recv` on the
    channel takes the oldest and posts the next. A run-time shape (-1) is posted once known: from
    an enclosing `shapes_once` scope, else its header's receive is posted first. Every counted
    message must be received in the scope (a pipeline step receives exactly its schedule's)."""
    known = _SHAPES[0]
    outer, _POSTED[0] = _POSTED[0], {}
    try:
        for (peer, tag), (shape, dtype, device, count) in channels.items():
            _p2p_ready("recv", peer)
            ch = _POSTED[0][(peer, tag)] = _Channel(peer, tag, shape, dtype, device, count, depth)
            if any(d == -1 for d in ch.shape):
                if known is not None and ("recv", peer, tag) in known:
                    ch.shape = known[("recv", peer, tag)]
                elif count > 0:
                    sizes = torch.empty(len(ch.shape), dtype=torch.int64)
                    ch.header = (torch_dist.irecv(sizes, peer, tag=tag + 1), sizes)
            ch.top_up()
        yield
        left = {k: ch.left + len(ch.queue) for k, ch in _POSTED[0].items() if ch.left or ch.queue}
        if left:
            raise ExecutionError(f"posted_recvs: messages counted but never received, per (peer, tag): {left}")
    finally:
        _POSTED[0] = outer


def _take_posted(ch: _Channel, shape: tuple, key: tuple) -> torch.Tensor:
    """The next message of a posted channel (waits for it; posts the following ones first)."""
    if not ch.queue:
        if ch.header is None:
            raise ExecutionError(f"recv from worker {ch.peer} (tag {ch.tag}): more messages than the "
                                 f"posted_recvs scope counted")
        work, sizes = ch.header
        ch.header = None
        work.wait()
        got = tuple(sizes.tolist())
        if len(got) != len(shape) or any(d not in (-1, g) for d, g in zip(shape, got)):
            raise ExecutionError(f"recv from worker {ch.peer}: expected shape {shape}, the sender sent {got}")
        if _SHAPES[0] is not None:
            _SHAPES[0][key] = got
        ch.shape = got
        ch.top_up()
    work, out = ch.queue.pop(0)
    ch.top_up()
    work.wait()
    return out


class _Sends:
    """The pending isends of one `send` (header and data), holding their buffers until done."""

    __slots__ = ("works", "buffers")

    def __init__(self, works: list, buffers: list):
        self.works, self.buffers = works, buffers

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works, self.buffers = [], []


def _check_peer(name: str, peer, tag) -> None:
    for what, v in (("peer", peer), ("tag", tag)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise OpError(f"{name}: {what} must be a non-negative int (a worker rank, a message tag), found {v!r}")


def _p2p_ready(name: str, peer: int) -> None:
    if not torch_dist.is_available() or not torch_dist.is_initialized():
        raise Error(f"{name}: a point-to-point transfer with worker {peer} needs luoshu.distributed (luoshu launch)")


@register
class Send(OpDef):
    """Sends `x` to worker `peer` without waiting (isend); returns a token: the bytes sent, with
    the transfer pending on it (`comm_wait` or the pipeline runtime waits). `header`: the shape
    travels first (the receiver's shape has run-time dimensions)."""

    name = "send"
    attrs = {"peer": 0, "tag": 0, "header": False}
    tested_by = "tests/parallel/test_pipeline.py"  # run across processes by the pipeline parity tests

    def infer(self, inputs, peer, tag, header):
        _check_peer(self.name, peer, tag)
        return TensorMeta((), "int64")

    def compute(self, x, peer, tag, header):
        _p2p_ready(self.name, peer)
        x = x.contiguous()
        works, buffers = [], [x]
        known, key = _SHAPES[0], ("send", peer, tag)
        if header and known is not None:
            if key in known:
                if known[key] != tuple(x.shape):
                    raise ExecutionError(f"send to worker {peer} (tag {tag}): shape {tuple(x.shape)} after "
                                         f"{known[key]} on the same channel in one shapes_once scope")
                header = False  # the receiver kept the first message's shape
            else:
                known[key] = tuple(x.shape)
        try:
            if header:
                shape = torch.tensor(tuple(x.shape), dtype=torch.int64)
                buffers.append(shape)
                works.append(torch_dist.isend(shape, peer, tag=tag + 1))
            works.append(torch_dist.isend(x, peer, tag=tag))
        except RuntimeError as exc:
            raise _comm_failed(f"send to worker {peer}", (peer,), exc) from exc
        token = torch.tensor(x.numel() * x.element_size(), dtype=torch.int64)
        return _attach(token, _Sends(works, buffers), None)

    def gradient(self, op, grads):
        x = op.inputs[0]
        if not dtypes.is_floating(x.dtype):
            return [None]
        a = op.attrs
        return [apply("recv", shape=tuple(-1 if d is None else d for d in x.shape), dtype=x.dtype,
                      device=x.device, peer=a["peer"], tag=a["tag"] + GRAD_TAG)]

    def deduce_states(self, input_ds, **attrs):
        # A stage sends whole activations: each member of the stage's TP group to its counterpart.
        n = S.group_size(input_ds)
        if n is None or S.key(input_ds[0]) == DUPLICATE:
            return [None]
        raise S.NeedStates(self.name, [S.Candidate((S.dup(n),), (S.dup(n),))], input_ds)


@register
class Recv(OpDef):
    """Receives a tensor from worker `peer` (blocking): `shape` with -1 for a run-time dimension
    (its sizes then arrive first, from a `send` with `header`; inside `shapes_once`, only with
    the channel's first message)."""

    name = "recv"
    attrs = {"shape": (), "dtype": "float32", "device": "cpu", "peer": 0, "tag": 0}
    tested_by = "tests/parallel/test_pipeline.py"  # run across processes by the pipeline parity tests

    def infer(self, inputs, shape, dtype, device, peer, tag):
        _check_peer(self.name, peer, tag)
        if not all(isinstance(d, int) and d >= -1 for d in shape):
            raise OpError(f"recv: shape must be sizes >= 0 or -1 (a run-time size), found {shape!r}")
        return TensorMeta(tuple(None if d == -1 else d for d in shape), dtype, device)

    def compute(self, shape, dtype, device, peer, tag):
        _p2p_ready(self.name, peer)
        start = time.perf_counter()
        try:
            known, key = _SHAPES[0], ("recv", peer, tag)
            channel = _POSTED[0].get((peer, tag)) if _POSTED[0] is not None else None
            if channel is not None:
                return _take_posted(channel, shape, key)
            if any(d == -1 for d in shape) and known is not None and key in known:
                shape = known[key]  # this channel's shape arrived with its first message in the scope
            elif any(d == -1 for d in shape):
                sizes = torch.empty(len(shape), dtype=torch.int64)
                torch_dist.recv(sizes, peer, tag=tag + 1)
                got = tuple(sizes.tolist())
                if any(d not in (-1, g) for d, g in zip(shape, got)):
                    raise ExecutionError(f"recv from worker {peer}: expected shape {shape}, the sender sent {got}")
                if known is not None:
                    known[key] = got
                shape = got
            out = torch.empty(shape, dtype=dtypes.to_torch(dtype), device=device)
            torch_dist.recv(out, peer, tag=tag)
        except RuntimeError as exc:
            raise _comm_failed(f"recv from worker {peer}", (peer,), exc) from exc
        finally:
            _RECV_WAIT[0] += time.perf_counter() - start
        return out

    def gradient(self, op, grads):
        return []  # no inputs: the gradient of what arrived goes back through `recv_dual`


def recv_dual(op, grad: Tensor | None) -> Tensor | None:
    """The dual of a `recv` op: sends the gradient of its output back to the peer (zeros when
    nothing downstream is differentiable, so the peer's matching recv never waits forever)."""
    meta = op.outputs[0]
    if not dtypes.is_floating(meta.dtype):
        return None
    if grad is None:
        grad = apply("zeros_like", meta)
    a = op.attrs
    return apply("send", grad, peer=a["peer"], tag=a["tag"] + GRAD_TAG, header=any(d == -1 for d in a["shape"]))


# --- gradient synchronisation (data parallelism) ------------------------------------------
class BucketBuffer:
    """The persistent flat buffer of one gradient bucket, reused every step.

    A fresh buffer per step costs more than the copy into it (first-touch page faults on
    CPU, allocator churn on GPU); DDP keeps its buckets for the same reason. Whoever
    inserts a `bucket_all_reduce` owns the BucketBuffer and keeps it alive; the op names
    it by `key`.
    """

    def __init__(self):
        self.tensor: torch.Tensor | None = None
        self.key = live.register(self)


def _bucket_buffer(key: int, numel_: int, like: torch.Tensor, avoid=()) -> torch.Tensor:
    """The persistent flat buffer of BucketBuffer `key` (-1: a fresh one), allocated anew when
    missing, of another size, dtype or device, or aliased by a tensor of `avoid`."""
    holder = live.lookup(key, "bucket buffer", "bucket_all_reduce") if key >= 0 else None
    buf = holder.tensor if holder is not None else None
    if buf is None or buf.numel() != numel_ or buf.dtype != like.dtype or buf.device != like.device or \
            any(x.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() for x in avoid):
        buf = torch.empty(numel_, dtype=like.dtype, device=like.device)
        if holder is not None:
            holder.tensor = buf
    return buf


@register
class BucketAllReduce(OpDef):
    """Copies `xs` into one flat buffer and starts its all-reduce; `bucket_unpack` waits and splits.

    One collective per bucket instead of one per gradient, launched as soon as the
    bucket's last gradient exists. For a mean, each piece is scaled by 1/size while it
    is copied in (one pass, like DDP's gradient pre-division). `buffer` names a
    `BucketBuffer` to reuse (-1: a new buffer each run). A piece that `bucket_place`
    already computed in the buffer at its position (scaled) is neither copied nor scaled:
    gradients planned as views of the bucket reach the all-reduce with no copy at all.
    """

    name = "bucket_all_reduce"
    attrs = {"reduce": "mean", "group": (), "buffer": -1}
    differentiable = False
    tested_by = "tests/distributed/test_comm_ops.py"

    def infer(self, inputs, reduce, group, buffer):
        _check_reduce(self.name, reduce)
        _check_group_attr(self.name, group)
        if not inputs or len({t.dtype for t in inputs}) != 1:
            raise OpError(f"{self.name}: needs one or more inputs of one dtype, found "
                          f"{sorted({t.dtype for t in inputs})}")
        sizes = [numel(t.shape) for t in inputs]
        total = None if any(s is None for s in sizes) else sum(sizes)
        return TensorMeta((total,), inputs[0].dtype)

    def compute(self, *xs, reduce, group, buffer):
        return self.bind({"reduce": reduce, "group": group, "buffer": buffer})(*xs)

    def bind(self, attrs):
        # Per step this is the bucket's only CPU work besides the collective, so what does not
        # change between steps is found once: the buffer's holder here, the pieces and their
        # offsets on the buffer itself, and the bucket_place pieces that filled it whole last step
        # (known again by identity alone). At 1-4 MB the per-step Python was a sizeable part of the step.
        name, reduce, group, key = self.name, attrs["reduce"], attrs["group"], attrs["buffer"]
        holder = live.lookup(key, "bucket buffer", name) if key >= 0 else None
        placed: list = [None, ()]  # a buffer and the bucket_place pieces last found to fill it whole

        def kernel(*xs):
            # the group is looked up per run, not kept here: a plan that outlives
            # luoshu.distributed.shutdown() must not keep the destroyed group (and its native
            # threads) alive until the interpreter's teardown
            pg, size, _ = _group(name, group)
            scale = 1.0 / size if reduce == "mean" and size > 1 else None
            flat = holder.tensor if holder is not None else None
            # the very pieces bucket_place wrote this step (gradients as bucket views): nothing to do
            if flat is None or flat is not placed[0] or len(xs) != len(placed[1]) or \
                    not all(map(operator.is_, xs, placed[1])):
                flat, all_placed = _fill_bucket(holder, key, xs, scale)
                placed[:] = (flat, xs) if all_placed else (None, ())
            if pg is None:
                return flat
            return _run(name, group, lambda a: torch_dist.all_reduce(flat, group=pg, async_op=a), flat, True)

        return kernel


def _fill_bucket(holder, key: int, xs: tuple, scale: float | None) -> tuple[torch.Tensor, bool]:
    """The bucket's flat buffer holding `xs` back to back, each times `scale` (None: as they are),
    and whether every piece was already there: one bucket_place computed in place (scaled), left
    as it is."""
    flat = holder.tensor if holder is not None else None
    layout = _layout_like(flat, xs) if flat is not None else None
    if layout is None:  # a new layout (or no buffer yet): the buffer is reused if it fits
        flat = _bucket_buffer(key, sum(x.numel() for x in xs), xs[0])
        layout = _layout(flat, tuple(tuple(x.shape) for x in xs))
    pieces, offsets = layout
    # computed in the bucket at its position by bucket_place (already scaled): its very piece, not
    # merely a tensor there (an earlier bucket_unpack's piece fed back in still has to be scaled)
    at = flat.__dict__.get(_PIECES_AT)
    placed = [at.get(o) is x for o, x in zip(offsets, xs)] if at else [False] * len(xs)
    if all(placed):  # gradients as bucket views: nothing to copy, nothing to scale
        return flat, True
    if _aliases(flat, [x for x, p in zip(xs, placed) if not p]):  # the fill would overwrite an input
        flat = _bucket_buffer(key, flat.numel(), xs[0], [flat])
        pieces, _ = _layout(flat, tuple(tuple(x.shape) for x in xs))
    copy = [(v, x) for x, v, p in zip(xs, pieces, placed) if p and v.data_ptr() != x.data_ptr()]  # scaled
    fill = [(v, x) for x, v, p in zip(xs, pieces, placed) if not p]
    if scale is None:
        copy, fill = copy + fill, []
    if copy:
        torch._foreach_copy_(*map(list, zip(*copy)))
    if fill and flat.numel() * flat.element_size() <= _TWO_PASS_BYTES:
        dst, src = map(list, zip(*fill))
        torch._foreach_copy_(dst, src)  # then scaled in place: one kernel each, in cache
        if len(fill) == len(xs):
            flat.mul_(scale)
        else:
            torch._foreach_mul_(dst, scale)
    else:
        for v, x in fill:  # past the cache a second pass costs more than a launch per piece
            torch.mul(x, scale, out=v)
    return flat, False


# Buckets up to this size are filled by a copy and an in-place scale (two passes over memory that
# stays in cache, a kernel each); larger ones by one scaled copy per piece.
_TWO_PASS_BYTES = 4 * 2**20


def _aliases(flat: torch.Tensor, xs: list) -> bool:
    """Whether any of `xs` reads memory of `flat` (it must not be overwritten by the fill)."""
    start = flat.data_ptr()
    end = start + flat.numel() * flat.element_size()
    return any(start <= x.data_ptr() < end for x in xs)


@register
class BucketPlace(OpDef):
    """Runs op `op` (attributes `op_attrs`) on the inputs and writes its one output (of static
    `shape` and `dtype`), times 1/size for a mean, straight into bucket `buffer` at element
    `offset` (a bucket of `total` elements): the gradient is born as a view of the bucket
    (PyTorch DDP's `gradient_as_bucket_view`), so `bucket_all_reduce` has nothing to copy.
    Ops with a `bind_into` kernel (matmul, sum) write there themselves; others are
    computed and copied in.
    """

    name = "bucket_place"
    attrs = {"op": "", "op_attrs": {}, "shape": (), "dtype": "float32", "buffer": -1, "offset": 0, "total": 0,
             "reduce": "mean", "group": ()}
    differentiable = False
    tested_by = "tests/parallel/test_data_parallel.py"

    def infer(self, inputs, op, op_attrs, shape, dtype, buffer, offset, total, reduce, group):
        _check_reduce(self.name, reduce)
        _check_group_attr(self.name, group)
        opdef = get_opdef(op)
        meta = opdef.infer(inputs, **{**opdef.attrs, **op_attrs})
        meta = meta[0] if isinstance(meta, list) and len(meta) == 1 else meta
        if not isinstance(meta, TensorMeta) or tuple(meta.shape) != tuple(shape) or meta.dtype != dtype:
            raise OpError(f"{self.name}: op {op!r} gives {meta}, the bucket piece is {tuple(shape)} {dtype}")
        n = numel(tuple(shape))
        if buffer < 0 or n is None or not 0 <= offset <= total - n:
            raise OpError(f"{self.name}: a piece of {n} elements at offset {offset} does not fit a bucket of "
                          f"{total} (buffer {buffer})")
        return meta

    def compute(self, *values, **attrs):
        return self.bind(attrs)(*values)

    def bind(self, attrs):
        # What does not change between steps (the op, its attributes, the scale, the piece of the
        # persistent buffer, the kernel writing into it) is found once per plan step, and again only
        # when the buffer is reallocated: at 1 MB buckets the per-step Python work was a sizeable
        # part of the step.
        opdef = get_opdef(attrs["op"])
        op_attrs = {**opdef.attrs, **attrs["op_attrs"]}
        compute = opdef.compute
        holder = live.lookup(attrs["buffer"], "bucket buffer", self.name)
        cut: list = [None, None, 1.0, None]  # the buffer the piece is cut from, the piece, the scale, its writer

        def kernel(*values):
            if cut[0] is None or holder.tensor is not cut[0]:
                cut[:3] = _cut_piece(holder, attrs, values)
                cut[3] = opdef.bind_into(cut[1], cut[2], op_attrs)
            piece, write = cut[1], cut[3]
            if write is None or not write(*values):
                result = compute(*values, **op_attrs)
                if cut[2] == 1.0:
                    piece.copy_(result)
                else:
                    torch.mul(result, cut[2], out=piece)
            return piece

        return kernel


def _cut_piece(holder: BucketBuffer, attrs: dict, values: tuple) -> list:
    """[bucket buffer, the piece bucket_place `attrs` writes, its scale]: the buffer allocated if
    missing, the piece kept on it (so bucket_all_reduce knows it by identity)."""
    shape, offset = tuple(attrs["shape"]), attrs["offset"]
    _, size, _ = _group(BucketPlace.name, attrs["group"])
    scale = 1.0 / size if attrs["reduce"] == "mean" and size > 1 else 1.0
    flat = holder.tensor
    pieces = flat.__dict__.get(_PIECES_AT) if flat is not None else None
    piece = pieces.get(offset) if pieces is not None else None
    if piece is None or tuple(piece.shape) != shape:
        device = next(v.device for v in values if isinstance(v, torch.Tensor))
        like = torch.empty(0, dtype=dtypes.to_torch(attrs["dtype"]), device=device)
        flat = _bucket_buffer(attrs["buffer"], attrs["total"], like)
        piece = flat[offset:offset + numel(shape)].view(shape)
        flat.__dict__.setdefault(_PIECES_AT, {})[offset] = piece
    return [flat, piece, scale]


_PIECES_AT = "_luoshu_pieces_at"  # attribute of a bucket buffer: offset -> the piece bucket_place writes


@register
class BucketUnpack(OpDef):
    """Waits for a `bucket_all_reduce` and returns its pieces with the given shapes."""

    name = "bucket_unpack"
    attrs = {"shapes": ()}
    differentiable = False
    tested_by = "tests/distributed/test_comm_ops.py"

    def infer(self, inputs, shapes):
        if not shapes:
            raise OpError(f"{self.name}: shapes must list the bucket's pieces")
        total = inputs[0].shape[0]
        if total is not None and total != sum(numel(tuple(s)) for s in shapes):
            raise self.shape_error(inputs, f"the bucket must hold exactly the pieces {list(shapes)}")
        return [TensorMeta(tuple(s), inputs[0].dtype) for s in shapes]

    @staticmethod
    def compute(flat, shapes):
        out, _ = _layout(_finish(flat, "bucket_unpack"), shapes)
        return out if len(out) > 1 else out[0]


_LAYOUT = "_luoshu_layout"  # attribute of a bucket buffer: (shapes, its pieces, their offsets), made once


def _layout(flat: torch.Tensor, shapes: tuple) -> tuple[tuple, tuple]:
    """The views of `flat` with `shapes`, back to back, and their element offsets. A persistent
    bucket buffer comes back every step: its layout is made once and kept on it (it dies with it)."""
    cached = flat.__dict__.get(_LAYOUT)
    if cached is not None and cached[0] == shapes:
        return cached[1:]
    out, offsets, pos = [], [], 0
    for s in shapes:
        n = numel(tuple(s))
        out.append(flat[pos:pos + n].view(tuple(s)))
        offsets.append(pos)
        pos += n
    flat.__dict__[_LAYOUT] = (shapes, tuple(out), tuple(offsets))
    return tuple(out), tuple(offsets)


def _layout_like(flat: torch.Tensor, xs: tuple) -> tuple[tuple, tuple] | None:
    """`flat`'s cached layout when its pieces have the shapes of `xs`, else None."""
    cached = flat.__dict__.get(_LAYOUT)
    if cached is None or len(cached[1]) != len(xs) or any(v.shape != x.shape for v, x in zip(cached[1], xs)):
        return None
    return cached[1:]


@register
class SparseAllGather(OpDef):
    """An IndexedSlices gradient gathered over the group: every member's (indices, values).

    Members may hold different numbers of rows (padded to the longest on the wire). With
    `reduce="mean"` the values are divided by the group size. The table is never densified.
    """

    name = "sparse_all_gather"
    attrs = {"reduce": "mean", "group": ()}
    differentiable = False
    tested_by = "tests/distributed/test_comm_ops.py"

    def infer(self, inputs, reduce, group):
        _check_reduce(self.name, reduce)
        _check_group_attr(self.name, group)
        indices, values = inputs
        if indices.ndim != 1 or values.ndim < 1:
            raise self.shape_error(inputs, "needs 1-D indices and values with one row per index")
        return [TensorMeta((None,), indices.dtype), TensorMeta((None,) + values.shape[1:], values.dtype)]

    def compute(self, indices, values, reduce, group):
        pg, size, _ = _group(self.name, group)
        if pg is None:
            return indices.clone(), values.clone()
        try:
            # on the indices' device: NCCL gathers CUDA tensors only
            counts = torch.empty(size, dtype=torch.int64, device=indices.device)
            _all_gather_single(counts, torch.tensor([indices.shape[0]], dtype=torch.int64, device=indices.device),
                               group=pg)
            longest = int(counts.max())
            idx = indices.new_zeros((longest,))
            idx[:indices.shape[0]] = indices
            val = values.new_zeros((longest,) + tuple(values.shape[1:]))
            val[:values.shape[0]] = values
            all_idx = idx.new_empty((size * longest,))
            all_val = val.new_empty((size * longest,) + tuple(values.shape[1:]))
            w1 = _all_gather_single(all_idx, idx, group=pg, async_op=True)
            w2 = _all_gather_single(all_val, val.contiguous(), group=pg, async_op=True)
            w1.wait()
            w2.wait()
        except RuntimeError as exc:
            raise _comm_failed(self.name, group, exc) from exc
        if int(counts.min()) != longest:
            keep = torch.cat([torch.arange(r * longest, r * longest + c, device=indices.device)
                              for r, c in enumerate(counts.tolist())])
            all_idx, all_val = all_idx[keep], all_val[keep]
        if reduce == "mean":
            all_val.div_(size)
        return all_idx, all_val


# --- functions ---------------------------------------------------------------------------
def _ranks(group) -> tuple:
    if group is None:
        return ()
    return tuple(int(r) for r in getattr(group, "ranks", group))


def all_reduce(x: Tensor, reduce: str = "sum", group=None, async_op: bool = False) -> Tensor:
    """Sum (or mean, max, min: `reduce`) over `group` (a DeviceGroup or worker ranks; None = all
    workers). With `async_op`, pass the result through `comm_wait` before reading it."""
    return apply("all_reduce", x, reduce=reduce, group=_ranks(group), async_op=async_op)


def comm_wait(x: Tensor) -> Tensor:
    return apply("comm_wait", x)


def all_gather(x: Tensor, group=None, async_op: bool = False) -> Tensor:
    return apply("all_gather", x, group=_ranks(group), async_op=async_op)


def reduce_scatter(x: Tensor, reduce: str = "sum", group=None, async_op: bool = False) -> Tensor:
    return apply("reduce_scatter", x, reduce=reduce, group=_ranks(group), async_op=async_op)


def broadcast(x: Tensor, src: int = 0, group=None, async_op: bool = False) -> Tensor:
    return apply("broadcast", x, src=src, group=_ranks(group), async_op=async_op)


def reduce(x: Tensor, dst: int = 0, group=None) -> Tensor:
    return apply("reduce", x, dst=dst, group=_ranks(group))


def all_to_all(x: Tensor, input_splits=None, output_splits=None, group=None, async_op: bool = False) -> Tensor:
    return apply("all_to_all", x, input_splits=tuple(input_splits or ()), output_splits=tuple(output_splits or ()),
                 group=_ranks(group), async_op=async_op)
