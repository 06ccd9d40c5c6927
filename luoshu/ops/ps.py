"""Parameter-server embedding operators: `ps_lookup` (rows through the worker's HET cache)
and `ps_push` (a table's IndexedSlices gradient into the cache).

They reach the embedding layer they serve (`luoshu.ps.PSEmbedding`, a layer above) through a
`luoshu.core.live` key, so their attributes stay plain JSON; the layer holds the cache.
"""

from __future__ import annotations

import torch

from luoshu.core import dtypes, live
from luoshu.core.errors import DTypeError
from luoshu.core.op import OpDef, apply, register
from luoshu.core.tensor import IndexedSlices, TensorMeta

_WHAT = "parameter-server embedding"


@register
class PSLookup(OpDef):
    """Rows of a parameter-server table at `ids` (inputs: the table's handle, ids), read
    through the worker's HET cache; the handle's gradient is an IndexedSlices over `ids`."""

    name = "ps_lookup"
    attrs = {"table": -1}
    tested_by = "tests/ps/test_embedding.py"

    def infer(self, inputs, table):
        handle, ids = inputs
        if handle.ndim != 2:
            raise self.shape_error(inputs, "the table handle must be (num_rows, dim)")
        if not dtypes.is_integer(ids.dtype):
            raise DTypeError(f"ps_lookup: ids must be integers, found {ids.dtype}")
        return TensorMeta(tuple(ids.shape) + (handle.shape[1],), handle.dtype)

    def compute(self, handle, ids, table):
        rows = torch.from_numpy(live.lookup(table, _WHAT, self.name).cache.lookup(ids))
        # the rows come from the servers through host memory; they go where the batch's ids are
        return rows if ids.device == rows.device else rows.to(ids.device, non_blocking=True)

    def gradient(self, op, grads):
        handle, ids = op.inputs
        flat_ids = apply("reshape", ids, shape=(-1,))
        values = apply("reshape", grads[0], shape=(-1, handle.shape[1]))
        return [IndexedSlices(flat_ids, values, handle.shape), None]


@register
class PSPush(OpDef):
    """Pushes a table's IndexedSlices gradient (inputs: indices, values[, carry]) into the
    worker cache and ends the table's step (the cache writes back what its bounds require).

    The output is `carry` unchanged when given (so an update that reads it runs after the
    push), else a token.
    """

    name = "ps_push"
    attrs = {"table": -1}
    differentiable = False
    tested_by = "tests/ps/test_embedding.py"

    def infer(self, inputs, table):
        if len(inputs) not in (2, 3):
            raise self.shape_error(inputs, "ps_push takes indices, values and optionally a tensor to pass on")
        if not dtypes.is_integer(inputs[0].dtype):
            raise DTypeError(f"ps_push: indices must be integers, found {inputs[0].dtype}")
        if len(inputs) == 3:
            return TensorMeta(inputs[2].shape, inputs[2].dtype)
        return TensorMeta((), "float32")

    def compute(self, indices, values, *carry, table):
        emb = live.lookup(table, _WHAT, self.name)
        emb.cache.accumulate(indices, values)
        emb.cache.end_step()
        return carry[0] if carry else None


__all__: list[str] = []
