"""Tensors made from nothing or from another tensor's shape: zeros, ones, full, arange, *_like."""

from __future__ import annotations

import math
import numbers

import torch

from luoshu.core import dtypes
from luoshu.core.errors import OpError, ShapeError
from luoshu.core.op import OpDef, apply, register
from luoshu.core.shapes import normalize_axis
from luoshu.core.tensor import TensorMeta, normalize_device
from luoshu.ops._states import WHOLE, Candidate, choose, dup, group_size, split


class _Like(OpDef):
    """Shape, dtype and device follow the input (at run time, so `None` dims work)."""

    differentiable = False
    attrs = {"dtype": None}
    shape_inputs = (0,)

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


@register
class ArangeLike(OpDef):
    """0, 1, ..., n - 1 for n the run-time size of `x` along `axis`: the positions of a sequence
    whose length is fed at run time (a `None` dim), on x's device. With `limit`, a size above it
    is refused when the plan runs (a model's maximum length, before an out-of-range lookup)."""

    name = "arange_like"
    shape_inputs = (0,)
    differentiable = False
    attrs = {"axis": 0, "dtype": "int64", "limit": None}

    def infer(self, inputs, axis, dtype, limit):
        x = inputs[0]
        n = x.shape[normalize_axis(self.name, axis, x.ndim)]
        if limit is not None and n is not None and n > limit:
            raise self.shape_error(inputs, f"axis {axis} has size {n}, more than the limit {limit}")
        return TensorMeta((n,), dtypes.dtype_name(dtype))

    def deduce_states(self, input_ds, _io=None, axis=0, **attrs):
        """Duplicate positions from any `x` whose `axis` is not split (x gives only its shape)."""
        n = group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        ndim = len(_io.inputs[0])
        a = normalize_axis(self.name, axis, ndim)
        cands = [Candidate((WHOLE,), (dup(n),))]
        cands += [Candidate((split(n, d),), (dup(n),)) for d in range(ndim) if d != a]
        return choose(self.name, cands, input_ds)

    @staticmethod
    def compute(x, axis, dtype, limit):
        n = x.shape[axis]
        if limit is not None and n > limit:
            raise OpError(f"arange_like: the fed size {n} of axis {axis} exceeds the limit {limit} "
                          "(the maximum sequence length)")
        return torch.arange(n, dtype=dtypes.to_torch(dtype), device=x.device)


def zeros_like(x, dtype=None):
    return apply("zeros_like", x, dtype=dtype)


def ones_like(x, dtype=None):
    return apply("ones_like", x, dtype=dtype)


def full_like(x, fill_value, dtype=None):
    return apply("full_like", x, fill_value=fill_value, dtype=dtype)


def arange_like(x, axis: int = 0, dtype="int64", limit: int | None = None):
    """`arange(x.shape[axis])` with the size read when the graph runs (at most `limit`)."""
    return apply("arange_like", x, axis=int(axis), dtype=dtypes.dtype_name(dtype),
                 limit=None if limit is None else int(limit))


# --- from nothing: shape, dtype and device are attributes ------------------------------------
def _shape_attr(shape) -> tuple[int, ...]:
    """`f(2, 3)`, `f((2, 3))` and `f([2, 3])` alike."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = shape[0]
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ShapeError(f"shape {shape} has a negative dimension")
    return shape


class _Create(OpDef):
    """An op without inputs: its shape, dtype and device come from its attributes."""

    differentiable = False
    attrs = {"shape": (), "dtype": "float32", "device": "cpu"}

    def infer(self, inputs, shape, dtype, device, **attrs):
        return TensorMeta(tuple(shape), dtypes.dtype_name(dtype), device)


@register
class Zeros(_Create):
    name = "zeros"

    @staticmethod
    def compute(shape, dtype, device):
        return torch.zeros(shape, dtype=dtypes.to_torch(dtype), device=device)


@register
class Ones(_Create):
    name = "ones"

    @staticmethod
    def compute(shape, dtype, device):
        return torch.ones(shape, dtype=dtypes.to_torch(dtype), device=device)


@register
class Full(_Create):
    name = "full"
    attrs = {"shape": (), "fill_value": 0.0, "dtype": "float32", "device": "cpu"}

    @staticmethod
    def compute(shape, fill_value, dtype, device):
        return torch.full(shape, fill_value, dtype=dtypes.to_torch(dtype), device=device)


def _arange_length(start, stop, step) -> int:
    if step == 0:
        raise OpError("arange: step must not be 0")
    if all(isinstance(v, int) for v in (start, stop, step)):
        return max(0, -((start - stop) // step))  # ceil division, exact for ints
    return max(0, math.ceil((stop - start) / step))


@register
class Arange(_Create):
    name = "arange"
    attrs = {"start": 0, "stop": 0, "step": 1, "dtype": "int64", "device": "cpu"}

    def infer(self, inputs, start, stop, step, dtype, device):
        return TensorMeta((_arange_length(start, stop, step),), dtypes.dtype_name(dtype), device)

    @staticmethod
    def compute(start, stop, step, dtype, device):
        return torch.arange(start, stop, step, dtype=dtypes.to_torch(dtype), device=device)


@register
class Eye(_Create):
    name = "eye"
    attrs = {"n": 1, "m": None, "dtype": "float32", "device": "cpu"}

    def infer(self, inputs, n, m, dtype, device):
        return TensorMeta((n, n if m is None else m), dtypes.dtype_name(dtype), device)

    @staticmethod
    def compute(n, m, dtype, device):
        return torch.eye(n, n if m is None else m, dtype=dtypes.to_torch(dtype), device=device)


def _dtype(dtype, default: str = dtypes.DEFAULT_FLOAT) -> str:
    return default if dtype is None else dtypes.dtype_name(dtype)


def zeros(*shape, dtype=None, device=None):
    return apply("zeros", shape=_shape_attr(shape), dtype=_dtype(dtype), device=normalize_device(device))


def ones(*shape, dtype=None, device=None):
    return apply("ones", shape=_shape_attr(shape), dtype=_dtype(dtype), device=normalize_device(device))


def full(shape, fill_value, dtype=None, device=None):
    """A tensor of `fill_value`; the dtype follows the value (bool, int64 or float32) unless given."""
    shape = _shape_attr((shape,))
    if dtype is None:
        dtype = "bool" if isinstance(fill_value, bool) else (
            dtypes.DEFAULT_INT if isinstance(fill_value, numbers.Integral) else dtypes.DEFAULT_FLOAT)
    value = bool(fill_value) if isinstance(fill_value, bool) else (
        int(fill_value) if isinstance(fill_value, numbers.Integral) else float(fill_value))
    return apply("full", shape=shape, fill_value=value, dtype=dtypes.dtype_name(dtype),
                 device=normalize_device(device))


def arange(start, stop=None, step=1, dtype=None, device=None):
    """`arange(stop)` or `arange(start, stop, step)`; int64 for integer bounds, else float32."""
    if stop is None:
        start, stop = 0, start
    bounds = [v.item() if hasattr(v, "item") else v for v in (start, stop, step)]
    if dtype is None:
        dtype = dtypes.DEFAULT_INT if all(isinstance(v, numbers.Integral) for v in bounds) else dtypes.DEFAULT_FLOAT
    bounds = [int(v) if isinstance(v, numbers.Integral) else float(v) for v in bounds]
    start, stop, step = bounds
    return apply("arange", start=start, stop=stop, step=step, dtype=dtypes.dtype_name(dtype),
                 device=normalize_device(device))


def eye(n: int, m: int | None = None, dtype=None, device=None):
    return apply("eye", n=int(n), m=None if m is None else int(m), dtype=_dtype(dtype),
                 device=normalize_device(device))


__all__ = ["arange", "arange_like", "eye", "full", "full_like", "ones", "ones_like", "zeros", "zeros_like"]
