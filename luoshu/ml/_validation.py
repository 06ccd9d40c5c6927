"""Input checks and NumPy/SciPy → torch conversion shared by the decomposition, clustering, neighbours and
naive-Bayes estimators.

Checks run before any fitted state changes (DESIGN §7), and their failures are `MLInputError`, a
`luoshu.Error` that is also a `ValueError`, so scikit-learn's tooling (estimator checks, `GridSearchCV`'s
error handling) treats them as the `ValueError`s it expects.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.exceptions import NotFittedError as _SklearnNotFittedError

from luoshu.core.errors import Error


class MLInputError(Error, ValueError):
    """Data an estimator cannot take: NaN/inf, empty, the wrong number of features, bad labels or values."""


class NotFittedError(Error, _SklearnNotFittedError):
    """An estimator used before `fit` (also scikit-learn's `NotFittedError`, a ValueError/AttributeError)."""


def _sklearn_validate(estimator, X, y, reset: bool, **kwargs):
    from sklearn.utils.validation import validate_data

    try:
        if y is None:
            return validate_data(estimator, X, reset=reset, **kwargs)
        return validate_data(estimator, X, y, reset=reset, **kwargs)
    except ValueError as exc:
        if isinstance(exc, Error):
            raise
        raise MLInputError(f"{type(estimator).__name__}: {exc}") from None


def check_X(estimator, X, *, reset: bool, accept_sparse: bool = True, nonnegative: bool = False,
            min_samples: int = 1) -> Any:
    """X as a float32/float64 array or CSR matrix; records (reset) or checks `n_features_in_`."""
    X = _sklearn_validate(estimator, X, None, reset, accept_sparse="csr" if accept_sparse else False,
                          dtype=[np.float64, np.float32], ensure_min_samples=min_samples)
    if nonnegative:
        _check_nonnegative(estimator, X)
    return X


def check_X_y(estimator, X, y, *, accept_sparse: bool = True, nonnegative: bool = False,
              y_numeric: bool = False) -> tuple[Any, np.ndarray]:
    if y is None:
        raise MLInputError(f"{type(estimator).__name__} requires y to be passed, but the target y is None")
    X, y = _sklearn_validate(estimator, X, y, True, accept_sparse="csr" if accept_sparse else False,
                             dtype=[np.float64, np.float32], y_numeric=y_numeric)
    if nonnegative:
        _check_nonnegative(estimator, X)
    return X, y


def _check_nonnegative(estimator, X) -> None:
    values = X.data if sp.issparse(X) else X
    if values.size and values.min() < 0:
        raise MLInputError(f"{type(estimator).__name__}: Negative values in data passed to X: "
                           f"expected non-negative counts, found the value {values.min():g}")


def class_labels(estimator, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes_, y encoded as 0..n_classes-1); refuses regression targets and multi-output y."""
    from sklearn.utils.multiclass import check_classification_targets

    try:
        check_classification_targets(y)
    except ValueError as exc:
        raise MLInputError(f"{type(estimator).__name__}: {exc}") from None
    classes, encoded = np.unique(y, return_inverse=True)
    return classes, encoded


def check_fitted(estimator, attribute: str) -> None:
    if not hasattr(estimator, attribute):
        raise NotFittedError(f"This {type(estimator).__name__} instance is not fitted yet. Call 'fit' with "
                             "appropriate arguments before using this estimator.")


def check_positive_int(estimator, name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise MLInputError(f"{type(estimator).__name__}: {name} must be an integer >= {low}, found {value!r}")


def check_choice(estimator, name: str, value, choices) -> None:
    if value not in choices:
        raise MLInputError(f"{type(estimator).__name__}: {name} must be one of {list(choices)}, found {value!r}")


def rng_of(random_state) -> np.random.Generator:
    """A NumPy generator from an int seed, a RandomState/Generator, or None (fresh entropy)."""
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, np.random.RandomState):
        return np.random.default_rng(random_state.randint(0, 2**31 - 1))
    return np.random.default_rng(random_state)


def to_torch(X) -> torch.Tensor:
    """A dense array as a torch tensor sharing its memory; a CSR matrix as a torch sparse CSR tensor."""
    if sp.issparse(X):
        X = X.tocsr()
        return torch.sparse_csr_tensor(torch.from_numpy(X.indptr.astype(np.int64)),
                                       torch.from_numpy(X.indices.astype(np.int64)),
                                       torch.from_numpy(np.ascontiguousarray(X.data)), size=X.shape,
                                       check_invariants=False)
    return torch.from_numpy(np.ascontiguousarray(X))


def row_sq_norms(X) -> torch.Tensor:
    """Squared Euclidean norm of each row of a dense or CSR tensor/matrix."""
    if sp.issparse(X):
        return torch.from_numpy(np.asarray(X.multiply(X).sum(axis=1)).ravel().astype(X.dtype))
    return (X * X).sum(1)


def matmul_t(X, Y: torch.Tensor, X_torch: torch.Tensor | None = None) -> torch.Tensor:
    """X @ Y.T for a dense tensor or a CSR matrix X (given as the torch CSR tensor X_torch) and dense Y."""
    if X_torch is not None and X_torch.layout == torch.sparse_csr:
        return torch.sparse.mm(X_torch, Y.T.contiguous())
    return X @ Y.T


def row_slices(n: int, rows_per_chunk: int):
    for start in range(0, n, rows_per_chunk):
        yield slice(start, min(start + rows_per_chunk, n))
