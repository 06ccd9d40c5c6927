"""Multi-process training: the launcher, process environment and groups, data-parallel strategies.

Start a script on N processes with `luoshu launch -n N script.py` (torchrun underneath);
in the script, `luoshu.dist.init()` joins the job and `DataParallel` synchronises the
gradients. Without the launcher the same script runs as one process.
"""

from luoshu.dist.data_parallel import MODES, DataParallel, Strategy, register_strategy
from luoshu.dist.env import (
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
    shutdown,
    world_size,
)
from luoshu.ops import comm as _comm


def _resolve(ranks: tuple):
    group = ranks or None
    pg = process_group(group)
    return pg, group_size(group), group_rank(group)


_comm.set_group_resolver(_resolve)

__all__ = [
    "MODES", "DataParallel", "DistError", "Strategy", "backend", "barrier", "group_rank", "group_size", "init",
    "is_distributed", "is_initialized", "is_server", "local_rank", "num_servers", "process_group", "ps_store",
    "rank", "register_strategy", "shutdown", "world_size",
]
