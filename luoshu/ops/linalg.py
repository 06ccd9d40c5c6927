"""Matrix products: matmul (batched, broadcasting, transposes folded in), linear, addmm, einsum."""

from __future__ import annotations

import torch

from luoshu.core import dtypes
from luoshu.core.errors import OpError
from luoshu.core.op import OpDef, apply, as_tensor, register
from luoshu.core.shapes import broadcast_shapes, same_dim
from luoshu.core.tensor import TensorMeta
from luoshu.ops._util import sum_to, wants


@register
class Matmul(OpDef):
    """Batched `op(a) @ op(b)` for rank >= 2, `op` a transpose of the last two dims if asked.

    Folding the transposes into the op (as Hetu's MatMulOp does) lets BLAS read the
    operands transposed instead of materialising them in the gradients.
    """

    name = "matmul"
    attrs = {"trans_a": False, "trans_b": False}
    autocast = "lower"

    def infer(self, inputs, trans_a, trans_b):
        a, b = inputs
        if a.ndim < 2 or b.ndim < 2:
            raise self.shape_error(inputs, "the matmul op takes rank >= 2 (ls.ops.matmul handles vectors)")
        n, k = (a.shape[-1], a.shape[-2]) if trans_a else a.shape[-2:]
        k2, m = (b.shape[-1], b.shape[-2]) if trans_b else b.shape[-2:]
        if not same_dim(k, k2):
            raise self.shape_error(inputs, f"contracted dimensions differ ({k} vs {k2})")
        batch = broadcast_shapes(self.name, a.shape[:-2], b.shape[:-2])
        return TensorMeta(batch + (n, m), dtypes.promote(a.dtype, b.dtype))

    @staticmethod
    def compute(a, b, trans_a, trans_b):
        if trans_a:
            a = a.transpose(-1, -2)
        if trans_b:
            b = b.transpose(-1, -2)
        if a.shape[-1] == 1 and a.dtype == b.dtype:
            # An outer product (a linear layer's input gradient when it has one output): the same
            # products as BLAS, which is several times slower on such shapes.
            return a * b
        return torch.matmul(a, b)

    @staticmethod
    def compute_into(out, scale, a, b, trans_a, trans_b):
        """2-D operands: one addmm writes scale * (a @ b) into `out` (beta 0 ignores its contents)."""
        if a.ndim != 2 or b.ndim != 2 or a.dtype != out.dtype or b.dtype != out.dtype:
            return False
        torch.addmm(out, a.t() if trans_a else a, b.t() if trans_b else b, beta=0, alpha=scale, out=out)
        return True

    def gradient(self, op, grads):
        g, = grads
        a, b = op.inputs
        ta, tb = op.attrs["trans_a"], op.attrs["trans_b"]
        ga = gb = None
        if wants(op, 0):
            ga = (apply("matmul", b, g, trans_a=tb, trans_b=True) if ta
                  else apply("matmul", g, b, trans_b=not tb))
            ga = sum_to(ga, a)
        if wants(op, 1):
            gb = (apply("matmul", g, a, trans_a=True, trans_b=ta) if tb
                  else apply("matmul", a, g, trans_a=not ta))
            gb = sum_to(gb, b)
        return [ga, gb]


@register
class Linear(OpDef):
    """`x @ weight.T + bias` with PyTorch's weight layout `(out_features, in_features)`."""

    name = "linear"
    autocast = "lower"

    def infer(self, inputs):
        x, w = inputs[0], inputs[1]
        if w.ndim != 2 or x.ndim < 1 or not same_dim(x.shape[-1], w.shape[1]):
            raise self.shape_error(inputs, "linear needs x (..., in) and weight (out, in)")
        if len(inputs) == 3 and (inputs[2].ndim != 1 or not same_dim(inputs[2].shape[0], w.shape[0])):
            raise self.shape_error(inputs, "bias must be (out,)")
        return TensorMeta(x.shape[:-1] + (w.shape[0],), dtypes.promote(*[t.dtype for t in inputs]))

    @staticmethod
    def compute(x, w, b=None):
        return torch.nn.functional.linear(x, w, b)

    def gradient(self, op, grads):
        g, = grads
        x, w = op.inputs[0], op.inputs[1]
        gx = apply("matmul", g, w) if wants(op, 0) and x.ndim >= 2 else None
        if wants(op, 0) and x.ndim == 1:
            gx = apply("reshape", apply("matmul", apply("reshape", g, shape=(1, -1)), w), shape=(-1,))
        gw = gb = None
        g2, x2 = g, x
        if x.ndim != 2:
            g2 = apply("reshape", g, shape=(-1, w.shape[0]))
            x2 = apply("reshape", x, shape=(-1, w.shape[1]))
        if wants(op, 1):
            gw = apply("matmul", g2, x2, trans_a=True)
        if len(op.inputs) == 3 and wants(op, 2):
            gb = apply("sum", g2, axis=0)
        return [gx, gw] + ([gb] if len(op.inputs) == 3 else [])


@register
class Addmm(OpDef):
    """`beta * input + alpha * (mat1 @ mat2)` for 2-D mat1, mat2."""

    name = "addmm"
    attrs = {"beta": 1.0, "alpha": 1.0}
    autocast = "lower"

    def infer(self, inputs, beta, alpha):
        c, a, b = inputs
        if a.ndim != 2 or b.ndim != 2 or not same_dim(a.shape[1], b.shape[0]):
            raise self.shape_error(inputs, "addmm needs mat1 (n, k) and mat2 (k, m)")
        shape = broadcast_shapes(self.name, c.shape, (a.shape[0], b.shape[1]))
        return TensorMeta(shape, dtypes.promote(c.dtype, a.dtype, b.dtype))

    @staticmethod
    def compute(c, a, b, beta, alpha):
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)

    def gradient(self, op, grads):
        g, = grads
        c, a, b = op.inputs
        beta, alpha = op.attrs["beta"], op.attrs["alpha"]
        gc = sum_to(g * beta if beta != 1 else g, c) if wants(op, 0) else None
        ga = apply("matmul", g, b, trans_b=True) if wants(op, 1) else None
        gb = apply("matmul", a, g, trans_a=True) if wants(op, 2) else None
        if alpha != 1:
            ga = ga * alpha if ga is not None else None
            gb = gb * alpha if gb is not None else None
        return [gc, ga, gb]


def _parse_einsum(equation: str, n: int):
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        raise OpError(f"einsum: equation {equation!r} must name its output explicitly ('ij,jk->ik'); "
                      "ellipsis is not supported")
    lhs, out = eq.split("->")
    subs = lhs.split(",")
    if len(subs) != n:
        raise OpError(f"einsum: equation {equation!r} has {len(subs)} operands, {n} given")
    for s in subs + [out]:
        if len(set(s)) != len(s):
            raise OpError(f"einsum: repeated index within one operand ({s!r} in {equation!r}) is not supported")
    if not set(out) <= set("".join(subs)):
        raise OpError(f"einsum: output indices {out!r} do not all appear in the inputs of {equation!r}")
    return subs, out


@register
class Einsum(OpDef):
    name = "einsum"
    attrs = {"equation": ""}
    autocast = "lower"

    def infer(self, inputs, equation):
        subs, out = _parse_einsum(equation, len(inputs))
        sizes: dict[str, object] = {}
        for s, t in zip(subs, inputs):
            if len(s) != t.ndim:
                raise self.shape_error(inputs, f"operand {s!r} of {equation!r} needs rank {len(s)}, found {t.ndim}")
            for letter, d in zip(s, t.shape):
                prev = sizes.get(letter, 1)
                if d != 1 and prev != 1 and not same_dim(prev, d):
                    raise self.shape_error(inputs, f"index {letter!r} of {equation!r} is {prev} and {d}")
                if prev == 1 or prev is None:
                    sizes[letter] = d
        return TensorMeta(tuple(sizes[c] for c in out), dtypes.promote(*[t.dtype for t in inputs]))

    @staticmethod
    def compute(*operands, equation):
        return torch.einsum(equation, *operands)

    def gradient(self, op, grads):
        g, = grads
        subs, out = _parse_einsum(op.attrs["equation"], len(op.inputs))
        result = []
        for i, (s, t) in enumerate(zip(subs, op.inputs)):
            if not wants(op, i):
                result.append(None)
                continue
            others = [(subs[j], op.inputs[j]) for j in range(len(subs)) if j != i]
            available = set(out).union(*[set(o) for o, _ in others])
            kept = "".join(c for c in s if c in available)
            eq = ",".join([out] + [o for o, _ in others]) + "->" + kept
            gi = apply("einsum", g, *[x for _, x in others], equation=eq)
            for axis, c in enumerate(s):  # indices summed away only in this operand
                if c not in available:
                    gi = apply("unsqueeze", gi, axis=axis)
            result.append(sum_to(apply("broadcast_like", gi, t), t))
        return result


def matmul(a, b):
    """NumPy matmul semantics: vectors are promoted to matrices and the extra dim dropped."""
    a, b = as_tensor(a), as_tensor(b)
    if a.ndim == 1 and b.ndim == 1:
        return apply("sum", a * b)
    squeeze = []
    if a.ndim == 1:
        a = apply("unsqueeze", a, axis=0)
        squeeze.append(-2)
    if b.ndim == 1:
        b = apply("unsqueeze", b, axis=1)
        squeeze.append(-1)
    out = apply("matmul", a, b)
    for axis in squeeze:
        out = apply("squeeze", out, axis=axis)
    return out


def linear(input, weight, bias=None):  # noqa: A002 - PyTorch's argument names
    return apply("linear", input, weight) if bias is None else apply("linear", input, weight, bias)


def addmm(input, mat1, mat2, beta=1.0, alpha=1.0):  # noqa: A002
    return apply("addmm", input, mat1, mat2, beta=beta, alpha=alpha)


def einsum(equation: str, *operands):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    return apply("einsum", *operands, equation=equation)

__all__ = ["addmm", "einsum", "linear", "matmul"]
