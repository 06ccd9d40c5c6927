"""Former home of `luoshu.distributed` and `luoshu.parallel`, kept for one release.

`luoshu.dist.X` still works and warns once per name with a `DeprecationWarning` naming the
new place: process functions are in `luoshu.distributed`, `DataParallel` and its sync modes
in `luoshu.parallel`.
"""

from __future__ import annotations

import warnings

from luoshu import distributed as _distributed
from luoshu import parallel as _parallel

_RENAMED = {"Strategy": ("parallel", "SyncMode"), "register_strategy": ("parallel", "register_sync_mode"),
            "STRATEGIES": ("parallel", "SYNC_MODES")}


def __getattr__(name: str):
    if name in _RENAMED:
        package, new = _RENAMED[name]
    elif name in _parallel.__all__:
        package, new = "parallel", name
    elif name in _distributed.__all__:
        package, new = "distributed", name
    else:
        raise AttributeError(f"module 'luoshu.dist' has no attribute {name!r}")
    warnings.warn(f"luoshu.dist.{name} is now luoshu.{package}.{new}", DeprecationWarning, stacklevel=2)
    return getattr(_parallel if package == "parallel" else _distributed, new)
