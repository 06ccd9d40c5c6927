"""The activation recompute pass: drop a region's intermediate activations after the forward
and recompute them inside the backward.

A region is what one call of a module marked with `luoshu.nn.recompute` recorded: its ops and
the tensors it returned. Backward ops that read a tensor made inside the region (other than
what it returned) are rewired to a copy of the ops that made it, reading only the region's
inputs. The copies are recorded just before the region's first backward reader, and the
scheduler runs ready ops in recorded order, so the plan frees the originals after their last
forward reader and recomputes each region when its own backward starts: between the two, a
region holds only its inputs and outputs.

Random ops are never drawn again: a copy calls the op's `replay` (dropout reapplies its
mask), or keeps the original outputs when there is none, so the recomputed values equal the
forward's exactly.
"""

from __future__ import annotations

from luoshu.core.graph import Graph, RecomputeRegion
from luoshu.core.op import Op, apply


def apply_recompute(graph: Graph) -> int:
    """Rewrites every region of `graph` not rewritten yet; returns the number of ops copied."""
    copied = 0
    for region in graph.recompute_regions:
        if not region.applied:
            copied += _rewrite(graph, region)
            region.applied = True
    if copied:
        graph._plans.clear()
    return copied


def _rewrite(graph: Graph, region: RecomputeRegion) -> int:
    inside = {id(op) for op in region.ops}
    made_inside = {id(t): op for op in region.ops for t in op.outputs}
    kept = {id(t) for t in region.outputs}
    # Readers outside the region of what it made and did not keep: the backward's ops. An input
    # read only for its shape (`OpDef.shape_inputs`) is not recomputed: the plan hands its
    # reader a stand-in made with the original, which then dies in the forward anyway.
    def dropped(op) -> list:
        return [t for k, t in enumerate(op.inputs) if id(t) in made_inside and id(t) not in kept
                and k not in op.opdef.shape_inputs]

    readers = [op for op in graph.ops if id(op) not in inside and dropped(op)]
    if not readers:
        return 0
    needed = [t for op in readers for t in dropped(op)]
    # The region's ops those tensors depend on (through tensors it did not keep), in recording order.
    wanted: set[int] = set()
    stack = [made_inside[id(t)] for t in needed]
    while stack:
        op = stack.pop()
        if id(op) in wanted:
            continue
        wanted.add(id(op))
        stack += [made_inside[id(t)] for t in op.inputs if id(t) in made_inside and id(t) not in kept]
    copy_of: dict[int, object] = {}
    with graph:
        for op in region.ops:
            if id(op) not in wanted:
                continue
            inputs = [copy_of.get(id(t), t) for t in op.inputs]
            start = len(graph.ops)
            outputs = _copy(op, inputs)
            region.copies += graph.ops[start:]
            for original, new in zip(op.outputs, outputs):
                if id(original) not in kept:
                    copy_of[id(original)] = new
    for op in readers:
        op.inputs = [t if k in op.opdef.shape_inputs else copy_of.get(id(t), t) for k, t in enumerate(op.inputs)]
    # Record the copies just before their first reader: the scheduler runs ready ops in
    # recorded order, so the region is recomputed when its own backward starts, not as soon
    # as its inputs exist.
    copies = {id(op) for op in region.copies}
    rest = [op for op in graph.ops if id(op) not in copies]
    first = min(i for i, op in enumerate(rest) if any(op is r for r in readers))
    graph.ops[:] = rest[:first] + region.copies + rest[first:]
    return len(wanted)


def _copy(op: Op, inputs: list) -> list:
    """The outputs of `op` recomputed on `inputs` (a random op replays its draw)."""
    if op.opdef.random:
        replayed = op.opdef.replay(op, inputs)
        return list(op.outputs) if replayed is None else list(replayed)
    out = apply(op.opdef, *inputs, **op.attrs)
    return list(out) if isinstance(out, tuple) else [out]

