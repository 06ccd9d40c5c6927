"""Cases for luoshu/ops/norm.py."""

import numpy as np
import torch

import luoshu as ls
from tests.ops.harness import OpCase

O = ls.ops
F = torch.nn.functional


def _stats():
    return np.linspace(-0.5, 0.5, 3), np.linspace(0.5, 2.0, 3)


def _ls_bn(training):
    def fn(x, w, b):
        rm, rv = (ls.tensor(s.copy(), device=x.device) for s in _stats())
        return O.batch_norm(x, rm, rv, w, b, training=training, momentum=0.2)
    return fn


def _torch_bn(training):
    def fn(x, w, b):
        rm, rv = (torch.tensor(s.copy()) for s in _stats())
        return F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.2)
    return fn


CASES = [
    OpCase("batch_norm_train", _ls_bn(True), _torch_bn(True), [(4, 3, 2, 2), (3,), (3,)], second_order=True),
    OpCase("batch_norm_eval", _ls_bn(False), _torch_bn(False), [(4, 3, 5), (3,), (3,)], second_order=True),
    OpCase("batch_norm_no_affine_no_stats", lambda x: O.batch_norm(x, None, None, training=True),
           lambda x: F.batch_norm(x, None, None, training=True), [(5, 3)], second_order=True),
    OpCase("layer_norm", lambda x, w, b: O.layer_norm(x, (4,), w, b), lambda x, w, b: F.layer_norm(x, (4,), w, b),
           [(2, 3, 4), (4,), (4,)], second_order=True),
    OpCase("layer_norm_2d_no_affine", lambda x: O.layer_norm(x, (3, 4), eps=1e-3),
           lambda x: F.layer_norm(x, (3, 4), eps=1e-3), [(2, 3, 4)], second_order=True),
    OpCase("group_norm", lambda x, w, b: O.group_norm(x, 2, w, b), lambda x, w, b: F.group_norm(x, 2, w, b),
           [(2, 4, 3, 2), (4,), (4,)], second_order=True),
    OpCase("group_norm_no_affine", lambda x: O.group_norm(x, 3), lambda x: F.group_norm(x, 3), [(2, 6, 5)],
           second_order=True),
    OpCase("rms_norm", lambda x, w: O.rms_norm(x, (4,), w, eps=1e-6), lambda x, w: F.rms_norm(x, (4,), w, eps=1e-6),
           [(2, 3, 4), (4,)], second_order=True),
]
