"""The scheduling pass: ops in the order the program recorded them, collectives started as
early as possible and waited on as late as possible.

The pruned op list is a depth-first topological order from the fetches. That order puts
every wait right after its start (the walk reaches the start through the wait), and with
many fetches (every parameter's gradient) it runs the whole chain of input gradients before
any weight gradient, keeping every layer's activations alive until the end of the backward.
This pass re-orders the ops, keeping every op after its inputs: among the ops that are ready,
the one recorded first runs first — autodiff records each layer's weight gradients right
after its input gradient, last layer first, so each layer's activations die with its own
backward — except that an op starting an asynchronous collective (or a pipeline's `send`, an isend)
runs as soon as its inputs exist, and an op waiting on one runs only when nothing else is ready, so the transfer
overlaps the rest of the backward pass.
"""

from __future__ import annotations

import heapq

from luoshu.core.op import Op

# Ops that only block on a transfer already in flight, or that block on their own
# (sync collectives of sparse gradients): run them when nothing else can run.
WAITS = frozenset({"comm_wait", "bucket_unpack", "sparse_all_gather"})
_ASYNC_CAPABLE = frozenset({"all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all"})


def starts_collective(op: Op) -> bool:
    name = op.opdef.name
    return name in ("bucket_all_reduce", "send") or (name in _ASYNC_CAPABLE and bool(op.attrs.get("async_op")))


def schedule_comm(ops: list[Op]) -> list[Op]:
    """`ops` (a topological order) re-ordered: recorded order, starts early, waits late,
    dependencies kept."""
    if len(ops) < 2:
        return ops
    position = {id(op): i for i, op in enumerate(ops)}
    consumers: list[list[int]] = [[] for _ in ops]
    missing = [0] * len(ops)
    for i, op in enumerate(ops):
        producers = set()
        for t in op.inputs:
            if t.producer is not None:
                j = position.get(id(t.producer[0]))
                if j is not None and j not in producers:
                    producers.add(j)
                    consumers[j].append(i)
        missing[i] = len(producers)

    # Among ready ops, follow the order the program recorded them: autodiff records the
    # backward from the last layer down, the order in which gradients become final (the
    # depth-first order would first walk all the way down to the first parameter).
    graph = ops[0].graph
    recorded = {id(op): i for i, op in enumerate(graph.ops)} if graph is not None else {}

    def rank(i: int) -> tuple[int, int, int]:
        op = ops[i]
        urgency = 0 if starts_collective(op) else 2 if op.opdef.name in WAITS else 1
        return urgency, recorded.get(id(op), i), i

    ready = [rank(i) for i in range(len(ops)) if missing[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)[-1]
        order.append(ops[i])
        for j in consumers[i]:
            missing[j] -= 1
            if missing[j] == 0:
                heapq.heappush(ready, rank(j))
    return order
