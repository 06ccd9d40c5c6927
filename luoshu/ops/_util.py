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
