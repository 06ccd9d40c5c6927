"""Shape arithmetic shared by the operators' `infer` rules; `None` is a run-time dimension."""

from __future__ import annotations

from collections.abc import Sequence

from luoshu.core.errors import ShapeError

Shape = tuple


def broadcast_shapes(op_name: str, *shapes: Shape) -> Shape:
    """NumPy broadcasting over shapes that may hold `None` (unknown until run time)."""
    ndim = max((len(s) for s in shapes), default=0)
    result = []
    for axis in range(-ndim, 0):
        dim = 1
        for s in shapes:
            if len(s) < -axis:
                continue
            d = s[axis]
            if d == 1:
                continue
            if dim == 1:
                dim = d
            elif d is None or dim is None:
                dim = dim if d is None else d
            elif d != dim:
                shown = ", ".join(str(tuple(s)) for s in shapes)
                raise ShapeError(
                    f"{op_name}: shapes {shown} do not broadcast: dimension {axis} is {dim} in one "
                    f"input and {d} in another (each must be equal or 1)"
                )
        result.append(dim)
    return tuple(result)


def normalize_axis(op_name: str, axis: int, ndim: int) -> int:
    if not -ndim <= axis < max(ndim, 1):
        raise ShapeError(f"{op_name}: axis {axis} is out of range for a tensor of rank {ndim}")
    return axis % ndim if ndim else 0


def normalize_axes(op_name: str, axis, ndim: int) -> tuple[int, ...]:
    """`None` means all axes; an int or a sequence of ints is normalised and sorted."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    axes = tuple(sorted(normalize_axis(op_name, a, ndim) for a in axis))
    if len(set(axes)) != len(axes):
        raise ShapeError(f"{op_name}: repeated axis in {axis}")
    return axes


def reduced_shape(shape: Shape, axes: Sequence[int], keepdims: bool) -> Shape:
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def numel(shape: Shape):
    """Number of elements, or None if any dimension is unknown."""
    n = 1
    for d in shape:
        if d is None:
            return None
        n *= d
    return n


def same_dim(a, b) -> bool:
    """Two dimensions can be equal at run time."""
    return a is None or b is None or a == b
