"""Reductions over any axes (with keepdims) and their gradients."""

from __future__ import annotations

import torch

from luoshu.core.op import OpDef, apply, register
from luoshu.core.shapes import broadcast_shapes, normalize_axes, reduced_shape
from luoshu.core.tensor import TensorMeta


@register
class SumTo(OpDef):
    """Sums a broadcast gradient down to the shape of `like` (known only at run time)."""

    name = "sum_to"

    def infer(self, inputs):
        g, like = inputs
        broadcast_shapes(self.name, g.shape, like.shape)
        return TensorMeta(like.shape, g.dtype)

    @staticmethod
    def compute(g, like):
        shape = like.shape
        return g if g.shape == shape else g.sum_to_size(shape).reshape(shape)

    def gradient(self, op, grads):
        return [apply("broadcast_like", grads[0], op.inputs[0]), None]


@register
class BroadcastLike(OpDef):
    """Broadcasts `x` to the shape of `like` (the dual of sum_to)."""

    name = "broadcast_like"

    def infer(self, inputs):
        x, like = inputs
        return TensorMeta(broadcast_shapes(self.name, x.shape, like.shape), x.dtype)

    @staticmethod
    def compute(x, like):
        return x.expand(like.shape)

    def gradient(self, op, grads):
        return [apply("sum_to", grads[0], op.inputs[0]), None]


@register
class Sum(OpDef):
    name = "sum"
    attrs = {"axis": None, "keepdims": False}
    autocast = "fp32"

    def infer(self, inputs, axis, keepdims):
        x, = inputs
        axes = normalize_axes(self.name, axis, x.ndim)
        dtype = "int64" if x.dtype in ("bool", "int8", "int16", "int32", "uint8") else x.dtype
        return TensorMeta(reduced_shape(x.shape, axes, keepdims), dtype)

    @staticmethod
    def compute(x, axis, keepdims):
        if axis is None:
            return x.sum()
        return x.sum(dim=axis, keepdim=keepdims)

    def gradient(self, op, grads):
        x = op.inputs[0]
        axes = normalize_axes(self.name, op.attrs["axis"], x.ndim)
        # A full reduction's gradient is 0-d and broadcasts as it is.
        full = len(axes) == x.ndim
        g = grads[0] if op.attrs["keepdims"] or full else _keepdims(grads[0], axes)
        return [apply("broadcast_like", g, x)]


def _keepdims(g, axes):
    """Re-inserts the reduced axes of a gradient as size-1 dims so it broadcasts over x."""
    for a in axes:
        g = apply("unsqueeze", g, axis=a)
    return g


def _axis_attr(axis):
    if axis is None or isinstance(axis, int):
        return axis
    return tuple(int(a) for a in axis)


def sum(x, axis=None, keepdims: bool = False):  # noqa: A001 - mirrors numpy/torch naming
    return apply("sum", x, axis=_axis_attr(axis), keepdims=keepdims)


__all__ = ["sum"]
