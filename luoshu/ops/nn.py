"""Neural-network operators: softmax, convolution, pooling, normalisation, dropout, embeddings, attention."""

from __future__ import annotations

import torch

from luoshu.core import dtypes
from luoshu.core.errors import DTypeError, OpError
from luoshu.core.op import OpDef, apply, register
from luoshu.core.random import generator
from luoshu.core.shapes import normalize_axis
from luoshu.core.tensor import IndexedSlices, TensorMeta

aten = torch.ops.aten


# --- softmax ------------------------------------------------------------------------------
class _SoftmaxBase(OpDef):
    attrs = {"axis": -1}
    autocast = "fp32"

    def infer(self, inputs, axis):
        x, = inputs
        normalize_axis(self.name, axis, x.ndim)
        if not dtypes.is_floating(x.dtype):
            raise DTypeError(f"{self.name}: input must be floating point, found {x.dtype}")
        return TensorMeta(x.shape, x.dtype)


@register
class Softmax(_SoftmaxBase):
    name = "softmax"

    @staticmethod
    def compute(x, axis):
        return torch.softmax(x, axis)

    def gradient(self, op, grads):
        return [apply("softmax_backward", grads[0], op.outputs[0], **op.attrs)]


@register
class SoftmaxBackward(OpDef):
    """y * (g - sum(g * y)) in one kernel; differentiable again through primitives."""

    name = "softmax_backward"
    attrs = {"axis": -1}

    def infer(self, inputs, axis):
        return TensorMeta(inputs[1].shape, inputs[1].dtype)

    @staticmethod
    def compute(g, y, axis):
        return aten._softmax_backward_data(g, y, axis, y.dtype)

    def gradient(self, op, grads):
        gg, = grads
        g, y = op.inputs
        axis = op.attrs["axis"]
        dot = apply("sum", g * y, axis=axis, keepdims=True)
        gg_dot = apply("sum", gg * y, axis=axis, keepdims=True)
        # d/dg: y*gg - y*sum(gg*y); d/dy: gg*(g - dot) - g*sum(gg*y)... expanded from y*(g - dot)
        grad_g = apply("softmax_backward", gg, y, axis=axis)
        grad_y = gg * (g - dot) - g * gg_dot
        return [grad_g, grad_y]


@register
class LogSoftmax(_SoftmaxBase):
    name = "log_softmax"

    @staticmethod
    def compute(x, axis):
        return torch.log_softmax(x, axis)

    def gradient(self, op, grads):
        return [apply("log_softmax_backward", grads[0], op.outputs[0], **op.attrs)]


@register
class LogSoftmaxBackward(OpDef):
    """g - exp(y) * sum(g) in one kernel."""

    name = "log_softmax_backward"
    attrs = {"axis": -1}

    def infer(self, inputs, axis):
        return TensorMeta(inputs[1].shape, inputs[1].dtype)

    @staticmethod
    def compute(g, y, axis):
        return aten._log_softmax_backward_data(g, y, axis, y.dtype)

    def gradient(self, op, grads):
        gg, = grads
        g, y = op.inputs
        axis = op.attrs["axis"]
        p = apply("exp", y)
        sum_g = apply("sum", g, axis=axis, keepdims=True)
        grad_g = gg - apply("sum", gg * p, axis=axis, keepdims=True)
        grad_y = -(gg * p * sum_g)
        return [grad_g, grad_y]


# --- dropout ------------------------------------------------------------------------------
@register
class Dropout(OpDef):
    """Zeroes each element with probability p and scales the rest by 1/(1-p).

    Outputs (y, mask); the mask (already scaled) is the gradient's only need.
    """

    name = "dropout"
    attrs = {"p": 0.5}

    def infer(self, inputs, p):
        if not 0.0 <= p < 1.0:
            raise OpError(f"dropout: p must be in [0, 1), found {p}")
        x, = inputs
        return [TensorMeta(x.shape, x.dtype), TensorMeta(x.shape, x.dtype)]

    @staticmethod
    def compute(x, p):
        mask = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator(str(x.device)))
        mask.div_(1.0 - p)
        return x * mask, mask

    def gradient(self, op, grads):
        g = grads[0]
        return [None if g is None else g * op.outputs[1]]


# --- embeddings ---------------------------------------------------------------------------
def _check_ids(opdef, ids):
    if not dtypes.is_integer(ids.dtype):
        raise DTypeError(f"{opdef.name}: ids must be integers, found {ids.dtype}")


@register
class Embedding(OpDef):
    """Rows of `weight` at `ids`; the weight's gradient is an IndexedSlices of those rows."""

    name = "embedding"
    attrs = {"padding_idx": None}

    def infer(self, inputs, padding_idx):
        weight, ids = inputs
        if weight.ndim != 2:
            raise self.shape_error(inputs, "weight must be (num_embeddings, embedding_dim)")
        _check_ids(self, ids)
        return TensorMeta(ids.shape + (weight.shape[1],), weight.dtype)

    @staticmethod
    def compute(weight, ids, padding_idx):
        return torch.nn.functional.embedding(ids, weight)

    def gradient(self, op, grads):
        weight, ids = op.inputs
        flat_ids = apply("reshape", ids, shape=(-1,))
        values = apply("reshape", grads[0], shape=(-1, weight.shape[1]))
        if op.attrs["padding_idx"] is not None:
            values = apply("where", apply("unsqueeze", flat_ids != op.attrs["padding_idx"], axis=1), values, 0.0)
        return [IndexedSlices(flat_ids, values, weight.shape), None]


# --- public functions (PyTorch's names and arguments) ------------------------------------
def softmax(input, dim: int = -1):
    return apply("softmax", input, axis=dim)


def log_softmax(input, dim: int = -1):
    return apply("log_softmax", input, axis=dim)


def dropout(input, p: float = 0.5, training: bool = True):
    if not training or p == 0.0:
        return input
    return apply("dropout", input, p=float(p))[0]


def embedding(input, weight, padding_idx: int | None = None):
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    return apply("embedding", weight, input, padding_idx=padding_idx)


__all__ = ["dropout", "embedding", "log_softmax", "softmax"]
