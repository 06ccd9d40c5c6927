"""KNeighborsClassifier against scikit-learn's brute-force neighbours (distances, indices, votes), sparse
input, bad input, model files and scikit-learn's estimator checks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn import neighbors as skn
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import luoshu
from luoshu import ml
from luoshu.ml import KNeighborsClassifier


def _split(name):
    loader = {"iris": load_iris, "wine": load_wine, "breast_cancer": load_breast_cancer, "digits": load_digits}[name]
    X, y = loader(return_X_y=True)
    if name in ("wine", "breast_cancer"):
        X = StandardScaler().fit_transform(X)
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)


@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer", "digits"])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_same_neighbours_and_votes_as_sklearn(name, weights):
    Xtr, Xte, ytr, yte = _split(name)
    ours = KNeighborsClassifier(5, weights=weights).fit(Xtr, ytr)
    ref = skn.KNeighborsClassifier(5, weights=weights, algorithm="brute").fit(Xtr, ytr)
    d, _ = ours.kneighbors(Xte)
    d_ref, _ = ref.kneighbors(Xte)
    np.testing.assert_allclose(d, d_ref, rtol=1e-7, atol=1e-7)
    agree = ours.predict(Xte) == ref.predict(Xte)
    assert agree.mean() >= 0.99  # equidistant neighbours may be ordered differently
    np.testing.assert_allclose(ours.predict_proba(Xte)[agree], ref.predict_proba(Xte)[agree], atol=1e-7)
    assert abs(ours.score(Xte, yte) - ref.score(Xte, yte)) <= 0.01


@pytest.mark.parametrize("metric", ["manhattan", "cosine"])
def test_other_metrics_match_sklearn(metric):
    Xtr, Xte, ytr, _ = _split("wine")
    ours = KNeighborsClassifier(7, metric=metric).fit(Xtr, ytr)
    ref = skn.KNeighborsClassifier(7, metric=metric, algorithm="brute").fit(Xtr, ytr)
    np.testing.assert_allclose(ours.kneighbors(Xte)[0], ref.kneighbors(Xte)[0], rtol=1e-7, atol=1e-7)
    assert (ours.predict(Xte) == ref.predict(Xte)).mean() >= 0.98


def test_training_rows_query_excludes_each_row_itself():
    X, y = load_iris(return_X_y=True)
    X = X + np.random.default_rng(0).normal(0, 1e-3, X.shape)  # no exact duplicates
    d, i = KNeighborsClassifier(3).fit(X, y).kneighbors()
    d_ref, i_ref = skn.NearestNeighbors(n_neighbors=3, algorithm="brute").fit(X).kneighbors()
    np.testing.assert_allclose(d, d_ref, rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(i, i_ref)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_float32_screening_gives_the_float64_neighbours(offset):
    """Dense float64 Euclidean queries are screened in float32 and rescored in float64; far from the origin
    (offset 1e3: float32 cannot separate the candidates) rows fall back to float64. Either way the neighbours
    are NumPy's float64 ones (stable order: equal distances by training row)."""
    rng = np.random.default_rng(0)
    Xtr, Xte = rng.normal(size=(3000, 12)) + offset, rng.normal(size=(300, 12)) + offset
    Xtr[1000:1010] = Xtr[:10]  # exact duplicates: equidistant neighbours
    Xte[:10] = Xtr[:10]
    knn = KNeighborsClassifier(7).fit(Xtr, np.arange(3000) % 3)
    d, i = knn.kneighbors(Xte)
    ref_sq = ((Xte[:, None, :] - Xtr[None, :, :]) ** 2).sum(2)
    ref_i = np.argsort(ref_sq, axis=1, kind="stable")[:, :7]
    np.testing.assert_allclose(d, np.sqrt(np.take_along_axis(ref_sq, ref_i, 1)), rtol=1e-6, atol=1e-6 * (1 + offset))
    if offset == 0:  # far out, rounding in ||t||^2 - 2 q.t itself may swap rows NumPy's differences keep apart
        np.testing.assert_array_equal(i, ref_i)
    _, _, redo = knn._screened(torch.from_numpy(Xte), 7)
    # near the origin float32 certifies (almost) every row; at 1e3 its error bound exceeds the gaps
    assert len(redo) < 30 if offset == 0 else len(redo) == 300


def test_sparse_input_gives_the_dense_result():
    Xtr, Xte, ytr, _ = _split("digits")
    a = KNeighborsClassifier(5).fit(sp.csr_matrix(Xtr), ytr)
    b = KNeighborsClassifier(5).fit(Xtr, ytr)
    np.testing.assert_allclose(a.kneighbors(sp.csr_matrix(Xte))[0], b.kneighbors(Xte)[0], rtol=1e-9, atol=1e-7)
    np.testing.assert_allclose(a.predict_proba(Xte), b.predict_proba(Xte))


def test_bad_input_is_refused():
    X, y = load_iris(return_X_y=True)
    knn = KNeighborsClassifier().fit(X, y)
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(luoshu.Error, match="NaN"):
        KNeighborsClassifier().fit(bad, y)
    with pytest.raises(luoshu.Error, match="NaN"):
        knn.predict(bad)
    with pytest.raises(luoshu.Error, match="features"):
        knn.predict(X[:, :2])
    with pytest.raises(luoshu.Error):
        KNeighborsClassifier().fit(np.empty((0, 4)), np.empty(0))
    with pytest.raises(luoshu.Error, match="n_neighbors"):
        KNeighborsClassifier(200).fit(X, y).predict(X)
    with pytest.raises(luoshu.Error, match="n_neighbors"):
        KNeighborsClassifier(0).fit(X, y)
    with pytest.raises(luoshu.Error, match="metric"):
        KNeighborsClassifier(metric="hamming").fit(X, y)
    with pytest.raises(luoshu.Error):
        KNeighborsClassifier().fit(X, y + 0.5)  # continuous labels
    with pytest.raises(ml.NotFittedError):
        KNeighborsClassifier().predict(X)


@pytest.mark.parametrize("sparse", [False, True])
def test_save_and_load(tmp_path, sparse):
    Xtr, Xte, ytr, _ = _split("iris")
    Xtr = sp.csr_matrix(Xtr) if sparse else Xtr
    knn = KNeighborsClassifier(4, weights="distance").fit(Xtr, ytr)
    knn.save(tmp_path / "knn")
    back = ml.load(tmp_path / "knn")
    np.testing.assert_array_equal(back.predict_proba(Xte), knn.predict_proba(Xte))


@parametrize_with_checks([KNeighborsClassifier(), KNeighborsClassifier(weights="distance", metric="cosine")])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
