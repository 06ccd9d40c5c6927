"""GaussianNB / MultinomialNB against scikit-learn's (parameters and probabilities to 1e-8), sparse counts,
priors, bad input, model files and scikit-learn's estimator checks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn import naive_bayes as sknb
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine
from sklearn.model_selection import train_test_split
from sklearn.utils.estimator_checks import parametrize_with_checks

import luoshu
from luoshu import ml
from luoshu.ml import GaussianNB, MultinomialNB

LOADERS = {"iris": load_iris, "wine": load_wine, "breast_cancer": load_breast_cancer, "digits": load_digits}


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_gaussian_nb_equals_sklearn(name):
    X, y = LOADERS[name](return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    ours, ref = GaussianNB().fit(Xtr, ytr), sknb.GaussianNB().fit(Xtr, ytr)
    np.testing.assert_allclose(ours.theta_, ref.theta_, rtol=1e-10)
    np.testing.assert_allclose(ours.var_, ref.var_, rtol=1e-8)
    np.testing.assert_allclose(ours.class_prior_, ref.class_prior_)
    np.testing.assert_allclose(ours.predict_log_proba(Xte), ref.predict_log_proba(Xte), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ours.predict(Xte), ref.predict(Xte))
    assert ours.score(Xte, yte) == ref.score(Xte, yte)


def test_gaussian_nb_priors():
    X, y = load_iris(return_X_y=True)
    priors = [0.5, 0.3, 0.2]
    np.testing.assert_allclose(
        GaussianNB(priors=priors).fit(X, y).predict_proba(X),
        sknb.GaussianNB(priors=priors).fit(X, y).predict_proba(X),
        rtol=1e-6,
        atol=1e-9,
    )
    with pytest.raises(luoshu.Error, match="priors"):
        GaussianNB(priors=[0.5, 0.5]).fit(X, y)
    with pytest.raises(luoshu.Error, match="sum to 1"):
        GaussianNB(priors=[0.5, 0.5, 0.5]).fit(X, y)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 0.1])
def test_multinomial_nb_equals_sklearn(sparse, alpha):
    X, y = load_digits(return_X_y=True)  # pixel intensities 0..16: counts
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    if sparse:
        Xtr, Xte = sp.csr_matrix(Xtr), sp.csr_matrix(Xte)
    ours, ref = MultinomialNB(alpha=alpha).fit(Xtr, ytr), sknb.MultinomialNB(alpha=alpha).fit(Xtr, ytr)
    np.testing.assert_allclose(ours.feature_log_prob_, ref.feature_log_prob_, rtol=1e-10)
    np.testing.assert_allclose(ours.class_log_prior_, ref.class_log_prior_, rtol=1e-10)
    np.testing.assert_allclose(ours.predict_proba(Xte), ref.predict_proba(Xte), rtol=1e-6, atol=1e-10)
    assert ours.score(Xte, yte) == ref.score(Xte, yte) > 0.85


def test_multinomial_nb_uniform_and_given_priors():
    X, y = load_digits(return_X_y=True)
    for kwargs in ({"fit_prior": False}, {"class_prior": np.full(10, 0.1)}):
        np.testing.assert_allclose(
            MultinomialNB(**kwargs).fit(X, y).class_log_prior_, sknb.MultinomialNB(**kwargs).fit(X, y).class_log_prior_
        )


def test_bad_input_is_refused():
    X, y = load_digits(return_X_y=True)
    nb = MultinomialNB().fit(X, y)
    before = nb.feature_log_prob_.copy()
    with pytest.raises(luoshu.Error, match="Negative"):
        nb.fit(X - 1, y)
    np.testing.assert_array_equal(nb.feature_log_prob_, before)
    with pytest.raises(luoshu.Error, match="Negative"):
        nb.predict(X - 1)
    with pytest.raises(luoshu.Error, match="features"):
        nb.predict(X[:, :10])
    bad = X.astype(float)
    bad[0, 0] = np.inf
    for est in (GaussianNB(), MultinomialNB()):
        with pytest.raises(luoshu.Error, match="infinity"):
            est.fit(bad, y)
        with pytest.raises(luoshu.Error):
            est.fit(X[:0], y[:0])
        with pytest.raises(luoshu.Error, match="class"):
            est.fit(X[:5], np.zeros(5))  # a single class
        with pytest.raises(luoshu.Error):
            est.fit(X, y[:-1])
    with pytest.raises(luoshu.Error, match="alpha"):
        MultinomialNB(alpha=-1).fit(X, y)
    with pytest.raises(ml.NotFittedError):
        GaussianNB().predict(X)


def test_save_and_load(tmp_path):
    X, y = load_iris(return_X_y=True)
    for i, est in enumerate((GaussianNB().fit(X, y), MultinomialNB().fit(X, y))):
        est.save(tmp_path / f"nb{i}")
        np.testing.assert_array_equal(ml.load(tmp_path / f"nb{i}").predict_proba(X), est.predict_proba(X))


@parametrize_with_checks([GaussianNB(), MultinomialNB()])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
