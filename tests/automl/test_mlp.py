"""The zoo's MLPs as estimators (`luoshu.automl.mlp`) against scikit-learn's MLPs, and as `select` candidates."""

import numpy as np
import pytest
from sklearn.datasets import make_friedman1, make_moons
from sklearn.model_selection import cross_val_score
from sklearn.neural_network import MLPClassifier as SkMLPClassifier
from sklearn.neural_network import MLPRegressor as SkMLPRegressor
from threadpoolctl import threadpool_limits

import luoshu
from luoshu import automl
from luoshu.automl.mlp import MLPClassifier, MLPRegressor


def test_classifier_accuracy_at_least_sklearns_mlp_less_0_03():
    X, y = make_moons(600, noise=0.25, random_state=0)
    ours = MLPClassifier(n_epochs=30).fit(X[:400], y[:400])
    with threadpool_limits(1):  # BLAS threads spin against a shared machine's load (30x slower)
        ref = SkMLPClassifier(hidden_layer_sizes=(64,), max_iter=1000, random_state=0).fit(X[:400], y[:400])
    assert ours.score(X[400:], y[400:]) >= ref.score(X[400:], y[400:]) - 0.03
    proba = ours.predict_proba(X[400:])
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    assert proba.shape == (200, 2) and ours.loss_curve_[-1] < ours.loss_curve_[0]


def test_regressor_r2_at_least_sklearns_mlp_less_0_05():
    X, y = make_friedman1(600, random_state=0)
    ours = MLPRegressor(n_epochs=30).fit(X[:400], y[:400])
    with threadpool_limits(1), pytest.warns(UserWarning):  # lbfgs stops at max_iter, a ConvergenceWarning
        ref = SkMLPRegressor(hidden_layer_sizes=(64,), solver="lbfgs", max_iter=500, random_state=0).fit(
            X[:400], y[:400]
        )
    assert ours.score(X[400:], y[400:]) >= ref.score(X[400:], y[400:]) - 0.05


def test_select_picks_the_mlp_on_data_a_random_mlp_labelled():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 6))
    W1, W2 = rng.normal(size=(6, 16)), rng.normal(size=(16, 3))
    y = (np.tanh(X @ W1) @ W2).argmax(1)  # the known model: a random one-hidden-layer network
    est, board = automl.select(X, y, candidates=["logistic_regression", "gaussian_nb", "mlp"], time_budget=4, cv=3)
    assert board[0]["family"] == "mlp" and isinstance(est, MLPClassifier)
    assert board[0]["score"] > max(r["score"] for r in board[1:] if r["score"] is not None) + 0.02
    assert cross_val_score(MLPClassifier(n_epochs=5), X, y, cv=2).shape == (2,)  # sklearn clones it


def test_bad_parameters_and_input_are_refused():
    X, y = make_moons(50, random_state=0)
    for bad in ({"width": 0}, {"n_layers": 1.5}, {"learning_rate": 0}, {"batch_size": True}):
        with pytest.raises(luoshu.ml.ParameterError):
            MLPClassifier(**bad).fit(X, y)
    with pytest.raises(luoshu.ml.NotFittedError):
        MLPRegressor().predict(X)
    with pytest.raises(luoshu.ml.DataError, match="features"):
        MLPClassifier(n_epochs=1).fit(X, y).predict(X[:, :1])
