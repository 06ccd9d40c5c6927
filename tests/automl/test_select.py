"""automl.select: picks the family of the model that generated the data, under its time budget, with a
leaderboard of every family; refuses bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.model_selection import cross_val_score

import luoshu
from luoshu import automl
from luoshu.ml import KNeighborsClassifier

LINEAR = {"logistic_regression", "linear_svc", "linear_regression", "ridge"}


def test_xor_data_picks_a_non_linear_family():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (300, 2))
    y = ((X[:, 0] > 0) ^ (X[:, 1] > 0)).astype(int)  # no linear or axis-aligned Gaussian model separates XOR
    start = time.perf_counter()
    est, board = automl.select(X, y, time_budget=3)
    assert time.perf_counter() - start < 3 + 10  # the budget, plus one trial in flight and the refit
    assert board[0]["family"] not in LINEAR | {"gaussian_nb"}
    assert board[0]["score"] > 0.9 and est.score(X, y) > 0.9
    tried = {row["family"] for row in board if row["trials"] >= 1}
    assert {"logistic_regression", "linear_svc", "gaussian_nb", "knn"} <= tried  # the quick families come first
    assert max(r["score"] for r in board if r["family"] in LINEAR) < 0.7


def test_linear_data_picks_a_linear_family():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 20))
    y = (X @ rng.normal(size=20) + 0.3 * rng.normal(size=300) > 0).astype(int)
    quick = ["logistic_regression", "linear_svc", "gaussian_nb", "knn"]  # the tree families take longer
    est, board = automl.select(X, y, candidates=quick, time_budget=2)
    assert board[0]["family"] in LINEAR
    assert board[0]["score"] > max(r["score"] for r in board if r["family"] == "knn") + 0.03


def test_regression_and_leaderboard_scores_are_cv_scores():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(200, 5))
    y = X @ rng.normal(size=5) + 0.1 * rng.normal(size=200)
    est, board = automl.select(
        X, y, candidates=["linear_regression", "ridge", "gbdt_regressor"], time_budget=2, metric="r2"
    )
    assert board[0]["family"] in {"linear_regression", "ridge"} and board[0]["score"] > 0.99
    assert est.score(X, y) > 0.99


def test_given_candidates_and_knn_cv_matches_sklearn():
    rng = np.random.default_rng(3)
    X = rng.uniform(-1, 1, (150, 2))
    y = (X[:, 0] ** 2 + X[:, 1] ** 2 < 0.5).astype(int)
    est, board = automl.select(X, y, candidates=["knn"], time_budget=1)
    assert [r["family"] for r in board] == ["knn"] and isinstance(est, KNeighborsClassifier)
    from sklearn.model_selection import StratifiedKFold

    ref = cross_val_score(
        KNeighborsClassifier(**board[0]["params"]), X, y, cv=StratifiedKFold(3, shuffle=True, random_state=0)
    ).mean()
    np.testing.assert_allclose(board[0]["score"], ref)


def test_bad_input_is_refused():
    X, y = np.zeros((10, 2)), np.arange(10) % 2
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(luoshu.Error, match="NaN"):
        automl.select(bad, y, time_budget=1)
    with pytest.raises(luoshu.Error, match="unknown candidate"):
        automl.select(X, y, candidates=["svm"], time_budget=1)
    with pytest.raises(luoshu.Error, match="cannot run"):
        automl.select(X, y, candidates=["ridge"], time_budget=1)  # a regressor for class labels
    with pytest.raises(luoshu.Error, match="time_budget"):
        automl.select(X, y, time_budget=0)
    with pytest.raises(luoshu.Error):
        automl.select(X, y[:5], time_budget=1)
