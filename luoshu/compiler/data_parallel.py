"""The data-parallel gradient pass: all-reduce an update op's gradients in buckets before it runs.

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

from luoshu.core import dtypes
from luoshu.core.errors import GraphError
from luoshu.core.op import Op, apply
from luoshu.core.shapes import numel
from luoshu.ops.comm import BucketBuffer

_REWRITTEN: weakref.WeakSet = weakref.WeakSet()
# graph -> the persistent bucket buffers its bucket_all_reduce ops name (freed with the graph)
_BUFFERS_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _split_inputs(update: Op) -> list[tuple[int, str, list]]:
    """(parameter index, kind, input tensors) per parameter of an optimizer_update op."""
    entries, pos = [], 0
    for index, kind in zip(update.attrs["params"], update.attrs["kinds"]):
        width = 2 if kind == "s" else 1
        entries.append((index, kind, list(update.inputs[pos:pos + width])))
        pos += width
    return entries


def plan_buckets(sizes_bytes: list[int], dtype_names: list[str], bucket_bytes: int) -> list[list[int]]:
    """Consecutive positions grouped into buckets of at most `bucket_bytes` (at least one
    tensor each) and of a single dtype; a bucket closes when the next tensor would overflow it."""
    buckets: list[list[int]] = []
    open_by_dtype: dict[str, tuple[list[int], int]] = {}
    for i, (size, dtype) in enumerate(zip(sizes_bytes, dtype_names)):
        current = open_by_dtype.get(dtype)
        if current is not None and current[1] + size > bucket_bytes:
            current = None
        if current is None:
            bucket: list[int] = []
            buckets.append(bucket)
            current = (bucket, 0)
        current[0].append(i)
        open_by_dtype[dtype] = (current[0], current[1] + size)
    return buckets


def insert_gradient_allreduce(graph, update: Op, bucket_bytes: int, group: tuple = ()) -> int:
    """Rewrites `update` (an optimizer_update of `graph`) to read all-reduced gradients.

    Returns the number of dense buckets. A second call on the same op does nothing.
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

    entries = _split_inputs(update)
    dense = [e for e in entries if e[1] == "d"]
    dense.sort(key=lambda e: produced_at(e[2][0]))
    replaced: dict[int, list] = {}
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
            flat = apply("bucket_all_reduce", *grads, reduce="mean", group=tuple(group), buffer=buffer.key)
            pieces = apply("bucket_unpack", flat, shapes=tuple(tuple(g.shape) for g in grads))
            pieces = pieces if isinstance(pieces, tuple) else (pieces,)
            for i, piece in zip(bucket, pieces):
                replaced[dense[i][0]] = [piece]
            n_buckets += 1
        for index, _, (indices, values) in (e for e in entries if e[1] == "s"):
            replaced[index] = list(apply("sparse_all_gather", indices, values, reduce="mean", group=tuple(group)))
    update.inputs = [t for index, _, _ in entries for t in replaced[index]]
    _REWRITTEN.add(update)
    graph._plans.clear()
    return n_buckets
