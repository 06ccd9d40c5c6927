"""The gradient all-reduce pass of data parallelism: all-reduce an update op's gradients in buckets before it runs.

`insert_gradient_allreduce` rewrites one `optimizer_update` op of a define-and-run graph:
its dense gradients are grouped, in the order the backward pass produces them, into
buckets of about `bucket_bytes` (one dtype per bucket); each bucket becomes one
`bucket_all_reduce` (flatten + asynchronous all-reduce, mean) followed by one
`bucket_unpack` (wait + split back into gradients) that feeds the update. Sparse
gradients (IndexedSlices, two inputs of the update) go through `sparse_all_gather`:
every worker's rows and values, never a dense table. The comm scheduling pass then
starts each bucket as soon as its last gradient exists and waits only before the update.
"""

from __future__ import annotations

import weakref

from luoshu.compiler.passes import reposition
from luoshu.core import dtypes
from luoshu.core.errors import GraphError
from luoshu.core.op import Op, apply
from luoshu.core.shapes import numel
from luoshu.ops.comm import BucketBuffer
from luoshu.ops.update import update_entries, update_inputs

_REWRITTEN: weakref.WeakSet = weakref.WeakSet()
# graph -> the persistent bucket buffers its bucket_all_reduce ops name (freed with the graph)
_BUFFERS_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class BucketFiller:
    """Groups tensors into all-reduce buckets as they arrive: at most `bucket_bytes` per bucket
    (at least one tensor), one dtype per bucket; a bucket closes when the next tensor of its
    dtype would overflow it. The one bucketing rule of both modes: the graph pass feeds it the
    gradients in the order backward records them, eager data parallelism as backward
    finishes them."""

    def __init__(self, bucket_bytes: int):
        self.bucket_bytes = bucket_bytes
        self._open: dict = {}  # dtype -> (items, bytes so far)

    def add(self, item, size_bytes: int, dtype) -> list | None:
        """Adds `item`; returns the bucket this closed (its items), or None."""
        items, nbytes = self._open.get(dtype, ([], 0))
        closed = None
        if items and nbytes + size_bytes > self.bucket_bytes:
            closed, items, nbytes = items, [], 0
        items.append(item)
        self._open[dtype] = (items, nbytes + size_bytes)
        return closed

    def close(self) -> list[list]:
        """The buckets still open (each non-empty); the filler starts over empty."""
        buckets = [items for items, _ in self._open.values() if items]
        self._open = {}
        return buckets


def plan_buckets(sizes_bytes: list[int], dtype_names: list[str], bucket_bytes: int) -> list[list[int]]:
    """`BucketFiller` over positions 0..n-1: the buckets, ordered by their first position."""
    filler, buckets = BucketFiller(bucket_bytes), []
    for i, (size, dtype) in enumerate(zip(sizes_bytes, dtype_names)):
        closed = filler.add(i, size, dtype)
        if closed is not None:
            buckets.append(closed)
    buckets += filler.close()
    return sorted(buckets, key=lambda b: b[0])


def _placeable(g, update: Op, graph) -> bool:
    """Whether gradient `g` can be computed straight into its bucket: made by a graph op with
    a `bind_into` kernel and one output, and read by nothing but the update."""
    if g.producer is None:
        return False
    producer = g.producer[0]
    if producer.graph is not graph or producer.opdef.bind_into is None or len(producer.outputs) != 1:
        return False
    return not any(t is g for op in graph.ops if op is not update for t in op.inputs)


def _place_in_bucket(grads: list, buffer: BucketBuffer, update: Op, graph, group: tuple, after: dict) -> list:
    """`grads` with each placeable one recomputed by `bucket_place` into `buffer`; each
    bucket_place is listed in `after` under the op it replaces, to be recorded where that op
    was (recorded at the end, it would run at the end of the backward and keep the inputs of
    every weight gradient alive until then)."""
    total = sum(numel(g.shape) for g in grads)
    placed, offset = [], 0
    for g in grads:
        if _placeable(g, update, graph):
            producer = g.producer[0]
            g = apply("bucket_place", *producer.inputs, op=producer.opdef.name, op_attrs=dict(producer.attrs),
                      shape=tuple(g.shape), dtype=g.dtype, buffer=buffer.key, offset=offset, total=total,
                      reduce="mean", group=tuple(group))
            after[id(producer)] = [g.producer[0]]
        placed.append(g)
        offset += numel(g.shape)
    return placed


def insert_gradient_allreduce(graph, update: Op, bucket_bytes: int, group: tuple = (),
                              bucket_views: bool = True) -> int:
    """Rewrites `update` (an optimizer_update of `graph`) to read all-reduced gradients.

    With `bucket_views`, a gradient whose producer can write into a given buffer (a matmul,
    a sum) is computed as a view of its bucket (`bucket_place`), so the all-reduce copies
    nothing in. Returns the number of dense buckets. A second call on the same op does nothing.
    """
    if update.opdef.name != "optimizer_update" or update.graph is not graph:
        raise GraphError(f"insert_gradient_allreduce: expected an optimizer_update op of graph '{graph.name}', "
                         f"found {update!r}")
    if update in _REWRITTEN:
        return 0
    # Autodiff records the backward last layer first: the recording order is the order in
    # which the gradients become final, so buckets fill (and start) in that order.
    order = {id(op): i for i, op in enumerate(graph.ops)}

    def produced_at(t) -> int:
        return order.get(id(t.producer[0]), -1) if t.producer is not None else -1

    entries = update_entries(update.attrs["params"], update.attrs["kinds"], update.inputs)
    dense = [e for e in entries if e.kind == "d"]
    dense.sort(key=lambda e: produced_at(e.inputs[0]))
    replaced: dict[int, list] = {}
    placed_after: dict[int, list] = {}  # id(gradient op) -> [the bucket_place replacing it]
    n_buckets = 0
    with graph:
        sizes, names = [], []
        for _, _, (g,) in dense:
            count = numel(g.shape)
            if count is None:
                raise GraphError(f"insert_gradient_allreduce: gradient {g!r} has a run-time shape; dense "
                                 "gradients of parameters have static shapes")
            sizes.append(count * dtypes.to_torch(g.dtype).itemsize)
            names.append(g.dtype)
        for bucket in plan_buckets(sizes, names, bucket_bytes):
            grads = [dense[i][2][0] for i in bucket]
            buffer = BucketBuffer()
            _BUFFERS_OF.setdefault(graph, []).append(buffer)
            if bucket_views:
                grads = _place_in_bucket(grads, buffer, update, graph, group, placed_after)
            flat = apply("bucket_all_reduce", *grads, reduce="mean", group=tuple(group), buffer=buffer.key)
            pieces = apply("bucket_unpack", flat, shapes=tuple(tuple(g.shape) for g in grads))
            pieces = pieces if isinstance(pieces, tuple) else (pieces,)
            for i, piece in zip(bucket, pieces):
                replaced[dense[i][0]] = [piece]
            n_buckets += 1
        for index, _, (indices, values) in (e for e in entries if e.kind != "d"):
            replaced[index] = list(apply("sparse_all_gather", indices, values, reduce="mean", group=tuple(group)))
    reposition(graph, {}, placed_after)
    _, _, update.inputs = update_inputs(e._replace(inputs=replaced[e.index]) for e in entries)
    _REWRITTEN.add(update)
    graph._plans.clear()
    return n_buckets
