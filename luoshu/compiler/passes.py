"""Graph passes: `prune` keeps the ops the fetches depend on, in execution order."""

from __future__ import annotations

from luoshu.core.op import Op, topological_ops
from luoshu.core.tensor import Tensor


def prune(graph, fetches: list[Tensor]) -> list[Op]:
    """The ops of `graph` that `fetches` need, each after the ops it reads from."""
    return topological_ops(fetches, graph)
