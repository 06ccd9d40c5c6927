"""MatrixFactorization: ALS half-steps against their closed form (NumPy, per row), held-out error and ranking
quality on data from a known low-rank model, SGD against ALS, bad input, model files, and the parameter
subset of scikit-learn's estimator checks (listed below; the data checks feed random floats, not id pairs)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score
from sklearn.utils import estimator_checks as checks

import luoshu
from luoshu import ml
from luoshu.ml import MatrixFactorization


def low_rank(n_users=200, n_items=120, rank=4, density=0.3, noise=0.1, seed=0):
    """Ratings 3 + P Q^T / sqrt(rank) + noise observed at random: (pairs, ratings, the full mean matrix)."""
    rng = np.random.default_rng(seed)
    R = 3 + rng.normal(size=(n_users, rank)) @ rng.normal(size=(n_items, rank)).T / np.sqrt(rank)
    u, i = np.nonzero(rng.random(R.shape) < density)
    return np.stack([u, i], 1), R[u, i] + rng.normal(0, noise, len(u)), R


def test_explicit_als_item_step_is_the_closed_form():
    X, r, _ = low_rank()
    lam = 0.05
    mf = MatrixFactorization(4, reg=lam, n_iter=3, random_state=0).fit(X, r)
    P, Q = mf.user_factors_, mf.item_factors_
    centred = r - r.mean()
    for item in range(0, 120, 7):  # the last half-step solved the items with P fixed
        rows = X[:, 1] == item
        Pu = P[X[rows, 0]]
        expected = np.linalg.solve(Pu.T @ Pu + lam * rows.sum() * np.eye(4), Pu.T @ centred[rows])
        np.testing.assert_allclose(Q[item], expected, rtol=1e-8, atol=1e-10)


def test_implicit_als_item_step_is_the_closed_form():
    X, r, _ = low_rank(density=0.1)
    strength = np.abs(r)
    lam, alpha = 0.1, 2.0
    mf = MatrixFactorization(4, feedback="implicit", reg=lam, alpha=alpha, n_iter=2, random_state=0).fit(X, strength)
    P, Q = mf.user_factors_, mf.item_factors_
    for item in range(0, 120, 11):  # Hu et al.: (P^T C_i P + lam I)^-1 P^T C_i p_i over all users
        c = np.ones(len(P))
        pref = np.zeros(len(P))
        rows = X[:, 1] == item
        c[X[rows, 0]] += alpha * strength[rows]
        pref[X[rows, 0]] = 1
        expected = np.linalg.solve(P.T @ (c[:, None] * P) + lam * np.eye(4), P.T @ (c * pref))
        np.testing.assert_allclose(Q[item], expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("solver", ["als", "sgd"])
def test_explicit_held_out_error_near_the_noise_level(solver):
    X, r, _ = low_rank()
    perm = np.random.default_rng(1).permutation(len(r))
    tr, te = perm[: int(0.8 * len(r))], perm[int(0.8 * len(r)) :]
    kwargs = {"lr": 0.02, "n_iter": 60, "batch_size": 256} if solver == "sgd" else {}
    mf = MatrixFactorization(4, solver=solver, reg=0.01, random_state=0, **kwargs).fit(X[tr], r[tr])
    rmse = -mf.score(X[te], r[te])
    baseline = np.sqrt(np.mean((r[te] - r[tr].mean()) ** 2))  # predicting the mean
    assert rmse < 0.15 < baseline  # noise std 0.1


@pytest.mark.parametrize("solver", ["als", "sgd"])
def test_implicit_ranks_held_out_positives_first(solver):
    rng = np.random.default_rng(2)
    _, _, R = low_rank(seed=2)
    liked = R > 4.0  # each user's true preferences
    seen = liked & (rng.random(R.shape) < 0.5)
    u, i = np.nonzero(seen)
    kwargs = {"lr": 0.01, "n_iter": 30} if solver == "sgd" else {}
    mf = MatrixFactorization(4, solver=solver, feedback="implicit", reg=0.1, alpha=5.0, random_state=0, **kwargs).fit(
        np.stack([u, i], 1)
    )
    scores = mf.user_factors_ @ mf.item_factors_.T
    unseen = ~seen
    # SGD samples the unobserved pairs (`negatives` per positive) instead of weighting all of them exactly
    assert roc_auc_score((liked & unseen)[unseen], scores[unseen]) > (0.92 if solver == "als" else 0.85)
    top = mf.recommend([0, 1], k=5)
    np.testing.assert_array_equal(top, np.argsort(-scores[[0, 1]], axis=1)[:, :5])


def test_sparse_matrix_input_equals_pairs():
    X, r, _ = low_rank()
    M = sp.csr_matrix((r, (X[:, 0], X[:, 1])), shape=(200, 120))
    a = MatrixFactorization(4, random_state=0).fit(M)
    b = MatrixFactorization(4, random_state=0).fit(X, r)
    np.testing.assert_allclose(a.predict(X[:50]), b.predict(X[:50]), rtol=1e-9)


def test_bad_input_is_refused():
    X, r, _ = low_rank()
    mf = MatrixFactorization(4, n_iter=2, random_state=0).fit(X, r)
    before = mf.user_factors_.copy()
    bad = r.copy()
    bad[0] = np.nan
    with pytest.raises(luoshu.Error, match="NaN"):
        mf.fit(X, bad)
    np.testing.assert_array_equal(mf.user_factors_, before)
    with pytest.raises(luoshu.Error, match="no interactions"):
        mf.fit(np.empty((0, 2)), np.empty(0))
    with pytest.raises(luoshu.Error, match="pairs"):
        mf.fit(X[:, :1], r)
    with pytest.raises(luoshu.Error, match="values"):
        mf.fit(X, r[:-1])
    with pytest.raises(luoshu.Error, match="integer"):
        mf.fit(X + 0.5, r)
    with pytest.raises(luoshu.Error, match="unknown"):
        mf.predict([[500, 0]])
    with pytest.raises(luoshu.Error, match="solver"):
        MatrixFactorization(solver="svd").fit(X, r)
    with pytest.raises(luoshu.Error, match="non-negative"):
        MatrixFactorization(feedback="implicit").fit(X, -r)
    with pytest.raises(ml.NotFittedError):
        MatrixFactorization().predict(X)


def test_save_and_load(tmp_path):
    X, r, _ = low_rank()
    mf = MatrixFactorization(4, n_iter=3, random_state=0).fit(X, r)
    mf.save(tmp_path / "mf")
    np.testing.assert_array_equal(ml.load(tmp_path / "mf").predict(X[:20]), mf.predict(X[:20]))


PARAMETER_CHECKS = [
    "check_estimator_cloneable",
    "check_estimator_repr",
    "check_no_attributes_set_in_init",
    "check_parameters_default_constructible",
    "check_get_params_invariance",
    "check_set_params",
    "check_do_not_raise_errors_in_init_or_set_params",
]


@pytest.mark.parametrize("check", PARAMETER_CHECKS)
def test_sklearn_parameter_checks(check):
    getattr(checks, check)("MatrixFactorization", MatrixFactorization())
