"""Reductions over any axes (with keepdims), arg-reductions, cumsum, and their gradients."""

from __future__ import annotations

import math

import torch

from luoshu.core import dtypes
from luoshu.core.errors import OpError
from luoshu.core.op import OpDef, apply, register
from luoshu.core.shapes import broadcast_shapes, normalize_axes, normalize_axis, reduced_shape
from luoshu.core.tensor import TensorMeta
from luoshu.ops import _states
from luoshu.ops._states import Candidate, dup, partial, split
from luoshu.ops._util import float_dtype

_SMALL_INTS = ("bool", "int8", "int16", "int32", "uint8")


@register
class SumTo(OpDef):
    """Sums a broadcast gradient down to the shape of `like` (known only at run time)."""

    name = "sum_to"
    shape_inputs = (1,)

    def deduce_states(self, input_ds, _io=None, **attrs):
        """A split of a dim that `like` broadcasts becomes partial; `like` must hold the kept split."""
        n = _states.group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        g_shape, like_shape = _io.inputs
        whole = _states.WHOLE  # `like` gives only its shape
        cands = [Candidate((dup(n), whole), (dup(n),)), Candidate((partial(n), whole), (partial(n),))]
        for d, size in enumerate(g_shape):
            dl = d - (len(g_shape) - len(like_shape))
            if dl >= 0 and like_shape[dl] != 1:
                if _states.divisible(size, n) or _states.split_dim(input_ds[0]) == d:
                    cands.append(Candidate((split(n, d), split(n, dl)), (split(n, dl),)))
            else:
                cands.append(Candidate((split(n, d), None), (partial(n),)))
        return _states.choose(self.name, cands, input_ds)

    def infer(self, inputs):
        g, like = inputs
        broadcast_shapes(self.name, g.shape, like.shape)
        return TensorMeta(like.shape, g.dtype)

    @staticmethod
    def compute(g, like):
        shape = like.shape
        return g if g.shape == shape else g.sum_to_size(shape).reshape(shape)

    def gradient(self, op, grads):
        return [apply("broadcast_like", grads[0], op.inputs[0]), None]


@register
class BroadcastLike(OpDef):
    """Broadcasts `x` to the shape of `like` (the dual of sum_to)."""

    name = "broadcast_like"
    shape_inputs = (1,)

    def deduce_states(self, input_ds, _io=None, **attrs):
        """x broadcast to `like`'s shape: a split of x on a dim it has whole; `like` (its shape only)
        split alike, else anything whole."""
        n = _states.group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        x_shape, like_shape = _io.inputs
        whole = _states.WHOLE
        cands = [Candidate((dup(n), whole), (dup(n),)), Candidate((partial(n), whole), (partial(n),))]
        for d, size in enumerate(like_shape):
            dx = d - (len(like_shape) - len(x_shape))
            wx = dup(n) if dx < 0 or x_shape[dx] == 1 else split(n, dx)
            if _states.divisible(size, n) or _states.split_dim(input_ds[1]) == d:
                cands.append(Candidate((wx, split(n, d)), (split(n, d),)))
        return _states.choose(self.name, cands, input_ds)

    def infer(self, inputs):
        x, like = inputs
        return TensorMeta(broadcast_shapes(self.name, x.shape, like.shape), x.dtype)

    @staticmethod
    def compute(x, like):
        return x.expand(like.shape)

    def gradient(self, op, grads):
        return [apply("sum_to", grads[0], op.inputs[0]), None]


# --- helpers ----------------------------------------------------------------------------
def _axes(x, axis) -> tuple[int, ...]:
    """The axes a kernel reduces over (normalised; `()` means none, unlike torch's `dim=()`)."""
    return normalize_axes("reduction", axis, x.ndim)


def _keepdims(g, axes):
    """Re-inserts the reduced axes of a gradient as size-1 dims so it broadcasts over x."""
    for a in axes:
        g = apply("unsqueeze", g, axis=a)
    return g


def _kept(op, t):
    """An output-shaped tensor `t` of a reduction, with its reduced axes back as size 1."""
    x = op.inputs[0]
    axes = normalize_axes(op.opdef.name, op.attrs["axis"], x.ndim)
    if op.attrs.get("keepdims") or len(axes) == x.ndim:
        return t  # already keepdims-shaped, or 0-d (broadcasts as it is)
    return _keepdims(t, axes)


def _count(x, axes, dtype):
    """How many elements each output of a reduction over `axes` reads: an int, or a tensor
    (keepdims-shaped) when some of those dimensions are known only at run time."""
    sizes = [x.shape[a] for a in axes]
    if all(d is not None for d in sizes):
        return math.prod(sizes)
    return apply("reduced_count", x, axes=tuple(axes), dtype=dtype)


@register
class ReducedCount(OpDef):
    """The number of elements a reduction over `axes` reads, from the run-time shape (a scalar)."""

    name = "reduced_count"
    attrs = {"axes": (), "dtype": "float32"}
    differentiable = False

    def deduce_states(self, input_ds, _io=None, **attrs):
        n = _states.group_size(input_ds)
        return [None if n is None else dup(n)]

    def localize(self, inputs, attrs, input_ds, output_ds, shard):
        count = apply(self.name, *inputs, **attrs)
        d = _states.split_dim(input_ds[0])
        return count * shard.size if d is not None and d in attrs["axes"] else count  # the global count

    def infer(self, inputs, axes, dtype):
        return TensorMeta((), dtypes.dtype_name(dtype))

    @staticmethod
    def compute(x, axes, dtype):
        # a list, not a generator: TorchDynamo cannot trace math.prod over a generator (whole-step compilation)
        return torch.tensor(math.prod([x.shape[a] for a in axes]), dtype=dtypes.to_torch(dtype), device=x.device)


def _float_input(x):
    return x if x.is_floating_point() else x.to(dtypes.to_torch(dtypes.DEFAULT_FLOAT))


class _Reduce(OpDef):
    """A reduction with `axis` (None, int or tuple) and `keepdims`, float result."""

    attrs = {"axis": None, "keepdims": False}
    autocast = "fp32"

    def infer(self, inputs, axis, keepdims, **attrs):
        x, = inputs
        axes = normalize_axes(self.name, axis, x.ndim)
        return TensorMeta(reduced_shape(x.shape, axes, keepdims), self.result_dtype(x.dtype))

    def result_dtype(self, dtype):
        return float_dtype(dtype)

    # "sum": a reduced split becomes partial and partial stays partial; "mean": partial
    # stays partial and a reduced split gives partial local means scaled by 1/n; "none":
    # only splits of kept dims pass (max, min, prod, ...).
    states_kind = "none"

    def deduce_states(self, input_ds, _io=None, **attrs):
        n = _states.group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        shape = _io.inputs[0]
        axes = normalize_axes(self.name, attrs.get("axis"), len(shape))
        keep = attrs.get("keepdims", False)
        cands = [Candidate((dup(n),), (dup(n),))]
        if self.states_kind != "none":
            cands.append(Candidate((partial(n),), (partial(n),)))
        for d, size in enumerate(shape):
            if not (_states.divisible(size, n) or _states.split_dim(input_ds[0]) == d):
                continue
            if d in axes:
                if self.states_kind != "none":
                    cands.append(Candidate((split(n, d),), (partial(n),)))
            else:
                o = d if keep else d - len([a for a in axes if a < d])
                cands.append(Candidate((split(n, d),), (split(n, o),)))
        return _states.choose(self.name, cands, input_ds)

    def localize(self, inputs, attrs, input_ds, output_ds, shard):
        out = apply(self.name, *inputs, **attrs)
        d = _states.split_dim(input_ds[0])
        axes = normalize_axes(self.name, attrs.get("axis"), len(inputs[0].shape))
        if self.states_kind == "mean" and d is not None and d in axes:
            return out * (1.0 / shard.size)  # equal shards: the global mean is the sum of local means / n
        return out


# --- reductions -------------------------------------------------------------------------
@register
class Sum(_Reduce):
    name = "sum"
    states_kind = "sum"

    def result_dtype(self, dtype):
        return "int64" if dtype in _SMALL_INTS else dtype

    @staticmethod
    def compute(x, axis, keepdims):
        axes = _axes(x, axis)
        if not axes:
            return x.to(torch.int64) if x.dtype in (torch.bool, torch.int8, torch.int16, torch.int32,
                                                   torch.uint8) else x.clone()
        return x.sum(dim=axes, keepdim=keepdims)

    @staticmethod
    def bind_into(out, scale, attrs):
        axis, keepdims, dtype = attrs["axis"], attrs["keepdims"], out.dtype

        def write(x):
            axes = _axes(x, axis)
            if not axes or x.dtype is not dtype or not x.is_floating_point():
                return False
            torch.sum(x, dim=axes, keepdim=keepdims, out=out)
            if scale != 1.0:
                out.mul_(scale)
            return True

        return write

    def gradient(self, op, grads):
        return [apply("broadcast_like", _kept(op, grads[0]), op.inputs[0])]


@register
class Mean(_Reduce):
    name = "mean"
    states_kind = "mean"

    @staticmethod
    def compute(x, axis, keepdims):
        axes = _axes(x, axis)
        x = _float_input(x)
        return x.mean(dim=axes, keepdim=keepdims) if axes else x.clone()

    def gradient(self, op, grads):
        x = op.inputs[0]
        axes = normalize_axes(self.name, op.attrs["axis"], x.ndim)
        count = _count(x, axes, grads[0].dtype)
        return [apply("broadcast_like", _kept(op, grads[0]), x) / count]


class _Extremum(_Reduce):
    """max / min values; the gradient is split evenly between ties, as torch.amax does."""

    def result_dtype(self, dtype):
        return dtype

    def gradient(self, op, grads):
        x = op.inputs[0]
        out = _kept(op, op.outputs[0])
        hit = apply("equal", x, out)
        ties = apply("sum", apply("cast", hit, dtype=grads[0].dtype), axis=op.attrs["axis"], keepdims=True)
        return [apply("where", hit, _kept(op, grads[0]) / ties, 0.0)]


@register
class Max(_Extremum):
    name = "max"

    @staticmethod
    def compute(x, axis, keepdims):
        axes = _axes(x, axis)
        return torch.amax(x, dim=axes, keepdim=keepdims) if axes else x.clone()


@register
class Min(_Extremum):
    name = "min"

    @staticmethod
    def compute(x, axis, keepdims):
        axes = _axes(x, axis)
        return torch.amin(x, dim=axes, keepdim=keepdims) if axes else x.clone()


@register
class Prod(_Reduce):
    name = "prod"

    def result_dtype(self, dtype):
        return "int64" if dtype in _SMALL_INTS else dtype

    @staticmethod
    def compute(x, axis, keepdims):
        axes = _axes(x, axis)
        if x.dtype in (torch.bool, torch.int8, torch.int16, torch.int32, torch.uint8):
            x = x.to(torch.int64)
        for a in sorted(axes, reverse=True):  # torch.prod takes one dim at a time
            x = x.prod(dim=a, keepdim=keepdims)
        return x if axes else x.clone()

    def gradient(self, op, grads):
        # d prod / d x_i is the product of the others; built without dividing by zero:
        # `others` is the product of the non-zero others, right where no other is zero.
        x = op.inputs[0]
        axis = op.attrs["axis"]
        is_zero = apply("equal", x, 0.0)
        nonzero = apply("where", is_zero, 1.0, x)
        prod_nonzero = apply("prod", nonzero, axis=axis, keepdims=True)
        zeros = apply("cast", is_zero, dtype=x.dtype)
        zeros_elsewhere = apply("sum", zeros, axis=axis, keepdims=True) - zeros
        others = apply("where", is_zero, prod_nonzero, prod_nonzero / nonzero)
        others = apply("where", apply("equal", zeros_elsewhere, 0.0), others, 0.0)
        return [_kept(op, grads[0]) * others]


class _Moment(_Reduce):
    attrs = {"axis": None, "keepdims": False, "correction": 1}

    def _var_grad(self, op, g_var_kept):
        """d var / dx for a keepdims-shaped upstream gradient: g · 2 (x - mean) / (N - correction)."""
        x = op.inputs[0]
        axes = normalize_axes(self.name, op.attrs["axis"], x.ndim)
        centered = x - apply("mean", x, axis=axes, keepdims=True)
        count = _count(x, axes, g_var_kept.dtype)
        return g_var_kept * centered * 2.0 / (count - op.attrs["correction"])


@register
class Var(_Moment):
    name = "var"

    @staticmethod
    def compute(x, axis, keepdims, correction):
        axes = _axes(x, axis)
        x = _float_input(x)
        if not axes:
            return torch.full_like(x, float("nan") if correction >= 1 else 0.0)
        return torch.var(x, dim=axes, correction=correction, keepdim=keepdims)

    def gradient(self, op, grads):
        return [self._var_grad(op, _kept(op, grads[0]))]


@register
class Std(_Moment):
    name = "std"

    @staticmethod
    def compute(x, axis, keepdims, correction):
        axes = _axes(x, axis)
        x = _float_input(x)
        if not axes:
            return torch.full_like(x, float("nan") if correction >= 1 else 0.0)
        return torch.std(x, dim=axes, correction=correction, keepdim=keepdims)

    def gradient(self, op, grads):
        # d std = d var / (2 std)
        return [self._var_grad(op, _kept(op, grads[0]) / (_kept(op, op.outputs[0]) * 2.0))]


@register
class Norm(_Reduce):
    """Vector p-norm over `axis` (all axes by default): `ord` is a positive number, inf or
    -inf ('fro' means 2)."""

    name = "norm"
    attrs = {"ord": 2.0, "axis": None, "keepdims": False}

    def infer(self, inputs, axis, keepdims, ord):
        valid = isinstance(ord, (int, float)) and not isinstance(ord, bool) and (ord > 0 or ord == -math.inf)
        if not valid:
            raise OpError(f"norm: ord must be a positive number, inf, -inf or 'fro', found {ord!r}")
        return super().infer(inputs, axis, keepdims)

    @staticmethod
    def compute(x, ord, axis, keepdims):
        axes = _axes(x, axis)
        x = _float_input(x)
        if not axes:
            return x.abs()
        return torch.linalg.vector_norm(x, ord, dim=axes, keepdim=keepdims)

    def gradient(self, op, grads):
        x = op.inputs[0]
        p = op.attrs["ord"]
        g, out = _kept(op, grads[0]), _kept(op, op.outputs[0])
        if p in (math.inf, -math.inf):  # the gradient of max|x| (min|x|), ties share it
            hit = apply("equal", apply("abs", x), out)
            ties = apply("sum", apply("cast", hit, dtype=g.dtype), axis=op.attrs["axis"], keepdims=True)
            return [apply("where", hit, g * apply("sign", x) / ties, 0.0)]
        if p == 1:
            return [g * apply("sign", x)]
        # d |x|_p = sign(x) |x|^(p-1) / |x|_p^(p-1); torch takes 0 where the norm is 0.
        is_zero = apply("equal", out, 0.0)
        safe = apply("where", is_zero, 1.0, out)
        scale = apply("where", is_zero, 0.0, g / safe if p == 2 else g / safe ** (p - 1))
        if p == 2:
            return [scale * x]
        return [scale * apply("sign", x) * apply("abs", x) ** (p - 1)]


@register
class Logsumexp(_Reduce):
    name = "logsumexp"

    @staticmethod
    def compute(x, axis, keepdims):
        axes = _axes(x, axis)
        x = _float_input(x)
        return torch.logsumexp(x, dim=axes, keepdim=keepdims) if axes else x.clone()

    def gradient(self, op, grads):
        x = op.inputs[0]
        return [_kept(op, grads[0]) * apply("exp", x - _kept(op, op.outputs[0]))]


class _ArgReduce(OpDef):
    """Index of the max / min along one axis; `axis=None` indexes the flattened tensor."""

    attrs = {"axis": None, "keepdims": False}
    differentiable = False

    def infer(self, inputs, axis, keepdims):
        x, = inputs
        if axis is None:
            shape = (1,) * x.ndim if keepdims else ()
        else:
            a = normalize_axis(self.name, axis, x.ndim)
            shape = reduced_shape(x.shape, (a,), keepdims)
        return TensorMeta(shape, "int64")


@register
class Argmax(_ArgReduce):
    name = "argmax"

    @staticmethod
    def compute(x, axis, keepdims):
        return torch.argmax(x, dim=axis, keepdim=keepdims)


@register
class Argmin(_ArgReduce):
    name = "argmin"

    @staticmethod
    def compute(x, axis, keepdims):
        return torch.argmin(x, dim=axis, keepdim=keepdims)


@register
class Cumsum(OpDef):
    """Running sum along `axis`; `reverse=True` sums from the end (the gradient of cumsum)."""

    name = "cumsum"
    attrs = {"axis": 0, "reverse": False}
    autocast = "fp32"

    def infer(self, inputs, axis, reverse):
        x, = inputs
        normalize_axis(self.name, axis, x.ndim)
        return TensorMeta(x.shape, "int64" if x.dtype in _SMALL_INTS else x.dtype)

    @staticmethod
    def compute(x, axis, reverse):
        if not reverse:
            return torch.cumsum(x, dim=axis)
        return torch.cumsum(x.flip(axis), dim=axis).flip(axis)

    def gradient(self, op, grads):
        return [apply("cumsum", grads[0], axis=op.attrs["axis"], reverse=not op.attrs["reverse"])]


# --- public functions -------------------------------------------------------------------
def _axis_attr(axis):
    if axis is None or isinstance(axis, int):
        return axis
    return tuple(int(a) for a in axis)


def sum(x, axis=None, keepdims: bool = False):
    return apply("sum", x, axis=_axis_attr(axis), keepdims=keepdims)


def mean(x, axis=None, keepdims: bool = False):
    return apply("mean", x, axis=_axis_attr(axis), keepdims=keepdims)


def max(x, axis=None, keepdims: bool = False):
    """The largest values over `axis` (values only, like NumPy; see `argmax` for indices)."""
    return apply("max", x, axis=_axis_attr(axis), keepdims=keepdims)


def min(x, axis=None, keepdims: bool = False):
    return apply("min", x, axis=_axis_attr(axis), keepdims=keepdims)


def prod(x, axis=None, keepdims: bool = False):
    return apply("prod", x, axis=_axis_attr(axis), keepdims=keepdims)


def var(x, axis=None, keepdims: bool = False, correction: int | None = None, ddof: int | None = None):
    """Variance; `correction` (torch) or `ddof` (NumPy) is subtracted from the count (default 1)."""
    return apply("var", x, axis=_axis_attr(axis), keepdims=keepdims, correction=_correction(correction, ddof))


def std(x, axis=None, keepdims: bool = False, correction: int | None = None, ddof: int | None = None):
    return apply("std", x, axis=_axis_attr(axis), keepdims=keepdims, correction=_correction(correction, ddof))


def _correction(correction, ddof):
    if correction is not None and ddof is not None:
        raise OpError("var/std: give correction or ddof, not both")
    value = correction if correction is not None else ddof
    return 1 if value is None else int(value)


def norm(x, ord=2, axis=None, keepdims: bool = False):
    """Vector norm of the entries over `axis`: ord 2 (default, also 'fro'), 1, inf, -inf or any p > 0."""
    if ord in ("fro", None):
        ord = 2
    if isinstance(ord, str):
        raise OpError(f"norm: ord must be a number, inf or 'fro', found {ord!r}")
    return apply("norm", x, ord=float(ord), axis=_axis_attr(axis), keepdims=keepdims)


def logsumexp(x, axis=None, keepdims: bool = False):
    return apply("logsumexp", x, axis=_axis_attr(axis), keepdims=keepdims)


def argmax(x, axis: int | None = None, keepdims: bool = False):
    return apply("argmax", x, axis=axis, keepdims=keepdims)


def argmin(x, axis: int | None = None, keepdims: bool = False):
    return apply("argmin", x, axis=axis, keepdims=keepdims)


def cumsum(x, axis: int | None = None):
    """Running sum along `axis`; `axis=None` runs over the flattened tensor (NumPy)."""
    if axis is None:
        x = apply("reshape", x, shape=(-1,))
        axis = 0
    return apply("cumsum", x, axis=int(axis))


__all__ = ["argmax", "argmin", "cumsum", "logsumexp", "max", "mean", "min", "norm", "prod", "std",
           "sum", "var"]
