"""KMeans / MiniBatchKMeans against scikit-learn (inertia, centres from a given init), sparse input, bad input,
model files, scikit-learn's estimator checks, and the distributed fit on two processes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn import cluster as skc
from sklearn.datasets import load_digits, load_iris, load_wine, make_blobs
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import luoshu
from luoshu import ml
from luoshu.ml import KMeans, MiniBatchKMeans


def _datasets():
    return {
        "iris": load_iris().data,
        "wine": StandardScaler().fit_transform(load_wine().data),
        "digits": load_digits().data,
    }


@pytest.mark.parametrize("name", ["iris", "wine", "digits"])
def test_inertia_matches_sklearn_within_one_percent(name):
    X = _datasets()[name]
    k = {"iris": 3, "wine": 3, "digits": 10}[name]
    ours = KMeans(k, n_init=4, random_state=0).fit(X)
    ref = skc.KMeans(k, n_init=4, random_state=0).fit(X)
    assert ours.inertia_ <= ref.inertia_ * 1.01
    # inertia_ is what the centres and labels say it is
    d = ((X[:, None, :] - ours.cluster_centers_[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(ours.labels_, d.argmin(1))
    np.testing.assert_allclose(ours.inertia_, d.min(1).sum(), rtol=1e-10)


def test_lloyd_from_a_given_init_gives_sklearns_centres():
    X = load_digits().data
    init = X[np.random.default_rng(0).choice(len(X), 10, replace=False)]
    ours = KMeans(10, init=init, tol=1e-10, max_iter=500).fit(X)
    ref = skc.KMeans(10, init=init, n_init=1, tol=1e-10, max_iter=500, algorithm="lloyd").fit(X)
    np.testing.assert_allclose(ours.cluster_centers_, ref.cluster_centers_, rtol=1e-8, atol=1e-8)
    np.testing.assert_array_equal(ours.labels_, ref.labels_)
    np.testing.assert_allclose(ours.inertia_, ref.inertia_, rtol=1e-8)
    np.testing.assert_allclose(ours.transform(X[:20]), ref.transform(X[:20]), rtol=1e-8, atol=1e-8)


def test_blobs_are_recovered_and_sparse_input_gives_the_dense_result():
    X, y = make_blobs(600, centers=5, n_features=8, random_state=1)
    dense = KMeans(5, random_state=3).fit(X)
    assert adjusted_rand_score(y, dense.labels_) > 0.99
    Xs = sp.csr_matrix(np.where(np.abs(X) < 1.0, 0.0, X))
    a, b = KMeans(5, random_state=3).fit(Xs), KMeans(5, random_state=3).fit(Xs.toarray())
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(a.predict(Xs), b.predict(Xs.toarray()))


def test_float32_stays_float32():
    X = load_iris().data.astype(np.float32)
    km = KMeans(3, random_state=0).fit(X)
    assert km.cluster_centers_.dtype == np.float32 and km.transform(X).dtype == np.float32


@pytest.mark.parametrize("name", ["iris", "digits"])
def test_minibatch_inertia_close_to_full_kmeans(name):
    X = _datasets()[name]
    k = 3 if name == "iris" else 10
    ours = MiniBatchKMeans(k, batch_size=256, random_state=0, n_init=3).fit(X)
    ref = skc.KMeans(k, n_init=3, random_state=0).fit(X)
    sk_mb = skc.MiniBatchKMeans(k, batch_size=256, random_state=0, n_init=3).fit(X)
    assert ours.inertia_ <= ref.inertia_ * 1.05
    assert ours.inertia_ <= sk_mb.inertia_ * 1.03


def test_bad_input_is_refused_and_changes_nothing():
    X = load_iris().data
    km = KMeans(3, random_state=0).fit(X)
    centres = km.cluster_centers_.copy()
    bad_nan, bad_inf = X.copy(), X.copy()
    bad_nan[0, 0], bad_inf[1, 1] = np.nan, np.inf
    for bad, message in ((bad_nan, "NaN"), (bad_inf, "infinity"), (np.empty((0, 4)), "sample")):
        with pytest.raises(luoshu.Error, match=message):
            km.fit(bad)
    with pytest.raises(luoshu.Error, match="features"):
        km.predict(X[:, :3])
    with pytest.raises(luoshu.Error, match="n_clusters"):
        KMeans(10).fit(X[:5])
    with pytest.raises(luoshu.Error, match="n_clusters"):
        KMeans(0).fit(X)
    with pytest.raises(ml.NotFittedError):
        KMeans(3).predict(X)
    np.testing.assert_array_equal(km.cluster_centers_, centres)


def test_save_and_load(tmp_path):
    X = load_iris().data
    km = KMeans(3, random_state=0).fit(X)
    km.save(tmp_path / "km")
    back = ml.load(tmp_path / "km")
    assert isinstance(back, KMeans) and back.get_params() == km.get_params()
    np.testing.assert_array_equal(back.predict(X), km.predict(X))


@parametrize_with_checks([KMeans(random_state=0), MiniBatchKMeans(random_state=0)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_distributed_kmeans_on_two_processes_equals_one_process(tmp_path):
    import tests.ml.kmeans_dist_script as script
    from tests.distributed.launcher import launch

    proc = launch(2, "tests/ml/kmeans_dist_script.py", str(tmp_path), timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    X = np.concatenate([script.rows(r) for r in range(2)])
    for init in script.INITS:
        single = KMeans(script.K, init=init, random_state=7, tol=0, max_iter=50).fit(X)
        labels = []
        for r in range(2):
            got = np.load(tmp_path / f"rank{r}_{init}.npz")
            np.testing.assert_allclose(got["centers"], single.cluster_centers_, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(got["inertia"], single.inertia_, rtol=1e-9)
            assert int(got["n_iter"]) == single.n_iter_
            labels.append(got["labels"])
        np.testing.assert_array_equal(np.concatenate(labels), single.labels_)
