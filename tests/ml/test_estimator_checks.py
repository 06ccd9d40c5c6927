"""scikit-learn's own estimator checks (`parametrize_with_checks`, all of them) on every luoshu.ml estimator.

Small ensembles keep the run short; the checks are about the contract, not the quality.
"""

from sklearn.utils.estimator_checks import parametrize_with_checks

from luoshu import ml

ESTIMATORS = [
    ml.LogisticRegression(),
    ml.LinearRegression(),
    ml.Ridge(),
    ml.LinearSVC(),
    ml.GBDTClassifier(n_estimators=5, num_leaves=8),
    ml.GBDTRegressor(n_estimators=10),
    ml.RandomForestClassifier(n_estimators=5, max_depth=6),
    ml.RandomForestRegressor(n_estimators=5, max_depth=6),
    ml.FactorizationMachine(n_epochs=5),
    ml.FactorizationMachine(task="regression", n_epochs=5),
    ml.FieldAwareFM(n_epochs=5),
    ml.SparseLogisticRegression(n_epochs=5),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
