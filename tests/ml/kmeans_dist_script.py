"""Distributed KMeans: each worker fits on its own rows; tests/ml/test_cluster.py compares with one process.

python -m luoshu.distributed.launch -n 2 tests/ml/kmeans_dist_script.py OUT_DIR
"""

from __future__ import annotations

import sys

import numpy as np

K = 6
INITS = ("k-means++", "random")


def rows(rank: int) -> np.ndarray:
    """Worker `rank`'s rows: unequal counts, blobs spread over both workers."""
    from sklearn.datasets import make_blobs

    X, _ = make_blobs(900, centers=K, n_features=5, cluster_std=2.0, random_state=4)
    return X[:400] if rank == 0 else X[400:]


def main() -> None:
    import torch

    from luoshu import distributed as dist
    from luoshu.ml import KMeans

    torch.set_num_threads(1)
    dist.init()
    rank = dist.rank()
    for init in INITS:
        km = KMeans(K, init=init, random_state=7, tol=0, max_iter=50, distributed=True).fit(rows(rank))
        np.savez(
            f"{sys.argv[1]}/rank{rank}_{init}.npz",
            centers=km.cluster_centers_,
            inertia=km.inertia_,
            n_iter=km.n_iter_,
            labels=km.labels_,
        )
    dist.shutdown()


if __name__ == "__main__":
    main()
