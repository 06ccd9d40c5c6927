"""Trains a step of each path that keeps process groups in use (a define-and-run graph's bucketed
all-reduce, eager ZeRO-1 and ZeRO-3), keeps every object alive, calls `shutdown()` and writes the
names of the process's native threads that are left to OUT_DIR/threads<rank>.

    python -m luoshu.distributed.launch -n 2 tests/distributed/held_groups_script.py OUT_DIR
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

import luoshu as ls
from tests.parallel.dp_train import Net, batches, training_graph


def main() -> None:
    torch.set_num_threads(1)
    ls.distributed.init()
    rank = ls.distributed.rank()
    kept = []
    model = Net()
    opt = ls.optim.Adam(model.parameters(), lr=0.01)
    g, (ids, dense, y), loss, train_op = training_graph(model, opt)
    ls.parallel.DataParallel(g, bucket_size_mb=0.0005)
    kept += [model, g]
    for zero in (1, 3):
        eager = Net()
        eager_opt = ls.optim.AdamW(eager.parameters(), lr=0.01)
        kept += [eager, eager_opt, ls.parallel.DataParallel(eager, eager_opt, zero=zero)]
    for ids_v, dense_v, y_v in batches(2, 4):
        g.run([loss, train_op], {ids: ids_v, dense: dense_v, y: y_v})
        for eager, _, dp in zip(kept[2::3], kept[3::3], kept[4::3]):
            dp.minimize(ls.nn.functional.mse_loss(eager(ls.tensor(ids_v), ls.tensor(dense_v)), ls.tensor(y_v)))
    assert np.isfinite(float(g.run(loss, {ids: ids_v, dense: dense_v, y: y_v})))
    ls.distributed.shutdown()
    names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    with open(os.path.join(sys.argv[1], f"threads{rank}"), "w") as f:
        f.write("\n".join(names))


if __name__ == "__main__":
    main()
