"""LogisticRegression on the parameter servers under `luoshu launch -n N --servers S`: each worker fits on its part.

    python -m luoshu.distributed.launch -n 2 --servers 1 tests/ml/dist_lr_script.py OUT_PREFIX

Writes OUT_PREFIX.rank<r>.npz with the worker's fitted ids, weights and intercept.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from luoshu import distributed as dist
from luoshu.ml import LogisticRegression
from tests.ml.test_linear_ps import PARAMS, hashed_lr_data


def main() -> None:
    torch.set_num_threads(1)
    dist.init()
    rank, world = dist.rank(), dist.world_size()
    _, Xh, y = hashed_lr_data()
    mine = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
    # each worker's batch is half of the one-process batch: one synchronous step sums both
    params = dict(PARAMS, batch_size=PARAMS["batch_size"] // world)
    lr = LogisticRegression(**params, ps="launch").fit(Xh[mine], y[mine])
    np.savez(f"{sys.argv[1]}.rank{rank}.npz", ids=lr.feature_ids_, coef=lr.coef_, intercept=lr.intercept_)
    from luoshu import ps

    client = ps.connect()
    client.barrier()
    if rank == 0:
        client.shutdown_servers()
    client.close()


if __name__ == "__main__":
    main()
