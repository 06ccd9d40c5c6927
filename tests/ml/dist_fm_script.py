"""FM through the parameter servers under `luoshu launch -n N --servers S`: each worker fits on its half.

    python -m luoshu.distributed.launch -n 2 --servers 1 tests/ml/dist_fm_script.py OUT_PREFIX

Writes OUT_PREFIX.rank<r>.npz with the loss curve and the pulled parameters.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from luoshu import distributed as dist
from luoshu.ml.fm import FactorizationMachine
from tests.ml.test_fm import fm_data

PARAMS = {"n_factors": 4, "n_epochs": 8, "batch_size": 128}


def main() -> None:
    torch.set_num_threads(1)
    dist.init()
    rank, world = dist.rank(), dist.world_size()
    X, y, _ = fm_data(n=3000)
    mine = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
    fm = FactorizationMachine(**PARAMS, ps="launch").fit(X[mine], y[mine])
    np.savez(f"{sys.argv[1]}.rank{rank}.npz", loss=fm.loss_curve_, w=fm.w_, V=fm.V_, ids=fm.feature_ids_)
    from luoshu import ps

    client = ps.connect()
    client.barrier()
    if rank == 0:
        client.shutdown_servers()
    client.close()


if __name__ == "__main__":
    main()
