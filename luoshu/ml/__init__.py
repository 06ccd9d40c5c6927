"""Classic machine learning (HetuML's part of Hetu): scikit-learn-compatible estimators on luoshu's kernels.

Every estimator has `fit` / `predict` (and `predict_proba`, `transform`, `score` as fits),
`get_params` / `set_params`, takes dense NumPy arrays or SciPy CSR matrices (`load_libsvm`
reads libsvm files), and saves as a model package: `est.save(path)`, `luoshu.ml.load(path)`.
"""

from luoshu.ml.base import DataError, Estimator, MLError, NotFittedError, ParameterError
from luoshu.ml.fm import FactorizationMachine, FieldAwareFM
from luoshu.ml.forest import RandomForestClassifier, RandomForestRegressor
from luoshu.ml.gbdt import GBDTClassifier, GBDTRegressor
from luoshu.ml.io import load, load_libsvm, save
from luoshu.ml.linear import LinearRegression, LinearSVC, LogisticRegression, Ridge

__all__ = [
    "DataError",
    "Estimator",
    "FactorizationMachine",
    "FieldAwareFM",
    "GBDTClassifier",
    "GBDTRegressor",
    "LinearRegression",
    "LinearSVC",
    "LogisticRegression",
    "MLError",
    "NotFittedError",
    "ParameterError",
    "RandomForestClassifier",
    "RandomForestRegressor",
    "Ridge",
    "load",
    "load_libsvm",
    "save",
]

from luoshu.ml.cluster import KMeans, MiniBatchKMeans  # noqa: E402  (one block per module group: mergeable)
from luoshu.ml.decomposition import LDA, NMF  # noqa: E402
from luoshu.ml.factorization import MatrixFactorization  # noqa: E402
from luoshu.ml.naive_bayes import GaussianNB, MultinomialNB  # noqa: E402
from luoshu.ml.neighbors import KNeighborsClassifier  # noqa: E402

__all__ += [
    "GaussianNB", "KMeans", "KNeighborsClassifier", "LDA", "MatrixFactorization", "MiniBatchKMeans", "MultinomialNB",
    "NMF",
]
