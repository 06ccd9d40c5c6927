"""Normalisation operators: batch, layer and group norm (ATen kernels each way) and RMS norm.

Optional affine parameters and running statistics are flagged in the attributes, so an
op's inputs are always `x` followed by the tensors that are present.
"""

from __future__ import annotations

import math

import torch

from luoshu.core import dtypes
from luoshu.core.errors import OpError
from luoshu.core.op import OpDef, apply, register
from luoshu.core.shapes import same_dim
from luoshu.core.tensor import TensorMeta
from luoshu.ops import _states
from luoshu.ops._states import Candidate, dup, partial, split
from luoshu.ops._util import gradient_by_recompute

aten = torch.ops.aten


def _split_optional(values, flags):
    """Maps the present optional inputs back to their slots (None where absent)."""
    it = iter(values)
    return [next(it) if flag else None for flag in flags]


def _norm_gradient(op, grad, backward: str, has_weight: bool, has_bias: bool, trailing: int = 0):
    """Gradients of a normalisation op through its fused backward op, which takes the
    forward inputs plus the saved (mean, rstd) outputs and returns (dx, dweight, dbias)."""
    needs = op.needs_grad or (True,) * len(op.inputs)
    mask = (needs[0], has_weight and needs[1], has_bias and needs[1 + has_weight])
    outs = apply(backward, grad, *op.inputs, op.outputs[1], op.outputs[2], output_mask=mask, **op.attrs)
    result = [outs[0] if mask[0] else None]
    if has_weight:
        result.append(outs[1] if mask[1] else None)
    if has_bias:
        result.append(outs[2] if mask[2] else None)
    return result + [None] * trailing


def _channel_view(t, ndim: int):
    """A per-channel (C,) tensor shaped to broadcast over dim 1 of an ndim-rank input."""
    return apply("reshape", t, shape=(1, -1) + (1,) * (ndim - 2))


def _normalise(x, axes, eps, mean=None, var=None):
    """(x - mean) / sqrt(var + eps) from primitives; the batch statistics when none are given."""
    if mean is None:
        mean = apply("mean", x, axis=axes, keepdims=True)
        d = x - mean
        var = apply("mean", d * d, axis=axes, keepdims=True)
    else:
        d = x - mean
    return d * apply("rsqrt", var + eps)


def _affine(y, w, b, view):
    if w is not None:
        y = y * view(w)
    return y if b is None else y + view(b)


@register
class BatchNorm(OpDef):
    """Inputs x, [weight, bias], [running_mean, running_var]; outputs (y, save_mean, save_invstd).

    In training it normalises with the batch statistics and updates the running
    statistics in place (they are leaf tensors, so the update persists across runs);
    in eval it normalises with the running statistics.
    """

    name = "batch_norm"
    attrs = {"training": True, "momentum": 0.1, "eps": 1e-5, "affine": True, "track_running_stats": True}
    autocast = "fp32"

    def infer(self, inputs, training, momentum, eps, affine, track_running_stats):
        x = inputs[0]
        expected = 1 + 2 * affine + 2 * track_running_stats
        if len(inputs) != expected or x.ndim < 2:
            raise self.shape_error(inputs, f"batch_norm needs x (N, C, ...) and {expected - 1} parameter inputs")
        if not training and not track_running_stats:
            raise OpError("batch_norm: eval mode needs running statistics")
        for t in inputs[1:]:
            if t.ndim != 1 or not same_dim(t.shape[0], x.shape[1]):
                raise self.shape_error(inputs, f"per-channel tensors must be ({x.shape[1]},)")
        stats = TensorMeta((x.shape[1],), x.dtype)
        return [TensorMeta(x.shape, x.dtype), stats, stats]

    @staticmethod
    def compute(x, *rest, training, momentum, eps, affine, track_running_stats):
        w, b, rm, rv = _split_optional(rest, (affine, affine, track_running_stats, track_running_stats))
        return aten.native_batch_norm(x, w, b, rm, rv, training, momentum, eps)

    def gradient(self, op, grads):
        a = op.attrs
        return _norm_gradient(op, grads[0], "batch_norm_backward", a["affine"], a["affine"],
                              trailing=2 if a["track_running_stats"] else 0)


@register
class BatchNormBackward(OpDef):
    name = "batch_norm_backward"
    attrs = {**BatchNorm.attrs, "output_mask": (True, True, True)}

    def infer(self, inputs, affine, **attrs):
        x = inputs[1]
        stats = TensorMeta((x.shape[1],), x.dtype)
        return [TensorMeta(x.shape, x.dtype), stats, stats]

    @staticmethod
    def compute(g, x, *rest, training, momentum, eps, affine, track_running_stats, output_mask):
        *params, save_mean, save_invstd = rest
        w, _, rm, rv = _split_optional(params, (affine, affine, track_running_stats, track_running_stats))
        return aten.native_batch_norm_backward(g, x, w, rm, rv, save_mean, save_invstd, training, eps,
                                               list(output_mask))

    def gradient(self, op, grads):
        a = op.attrs

        def forward(x, *rest):  # batch_norm from primitives (the running statistics are constants)
            w, b, rm, rv = _split_optional(rest[:-2], (a["affine"],) * 2 + (a["track_running_stats"],) * 2)
            view = lambda t: _channel_view(t, x.ndim)  # noqa: E731
            if a["training"]:
                y = _normalise(x, (0,) + tuple(range(2, x.ndim)), a["eps"])
            else:
                y = _normalise(x, None, a["eps"], view(rm), view(rv))
            return _affine(y, w, b, view)

        return gradient_by_recompute(op, grads, forward, [1, 2 if a["affine"] else None,
                                                          3 if a["affine"] else None])


@register
class LayerNorm(OpDef):
    """Normalises over the last len(normalized_shape) dims; outputs (y, mean, rstd)."""

    name = "layer_norm"
    attrs = {"normalized_shape": (), "eps": 1e-5, "has_weight": True, "has_bias": True}
    autocast = "fp32"

    def deduce_states(self, input_ds, _io=None, normalized_shape=(), **attrs):
        """x split on a dim it does not normalise (its statistics too); weight and bias duplicate."""
        n = _states.group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        x = _io.inputs[0]
        rest = (dup(n),) * (len(input_ds) - 1)
        cands = [Candidate((dup(n),) + rest, (dup(n),) * 3)]
        cands += [Candidate((split(n, d),) + rest, (split(n, d),) * 3) for d in range(len(x) - len(normalized_shape))
                  if _states.divisible(x[d], n) or _states.split_dim(input_ds[0]) == d]
        return _states.choose(self.name, cands, input_ds)

    def infer(self, inputs, normalized_shape, eps, has_weight, has_bias):
        x = inputs[0]
        n = len(normalized_shape)
        if not n or x.ndim < n or any(not same_dim(a, b) for a, b in zip(x.shape[-n:], normalized_shape)):
            raise self.shape_error(inputs, f"the last dims must be normalized_shape {normalized_shape}")
        if len(inputs) != 1 + has_weight + has_bias or any(t.shape != tuple(normalized_shape) for t in inputs[1:]):
            raise self.shape_error(inputs, f"weight and bias must have shape {tuple(normalized_shape)}")
        stats = TensorMeta(x.shape[:-n] + (1,) * n, x.dtype)
        return [TensorMeta(x.shape, x.dtype), stats, stats]

    @staticmethod
    def compute(x, *rest, normalized_shape, eps, has_weight, has_bias):
        w, b = _split_optional(rest, (has_weight, has_bias))
        return aten.native_layer_norm(x, list(normalized_shape), w, b, eps)

    def gradient(self, op, grads):
        return _norm_gradient(op, grads[0], "layer_norm_backward", op.attrs["has_weight"], op.attrs["has_bias"])


@register
class LayerNormBackward(OpDef):
    name = "layer_norm_backward"
    attrs = {**LayerNorm.attrs, "output_mask": (True, True, True)}

    def deduce_states(self, input_ds, _io=None, normalized_shape=(), has_weight=True, has_bias=True, **attrs):
        """(g, x, [w], [b], mean, rstd): split alike on an unnormalised dim -> x's gradient split and
        the weight's and bias's partial (each member summed its rows): with sequence
        parallelism the update all-reduces them over the TP group."""
        n = _states.group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        x = _io.inputs[1]
        params = (dup(n),) * (has_weight + has_bias)
        # No partial-g layout although the op is linear in g: the weight's and bias's gradients
        # would stay partial and cost an all-reduce each at the update (Megatron reduces g once).
        cands = [Candidate((dup(n), dup(n)) + params + (dup(n), dup(n)), (dup(n),) * 3)]
        for d in range(len(x) - len(normalized_shape)):
            if _states.divisible(x[d], n) or _states.split_dim(input_ds[1]) == d:
                s = split(n, d)
                cands.append(Candidate((s, s) + params + (s, s), (s, partial(n), partial(n))))
        return _states.choose(self.name, cands, input_ds)

    def infer(self, inputs, normalized_shape, **attrs):
        x = inputs[1]
        p = TensorMeta(tuple(normalized_shape), x.dtype)
        return [TensorMeta(x.shape, x.dtype), p, p]

    @staticmethod
    def compute(g, x, *rest, normalized_shape, eps, has_weight, has_bias, output_mask):
        *params, mean, rstd = rest
        w, b = _split_optional(params, (has_weight, has_bias))
        return aten.native_layer_norm_backward(g, x, list(normalized_shape), mean, rstd, w, b, list(output_mask))

    def gradient(self, op, grads):
        a = op.attrs

        def forward(x, *rest):  # layer_norm from primitives
            w, b = _split_optional(rest[:-2], (a["has_weight"], a["has_bias"]))
            y = _normalise(x, tuple(range(-len(a["normalized_shape"]), 0)), a["eps"])
            return _affine(y, w, b, lambda t: t)

        return gradient_by_recompute(op, grads, forward, [1, 2 if a["has_weight"] else None,
                                                          2 + a["has_weight"] if a["has_bias"] else None])


@register
class GroupNorm(OpDef):
    """Normalises each of `num_groups` channel groups; outputs (y, mean, rstd)."""

    name = "group_norm"
    attrs = {"num_groups": 1, "eps": 1e-5, "affine": True}
    autocast = "fp32"

    def infer(self, inputs, num_groups, eps, affine):
        x = inputs[0]
        if x.ndim < 2 or (x.shape[1] is not None and x.shape[1] % num_groups):
            raise self.shape_error(inputs, f"channels must divide into {num_groups} groups")
        if len(inputs) != 1 + 2 * affine:
            raise self.shape_error(inputs, "group_norm takes x and, if affine, weight and bias")
        stats = TensorMeta((x.shape[0], num_groups), x.dtype)
        return [TensorMeta(x.shape, x.dtype), stats, stats]

    @staticmethod
    def compute(x, *rest, num_groups, eps, affine):
        w, b = _split_optional(rest, (affine, affine))
        n, c = x.shape[0], x.shape[1]
        return aten.native_group_norm(x, w, b, n, c, math.prod(x.shape[2:]), num_groups, eps)

    def gradient(self, op, grads):
        return _norm_gradient(op, grads[0], "group_norm_backward", op.attrs["affine"], op.attrs["affine"])


@register
class GroupNormBackward(OpDef):
    name = "group_norm_backward"
    attrs = {**GroupNorm.attrs, "output_mask": (True, True, True)}

    def infer(self, inputs, **attrs):
        x = inputs[1]
        p = TensorMeta((x.shape[1],), x.dtype)
        return [TensorMeta(x.shape, x.dtype), p, p]

    @staticmethod
    def compute(g, x, *rest, num_groups, eps, affine, output_mask):
        *params, mean, rstd = rest
        w, _ = _split_optional(params, (affine, affine))
        n, c = x.shape[0], x.shape[1]
        return aten.native_group_norm_backward(g, x, mean, rstd, w, n, c, math.prod(x.shape[2:]), num_groups,
                                               list(output_mask))

    def gradient(self, op, grads):
        a = op.attrs
        groups = a["num_groups"]

        def forward(x, *rest):  # group_norm from primitives: (N, G, rest) statistics
            w, b = _split_optional(rest[:-2], (a["affine"], a["affine"]))
            c, spatial = x.shape[1], x.shape[2:]
            if c is None or any(s is None for s in spatial):
                raise OpError("group_norm: second-order gradients need the channel and spatial sizes known when "
                              "the graph is built")
            grouped = apply("reshape", x, shape=(-1, groups, (c // groups) * math.prod(spatial)))
            y = apply("reshape", _normalise(grouped, (2,), a["eps"]), shape=(-1, c, *spatial))
            return _affine(y, w, b, lambda t: _channel_view(t, x.ndim))

        return gradient_by_recompute(op, grads, forward, [1, 2 if a["affine"] else None,
                                                          3 if a["affine"] else None])


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    affine = weight is not None
    if affine != (bias is not None):
        raise OpError("batch_norm: give both weight and bias, or neither")
    track = running_mean is not None
    if track != (running_var is not None):
        raise OpError("batch_norm: give both running_mean and running_var, or neither")
    inputs = [input] + ([weight, bias] if affine else []) + ([running_mean, running_var] if track else [])
    return apply("batch_norm", *inputs, training=bool(training), momentum=float(momentum), eps=float(eps),
                 affine=affine, track_running_stats=track)[0]


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    inputs = [input] + [t for t in (weight, bias) if t is not None]
    return apply("layer_norm", *inputs, normalized_shape=shape, eps=float(eps), has_weight=weight is not None,
                 has_bias=bias is not None)[0]


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    affine = weight is not None
    if affine != (bias is not None):
        raise OpError("group_norm: give both weight and bias, or neither")
    inputs = [input] + ([weight, bias] if affine else [])
    return apply("group_norm", *inputs, num_groups=int(num_groups), eps=float(eps), affine=affine)[0]


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """x / sqrt(mean(x², last dims) + eps) * weight — a composite (second order for free)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if eps is None:
        eps = torch.finfo(dtypes.to_torch(input.dtype if dtypes.is_floating(input.dtype) else "float32")).eps
    axes = tuple(range(-len(shape), 0))
    x = apply("cast", input, dtype="float32") if input.dtype in ("float16", "bfloat16") else input
    out = x * apply("rsqrt", apply("mean", x * x, axis=axes, keepdims=True) + eps)
    if out.dtype != input.dtype:
        out = apply("cast", out, dtype=input.dtype)
    return out if weight is None else out * weight


__all__ = ["batch_norm", "group_norm", "layer_norm", "rms_norm"]
