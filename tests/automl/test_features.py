"""AutoFeatures: target encodings equal scikit-learn's TargetEncoder (out-of-fold and full), frequency and
quantile features, the greedy cross search finds the interacting pair, selection keeps the informative
features, it slots into a Pipeline, and bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler, TargetEncoder

import luoshu
from luoshu.automl import AutoFeatures
from luoshu.ml import LogisticRegression


def interaction_data(n=2000, seed=0):
    """Click labels driven by the XOR of fields 0 and 1 (neither alone says anything) and numeric column 5;
    fields 2, 3 and numeric column 4 are noise."""
    rng = np.random.default_rng(seed)
    a, b, c, d = (rng.integers(0, k, n) for k in (4, 4, 6, 5))
    skewed, informative = rng.exponential(2, n), rng.normal(size=n)
    logit = 2.5 * ((a % 2) ^ (b % 2)) - 1.25 + 0.5 * informative
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return np.column_stack([a, b, c, d, skewed, informative]).astype(float), y


def test_target_encoding_equals_sklearns():
    X, y = interaction_data()
    fe = AutoFeatures(categorical=[0, 1, 2, 3], smooth=10.0, cv=5, random_state=0, max_crosses=0)
    out = fe.fit_transform(X, y)
    names = list(fe.get_feature_names_out())
    te = TargetEncoder(smooth=10.0, cv=StratifiedKFold(5, shuffle=True, random_state=0), target_type="binary")
    cats = X[:, :4].astype(int).astype(str)
    ref_oof = te.fit_transform(cats, y)
    ref_full = te.transform(cats)
    full = fe.transform(X)
    for j in range(4):
        col = names.index(f"target(x{j})")
        np.testing.assert_allclose(out[:, col], ref_oof[:, j], rtol=1e-12)  # out-of-fold in fit_transform
        np.testing.assert_allclose(full[:, col], ref_full[:, j], rtol=1e-12)  # all training rows afterwards
        freq = names.index(f"freq(x{j})")
        counts = {v: (X[:, j] == v).mean() for v in np.unique(X[:, j])}
        np.testing.assert_allclose(out[:, freq], [counts[v] for v in X[:, j]])


def test_numeric_transforms():
    X, y = interaction_data()
    fe = AutoFeatures(categorical=[0, 1, 2, 3], n_bins=4, max_crosses=0)
    out = fe.fit_transform(X, y)
    names = list(fe.get_feature_names_out())
    assert fe.log_columns_ == [4]  # the exponential column is skewed, the normal one is not
    np.testing.assert_allclose(out[:, names.index("log1p(x4)")], np.log1p(X[:, 4]))
    bins = out[:, names.index("bin(x5)")]
    assert set(np.unique(bins)) == {0, 1, 2, 3}
    np.testing.assert_allclose(np.bincount(bins.astype(int)) / len(bins), 0.25, atol=0.01)  # quantile bins


def test_greedy_search_crosses_the_interacting_pair():
    X, y = interaction_data()
    fe = AutoFeatures(categorical=[0, 1, 2, 3], max_crosses=3).fit(X, y)
    assert fe.crosses_ == [(0, 1)]  # the only pair that gains
    assert fe.cross_gains_["x0*x1"] > 0.05 > max(g for k, g in fe.cross_gains_.items() if k != "x0*x1")


def test_in_a_pipeline_the_cross_lifts_a_linear_model():
    X, y = interaction_data()

    def accuracy(**kwargs):
        model = make_pipeline(AutoFeatures(categorical=[0, 1, 2, 3], **kwargs), StandardScaler(), LogisticRegression())
        return cross_val_score(model, X, y, cv=3).mean()

    with_cross, without = accuracy(), accuracy(max_crosses=0)
    assert with_cross > without + 0.1


def test_selection_by_importance_keeps_the_informative_features():
    X, y = interaction_data()
    fe = AutoFeatures(categorical=[0, 1, 2, 3], max_features=3).fit(X, y)
    kept = set(fe.get_feature_names_out())
    assert "target(x0*x1)" in kept and "x5" in kept
    assert fe.transform(X).shape == (len(X), 3)


def test_auto_categorical_strings_and_unseen_categories():
    rng = np.random.default_rng(1)
    colour = rng.choice(["red", "green", "blue"], 300)
    X = np.column_stack([colour, rng.normal(size=300).astype(str)]).astype(object)
    y = (colour == "red").astype(int)
    fe = AutoFeatures(max_crosses=0)
    fe.fit(X, y)
    assert fe.categorical_columns_ == [0] and fe.numeric_columns_ == [1]
    new = np.array([["purple", "0.5"], ["red", "0.1"]], dtype=object)
    out = fe.transform(new)
    names = list(fe.get_feature_names_out())
    assert out[0, names.index("freq(x0)")] == 0.0
    np.testing.assert_allclose(out[0, names.index("target(x0)")], y.mean())  # the prior
    assert out[1, names.index("target(x0)")] > 0.9


def test_bad_input_is_refused():
    X, y = interaction_data(n=200)
    fe = AutoFeatures(categorical=[0, 1]).fit(X, y)
    with pytest.raises(luoshu.Error, match="features"):
        fe.transform(X[:, :4])
    bad = X.copy()
    bad[3, 5] = np.nan
    with pytest.raises(luoshu.Error, match="NaN"):
        AutoFeatures(categorical=[0, 1]).fit(bad, y)
    with pytest.raises(luoshu.Error, match="0 rows"):
        AutoFeatures().fit(X[:0], y[:0])
    with pytest.raises(luoshu.Error, match="rows"):
        AutoFeatures().fit(X, y[:-1])
    with pytest.raises(luoshu.Error, match="requires y"):
        AutoFeatures().fit_transform(X)
    with pytest.raises(luoshu.Error, match="out of range"):
        AutoFeatures(categorical=[9]).fit(X, y)
    with pytest.raises(luoshu.Error, match="not fitted"):
        AutoFeatures().transform(X)
