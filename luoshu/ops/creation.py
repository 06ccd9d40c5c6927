"""Tensors made from nothing or from another tensor's shape: zeros, ones, full, arange, *_like."""

from __future__ import annotations

import torch

from luoshu.core import dtypes
from luoshu.core.op import OpDef, apply, register
from luoshu.core.tensor import TensorMeta


class _Like(OpDef):
    """Shape, dtype and device follow the input (at run time, so `None` dims work)."""

    differentiable = False
    attrs = {"dtype": None}

    def infer(self, inputs, dtype, **attrs):
        x = inputs[0]
        return TensorMeta(x.shape, dtypes.dtype_name(dtype) if dtype else x.dtype)


@register
class ZerosLike(_Like):
    name = "zeros_like"

    @staticmethod
    def compute(x, dtype):
        return torch.zeros_like(x, dtype=dtypes.to_torch(dtype) if dtype else None)


@register
class OnesLike(_Like):
    name = "ones_like"

    @staticmethod
    def compute(x, dtype):
        return torch.ones_like(x, dtype=dtypes.to_torch(dtype) if dtype else None)


@register
class FullLike(_Like):
    name = "full_like"
    attrs = {"fill_value": 0.0, "dtype": None}

    @staticmethod
    def compute(x, fill_value, dtype):
        return torch.full_like(x, fill_value, dtype=dtypes.to_torch(dtype) if dtype else None)


def zeros_like(x, dtype=None):
    return apply("zeros_like", x, dtype=dtype)


def ones_like(x, dtype=None):
    return apply("ones_like", x, dtype=dtype)


def full_like(x, fill_value, dtype=None):
    return apply("full_like", x, fill_value=fill_value, dtype=dtype)

__all__ = ["full_like", "ones_like", "zeros_like"]
