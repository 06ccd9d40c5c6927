"""Processes: the launcher, the process environment, process groups and device groups.

Start a script on N processes with `luoshu launch -n N script.py` (torchrun underneath); in
the script, `luoshu.distributed.init()` joins the job. Without the launcher the same script
runs as one process. This layer knows processes, not models: the strategies that train a
model across them (`DataParallel`, ...) are in `luoshu.parallel`.
"""

from luoshu.core.dstates import DeviceGroup
from luoshu.distributed.env import (
    DistError,
    backend,
    barrier,
    group_rank,
    group_size,
    init,
    is_distributed,
    is_initialized,
    is_server,
    local_rank,
    num_servers,
    process_group,
    ps_store,
    rank,
    set_server_role,
    shutdown,
    world_size,
)
from luoshu.distributed.mesh import DeviceMesh
from luoshu.ops import comm as _comm


def _resolve(ranks: tuple):
    group = ranks or None
    pg = process_group(group)
    return pg, group_size(group), group_rank(group)


_comm.set_group_resolver(_resolve)

__all__ = [
    "DeviceGroup", "DeviceMesh", "DistError", "backend", "barrier", "group_rank", "group_size", "init",
    "is_distributed", "is_initialized", "is_server", "local_rank", "num_servers", "process_group", "ps_store", "rank",
    "set_server_role", "shutdown", "world_size",
]
