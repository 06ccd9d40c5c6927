"""Convolution (1-D, 2-D, transposed) and 2-D pooling, with ATen's fused backward kernels."""

from __future__ import annotations

import math

import torch

from luoshu.core import dtypes
from luoshu.core.errors import OpError
from luoshu.core.op import OpDef, apply, register
from luoshu.core.shapes import same_dim
from luoshu.core.tensor import TensorMeta

aten = torch.ops.aten


def _tuple(value, n: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise OpError(f"{what} needs {n} values, found {value}")
    return value


def _out_size(size, kernel, stride, padding, dilation, ceil_mode=False):
    if size is None:
        return None
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (math.ceil if ceil_mode else math.floor)(span / stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window must start inside the input or its left padding
    return out


@register
class Convolution(OpDef):
    """N-d convolution or transposed convolution (aten.convolution); inputs (x, weight[, bias])."""

    name = "convolution"
    attrs = {"stride": (1,), "padding": (0,), "dilation": (1,), "transposed": False, "output_padding": (0,),
             "groups": 1}
    autocast = "lower"

    def infer(self, inputs, stride, padding, dilation, transposed, output_padding, groups):
        x, w = inputs[0], inputs[1]
        n = w.ndim - 2
        if n < 1 or x.ndim != n + 2 or any(len(a) != n for a in (stride, padding, dilation, output_padding)):
            raise self.shape_error(inputs, f"a {n}-d convolution needs input (N, C, *{n} dims) and "
                                           f"{n}-entry stride/padding/dilation")
        in_channels = w.shape[0] if transposed else w.shape[1] * groups
        if not same_dim(x.shape[1], in_channels):
            raise self.shape_error(inputs, f"input has {x.shape[1]} channels, the weight expects {in_channels} "
                                           f"(groups={groups})")
        out_channels = w.shape[1] * groups if transposed else w.shape[0]
        if not transposed and out_channels % groups:
            raise self.shape_error(inputs, f"{out_channels} output channels do not divide into {groups} groups")
        if len(inputs) == 3 and (inputs[2].ndim != 1 or not same_dim(inputs[2].shape[0], out_channels)):
            raise self.shape_error(inputs, f"bias must be ({out_channels},)")
        spatial = []
        for i in range(n):
            size, k = x.shape[2 + i], w.shape[2 + i]
            if size is None:
                spatial.append(None)
            elif transposed:
                spatial.append((size - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k - 1)
                               + output_padding[i] + 1)
            else:
                spatial.append(_out_size(size, k, stride[i], padding[i], dilation[i]))
            if spatial[-1] is not None and spatial[-1] < 1:
                raise self.shape_error(inputs, f"spatial dim {i} of size {size} is too small for kernel {k}")
        return TensorMeta((x.shape[0], out_channels, *spatial), dtypes.promote(x.dtype, w.dtype))

    @staticmethod
    def compute(x, w, b=None, *, stride, padding, dilation, transposed, output_padding, groups):
        return aten.convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups)

    def gradient(self, op, grads):
        has_bias = len(op.inputs) == 3
        mask = tuple(op.needs_grad[i] if op.needs_grad else True for i in range(len(op.inputs)))
        mask = mask + (False,) * (3 - len(mask))
        outs = apply("convolution_backward", grads[0], op.inputs[0], op.inputs[1], output_mask=mask,
                     has_bias=has_bias, **op.attrs)
        return [outs[i] if mask[i] else None for i in range(len(op.inputs))]


@register
class ConvolutionBackward(OpDef):
    """(grad input, grad weight, grad bias) of a convolution in one ATen call."""

    name = "convolution_backward"
    attrs = {**Convolution.attrs, "output_mask": (True, True, True), "has_bias": True}

    def infer(self, inputs, output_mask, has_bias, **attrs):
        g, x, w = inputs
        bias = TensorMeta((w.shape[1] * attrs["groups"] if attrs["transposed"] else w.shape[0],), w.dtype)
        return [TensorMeta(x.shape, x.dtype), TensorMeta(w.shape, w.dtype), bias]

    @staticmethod
    def compute(g, x, w, *, stride, padding, dilation, transposed, output_padding, groups, output_mask, has_bias):
        bias_sizes = [g.shape[1]] if has_bias else None
        return aten.convolution_backward(g, x, w, bias_sizes, stride, padding, dilation, transposed,
                                         output_padding, groups, list(output_mask))

    def gradient(self, op, grads):
        """A convolution B(x, w) is bilinear, so its backward's gradient is convolutions again:
        d/dg = B(ggx, w) + B(x, ggw) + ggb; d/dx = (dx of B with weight ggw); d/dw = (dw of B on input ggx)."""
        ggx, ggw, ggb = grads
        g, x, w = op.inputs
        conv = {k: op.attrs[k] for k in Convolution.attrs}
        needs = op.needs_grad or (True, True, True)
        grad_g = None
        if needs[0]:
            for term in ([apply("convolution", ggx, w, **conv)] if ggx is not None else []) + \
                    ([apply("convolution", x, ggw, **conv)] if ggw is not None else []):
                grad_g = term if grad_g is None else grad_g + term
            if ggb is not None and op.attrs["has_bias"]:
                bias = apply("reshape", ggb, shape=(1, -1) + (1,) * (g.ndim - 2))
                grad_g = bias if grad_g is None else grad_g + bias
            if grad_g is not None and grad_g.shape != g.shape:
                grad_g = apply("broadcast_to", grad_g, shape=g.shape)
        grad_x = grad_w = None
        if needs[1] and ggw is not None:
            grad_x = apply("convolution_backward", g, x, ggw, output_mask=(True, False, False), has_bias=False,
                           **conv)[0]
        if needs[2] and ggx is not None:
            grad_w = apply("convolution_backward", g, ggx, w, output_mask=(False, True, False), has_bias=False,
                           **conv)[1]
        return [grad_g, grad_x, grad_w]


def _conv(input, weight, bias, n, stride, padding, dilation, groups, transposed=False, output_padding=0):
    unbatched = input.ndim == n + 1  # PyTorch takes (C, *spatial) too
    if unbatched:
        input = apply("unsqueeze", input, axis=0)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif padding == "same" and not transposed:
            dil = _tuple(dilation, n, "dilation")
            if any(s != 1 for s in _tuple(stride, n, "stride")):
                raise OpError(f"conv: padding='same' needs stride 1, found stride {stride}")
            total = [d * (k - 1) for d, k in zip(dil, weight.shape[2:])]
            padding = tuple(t // 2 for t in total)
            if any(t % 2 for t in total):  # odd total: the extra cell goes at the end, as in PyTorch
                input = apply("pad", input, pad=tuple(p for t in reversed(total) for p in (0, t % 2)))
        else:
            raise OpError(f"conv: padding must be ints, 'valid' or 'same', found {padding!r}")
    inputs = (input, weight) if bias is None else (input, weight, bias)
    out = apply("convolution", *inputs, stride=_tuple(stride, n, "stride"), padding=_tuple(padding, n, "padding"),
                dilation=_tuple(dilation, n, "dilation"), transposed=transposed,
                output_padding=_tuple(output_padding, n, "output_padding"), groups=int(groups))
    return apply("squeeze", out, axis=0) if unbatched else out


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return _conv(input, weight, bias, 1, stride, padding, dilation, groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return _conv(input, weight, bias, 2, stride, padding, dilation, groups)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return _conv(input, weight, bias, 2, stride, padding, dilation, groups, True, output_padding)


# --- pooling ------------------------------------------------------------------------------
def _pool_shape(opdef, inputs, kernel, stride, padding, dilation, ceil_mode):
    x = inputs[0]
    if x.ndim not in (3, 4):
        raise opdef.shape_error(inputs, "2-D pooling needs (N, C, H, W) or (C, H, W)")
    for k, p in zip(kernel, padding):
        if p > k // 2:
            raise opdef.shape_error(inputs, f"padding {padding} must be at most half the kernel {kernel}")
    spatial = tuple(_out_size(x.shape[-2 + i], kernel[i], stride[i], padding[i], dilation[i], ceil_mode)
                    for i in range(2))
    return x.shape[:-2] + spatial


@register
class MaxPool2d(OpDef):
    """Outputs (values, argmax indices); the backward scatters through the indices."""

    name = "max_pool2d"
    attrs = {"kernel_size": (2, 2), "stride": (2, 2), "padding": (0, 0), "dilation": (1, 1), "ceil_mode": False}

    def infer(self, inputs, kernel_size, stride, padding, dilation, ceil_mode):
        shape = _pool_shape(self, inputs, kernel_size, stride, padding, dilation, ceil_mode)
        return [TensorMeta(shape, inputs[0].dtype), TensorMeta(shape, "int64")]

    @staticmethod
    def compute(x, kernel_size, stride, padding, dilation, ceil_mode):
        return aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)

    def gradient(self, op, grads):
        return [apply("max_pool2d_backward", grads[0], op.inputs[0], op.outputs[1], **op.attrs)]


@register
class MaxPool2dBackward(OpDef):
    name = "max_pool2d_backward"
    attrs = MaxPool2d.attrs

    def infer(self, inputs, **attrs):
        return TensorMeta(inputs[1].shape, inputs[1].dtype)

    @staticmethod
    def compute(g, x, indices, kernel_size, stride, padding, dilation, ceil_mode):
        return aten.max_pool2d_with_indices_backward(g, x, kernel_size, stride, padding, dilation, ceil_mode,
                                                     indices)

    def gradient(self, op, grads):
        """Linear in g (a scatter through the argmax indices), constant in x almost everywhere: d/dg
        gathers gg at the same indices; d/dx is zero (as in PyTorch)."""
        gg, = grads
        g, x, indices = op.inputs
        lead = x.shape[:-2]
        if any(d is None for d in lead + x.shape[-2:] + g.shape[-2:]):
            raise OpError("max_pool2d: second-order gradients need the input shape known when the graph is built")
        flat = apply("reshape", gg, shape=(*lead, x.shape[-2] * x.shape[-1]))
        where = apply("reshape", indices, shape=(*lead, g.shape[-2] * g.shape[-1]))
        picked = apply("gather", flat, where, axis=len(lead))
        return [apply("reshape", picked, shape=g.shape), None, None]


@register
class AvgPool2d(OpDef):
    name = "avg_pool2d"
    attrs = {"kernel_size": (2, 2), "stride": (2, 2), "padding": (0, 0), "ceil_mode": False,
             "count_include_pad": True, "divisor_override": None}

    def infer(self, inputs, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        shape = _pool_shape(self, inputs, kernel_size, stride, padding, (1, 1), ceil_mode)
        return TensorMeta(shape, inputs[0].dtype)

    @staticmethod
    def compute(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        return aten.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

    def gradient(self, op, grads):
        return [apply("avg_pool2d_backward", grads[0], op.inputs[0], **op.attrs)]


@register
class AvgPool2dBackward(OpDef):
    """Linear in the gradient, so its own gradient is the forward pool again."""

    name = "avg_pool2d_backward"
    attrs = AvgPool2d.attrs

    def infer(self, inputs, **attrs):
        return TensorMeta(inputs[1].shape, inputs[1].dtype)

    @staticmethod
    def compute(g, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        return aten.avg_pool2d_backward(g, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                        divisor_override)

    def gradient(self, op, grads):
        return [apply("avg_pool2d", grads[0], **op.attrs), None]


@register
class AdaptiveAvgPool2d(OpDef):
    name = "adaptive_avg_pool2d"
    attrs = {"output_size": (1, 1)}

    def infer(self, inputs, output_size):
        x = inputs[0]
        if x.ndim not in (3, 4):
            raise self.shape_error(inputs, "2-D pooling needs (N, C, H, W) or (C, H, W)")
        out = tuple(x.shape[-2 + i] if s is None else s for i, s in enumerate(output_size))
        return TensorMeta(x.shape[:-2] + out, x.dtype)

    @staticmethod
    def compute(x, output_size):
        size = [x.shape[-2 + i] if s is None else s for i, s in enumerate(output_size)]
        return aten._adaptive_avg_pool2d(x, size)

    def gradient(self, op, grads):
        return [apply("adaptive_avg_pool2d_backward", grads[0], op.inputs[0])]


@register
class AdaptiveAvgPool2dBackward(OpDef):
    name = "adaptive_avg_pool2d_backward"

    def infer(self, inputs):
        return TensorMeta(inputs[1].shape, inputs[1].dtype)

    @staticmethod
    def compute(g, x):
        return aten._adaptive_avg_pool2d_backward(g, x)

    def gradient(self, op, grads):
        """Linear in g, independent of x's values: its gradient is the forward pool again."""
        g = op.inputs[0]
        return [apply("adaptive_avg_pool2d", grads[0], output_size=tuple(g.shape[-2:])), None]


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    kernel = _tuple(kernel_size, 2, "kernel_size")
    stride = kernel if stride is None or stride == () else _tuple(stride, 2, "stride")
    return apply("max_pool2d", input, kernel_size=kernel, stride=stride, padding=_tuple(padding, 2, "padding"),
                 dilation=_tuple(dilation, 2, "dilation"), ceil_mode=bool(ceil_mode))[0]


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    kernel = _tuple(kernel_size, 2, "kernel_size")
    stride = kernel if stride is None or stride == () else _tuple(stride, 2, "stride")
    return apply("avg_pool2d", input, kernel_size=kernel, stride=stride, padding=_tuple(padding, 2, "padding"),
                 ceil_mode=bool(ceil_mode), count_include_pad=bool(count_include_pad),
                 divisor_override=divisor_override)


def adaptive_avg_pool2d(input, output_size):
    size = (output_size, output_size) if isinstance(output_size, int) or output_size is None else tuple(output_size)
    return apply("adaptive_avg_pool2d", input, output_size=size)


__all__ = ["adaptive_avg_pool2d", "avg_pool2d", "conv1d", "conv2d", "conv_transpose2d", "max_pool2d"]
