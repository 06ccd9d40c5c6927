"""`OpDef` (one class per operator), its registry, `Op` (a node) and `apply` (the dispatcher).

`apply` is the single entry point that turns a call into an op: it checks attributes,
turns scalars into constants, applies autocast, runs the operator's `infer`, and then
either computes at once (eager) or records the op in the current graph (define-and-run).
"""

from __future__ import annotations

import functools
import numbers
import weakref
from collections.abc import Callable
from typing import ClassVar

import torch

from luoshu.core import context, dtypes
from luoshu.core.dstates import DStates
from luoshu.core.errors import (
    DeviceError,
    Error,
    ExecutionError,
    GradientError,
    GraphError,
    OpError,
    ShapeError,
)
from luoshu.core.tensor import IndexedSlices, Tensor, TensorMeta, make_constant, released_error

_REGISTRY: dict[str, OpDef] = {}


class OpDef:
    """One operator: its shape rule, kernel, gradient rule and distributed-states rule.

    Subclasses set `name` and `attrs` (the attribute names with their defaults) and
    implement `infer` and `compute`; `gradient` builds the input gradients from other
    ops so the backward graph is a graph like any other.
    """

    name: ClassVar[str]
    attrs: ClassVar[dict] = {}
    # "lower": float inputs run in the autocast dtype (matmul, conv);
    # "fp32": low-precision inputs are widened (softmax, norms, losses, reductions).
    autocast: ClassVar[str | None] = None
    # False where the outputs do not depend differentiably on the inputs (integer or
    # bool results, *_like constants, updates): no gradient flows through. An op that
    # has a gradient but no rule for it keeps True and lets `gradient` raise.
    differentiable: ClassVar[bool] = True
    # True for ops that draw from a random generator. Recomputation (the recompute pass) must
    # not draw again: it calls `replay`, which rebuilds the outputs from new inputs and the
    # original op's outputs (its draw), or returns None to keep the original outputs.
    random: ClassVar[bool] = False

    def replay(self, op: Op, inputs: list[Tensor]) -> list[Tensor] | None:
        return None

    # Optional `bind_into(out, scale, attrs) -> write`: a kernel `write(*values) -> bool` writing
    # the (one) output times `scale` into `out`, a view of a preallocated buffer, instead of
    # returning a new tensor; it returns False where it cannot for these values (the caller then
    # copies). Bound once per buffer, so the per-run call does no attribute handling. Data
    # parallelism uses it to compute gradients straight into their all-reduce bucket.
    bind_into: ClassVar[Callable | None] = None
    # Inputs the kernel reads only for their shape, dtype and device (the `like` of sum_to): a
    # plan hands it a one-element stand-in made right after the input's producer
    # (`shape_stand_in`), so the input's buffer is freed after its last real reader.
    shape_inputs: ClassVar[tuple[int, ...]] = ()
    # True where the one output is the sum of the inputs (`add_n`): the states pass adds the inputs
    # that share a layout locally first and converts each layout's sum once (a gradient's partial
    # contributions are all-reduced together, not each as it joins a whole one).
    sums_inputs: ClassVar[bool] = False

    def infer(self, inputs: list[Tensor], **attrs) -> list[TensorMeta] | TensorMeta:
        raise NotImplementedError

    def compute(self, *values, **attrs):
        raise NotImplementedError

    def bind(self, attrs: dict) -> Callable:
        """The kernel a plan calls for an op with these (complete) attributes: `compute` with them
        bound. An operator whose per-call work depends on its attributes alone (finding a persistent
        buffer, a group's size) overrides it to do that work once per plan step, not once per run."""
        return functools.partial(self.compute, **attrs) if attrs else self.compute

    def gradient(self, op: Op, grads: list) -> list:
        raise GradientError(f"op '{self.name}' has no gradient rule")

    def deduce_states(self, input_ds: list[DStates | None], **attrs) -> list[DStates | None]:
        """Default rule: every input must be pure duplicate; the outputs are too."""
        for i, ds in enumerate(input_ds):
            if ds is not None and not ds.is_pure_duplicate():
                raise Error(
                    f"op '{self.name}' has no distributed-states rule for input {i} with states "
                    f"{ds.states}; it needs every input duplicated"
                )
        first = next((ds for ds in input_ds if ds is not None), None)
        return [first]

    def shape_error(self, inputs, rule: str) -> ShapeError:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs if isinstance(t, Tensor))
        return ShapeError(f"{self.name}: input shapes ({shapes}): {rule}")


def register(cls: type[OpDef]) -> type[OpDef]:
    """Class decorator: makes the operator known by its `name`."""
    if cls.name in _REGISTRY:
        raise OpError(f"op '{cls.name}' is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def get_opdef(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise OpError(f"unknown op '{name}'; {len(_REGISTRY)} ops are registered, e.g. "
                      f"{', '.join(sorted(_REGISTRY)[:8])}") from None


def registered_ops() -> dict[str, OpDef]:
    return dict(_REGISTRY)


class Op:
    """One node of a graph: an operator applied to input tensors with fixed attributes.

    A graph op holds its output tensors. An eager op holds only weak references to
    them plus their torch values: a strong op -> output -> op cycle per eager op would
    leave every activation to the cycle collector (slow, and memory freed late). An
    output that was dropped is rebuilt from its value when a gradient rule asks.
    """

    __slots__ = ("opdef", "inputs", "attrs", "graph", "needs_grad", "_outputs", "_values", "__weakref__")

    def __init__(self, opdef: OpDef, inputs: list[Tensor], attrs: dict, graph=None):
        self.opdef = opdef
        self.inputs = inputs
        self.attrs = attrs
        self.graph = graph
        # Set by autodiff before a gradient rule runs: which inputs want a gradient, so
        # rules can skip building the others.
        self.needs_grad: tuple[bool, ...] = ()
        self._outputs: list = []
        self._values = None

    @property
    def outputs(self) -> list[Tensor]:
        if self._values is None:
            return self._outputs
        result = []
        for i, ref in enumerate(self._outputs):
            t = ref()
            if t is None:
                v = self._values[i]
                t = Tensor(v.shape, dtypes.dtype_name(v.dtype), str(v.device), value=v, producer=(self, i),
                           requires_grad=True)
            result.append(t)
        return result

    def __repr__(self) -> str:
        ins = ", ".join(str(t.shape) for t in self.inputs)
        return f"Op({self.opdef.name}, inputs=[{ins}], attrs={self.attrs})"


def _scalar_dtype(value, tensors: list[Tensor]) -> str:
    """Python scalars are weakly typed: they take the dtype of a tensor they meet."""
    if isinstance(value, bool):
        return tensors[0].dtype if tensors else "bool"
    if isinstance(value, numbers.Integral):
        return next((t.dtype for t in tensors if t.dtype != "bool"), dtypes.DEFAULT_INT)
    if isinstance(value, numbers.Real):
        return next((t.dtype for t in tensors if dtypes.is_floating(t.dtype)), dtypes.DEFAULT_FLOAT)
    raise Error(f"cannot use {type(value).__name__} as a tensor")


def as_tensor(value, tensors: list[Tensor] = ()) -> Tensor:
    """Turns an op input into a Tensor: scalars become constants typed after `tensors`."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, IndexedSlices):
        return value.to_dense()
    device = tensors[0].device if tensors else None
    if isinstance(value, numbers.Number):
        dtype = _scalar_dtype(value, tensors)
        return Tensor.from_value(torch.tensor(value, dtype=dtypes.to_torch(dtype), device=device))
    return make_constant(value, device=device)


def _autocast_inputs(opdef: OpDef, tensors: list[Tensor], target: str) -> list[Tensor]:
    if opdef.autocast == "lower":
        wanted = lambda t: t.dtype in ("float32", "float16", "bfloat16") and t.dtype != target  # noqa: E731
        to = target
    else:
        wanted = lambda t: t.dtype in ("float16", "bfloat16")  # noqa: E731
        to = "float32"
    return [apply("cast", t, dtype=to) if wanted(t) else t for t in tensors]


def apply(opdef: OpDef | str, *inputs, **attrs):
    """Applies an operator: returns one Tensor, or a tuple when it has several outputs."""
    if type(opdef) is str:
        opdef = get_opdef(opdef)
    known = opdef.attrs
    if attrs:
        for key in attrs:
            if key not in known:
                raise OpError(f"op '{opdef.name}' has no attribute '{key}'; its attributes are "
                              f"{sorted(known) or 'none'}")
        full = {**known, **attrs}
    else:
        full = dict(known)

    tensors = list(inputs)
    if not all(isinstance(x, Tensor) for x in tensors):
        given = [x for x in inputs if isinstance(x, Tensor)]
        tensors = [x if isinstance(x, Tensor) else as_tensor(x, given) for x in inputs]
    cast_to = context.autocast_dtype()
    if cast_to is not None and opdef.autocast is not None:
        tensors = _autocast_inputs(opdef, tensors, cast_to)

    if len(tensors) > 1:
        device = tensors[0].device
        for t in tensors:
            if t.device != device:
                raise DeviceError(f"{opdef.name}: inputs are on different devices "
                                  f"({', '.join(t.device for t in tensors)})")
    metas = opdef.infer(tensors, **full)
    if type(metas) is TensorMeta:
        metas = (metas,)

    graph = context.current_graph()
    if graph is None:
        outputs = _run_eager(opdef, tensors, full, metas)
    else:
        outputs = _record(graph, opdef, tensors, full, metas)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _default_device(tensors, meta: TensorMeta) -> str:
    if meta.device is not None:
        return meta.device
    return tensors[0].device if tensors else "cpu"


# Eager tensor parallelism (installed by the compiler's states pass while a strategy is set):
# `eager_states(opdef, tensors, attrs, metas)` runs an op one of whose inputs carries
# distributed states and returns (logical op, local values, each output's `ds`), or None;
# `eager_to_states(grad, param)` gives an eager gradient in its parameter's states.
eager_states: Callable | None = None
eager_to_states: Callable | None = None


def set_eager_states(dispatch: Callable | None, to_states: Callable | None) -> None:
    global eager_states, eager_to_states
    eager_states, eager_to_states = dispatch, to_states


def _run_eager(opdef, tensors, attrs, metas):
    for t in tensors:
        if t._value is None:
            raise GraphError(
                f"{opdef.name}: input {t!r} belongs to define-and-run graph "
                f"'{t.graph.name if t.graph else '?'}'; build ops on it inside `with graph:`"
            )
        if t._value.is_meta:
            raise released_error(t)
    if eager_states is not None and any(t.ds for t in tensors):
        done = eager_states(opdef, tensors, attrs, metas)
        if done is not None:
            return _distributed_outputs(opdef, tensors, metas, *done)
    try:
        result = opdef.compute(*[t._value for t in tensors], **attrs)
    except Error:
        raise
    except (RuntimeError, IndexError, ValueError) as exc:
        shapes = ", ".join(str(t.shape) for t in tensors)
        raise ExecutionError(f"op '{opdef.name}' failed on input shapes ({shapes}): {exc}") from exc
    values = result if type(result) in (tuple, list) else (result,)
    track = (opdef.differentiable and context.is_grad_enabled()
             and any(t.requires_grad for t in tensors))
    op = Op(opdef, tensors, attrs) if track else None
    outputs = []
    for i, (meta, value) in enumerate(zip(metas, values)):
        if value is None:
            out = Tensor(meta.shape, meta.dtype, _default_device(tensors, meta), kind="token")
        else:
            out = Tensor(value.shape, meta.dtype, meta.device or str(value.device), value=value)
        if track and dtypes.is_floating(meta.dtype):
            out.requires_grad = True
            out.producer = (op, i)
        outputs.append(out)
    if op is not None:
        op._outputs = [weakref.ref(t) for t in outputs]
        op._values = values
    return outputs


def _distributed_outputs(opdef, tensors, metas, op, values, out_ds):
    """Global eager outputs (global shape, local value, states) of a dispatched op; autodiff records
    the logical `op`. Its outputs are held strongly: one rebuilt from a bare value would lose its
    states (the op -> output cycle is left to the collector)."""
    track = opdef.differentiable and context.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outputs = []
    for i, (meta, value, ds) in enumerate(zip(metas, values, out_ds)):
        if value is None:
            out = Tensor(meta.shape, meta.dtype, _default_device(tensors, meta), kind="token")
        else:
            out = Tensor(meta.shape, meta.dtype, meta.device or str(value.device), value=value)
        out.ds = ds
        if track and dtypes.is_floating(meta.dtype):
            out.requires_grad = True
            out.producer = (op, i)
        outputs.append(out)
    op._outputs, op._values = outputs, None
    return outputs


def _record(graph, opdef, tensors, attrs, metas):
    for t in tensors:
        if t.graph is not None and t.graph is not graph:
            raise GraphError(f"{opdef.name}: input {t!r} belongs to graph '{t.graph.name}', "
                             f"not to the graph being built ('{graph.name}')")
    op = Op(opdef, tensors, attrs, graph)
    track = opdef.differentiable
    op._outputs = [
        Tensor(meta.shape, meta.dtype, _default_device(tensors, meta), producer=(op, i), graph=graph,
               requires_grad=track and dtypes.is_floating(meta.dtype)
               and any(t.requires_grad for t in tensors))
        for i, meta in enumerate(metas)
    ]
    graph.ops.append(op)
    return op._outputs


def topological_ops(outputs, graph=None) -> list[Op]:
    """The ops `outputs` depend on, inputs before consumers.

    With `graph`, the walk stops at tensors of other graphs and at leaves, which the
    plan reads as they are (parameters, constants, eager tensors).
    """
    order: list[Op] = []
    visited: set[int] = set()
    stack = [(t.producer[0], False) for t in reversed(outputs)
             if t.producer is not None and (graph is None or t.graph is graph)]
    while stack:
        op, done = stack.pop()
        if done:
            order.append(op)
            continue
        if id(op) in visited:
            continue
        visited.add(id(op))
        stack.append((op, True))
        for t in reversed(op.inputs):
            producer = t.producer
            if producer is not None and id(producer[0]) not in visited and (graph is None or t.graph is graph):
                stack.append((producer[0], False))
    return order
