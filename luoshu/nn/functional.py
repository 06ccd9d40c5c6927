"""The functional neural-network API under PyTorch's names and argument names.

Everything here is an operator of `luoshu.ops` (or a composite of them); this module
only gathers the neural-network ones in one place, as `torch.nn.functional` does.
"""

from __future__ import annotations

from luoshu.ops.conv import adaptive_avg_pool2d, avg_pool2d, conv1d, conv2d, conv_transpose2d, max_pool2d
from luoshu.ops.elementwise import elu, gelu, leaky_relu, relu, sigmoid, silu, softplus, tanh
from luoshu.ops.linalg import linear
from luoshu.ops.loss import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    l1_loss,
    mse_loss,
    nll_loss,
    smooth_l1_loss,
)
from luoshu.ops.nn import *  # noqa: F403 - every nn operator, under its torch name
from luoshu.ops.nn import __all__ as _nn_ops
from luoshu.ops.norm import batch_norm, group_norm, layer_norm, rms_norm
from luoshu.ops.shape import one_hot, pad

__all__ = [
    "adaptive_avg_pool2d", "avg_pool2d", "batch_norm", "conv1d", "conv2d", "conv_transpose2d", "group_norm",
    "layer_norm", "max_pool2d", "rms_norm",
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "cross_entropy", "elu", "gelu", "l1_loss",
    "leaky_relu", "linear", "mse_loss", "nll_loss", "one_hot", "pad", "relu", "sigmoid", "silu",
    "smooth_l1_loss", "softplus", "tanh",
]
__all__ += _nn_ops
