"""Graph passes: `prune` keeps the ops the fetches depend on, in execution order; `reposition`
moves ops a pass recorded to where they should run."""

from __future__ import annotations

from luoshu.core.op import Op, topological_ops
from luoshu.core.tensor import Tensor


def prune(graph, fetches: list[Tensor]) -> list[Op]:
    """The ops of `graph` that `fetches` need, each after the ops it reads from."""
    return topological_ops(fetches, graph)


def reposition(graph, before: dict[int, list[Op]], after: dict[int, list[Op]]) -> None:
    """Re-records ops of `graph` just before / after the ops that `before` / `after` map them to
    (by id): a pass appends what it records, and the scheduler runs ready ops in recorded
    order, so this is where they run (a buffer a pass makes then lives from where it is
    needed, not from the end of the backward)."""
    moved = {id(op) for ops in (*before.values(), *after.values()) for op in ops}
    ordered = []
    for op in graph.ops:
        if id(op) in moved:
            continue
        ordered += before.get(id(op), [])
        ordered.append(op)
        ordered += after.get(id(op), [])
    graph.ops[:] = ordered
