"""Matrix products: matmul (batched, broadcasting, transposes folded in), linear, addmm, einsum."""

from __future__ import annotations

import torch

from luoshu.core import dtypes
from luoshu.core.errors import OpError
from luoshu.core.op import OpDef, apply, as_tensor, register
from luoshu.core.shapes import broadcast_shapes, same_dim
from luoshu.core.tensor import TensorMeta
from luoshu.ops import _states
from luoshu.ops._states import Candidate, dup, partial, split
from luoshu.ops._util import sum_to, wants


def _dims_ok(input_ds, n: int):
    """ok(i, d, size): input i may be split on dim d (divisible, or split there already)."""
    return lambda i, d, size: _states.divisible(size, n) or _states.split_dim(input_ds[i]) == d


@register
class Matmul(OpDef):
    """Batched `op(a) @ op(b)` for rank >= 2, `op` a transpose of the last two dims if asked.

    Folding the transposes into the op (as Hetu's MatMulOp does) lets BLAS read the
    operands transposed instead of materialising them in the gradients.
    """

    name = "matmul"
    attrs = {"trans_a": False, "trans_b": False}
    autocast = "lower"

    def deduce_states(self, input_ds, _io=None, trans_a=False, trans_b=False, **attrs):
        """Rows of a -> rows of the product, columns of b -> its columns, both contracted dims
        split -> partial, a batch dim split in both (or broadcast in one) stays split; partial
        times duplicate is partial."""
        n = _states.group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        a, b = _io.inputs
        out = _io.outputs[0]
        ra, ka = (len(a) - 1, len(a) - 2) if trans_a else (len(a) - 2, len(a) - 1)
        kb, cb = (len(b) - 1, len(b) - 2) if trans_b else (len(b) - 2, len(b) - 1)
        ok = _dims_ok(input_ds, n)
        cands = [Candidate((dup(n), dup(n)), (dup(n),)), Candidate((partial(n), dup(n)), (partial(n),)),
                 Candidate((dup(n), partial(n)), (partial(n),))]
        if ok(0, ra, a[ra]):
            cands.append(Candidate((split(n, ra), dup(n)), (split(n, len(out) - 2),)))
        if ok(1, cb, b[cb]):
            cands.append(Candidate((dup(n), split(n, cb)), (split(n, len(out) - 1),)))
        if ok(0, ka, a[ka]) or ok(1, kb, b[kb]):
            cands.append(Candidate((split(n, ka), split(n, kb)), (partial(n),)))
        for d in range(len(out) - 2):
            da, db = d - (len(out) - len(a)), d - (len(out) - len(b))
            if not _states.divisible(out[d], n) and not any(
                    _states.split_dim(x) == e for x, e in zip(input_ds, (da, db))):
                continue
            wa = dup(n) if da < 0 or a[da] == 1 else split(n, da)
            wb = dup(n) if db < 0 or b[db] == 1 else split(n, db)
            cands.append(Candidate((wa, wb), (split(n, d),)))
        return _states.choose(self.name, cands, input_ds)

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
    def bind_into(out, scale, attrs):
        """2-D operands: one addmm writes scale * (a @ b) into `out` (beta 0 ignores its contents)."""
        trans_a, trans_b, dtype = attrs["trans_a"], attrs["trans_b"], out.dtype

        def write(a, b):
            if a.ndim != 2 or b.ndim != 2 or a.dtype is not dtype or b.dtype is not dtype:
                return False
            out.addmm_(a.t() if trans_a else a, b.t() if trans_b else b, beta=0, alpha=scale)
            return True

        return write

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

    def deduce_states(self, input_ds, _io=None, **attrs):
        """Column-parallel (weight split on out: output split on its last dim), row-parallel
        (x split on in, weight on in: partial output, the bias added on one member), rows of
        x split, or partial x."""
        n = _states.group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        x, w = _io.inputs[0], _io.inputs[1]
        bias = len(input_ds) == 3
        tail = (lambda s: (s,)) if bias else (lambda s: ())
        ok = _dims_ok(input_ds, n)
        nd = len(x)
        cands = [Candidate((dup(n), dup(n)) + tail(dup(n)), (dup(n),)),
                 Candidate((partial(n), dup(n)) + tail(dup(n)), (partial(n),))]
        if ok(1, 0, w[0]):
            cands.append(Candidate((dup(n), split(n, 0)) + tail(split(n, 0)), (split(n, nd - 1),)))
        if ok(1, 1, w[1]) or ok(0, nd - 1, x[-1]):
            cands.append(Candidate((split(n, nd - 1), split(n, 1)) + tail(dup(n)), (partial(n),)))
        for d in range(nd - 1):
            if ok(0, d, x[d]):
                cands.append(Candidate((split(n, d), dup(n)) + tail(dup(n)), (split(n, d),)))
        return _states.choose(self.name, cands, input_ds)

    def localize(self, inputs, attrs, input_ds, output_ds, shard):
        if len(inputs) == 3 and _states.is_partial(output_ds[0]) and shard.index != 0:
            return apply(self.name, inputs[0], inputs[1])  # the bias joins the sum once, on member 0
        return apply(self.name, *inputs)

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
