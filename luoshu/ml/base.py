"""The estimator contract every `luoshu.ml` model shares: parameters, input validation, errors, save/load hooks.

Estimators follow scikit-learn's contract (`fit` returns self, hyper-parameters are the
constructor's keyword arguments and nothing else, fitted state ends in `_`), so
`get_params` / `set_params` come from `sklearn.base.BaseEstimator` and
`cross_val_score`, `GridSearchCV` and `Pipeline` accept them. Input goes through
`check_X` / `check_X_y`, which accept dense arrays and SciPy sparse matrices (CSR out)
and turn every refusal into a `luoshu.Error` subclass that is also a `ValueError`
(scikit-learn's own checks and user code that catches `ValueError` keep working).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError as _SklearnNotFitted
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from luoshu.core.errors import Error

__all__ = [
    "DataError",
    "Estimator",
    "MLError",
    "NotFittedError",
    "check_X",
    "check_X_y",
    "encode_labels",
    "to_torch",
]


class MLError(Error):
    """A `luoshu.ml` failure: bad hyper-parameters, bad data, a model file that cannot be used."""


class DataError(MLError, ValueError):
    """Bad input data: NaN/inf where not allowed, no samples, unknown labels, wrong feature count."""


class ParameterError(MLError, ValueError):
    """A hyper-parameter outside its allowed range (names the estimator, the parameter and the range)."""


class NotFittedError(MLError, _SklearnNotFitted):
    """`predict`/`transform`/`save` called before `fit`."""


# Every concrete estimator registers itself here by class name, so `ml.load` can rebuild
# one from a model file without importing anything the file names.
REGISTRY: dict[str, type] = {}


def _validate(estimator, X, y="no_validation", reset: bool = True, **kwargs):
    """sklearn's `validate_data`, with its refusals re-raised as `DataError` (message kept, estimator named)."""
    name = type(estimator).__name__
    try:
        return validate_data(estimator, X, y, reset=reset, **kwargs)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, Error):
            raise
        if isinstance(exc, TypeError) and "sparse" not in str(exc).lower():
            raise
        msg = str(exc)
        if "contains NaN" in msg or "contains infinity" in msg:
            # sklearn's message goes on about imputers for a page; its first line says what was wrong
            msg = msg.split("\n")[0] + f" {name} does not accept missing or infinite values."
        raise DataError(f"{name}: {msg}") from exc


def check_X(estimator, X, *, reset: bool, accept_sparse: bool = True, allow_nan: bool = False, dtype=np.float64):
    """Validates X for `fit` (`reset=True`: records `n_features_in_`) or predict (`reset=False`: checks it).

    Returns a C-contiguous float array or a CSR matrix with sorted indices.
    """
    X = _validate(
        estimator,
        X,
        reset=reset,
        accept_sparse="csr" if accept_sparse else False,
        dtype=dtype,
        ensure_all_finite="allow-nan" if allow_nan else True,
        order="C",
    )
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        X.sort_indices()
    return X


def check_X_y(
    estimator,
    X,
    y,
    *,
    accept_sparse: bool = True,
    allow_nan: bool = False,
    multi_output: bool = False,
    y_numeric: bool = False,
):
    """Validates a training set (sets `n_features_in_`); y is 1-d unless `multi_output`."""
    X, y = _validate(
        estimator,
        X,
        y,
        reset=True,
        accept_sparse="csr" if accept_sparse else False,
        dtype=np.float64,
        ensure_all_finite="allow-nan" if allow_nan else True,
        order="C",
        multi_output=multi_output,
        y_numeric=y_numeric,
    )
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        X.sort_indices()
    return X, y


def encode_labels(estimator, y, classes=None) -> tuple[np.ndarray, np.ndarray]:
    """(classes_, y as indices into classes_) for a classifier; refuses continuous targets and single classes.

    With `classes` given (e.g. at `score` or in a warm start), a label outside it is refused.
    """
    name = type(estimator).__name__
    try:
        check_classification_targets(y)
    except ValueError as exc:
        raise DataError(f"{name}: {exc}") from exc
    if classes is None:
        classes, codes = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise DataError(
                f"{name}: a classifier needs samples of at least 2 classes, found only 1 class ({classes[0]!r})"
            )
        return classes, codes.reshape(-1)
    codes = np.searchsorted(classes, y)
    codes = np.clip(codes, 0, len(classes) - 1)
    bad = classes[codes] != y
    if bad.any():
        raise DataError(
            f"{name}: labels {np.unique(np.asarray(y)[bad])[:5].tolist()} are not among the expected "
            f"classes {classes.tolist()}"
        )
    return classes, codes


def to_torch(X, dtype=torch.float64):
    """A validated X as a torch tensor: dense stays dense, CSR becomes a torch sparse CSR tensor."""
    if sp.issparse(X):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's "sparse CSR is in beta" notice
            return torch.sparse_csr_tensor(
                torch.from_numpy(X.indptr.astype(np.int64)),
                torch.from_numpy(X.indices.astype(np.int64)),
                torch.from_numpy(np.asarray(X.data, dtype=np.float64)).to(dtype),
                size=X.shape,
                check_invariants=False,
            )  # scipy's validation holds
    X = np.ascontiguousarray(X)
    if not X.flags.writeable:  # torch refuses to wrap read-only memory (e.g. a memmap) without a copy
        X = X.copy()
    return torch.from_numpy(X).to(dtype)


def check_positive(estimator, **values) -> None:
    """Refuses any given hyper-parameter that is not a positive number."""
    for name, v in values.items():
        if not (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and v > 0):
            raise ParameterError(f"{type(estimator).__name__}: {name} must be a positive number, found {v!r}")


def check_choice(estimator, name: str, value, choices) -> None:
    if value not in choices:
        raise ParameterError(f"{type(estimator).__name__}: {name} must be one of {list(choices)}, found {value!r}")


class Estimator(BaseEstimator):
    """Base of every `luoshu.ml` estimator: sklearn's parameter handling, fitted checks and `save`."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            REGISTRY[cls.__name__] = cls

    def _check_fitted(self, attribute: str) -> None:
        try:
            check_is_fitted(self, attribute)
        except _SklearnNotFitted as exc:
            raise NotFittedError(f"{type(self).__name__}: this estimator is not fitted yet; call fit first") from exc

    def save(self, path) -> None:
        """Writes the fitted estimator as a model package (JSON + safetensors + manifest); see `luoshu.ml.load`."""
        from luoshu.ml.io import save

        save(self, path)

    def _fitted_state(self) -> dict:
        """The fitted attributes to store: every attribute ending in `_` (override to store less or more)."""
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}

    def _restore_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
