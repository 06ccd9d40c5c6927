"""Shape and indexing operators: reshape, (un)squeeze, concat, gather/scatter of rows, ..."""

from __future__ import annotations

import torch

from luoshu.core import dtypes
from luoshu.core.errors import DTypeError, ShapeError
from luoshu.core.op import OpDef, apply, register
from luoshu.core.shapes import normalize_axis, numel, same_dim
from luoshu.core.tensor import IndexedSlices, TensorMeta


def _has_unknown(shape) -> bool:
    return any(d is None for d in shape)


@register
class Reshape(OpDef):
    name = "reshape"
    attrs = {"shape": ()}

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

    def infer(self, inputs):
        return TensorMeta(inputs[1].shape, inputs[0].dtype)

    @staticmethod
    def compute(x, like):
        return x.reshape(like.shape)

    def gradient(self, op, grads):
        return [reshape_like(grads[0], op.inputs[0]), None]


def reshape_like(x, like):
    if not _has_unknown(like.shape):
        return apply("reshape", x, shape=like.shape)
    return apply("reshape_like", x, like)


@register
class Unsqueeze(OpDef):
    name = "unsqueeze"
    attrs = {"axis": 0}

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


def _check_indices(opdef, inputs, indices):
    if not dtypes.is_integer(indices.dtype):
        raise DTypeError(f"{opdef.name}: indices must be integers, found {indices.dtype}")
    if indices.ndim != 1:
        raise ShapeError(f"{opdef.name}: indices must be 1-D, found shape {indices.shape}")


def reshape(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return apply("reshape", x, shape=tuple(int(d) for d in shape))


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

__all__ = ["concat", "index_add", "reshape", "reshape_like", "sparse_to_dense", "squeeze", "unsqueeze"]
