"""Normalisation layers: BatchNorm1d/2d, LayerNorm, RMSNorm, GroupNorm.

Parameter and buffer names match torch.nn, so torch state dicts load as they are.
"""

from __future__ import annotations

import numpy as np
import torch

from luoshu.core import context, dtypes
from luoshu.core.errors import Error
from luoshu.core.tensor import normalize_device
from luoshu.nn import functional as F
from luoshu.nn import init
from luoshu.nn.layers import empty_parameter
from luoshu.nn.module import Module


def _filled(shape, value: float, dtype, device):
    return torch.full(tuple(shape), value, dtype=dtypes.to_torch(dtype), device=normalize_device(device))


def _shape_tuple(normalized_shape) -> tuple[int, ...]:
    return (int(normalized_shape),) if isinstance(normalized_shape, int) else tuple(int(d) for d in normalized_shape)


class _BatchNorm(Module):
    """Batch normalisation over the channel dim 1; running statistics are buffers updated in place.

    `num_batches_tracked` counts training batches in eager mode (it drives the cumulative
    average of `momentum=None`); a define-and-run graph needs a float momentum.
    """

    _ranks: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, dtype="float32", device=None):
        super().__init__()
        if num_features <= 0:
            raise Error(f"{type(self).__name__} needs num_features > 0, found {num_features}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = empty_parameter((num_features,), dtype, device)
            self.bias = empty_parameter((num_features,), dtype, device)
            init.ones_(self.weight)
            init.zeros_(self.bias)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", _filled((num_features,), 0.0, dtype, device))
            self.register_buffer("running_var", _filled((num_features,), 1.0, dtype, device))
            self.register_buffer("num_batches_tracked", np.zeros((), np.int64))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            init.zeros_(self.running_mean)
            init.ones_(self.running_var)
            self.num_batches_tracked.value.zero_()

    def forward(self, x):
        if x.ndim not in self._ranks:
            raise Error(f"{type(self).__name__} expects an input of rank {' or '.join(map(str, self._ranks))}, "
                        f"found shape {x.shape}")
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            if context.current_graph() is None:
                self.num_batches_tracked.value.add_(1)
                if self.momentum is None:  # cumulative moving average
                    momentum = 1.0 / float(self.num_batches_tracked.value)
            elif self.momentum is None:
                raise Error(f"{type(self).__name__}(momentum=None) works in eager mode only; "
                            "give a float momentum inside a define-and-run graph")
        use_batch_stats = self.training or self.running_mean is None
        keep_stats = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if keep_stats else None, self.running_var if keep_stats else None,
                            self.weight, self.bias, use_batch_stats, momentum, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Over (N, C) or (N, C, L)."""

    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Over (N, C, H, W)."""

    _ranks = (4,)


class LayerNorm(Module):
    """Normalises over the trailing `normalized_shape` dims, with an elementwise affine map."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 dtype="float32", device=None):
        super().__init__()
        self.normalized_shape = _shape_tuple(normalized_shape)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        if elementwise_affine:
            self.weight = empty_parameter(self.normalized_shape, dtype, device)
            init.ones_(self.weight)
            if bias:
                self.bias = empty_parameter(self.normalized_shape, dtype, device)
                init.zeros_(self.bias)
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class RMSNorm(Module):
    """x / sqrt(mean(x²) + eps) * weight over the trailing dims; eps defaults to the dtype's eps."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 dtype="float32", device=None):
        super().__init__()
        self.normalized_shape = _shape_tuple(normalized_shape)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        if elementwise_affine:
            self.weight = empty_parameter(self.normalized_shape, dtype, device)
            init.ones_(self.weight)
        else:
            self.register_parameter("weight", None)

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class GroupNorm(Module):
    """Normalises each of `num_groups` channel groups of (N, C, *); per-channel affine."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 dtype="float32", device=None):
        super().__init__()
        if num_groups <= 0 or num_channels % num_groups:
            raise Error(f"GroupNorm: num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        if affine:
            self.weight = empty_parameter((num_channels,), dtype, device)
            self.bias = empty_parameter((num_channels,), dtype, device)
            init.ones_(self.weight)
            init.zeros_(self.bias)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
