"""Cases for luoshu/ops/creation.py."""

import torch

import luoshu as ls
from tests.ops.harness import OpCase

O = ls.ops

CASES = [
    OpCase("zeros", lambda: O.zeros(2, 3), lambda: torch.zeros(2, 3), grad=False),
    OpCase("zeros_tuple_dtype", lambda: O.zeros((4,), dtype="int32"), lambda: torch.zeros(4, dtype=torch.int32),
           grad=False),
    OpCase("ones", lambda: O.ones((2, 1, 3), dtype="float64"), lambda: torch.ones(2, 1, 3, dtype=torch.float64),
           grad=False),
    OpCase("full", lambda: O.full((2, 3), 1.5), lambda: torch.full((2, 3), 1.5), grad=False),
    OpCase("full_int", lambda: O.full(3, 7), lambda: torch.full((3,), 7), grad=False),
    OpCase("full_bool", lambda: O.full((2,), True), lambda: torch.full((2,), True), grad=False),
    OpCase("arange", lambda: O.arange(5), lambda: torch.arange(5), grad=False),
    OpCase("arange_step", lambda: O.arange(2, 11, 3), lambda: torch.arange(2, 11, 3), grad=False),
    OpCase("arange_negative_step", lambda: O.arange(5, -4, -2), lambda: torch.arange(5, -4, -2), grad=False),
    OpCase("arange_float", lambda: O.arange(0.0, 1.0, 0.3), lambda: torch.arange(0.0, 1.0, 0.3), grad=False),
    OpCase("arange_dtype", lambda: O.arange(4, dtype="float64"), lambda: torch.arange(4, dtype=torch.float64),
           grad=False),
    OpCase("eye", lambda: O.eye(3), lambda: torch.eye(3), grad=False),
    OpCase("eye_rect", lambda: O.eye(2, 4, dtype="int64"), lambda: torch.eye(2, 4, dtype=torch.int64), grad=False),
    OpCase("zeros_like", O.zeros_like, torch.zeros_like, [(3, 4)], grad=False),
    OpCase("ones_like_dtype", lambda x: O.ones_like(x, dtype="int32"),
           lambda x: torch.ones_like(x, dtype=torch.int32), [(3, 4)], grad=False),
    OpCase("full_like", lambda x: O.full_like(x, -2.0), lambda x: torch.full_like(x, -2.0), [(3, 4)], grad=False),
    OpCase("arange_like", lambda x: O.arange_like(x, axis=1, limit=5), lambda x: torch.arange(x.shape[1]), [(3, 5)],
           grad=False, dynamic=True),
    OpCase("arange_like_float_in_expression", lambda x: x * O.arange_like(x, axis=0, dtype="float64"),
           lambda x: x * torch.arange(x.shape[0], dtype=torch.float64), [(4,)], dynamic=True, second_order=True),
    OpCase("creation_in_expression",
           lambda x: x * O.arange(4, dtype="float64", device=x.device) + O.ones(3, 1, dtype="float64", device=x.device),
           lambda x: x * torch.arange(4, dtype=torch.float64) + torch.ones(3, 1, dtype=torch.float64), [(3, 4)],
           second_order=True),
]
