"""Parallel strategies users apply to a model: `DataParallel` with its sync modes —
"allreduce" (bucketed gradient all-reduce), "ps" and "hybrid" (parameter server) — built on
`luoshu.nn`, `luoshu.optim`, `luoshu.compiler` and `luoshu.ps`.

```python
ls.distributed.init()
dp = ls.parallel.DataParallel(model, opt)      # eager; or DataParallel(graph) after minimize()
dp.minimize(loss_fn(dp(x_shard), y_shard))
```
"""

from luoshu.parallel import checkpoint
from luoshu.parallel import ps_modes as _ps_modes  # noqa: F401  (registers the "ps" and "hybrid" modes)
from luoshu.parallel import zero as _zero  # noqa: F401  (registers DataParallel(zero=...))
from luoshu.parallel.data_parallel import (
    MODES,
    SYNC_MODES,
    AllReduceSync,
    DataParallel,
    GradientSync,
    SyncMode,
    register_sync_mode,
)
from luoshu.parallel.hotspa_runtime import HotSPa, StepReport
from luoshu.parallel.pipeline import Pipeline, PipelineError, pipeline
from luoshu.parallel.ps_modes import HybridSync, PSSync
from luoshu.parallel.tensor_parallel import MEGATRON_PLAN, TensorParallel, gather_parameters, parallelize
from luoshu.parallel.zero import ZeroSync

__all__ = [
    "MEGATRON_PLAN", "MODES", "SYNC_MODES", "AllReduceSync", "DataParallel", "GradientSync", "HotSPa", "HybridSync",
    "PSSync", "StepReport",
    "Pipeline", "PipelineError", "SyncMode", "TensorParallel", "ZeroSync", "checkpoint", "gather_parameters",
    "parallelize", "pipeline", "register_sync_mode",
]
