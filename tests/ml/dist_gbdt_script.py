"""Data-parallel GBDT under `luoshu launch -n N`: each worker fits on its slice of one generated data set.

    python -m luoshu.distributed.launch -n 2 tests/ml/dist_gbdt_script.py OUT_PREFIX

Writes OUT_PREFIX.rank<r>.npz with every tree's arrays. `data()` is the full data set; the
test fits one process on all of it and compares.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from luoshu import distributed as dist
from luoshu import ml

PARAMS = {"n_estimators": 8, "num_leaves": 12, "min_child_samples": 5, "learning_rate": 0.2}


def data(kind: str):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(3001, 6))
    X[rng.random(X.shape) < 0.1] = np.nan
    score = np.nan_to_num(X[:, 0]) * 2 - np.nan_to_num(X[:, 1]) + np.isnan(X[:, 2]) + 0.3 * rng.normal(size=3001)
    if kind == "multiclass":
        return X, np.digitize(score, [-1.0, 1.0])
    return X, (score > 0).astype(int)


def tree_arrays(model) -> dict:
    out = {}
    for i, rnd in enumerate(model.trees_):
        for c, tree in enumerate(rnd):
            for key, value in tree.to_dict().items():
                out[f"t{i}_{c}_{key}"] = value
    out["init"] = model.init_score_
    return out


def main() -> None:
    torch.set_num_threads(1)
    prefix = sys.argv[1]
    dist.init()
    rank, world = dist.rank(), dist.world_size()
    for kind in ("binary", "multiclass"):
        X, y = data(kind)
        bounds = np.linspace(0, len(X), world + 1).astype(int)  # uneven slices: 3001 rows
        mine = slice(bounds[rank], bounds[rank + 1])
        model = ml.GBDTClassifier(**PARAMS, distributed=True).fit(X[mine], y[mine])
        np.savez(f"{prefix}.{kind}.rank{rank}.npz", **tree_arrays(model))
    dist.shutdown()


if __name__ == "__main__":
    main()
