"""Parameter initialisers, in place, drawing from luoshu's seeded generator.

Each has a torch-style in-place name (`xavier_uniform_`) and a plain alias
(`xavier_uniform`). Fan computations follow PyTorch's conventions, so a layer
initialised here has the same distribution as its torch counterpart.
"""

from __future__ import annotations

import math

import torch

from luoshu.core.errors import Error
from luoshu.core.random import generator
from luoshu.core.tensor import Tensor


def _value(t) -> torch.Tensor:
    return t.value if isinstance(t, Tensor) else t


def calculate_fans(shape) -> tuple[int, int]:
    if len(shape) < 2:
        raise Error(f"fan in/out needs a tensor of rank >= 2, found shape {tuple(shape)}")
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def calculate_gain(nonlinearity: str, param=None) -> float:
    gains = {"linear": 1.0, "conv1d": 1.0, "conv2d": 1.0, "sigmoid": 1.0, "tanh": 5.0 / 3,
             "relu": math.sqrt(2.0), "selu": 0.75}
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else param
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity not in gains:
        raise Error(f"unknown nonlinearity {nonlinearity!r}; expected one of {sorted(gains)} or 'leaky_relu'")
    return gains[nonlinearity]


def _fan(shape, mode: str) -> int:
    fan_in, fan_out = calculate_fans(shape)
    if mode not in ("fan_in", "fan_out"):
        raise Error(f"mode must be 'fan_in' or 'fan_out', found {mode!r}")
    return fan_in if mode == "fan_in" else fan_out


def zeros_(t):
    _value(t).zero_()
    return t


def ones_(t):
    _value(t).fill_(1.0)
    return t


def constant_(t, val: float):
    _value(t).fill_(val)
    return t


def uniform_(t, a: float = 0.0, b: float = 1.0):
    v = _value(t)
    v.uniform_(a, b, generator=generator(str(v.device)))
    return t


def normal_(t, mean: float = 0.0, std: float = 1.0):
    v = _value(t)
    v.normal_(mean, std, generator=generator(str(v.device)))
    return t


def trunc_normal_(t, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0):
    """Normal(mean, std) truncated to [a, b], by inverse-CDF sampling (no rejection loop)."""
    v = _value(t)

    def cdf(x):
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
    v.uniform_(2 * lo - 1, 2 * hi - 1, generator=generator(str(v.device)))
    v.erfinv_().mul_(std * math.sqrt(2.0)).add_(mean).clamp_(a, b)
    return t


def xavier_uniform_(t, gain: float = 1.0):
    fan_in, fan_out = calculate_fans(_value(t).shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(t, -bound, bound)


def xavier_normal_(t, gain: float = 1.0):
    fan_in, fan_out = calculate_fans(_value(t).shape)
    return normal_(t, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))


def kaiming_uniform_(t, a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu"):
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(_value(t).shape, mode))
    bound = math.sqrt(3.0) * std
    return uniform_(t, -bound, bound)


def kaiming_normal_(t, a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu"):
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(_value(t).shape, mode))
    return normal_(t, 0.0, std)


zeros, ones, constant, uniform, normal = zeros_, ones_, constant_, uniform_, normal_
truncated_normal = trunc_normal_
xavier_uniform, xavier_normal = xavier_uniform_, xavier_normal_
kaiming_uniform, kaiming_normal = kaiming_uniform_, kaiming_normal_
