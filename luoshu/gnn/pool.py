"""Global pooling for graph classification: one row per graph of a batch (sum, mean, max)."""

from __future__ import annotations

from luoshu import ops
from luoshu.core.errors import Error
from luoshu.core.tensor import Tensor, make_constant


def _pool(x, batch, size: int | None, reduce: str):
    if batch is None:  # one graph: reduce over every node
        return getattr(ops, reduce)(x, axis=0, keepdims=True)
    if not isinstance(batch, Tensor):
        batch = make_constant(batch, dtype="int64", device=x.device)
    if size is None:
        if batch.value is None:
            raise Error("global pooling inside a define-and-run graph needs size= (the number of graphs)")
        size = int(batch.value.max()) + 1 if batch.value.numel() else 0
    if batch.shape[0] is not None and x.shape[0] is not None and batch.shape[0] != x.shape[0]:
        raise Error(f"global pooling: batch has {batch.shape[0]} entries but x has {x.shape[0]} rows")
    return ops.scatter_reduce(x, batch, reduce, num_segments=size)


def global_add_pool(x, batch=None, size: int | None = None):
    """Sum of each graph's node rows: (num_graphs, features); `batch[i]` is node i's graph."""
    return _pool(x, batch, size, "sum")


def global_mean_pool(x, batch=None, size: int | None = None):
    """Mean of each graph's node rows (PyG's global_mean_pool)."""
    return _pool(x, batch, size, "mean")


def global_max_pool(x, batch=None, size: int | None = None):
    """Maximum of each graph's node rows (PyG's global_max_pool)."""
    return _pool(x, batch, size, "max")
