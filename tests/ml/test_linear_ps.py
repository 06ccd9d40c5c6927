"""LogisticRegression trained on `luoshu.ps` servers (hashed ids up to 2^40) against the in-process L-BFGS optimum."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import log_loss

from luoshu import ml, ps
from tests.distributed.launcher import launch

PARAMS = {"C": 1.0, "n_epochs": 20, "batch_size": 256, "learning_rate": 0.3, "random_state": 0}


def hashed_lr_data(n: int = 3000, d: int = 40, seed: int = 0):
    """(X with columns 0..d-1, the same rows with each column moved to a hashed id below 2^40, y) from a known
    logistic model."""
    rng = np.random.default_rng(seed)
    X = sp.random(n, d, density=0.2, random_state=seed + 1, format="csr", data_rvs=lambda s: np.ones(s))
    z = X @ rng.normal(size=d) - 0.5
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    hashed = np.sort(np.random.default_rng(seed + 3).choice(2**40, d, replace=False))
    Xh = sp.csr_matrix((X.data, hashed[X.indices], X.indptr), shape=(n, 2**40))
    return X, Xh, y


def objective(model, X, y, C: float = 1.0) -> float:
    """scikit-learn's objective per sample: mean log loss + ||w||^2 / (2 C n)."""
    return log_loss(y, model.predict_proba(X)[:, 1]) + 0.5 * float((model.coef_**2).sum()) / (C * len(y))


@pytest.fixture
def servers(monkeypatch):
    with ps.start_local_servers(2, in_process=True) as s:
        monkeypatch.setenv("LUOSHU_JOB_SECRET", s.secret)  # as the launcher hands it to the workers
        yield s


def test_logistic_regression_on_servers_reaches_the_lbfgs_objective(servers, tmp_path):
    X, Xh, y = hashed_lr_data()
    local = ml.LogisticRegression(C=1.0).fit(X, y)
    on_ps = ml.LogisticRegression(**PARAMS, ps_addresses=servers.addresses).fit(Xh, y)
    assert on_ps.coef_.shape == (1, 40) and on_ps.feature_ids_.max() < 2**40
    assert objective(on_ps, Xh, y) == pytest.approx(objective(local, X, y), rel=0.005)
    # the same weights as the optimum, found by scikit-learn's solver too (AdaGrad is near, not at, it)
    np.testing.assert_allclose(on_ps.coef_[0], local.coef_[0], atol=0.08)
    assert (on_ps.predict(Xh) == local.predict(X)).mean() > 0.97
    on_ps.save(tmp_path / "lr")  # predicts without the servers, also after loading
    np.testing.assert_array_equal(ml.load(tmp_path / "lr").predict_proba(Xh), on_ps.predict_proba(Xh))
    unseen = sp.csr_matrix(([1.0], [5], [0, 1]), shape=(1, 2**40))  # an id no row had weighs 0
    assert on_ps.decision_function(unseen)[0] == pytest.approx(on_ps.intercept_[0])


def test_what_the_servers_cannot_train_is_refused(servers):
    X, Xh, y = hashed_lr_data(n=200)
    with pytest.raises(ml.ParameterError, match="penalty 'l2' or None"):
        ml.LogisticRegression(penalty="l1", ps_addresses=servers.addresses).fit(Xh, y)
    with pytest.raises(ml.ParameterError, match="fit_intercept"):
        ml.LogisticRegression(fit_intercept=False, ps_addresses=servers.addresses).fit(Xh, y)
    with pytest.raises(ml.DataError, match="binary, found 3 classes"):
        ml.LogisticRegression(ps_addresses=servers.addresses).fit(Xh, np.arange(200) % 3)
    with pytest.raises(ml.ParameterError, match="ps"):
        ml.LogisticRegression(ps="yes").fit(Xh, y)


@pytest.mark.dist
@pytest.mark.slow  # ~20 s: two workers and a server under luoshu launch
@pytest.mark.timeout(240)
def test_two_workers_and_a_server_reach_the_single_process_objective(tmp_path):
    job = launch(2, "tests/ml/dist_lr_script.py", str(tmp_path / "lr"), timeout=200, extra=("--servers", "1"))
    assert job.returncode == 0, job.stderr[-3000:]
    X, Xh, y = hashed_lr_data()
    local = ml.LogisticRegression(C=1.0).fit(X, y)
    r0, r1 = (np.load(tmp_path / f"lr.rank{r}.npz") for r in range(2))
    np.testing.assert_array_equal(r0["ids"], r1["ids"])  # every id is in both halves here
    np.testing.assert_allclose(r0["coef"], r1["coef"])  # one model on the servers
    model = ml.LogisticRegression().set_params(**PARAMS)
    model.classes_, model.feature_ids_, model.coef_, model.intercept_ = (
        np.array([0, 1]),
        r0["ids"],
        r0["coef"],
        r0["intercept"],
    )
    model.n_features_in_ = 2**40
    assert objective(model, Xh, y) == pytest.approx(objective(local, X, y), rel=0.005)
