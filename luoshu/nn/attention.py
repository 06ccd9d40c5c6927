"""Multi-head attention, with torch.nn.MultiheadAttention's arguments, parameters and masks.

Without attention weights to return (and without attention dropout) it runs the fused
`scaled_dot_product_attention` op; otherwise it spells the softmax out, since the
probabilities themselves are wanted.
"""

from __future__ import annotations

import math

import numpy as np

from luoshu import ops
from luoshu.core.errors import Error
from luoshu.core.tensor import make_constant
from luoshu.nn import functional as F
from luoshu.nn import init
from luoshu.nn.layers import Linear, empty_parameter
from luoshu.nn.module import Module


def _split_heads(x, heads: int):
    """(N, L, E) -> (N, heads, L, E / heads)."""
    n, length, e = x.shape
    if n is None and length is None:  # a reshape may leave only one dim unknown
        return ops.permute(ops.unflatten(x, -1, (heads, e // heads)), 0, 2, 1, 3)
    x = x.reshape((-1 if n is None else n, -1 if length is None else length, heads, e // heads))
    return ops.permute(x, 0, 2, 1, 3)


def _merge_heads(x):
    """(N, heads, L, D) -> (N, L, heads * D)."""
    n, heads, length, d = x.shape
    x = ops.permute(x, 0, 2, 1, 3)
    if n is None and length is None:
        return ops.flatten(x, 2, 3)
    return x.reshape((-1 if n is None else n, -1 if length is None else length, heads * d))


def _as_additive(mask, dtype: str):
    """A torch-convention mask (bool: True = blocked; float: added to the scores) as a float."""
    if mask is None or mask.dtype != "bool":
        return mask if mask is None or mask.dtype == dtype else mask.astype(dtype)
    blocked, allowed = (make_constant(np.array(v), dtype=dtype, device=mask.device) for v in (-np.inf, 0.0))
    return ops.where(mask, blocked, allowed)


class MultiheadAttention(Module):
    """Attention over `num_heads` heads of size embed_dim / num_heads, batch second unless batch_first."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, dtype="float32", device=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise Error(f"MultiheadAttention: embed_dim ({embed_dim}) must be a positive multiple of "
                        f"num_heads ({num_heads})")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = float(dropout), batch_first, add_zero_attn
        if self._qkv_same_embed_dim:
            self.in_proj_weight = empty_parameter((3 * embed_dim, embed_dim), dtype, device)
            init.xavier_uniform_(self.in_proj_weight)
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.q_proj_weight = empty_parameter((embed_dim, embed_dim), dtype, device)
            self.k_proj_weight = empty_parameter((embed_dim, self.kdim), dtype, device)
            self.v_proj_weight = empty_parameter((embed_dim, self.vdim), dtype, device)
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                init.xavier_uniform_(w)
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = empty_parameter((3 * embed_dim,), dtype, device)
            init.zeros_(self.in_proj_bias)
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, dtype=dtype, device=device)
        if bias:
            init.zeros_(self.out_proj.bias)
        if add_bias_kv:
            self.bias_k = empty_parameter((1, 1, embed_dim), dtype, device)
            self.bias_v = empty_parameter((1, 1, embed_dim), dtype, device)
            init.xavier_normal_(self.bias_k)
            init.xavier_normal_(self.bias_v)
        else:
            self.register_parameter("bias_k", None)
            self.register_parameter("bias_v", None)

    def _project(self, query, key, value):
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = ops.split(self.in_proj_weight, 3, axis=0)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = ops.split(self.in_proj_bias, 3, axis=0)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _masks(self, key_padding_mask, attn_mask, is_causal, length, source, like, key, batched):
        """One additive float mask broadcastable to (N, heads, L, S), or None."""
        dtype = like.dtype
        if attn_mask is None and is_causal:
            if length is None or source is None:  # sized when the graph runs: key j is blocked for query i < j
                attn_mask = ops.unsqueeze(ops.arange_like(like, 1), 1) < ops.unsqueeze(ops.arange_like(key, 1), 0)
            else:
                attn_mask = make_constant(np.triu(np.ones((length, source), bool), 1), device=like.device)
        mask = None
        if attn_mask is not None:
            mask = _as_additive(attn_mask, dtype)
            if attn_mask.ndim == 3:  # (N * heads, L, S)
                mask = ops.unflatten(mask, 0, (-1, self.num_heads)) if length is None or source is None else \
                    mask.reshape((-1, self.num_heads, length, source))
            elif attn_mask.ndim != 2:
                raise Error(f"MultiheadAttention: attn_mask must be 2-d or 3-d, found shape {attn_mask.shape}")
        if key_padding_mask is not None:
            padding = _as_additive(key_padding_mask, dtype)
            if not batched:
                padding = ops.unsqueeze(padding, 0)
            padding = ops.unsqueeze(ops.unsqueeze(padding, 1), 1)  # (N, 1, 1, S)
            mask = padding if mask is None else mask + padding
        return mask

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        batched = query.ndim == 3
        if query.ndim not in (2, 3) or key.ndim != query.ndim or value.ndim != query.ndim:
            raise Error(f"MultiheadAttention: query, key and value must all be 2-d (unbatched) or 3-d, found "
                        f"shapes {query.shape}, {key.shape}, {value.shape}")
        if not batched:
            query, key, value = (ops.unsqueeze(t, 0) for t in (query, key, value))
        elif not self.batch_first:
            query, key, value = (ops.transpose(t, 0, 1) for t in (query, key, value))
        q, k, v = self._project(query, key, value)  # (N, L, E), (N, S, E), (N, S, E)
        mask = self._masks(key_padding_mask, attn_mask, is_causal, q.shape[1], k.shape[1], q, k, batched)
        extra = 0
        if self.bias_k is not None:
            k = ops.concat([k, self.bias_k + ops.zeros_like(k[:, :1])], axis=1)
            v = ops.concat([v, self.bias_v + ops.zeros_like(v[:, :1])], axis=1)
            extra += 1
        if self.add_zero_attn:
            k = ops.concat([k, ops.zeros_like(k[:, :1])], axis=1)
            v = ops.concat([v, ops.zeros_like(v[:, :1])], axis=1)
            extra += 1
        if mask is not None and extra:
            mask = F.pad(mask, (0, extra))
        q, k, v = (_split_heads(t, self.num_heads) for t in (q, k, v))

        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights or dropout:
            scores = ops.matmul(q, ops.transpose(k, -2, -1)) * (1.0 / math.sqrt(self.head_dim))
            probs = F.dropout(F.softmax(scores if mask is None else scores + mask, dim=-1), dropout, True)
            out = ops.matmul(probs, v)
            if need_weights:
                weights = ops.mean(probs, axis=1) if average_attn_weights else probs
                weights = weights if batched else ops.squeeze(weights, 0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out_proj(_merge_heads(out))
        if not batched:
            out = ops.squeeze(out, 0)
        elif not self.batch_first:
            out = ops.transpose(out, 0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
