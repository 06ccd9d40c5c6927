"""Random operators drawing from luoshu's seeded generators (`luoshu.manual_seed`).

Each draws from `luoshu.core.random.generator(device)` exactly as the torch function
with that generator would, so `ls.manual_seed(s); ls.ops.uniform((3, 4))` equals
`torch.rand(3, 4, generator=torch.Generator().manual_seed(s))`. None has a gradient.
"""

from __future__ import annotations

import torch

from luoshu.core import dtypes
from luoshu.core.errors import DTypeError, OpError
from luoshu.core.op import OpDef, apply, register
from luoshu.core.random import generator
from luoshu.core.tensor import TensorMeta, normalize_device
from luoshu.ops.creation import _shape_attr


class _Random(OpDef):
    """A random tensor of `shape`, `dtype` on `device` (an op without inputs)."""

    differentiable = False
    random = True

    def infer(self, inputs, shape, dtype, device, **attrs):
        return TensorMeta(tuple(shape), dtypes.dtype_name(dtype), device)


class _RandomLike(OpDef):
    """A random tensor shaped like the input (at run time, so `None` dims work)."""

    differentiable = False
    random = True

    def infer(self, inputs, dtype, **attrs):
        x = inputs[0]
        dtype = dtypes.dtype_name(dtype) if dtype else x.dtype
        if not dtypes.is_floating(dtype):
            raise DTypeError(f"{self.name}: needs a floating dtype, found {dtype}")
        return TensorMeta(x.shape, dtype)


def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtypes.to_torch(dtype), device=device)


@register
class Uniform(_Random):
    name = "uniform"
    attrs = {"shape": (), "low": 0.0, "high": 1.0, "dtype": "float32", "device": "cpu"}

    @staticmethod
    def compute(shape, low, high, dtype, device):
        return _empty(shape, dtype, device).uniform_(low, high, generator=generator(device))


@register
class UniformLike(_RandomLike):
    name = "uniform_like"
    attrs = {"low": 0.0, "high": 1.0, "dtype": None}

    @staticmethod
    def compute(x, low, high, dtype):
        out = torch.empty_like(x, dtype=dtypes.to_torch(dtype) if dtype else None)
        return out.uniform_(low, high, generator=generator(str(x.device)))


@register
class Normal(_Random):
    name = "normal"
    attrs = {"shape": (), "mean": 0.0, "std": 1.0, "dtype": "float32", "device": "cpu"}

    @staticmethod
    def compute(shape, mean, std, dtype, device):
        return _empty(shape, dtype, device).normal_(mean, std, generator=generator(device))


@register
class NormalLike(_RandomLike):
    name = "normal_like"
    attrs = {"mean": 0.0, "std": 1.0, "dtype": None}

    @staticmethod
    def compute(x, mean, std, dtype):
        out = torch.empty_like(x, dtype=dtypes.to_torch(dtype) if dtype else None)
        return out.normal_(mean, std, generator=generator(str(x.device)))


@register
class Bernoulli(OpDef):
    """0/1 draws: with an input, one per element with that element's probability (the
    result takes its shape and dtype); without, `shape` draws with probability `p`."""

    name = "bernoulli"
    attrs = {"p": 0.5, "shape": (), "dtype": "float32", "device": "cpu"}
    differentiable = False
    random = True

    def infer(self, inputs, p, shape, dtype, device):
        if inputs:
            probs, = inputs
            if not dtypes.is_floating(probs.dtype):
                raise DTypeError(f"bernoulli: probabilities must be floating, found {probs.dtype}")
            return TensorMeta(probs.shape, probs.dtype)
        return TensorMeta(tuple(shape), dtypes.dtype_name(dtype), device)

    @staticmethod
    def compute(*probs, p, shape, dtype, device):
        if probs:
            return torch.bernoulli(probs[0], generator=generator(str(probs[0].device)))
        return _empty(shape, dtype, device).bernoulli_(p, generator=generator(device))


@register
class Randint(_Random):
    name = "randint"
    attrs = {"low": 0, "high": 2, "shape": (), "dtype": "int64", "device": "cpu"}

    def infer(self, inputs, low, high, shape, dtype, device):
        if high <= low:
            raise OpError(f"randint: high ({high}) must be greater than low ({low})")
        return super().infer(inputs, shape, dtype, device)

    @staticmethod
    def compute(low, high, shape, dtype, device):
        return torch.randint(low, high, shape, generator=generator(device), dtype=dtypes.to_torch(dtype),
                             device=device)


@register
class Randperm(_Random):
    name = "randperm"
    attrs = {"n": 0, "dtype": "int64", "device": "cpu"}

    def infer(self, inputs, n, dtype, device):
        return super().infer(inputs, (n,), dtype, device)

    @staticmethod
    def compute(n, dtype, device):
        return torch.randperm(n, generator=generator(device), dtype=dtypes.to_torch(dtype), device=device)


def _float(dtype) -> str:
    dtype = dtypes.DEFAULT_FLOAT if dtype is None else dtypes.dtype_name(dtype)
    if not dtypes.is_floating(dtype):
        raise DTypeError(f"needs a floating dtype, found {dtype}")
    return dtype


def uniform(shape, low: float = 0.0, high: float = 1.0, dtype=None, device=None):
    """Uniform in [low, high) (torch.rand for the defaults)."""
    return apply("uniform", shape=_shape_attr((shape,)), low=float(low), high=float(high), dtype=_float(dtype),
                 device=normalize_device(device))


def normal(shape, mean: float = 0.0, std: float = 1.0, dtype=None, device=None):
    """Gaussian with `mean` and `std` (torch.randn for the defaults)."""
    return apply("normal", shape=_shape_attr((shape,)), mean=float(mean), std=float(std), dtype=_float(dtype),
                 device=normalize_device(device))


def uniform_like(x, low: float = 0.0, high: float = 1.0, dtype=None):
    return apply("uniform_like", x, low=float(low), high=float(high), dtype=dtype and dtypes.dtype_name(dtype))


def normal_like(x, mean: float = 0.0, std: float = 1.0, dtype=None):
    return apply("normal_like", x, mean=float(mean), std=float(std), dtype=dtype and dtypes.dtype_name(dtype))


def bernoulli(p, shape=None, dtype=None, device=None):
    """`bernoulli(probs_tensor)` draws one 0/1 per element (torch.bernoulli);
    `bernoulli(0.3, shape)` draws `shape` of them with probability 0.3."""
    if shape is None:
        return apply("bernoulli", p)
    return apply("bernoulli", p=float(p), shape=_shape_attr((shape,)), dtype=_float(dtype),
                 device=normalize_device(device))


def randint(low: int, high: int | None = None, shape=(), dtype=None, device=None):
    """Integers in [low, high) (`randint(high, shape=...)` starts at 0), as torch.randint."""
    if high is None:
        low, high = 0, low
    return apply("randint", low=int(low), high=int(high), shape=_shape_attr((shape,)),
                 dtype=dtypes.dtype_name(dtype or dtypes.DEFAULT_INT), device=normalize_device(device))


def randperm(n: int, dtype=None, device=None):
    return apply("randperm", n=int(n), dtype=dtypes.dtype_name(dtype or dtypes.DEFAULT_INT),
                 device=normalize_device(device))


__all__ = ["bernoulli", "normal", "normal_like", "randint", "randperm", "uniform", "uniform_like"]
