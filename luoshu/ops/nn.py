"""Neural-network operators: softmax, convolution, pooling, normalisation, dropout, embeddings, attention."""

from __future__ import annotations

import math

import numpy as np
import torch

from luoshu.core import dtypes
from luoshu.core.errors import DTypeError, OpError
from luoshu.core.op import OpDef, apply, as_tensor, register
from luoshu.core.random import generator
from luoshu.core.shapes import broadcast_shapes, normalize_axis, same_dim
from luoshu.core.tensor import IndexedSlices, TensorMeta
from luoshu.ops import _states
from luoshu.ops._states import Candidate, dup, partial, split
from luoshu.ops._util import gradient_by_recompute
from luoshu.ops.shape import reshape_like

aten = torch.ops.aten


def _softmax_backward_states(name, input_ds, io, axis):
    """(g, y): split alike on a dim other than `axis`; linear in g (y duplicate)."""
    n = _states.group_size(input_ds)
    if n is None or n == 1 or io is None:
        return [input_ds[0]]
    ndim = len(io.inputs[0])
    a = normalize_axis(name, axis, ndim)
    cands = [Candidate((dup(n), dup(n)), (dup(n),)), Candidate((partial(n), dup(n)), (partial(n),))]
    cands += [Candidate((split(n, d), split(n, d)), (split(n, d),)) for d in range(ndim) if d != a]
    return _states.choose(name, cands, input_ds)


def _attention_states(name, input_ds, io, first: int, outputs: int):
    """Attention ops: inputs from `first` on are q, k, v[, mask]; every output follows the split."""
    n = _states.group_size(input_ds)
    if n is None or n == 1 or io is None:
        return [input_ds[first]] * outputs
    shapes = io.inputs
    out_nd = len(io.outputs[0])
    cands = [Candidate((dup(n),) * len(input_ds), (dup(n),) * outputs)]
    for d in range(out_nd - 2):
        wanted, outs = [], []
        for i, s in enumerate(shapes):
            di = d - (out_nd - len(s))
            broadcast = i >= first + 3 and (di < 0 or s[di] == 1)
            wanted.append(dup(n) if broadcast else split(n, di))
        for j in range(outputs):
            mask_grad = j == 3  # a broadcast mask's gradient sums over the split dim: partial
            outs.append(partial(n) if mask_grad and wanted[first + 3] == dup(n) else wanted[first + j])
        cands.append(Candidate(tuple(wanted), tuple(outs)))
    return _states.choose(name, cands, input_ds)


# --- softmax ------------------------------------------------------------------------------
class _SoftmaxBase(OpDef):
    attrs = {"axis": -1}
    autocast = "fp32"

    def deduce_states(self, input_ds, _io=None, axis=-1, **attrs):
        """Split on any dim but the normalised one; no partial input."""
        if _io is None:
            return super().deduce_states(input_ds)
        ndim = len(_io.inputs[0])
        a = normalize_axis(self.name, axis, ndim)
        return _states.mapped(self.name, input_ds, ndim, lambda d: None if d == a else d, linear=False)

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


class _SoftmaxBackwardBase(OpDef):
    """(g, y) -> the input gradient of a (log-)softmax whose output is y: y's shape and states."""

    attrs = {"axis": -1}

    def deduce_states(self, input_ds, _io=None, axis=-1, **attrs):
        return _softmax_backward_states(self.name, input_ds, _io, axis)

    def infer(self, inputs, axis):
        return TensorMeta(inputs[1].shape, inputs[1].dtype)


@register
class SoftmaxBackward(_SoftmaxBackwardBase):
    """y * (g - sum(g * y)) in one kernel; differentiable again through primitives."""

    name = "softmax_backward"

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
class LogSoftmaxBackward(_SoftmaxBackwardBase):
    """g - exp(y) * sum(g) in one kernel."""

    name = "log_softmax_backward"

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
    random = True

    def deduce_states(self, input_ds, _io=None, **attrs):
        """Any split passes (each member draws the mask of its block); partial does not."""
        if _io is None:
            return super().deduce_states(input_ds)
        ndim = len(_io.inputs[0])
        return _states.mapped(self.name, input_ds, ndim, lambda d: d, linear=False, outputs=2)

    def infer(self, inputs, p):
        if not 0.0 <= p < 1.0:
            raise OpError(f"dropout: p must be in [0, 1), found {p}")
        x, = inputs
        return [TensorMeta(x.shape, x.dtype), TensorMeta(x.shape, x.dtype)]

    @staticmethod
    def compute(x, p):
        # keep where a uniform draw in [0, 1) is >= p: on CPU torch.rand is about 4x faster
        # than bernoulli_, whose per-element path was most of a GNN epoch (float32 draws also
        # for half inputs, whose own uniforms would have 11 bits)
        keep = torch.rand(x.shape, generator=generator(str(x.device)), device=x.device).ge_(p)  # 1.0 or 0.0
        mask = keep.to(x.dtype).mul_(1.0 / (1.0 - p))
        return x * mask, mask

    def gradient(self, op, grads):
        g = grads[0]
        return [None if g is None else g * op.outputs[1]]

    def replay(self, op, inputs):
        """The same mask on new inputs: recomputation keeps the draw."""
        mask = op.outputs[1]
        return [apply("mul", inputs[0], mask), mask]


# --- embeddings ---------------------------------------------------------------------------
def _check_ids(opdef, ids):
    if not dtypes.is_integer(ids.dtype):
        raise DTypeError(f"{opdef.name}: ids must be integers, found {ids.dtype}")


@register
class EmbeddingLookup(OpDef):
    """Rows of `weight` at `ids`; the weight's gradient is an IndexedSlices of those rows."""

    name = "embedding"
    attrs = {"padding_idx": None}

    def deduce_states(self, input_ds, _io=None, **attrs):
        """A row-split table gives a partial output (each member its own rows, zeros elsewhere);
        a table split on the embedding dim gives the output split on its last dim; split ids
        give split rows."""
        n = _states.group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        w, ids = _io.inputs
        out = _io.outputs[0]
        cands = [Candidate((dup(n), dup(n)), (dup(n),))]
        if _states.divisible(w[0], n):
            cands.append(Candidate((split(n, 0), dup(n)), (partial(n),)))
        if _states.divisible(w[1], n):
            cands.append(Candidate((split(n, 1), dup(n)), (split(n, len(out) - 1),)))
        for d, size in enumerate(ids):
            if _states.divisible(size, n) or _states.split_dim(input_ds[1]) == d:
                cands.append(Candidate((dup(n), split(n, d)), (split(n, d),)))
        return _states.choose(self.name, cands, input_ds)

    def localize(self, inputs, attrs, input_ds, output_ds, shard):
        weight, ids = inputs
        if _states.split_dim(input_ds[0]) != 0:
            return apply(self.name, weight, ids, **attrs)
        rows = weight.shape[0]  # the vocabulary range [start, start + rows) of this member
        local = ids - shard.index * rows
        inside = apply("logical_and", local >= 0, local < rows)
        safe = apply("where", inside, local, 0)
        out = apply(self.name, weight, safe, **attrs)
        return out * apply("unsqueeze", apply("cast", inside, dtype=out.dtype), axis=-1)

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


_BAG_MODES = ("sum", "mean")


def _bag_layout(ids: torch.Tensor, offsets: torch.Tensor | None, include_last_offset: bool):
    """Flat ids, per-bag start offsets and the bag of every id (2-D ids: one bag per row)."""
    if ids.ndim == 2:
        rows, width = ids.shape
        flat = ids.reshape(-1)
        offsets = torch.arange(0, rows * width, width, device=ids.device)
    else:
        flat = ids
        if include_last_offset:
            offsets = offsets[:-1]
    counts = torch.diff(offsets, append=offsets.new_tensor([flat.numel()]))
    bag_of = torch.repeat_interleave(torch.arange(offsets.numel(), device=ids.device), counts)
    return flat, offsets, bag_of


@register
class EmbeddingBagLookup(OpDef):
    """Sums or averages the rows of each bag: inputs weight, ids[, offsets][, per_sample_weights].

    Outputs (bags, flat ids, bag of each id, divisor per id); the weight gradient is an
    IndexedSlices over the looked-up rows.
    """

    name = "embedding_bag"
    attrs = {"mode": "mean", "has_offsets": True, "has_weights": False, "include_last_offset": False,
             "padding_idx": None}

    def infer(self, inputs, mode, has_offsets, has_weights, include_last_offset, padding_idx):
        if mode not in _BAG_MODES:
            raise OpError(f"embedding_bag: mode must be one of {_BAG_MODES}, found {mode!r}")
        weight, ids = inputs[0], inputs[1]
        _check_ids(self, ids)
        if weight.ndim != 2 or len(inputs) != 2 + has_offsets + has_weights:
            raise self.shape_error(inputs, "embedding_bag takes weight (rows, dim), ids, [offsets], [weights]")
        if has_offsets:
            if ids.ndim != 1 or inputs[2].ndim != 1:
                raise self.shape_error(inputs, "with offsets, ids and offsets must be 1-D")
            bags = inputs[2].shape[0]
            bags = None if bags is None else bags - include_last_offset
        elif ids.ndim == 2:
            bags = ids.shape[0]
        else:
            raise self.shape_error(inputs, "ids must be 2-D (one bag per row) or 1-D with offsets")
        if has_weights and mode != "sum":
            raise OpError("embedding_bag: per_sample_weights need mode='sum'")
        n = None if ids.ndim == 2 and None in ids.shape else (
            ids.shape[0] * ids.shape[1] if ids.ndim == 2 else ids.shape[0])
        return [TensorMeta((bags, weight.shape[1]), weight.dtype), TensorMeta((n,), "int64"),
                TensorMeta((n,), "int64"), TensorMeta((n,), weight.dtype)]

    @staticmethod
    def compute(weight, ids, *rest, mode, has_offsets, has_weights, include_last_offset, padding_idx):
        offsets = rest[0] if has_offsets else None
        psw = rest[-1].reshape(-1) if has_weights else None  # 2-D bags carry 2-D weights
        flat, starts, bag_of = _bag_layout(ids, offsets, include_last_offset)
        out = torch.nn.functional.embedding_bag(flat, weight, starts, mode=mode, per_sample_weights=psw,
                                                padding_idx=padding_idx)
        valid = torch.ones_like(flat, dtype=weight.dtype) if padding_idx is None else (flat != padding_idx).to(
            weight.dtype)
        if mode == "mean":
            size = torch.zeros(starts.numel(), dtype=weight.dtype, device=weight.device).index_add_(0, bag_of, valid)
            scale = valid / size.clamp_min(1)[bag_of]
        else:
            scale = valid if psw is None else valid * psw
        return out, flat, bag_of, scale

    def gradient(self, op, grads):
        weight = op.inputs[0]
        flat, bag_of, scale = op.outputs[1], op.outputs[2], op.outputs[3]
        rows = apply("index_select", grads[0], bag_of, axis=0)
        values = rows * apply("unsqueeze", scale, axis=1)
        result = [IndexedSlices(flat, values, weight.shape)] + [None] * (len(op.inputs) - 1)
        if op.attrs["has_weights"] and (not op.needs_grad or op.needs_grad[-1]):
            looked_up = apply("embedding", weight, flat)
            grad_weights = apply("sum", rows * looked_up, axis=1)
            if op.attrs["padding_idx"] is not None:  # padding ids do not take part in the bag
                grad_weights = apply("where", flat != op.attrs["padding_idx"], grad_weights, 0.0)
            result[-1] = reshape_like(grad_weights, op.inputs[-1])
        return result


# --- attention ----------------------------------------------------------------------------
def _attention_scores(q, k, mask, is_causal, scale):
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores


@register
class ScaledDotProductAttention(OpDef):
    """softmax(q kᵀ · scale + mask) v over (..., L, E) queries and (..., S, E) keys."""

    name = "scaled_dot_product_attention"
    attrs = {"is_causal": False, "scale": None}
    autocast = "lower"

    def deduce_states(self, input_ds, _io=None, **attrs):
        """Split batch or heads (any dim before the last two) in q, k, v alike; the mask
        stays duplicate where it broadcasts."""
        return _attention_states(self.name, input_ds, _io, 0, 1)

    def infer(self, inputs, is_causal, scale):
        q, k, v = inputs[:3]
        if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim:
            raise self.shape_error(inputs, "query, key and value need the same rank >= 2")
        if not same_dim(q.shape[-1], k.shape[-1]) or not same_dim(k.shape[-2], v.shape[-2]):
            raise self.shape_error(inputs, "query/key embedding dims and key/value lengths must match")
        if len(inputs) == 4 and is_causal:
            raise OpError("scaled_dot_product_attention: give attn_mask or is_causal, not both")
        shape = broadcast_shapes(self.name, q.shape[:-2], k.shape[:-2], v.shape[:-2]) + (q.shape[-2], v.shape[-1])
        return TensorMeta(shape, dtypes.promote(q.dtype, k.dtype, v.dtype))

    @staticmethod
    def compute(q, k, v, mask=None, *, is_causal, scale):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                                scale=scale)

    def gradient(self, op, grads):
        outs = apply("scaled_dot_product_attention_backward", grads[0], *op.inputs, **op.attrs)
        return list(outs) + [None] * (len(op.inputs) - len(outs))


@register
class ScaledDotProductAttentionBackward(OpDef):
    """(dq, dk, dv), recomputing the attention probabilities (no L×S buffer is kept)."""

    name = "scaled_dot_product_attention_backward"
    attrs = ScaledDotProductAttention.attrs

    def deduce_states(self, input_ds, _io=None, **attrs):
        return _attention_states(self.name, input_ds, _io, 1, len(_io.outputs) if _io is not None else 3)

    def infer(self, inputs, is_causal, scale):
        # An additive float mask gets a gradient too (the score gradient summed to its shape).
        wrt = inputs[1:] if len(inputs) == 5 and dtypes.is_floating(inputs[4].dtype) else inputs[1:4]
        return [TensorMeta(t.shape, t.dtype) for t in wrt]

    @staticmethod
    def compute(g, q, k, v, mask=None, *, is_causal, scale):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        p = torch.softmax(_attention_scores(q, k, mask, is_causal, scale), -1)
        dv = torch.matmul(p.transpose(-2, -1), g)
        dp = torch.matmul(g, v.transpose(-2, -1))
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq = torch.matmul(ds, k) * scale
        dk = torch.matmul(ds.transpose(-2, -1), q) * scale
        if mask is not None and mask.is_floating_point():
            return _sum_to(dq, q), _sum_to(dk, k), _sum_to(dv, v), _sum_to(ds, mask)
        return _sum_to(dq, q), _sum_to(dk, k), _sum_to(dv, v)

    def gradient(self, op, grads):
        a = op.attrs

        def forward(q, k, v, mask=None):  # attention from primitives: softmax(q kᵀ · scale + mask) v
            if q.shape[-1] is None and a["scale"] is None:
                raise OpError("scaled_dot_product_attention: second-order gradients need the embedding size "
                              "known when the graph is built (or an explicit scale)")
            scale = 1.0 / math.sqrt(q.shape[-1]) if a["scale"] is None else a["scale"]
            scores = apply("matmul", q, apply("transpose", k, axis0=-2, axis1=-1)) * scale
            if a["is_causal"]:
                if q.shape[-2] is None or k.shape[-2] is None:
                    raise OpError("scaled_dot_product_attention: second-order gradients of causal attention need "
                                  "the sequence lengths known when the graph is built")
                allowed = as_tensor(np.tril(np.ones((q.shape[-2], k.shape[-2]), bool)), [q])
                scores = apply("where", allowed, scores, float("-inf"))
            if mask is not None:
                scores = apply("where", mask, scores, float("-inf")) if mask.dtype == "bool" else scores + mask
            return apply("matmul", apply("softmax", scores, axis=-1), v)

        float_mask = len(op.inputs) == 5 and dtypes.is_floating(op.inputs[4].dtype)
        return gradient_by_recompute(op, grads, forward, [1, 2, 3] + ([4] if float_mask else []))


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return grad if grad.shape == like.shape else grad.sum_to_size(like.shape)


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


def embedding_bag(input, weight, offsets=None, mode: str = "mean", per_sample_weights=None,
                  include_last_offset: bool = False, padding_idx: int | None = None):
    inputs = [weight, input] + ([offsets] if offsets is not None else [])
    inputs += [per_sample_weights] if per_sample_weights is not None else []
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    return apply("embedding_bag", *inputs, mode=mode, has_offsets=offsets is not None,
                 has_weights=per_sample_weights is not None, include_last_offset=bool(include_last_offset),
                 padding_idx=padding_idx)[0]


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None):
    if dropout_p:
        raise OpError("scaled_dot_product_attention: dropout_p > 0 is not supported; apply dropout to the output")
    inputs = (query, key, value) if attn_mask is None else (query, key, value, attn_mask)
    return apply("scaled_dot_product_attention", *inputs, is_causal=bool(is_causal), scale=scale)


__all__ = ["dropout", "embedding", "embedding_bag", "log_softmax", "scaled_dot_product_attention", "softmax"]
