"""luoshu.ml.linear against scikit-learn's solvers and the closed form."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn import datasets, linear_model, svm
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from luoshu import ml
from luoshu.ml import linear


def _scaled(load):
    X, y = load(return_X_y=True)
    return StandardScaler().fit_transform(X), y


def test_ridge_equals_the_closed_form_and_sklearn():
    X, y = datasets.load_diabetes(return_X_y=True)
    ours = linear.Ridge(alpha=0.3).fit(X, y)
    Xc, yc = X - X.mean(0), y - y.mean()
    closed = np.linalg.solve(Xc.T @ Xc + 0.3 * np.eye(X.shape[1]), Xc.T @ yc)
    np.testing.assert_allclose(ours.coef_, closed, atol=1e-8)
    ref = linear_model.Ridge(alpha=0.3).fit(X, y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-8)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=1e-8)
    np.testing.assert_allclose(ours.predict(X), ref.predict(X), atol=1e-8)


def test_ridge_on_sparse_input_and_several_targets():
    X, y = datasets.load_diabetes(return_X_y=True)
    Xs = sp.csr_matrix(np.where(np.abs(X) > 0.03, X, 0.0))
    Y = np.stack([y, -2 * y + 1], 1)
    ours = linear.Ridge(alpha=2.0).fit(Xs, Y)
    ref = linear_model.Ridge(alpha=2.0).fit(Xs.toarray(), Y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-8)
    np.testing.assert_allclose(ours.predict(Xs), ref.predict(Xs.toarray()), atol=1e-7)


def test_linear_regression_is_least_squares_even_when_rank_deficient():
    X, y = datasets.load_diabetes(return_X_y=True)
    X = np.hstack([X, X[:, :2]])  # duplicated columns: the minimum-norm solution is the unique answer
    ours = linear.LinearRegression().fit(X, y)
    ref = linear_model.LinearRegression().fit(X, y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-6)
    assert ours.score(X, y) == pytest.approx(ref.score(X, y), abs=1e-10)


@pytest.mark.parametrize(
    "load, C", [(datasets.load_breast_cancer, 0.5), (datasets.load_iris, 2.0), (datasets.load_wine, 1.0)]
)
def test_l2_logistic_regression_matches_sklearn_to_1e_4(load, C):
    X, y = _scaled(load)
    ours = linear.LogisticRegression(C=C, tol=1e-9).fit(X, y)
    ref = linear_model.LogisticRegression(C=C, tol=1e-12, max_iter=10000).fit(X, y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-4)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=1e-4)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-5)
    assert (ours.predict(X) == ref.predict(X)).mean() > 0.99


def test_logistic_regression_on_sparse_input_equals_dense():
    X, y = _scaled(datasets.load_breast_cancer)
    X[np.abs(X) < 0.5] = 0.0
    dense = linear.LogisticRegression(C=0.3).fit(X, y)
    sparse = linear.LogisticRegression(C=0.3).fit(sp.csr_matrix(X), y)
    np.testing.assert_allclose(sparse.coef_, dense.coef_, atol=1e-6)


def _lr_objective(coef, intercept, X, y, C, l1_ratio):
    Z = X @ coef.T + intercept
    if Z.shape[1] == 1:
        s = np.where(y == 1, 1.0, -1.0)
        loss = np.logaddexp(0, -s * Z[:, 0]).sum()
    else:
        loss = (np.logaddexp.reduce(Z, axis=1) - Z[np.arange(len(y)), y]).sum()
    return C * loss + l1_ratio * np.abs(coef).sum() + 0.5 * (1 - l1_ratio) * (coef**2).sum()


@pytest.mark.parametrize(
    "penalty, l1_ratio, load",
    [
        pytest.param("l1", 1.0, datasets.load_breast_cancer, marks=pytest.mark.slow),  # saga's reference: ~5 s
        ("elasticnet", 0.3, datasets.load_breast_cancer),
        ("l1", 1.0, datasets.load_iris),
    ],
)
def test_l1_and_elastic_net_reach_sklearn_saga_optimum(penalty, l1_ratio, load):
    X, y = _scaled(load)
    kw = {"l1_ratio": 0.3} if penalty == "elasticnet" else {}
    ours = linear.LogisticRegression(penalty=penalty, C=0.5, tol=1e-8, **kw).fit(X, y)
    ref = linear_model.LogisticRegression(l1_ratio=l1_ratio, C=0.5, solver="saga", tol=1e-8, max_iter=100000).fit(X, y)
    ours_obj = _lr_objective(ours.coef_, ours.intercept_, X, y, 0.5, l1_ratio)
    ref_obj = _lr_objective(ref.coef_, ref.intercept_, X, y, 0.5, l1_ratio)
    assert ours_obj <= ref_obj + 1e-6 * abs(ref_obj)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-3)
    np.testing.assert_array_equal(ours.coef_ == 0, np.abs(ref.coef_) < 1e-6)  # the same sparsity pattern


@pytest.mark.parametrize("loss", ["squared_hinge", "hinge"])
@pytest.mark.parametrize("load", [datasets.load_breast_cancer, datasets.load_iris])
def test_linear_svc_matches_liblinear(loss, load):
    X, y = _scaled(load)
    ours = linear.LinearSVC(C=0.1, loss=loss, tol=1e-7, max_iter=50000).fit(X, y)
    ref = svm.LinearSVC(C=0.1, loss=loss, tol=1e-10, max_iter=1000000).fit(X, y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-4)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=1e-4)
    assert ours.score(X, y) == pytest.approx(ref.score(X, y), abs=0.01)


def test_estimators_work_in_pipelines_and_cross_validation():
    X, y = datasets.load_wine(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), linear.LogisticRegression(C=0.1))
    ours = cross_val_score(pipe, X, y, cv=3).mean()
    ref = cross_val_score(make_pipeline(StandardScaler(), linear_model.LogisticRegression(C=0.1)), X, y, cv=3).mean()
    assert ours == pytest.approx(ref, abs=0.01)
    assert ours > 0.9


def test_bad_parameters_are_refused_at_fit():
    X, y = _scaled(datasets.load_iris)
    with pytest.raises(ml.ParameterError, match="penalty"):
        linear.LogisticRegression(penalty="l3").fit(X, y)
    with pytest.raises(ml.ParameterError, match="C must be a positive"):
        linear.LinearSVC(C=0).fit(X, y)
    with pytest.raises(ml.ParameterError, match="alpha"):
        linear.Ridge(alpha=-1).fit(X, y)
