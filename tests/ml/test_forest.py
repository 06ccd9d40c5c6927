"""luoshu.ml.forest against scikit-learn's random forests."""

import numpy as np
import pytest
from sklearn import datasets, ensemble
from sklearn.model_selection import train_test_split

from luoshu.ml.forest import RandomForestClassifier, RandomForestRegressor


@pytest.mark.parametrize("load", [datasets.load_iris, datasets.load_wine, datasets.load_breast_cancer])
def test_classifier_accuracy_within_0_04_of_sklearn(load):
    X, y = load(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, random_state=0, stratify=y)
    ours = RandomForestClassifier(n_estimators=30, random_state=0).fit(Xtr, ytr)
    ref = ensemble.RandomForestClassifier(n_estimators=30, random_state=0).fit(Xtr, ytr)
    assert ours.score(Xte, yte) == pytest.approx(ref.score(Xte, yte), abs=0.04)
    proba = ours.predict_proba(Xte)
    np.testing.assert_allclose(proba.sum(1), 1.0)


def test_regressor_r2_within_0_05_of_sklearn():
    X, y = datasets.load_diabetes(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, random_state=0)
    ours = RandomForestRegressor(n_estimators=30, min_samples_leaf=5, random_state=0).fit(Xtr, ytr)
    ref = ensemble.RandomForestRegressor(n_estimators=30, min_samples_leaf=5, random_state=0).fit(Xtr, ytr)
    assert ours.score(Xte, yte) == pytest.approx(ref.score(Xte, yte), abs=0.05)


def test_a_fully_grown_tree_without_bootstrap_fits_the_training_set():
    X, y = datasets.load_wine(return_X_y=True)
    m = RandomForestClassifier(n_estimators=1, bootstrap=False, max_features=None).fit(X, y)
    assert m.score(X, y) == 1.0
    # leaves hold class frequencies: a pure leaf is one-hot
    assert np.isin(m.trees_[0].leaf_value, [0.0, 1.0]).all()


def test_leaf_limits_are_respected():
    X, y = datasets.load_breast_cancer(return_X_y=True)
    m = RandomForestClassifier(n_estimators=5, max_leaf_nodes=6, min_samples_leaf=10, random_state=1).fit(X, y)
    for t in m.trees_:
        assert t.n_leaves <= 6 and t.leaf_count.min() >= 10
