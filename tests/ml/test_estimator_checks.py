"""scikit-learn's own estimator checks (`parametrize_with_checks`, all of them) on every luoshu.ml estimator."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from luoshu import ml

ESTIMATORS = [
    ml.LogisticRegression(),
    ml.LinearRegression(),
    ml.Ridge(),
    ml.LinearSVC(),
    ml.GBDTClassifier(n_estimators=10),
    ml.GBDTRegressor(n_estimators=10),
    ml.RandomForestClassifier(n_estimators=5),
    ml.RandomForestRegressor(n_estimators=5),
    ml.FactorizationMachine(n_epochs=5),
    ml.FactorizationMachine(task="regression", n_epochs=5),
    ml.FieldAwareFM(n_epochs=5),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
