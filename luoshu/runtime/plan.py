"""The flat execution plan of a define-and-run graph and its executor.

A `Plan` is a list of steps `(kernel, input slots, output slots, slots freed after)`.
To keep the hot loop lean, the plan is emitted once as a straight-line Python function
in which every slot is a local variable: running it walks no graph, looks up nothing by
name and allocates nothing beyond what the kernels return; `del` frees each buffer
after its last reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from luoshu.compiler import apply_recompute, prune, schedule_comm, states
from luoshu.compiler.inductor import CompiledStep
from luoshu.core.errors import Error, ExecutionError, FeedError
from luoshu.core.op import Op, get_opdef
from luoshu.core.tensor import Tensor
from luoshu.runtime.memory import MemoryReport, measure

_set_grad_enabled = torch._C._set_grad_enabled  # what torch.no_grad() calls on entry and exit


@dataclass
class Step:
    op: object  # the IR Op this step runs
    kernel: object  # opdef.compute with the attributes bound
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    frees: tuple[int, ...] = ()


@dataclass
class Plan:
    feed_tensors: list[Tensor]  # placeholders, in the order `run` takes their values
    leaf_tensors: list[Tensor]  # parameters and constants, read at the start of each run
    steps: list[Step]
    fetch_slots: list[int]
    slot_of: dict[int, int] = field(default_factory=dict, repr=False)  # id(tensor) -> slot
    source: str = ""
    _fn: object = field(default=None, repr=False)
    compiled: CompiledStep | None = field(default=None, repr=False)  # set by `compile`

    def run(self, feed_values: list[torch.Tensor]) -> list:
        # torch.no_grad()'s context manager, without its Python frames (a few µs a run, several
        # times that when the run follows a wait and little of it is in cache)
        enabled = torch.is_grad_enabled()
        _set_grad_enabled(False)
        try:
            if self.compiled is not None:
                out = self.compiled.run(feed_values)
                if out is not None:
                    return out
            return self._fn(feed_values)
        finally:
            _set_grad_enabled(enabled)

    def compile(self, backend: str = "inductor", cuda_graphs: bool | None = None) -> CompiledStep:
        """Runs the steps as one compiled graph from the next run on (`luoshu.compiler.inductor`);
        this plan stays the fallback for steps that cannot be lowered."""
        self.compiled = CompiledStep(self, backend, cuda_graphs)
        return self.compiled

    def memory(self, feed_values: list[torch.Tensor], gradient_fetches: int = 0) -> MemoryReport:
        """Runs the plan once, step by step, and reports its peak live bytes, the step that
        reaches it and the split into parameters, optimizer state, gradients and activations
        (`luoshu.runtime.memory`). The step really runs: updates are applied. `gradient_fetches`:
        the first that many fetches are gradients applied outside the plan (a pipeline stage's)."""
        return measure(self, feed_values, gradient_fetches)


def build_plan(graph, fetches: list[Tensor], fed: dict) -> Plan:
    apply_recompute(graph)
    ops = prune(graph, fetches)
    logical_feeds: dict[int, Tensor] = {}
    strategy = states.strategy_of(graph, ops)
    if strategy is not None:  # tensor parallel: this rank's local graph (DESIGN §3)
        # localised in the logical graph's recorded order (not prune's depth-first one): the local graph
        # records its ops in that order and the scheduler follows it, so what passes placed stays placed
        # (the recompute pass's copies just before their region's backward)
        local = states.localize_graph(schedule_comm(ops), fetches, strategy)
        graph, fetches, logical_feeds = local.graph, [local.tensors[id(f)] for f in fetches], local.feeds
        ops = prune(graph, fetches)
    ops = schedule_comm(ops)
    slot_of: dict[int, int] = {}
    feed_tensors: list[Tensor] = []
    leaf_tensors: list[Tensor] = []

    def slot(t: Tensor) -> int:
        s = slot_of.get(id(t))
        if s is None:
            s = slot_of[id(t)] = len(slot_of)
            if t.producer is None or t.graph is not graph:
                if t.kind == "placeholder":
                    feed_tensors.append(t)
                else:
                    leaf_tensors.append(t)
        return s

    steps = [_step(op, tuple(slot(t) for t in op.inputs), tuple(slot(t) for t in op.outputs)) for op in ops]
    steps = _stand_in_shape_reads(steps, graph, slot)
    fetch_slots = [slot(t) for t in fetches]
    for local_id, placeholder in logical_feeds.items():  # the caller feeds the logical placeholders
        if local_id in slot_of:
            slot_of[id(placeholder)] = slot_of[local_id]
    feed_tensors[:] = [logical_feeds.get(id(t), t) for t in feed_tensors]

    missing = [t for t in feed_tensors if id(t) not in fed]
    if missing:
        names = ", ".join(repr(t.name) for t in missing)
        raise FeedError(f"graph '{graph.name}': the fetches depend on placeholder(s) {names}, "
                        "which the feed_dict does not feed")

    last_use: dict[int, int] = {}
    for i, step in enumerate(steps):
        for s in step.inputs + step.outputs:
            last_use[s] = i
    keep = set(fetch_slots)
    frees: dict[int, list[int]] = {}
    for s, i in last_use.items():
        if s not in keep:
            frees.setdefault(i, []).append(s)
    for i, step in enumerate(steps):
        step.frees = tuple(sorted(frees.get(i, ())))

    plan = Plan(feed_tensors, leaf_tensors, steps, fetch_slots, slot_of)
    _emit(plan, slot_of)
    return plan


def _step(op, inputs: tuple[int, ...], outputs: tuple[int, ...]) -> Step:
    return Step(op, op.opdef.bind(op.attrs), inputs, outputs)


def _stand_in_shape_reads(steps: list[Step], graph, slot) -> list[Step]:
    """Steps where every input an op reads only for its shape (`OpDef.shape_inputs`, the `like` of
    a gradient's sum_to) and some step makes is read through a `shape_stand_in` run right after
    that step: the buffer itself then dies after its last real reader, not at the end of the
    backward (PyTorch's autograd keeps sizes, not tensors, for the same reason)."""
    made_by = {s: i for i, step in enumerate(steps) for s in step.outputs}
    stand_in: dict[int, int] = {}  # slot -> its stand-in's slot
    after: dict[int, list[Step]] = {}  # step index -> stand-in steps to run right after it
    for step in steps:
        positions = step.op.opdef.shape_inputs
        if not positions:
            continue
        ins = list(step.inputs)
        for k in positions:
            s = ins[k] if k < len(ins) else None
            if s not in made_by:
                continue  # a feed or a leaf: alive for the whole run anyway
            if s not in stand_in:
                t = step.op.inputs[k]
                op = Op(get_opdef("shape_stand_in"), [t], {}, graph)
                out = Tensor(t.shape, t.dtype, t.device, producer=(op, 0), graph=graph)
                op._outputs = [out]
                stand_in[s] = slot(out)
                after.setdefault(made_by[s], []).append(_step(op, (s,), (stand_in[s],)))
            ins[k] = stand_in[s]
        step.inputs = tuple(ins)
    if not after:
        return steps
    return [x for i, step in enumerate(steps) for x in (step, *after.get(i, ()))]


def _emit(plan: Plan, slot_of: dict[int, int]) -> None:
    """Writes the plan as one straight-line function over local variables."""
    namespace: dict = {"_fail": _fail_factory(plan), "_Error": Error}
    lines = ["def _run(feeds):"]
    if plan.feed_tensors:
        names = ", ".join(f"s{slot_of[id(t)]}" for t in plan.feed_tensors)
        lines.append(f"    {names}, = feeds")
    for j, t in enumerate(plan.leaf_tensors):
        namespace[f"L{j}"] = t
        lines.append(f"    s{slot_of[id(t)]} = L{j}._value")
    lines.append("    i = -1")
    lines.append("    try:")
    for i, step in enumerate(plan.steps):
        namespace[f"K{i}"] = step.kernel
        args = ", ".join(f"s{s}" for s in step.inputs)
        lines.append(f"        i = {i}")
        call = f"K{i}({args})"
        if len(step.outputs) == 1:
            lines.append(f"        s{step.outputs[0]} = {call}")
        else:
            lines.append(f"        {', '.join(f's{s}' for s in step.outputs)}, = {call}")
        if step.frees:
            lines.append(f"        del {', '.join(f's{s}' for s in step.frees)}")
    if not plan.steps:
        lines.append("        pass")
    lines.append("    except _Error:")
    lines.append("        raise")
    lines.append("    except Exception as exc:")
    lines.append("        raise _fail(i, exc) from exc")
    lines.append(f"    return ({''.join(f's{s}, ' for s in plan.fetch_slots)})")
    plan.source = "\n".join(lines)
    exec(compile(plan.source, f"<luoshu plan of {len(plan.steps)} steps>", "exec"), namespace)
    plan._fn = namespace["_run"]


def _fail_factory(plan: Plan):
    def fail(index: int, exc: Exception) -> Error:
        if index < 0:
            return ExecutionError(f"plan failed before its first step: {exc}")
        op = plan.steps[index].op
        shapes = ", ".join(str(t.shape) for t in op.inputs)
        return ExecutionError(f"op '{op.opdef.name}' (step {index}) failed at run time; declared "
                              f"input shapes ({shapes}): {exc}")

    return fail
