"""Worker 0 kills the parameter server (SIGKILL) while the workers keep all-reducing.

    python -m luoshu.distributed.launch -n 2 --servers 1 tests/distributed/kill_server_script.py
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import torch

import luoshu as ls


def _sibling_with_local_rank(local_rank: int) -> int:
    """The pid of the process the same launcher agent started as `local_rank` (Linux /proc)."""
    parent = os.getppid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if env.get(b"LOCAL_RANK") == str(local_rank).encode():
            return int(entry)
    raise RuntimeError(f"no sibling process with LOCAL_RANK={local_rank}")


def main() -> None:
    torch.set_num_threads(1)
    ls.distributed.init()
    x = ls.tensor(np.ones(100, np.float32))
    if ls.distributed.rank() == 0:
        os.kill(_sibling_with_local_rank(ls.distributed.world_size()), signal.SIGKILL)
    deadline = time.monotonic() + 600  # only the launcher ends this job
    while time.monotonic() < deadline:
        ls.ops.all_reduce(x)


if __name__ == "__main__":
    main()
