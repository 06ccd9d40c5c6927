"""scikit-learn's own estimator checks (`parametrize_with_checks`) on every luoshu.ml estimator."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from luoshu.ml import linear

ESTIMATORS = [
    linear.LogisticRegression(),
    linear.LogisticRegression(penalty="elasticnet", l1_ratio=0.5),
    linear.LinearRegression(),
    linear.Ridge(),
    linear.LinearSVC(),
    linear.LinearSVC(loss="hinge"),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
