"""Mixed precision: `autocast` runs matmul-like ops in bf16/fp16 while weights stay fp32.

Inside the block, ops marked `autocast = "lower"` (matmul, linear, conv, attention,
einsum) get their float inputs cast to the low dtype, and ops marked "fp32" (softmax,
normalisation, reductions, losses) get low-precision inputs widened back. The casts
are ordinary `cast` ops in the graph, so gradients flow back through them into the
fp32 master weights. Pair with `luoshu.optim.LossScaler` for fp16.
"""

from __future__ import annotations

import contextlib

from luoshu.core import context, dtypes
from luoshu.core.errors import DTypeError


@contextlib.contextmanager
def autocast(dtype="bfloat16", enabled: bool = True):
    """Runs the ops built inside the block in mixed precision (bf16 on CPU; fp16/bf16 on GPU)."""
    name = dtypes.dtype_name(dtype)
    if name not in ("bfloat16", "float16"):
        raise DTypeError(f"autocast runs in bfloat16 or float16, found {name}")
    with context.autocast_scope(name if enabled else None):
        yield
