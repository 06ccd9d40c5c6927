"""Shape and indexing operators: reshape, transpose, concat/split, slicing, gather/scatter, pad, ..."""

from __future__ import annotations

import builtins
import math
import numbers

import numpy as np
import torch

from luoshu.core import dtypes
from luoshu.core.errors import DTypeError, GradientError, OpError, ShapeError
from luoshu.core.op import OpDef, apply, register
from luoshu.core.shapes import normalize_axes, normalize_axis, numel, same_dim
from luoshu.core.tensor import IndexedSlices, Tensor, TensorMeta, make_constant
from luoshu.ops import _states
from luoshu.ops._states import Candidate, dup, partial
from luoshu.ops._util import sum_to, wants

aten = torch.ops.aten
_slice = builtins.slice  # this module defines the `slice` operator function


class _IndexOutOfRange(ShapeError, IndexError):
    """Also an IndexError, so Python's iteration over `t[0], t[1], ...` stops at the end."""


def _has_unknown(shape) -> bool:
    return any(d is None for d in shape)


@register
class Reshape(OpDef):
    name = "reshape"
    attrs = {"shape": ()}

    def deduce_states(self, input_ds, _io=None, **attrs):
        if _io is None:
            return super().deduce_states(input_ds)
        n = _states.group_size(input_ds) or 1
        (a,), (b,) = _io.inputs, _io.outputs
        return _states.mapped(self.name, input_ds, len(a), lambda d: _states.reshape_dim(a, b, d, n))

    def local_attrs(self, attrs, input_ds, output_ds, io):
        d = _states.split_dim(output_ds[0])
        if d is not None and attrs["shape"][d] != -1:
            shape = list(attrs["shape"])
            shape[d] //= output_ds[0].device_num
            attrs["shape"] = tuple(shape)
        return attrs

    def infer(self, inputs, shape):
        x, = inputs
        shape = tuple(int(d) for d in shape)
        if sum(d == -1 for d in shape) > 1 or any(d < -1 for d in shape):
            raise self.shape_error(inputs, f"target shape {shape} may hold at most one -1 and no other negatives")
        total = numel(x.shape)
        known = 1
        for d in shape:
            if d != -1:
                known *= d
        if total is None:
            return TensorMeta(tuple(None if d == -1 else d for d in shape), x.dtype)
        if -1 in shape:
            if known == 0 or total % known:
                raise self.shape_error(inputs, f"cannot reshape {total} elements into {shape}")
            shape = tuple(total // known if d == -1 else d for d in shape)
        elif known != total:
            raise self.shape_error(inputs, f"cannot reshape {total} elements into {shape}")
        return TensorMeta(shape, x.dtype)

    @staticmethod
    def compute(x, shape):
        return x.reshape(shape)

    def gradient(self, op, grads):
        return [reshape_like(grads[0], op.inputs[0])]


@register
class ReshapeLike(OpDef):
    """Reshapes `x` to the run-time shape of `like` (gradients of reshapes with `None` dims)."""

    name = "reshape_like"
    shape_inputs = (1,)

    def deduce_states(self, input_ds, _io=None, **attrs):
        """`x` reshaped to `like`'s run-time shape: `like` must hold the split where x's lands."""
        n = _states.group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        a, b = _io.inputs
        whole = _states.WHOLE  # `like` gives only its shape
        cands = [Candidate((dup(n), whole), (dup(n),)), Candidate((partial(n), whole), (partial(n),))]
        for d in range(len(a)):
            o = _states.reshape_dim(a, b, d, n)
            if o is not None:
                cands.append(Candidate((_states.split(n, d), _states.split(n, o)), (_states.split(n, o),)))
        return _states.choose(self.name, cands, input_ds)

    def infer(self, inputs):
        return TensorMeta(inputs[1].shape, inputs[0].dtype)

    @staticmethod
    def compute(x, like):
        return x.reshape(like.shape)

    def gradient(self, op, grads):
        return [reshape_like(grads[0], op.inputs[0]), None]


@register
class ShapeStandIn(OpDef):
    """A one-element stand-in for `x` with x's shape, dtype and device (a stride-0 view of one
    element): what a plan hands an op that reads an input only for its shape
    (`OpDef.shape_inputs`), so the plan frees x's buffer after its last real reader."""

    name = "shape_stand_in"
    differentiable = False
    tested_by = "tests/runtime/test_memory.py"

    def infer(self, inputs):
        return TensorMeta(inputs[0].shape, inputs[0].dtype)

    @staticmethod
    def compute(x):
        return x.new_empty(()).expand(x.shape)


def reshape_like(x, like):
    if not _has_unknown(like.shape):
        return apply("reshape", x, shape=like.shape)
    return apply("reshape_like", x, like)


@register
class Flatten(OpDef):
    """Axes `start`..`end` merged into one; unlike `reshape`, any number of the other dims may
    be `None` (a batch and a sequence length both fed at run time)."""

    name = "flatten"
    attrs = {"start": 0, "end": -1}

    def infer(self, inputs, start, end):
        x, = inputs
        a, b = normalize_axis(self.name, start, x.ndim), normalize_axis(self.name, end, x.ndim)
        if a > b:
            raise self.shape_error(inputs, f"start axis {start} comes after end axis {end}")
        return TensorMeta(x.shape[:a] + (numel(x.shape[a:b + 1]),) + x.shape[b + 1:], x.dtype)

    def deduce_states(self, input_ds, _io=None, start=0, end=-1, **attrs):
        if _io is None:
            return super().deduce_states(input_ds)
        ndim = len(_io.inputs[0])
        a, b = normalize_axis(self.name, start, ndim), normalize_axis(self.name, end, ndim)
        # a split of the first merged dim stays one contiguous block of the merged dim
        return _states.mapped(self.name, input_ds, ndim, lambda d: d if d <= a else (d - (b - a) if d > b else None))

    @staticmethod
    def compute(x, start, end):
        return x.flatten(start, end)

    def gradient(self, op, grads):
        return [reshape_like(grads[0], op.inputs[0])]


@register
class Unflatten(OpDef):
    """Axis `axis` split into `sizes` (at most one -1, inferred); the other dims may be `None`."""

    name = "unflatten"
    attrs = {"axis": 0, "sizes": ()}

    def infer(self, inputs, axis, sizes):
        x, = inputs
        a = normalize_axis(self.name, axis, x.ndim)
        sizes = tuple(int(d) for d in sizes)
        if not sizes or sum(d == -1 for d in sizes) > 1 or any(d < -1 for d in sizes):
            raise self.shape_error(inputs, f"sizes {sizes} must be non-empty with at most one -1 and no other "
                                           "negatives")
        known = math.prod(d for d in sizes if d != -1)
        n = x.shape[a]
        if n is None:
            out = tuple(None if d == -1 else d for d in sizes)
        elif -1 in sizes:
            if known == 0 or n % known:
                raise self.shape_error(inputs, f"axis {axis} of size {n} cannot split into {sizes}")
            out = tuple(n // known if d == -1 else d for d in sizes)
        elif known != n:
            raise self.shape_error(inputs, f"axis {axis} of size {n} cannot split into {sizes}")
        else:
            out = sizes
        return TensorMeta(x.shape[:a] + out + x.shape[a + 1:], x.dtype)

    def deduce_states(self, input_ds, _io=None, axis=0, sizes=(), **attrs):
        if _io is None:
            return super().deduce_states(input_ds)
        ndim = len(_io.inputs[0])
        a = normalize_axis(self.name, axis, ndim)
        n = _states.group_size(input_ds) or 1
        first = _io.outputs[0][a]  # a split of the unflattened axis lands on its first new dim
        lands = first is None or first % n == 0

        def dim_map(d):
            if d == a:
                return a if lands else None
            return d if d < a else d + len(sizes) - 1

        return _states.mapped(self.name, input_ds, ndim, dim_map)

    def local_attrs(self, attrs, input_ds, output_ds, io):
        d = _states.split_dim(output_ds[0])
        a = normalize_axis(self.name, attrs["axis"], len(io.inputs[0]))
        if d == a and attrs["sizes"][0] != -1:
            attrs["sizes"] = (attrs["sizes"][0] // output_ds[0].device_num,) + tuple(attrs["sizes"][1:])
        return attrs

    @staticmethod
    def compute(x, axis, sizes):
        return x.unflatten(axis, sizes)

    def gradient(self, op, grads):
        return [reshape_like(grads[0], op.inputs[0])]


@register
class Unsqueeze(OpDef):
    name = "unsqueeze"
    attrs = {"axis": 0}

    def deduce_states(self, input_ds, _io=None, axis=0, **attrs):
        if _io is None:
            return super().deduce_states(input_ds)
        ndim = len(_io.inputs[0])
        a = normalize_axis(self.name, axis, ndim + 1)
        return _states.mapped(self.name, input_ds, ndim, lambda d: d if d < a else d + 1)

    def infer(self, inputs, axis):
        x, = inputs
        axis = normalize_axis(self.name, axis, x.ndim + 1)
        return TensorMeta(x.shape[:axis] + (1,) + x.shape[axis:], x.dtype)

    @staticmethod
    def compute(x, axis):
        return x.unsqueeze(axis)

    def gradient(self, op, grads):
        return [apply("squeeze", grads[0], axis=op.attrs["axis"])]


@register
class Squeeze(OpDef):
    name = "squeeze"
    attrs = {"axis": None}

    def deduce_states(self, input_ds, _io=None, axis=None, **attrs):
        if _io is None:
            return super().deduce_states(input_ds)
        shape = _io.inputs[0]
        if axis is None:
            gone = {i for i, d in enumerate(shape) if d == 1}
        else:
            gone = {normalize_axis(self.name, a, len(shape)) for a in ((axis,) if isinstance(axis, int) else axis)}
        return _states.mapped(self.name, input_ds, len(shape),
                              lambda d: None if d in gone else d - len([g for g in gone if g < d]))

    def infer(self, inputs, axis):
        x, = inputs
        if axis is None:
            if _has_unknown(x.shape):
                raise self.shape_error(inputs, "squeeze without an axis needs a fully known shape")
            return TensorMeta(tuple(d for d in x.shape if d != 1), x.dtype)
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        axes = {normalize_axis(self.name, a, x.ndim) for a in axes}
        for a in axes:
            if x.shape[a] not in (1, None):
                raise self.shape_error(inputs, f"cannot squeeze axis {a} of size {x.shape[a]}")
        return TensorMeta(tuple(d for i, d in enumerate(x.shape) if i not in axes), x.dtype)

    @staticmethod
    def compute(x, axis):
        return x.squeeze() if axis is None else x.squeeze(axis)

    def gradient(self, op, grads):
        return [reshape_like(grads[0], op.inputs[0])]


@register
class Concat(OpDef):
    name = "concat"
    attrs = {"axis": 0}

    def deduce_states(self, input_ds, _io=None, axis=0, **attrs):
        """All inputs in the same states, split on any dim but the joined one (or all partial)."""
        n = _states.group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        out = _io.outputs[0]
        axis = normalize_axis(self.name, axis, len(out))
        k = len(input_ds)
        cands = [Candidate((dup(n),) * k, (dup(n),)), Candidate((partial(n),) * k, (partial(n),))]
        cands += [Candidate((_states.split(n, d),) * k, (_states.split(n, d),)) for d, size in enumerate(out)
                  if d != axis and (_states.divisible(size, n) or any(_states.split_dim(x) == d for x in input_ds))]
        return _states.choose(self.name, cands, input_ds)

    def infer(self, inputs, axis):
        first = inputs[0]
        axis = normalize_axis(self.name, axis, first.ndim)
        size = 0
        for t in inputs:
            if t.ndim != first.ndim or any(
                i != axis and not same_dim(d, e) for i, (d, e) in enumerate(zip(t.shape, first.shape))
            ):
                raise self.shape_error(inputs, f"all inputs must match except on axis {axis}")
            size = None if size is None or t.shape[axis] is None else size + t.shape[axis]
        shape = list(first.shape)
        shape[axis] = size
        return TensorMeta(tuple(shape), dtypes.promote(*[t.dtype for t in inputs]))

    @staticmethod
    def compute(*values, axis):
        return torch.cat(values, dim=axis)

    def gradient(self, op, grads):
        axis = op.attrs["axis"]
        sizes = [t.shape[axis] for t in op.inputs]
        if any(s is None for s in sizes):
            return [apply("slice_like", grads[0], *op.inputs, index=i, axis=axis) for i in range(len(sizes))]
        pieces = apply("split", grads[0], sizes=tuple(sizes), axis=axis)
        return list(pieces) if isinstance(pieces, tuple) else [pieces]


@register
class IndexAdd(OpDef):
    """`x` with `values[i]` added at position `indices[i]` along `axis` (repeats accumulate)."""

    name = "index_add"
    attrs = {"axis": 0}

    def deduce_states(self, input_ds, _io=None, axis=0, **attrs):
        """x and values split alike on a dim other than `axis`, or all partial; a table split
        along `axis` (a row-split table) keeps the rows it owns (see `localize`)."""
        n = _states.group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        x_shape, _, v_shape = _io.inputs
        axis = normalize_axis(self.name, axis, len(x_shape))
        cands = [Candidate((dup(n), dup(n), dup(n)), (dup(n),)),
                 Candidate((partial(n), dup(n), partial(n)), (partial(n),))]
        if _states.divisible(x_shape[axis], n) and axis == 0:
            cands.append(Candidate((_states.split(n, 0), dup(n), dup(n)), (_states.split(n, 0),)))
        for d, size in enumerate(x_shape):
            if d != axis and _states.divisible(size, n):
                cands.append(Candidate((_states.split(n, d), dup(n), _states.split(n, d)), (_states.split(n, d),)))
        return _states.choose(self.name, cands, input_ds)

    def localize(self, inputs, attrs, input_ds, output_ds, shard):
        x, indices, values = inputs
        if _states.split_dim(input_ds[0]) != 0 or attrs["axis"] != 0:
            return apply(self.name, x, indices, values, **attrs)
        rows = x.shape[0]
        indices, values = apply("shard_rows", indices, values, start=shard.index * rows, rows=rows)
        return apply(self.name, x, indices, values, **attrs)

    def infer(self, inputs, axis):
        x, indices, values = inputs
        _check_indices(self, inputs, indices)
        return TensorMeta(x.shape, x.dtype)

    @staticmethod
    def compute(x, indices, values, axis):
        return x.index_add(axis, indices, values.to(x.dtype))

    def gradient(self, op, grads):
        g, = grads
        return [g, None, apply("index_select", g, op.inputs[1], axis=op.attrs["axis"])]


@register
class SparseToDense(OpDef):
    """Densifies IndexedSlices: a `(num_rows, ...)` table of zeros with the rows added in."""

    name = "sparse_to_dense"
    attrs = {"num_rows": 0}

    def infer(self, inputs, num_rows):
        indices, values = inputs
        _check_indices(self, inputs, indices)
        return TensorMeta((num_rows,) + values.shape[1:], values.dtype)

    @staticmethod
    def compute(indices, values, num_rows):
        out = values.new_zeros((num_rows,) + values.shape[1:])
        return out.index_add_(0, indices, values)

    def gradient(self, op, grads):
        return [None, apply("index_select", grads[0], op.inputs[0], axis=0)]


# --- axes ---------------------------------------------------------------------------------
@register
class Transpose(OpDef):
    """Swaps two axes (the last two by default)."""

    name = "transpose"
    attrs = {"axis0": -2, "axis1": -1}

    def deduce_states(self, input_ds, _io=None, axis0=-2, axis1=-1, **attrs):
        if _io is None:
            return super().deduce_states(input_ds)
        ndim = len(_io.inputs[0])
        a, b = normalize_axis(self.name, axis0, ndim), normalize_axis(self.name, axis1, ndim)
        return _states.mapped(self.name, input_ds, ndim, lambda d: b if d == a else a if d == b else d)

    def infer(self, inputs, axis0, axis1):
        x, = inputs
        a, b = normalize_axis(self.name, axis0, x.ndim), normalize_axis(self.name, axis1, x.ndim)
        shape = list(x.shape)
        shape[a], shape[b] = shape[b], shape[a]
        return TensorMeta(tuple(shape), x.dtype)

    @staticmethod
    def compute(x, axis0, axis1):
        return x.transpose(axis0, axis1)

    def gradient(self, op, grads):
        return [apply("transpose", grads[0], **op.attrs)]


@register
class Permute(OpDef):
    """Reorders the axes: output axis i is input axis `axes[i]`."""

    name = "permute"
    attrs = {"axes": ()}

    def deduce_states(self, input_ds, _io=None, axes=(), **attrs):
        if _io is None:
            return super().deduce_states(input_ds)
        ndim = len(_io.inputs[0])
        norm = [normalize_axis(self.name, a, ndim) for a in axes]
        return _states.mapped(self.name, input_ds, ndim, norm.index)

    def infer(self, inputs, axes):
        x, = inputs
        norm = [normalize_axis(self.name, a, x.ndim) for a in axes]
        if sorted(norm) != list(range(x.ndim)):
            raise self.shape_error(inputs, f"axes {tuple(axes)} are not a permutation of the {x.ndim} axes")
        return TensorMeta(tuple(x.shape[a] for a in norm), x.dtype)

    @staticmethod
    def compute(x, axes):
        return x.permute(axes)

    def gradient(self, op, grads):
        ndim = op.inputs[0].ndim
        axes = [a % ndim for a in op.attrs["axes"]]
        inverse = tuple(sorted(range(ndim), key=axes.__getitem__))
        return [apply("permute", grads[0], axes=inverse)]


@register
class BroadcastTo(OpDef):
    """Broadcasts to `shape` (NumPy rules; -1 keeps the input's dimension, as torch.expand)."""

    name = "broadcast_to"
    attrs = {"shape": ()}

    def deduce_states(self, input_ds, _io=None, **attrs):
        if _io is None:
            return super().deduce_states(input_ds)
        a, b = _io.inputs[0], _io.outputs[0]
        lead = len(b) - len(a)
        return _states.mapped(self.name, input_ds, len(a), lambda d: d + lead if a[d] != 1 else None)

    def local_attrs(self, attrs, input_ds, output_ds, io):
        d = _states.split_dim(output_ds[0])
        if d is not None and attrs["shape"][d] != -1:
            shape = list(attrs["shape"])
            shape[d] //= output_ds[0].device_num
            attrs["shape"] = tuple(shape)
        return attrs

    def infer(self, inputs, shape):
        x, = inputs
        lead = len(shape) - x.ndim
        if lead < 0:
            raise self.shape_error(inputs, f"cannot broadcast to the lower-rank shape {tuple(shape)}")
        out = []
        for i, d in enumerate(shape):
            src = x.shape[i - lead] if i >= lead else 1
            if d == -1:
                if i < lead:
                    raise self.shape_error(inputs, f"-1 in target shape {tuple(shape)} at a new leading axis")
                d = src
            elif src not in (1, None) and src != d:
                raise self.shape_error(inputs, f"cannot broadcast to {tuple(shape)}: axis {i} is {src}")
            out.append(d)
        return TensorMeta(tuple(out), x.dtype)

    @staticmethod
    def compute(x, shape):
        return x.expand(shape)

    def gradient(self, op, grads):
        return [sum_to(grads[0], op.inputs[0])]


# --- joining and splitting ------------------------------------------------------------
@register
class Stack(OpDef):
    name = "stack"
    attrs = {"axis": 0}

    def infer(self, inputs, axis):
        first = inputs[0]
        axis = normalize_axis(self.name, axis, first.ndim + 1)
        for t in inputs:
            if t.ndim != first.ndim or not all(same_dim(d, e) for d, e in zip(t.shape, first.shape)):
                raise self.shape_error(inputs, "all inputs must have the same shape")
        shape = tuple(next((t.shape[i] for t in inputs if t.shape[i] is not None), None)
                      for i in range(first.ndim))
        return TensorMeta(shape[:axis] + (len(inputs),) + shape[axis:],
                          dtypes.promote(*[t.dtype for t in inputs]))

    @staticmethod
    def compute(*values, axis):
        return torch.stack(values, dim=axis)

    def gradient(self, op, grads):
        axis = op.attrs["axis"]
        n = len(op.inputs)
        pieces = apply("split", grads[0], sizes=(1,) * n, axis=axis)
        pieces = pieces if isinstance(pieces, tuple) else (pieces,)
        return [apply("squeeze", p, axis=axis) if wants(op, i) else None for i, p in enumerate(pieces)]


def _section_sizes(n: int, sections: int) -> tuple[int, ...]:
    """numpy.array_split's sizes: the first `n % sections` pieces are one longer."""
    base, extra = divmod(n, sections)
    return tuple(base + 1 if i < extra else base for i in range(sections))


@register
class Split(OpDef):
    """Cuts `x` along `axis` into pieces of the given `sizes`, or into `sections` near-equal
    pieces (numpy.array_split); one output per piece."""

    name = "split"
    attrs = {"sizes": (), "sections": 0, "axis": 0}

    def deduce_states(self, input_ds, _io=None, axis=0, **attrs):
        if _io is None:
            return super().deduce_states(input_ds)
        ndim = len(_io.inputs[0])
        a = normalize_axis(self.name, axis, ndim)
        return _states.mapped(self.name, input_ds, ndim, lambda d: None if d == a else d, outputs=len(_io.outputs))

    def infer(self, inputs, sizes, sections, axis):
        x, = inputs
        axis = normalize_axis(self.name, axis, x.ndim)
        n = x.shape[axis]
        if bool(sizes) == bool(sections):
            raise self.shape_error(inputs, "give either sizes or a number of sections")
        if sections:
            sizes = _section_sizes(n, sections) if n is not None else (None,) * sections
        elif any(s < 0 for s in sizes) or (n is not None and sum(sizes) != n):
            raise self.shape_error(inputs, f"sizes {tuple(sizes)} must add up to axis {axis} (size {n})")
        return [TensorMeta(x.shape[:axis] + (s,) + x.shape[axis + 1:], x.dtype) for s in sizes]

    @staticmethod
    def compute(x, sizes, sections, axis):
        pieces = torch.split(x, list(sizes), dim=axis) if sizes else torch.tensor_split(x, sections, dim=axis)
        return pieces[0] if len(pieces) == 1 else pieces

    def gradient(self, op, grads):
        dtype = next(g.dtype for g in grads if g is not None)
        pieces = [g if g is not None else apply("zeros_like", out, dtype=dtype)
                  for g, out in zip(grads, op.outputs)]
        return [apply("concat", *pieces, axis=op.attrs["axis"])]


@register
class SliceLike(OpDef):
    """Piece `index` of `x` cut along `axis` as the concat of `tensors` was joined: the
    gradient of a concat whose sizes are known only at run time."""

    name = "slice_like"
    attrs = {"index": 0, "axis": 0}

    def infer(self, inputs, index, axis):
        x, parts = inputs[0], inputs[1:]
        if not 0 <= index < len(parts):
            raise self.shape_error(inputs, f"index {index} is out of range for {len(parts)} pieces")
        axis = normalize_axis(self.name, axis, x.ndim)
        return TensorMeta(x.shape[:axis] + (parts[index].shape[axis],) + x.shape[axis + 1:], x.dtype)

    @staticmethod
    def compute(x, *parts, index, axis):
        start = sum(p.shape[axis] for p in parts[:index])
        return x.narrow(axis, start, parts[index].shape[axis])

    def gradient(self, op, grads):
        g, = grads
        index = op.attrs["index"]
        parts = op.inputs[1:]
        pieces = [g if j == index else apply("zeros_like", p, dtype=g.dtype) for j, p in enumerate(parts)]
        return [apply("concat", *pieces, axis=op.attrs["axis"])] + [None] * len(parts)


# --- slicing ------------------------------------------------------------------------------
def _whole_axis(shape, d: int, attrs) -> bool:
    """Whether a slice keeps axis `d` whole (start 0, stop past the end, step 1)."""
    if d >= len(attrs["starts"]):
        return True
    a, b, s = attrs["starts"][d], attrs["stops"][d], attrs["steps"][d]
    return a in (None, 0) and s in (None, 1) and (b is None or (shape[d] is not None and b >= shape[d]))


def _whole_axis_local(attrs, ds) -> dict:
    d = _states.split_dim(ds)
    if d is not None and d < len(attrs["stops"]):
        stops = list(attrs["stops"])
        stops[d] = None  # the whole local block
        attrs["stops"] = tuple(stops)
    return attrs


def _slice_plan(shape, starts, stops, steps):
    """The forward-step torch index for a basic slice, and the axes to flip first
    (torch indexing has no negative steps: walk the flipped axis forwards instead)."""
    index, flips = [], []
    for axis, (a, b, s) in enumerate(zip(starts, stops, steps)):
        if s is not None and s < 0:
            n = shape[axis]
            a, b, s = _slice(a, b, s).indices(n)
            flips.append(axis)
            index.append(_slice(n - 1 - a, n - 1 - b, -s))
        else:
            index.append(_slice(a, b, s))
    return tuple(index), flips


@register
class Slice(OpDef):
    """`x[starts[i]:stops[i]:steps[i], ...]` over the leading axes (None = the default;
    negative steps walk backwards, as in Python)."""

    name = "slice"
    attrs = {"starts": (), "stops": (), "steps": ()}

    def deduce_states(self, input_ds, _io=None, **attrs):
        """A split survives on axes the slice keeps whole; partial passes (slicing is linear)."""
        if _io is None:
            return super().deduce_states(input_ds)
        shape = _io.inputs[0]
        return _states.mapped(self.name, input_ds, len(shape),
                              lambda d: d if _whole_axis(shape, d, attrs) else None)

    def local_attrs(self, attrs, input_ds, output_ds, io):
        return _whole_axis_local(attrs, input_ds[0])

    def infer(self, inputs, starts, stops, steps):
        x, = inputs
        if not len(starts) == len(stops) == len(steps) or len(starts) > x.ndim:
            raise self.shape_error(inputs, f"starts {starts}, stops {stops} and steps {steps} need one entry "
                                           f"per sliced axis, at most {x.ndim}")
        shape = list(x.shape)
        for axis, (a, b, s) in enumerate(zip(starts, stops, steps)):
            if s == 0:
                raise self.shape_error(inputs, f"slice step of axis {axis} is 0")
            if shape[axis] is not None:
                shape[axis] = len(range(*_slice(a, b, s).indices(shape[axis])))
        return TensorMeta(tuple(shape), x.dtype)

    @staticmethod
    def compute(x, starts, stops, steps):
        index, flips = _slice_plan(x.shape, starts, stops, steps)
        return (x.flip(flips) if flips else x)[index]

    def gradient(self, op, grads):
        return [apply("slice_backward", grads[0], op.inputs[0], **op.attrs)]


@register
class SliceBackward(OpDef):
    """Zeros shaped like `like` with `g` written where `slice` read (its gradient)."""

    name = "slice_backward"
    shape_inputs = (1,)
    attrs = {"starts": (), "stops": (), "steps": ()}

    def deduce_states(self, input_ds, _io=None, **attrs):
        n = _states.group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        shape = _io.inputs[1]
        whole = _states.WHOLE  # `like` gives only its shape
        cands = [Candidate((dup(n), whole), (dup(n),)), Candidate((partial(n), whole), (partial(n),))]
        cands += [Candidate((_states.split(n, d), _states.split(n, d)), (_states.split(n, d),))
                  for d in range(len(shape)) if _whole_axis(shape, d, attrs) and (_states.divisible(shape[d], n)
                                                       or _states.split_dim(input_ds[0]) == d)]
        return _states.choose(self.name, cands, input_ds)

    def local_attrs(self, attrs, input_ds, output_ds, io):
        return _whole_axis_local(attrs, output_ds[0])

    def infer(self, inputs, starts, stops, steps):
        return TensorMeta(inputs[1].shape, inputs[0].dtype)

    @staticmethod
    def compute(g, like, starts, stops, steps):
        index, flips = _slice_plan(like.shape, starts, stops, steps)
        out = g.new_zeros(like.shape)
        out[index] = g
        return out.flip(flips) if flips else out

    def gradient(self, op, grads):
        return [apply("slice", grads[0], **op.attrs), None]


# --- gathering and scattering ---------------------------------------------------------------
@register
class IndexSelect(OpDef):
    """The entries of `x` at positions `index` (1-D) along `axis`."""

    name = "index_select"
    attrs = {"axis": 0}

    def infer(self, inputs, axis):
        x, index = inputs
        _check_indices(self, inputs, index)
        axis = normalize_axis(self.name, axis, x.ndim)
        return TensorMeta(x.shape[:axis] + index.shape + x.shape[axis + 1:], x.dtype)

    @staticmethod
    def compute(x, index, axis):
        return torch.index_select(x, axis, index)

    def gradient(self, op, grads):
        x, index = op.inputs
        return [apply("index_add", apply("zeros_like", x, dtype=grads[0].dtype), index, grads[0],
                      axis=op.attrs["axis"]), None]


def _check_same_rank(opdef, inputs, *tensors):
    index = tensors[1]
    if not dtypes.is_integer(index.dtype):
        raise DTypeError(f"{opdef.name}: index must be integers, found {index.dtype}")
    if any(t.ndim != tensors[0].ndim for t in tensors):
        raise opdef.shape_error(inputs, "input, index (and src) must have the same rank")


@register
class Gather(OpDef):
    """torch.gather: `out[i][j] = x[index[i][j]][j]` for axis 0, and so on."""

    name = "gather"
    attrs = {"axis": 0}

    def infer(self, inputs, axis):
        x, index = inputs
        _check_same_rank(self, inputs, x, index)
        normalize_axis(self.name, axis, x.ndim)
        return TensorMeta(index.shape, x.dtype)

    @staticmethod
    def compute(x, index, axis):
        return torch.gather(x, axis, index)

    def gradient(self, op, grads):
        x, index = op.inputs
        zeros = apply("zeros_like", x, dtype=grads[0].dtype)
        return [apply("scatter_add", zeros, index, grads[0], axis=op.attrs["axis"]), None]


@register
class ScatterAdd(OpDef):
    """torch.scatter_add: `x` with `src[i][j]` added at `[index[i][j]][j]` for axis 0, ..."""

    name = "scatter_add"
    attrs = {"axis": 0}

    def infer(self, inputs, axis):
        x, index, src = inputs
        _check_same_rank(self, inputs, x, index, src)
        normalize_axis(self.name, axis, x.ndim)
        return TensorMeta(x.shape, x.dtype)

    @staticmethod
    def compute(x, index, src, axis):
        return x.scatter_add(axis, index, src.to(x.dtype))

    def gradient(self, op, grads):
        g, = grads
        x, index, src = op.inputs
        gsrc = None
        if wants(op, 2):
            gsrc = apply("gather", g, index, axis=op.attrs["axis"])
            if index.shape != src.shape:  # torch reads only the index-shaped corner of src
                if _has_unknown(index.shape) or _has_unknown(src.shape):
                    raise GradientError("scatter_add: the gradient for a src larger than index needs "
                                        "known shapes")
                pads = []
                for d_src, d_index in reversed(list(zip(src.shape, index.shape))):
                    pads += [0, d_src - d_index]
                gsrc = apply("pad", gsrc, pad=tuple(pads))
        return [g if wants(op, 0) else None, None, gsrc]


# --- padding, repeating, flipping, triangles ---------------------------------------------
_PAD_MODES = ("constant", "reflect", "replicate")


@register
class Pad(OpDef):
    """torch.nn.functional.pad: `pad` = (last-axis before, after, next axis before, after, ...)."""

    name = "pad"
    attrs = {"pad": (), "mode": "constant", "value": 0.0}

    def infer(self, inputs, pad, mode, value):
        x, = inputs
        if mode not in _PAD_MODES:
            raise OpError(f"pad: mode must be one of {_PAD_MODES}, found {mode!r}")
        if len(pad) % 2 or len(pad) > 2 * x.ndim:
            raise self.shape_error(inputs, f"pad {tuple(pad)} needs (before, after) pairs for at most {x.ndim} axes")
        shape = list(x.shape)
        for i in range(len(pad) // 2):
            axis = x.ndim - 1 - i
            if shape[axis] is not None:
                shape[axis] += pad[2 * i] + pad[2 * i + 1]
                if shape[axis] < 0:
                    raise self.shape_error(inputs, f"pad {tuple(pad)} crops axis {axis} below size 0")
        return TensorMeta(tuple(shape), x.dtype)

    @staticmethod
    def compute(x, pad, mode, value):
        return torch.nn.functional.pad(x, list(pad), mode, value if mode == "constant" else None)

    def gradient(self, op, grads):
        pad, mode = op.attrs["pad"], op.attrs["mode"]
        if mode == "constant":  # negative padding crops
            return [apply("pad", grads[0], pad=tuple(-p for p in pad))]
        return [apply("pad_backward", grads[0], op.inputs[0], pad=pad, mode=mode)]


@register
class PadBackward(OpDef):
    """The gradient of reflect / replicate padding: each output cell adds into its source."""

    name = "pad_backward"
    attrs = {"pad": (), "mode": "reflect"}

    def infer(self, inputs, pad, mode):
        return TensorMeta(inputs[1].shape, inputs[0].dtype)

    @staticmethod
    def compute(g, like, pad, mode):
        kernel = getattr(aten, f"{'reflection' if mode == 'reflect' else 'replication'}_pad{len(pad) // 2}d_backward")
        return kernel(g, like.to(g.dtype), list(pad))

    def gradient(self, op, grads):
        return [apply("pad", grads[0], pad=op.attrs["pad"], mode=op.attrs["mode"]), None]


@register
class Repeat(OpDef):
    """torch.Tensor.repeat: tiles `x` `repeats[i]` times along axis i (extra leading repeats
    add axes)."""

    name = "repeat"
    attrs = {"repeats": ()}

    def deduce_states(self, input_ds, _io=None, repeats=(), **attrs):
        """Tiling keeps a split only on axes repeated once (a tiled split is not one block)."""
        if _io is None:
            return super().deduce_states(input_ds)
        ndim = len(_io.inputs[0])
        lead = len(repeats) - ndim
        return _states.mapped(self.name, input_ds, ndim, lambda d: d + lead if repeats[d + lead] == 1 else None)

    def infer(self, inputs, repeats):
        x, = inputs
        if len(repeats) < x.ndim or any(r < 0 for r in repeats):
            raise self.shape_error(inputs, f"repeats {tuple(repeats)} need one non-negative count per axis")
        shape = (1,) * (len(repeats) - x.ndim) + x.shape
        return TensorMeta(tuple(None if d is None else d * r for d, r in zip(shape, repeats)), x.dtype)

    @staticmethod
    def compute(x, repeats):
        return x.repeat(*repeats)

    def gradient(self, op, grads):
        return [apply("repeat_backward", grads[0], op.inputs[0], **op.attrs)]


@register
class RepeatBackward(OpDef):
    """Sums the tiles of a repeated gradient back onto the shape of `like`."""

    name = "repeat_backward"
    attrs = {"repeats": ()}

    def deduce_states(self, input_ds, _io=None, repeats=(), **attrs):
        n = _states.group_size(input_ds)
        if n is None or n == 1 or _io is None:
            return super().deduce_states(input_ds)
        ndim = len(_io.inputs[1])
        lead = len(repeats) - ndim
        whole = _states.WHOLE  # `like` gives only its shape
        cands = [Candidate((dup(n), whole), (dup(n),)), Candidate((partial(n), whole), (partial(n),))]
        cands += [Candidate((_states.split(n, d + lead), _states.split(n, d)), (_states.split(n, d),))
                  for d in range(ndim) if repeats[d + lead] == 1 and _states.divisible(_io.inputs[1][d], n)]
        return _states.choose(self.name, cands, input_ds)

    def infer(self, inputs, repeats):
        return TensorMeta(inputs[1].shape, inputs[0].dtype)

    @staticmethod
    def compute(g, like, repeats):
        shape = (1,) * (len(repeats) - like.ndim) + tuple(like.shape)
        tiled = [n for r, d in zip(repeats, shape) for n in (r, d)]
        return g.reshape(tiled).sum(dim=tuple(range(0, len(tiled), 2))).reshape(like.shape)

    def gradient(self, op, grads):
        return [apply("repeat", grads[0], **op.attrs), None]


@register
class Flip(OpDef):
    name = "flip"
    attrs = {"axes": ()}

    def infer(self, inputs, axes):
        x, = inputs
        normalize_axes(self.name, axes, x.ndim)
        return TensorMeta(x.shape, x.dtype)

    @staticmethod
    def compute(x, axes):
        return x.flip(axes)

    def gradient(self, op, grads):
        return [apply("flip", grads[0], **op.attrs)]


class _Triangle(OpDef):
    attrs = {"k": 0}

    def infer(self, inputs, k):
        x, = inputs
        if x.ndim < 2:
            raise self.shape_error(inputs, "needs rank >= 2 (a matrix or a batch of them)")
        return TensorMeta(x.shape, x.dtype)

    def gradient(self, op, grads):
        return [apply(self.name, grads[0], **op.attrs)]


@register
class Tril(_Triangle):
    """The lower triangle (on and below diagonal `k`); the rest is zero."""

    name = "tril"

    @staticmethod
    def compute(x, k):
        return torch.tril(x, k)


@register
class Triu(_Triangle):
    """The upper triangle (on and above diagonal `k`); the rest is zero."""

    name = "triu"

    @staticmethod
    def compute(x, k):
        return torch.triu(x, k)


@register
class OneHot(OpDef):
    """int64 one-hot vectors along a new last axis; `num_classes=-1` means max(index) + 1,
    known only at run time."""

    name = "one_hot"
    attrs = {"num_classes": -1}
    differentiable = False

    def infer(self, inputs, num_classes):
        x, = inputs
        if not dtypes.is_integer(x.dtype):
            raise DTypeError(f"one_hot: indices must be integers, found {x.dtype}")
        return TensorMeta(x.shape + (None if num_classes == -1 else num_classes,), "int64")

    @staticmethod
    def compute(x, num_classes):
        return torch.nn.functional.one_hot(x.to(torch.int64), num_classes)


def _check_indices(opdef, inputs, indices):
    if not dtypes.is_integer(indices.dtype):
        raise DTypeError(f"{opdef.name}: indices must be integers, found {indices.dtype}")
    if indices.ndim != 1:
        raise ShapeError(f"{opdef.name}: indices must be 1-D, found shape {indices.shape}")


def reshape(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return apply("reshape", x, shape=tuple(int(d) for d in shape))


def flatten(x, start: int = 0, end: int = -1):
    """Axes start..end (inclusive) merged into one, as `torch.flatten`."""
    return apply("flatten", x, start=int(start), end=int(end))


def unflatten(x, axis: int, sizes):
    """Axis `axis` split into `sizes`, as `torch.unflatten`."""
    return apply("unflatten", x, axis=int(axis), sizes=tuple(int(d) for d in sizes))


def unsqueeze(x, axis: int):
    return apply("unsqueeze", x, axis=axis)


def squeeze(x, axis=None):
    return apply("squeeze", x, axis=axis)


def concat(tensors, axis: int = 0):
    return apply("concat", *tensors, axis=axis)


def index_add(x, indices, values, axis: int = 0):
    return apply("index_add", x, indices, values, axis=axis)


def sparse_to_dense(slices: IndexedSlices):
    return slices.to_dense()


def _ints(values) -> tuple[int, ...]:
    """`f(x, 1, 2)` and `f(x, (1, 2))` alike."""
    if len(values) == 1 and isinstance(values[0], (tuple, list, torch.Size)):
        values = values[0]
    return tuple(int(v) for v in values)


def transpose(x, *axes):
    """Two axes swap them (torch; the last two by default); a permutation, as a tuple or as
    more than two axes, reorders the axes (NumPy's `x.transpose((1, 0, 2))`)."""
    if not axes:
        return x if x.ndim < 2 else apply("transpose", x)
    if len(axes) == 2 and all(isinstance(a, numbers.Integral) for a in axes):
        return apply("transpose", x, axis0=int(axes[0]), axis1=int(axes[1]))
    return apply("permute", x, axes=_ints(axes))


def permute(x, *axes):
    return apply("permute", x, axes=_ints(axes))


def broadcast_to(x, *shape):
    return apply("broadcast_to", x, shape=_ints(shape))


def stack(tensors, axis: int = 0):
    return apply("stack", *tensors, axis=axis)


def split(x, sizes_or_sections, axis: int = 0):
    """A list of sizes cuts pieces of those sizes (torch.split); a number cuts that many
    near-equal pieces (numpy.array_split). Returns a tuple."""
    if isinstance(sizes_or_sections, int):
        out = apply("split", x, sections=sizes_or_sections, axis=axis)
    else:
        out = apply("split", x, sizes=tuple(int(s) for s in sizes_or_sections), axis=axis)
    return out if isinstance(out, tuple) else (out,)


def slice(x, starts=(), stops=(), steps=None):
    """`x[starts[0]:stops[0]:steps[0], starts[1]:...]` over the leading axes."""
    steps = (None,) * len(starts) if steps is None else steps
    return apply("slice", x, starts=tuple(starts), stops=tuple(stops), steps=tuple(steps))


def _index_tensor(item, x, axis):
    """A 1-D (or 0-d) integer index tensor from a Tensor, array, list or torch tensor."""
    if isinstance(item, Tensor):
        t = item
    else:
        value = np.asarray(item.cpu()) if isinstance(item, torch.Tensor) else np.asarray(item)
        if value.dtype == bool:
            if value.ndim != 1:
                raise ShapeError(f"getitem: a boolean mask must be 1-D, found shape {value.shape}")
            value = np.nonzero(value)[0]
        if value.size == 0:
            value = value.astype(np.int64)
        if not np.issubdtype(value.dtype, np.integer):
            raise DTypeError(f"getitem: index arrays must hold integers, found {value.dtype}")
        n = x.shape[axis]
        if n is not None:
            if value.size and (value.min() < -n or value.max() >= n):
                raise ShapeError(f"getitem: index out of range for axis {axis} of size {n}")
            value = np.where(value < 0, value + n, value)
        t = make_constant(value.astype(np.int64), device=x.device)
    if not dtypes.is_integer(t.dtype):
        raise DTypeError(f"getitem: index tensors must be integers (boolean masks: use where), found {t.dtype}")
    if t.ndim > 1:
        raise ShapeError(f"getitem: index tensors must be 0-d or 1-D, found shape {t.shape}")
    return t


def getitem(x, index):
    """Basic indexing (ints, slices with steps, None, Ellipsis) plus one integer array on
    one axis (`x[:, [2, 0]]` selects with index_select)."""
    items = index if isinstance(index, tuple) else (index,)
    if sum(i is Ellipsis for i in items) > 1:
        raise ShapeError("getitem: an index can hold only one Ellipsis (...)")
    consumed = sum(i is not None and i is not Ellipsis for i in items)
    if consumed > x.ndim:
        raise ShapeError(f"getitem: {consumed} indices for a tensor of rank {x.ndim}")
    at = next((i for i, item in enumerate(items) if item is Ellipsis), None)  # `in` would build ops
    if at is not None:
        items = items[:at] + (_slice(None),) * (x.ndim - consumed) + items[at + 1:]

    starts, stops, steps = [], [], []
    drop, new_axes = [], []
    select = None
    axis = out_axis = 0
    for item in items:
        if item is None:
            new_axes.append(out_axis)
            out_axis += 1
            continue
        if isinstance(item, _slice):
            starts.append(None if item.start is None else int(item.start))
            stops.append(None if item.stop is None else int(item.stop))
            steps.append(None if item.step is None else int(item.step))
            out_axis += 1
        elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
            i, n = int(item), x.shape[axis]
            if n is not None and not -n <= i < n:
                raise _IndexOutOfRange(f"getitem: index {i} is out of range for axis {axis} of size {n}")
            starts.append(i)
            stops.append(i + 1 if i != -1 else None)
            steps.append(None)
            drop.append(axis)
        else:
            if select is not None:
                raise ShapeError("getitem: only one axis can be indexed by an array (use gather)")
            select = (axis, _index_tensor(item, x, axis))
            starts.append(None)
            stops.append(None)
            steps.append(None)
            if select[1].ndim == 0:
                drop.append(axis)
            else:
                out_axis += 1
        axis += 1

    while starts and starts[-1] is None and stops[-1] is None and steps[-1] in (None, 1):
        starts.pop(), stops.pop(), steps.pop()
    out = x
    if starts:
        out = apply("slice", out, starts=tuple(starts), stops=tuple(stops), steps=tuple(steps))
    if select is not None:
        axis, t = select
        out = apply("index_select", out, t if t.ndim == 1 else apply("reshape", t, shape=(1,)), axis=axis)
    if drop:
        out = apply("squeeze", out, axis=tuple(drop))
    for a in new_axes:
        out = apply("unsqueeze", out, axis=a)
    return out


def index_select(x, axis: int, index):
    """torch.index_select(input, dim, index)."""
    return apply("index_select", x, index, axis=axis)


def gather(x, axis: int, index):
    """torch.gather(input, dim, index)."""
    return apply("gather", x, index, axis=axis)


def scatter_add(x, axis: int, index, src):
    """torch.scatter_add(input, dim, index, src) (out of place)."""
    return apply("scatter_add", x, index, src, axis=axis)


def pad(x, pad, mode: str = "constant", value: float = 0.0):
    """torch.nn.functional.pad: `pad` lists (before, after) pairs from the last axis backwards."""
    return apply("pad", x, pad=tuple(int(p) for p in pad), mode=mode, value=float(value))


def repeat(x, *repeats):
    """torch.Tensor.repeat: `x.repeat(2, 1)` tiles x twice along axis 0."""
    return apply("repeat", x, repeats=_ints(repeats))


def flip(x, axis=None):
    """Reverses the order along `axis` (an int or a tuple; all axes by default)."""
    axes = tuple(range(x.ndim)) if axis is None else (axis,) if isinstance(axis, int) else tuple(axis)
    return apply("flip", x, axes=axes)


def tril(x, k: int = 0, diagonal: int | None = None):
    return apply("tril", x, k=int(k if diagonal is None else diagonal))


def triu(x, k: int = 0, diagonal: int | None = None):
    return apply("triu", x, k=int(k if diagonal is None else diagonal))


def one_hot(indices, num_classes: int = -1):
    return apply("one_hot", indices, num_classes=int(num_classes))


def slice_like(x, *parts, index: int, axis: int = 0):
    return apply("slice_like", x, *parts, index=index, axis=axis)


__all__ = ["broadcast_to", "concat", "flatten", "flip", "gather", "getitem", "index_add", "index_select", "one_hot",
           "pad", "permute", "repeat", "reshape", "reshape_like", "scatter_add", "slice", "slice_like",
           "sparse_to_dense", "split", "squeeze", "stack", "transpose", "tril", "triu", "unflatten", "unsqueeze"]
