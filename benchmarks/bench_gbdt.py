"""GBDT training: luoshu.ml.GBDTClassifier vs LightGBM vs scikit-learn's HistGradientBoostingClassifier.

Same hyper-parameters everywhere (100 trees, 31 leaves, learning rate 0.1, 255 bins,
20 samples per leaf, no early stopping), 2 threads each, the same data. Repeats are
interleaved (luoshu, LightGBM, sklearn, luoshu, ...); the table shows median train time
and test AUC, and each library's time relative to luoshu. Target (issue 14): within 1.5x
of LightGBM's time at equal AUC (+-0.002), faster than scikit-learn.

Data sets:
- dense: `--rows` x 50 from `make_classification` (20 informative), 20% held out;
- ctr: `--ctr-rows` CTR-like rows: 13 heavy-tailed counts with 40% missing and 26
  categorical fields as Zipf-distributed integer ids (mostly 0), label from a hidden
  logistic model with crosses; 20% held out.

    .venv/bin/python benchmarks/bench_gbdt.py [--rows 200000] [--ctr-rows 1000000] [--repeats 3] [--threads 2]

On a machine shared with other jobs, run with `OMP_WAIT_POLICY=PASSIVE`: LightGBM's and
scikit-learn's OpenMP threads otherwise spin against the other load and their times
swing by several times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from sklearn.datasets import make_classification
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from luoshu import ml

TREES, LEAVES, LR, BINS, MIN_LEAF = 100, 31, 0.1, 255, 20


def dense_data(rows: int):
    X, y = make_classification(rows, 50, n_informative=20, n_redundant=10, flip_y=0.05, random_state=0)
    return _split(X, y)


def ctr_data(rows: int):
    rng = np.random.default_rng(1)
    counts = np.floor(rng.lognormal(1.0, 1.5, size=(rows, 13)))
    counts[rng.random(counts.shape) < 0.4] = np.nan
    cats = np.minimum(rng.zipf(1.6, size=(rows, 26)) - 1, 10_000).astype(np.float64)
    logit = (
        np.nan_to_num(np.log1p(counts[:, :4])) @ np.array([0.6, -0.4, 0.3, 0.2])
        + 0.8 * (cats[:, 0] % 3 == 1)
        - 0.6 * ((cats[:, 1] == 0) & (cats[:, 2] > 1))
        + 0.5 * np.isnan(counts[:, 5])
        - 1.5
    )
    y = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    return _split(np.hstack([counts, cats]), y)


def _split(X, y):
    n_test = len(y) // 5
    return X[n_test:], y[n_test:], X[:n_test], y[:n_test]


def fit_luoshu(Xtr, ytr):
    return ml.GBDTClassifier(
        n_estimators=TREES, num_leaves=LEAVES, learning_rate=LR, max_bins=BINS, min_child_samples=MIN_LEAF
    ).fit(Xtr, ytr)


def fit_lightgbm(Xtr, ytr, threads):
    import lightgbm as lgb

    return lgb.LGBMClassifier(
        n_estimators=TREES,
        num_leaves=LEAVES,
        learning_rate=LR,
        max_bin=BINS,
        min_child_samples=MIN_LEAF,
        n_jobs=threads,
        verbose=-1,
    ).fit(Xtr, ytr)


def fit_sklearn(Xtr, ytr):
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=TREES,
        max_leaf_nodes=LEAVES,
        learning_rate=LR,
        max_bins=BINS,
        min_samples_leaf=MIN_LEAF,
        early_stopping=False,
    ).fit(Xtr, ytr)


def run(name: str, data, repeats: int, threads: int) -> None:
    Xtr, ytr, Xte, yte = data
    fits = {"luoshu": fit_luoshu, "lightgbm": lambda X, y: fit_lightgbm(X, y, threads), "sklearn": fit_sklearn}
    times: dict[str, list[float]] = {k: [] for k in fits}
    aucs: dict[str, float] = {}
    with threadpool_limits(threads):
        for fit in fits.values():  # warm-up: imports, thread pools, first-touch allocation
            fit(Xtr[:2000], ytr[:2000])
        for _ in range(repeats):
            for k, fit in fits.items():
                start = time.perf_counter()
                model = fit(Xtr, ytr)
                times[k].append(time.perf_counter() - start)
                aucs[k] = roc_auc_score(yte, model.predict_proba(Xte)[:, 1])
    base = statistics.median(times["luoshu"])
    print(
        f"\n{name}: {Xtr.shape[0]} train rows x {Xtr.shape[1]} features, {TREES} trees, {threads} threads, "
        f"{repeats} repeats"
    )
    print(f"{'library':<10} {'median s':>9} {'AUC':>8} {'time / luoshu':>14}")
    for k in fits:
        med = statistics.median(times[k])
        print(f"{k:<10} {med:9.2f} {aucs[k]:8.4f} {med / base:14.2f}")
    lgb_t = statistics.median(times["lightgbm"])
    print(
        f"luoshu / LightGBM time: {base / lgb_t:.2f}x (target <= 1.5x), AUC difference "
        f"{aucs['luoshu'] - aucs['lightgbm']:+.4f} (target within +-0.002); luoshu / sklearn time: "
        f"{base / statistics.median(times['sklearn']):.2f}x (target < 1)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--ctr-rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["dense", "ctr"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only in (None, "dense"):
        run("dense", dense_data(args.rows), args.repeats, args.threads)
    if args.only in (None, "ctr"):
        run("ctr", ctr_data(args.ctr_rows), args.repeats, args.threads)


if __name__ == "__main__":
    main()
