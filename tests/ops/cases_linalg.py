"""Cases for luoshu/ops/linalg.py."""

import torch

import luoshu as ls
from tests.ops.harness import OpCase

O = ls.ops
F = torch.nn.functional
apply = ls.core.apply

CASES = [
    OpCase("matmul", O.matmul, torch.matmul, [(3, 4), (4, 5)], second_order=True),
    OpCase("matmul_operator", lambda a, b: a @ b, lambda a, b: a @ b, [(2, 3, 4), (2, 4, 5)], second_order=True),
    OpCase("matmul_batch_broadcast", O.matmul, torch.matmul, [(2, 1, 3, 4), (5, 4, 2)], second_order=True),
    OpCase("matmul_matrix_batch", O.matmul, torch.matmul, [(3, 4), (2, 4, 5)]),
    OpCase("matmul_trans_a", lambda a, b: apply("matmul", a, b, trans_a=True), lambda a, b: a.mT @ b,
           [(4, 3), (4, 5)], second_order=True),
    OpCase("matmul_trans_b", lambda a, b: apply("matmul", a, b, trans_b=True), lambda a, b: a @ b.mT,
           [(2, 3, 4), (5, 4)], second_order=True),
    OpCase("matmul_trans_both", lambda a, b: apply("matmul", a, b, trans_a=True, trans_b=True),
           lambda a, b: a.mT @ b.mT, [(2, 4, 3), (2, 5, 4)], second_order=True),
    # contracted dimension 1: the kernel's outer-product path (trans_a reads a (1, n) operand as (n, 1))
    OpCase("matmul_outer", O.matmul, torch.matmul, [(6, 1), (1, 5)], second_order=True),
    OpCase("matmul_outer_batch_broadcast", O.matmul, torch.matmul, [(2, 1, 3, 1), (4, 1, 5)]),
    OpCase("matmul_outer_trans_a", lambda a, b: apply("matmul", a, b, trans_a=True), lambda a, b: a.mT @ b,
           [(1, 6), (1, 5)]),
    OpCase("matmul_vector_matrix", O.matmul, torch.matmul, [(4,), (4, 5)], second_order=True),
    OpCase("matmul_matrix_vector", O.matmul, torch.matmul, [(2, 3, 4), (4,)], second_order=True),
    OpCase("matmul_vector_vector", O.matmul, torch.matmul, [(4,), (4,)], second_order=True),
    OpCase("linear", O.linear, F.linear, [(3, 4), (5, 4), (5,)], second_order=True),
    OpCase("linear_no_bias", O.linear, F.linear, [(3, 4), (5, 4)], second_order=True),
    OpCase("linear_3d", O.linear, F.linear, [(2, 3, 4), (5, 4), (5,)], second_order=True),
    OpCase("linear_1d", O.linear, F.linear, [(4,), (5, 4), (5,)]),
    OpCase("addmm", O.addmm, torch.addmm, [(3, 5), (3, 4), (4, 5)], second_order=True),
    OpCase("addmm_alpha_beta_broadcast", lambda c, a, b: O.addmm(c, a, b, beta=0.5, alpha=-2.0),
           lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=-2.0), [(5,), (3, 4), (4, 5)], second_order=True),
    OpCase("einsum_matmul", lambda a, b: O.einsum("ij,jk->ik", a, b), lambda a, b: torch.einsum("ij,jk->ik", a, b),
           [(3, 4), (4, 5)], second_order=True),
    OpCase("einsum_batched", lambda a, b: O.einsum("bij,bjk->bik", a, b),
           lambda a, b: torch.einsum("bij,bjk->bik", a, b), [(2, 3, 4), (2, 4, 5)]),
    OpCase("einsum_sum_axis", lambda a: O.einsum("ij->j", a), lambda a: torch.einsum("ij->j", a), [(3, 4)]),
    OpCase("einsum_outer", lambda a, b: O.einsum("i,j->ij", a, b), lambda a, b: torch.einsum("i,j->ij", a, b),
           [(3,), (4,)], second_order=True),
    OpCase("einsum_attention", lambda q, k: O.einsum("bhqd,bhkd->bhqk", [q, k]),
           lambda q, k: torch.einsum("bhqd,bhkd->bhqk", q, k), [(2, 3, 4, 5), (2, 3, 6, 5)], second_order=True),
]
