"""Operators the tensor-parallel lowering needs that have no single-device counterpart: `shard_rows`."""

from __future__ import annotations

from luoshu.core.errors import OpError
from luoshu.core.op import OpDef, register
from luoshu.core.tensor import TensorMeta


@register
class ShardRows(OpDef):
    """The rows of a sparse gradient (indices, values) that fall in [start, start + rows),
    renumbered from 0: a row-split table's local share (the others are dropped, so a sparse
    optimizer touches exactly the rows a single table would)."""

    name = "shard_rows"
    attrs = {"start": 0, "rows": 0}
    differentiable = False
    tested_by = "tests/compiler/test_states.py"

    def infer(self, inputs, start, rows):
        indices, values = inputs
        if indices.ndim != 1 or values.ndim < 1:
            raise self.shape_error(inputs, "shard_rows takes 1-D indices and (count, ...) values")
        if rows <= 0 or start < 0:
            raise OpError(f"shard_rows: needs start >= 0 and rows > 0, found start={start}, rows={rows}")
        return [TensorMeta((None,), indices.dtype), TensorMeta((None,) + values.shape[1:], values.dtype)]

    @staticmethod
    def compute(indices, values, start, rows):
        keep = (indices >= start) & (indices < start + rows)
        return indices[keep] - start, values[keep]


__all__: list[str] = []
