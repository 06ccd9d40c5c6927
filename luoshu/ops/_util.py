"""Helpers shared by the operator families (not public)."""

from __future__ import annotations

from luoshu.core import dtypes
from luoshu.core.op import apply
from luoshu.core.shapes import numel
from luoshu.core.tensor import Tensor


def wants(op, i: int) -> bool:
    """Whether the gradient rule should build the gradient of input `i`."""
    return not op.needs_grad or op.needs_grad[i]


def sum_to(grad: Tensor, like: Tensor) -> Tensor:
    """Reduces a broadcast gradient back to the shape of the input it flows to."""
    if grad.shape == like.shape and numel(like.shape) is not None:
        return grad
    return apply("sum_to", grad, like)


def float_dtype(dtype: str) -> str:
    """Ops with real-valued results turn integer inputs into the default float dtype."""
    return dtype if dtypes.is_floating(dtype) else dtypes.DEFAULT_FLOAT


def gradient_by_recompute(op, grads: list, forward, primals: list[int | None]) -> list:
    """The gradient rule of a fused backward op, built from primitives: the backward's maths again.

    A fused backward op `B(g, *inputs) = vjp of F at inputs` (ATen's kernel each way) has no rule of
    its own; this one writes `F` as a composite of primitive ops (`forward(*op.inputs[1:])`), takes its
    vjp with cotangent `op.inputs[0]` as ordinary ops, and differentiates `<grads, vjp>` once more, so
    gradient penalties and meta-learning see second (and higher) order through the fused op. Output
    `j` of the op is the gradient of input `primals[j]` of `op.inputs` (None: an output not used).
    Only used when a second-order gradient is asked for; the first-order path keeps the fused kernels.
    """
    from luoshu.core import context
    from luoshu.core.autodiff import gradients

    outer_graph = context.is_grad_enabled()  # building a graph (graph mode, or create_graph=True)
    g = op.inputs[0]
    with context.enable_grad():
        y = forward(*op.inputs[1:])
        used = [(i, gg) for i, gg in zip(primals, grads) if i is not None and gg is not None]
        vjps = gradients(y, [op.inputs[i] for i, _ in used], g, create_graph=True) if used else []
        terms = [apply("sum", v * gg) for v, (_, gg) in zip(vjps, used) if v is not None]
        if not terms:
            return [None] * len(op.inputs)
        total = terms[0]
        for t in terms[1:]:
            total = total + t
    wanted = [i for i, t in enumerate(op.inputs) if wants(op, i) and dtypes.is_floating(t.dtype)]
    result = [None] * len(op.inputs)
    if wanted:
        found = gradients(total, [op.inputs[i] for i in wanted], create_graph=outer_graph)
        for i, gi in zip(wanted, found):
            result[i] = gi
    return result
