"""Cases for luoshu/ops/reduction.py."""

import math

import torch

import luoshu as ls
from tests.ops.harness import Const, Ints, OpCase, Positive

O = ls.ops
apply = ls.core.apply
TIES = Const([[1.0, 3.0, 3.0, -2.0], [0.5, 0.5, 0.5, -1.0], [2.0, -4.0, 0.0, 2.0]], grad=True)
ZEROS = Const([[1.5, 0.0, 2.0, -1.0], [0.0, 0.0, 3.0, 1.0], [2.0, -0.5, 1.5, 0.7]], grad=True)

CASES = [
    OpCase("sum_all", O.sum, torch.sum, [(3, 4)], second_order=True),
    OpCase("sum_axes_keepdims", lambda x: O.sum(x, axis=(0, -1), keepdims=True),
           lambda x: x.sum(dim=(0, -1), keepdim=True), [(2, 3, 4)], second_order=True),
    OpCase("sum_method_negative_axis", lambda x: x.sum(-1), lambda x: x.sum(-1), [(3, 4)]),
    OpCase("sum_no_axes", lambda x: O.sum(x, axis=()) * 2.0, lambda x: x * 2.0, [(3, 4)]),
    OpCase("sum_int", lambda x: O.sum(x, axis=0), lambda x: x.sum(0), [Ints((3, 4), dtype="int32")], grad=False),
    OpCase("sum_to", lambda g, like: apply("sum_to", g, like),
           lambda g, like: g.sum(0).sum(-1, keepdim=True), [(2, 3, 4), (3, 1)], second_order=True),
    OpCase("broadcast_like", lambda x, like: apply("broadcast_like", x, like) * like,
           lambda x, like: x.expand(like.shape) * like, [(3, 1), (2, 3, 4)], second_order=True),
    OpCase("mean_all", O.mean, torch.mean, [(3, 4)], second_order=True),
    OpCase("mean_axes_keepdims", lambda x: x.mean(axis=(0, 2), keepdims=True),
           lambda x: x.mean(dim=(0, 2), keepdim=True), [(2, 3, 4)], second_order=True),
    OpCase("mean_negative_axis", lambda x: O.mean(x, -2), lambda x: x.mean(-2), [(2, 3, 4)]),
    OpCase("mean_int", lambda x: O.mean(x, axis=1), lambda x: x.float().mean(1), [Ints((3, 4))], grad=False),
    OpCase("max_all", O.max, torch.amax, [(3, 4)], second_order=True),
    OpCase("max_axis", lambda x: x.max(axis=1), lambda x: torch.amax(x, 1), [(3, 4)], second_order=True),
    OpCase("max_ties", lambda x: O.max(x, axis=-1, keepdims=True), lambda x: torch.amax(x, -1, keepdim=True),
           [TIES]),
    OpCase("max_ties_all", O.max, torch.amax, [TIES]),
    OpCase("min_axes", lambda x: O.min(x, axis=(0, 2)), lambda x: torch.amin(x, (0, 2)), [(2, 3, 4)],
           second_order=True),
    OpCase("min_ties", lambda x: x.min(axis=0), lambda x: torch.amin(x, 0), [TIES]),
    OpCase("prod_all", O.prod, torch.prod, [(2, 3)], second_order=True),
    OpCase("prod_axis", lambda x: O.prod(x, axis=1), lambda x: x.prod(1), [(3, 4)], second_order=True),
    OpCase("prod_axes_keepdims", lambda x: O.prod(x, axis=(0, -1), keepdims=True),
           lambda x: x.prod(-1, keepdim=True).prod(0, keepdim=True), [(2, 3, 4)], second_order=True),
    OpCase("prod_zeros", lambda x: x.prod(axis=1), lambda x: x.prod(1), [ZEROS]),
    OpCase("var_all", O.var, torch.var, [(3, 4)], second_order=True),
    OpCase("var_axis_correction0", lambda x: O.var(x, axis=1, correction=0),
           lambda x: torch.var(x, 1, correction=0), [(3, 4)], second_order=True),
    OpCase("var_ddof_keepdims", lambda x: x.var(axis=(0, 2), keepdims=True, ddof=2),
           lambda x: torch.var(x, (0, 2), correction=2, keepdim=True), [(2, 3, 4)]),
    OpCase("std_all", O.std, torch.std, [(3, 4)], second_order=True),
    OpCase("std_axis_keepdims", lambda x: x.std(axis=-1, keepdims=True),
           lambda x: torch.std(x, -1, keepdim=True), [(3, 4)], second_order=True),
    OpCase("norm_2", O.norm, torch.linalg.vector_norm, [(3, 4)], second_order=True),
    OpCase("norm_1_axis", lambda x: O.norm(x, 1, axis=1), lambda x: torch.linalg.vector_norm(x, 1, dim=1),
           [(3, 4)], second_order=True),
    OpCase("norm_inf", lambda x: x.norm(math.inf, axis=0), lambda x: torch.linalg.vector_norm(x, math.inf, dim=0),
           [(3, 4)]),
    OpCase("norm_neg_inf", lambda x: x.norm(-math.inf, axis=1),
           lambda x: torch.linalg.vector_norm(x, -math.inf, dim=1), [(3, 4)]),
    OpCase("norm_3_keepdims", lambda x: O.norm(x, 3, axis=-1, keepdims=True),
           lambda x: torch.linalg.vector_norm(x, 3, dim=-1, keepdim=True), [(3, 4)], second_order=True),
    OpCase("norm_fro", lambda x: O.norm(x, "fro", axis=(1, 2)), lambda x: torch.linalg.norm(x, "fro", dim=(1, 2)),
           [(2, 3, 4)], second_order=True),
    OpCase("norm_zero_row", lambda x: O.norm(x, axis=1), lambda x: torch.linalg.vector_norm(x, dim=1),
           [Const([[0.0, 0.0], [3.0, -4.0]], grad=True)]),
    OpCase("logsumexp_all", O.logsumexp, lambda x: torch.logsumexp(x, (0, 1)), [(3, 4)], second_order=True),
    OpCase("logsumexp_axis_keepdims", lambda x: x.logsumexp(axis=-1, keepdims=True),
           lambda x: torch.logsumexp(x, -1, keepdim=True), [(2, 3, 4)], second_order=True),
    OpCase("logsumexp_large", lambda x: O.logsumexp(x * 500.0, axis=1), lambda x: torch.logsumexp(x * 500.0, 1),
           [(3, 4)], tol=1e-5),
    OpCase("argmax_flat", O.argmax, torch.argmax, [(3, 4)], grad=False),
    OpCase("argmax_axis", lambda x: x.argmax(axis=-1), lambda x: x.argmax(-1), [(3, 4)], grad=False),
    OpCase("argmax_flat_keepdims", lambda x: O.argmax(x, keepdims=True),
           lambda x: torch.argmax(x, keepdim=True), [(3, 4)], grad=False),
    OpCase("argmin_axis_keepdims", lambda x: O.argmin(x, axis=0, keepdims=True),
           lambda x: torch.argmin(x, 0, keepdim=True), [(3, 4)], grad=False),
    OpCase("argmin_int", O.argmin, torch.argmin, [Ints((5,), 0, 100)], grad=False),
    OpCase("cumsum", lambda x: O.cumsum(x, axis=1), lambda x: torch.cumsum(x, 1), [(3, 4)], second_order=True),
    OpCase("cumsum_negative_axis", lambda x: x.cumsum(-3), lambda x: torch.cumsum(x, -3), [(2, 3, 4)]),
    OpCase("cumsum_flat", O.cumsum, lambda x: torch.cumsum(x.flatten(), 0), [(3, 4)]),
    OpCase("cumsum_int", lambda x: O.cumsum(x, 0), lambda x: torch.cumsum(x, 0), [Ints((4,), dtype="int32")],
           grad=False),
    OpCase("mean_positive_var", lambda x: O.var(x, axis=0) / O.mean(x, axis=0),
           lambda x: torch.var(x, 0) / x.mean(0), [Positive((5, 3))]),
]
