"""Cases for luoshu/ops/nn.py."""

import numpy as np
import torch

import luoshu as ls
from tests.ops.harness import Const, Ints, OpCase

O = ls.ops
F = torch.nn.functional


def _torch_dropout(x, p, gen):
    mask = (torch.rand(x.shape, generator=gen) >= p).to(x.dtype) / (1 - p)
    return x * mask


CASES = [
    OpCase("softmax", lambda x: O.softmax(x, 1), lambda x: torch.softmax(x, 1), [(3, 4, 2)], second_order=True),
    OpCase("softmax_last", O.softmax, lambda x: torch.softmax(x, -1), [(3, 5)], second_order=True),
    OpCase("log_softmax", lambda x: O.log_softmax(x, 0), lambda x: torch.log_softmax(x, 0), [(3, 4)],
           second_order=True),
    OpCase("dropout", lambda x: O.dropout(x, 0.3), lambda x, g: _torch_dropout(x, 0.3, g), [(4, 5)], seed=11),
    OpCase("dropout_eval", lambda x: O.dropout(x, 0.3, training=False), lambda x: x * 1, [(4, 5)]),
    OpCase("embedding", lambda w, i: O.embedding(i, w), lambda w, i: F.embedding(i, w),
           [(6, 3), Const(np.array([[0, 2, 2], [5, 0, 2]]))]),
    OpCase("embedding_padding", lambda w, i: O.embedding(i, w, padding_idx=2),
           lambda w, i: F.embedding(i, w, padding_idx=2), [(6, 3), Const(np.array([1, 2, 2, 4, 1]))]),
    OpCase("embedding_dynamic", lambda w, i: O.embedding(i, w), lambda w, i: F.embedding(i, w),
           [(6, 3), Ints((5,), 0, 6)], eager_only=False),
]

_IDS = Const(np.array([1, 4, 4, 0, 2, 5, 1]))
_OFFSETS = Const(np.array([0, 2, 2, 5]))  # the second bag is empty

CASES += [
    OpCase("embedding_bag_mean_offsets", lambda w, i, o: O.embedding_bag(i, w, o),
           lambda w, i, o: F.embedding_bag(i, w, o), [(6, 3), _IDS, _OFFSETS]),
    OpCase("embedding_bag_sum_2d", lambda w, i: O.embedding_bag(i, w, mode="sum"),
           lambda w, i: F.embedding_bag(i, w, mode="sum"), [(6, 3), Const(np.array([[0, 2, 2], [5, 1, 3]]))]),
    OpCase("embedding_bag_weighted", lambda w, i, o, p: O.embedding_bag(i, w, o, mode="sum", per_sample_weights=p),
           lambda w, i, o, p: F.embedding_bag(i, w, o, mode="sum", per_sample_weights=p),
           [(6, 3), _IDS, _OFFSETS, (7,)]),
    OpCase("embedding_bag_padding_last_offset",
           lambda w, i, o: O.embedding_bag(i, w, o, include_last_offset=True, padding_idx=4),
           lambda w, i, o: F.embedding_bag(i, w, o, include_last_offset=True, padding_idx=4),
           [(6, 3), _IDS, Const(np.array([0, 2, 5, 7]))]),
    OpCase("sdpa", O.scaled_dot_product_attention, F.scaled_dot_product_attention, [(2, 2, 4, 3), (2, 2, 5, 3),
                                                                                     (2, 2, 5, 6)]),
    OpCase("sdpa_causal_scale", lambda q, k, v: O.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3),
           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3),
           [(2, 4, 3), (2, 4, 3), (2, 4, 3)]),
    OpCase("sdpa_bool_mask", lambda q, k, v, m: O.scaled_dot_product_attention(q, k, v, m),
           lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m),
           [(2, 4, 3), (2, 5, 3), (2, 5, 2), Const(np.random.default_rng(3).random((4, 5)) > 0.3)]),
    OpCase("sdpa_float_mask_broadcast_heads", lambda q, k, v, m: O.scaled_dot_product_attention(q, k, v, m),
           lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m),
           [(2, 3, 4, 3), (2, 1, 5, 3), (2, 1, 5, 2), Const(np.random.default_rng(4).standard_normal((4, 5)))]),
    OpCase("sdpa_float_mask_grad", lambda q, k, v, m: O.scaled_dot_product_attention(q, k, v, m),
           lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m),
           [(2, 2, 4, 3), (2, 2, 5, 3), (2, 2, 5, 2), (2, 1, 4, 5)]),
    OpCase("embedding_bag_weighted_2d_padding",
           lambda w, i, p: O.embedding_bag(i, w, mode="sum", per_sample_weights=p, padding_idx=2),
           lambda w, i, p: F.embedding_bag(i, w, mode="sum", per_sample_weights=p, padding_idx=2),
           [(6, 3), Const(np.array([[0, 2, 2], [5, 1, 3]])), (2, 3)]),
]

# attention's fused backward has a gradient rule of its own (double backward through primitives)
for _case in CASES:
    if _case.name.startswith("sdpa"):
        _case.second_order = True
