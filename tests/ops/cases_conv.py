"""Cases for luoshu/ops/conv.py."""

import torch

import luoshu as ls
from tests.ops.harness import OpCase

O = ls.ops
F = torch.nn.functional

CASES = [
    OpCase("conv2d", lambda x, w, b: O.conv2d(x, w, b, stride=2, padding=1),
           lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), [(2, 3, 7, 6), (4, 3, 3, 3), (4,)],
           second_order=True),
    OpCase("conv2d_dilation_groups_nobias", lambda x, w: O.conv2d(x, w, padding=(2, 1), dilation=(2, 1), groups=2),
           lambda x, w: F.conv2d(x, w, padding=(2, 1), dilation=(2, 1), groups=2), [(1, 4, 6, 5), (6, 2, 3, 3)],
           second_order=True),
    OpCase("conv2d_same", lambda x, w: O.conv2d(x, w, padding="same"),
           lambda x, w: F.conv2d(x, w, padding="same"), [(1, 2, 5, 5), (3, 2, 3, 3)]),
    OpCase("conv2d_same_even_kernel", lambda x, w: O.conv2d(x, w, padding="same", dilation=(1, 3)),
           lambda x, w: F.conv2d(x, w, padding="same", dilation=(1, 3)), [(1, 2, 5, 6), (3, 2, 2, 2)]),
    OpCase("conv1d_unbatched_valid", lambda x, w: O.conv1d(x, w, padding="valid"),
           lambda x, w: F.conv1d(x, w, padding="valid"), [(3, 9), (5, 3, 3)]),
    OpCase("conv1d", lambda x, w, b: O.conv1d(x, w, b, stride=2, padding=1),
           lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=1), [(2, 3, 9), (5, 3, 3), (5,)]),
    OpCase("conv_transpose2d", lambda x, w, b: O.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1),
           lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1),
           [(2, 4, 3, 3), (4, 3, 3, 3), (3,)], second_order=True),
    OpCase("conv_transpose2d_groups", lambda x, w: O.conv_transpose2d(x, w, groups=2, dilation=2),
           lambda x, w: F.conv_transpose2d(x, w, groups=2, dilation=2), [(1, 4, 3, 4), (4, 1, 2, 2)]),
    OpCase("max_pool2d", lambda x: O.max_pool2d(x, 3, 2, 1), lambda x: F.max_pool2d(x, 3, 2, 1), [(2, 3, 7, 6)],
           second_order=True),
    # a second-order case that does not vanish: the pool's output times itself
    OpCase("max_pool2d_squared", lambda x: O.max_pool2d(x, 2) ** 2, lambda x: F.max_pool2d(x, 2) ** 2,
           [(3, 6, 4)], second_order=True),
    OpCase("max_pool2d_ceil_dilation", lambda x: O.max_pool2d(x, 2, ceil_mode=True, dilation=(1, 2)),
           lambda x: F.max_pool2d(x, 2, ceil_mode=True, dilation=(1, 2)), [(1, 2, 5, 7)]),
    OpCase("avg_pool2d", lambda x: O.avg_pool2d(x, 3, 2, 1), lambda x: F.avg_pool2d(x, 3, 2, 1), [(2, 3, 7, 6)],
           second_order=True),
    OpCase("avg_pool2d_exclude_pad_ceil", lambda x: O.avg_pool2d(x, 2, 2, 1, ceil_mode=True, count_include_pad=False),
           lambda x: F.avg_pool2d(x, 2, 2, 1, ceil_mode=True, count_include_pad=False), [(1, 2, 5, 5)]),
    OpCase("adaptive_avg_pool2d", lambda x: O.adaptive_avg_pool2d(x, (2, 3)),
           lambda x: F.adaptive_avg_pool2d(x, (2, 3)), [(2, 3, 7, 8)], second_order=True),
    OpCase("adaptive_avg_pool2d_squared", lambda x: O.adaptive_avg_pool2d(x, (2, 3)) ** 2,
           lambda x: F.adaptive_avg_pool2d(x, (2, 3)) ** 2, [(2, 3, 7, 8)], second_order=True),
    OpCase("adaptive_avg_pool2d_global", lambda x: O.adaptive_avg_pool2d(x, 1),
           lambda x: F.adaptive_avg_pool2d(x, 1), [(2, 3, 4, 4)]),
]
