"""Whole-step compilation: a plan's steps (forward, backward and the optimizer update) lowered to
one torch.fx graph by TorchDynamo and compiled by TorchInductor, with the plan as the fallback.

The plan's steps are written as one straight-line Python function over explicit inputs (the
feeds, the leaves' values, and what each lowered op needs this step), which TorchDynamo exports
as a single fx graph (`torch._dynamo.export`: no graph break is allowed, so either the whole
step compiles or none of it does; it traces with fake tensors, so nothing runs). The backend
compiles that graph once per signature (the feed shapes and strides, and the hyperparameters a
lowering bakes in as constants), and each step calls the compiled function directly with one
flat list of tensors: no Dynamo frame hook, no guard evaluation, no pytree per call — at a small
step's size those cost as much as the kernels saved. Every step calls its op's kernel, except
ops whose `OpDef` has a `lower(**attrs)`: that returns a lowering whose `inputs()` are passed to
the compiled function each step and whose `compute(inputs, *values)` replaces the kernel (the
optimizer update: `luoshu.optim.lowered`, its state and learning rates as tensors, mutated in
place). A linear layer's weight gradient read only by such a lowering is a `DeferredMatmul`,
which plain SGD adds straight into the weight (one in-place addmm). When a step cannot be
lowered (an op's `lower` refuses, or Dynamo/Inductor fail on an op's kernel), a
`LoweringWarning` names the op and the plan runs the step, now and after. Before a lowering's
state exists (an optimizer's first step), the plan runs that step.

On CUDA with static feed shapes the exported graph goes through `torch.compile` in Inductor's
"reduce-overhead" mode, captured as a CUDA graph (parameters and optimizer state are marked as
static addresses, so their in-place updates stay inside the graph). Inductor caches compiled
kernels on disk (`TORCHINDUCTOR_CACHE_DIR`, its FX graph cache), so a second process compiles
faster.
"""

from __future__ import annotations

import collections
import functools
import itertools
import linecache
import re
import warnings

import torch

from luoshu.core.errors import Error, ExecutionError
from luoshu.core.graph import COMPILE_BACKENDS

_names = itertools.count()


class LoweringWarning(UserWarning):
    """A step could not be lowered to one compiled graph; the plan runs it (names the op)."""


class CompiledStep:
    """A plan's steps as one compiled function. `run(feed_values)` returns the fetches, or None
    where the plan must run this step instead (not lowerable: `reason` says why, naming the op;
    or a lowering not ready yet). `cuda_graphs`: None captures a CUDA graph where every leaf is on
    CUDA and every feed shape is static; True/False force it."""

    def __init__(self, plan, backend: str = "inductor", cuda_graphs: bool | None = None):
        if backend not in COMPILE_BACKENDS:
            raise Error(f"compile: unknown backend {backend!r}; expected one of {list(COMPILE_BACKENDS)}")
        self.plan, self.backend = plan, backend
        self.reason: str | None = None
        self.compiled_runs = 0  # steps the compiled function ran (the rest ran through the plan)
        self._lowerings: list = []
        try:
            source, namespace = self._emit()
        except Error as exc:
            self._give_up(str(exc))
            return
        leaves_on_cuda = bool(plan.leaf_tensors) and all(t.device.startswith("cuda") for t in plan.leaf_tensors)
        static = all(None not in t.shape for t in plan.feed_tensors)
        self.cuda_graphs = (leaves_on_cuda and static) if cuda_graphs is None else bool(cuda_graphs)
        self.source = source
        self._step = namespace["_step"]
        # The compiled steps, newest last; `run` looks only at the last unless the signature moved
        # (a new feed shape, a changed hyperparameter).
        self._compiled: list[_Compiled] = []

    # --- lowering -------------------------------------------------------------------
    def _emit(self) -> tuple[str, dict]:
        """The straight-line step function; an `Error` naming the op where one refuses lowering."""
        plan = self.plan
        slot_of = plan.slot_of
        self.filename = f"<luoshu compiled step {next(_names)}>"
        namespace: dict = {}
        lines = ["def _step(feeds, leaves, extras):"]
        if plan.feed_tensors:
            lines.append(f"    {''.join(f's{slot_of[id(t)]}, ' for t in plan.feed_tensors)}= feeds")
        if plan.leaf_tensors:
            lines.append(f"    {''.join(f's{slot_of[id(t)]}, ' for t in plan.leaf_tensors)}= leaves")
        self._step_of_line: dict[int, int] = {}
        lowerings = {}
        for i, step in enumerate(plan.steps):
            lower = getattr(step.op.opdef, "lower", None)
            if lower is not None:
                try:
                    lowerings[i] = lower(**step.op.attrs)
                except Error as exc:
                    raise Error(f"op '{step.op.opdef.name}' (step {i}) cannot be lowered: {exc}") from None
        deferred = _deferred_matmuls(plan, lowerings)
        self.deferred_matmuls = len(deferred)  # weight gradients a lowering may add in place
        for i, step in enumerate(plan.steps):
            args = ", ".join(f"s{s}" for s in step.inputs)
            if i in lowerings:
                namespace[f"U{i}"] = lowerings[i].compute
                call = f"U{i}(extras[{len(self._lowerings)}]{', ' if args else ''}{args})"
                self._lowerings.append(lowerings[i])
            else:
                namespace[f"K{i}"] = functools.partial(DeferredMatmul, step.kernel) if i in deferred else step.kernel
                call = f"K{i}({args})"
            self._step_of_line[len(lines) + 1] = i
            outs = ", ".join(f"s{s}" for s in step.outputs)
            lines.append(f"    {outs}{',' if len(step.outputs) > 1 else ''} = {call}")
            if step.frees:
                lines.append(f"    del {', '.join(f's{s}' for s in step.frees)}")
        lines.append(f"    return ({''.join(f's{s}, ' for s in plan.fetch_slots)})")
        source = "\n".join(lines) + "\n"
        # Dynamo's messages quote the source line; register it like a file.
        linecache.cache[self.filename] = (len(source), None, source.splitlines(True), self.filename)
        exec(compile(source, self.filename, "exec"), namespace)
        return source, namespace

    def _op_of(self, exc: BaseException) -> str:
        """The op whose step a Dynamo/Inductor error points at, from the step function's line."""
        text = str(exc)
        found = re.findall(re.escape(self.filename) + r'", line (\d+)', text)
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == self.filename:
                found.append(str(tb.tb_lineno))
            tb = tb.tb_next
        for line in found:
            i = self._step_of_line.get(int(line))
            if i is not None:
                return f"op '{self.plan.steps[i].op.opdef.name}' (step {i})"
        return "a step"

    def _give_up(self, reason: str, stacklevel: int = 6) -> None:
        """From now on the plan runs the step. The warning points at the caller of Graph.run:
        `stacklevel` 6 from `__init__` (through Plan.compile) and `_switch`, 7 from `_compile`."""
        self.reason = reason
        warnings.warn(f"whole-step compilation falls back to the plan: {reason}", LoweringWarning,
                      stacklevel=stacklevel)

    # --- compiling ------------------------------------------------------------------
    def _compile(self, feed_values, leaves, extras, flat):
        """The step captured for these inputs: TorchDynamo exports the step function as one fx
        graph (fake tensors: nothing runs, so a failure has changed nothing), flattened to the
        inputs' order, and the backend compiles it. Called directly, the compiled function skips
        Dynamo's frame hook and guards on every step; `run` checks what they would have (the feed
        shapes and the hyperparameters baked in) through its signature."""
        try:
            graph, _ = torch._dynamo.export(self._step)(feed_values, leaves, extras)
        except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.Unsupported) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._give_up(f"{self._op_of(exc)} cannot be lowered: {first_line}", 7)
            return None
        graph.graph._codegen = torch.fx.graph.CodeGen()  # flat inputs and outputs: no pytree per call
        # A tensor passed twice (a parameter is a leaf and an input of its update) is one input:
        # AOTAutograd would otherwise wrap the compiled function in a per-call duplicate check.
        placeholders = [node for node in graph.graph.nodes if node.op == "placeholder"]
        first: dict[int, int] = {}
        for k, t in enumerate(flat):
            j = first.setdefault(id(t), k)
            if j != k:
                placeholders[k].replace_all_uses_with(placeholders[j])
                graph.graph.erase_node(placeholders[k])
        graph.recompile()
        inputs = [flat[k] for k in first.values()]
        if self.cuda_graphs:
            for t in inputs[len(feed_values):]:  # not the feeds: new tensors each step, copied in
                torch._dynamo.mark_static_address(t)
            mode = {"mode": "reduce-overhead"} if self.backend == "inductor" else {}
            return torch.compile(graph, backend=self.backend, fullgraph=True, **mode)
        try:
            return torch._dynamo.lookup_backend(self.backend)(graph, inputs)
        except Exception as exc:  # the backend refused an op of the captured graph
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._give_up(f"{self._op_of(exc)} cannot be compiled by {self.backend}: {first_line}", 7)
            return None

    # --- running --------------------------------------------------------------------
    def run(self, feed_values: list) -> tuple | None:
        if self.reason is not None:
            return None
        leaves = [t._value for t in self.plan.leaf_tensors]
        flat = [*feed_values, *leaves]
        extras, constants = [], []
        for lowering in self._lowerings:
            inputs = lowering.inputs()
            if inputs is None:
                return None
            extras.append(inputs)
            flat += inputs
            constants.append(lowering.constants())
        signature = (*[(v.shape, v.stride()) for v in feed_values], *constants)
        entry = self._compiled[-1] if self._compiled else None
        if entry is None or entry.signature != signature or not entry.matches(flat):
            entry = self._switch(signature, feed_values, leaves, extras, flat)
            if entry is None:
                return None
        try:
            out = entry.fn(*[flat[k] for k in entry.keep])
        except Error:
            raise
        except Exception as exc:
            raise ExecutionError(f"the compiled step failed at run time: {exc}") from exc
        self.compiled_runs += 1
        return out

    def _switch(self, signature, feed_values, leaves, extras, flat):
        """The compiled function for `signature` and these inputs' duplicates, compiled now
        where none is cached yet."""
        for k, entry in enumerate(self._compiled):
            if entry.signature == signature and entry.matches(flat):
                self._compiled.append(self._compiled.pop(k))
                return entry
        if len(self._compiled) >= _MAX_SIGNATURES:
            self._give_up(f"more than {_MAX_SIGNATURES} different feed shapes or hyperparameter sets (each "
                          "compiles anew)")
            return None
        fn = self._compile(feed_values, leaves, extras, flat)
        if fn is None:
            return None
        self._compiled.append(_Compiled(signature, fn, flat))
        return self._compiled[-1]


class _Compiled:
    """One compiled step: its signature, the function and which inputs it takes (`keep`: each
    tensor once; `pairs`: (position, earlier position of the same tensor))."""

    __slots__ = ("signature", "fn", "keep", "pairs")

    def __init__(self, signature, fn, flat):
        self.signature, self.fn = signature, fn
        first: dict[int, int] = {}
        self.pairs = [(k, j) for k, t in enumerate(flat) if (j := first.setdefault(id(t), k)) != k]
        self.keep = list(first.values())

    def matches(self, flat) -> bool:
        """Whether `flat` repeats tensors where the compiled inputs did, and only there."""
        if not all(flat[k] is flat[j] for k, j in self.pairs):
            return False
        return len({id(flat[k]) for k in self.keep}) == len(self.keep)


_MAX_SIGNATURES = 8  # as TorchDynamo's recompilation limit


class DeferredMatmul:
    """A weight gradient `a.T @ b` (a 2-D matmul step read by nothing but a lowering that takes
    it) left uncomputed, so that an update can add it straight into the parameter: one in-place
    addmm instead of a gradient-sized buffer and a second pass over the parameter. `value()` is
    the matmul step's own result, for every other use."""

    __slots__ = ("kernel", "a", "b")

    def __init__(self, kernel, a, b):
        self.kernel, self.a, self.b = kernel, a, b

    def value(self):
        return self.kernel(self.a, self.b)

    def add_to_(self, target, scale) -> None:
        """`target += scale * a.T @ b` in place (`scale` a float or a 0-d tensor)."""
        torch.ops.luoshu.addmm_(target, (self.a * scale).t(), self.b)


def _deferred_matmuls(plan, lowerings: dict) -> set[int]:
    """The steps whose result can be a `DeferredMatmul`: 2-D matmuls of a transposed and a plain
    operand (a linear layer's weight gradient), read once, by a lowering that takes them, and
    not fetched."""
    reads = collections.Counter(s for step in plan.steps for s in step.inputs)
    reader = {s: i for i, step in enumerate(plan.steps) for s in step.inputs}
    fetched = set(plan.fetch_slots)
    found = set()
    for i, step in enumerate(plan.steps):
        op = step.op
        if op.opdef.name != "matmul" or not op.attrs["trans_a"] or op.attrs["trans_b"] or len(step.outputs) != 1:
            continue
        out = step.outputs[0]
        if (all(len(t.shape) == 2 for t in op.inputs) and reads[out] == 1 and out not in fetched
                and getattr(lowerings.get(reader[out]), "takes_deferred_matmuls", False)):
            found.add(i)
    return found


# The in-place addmm of `DeferredMatmul.add_to_` as an operator with a mutated argument: Inductor
# calls it on the parameter itself (an in-place `Tensor.addmm_` would be functionalized into an
# addmm and a copy back).
_library = torch.library.Library("luoshu", "FRAGMENT")
_library.define("addmm_(Tensor(a!) self, Tensor mat1, Tensor mat2) -> ()")


def _addmm_(self, mat1, mat2) -> None:
    self.addmm_(mat1, mat2)


_library.impl("addmm_", _addmm_, "CompositeExplicitAutograd")
_library.impl("addmm_", lambda self, mat1, mat2: None, "Meta")


__all__ = ["CompiledStep", "DeferredMatmul", "LoweringWarning"]
