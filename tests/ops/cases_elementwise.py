"""Cases for luoshu/ops/elementwise.py."""

import torch

import luoshu as ls
from tests.ops.harness import Const, OpCase, Positive

O = ls.ops
F = torch.nn.functional
B = [(3, 4), (4,)]  # broadcasting pair
B2 = [(2, 1, 4), (3, 1)]

CASES = [
    OpCase("add", O.add, torch.add, B, second_order=True),
    OpCase("add_rank_broadcast", O.add, torch.add, B2),
    OpCase("add_scalar", lambda a: a + 2.5, lambda a: a + 2.5, [(3, 4)]),
    OpCase("radd_scalar", lambda a: 2.5 + a, lambda a: 2.5 + a, [(3,)]),
    OpCase("sub", O.sub, torch.sub, B, second_order=True),
    OpCase("rsub_scalar", lambda a: 1.0 - a, lambda a: 1.0 - a, [(3,)]),
    OpCase("mul", O.mul, torch.mul, B2, second_order=True),
    OpCase("div", O.div, torch.div, [(3, 4), Positive((4,))], second_order=True),
    OpCase("rdiv_scalar", lambda a: 2.0 / a, lambda a: 2.0 / a, [Positive((3,))]),
    OpCase("pow", O.pow, torch.pow, [Positive((3, 4)), (4,)], second_order=True),
    OpCase("pow_scalar", lambda a: a ** 3, lambda a: a ** 3, [(3, 4)], second_order=True),
    OpCase("maximum", O.maximum, torch.maximum, B, second_order=True),
    OpCase("maximum_ties", O.maximum, torch.maximum, [Const([1.0, 2.0, 3.0], grad=True),
                                                      Const([1.0, 0.0, 4.0], grad=True)]),
    OpCase("minimum", O.minimum, torch.minimum, B),
    OpCase("where", lambda c, a, b: O.where(c, a, b), torch.where,
           [Const([[True, False, True, False]] * 3), (3, 4), (4,)], second_order=True),
    OpCase("equal", lambda a, b: O.equal(a, b), torch.eq, [Const([1, 2, 3]), Const([1, 0, 3])], grad=False),
    OpCase("not_equal", lambda a, b: a != b, torch.ne, [Const([1, 2, 3]), Const([1, 0, 3])], grad=False),
    OpCase("less", lambda a, b: a < b, torch.lt, B, grad=False),
    OpCase("less_equal", lambda a, b: a <= b, torch.le, B, grad=False),
    OpCase("greater", lambda a, b: a > b, torch.gt, B, grad=False),
    OpCase("greater_equal", lambda a, b: a >= b, torch.ge, B, grad=False),
    OpCase("logical_and", lambda a, b: a & b, torch.logical_and,
           [Const([True, False, True]), Const([True, True, False])], grad=False),
    OpCase("logical_or", lambda a, b: a | b, torch.logical_or,
           [Const([True, False, False]), Const([True, True, False])], grad=False),
    OpCase("logical_xor", lambda a, b: a ^ b, torch.logical_xor,
           [Const([True, False, False]), Const([True, True, False])], grad=False),
    OpCase("logical_not", lambda a: ~a, torch.logical_not, [Const([True, False])], grad=False),
    OpCase("isfinite", O.isfinite, torch.isfinite, [Const([1.0, float("inf"), float("nan")])], grad=False),
    OpCase("neg", lambda a: -a, torch.neg, [(3, 4)], second_order=True),
    OpCase("abs", O.abs, torch.abs, [(3, 4)], second_order=True),
    OpCase("sign", O.sign, torch.sign, [(3, 4)]),
    OpCase("exp", O.exp, torch.exp, [(3, 4)], second_order=True),
    OpCase("log", O.log, torch.log, [Positive((3, 4))], second_order=True),
    OpCase("log1p", O.log1p, torch.log1p, [Positive((3, 4))], second_order=True),
    OpCase("sqrt", O.sqrt, torch.sqrt, [Positive((3, 4))], second_order=True),
    OpCase("rsqrt", O.rsqrt, torch.rsqrt, [Positive((3, 4))], second_order=True),
    OpCase("sin", O.sin, torch.sin, [(3, 4)], second_order=True),
    OpCase("cos", O.cos, torch.cos, [(3, 4)], second_order=True),
    OpCase("erf", O.erf, torch.erf, [(3, 4)], second_order=True),
    OpCase("tanh", O.tanh, torch.tanh, [(3, 4)], second_order=True),
    OpCase("sigmoid", O.sigmoid, torch.sigmoid, [(3, 4)], second_order=True),
    OpCase("relu", O.relu, torch.relu, [(3, 4)], second_order=True),
    OpCase("leaky_relu", lambda a: O.leaky_relu(a, 0.2), lambda a: F.leaky_relu(a, 0.2), [(3, 4)],
           second_order=True),
    OpCase("elu", lambda a: O.elu(a, 0.7), lambda a: F.elu(a, 0.7), [(3, 4)], second_order=True),
    OpCase("gelu", O.gelu, F.gelu, [(3, 4)], second_order=True),
    OpCase("gelu_tanh", lambda a: O.gelu(a, "tanh"), lambda a: F.gelu(a, approximate="tanh"), [(3, 4)],
           second_order=True),
    OpCase("silu", O.silu, F.silu, [(3, 4)], second_order=True),
    OpCase("softplus", lambda a: O.softplus(a * 10, beta=2.0, threshold=5.0),
           lambda a: F.softplus(a * 10, beta=2.0, threshold=5.0), [(3, 4)], second_order=True),
    OpCase("clamp", lambda a: O.clamp(a, -0.5, 0.5), lambda a: torch.clamp(a, -0.5, 0.5), [(3, 4)]),
    OpCase("clamp_min", lambda a: O.clamp(a, min=0.1), lambda a: torch.clamp(a, min=0.1), [(3, 4)]),
    OpCase("cast", lambda a: O.cast(a, "float32") * 2, lambda a: a.float() * 2, [(3, 4)], tol=1e-5),
    OpCase("cast_int", lambda a: O.cast(a, "int32"), lambda a: a.to(torch.int32), [Const([1.7, -2.2])],
           grad=False),
]
