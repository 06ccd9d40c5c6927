"""luoshu.ml.gbdt against LightGBM (the same algorithm) and scikit-learn's HistGradientBoosting."""

import numpy as np
import pytest
from sklearn import datasets
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.model_selection import train_test_split

from luoshu import ml
from luoshu.ml.gbdt import GBDTClassifier, GBDTRegressor
from luoshu.ml.histogram import BinMapper

lgb = pytest.importorskip("lightgbm")

SAME = {"n_estimators": 60, "learning_rate": 0.1, "num_leaves": 15, "min_child_samples": 10}


def _lgb(cls, **kw):
    return cls(**kw, verbose=-1, n_jobs=1, min_child_weight=1e-3)


@pytest.fixture(scope="module")
def binary_with_missing():
    X, y = datasets.make_classification(4000, 12, n_informative=6, random_state=0)
    X[np.random.default_rng(0).random(X.shape) < 0.1] = np.nan
    return train_test_split(X, y, random_state=0)


def test_binary_auc_equals_lightgbm_within_0_01_with_missing_values(binary_with_missing):
    Xtr, Xte, ytr, yte = binary_with_missing
    ours = GBDTClassifier(**SAME).fit(Xtr, ytr)
    ref = _lgb(lgb.LGBMClassifier, **SAME).fit(Xtr, ytr)
    a, b = roc_auc_score(yte, ours.predict_proba(Xte)[:, 1]), roc_auc_score(yte, ref.predict_proba(Xte)[:, 1])
    assert a == pytest.approx(b, abs=0.01) and a > 0.9


def test_the_text_dump_loads_into_lightgbm_and_predicts_the_same(binary_with_missing):
    Xtr, Xte, ytr, _ = binary_with_missing
    ours = GBDTClassifier(**SAME).fit(Xtr, ytr)
    booster = lgb.Booster(model_str=ours.dump_model_text())
    np.testing.assert_allclose(booster.predict(Xte, raw_score=True), ours.decision_function(Xte), atol=1e-9)
    np.testing.assert_allclose(booster.predict(Xte), ours.predict_proba(Xte)[:, 1], atol=1e-9)
    assert any(t.default_left.any() for (t,) in ours.trees_) and any((~t.default_left).any() for (t,) in ours.trees_)


@pytest.mark.parametrize("load", [datasets.load_iris, datasets.load_wine, datasets.load_digits])
def test_multiclass_accuracy_within_0_03_of_lightgbm(load):
    X, y = load(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, random_state=0, stratify=y)
    kw = dict(SAME, n_estimators=10 if load is datasets.load_digits else 30)
    ours = GBDTClassifier(**kw).fit(Xtr, ytr)
    ref = _lgb(lgb.LGBMClassifier, **kw).fit(Xtr, ytr)
    assert ours.score(Xte, yte) == pytest.approx(ref.score(Xte, yte), abs=0.03)
    booster = lgb.Booster(model_str=ours.dump_model_text())
    np.testing.assert_allclose(booster.predict(Xte, raw_score=True), ours.decision_function(Xte), atol=1e-9)


def test_breast_cancer_auc_within_0_01_of_lightgbm():
    X, y = datasets.load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, random_state=0, stratify=y)
    ours = GBDTClassifier(**SAME).fit(Xtr, ytr)
    ref = _lgb(lgb.LGBMClassifier, **SAME).fit(Xtr, ytr)
    a, b = roc_auc_score(yte, ours.predict_proba(Xte)[:, 1]), roc_auc_score(yte, ref.predict_proba(Xte)[:, 1])
    assert a == pytest.approx(b, abs=0.01)


def test_regression_r2_within_0_03_of_lightgbm():
    X, y = datasets.load_diabetes(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, random_state=0)
    kw = {"n_estimators": 100, "learning_rate": 0.05, "num_leaves": 8, "min_child_samples": 20}
    ours = GBDTRegressor(**kw).fit(Xtr, ytr)
    ref = _lgb(lgb.LGBMRegressor, **kw).fit(Xtr, ytr)
    assert r2_score(yte, ours.predict(Xte)) == pytest.approx(r2_score(yte, ref.predict(Xte)), abs=0.03)
    booster = lgb.Booster(model_str=ours.dump_model_text())
    np.testing.assert_allclose(booster.predict(Xte), ours.predict(Xte), atol=1e-9)


def test_a_single_tree_is_the_exact_greedy_best_split():
    """One split, squared error: the chosen threshold must minimise the SSE over every candidate (brute force)."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 3))
    y = np.where(X[:, 1] > 0.3, 2.0, 0.0) + 0.1 * rng.normal(size=300)
    m = GBDTRegressor(n_estimators=1, learning_rate=1.0, num_leaves=2, min_child_samples=1).fit(X, y)
    (tree,) = m.trees_[0]
    best = min(
        (
            ((y[X[:, f] <= t] - y[X[:, f] <= t].mean()) ** 2).sum()
            + ((y[X[:, f] > t] - y[X[:, f] > t].mean()) ** 2).sum(),
            f,
            t,
        )
        for f in range(3)
        for t in np.unique(X[:, f])[:-1]
    )
    assert tree.split_feature[0] == best[1]
    left = X[:, best[1]] <= tree.threshold[0]
    assert (left == (X[:, best[1]] <= best[2])).all()
    np.testing.assert_allclose(
        sorted(tree.leaf_value[:, 0] + m.init_score_[0]), sorted([y[left].mean(), y[~left].mean()]), atol=1e-9
    )


def test_bins_are_quantiles_and_consistent_with_thresholds():
    rng = np.random.default_rng(0)
    X = np.stack([rng.normal(size=5000), rng.integers(0, 5, 5000).astype(float)], 1)
    X[::7, 0] = np.nan
    mapper = BinMapper.fit(X, 32)
    codes = mapper.transform(X)
    assert mapper.n_bins.tolist()[1] == 5 and (codes[::7, 0] == 255).all()
    counts = np.bincount(codes[~np.isnan(X[:, 0]), 0])
    assert counts.max() < 2 * counts.mean()  # roughly equal mass per bin
    for b in range(len(mapper.edges[0])):
        x = X[~np.isnan(X[:, 0]), 0]
        assert ((x <= mapper.edges[0][b]) == (codes[~np.isnan(X[:, 0]), 0] <= b)).all()


def test_early_stopping_keeps_the_best_iteration(binary_with_missing):
    Xtr, Xte, ytr, yte = binary_with_missing
    m = GBDTClassifier(n_estimators=400, learning_rate=0.5, num_leaves=31, n_iter_no_change=5).fit(
        Xtr, ytr, eval_set=(Xte, yte)
    )
    assert m.best_iteration_ < 400 and len(m.trees_) == m.best_iteration_
    assert int(np.argmin(m.validation_loss_)) + 1 == m.best_iteration_
    assert len(m.validation_loss_) == m.best_iteration_ + 5


def test_row_and_feature_subsampling_and_depth_limit(binary_with_missing):
    Xtr, Xte, ytr, yte = binary_with_missing
    m = GBDTClassifier(n_estimators=40, subsample=0.5, colsample_bytree=0.5, max_depth=3, random_state=3).fit(Xtr, ytr)
    assert roc_auc_score(yte, m.predict_proba(Xte)[:, 1]) > 0.88
    for (t,) in m.trees_:
        assert t.n_leaves <= 8 and len(set(t.split_feature.tolist())) <= 6
    again = GBDTClassifier(n_estimators=40, subsample=0.5, colsample_bytree=0.5, max_depth=3, random_state=3)
    np.testing.assert_array_equal(again.fit(Xtr, ytr).predict_proba(Xte), m.predict_proba(Xte))


def test_l2_on_leaves_shrinks_leaf_values():
    X, y = datasets.load_diabetes(return_X_y=True)
    a = GBDTRegressor(n_estimators=1, learning_rate=1.0, num_leaves=4).fit(X, y)
    b = GBDTRegressor(n_estimators=1, learning_rate=1.0, num_leaves=4, reg_lambda=1e4).fit(X, y)
    (ta,), (tb,) = a.trees_[0], b.trees_[0]
    assert np.abs(tb.leaf_value).max() < np.abs(ta.leaf_value).max()
    # leaf value = -G / (H + lambda): count / (count + lambda) of the unregularised mean residual for squared error
    if (ta.split_feature == tb.split_feature).all() and (ta.split_bin == tb.split_bin).all():
        np.testing.assert_allclose(tb.leaf_value[:, 0], ta.leaf_value[:, 0] * ta.leaf_count / (ta.leaf_count + 1e4))


def test_bad_eval_labels_and_parameters_are_refused(binary_with_missing):
    Xtr, Xte, ytr, yte = binary_with_missing
    with pytest.raises(ml.DataError, match="not among the expected classes"):
        GBDTClassifier(n_estimators=2).fit(Xtr, ytr, eval_set=(Xte, yte + 5))
    with pytest.raises(ml.ParameterError, match="num_leaves"):
        GBDTClassifier(num_leaves=1).fit(Xtr, ytr)
    with pytest.raises(ml.ParameterError, match="subsample"):
        GBDTClassifier(subsample=0.0).fit(Xtr, ytr)
    with pytest.raises(ml.DataError, match="features"):
        GBDTClassifier(n_estimators=2).fit(Xtr, ytr).predict(Xte[:, :5])


def test_threaded_histograms_grow_the_same_trees(binary_with_missing, monkeypatch):
    from luoshu.ml import histogram

    Xtr, Xte, ytr, _ = binary_with_missing
    one = GBDTClassifier(n_estimators=5, n_jobs=1).fit(Xtr, ytr)
    monkeypatch.setattr(histogram, "PARALLEL_MIN_ROWS", 64)  # the test data is small: split it anyway
    two = GBDTClassifier(n_estimators=5, n_jobs=2).fit(Xtr, ytr)
    for (a,), (b,) in zip(one.trees_, two.trees_):
        np.testing.assert_array_equal(a.split_feature, b.split_feature)
        np.testing.assert_array_equal(a.split_bin, b.split_bin)
    np.testing.assert_allclose(two.predict_proba(Xte), one.predict_proba(Xte), atol=1e-10)
    import torch

    assert torch.get_num_threads() == 1  # the fit restored the caller's thread count


def test_root_histograms_without_most_frequent_bins_grow_the_same_trees(monkeypatch):
    from luoshu.ml import gbdt, histogram

    rng = np.random.default_rng(3)
    X = np.floor(rng.lognormal(0.5, 1.5, size=(3000, 8)))
    X[rng.random(X.shape) < 0.4] = np.nan  # CTR-like: most codes missing or zero
    y = (np.nan_to_num(X[:, 0]) + 2 * np.isnan(X[:, 1]) + rng.normal(size=3000) > 1.5).astype(int)
    kw = {"n_estimators": 10, "num_leaves": 8, "n_jobs": 1}
    kept = histogram.KeptCodes.of(BinMapper.fit(X).transform(X, padded=True), 8)
    assert kept.density < gbdt.KEPT_MAX_DENSITY  # the fit below does skip
    skipping = GBDTClassifier(**kw).fit(X, y)
    monkeypatch.setattr(gbdt, "KEPT_MAX_DENSITY", -1.0)  # never skip: full histograms everywhere
    full = GBDTClassifier(**kw).fit(X, y)
    for (a,), (b,) in zip(skipping.trees_, full.trees_):
        np.testing.assert_array_equal(a.split_feature, b.split_feature)
        np.testing.assert_array_equal(a.split_bin, b.split_bin)
        np.testing.assert_allclose(a.leaf_value, b.leaf_value, rtol=1e-9)
    ref = _lgb(lgb.LGBMClassifier, n_estimators=10, num_leaves=8).fit(X, y)
    assert abs(roc_auc_score(y, skipping.predict_proba(X)[:, 1]) - roc_auc_score(y, ref.predict_proba(X)[:, 1])) < 0.01
