"""Bad input to every luoshu.ml estimator: a clear luoshu.Error naming what was wrong, and no state change."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn import datasets

import luoshu as ls
from luoshu import ml

CLASSIFIERS = [ml.LogisticRegression, ml.LinearSVC, ml.GBDTClassifier, ml.RandomForestClassifier]
REGRESSORS = [ml.LinearRegression, ml.Ridge, ml.GBDTRegressor, ml.RandomForestRegressor]
ALL = CLASSIFIERS + REGRESSORS
NAN_OK = {ml.GBDTClassifier, ml.GBDTRegressor, ml.RandomForestClassifier, ml.RandomForestRegressor}


def _small(kind):
    X, y = datasets.load_iris(return_X_y=True)
    return X[::3], (y[::3] if kind in CLASSIFIERS else X[::3, 0] * 2.0)


def _make(kind):
    return kind(n_estimators=3) if "n_estimators" in kind().get_params() else kind()


@pytest.mark.parametrize("kind", ALL)
def test_nan_and_inf_are_refused_where_not_allowed(kind):
    X, y = _small(kind)
    bad = X.copy()
    bad[3, 1] = np.inf
    with pytest.raises(ml.DataError, match="infinity") as info:
        _make(kind).fit(bad, y)
    assert isinstance(info.value, ls.Error) and isinstance(info.value, ValueError)
    bad[3, 1] = np.nan
    if kind in NAN_OK:
        _make(kind).fit(bad, y)  # missing values are routed by the trees
    else:
        with pytest.raises(ml.DataError, match="NaN"):
            _make(kind).fit(bad, y)


@pytest.mark.parametrize("kind", ALL)
def test_empty_data_and_mismatched_features(kind):
    X, y = _small(kind)
    with pytest.raises(ml.DataError, match="0 sample"):
        _make(kind).fit(X[:0], y[:0])
    est = _make(kind).fit(X, y)
    before = est.predict(X)
    with pytest.raises(ml.DataError, match="X has 3 features, but .* is expecting 4 features"):
        est.predict(X[:, :3])
    np.testing.assert_array_equal(est.predict(X), before)  # nothing changed
    with pytest.raises(ml.DataError, match="X has 5 features"):
        est.predict(sp.csr_matrix(np.hstack([X, X[:, :1]])))


@pytest.mark.parametrize("kind", ALL)
def test_predict_before_fit(kind):
    X, _ = _small(kind)
    with pytest.raises(ml.NotFittedError, match="not fitted"):
        _make(kind).predict(X)


@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_bad_labels_for_classifiers(kind):
    X, y = _small(kind)
    with pytest.raises(ml.DataError, match="Unknown label type"):
        _make(kind).fit(X, y + 0.5)  # continuous targets
    with pytest.raises(ml.DataError, match="at least 2 classes"):
        _make(kind).fit(X, np.zeros(len(X)))


def test_labels_outside_the_fitted_classes():
    from luoshu.ml.base import encode_labels

    est = ml.LogisticRegression()
    with pytest.raises(ml.DataError, match=r"labels \[7\] are not among the expected classes \[0, 1, 2\]"):
        encode_labels(est, np.array([0, 7, 1]), np.array([0, 1, 2]))
