"""Cases for luoshu/ops/nn.py."""

import numpy as np
import torch

import luoshu as ls
from tests.ops.harness import Const, Ints, OpCase

O = ls.ops
F = torch.nn.functional


def _torch_dropout(x, p, gen):
    mask = torch.empty_like(x).bernoulli_(1 - p, generator=gen) / (1 - p)
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
