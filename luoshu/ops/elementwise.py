"""Elementwise operators with NumPy broadcasting, their gradients and activations."""

from __future__ import annotations

import math

import torch

from luoshu.core import dtypes
from luoshu.core.errors import DTypeError, OpError
from luoshu.core.op import OpDef, apply, register
from luoshu.core.shapes import broadcast_shapes, same_dim
from luoshu.core.tensor import TensorMeta
from luoshu.ops import _states
from luoshu.ops._util import float_dtype, sum_to, wants

aten = torch.ops.aten


# --- binary arithmetic ------------------------------------------------------------------
class _Binary(OpDef):
    def infer(self, inputs):
        a, b = inputs
        return TensorMeta(broadcast_shapes(self.name, a.shape, b.shape), dtypes.promote(a.dtype, b.dtype))

    # Which inputs may be partial: "all" (a sum of sums), a tuple (any one of them, the
    # others duplicate: linear in each), or "none".
    states_linear = "none"

    def deduce_states(self, input_ds, _io=None, **attrs):
        if _io is None:
            a, b = input_ds
            if a is not None and b is not None and a != b and not (a.is_pure_duplicate() and b.is_pure_duplicate()):
                return super().deduce_states(input_ds)
            return [a if a is not None else b]
        return _states.elementwise(self.name, input_ds, _io, self.states_linear)


@register
class Add(_Binary):
    name = "add"
    states_linear = "all"
    compute = staticmethod(torch.add)

    def gradient(self, op, grads):
        g, = grads
        a, b = op.inputs
        return [sum_to(g, a) if wants(op, 0) else None, sum_to(g, b) if wants(op, 1) else None]


@register
class AddN(OpDef):
    """The sum of n tensors of one shape, added in input order (autodiff sums a tensor's gradient
    contributions with one: the states pass adds the contributions of each layout locally and
    converts each layout's sum once, e.g. one all-reduce of all the partial ones)."""

    name = "add_n"
    sums_inputs = True

    def infer(self, inputs):
        first = inputs[0]
        for t in inputs[1:]:
            if t.ndim != first.ndim or not all(same_dim(a, b) for a, b in zip(t.shape, first.shape)):
                raise self.shape_error(inputs, "all inputs must have one shape")
        dtype = first.dtype
        for t in inputs[1:]:
            dtype = dtypes.promote(dtype, t.dtype)
        shape = tuple(next((d for d in dims if d is not None), None) for dims in zip(*(t.shape for t in inputs)))
        return TensorMeta(shape, dtype)

    @staticmethod
    def compute(*values):
        # a left fold, each step the kernel of `add`: the bits of the chain ((a + b) + c) + ...
        out = torch.add(values[0], values[1]) if len(values) > 1 else values[0].clone()
        for v in values[2:]:
            out = out.add_(v) if v.dtype == out.dtype else torch.add(out, v)  # in place on its own sum
        return out

    def gradient(self, op, grads):
        g, = grads
        return [g if wants(op, i) else None for i in range(len(op.inputs))]

    def deduce_states(self, input_ds, _io=None, **attrs):
        n = _states.group_size(input_ds)
        if n is None or n == 1:
            return [input_ds[0]]
        if _io is None:
            return super().deduce_states(input_ds)
        # One layout for all (a sum of partials is partial); inputs in several layouts are added per
        # layout by the states pass (`sums_inputs`) before these per-input conversions would apply.
        return _states.elementwise(self.name, input_ds, _io, "all")


@register
class Sub(_Binary):
    name = "sub"
    states_linear = "all"
    compute = staticmethod(torch.sub)

    def gradient(self, op, grads):
        g, = grads
        a, b = op.inputs
        return [sum_to(g, a) if wants(op, 0) else None, sum_to(-g, b) if wants(op, 1) else None]


@register
class Mul(_Binary):
    name = "mul"
    states_linear = (0, 1)
    compute = staticmethod(torch.mul)

    def gradient(self, op, grads):
        g, = grads
        a, b = op.inputs
        return [sum_to(g * b, a) if wants(op, 0) else None, sum_to(g * a, b) if wants(op, 1) else None]


@register
class Div(_Binary):
    name = "div"
    states_linear = (0,)

    def infer(self, inputs):
        meta = super().infer(inputs)
        return TensorMeta(meta.shape, float_dtype(meta.dtype))

    compute = staticmethod(torch.div)

    def gradient(self, op, grads):
        g, = grads
        a, b = op.inputs
        ga = sum_to(g / b, a) if wants(op, 0) else None
        gb = sum_to(-g * op.outputs[0] / b, b) if wants(op, 1) else None
        return [ga, gb]


@register
class Pow(_Binary):
    name = "pow"
    compute = staticmethod(torch.pow)

    def gradient(self, op, grads):
        g, = grads
        a, b = op.inputs
        ga = sum_to(_pow_base_grad(g, a, b), a) if wants(op, 0) else None
        # d(a^b)/db = a^b log a, taken as 0 where a == 0 (the limit for b > 0).
        gb = None
        if wants(op, 1):
            safe_log = apply("where", a > 0, apply("log", apply("where", a > 0, a, 1.0)), 0.0)
            gb = sum_to(g * op.outputs[0] * safe_log, b)
        return [ga, gb]


def _pow_base_grad(g, a, b):
    """g * b * a^(b-1), exactly 0 where b == 0 (as torch, so 0^-1 never makes a nan)."""
    if b.producer is None and b._value is not None and b._value.numel() == 1 and not b.requires_grad:
        e = float(b._value)  # a constant exponent: fold it at build time
        return apply("zeros_like", g) if e == 0 else g * (a ** (e - 1.0) * e)
    return apply("where", b == 0, 0.0, g * b * a ** (b - 1.0))


@register
class Maximum(_Binary):
    name = "maximum"
    compute = staticmethod(torch.maximum)

    def gradient(self, op, grads):
        return _select_grad(op, grads[0], op.inputs[0] > op.inputs[1], op.inputs[0] == op.inputs[1])


@register
class Minimum(_Binary):
    name = "minimum"
    compute = staticmethod(torch.minimum)

    def gradient(self, op, grads):
        return _select_grad(op, grads[0], op.inputs[0] < op.inputs[1], op.inputs[0] == op.inputs[1])


def _select_grad(op, g, first_wins, tie):
    # Ties split the gradient evenly, as torch does.
    a, b = op.inputs
    half = apply("where", tie, g * 0.5, g)
    ga = sum_to(apply("where", first_wins | tie, half, 0.0), a) if wants(op, 0) else None
    gb = sum_to(apply("where", first_wins, 0.0, half), b) if wants(op, 1) else None
    return [ga, gb]


@register
class Where(OpDef):
    name = "where"

    def deduce_states(self, input_ds, _io=None, **attrs):
        return _states.elementwise(self.name, input_ds, _io, "none")

    def infer(self, inputs):
        cond, a, b = inputs
        if cond.dtype != "bool":
            raise DTypeError(f"where: the condition must be bool, found {cond.dtype}")
        return TensorMeta(broadcast_shapes(self.name, cond.shape, a.shape, b.shape),
                          dtypes.promote(a.dtype, b.dtype))

    compute = staticmethod(torch.where)

    def gradient(self, op, grads):
        g, = grads
        cond, a, b = op.inputs
        ga = sum_to(apply("where", cond, g, 0.0), a) if wants(op, 1) else None
        gb = sum_to(apply("where", cond, 0.0, g), b) if wants(op, 2) else None
        return [None, ga, gb]


# --- comparisons and logic (bool results, no gradient) ----------------------------------
class _Compare(_Binary):
    differentiable = False

    def infer(self, inputs):
        a, b = inputs
        return TensorMeta(broadcast_shapes(self.name, a.shape, b.shape), "bool")


def _comparison(op_name: str, kernel):
    cls = type(op_name.title(), (_Compare,), {"name": op_name, "compute": staticmethod(kernel)})
    return register(cls)


for _name, _kernel in [("equal", torch.eq), ("not_equal", torch.ne), ("less", torch.lt),
                       ("less_equal", torch.le), ("greater", torch.gt), ("greater_equal", torch.ge),
                       ("logical_and", torch.logical_and), ("logical_or", torch.logical_or),
                       ("logical_xor", torch.logical_xor)]:
    _comparison(_name, _kernel)


@register
class LogicalNot(OpDef):
    name = "logical_not"
    differentiable = False

    def infer(self, inputs):
        return TensorMeta(inputs[0].shape, "bool")

    compute = staticmethod(torch.logical_not)


@register
class Isfinite(OpDef):
    name = "isfinite"
    differentiable = False

    def infer(self, inputs):
        return TensorMeta(inputs[0].shape, "bool")

    compute = staticmethod(torch.isfinite)


# --- unary ------------------------------------------------------------------------------
class _Unary(OpDef):
    float_only = True  # integer inputs give float results (exp, log, ...)

    def infer(self, inputs, **attrs):
        x, = inputs
        return TensorMeta(x.shape, float_dtype(x.dtype) if self.float_only else x.dtype)

    states_linear = False  # neg: a partial input gives a partial output

    def deduce_states(self, input_ds, _io=None, **attrs):
        if _io is None:
            return [input_ds[0]]
        return _states.elementwise(self.name, input_ds, _io, (0,) if self.states_linear else "none")


@register
class Neg(_Unary):
    name = "neg"
    states_linear = True
    float_only = False
    compute = staticmethod(torch.neg)

    def gradient(self, op, grads):
        return [-grads[0]]


@register
class Abs(_Unary):
    name = "abs"
    float_only = False
    compute = staticmethod(torch.abs)

    def gradient(self, op, grads):
        return [grads[0] * apply("sign", op.inputs[0])]


@register
class Sign(_Unary):
    name = "sign"
    float_only = False
    compute = staticmethod(torch.sign)

    def gradient(self, op, grads):
        return [apply("zeros_like", op.inputs[0])]


@register
class Exp(_Unary):
    name = "exp"
    compute = staticmethod(torch.exp)

    def gradient(self, op, grads):
        return [grads[0] * op.outputs[0]]


@register
class Log(_Unary):
    name = "log"
    compute = staticmethod(torch.log)

    def gradient(self, op, grads):
        return [grads[0] / op.inputs[0]]


@register
class Log1p(_Unary):
    name = "log1p"
    compute = staticmethod(torch.log1p)

    def gradient(self, op, grads):
        return [grads[0] / (op.inputs[0] + 1.0)]


@register
class Sqrt(_Unary):
    name = "sqrt"
    compute = staticmethod(torch.sqrt)

    def gradient(self, op, grads):
        return [grads[0] * 0.5 / op.outputs[0]]


@register
class Rsqrt(_Unary):
    name = "rsqrt"
    compute = staticmethod(torch.rsqrt)

    def gradient(self, op, grads):
        y = op.outputs[0]
        return [grads[0] * -0.5 * y * y * y]


@register
class Sin(_Unary):
    name = "sin"
    compute = staticmethod(torch.sin)

    def gradient(self, op, grads):
        return [grads[0] * apply("cos", op.inputs[0])]


@register
class Cos(_Unary):
    name = "cos"
    compute = staticmethod(torch.cos)

    def gradient(self, op, grads):
        return [-grads[0] * apply("sin", op.inputs[0])]


@register
class Erf(_Unary):
    name = "erf"
    compute = staticmethod(torch.erf)

    def gradient(self, op, grads):
        x = op.inputs[0]
        return [grads[0] * (2.0 / math.sqrt(math.pi)) * apply("exp", -(x * x))]


@register
class Tanh(_Unary):
    name = "tanh"
    compute = staticmethod(torch.tanh)

    def gradient(self, op, grads):
        return [apply("tanh_backward", grads[0], op.outputs[0])]


@register
class TanhBackward(OpDef):
    """g * (1 - y²) in one kernel."""

    name = "tanh_backward"

    def deduce_states(self, input_ds, _io=None, **attrs):
        return _states.elementwise(self.name, input_ds, _io, (0,))  # linear in the incoming gradient

    def infer(self, inputs):
        return TensorMeta(inputs[1].shape, inputs[1].dtype)

    compute = staticmethod(aten.tanh_backward)

    def gradient(self, op, grads):
        gg, = grads
        g, y = op.inputs
        return [apply("tanh_backward", gg, y), gg * g * y * -2.0]


@register
class Sigmoid(_Unary):
    name = "sigmoid"
    compute = staticmethod(torch.sigmoid)

    def gradient(self, op, grads):
        return [apply("sigmoid_backward", grads[0], op.outputs[0])]


@register
class SigmoidBackward(OpDef):
    """g * y * (1 - y) in one kernel."""

    name = "sigmoid_backward"

    def deduce_states(self, input_ds, _io=None, **attrs):
        return _states.elementwise(self.name, input_ds, _io, (0,))  # linear in the incoming gradient

    def infer(self, inputs):
        return TensorMeta(inputs[1].shape, inputs[1].dtype)

    compute = staticmethod(aten.sigmoid_backward)

    def gradient(self, op, grads):
        gg, = grads
        g, y = op.inputs
        return [apply("sigmoid_backward", gg, y), gg * g * (1.0 - 2.0 * y)]


@register
class Relu(_Unary):
    name = "relu"
    float_only = False
    compute = staticmethod(torch.relu)

    def gradient(self, op, grads):
        return [apply("threshold_backward", grads[0], op.outputs[0], threshold=0.0)]


@register
class ThresholdBackward(OpDef):
    """g where x > threshold, else 0 (the relu gradient in one kernel)."""

    name = "threshold_backward"

    def deduce_states(self, input_ds, _io=None, **attrs):
        return _states.elementwise(self.name, input_ds, _io, (0,))  # linear in the incoming gradient
    attrs = {"threshold": 0.0}

    def infer(self, inputs, threshold):
        return TensorMeta(broadcast_shapes(self.name, inputs[0].shape, inputs[1].shape), inputs[0].dtype)

    compute = staticmethod(aten.threshold_backward)

    def gradient(self, op, grads):
        return [apply("threshold_backward", grads[0], op.inputs[1], **op.attrs), None]


@register
class LeakyRelu(_Unary):
    name = "leaky_relu"
    attrs = {"negative_slope": 0.01}

    @staticmethod
    def compute(x, negative_slope):
        return torch.nn.functional.leaky_relu(x, negative_slope)

    def gradient(self, op, grads):
        x = op.inputs[0]
        return [apply("where", x > 0, grads[0], grads[0] * op.attrs["negative_slope"])]


@register
class Elu(_Unary):
    name = "elu"
    attrs = {"alpha": 1.0}

    @staticmethod
    def compute(x, alpha):
        return torch.nn.functional.elu(x, alpha)

    def gradient(self, op, grads):
        x, y = op.inputs[0], op.outputs[0]
        return [apply("where", x > 0, grads[0], grads[0] * (y + op.attrs["alpha"]))]


@register
class Gelu(_Unary):
    name = "gelu"
    attrs = {"approximate": "none"}

    def infer(self, inputs, approximate):
        if approximate not in ("none", "tanh"):
            raise OpError(f"gelu: approximate must be 'none' or 'tanh', found {approximate!r}")
        return super().infer(inputs)

    @staticmethod
    def compute(x, approximate):
        return torch.nn.functional.gelu(x, approximate=approximate)

    def gradient(self, op, grads):
        return [apply("gelu_backward", grads[0], op.inputs[0], **op.attrs)]


@register
class GeluBackward(OpDef):
    """The gelu gradient in one kernel; its own gradient is built from primitives."""

    name = "gelu_backward"

    def deduce_states(self, input_ds, _io=None, **attrs):
        return _states.elementwise(self.name, input_ds, _io, (0,))  # linear in the incoming gradient
    attrs = {"approximate": "none"}

    def infer(self, inputs, approximate):
        return TensorMeta(inputs[1].shape, inputs[1].dtype)

    @staticmethod
    def compute(g, x, approximate):
        return aten.gelu_backward(g, x, approximate=approximate)

    def gradient(self, op, grads):
        gg, = grads
        g, x = op.inputs
        return [apply("gelu_backward", gg, x, **op.attrs), gg * g * _gelu_second_derivative(x, op.attrs["approximate"])]


def _gelu_second_derivative(x, approximate):
    if approximate == "none":
        pdf = apply("exp", x * x * -0.5) * (1.0 / math.sqrt(2 * math.pi))
        return pdf * (2.0 - x * x)
    k, c = math.sqrt(2.0 / math.pi), 0.044715
    inner = (x + x * x * x * c) * k
    t = apply("tanh", inner)
    sech2 = 1.0 - t * t
    d_inner = (1.0 + x * x * (3 * c)) * k
    # d/dx [0.5(1+t) + 0.5 x sech² d_inner]
    return sech2 * d_inner + x * 0.5 * (sech2 * (t * d_inner * d_inner * -2.0) + sech2 * (x * (6 * c * k)))


@register
class Silu(_Unary):
    name = "silu"
    compute = staticmethod(torch.nn.functional.silu)

    def gradient(self, op, grads):
        x = op.inputs[0]
        s = apply("sigmoid", x)
        return [grads[0] * (s * (1.0 + x * (1.0 - s)))]


@register
class Softplus(_Unary):
    name = "softplus"
    attrs = {"beta": 1.0, "threshold": 20.0}

    @staticmethod
    def compute(x, beta, threshold):
        return torch.nn.functional.softplus(x, beta, threshold)

    def gradient(self, op, grads):
        x, g = op.inputs[0], grads[0]
        beta, threshold = op.attrs["beta"], op.attrs["threshold"]
        return [apply("where", x * beta > threshold, g, g * apply("sigmoid", x * beta))]


@register
class Clamp(_Unary):
    name = "clamp"
    float_only = False
    attrs = {"min": None, "max": None}

    def infer(self, inputs, min, max):
        if min is None and max is None:
            raise OpError("clamp: give at least one of min and max")
        return super().infer(inputs)

    @staticmethod
    def compute(x, min, max):
        return torch.clamp(x, min, max)

    def gradient(self, op, grads):
        x, g = op.inputs[0], grads[0]
        lo, hi = op.attrs["min"], op.attrs["max"]
        inside = None
        if lo is not None:
            inside = x >= lo
        if hi is not None:
            inside = (x <= hi) if inside is None else inside & (x <= hi)
        return [apply("where", inside, g, 0.0)]


@register
class Cast(OpDef):
    name = "cast"
    attrs = {"dtype": "float32"}

    def infer(self, inputs, dtype):
        return TensorMeta(inputs[0].shape, dtypes.dtype_name(dtype))

    @staticmethod
    def compute(x, dtype):
        return x.to(dtypes.to_torch(dtype))

    def gradient(self, op, grads):
        x = op.inputs[0]
        if not dtypes.is_floating(x.dtype):
            return [None]
        return [apply("cast", grads[0], dtype=x.dtype)]

    def deduce_states(self, input_ds, **attrs):
        return [input_ds[0]]


# --- public functions -------------------------------------------------------------------
def add(x, y):
    return apply("add", x, y)


def add_n(*xs):
    return apply("add_n", *xs)


def sub(x, y):
    return apply("sub", x, y)


def mul(x, y):
    return apply("mul", x, y)


def div(x, y):
    return apply("div", x, y)


def pow(x, exponent):  # noqa: A001 - mirrors torch.pow
    return apply("pow", x, exponent)


def maximum(x, y):
    return apply("maximum", x, y)


def minimum(x, y):
    return apply("minimum", x, y)


def where(condition, x, y):
    return apply("where", condition, x, y)


def equal(x, y):
    return apply("equal", x, y)


def not_equal(x, y):
    return apply("not_equal", x, y)


def less(x, y):
    return apply("less", x, y)


def less_equal(x, y):
    return apply("less_equal", x, y)


def greater(x, y):
    return apply("greater", x, y)


def greater_equal(x, y):
    return apply("greater_equal", x, y)


def logical_and(x, y):
    return apply("logical_and", x, y)


def logical_or(x, y):
    return apply("logical_or", x, y)


def logical_xor(x, y):
    return apply("logical_xor", x, y)


def logical_not(x):
    return apply("logical_not", x)


def isfinite(x):
    return apply("isfinite", x)


def neg(x):
    return apply("neg", x)


def abs(x):  # noqa: A001
    return apply("abs", x)


def sign(x):
    return apply("sign", x)


def exp(x):
    return apply("exp", x)


def log(x):
    return apply("log", x)


def log1p(x):
    return apply("log1p", x)


def sqrt(x):
    return apply("sqrt", x)


def rsqrt(x):
    return apply("rsqrt", x)


def sin(x):
    return apply("sin", x)


def cos(x):
    return apply("cos", x)


def erf(x):
    return apply("erf", x)


def tanh(x):
    return apply("tanh", x)


def sigmoid(x):
    return apply("sigmoid", x)


def relu(x):
    return apply("relu", x)


def leaky_relu(x, negative_slope: float = 0.01):
    return apply("leaky_relu", x, negative_slope=negative_slope)


def elu(x, alpha: float = 1.0):
    return apply("elu", x, alpha=alpha)


def gelu(x, approximate: str = "none"):
    return apply("gelu", x, approximate=approximate)


def silu(x):
    return apply("silu", x)


def softplus(x, beta: float = 1.0, threshold: float = 20.0):
    return apply("softplus", x, beta=beta, threshold=threshold)


def clamp(x, min=None, max=None):  # noqa: A002 - torch's argument names
    return apply("clamp", x, min=min, max=max)


def cast(x, dtype):
    return apply("cast", x, dtype=dtypes.dtype_name(dtype))


__all__ = ["abs", "add", "add_n", "cast", "clamp", "cos", "div", "elu", "equal", "erf", "exp", "gelu", "greater",
           "greater_equal", "isfinite", "leaky_relu", "less", "less_equal", "log", "log1p",
           "logical_and", "logical_not", "logical_or", "logical_xor", "maximum", "minimum", "mul",
           "neg", "not_equal", "pow", "relu", "rsqrt", "sigmoid", "sign", "silu", "sin", "softplus",
           "sqrt", "sub", "tanh", "where"]
