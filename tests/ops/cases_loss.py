"""Cases for luoshu/ops/loss.py."""

import numpy as np
import torch

import luoshu as ls
from tests.ops.harness import Const, Ints, OpCase

O = ls.ops
F = torch.nn.functional

_LABELS = Const(np.array([1, -100, 3, 0, 3]))  # one ignored sample
_WEIGHT = Const(np.array([0.5, 1.0, 2.0, 1.5]))
_SOFT = Const(np.random.default_rng(7).dirichlet(np.ones(4), 5), grad=True)

CASES = [
    OpCase("cross_entropy", O.cross_entropy, F.cross_entropy, [(5, 4), Ints((5,), 0, 4)]),
    OpCase("cross_entropy_ignore_sum", lambda x, t: O.cross_entropy(x, t, reduction="sum"),
           lambda x, t: F.cross_entropy(x, t, reduction="sum"), [(5, 4), _LABELS]),
    OpCase("cross_entropy_ignore_mean_weight", lambda x, t, w: O.cross_entropy(x, t, w),
           lambda x, t, w: F.cross_entropy(x, t, w), [(5, 4), _LABELS, _WEIGHT]),
    OpCase("cross_entropy_ignore_weight_none", lambda x, t, w: O.cross_entropy(x, t, w, reduction="none"),
           lambda x, t, w: F.cross_entropy(x, t, w, reduction="none"), [(5, 4), _LABELS, _WEIGHT]),
    OpCase("cross_entropy_smoothing", lambda x, t: O.cross_entropy(x, t, label_smoothing=0.2),
           lambda x, t: F.cross_entropy(x, t, label_smoothing=0.2), [(5, 4), _LABELS]),
    OpCase("cross_entropy_smoothing_weight_none",
           lambda x, t, w: O.cross_entropy(x, t, w, reduction="none", label_smoothing=0.1),
           lambda x, t, w: F.cross_entropy(x, t, w, reduction="none", label_smoothing=0.1),
           [(5, 4), _LABELS, _WEIGHT]),
    OpCase("cross_entropy_smoothing_weight_mean", lambda x, t, w: O.cross_entropy(x, t, w, label_smoothing=0.3),
           lambda x, t, w: F.cross_entropy(x, t, w, label_smoothing=0.3), [(5, 4), _LABELS, _WEIGHT]),
    OpCase("cross_entropy_spatial", O.cross_entropy, F.cross_entropy, [(2, 4, 3, 2), Ints((2, 3, 2), 0, 4)]),
    OpCase("cross_entropy_soft", O.cross_entropy, F.cross_entropy, [(5, 4), _SOFT]),
    OpCase("cross_entropy_soft_weight_smoothing_none",
           lambda x, t, w: O.cross_entropy(x, t, w, reduction="none", label_smoothing=0.1),
           lambda x, t, w: F.cross_entropy(x, t, w, reduction="none", label_smoothing=0.1),
           [(5, 4), _SOFT, _WEIGHT]),
    OpCase("cross_entropy_dynamic_batch", O.cross_entropy, F.cross_entropy, [(5, 4), Ints((5,), 0, 4)],
           dynamic=True),
    OpCase("nll_loss", lambda x, t: O.nll_loss(O.cast(x, "float64"), t), F.nll_loss, [(5, 4), _LABELS]),
    OpCase("nll_loss_weight_none", lambda x, t, w: O.nll_loss(x, t, w, reduction="none"),
           lambda x, t, w: F.nll_loss(x, t, w, reduction="none"), [(5, 4), _LABELS, _WEIGHT]),
    OpCase("nll_loss_weight_mean", lambda x, t, w: O.nll_loss(x, t, w), lambda x, t, w: F.nll_loss(x, t, w),
           [(2, 4, 3), Ints((2, 3), 0, 4), _WEIGHT]),
    OpCase("mse_loss", O.mse_loss, F.mse_loss, [(3, 4), (3, 4)], second_order=True),
    OpCase("l1_loss_sum", lambda a, b: O.l1_loss(a, b, "sum"), lambda a, b: F.l1_loss(a, b, reduction="sum"),
           [(3, 4), (3, 4)]),
    OpCase("smooth_l1_loss", lambda a, b: O.smooth_l1_loss(a, b, beta=0.5),
           lambda a, b: F.smooth_l1_loss(a, b, beta=0.5), [(3, 4), (3, 4)]),
    OpCase("binary_cross_entropy", lambda p, t, w: O.binary_cross_entropy(O.sigmoid(p), t, w),
           lambda p, t, w: F.binary_cross_entropy(torch.sigmoid(p), t, w),
           [(6,), Const(np.array([0, 1, 1, 0, 0.3, 1.0])), Const(np.linspace(0.5, 2, 6))]),
    OpCase("binary_cross_entropy_with_logits", O.binary_cross_entropy_with_logits,
           F.binary_cross_entropy_with_logits, [(3, 4), Const(np.random.default_rng(1).uniform(size=(3, 4)))],
           second_order=True),
    OpCase("binary_cross_entropy_with_logits_pos_weight",
           lambda x, t, pw: O.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="none"),
           lambda x, t, pw: F.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="none"),
           [(3, 4), Const(np.random.default_rng(2).integers(0, 2, (3, 4)).astype(float)),
            Const(np.array([1.0, 2.0, 0.5, 3.0]))]),
]

# cross entropy and nll run as fused kernels each way; their backward ops have gradient rules of their
# own (double backward), checked here against torch's second derivatives
for _case in CASES:
    if _case.name.startswith(("cross_entropy", "nll_loss")):
        _case.second_order = True
