"""Convolution and pooling layers: Conv1d, Conv2d, ConvTranspose2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d.

Constructor arguments, parameter names and shapes, and initialisation follow torch.nn.
"""

from __future__ import annotations

import math

from luoshu.core.errors import Error
from luoshu.nn import functional as F
from luoshu.nn import init
from luoshu.nn.layers import empty_parameter
from luoshu.nn.module import Module

_PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}


def _ntuple(value, n: int, what: str, layer: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise Error(f"{layer}: {what} needs {n} values, found {value}")
    return value


class _ConvNd(Module):
    """Shared by the convolution layers; `transposed` stores the weight as (in, out/groups, *k)."""

    _n = 2
    _transposed = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", output_padding=0,
                 dtype="float32", device=None):
        super().__init__()
        layer, n = type(self).__name__, self._n
        if in_channels <= 0 or out_channels <= 0 or groups <= 0:
            raise Error(f"{layer} needs positive sizes, found in_channels={in_channels}, "
                        f"out_channels={out_channels}, groups={groups}")
        if in_channels % groups or out_channels % groups:
            raise Error(f"{layer}: in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                        f"divisible by groups ({groups})")
        if padding_mode not in _PADDING_MODES:
            raise Error(f"{layer}: padding_mode must be one of {sorted(_PADDING_MODES)}, found {padding_mode!r}")
        if isinstance(padding, str):
            if padding not in ("same", "valid") or self._transposed:
                raise Error(f"{layer}: padding must be ints{'' if self._transposed else ', valid or same'}, "
                            f"found {padding!r}")
        else:
            padding = _ntuple(padding, n, "padding", layer)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _ntuple(kernel_size, n, "kernel_size", layer)
        self.stride = _ntuple(stride, n, "stride", layer)
        self.dilation = _ntuple(dilation, n, "dilation", layer)
        self.output_padding = _ntuple(output_padding, n, "output_padding", layer)
        self.padding, self.padding_mode = padding, padding_mode
        if padding == "same" and any(s != 1 for s in self.stride):
            raise Error(f"{layer}: padding='same' needs stride 1, found stride {self.stride}")
        if self._transposed:
            shape = (in_channels, out_channels // groups) + self.kernel_size
        else:
            shape = (out_channels, in_channels // groups) + self.kernel_size
        self.weight = empty_parameter(shape, dtype, device)
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if bias:
            self.bias = empty_parameter((out_channels,), dtype, device)
            fan_in, _ = init.calculate_fans(shape)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)

    def _pad_input(self, x):
        """Non-zero padding modes pad explicitly, then convolve without padding (as torch does)."""
        if self.padding_mode == "zeros":
            return x, self.padding
        if self.padding == "valid":
            return x, 0
        if self.padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            pads = tuple(p for t in reversed(total) for p in (t // 2, t - t // 2))
        else:
            pads = tuple(p for p in reversed(self.padding) for _ in range(2))
        return F.pad(x, pads, mode=_PADDING_MODES[self.padding_mode]), 0

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s


class Conv1d(_ConvNd):
    """1-d convolution over (N, C_in, L) or (C_in, L)."""

    _n = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", dtype="float32", device=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)

    def forward(self, x):
        x, padding = self._pad_input(x)
        return F.conv1d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


class Conv2d(_ConvNd):
    """2-d convolution over (N, C_in, H, W) or (C_in, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", dtype="float32", device=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)

    def forward(self, x):
        x, padding = self._pad_input(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


class ConvTranspose2d(_ConvNd):
    """2-d transposed convolution; `forward(x, output_size)` picks output_padding to hit that size."""

    _transposed = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, padding_mode: str = "zeros", dtype="float32",
                 device=None):
        if padding_mode != "zeros":
            raise Error(f"ConvTranspose2d only supports padding_mode='zeros', found {padding_mode!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, output_padding, device=device, dtype=dtype)
        if any(op >= max(s, d) for op, s, d in zip(self.output_padding, self.stride, self.dilation)):
            raise Error(f"ConvTranspose2d: output_padding {self.output_padding} must be smaller than stride "
                        f"{self.stride} or dilation {self.dilation}")

    def _output_padding_for(self, x, output_size) -> tuple[int, ...]:
        if output_size is None:
            return self.output_padding
        output_size = tuple(int(s) for s in output_size)[-2:]
        if len(output_size) != 2:
            raise Error(f"ConvTranspose2d: output_size needs 2 spatial sizes, found {output_size}")
        result = []
        for i, want in enumerate(output_size):
            size = x.shape[x.ndim - 2 + i]
            if size is None:
                raise Error("ConvTranspose2d: output_size needs the input's spatial sizes known at build time")
            smallest = ((size - 1) * self.stride[i] - 2 * self.padding[i]
                        + self.dilation[i] * (self.kernel_size[i] - 1) + 1)
            if not smallest <= want < smallest + self.stride[i]:
                raise Error(f"ConvTranspose2d: output size {output_size} is not reachable from input "
                            f"{x.shape}; spatial dim {i} must be in [{smallest}, {smallest + self.stride[i]})")
            result.append(want - smallest)
        return tuple(result)

    def forward(self, x, output_size=None):
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding,
                                  self._output_padding_for(x, output_size), self.groups, self.dilation)


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices: bool = False,
                 ceil_mode: bool = False):
        super().__init__()
        if return_indices:
            raise Error("MaxPool2d: return_indices=True is not supported")
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class AvgPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: int | None = None):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad, self.divisor_override = ceil_mode, count_include_pad, divisor_override

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                            self.divisor_override)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"
