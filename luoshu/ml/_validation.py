"""Helpers of the clustering, neighbours, naive-Bayes and decomposition estimators beyond `luoshu.ml.base`:
count-data and integer-parameter checks, seeding, and row-chunked kernels."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from luoshu.ml.base import DataError, ParameterError


def check_nonnegative(estimator, X) -> None:
    """Refuses negative entries (count data); the message keeps scikit-learn's "Negative values in data"."""
    values = X.data if sp.issparse(X) else X
    if values.size and values.min() < 0:
        raise DataError(
            f"{type(estimator).__name__}: Negative values in data passed to X: expected non-negative "
            f"counts, found the value {values.min():g}"
        )


def check_int(estimator, name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ParameterError(f"{type(estimator).__name__}: {name} must be an integer >= {low}, found {value!r}")


def rng_of(random_state) -> np.random.Generator:
    """A NumPy generator from an int seed, a RandomState/Generator, or None (fresh entropy)."""
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, np.random.RandomState):
        return np.random.default_rng(random_state.randint(0, 2**31 - 1))
    return np.random.default_rng(random_state)


def dense(X) -> torch.Tensor:
    """A validated X as a dense torch tensor in its own float dtype (no copy for dense input)."""
    if sp.issparse(X):
        return torch.from_numpy(X.toarray())
    X = np.ascontiguousarray(X)
    return torch.from_numpy(X if X.flags.writeable else X.copy())


def row_sq_norms(X) -> torch.Tensor:
    """Squared Euclidean norm of each row of a dense tensor or a CSR matrix."""
    if sp.issparse(X):
        return torch.from_numpy(np.asarray(X.multiply(X).sum(axis=1)).ravel().astype(X.dtype))
    return (X * X).sum(1)


def row_slices(n: int, rows_per_chunk: int):
    for start in range(0, n, rows_per_chunk):
        yield slice(start, min(start + rows_per_chunk, n))


FLOATS = [np.float64, np.float32]  # float32 input stays float32 (half the memory, twice the GEMM speed)
