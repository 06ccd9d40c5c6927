"""Naive Bayes classifiers: `GaussianNB` (dense features) and `MultinomialNB` (counts, dense or CSR).

Both reduce fitting to one one-hot matrix product per statistic and prediction to one product with the
per-class parameters, followed by a log-sum-exp normalisation.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import ClassifierMixin

from luoshu.ml._validation import check_nonnegative, dense
from luoshu.ml.base import Estimator, ParameterError, check_X, check_X_y, encode_labels


def _one_hot(encoded: np.ndarray, n_classes: int, dtype) -> torch.Tensor:
    idx = torch.from_numpy(encoded.astype(np.int64))
    return torch.zeros(len(encoded), n_classes, dtype=dtype).index_put_(
        (torch.arange(len(encoded)), idx), torch.ones((), dtype=dtype)
    )


class _BaseNB(ClassifierMixin, Estimator):
    def _joint_log_likelihood(self, X) -> torch.Tensor:
        raise NotImplementedError

    def predict_log_proba(self, X) -> np.ndarray:
        jll = self._joint_log_likelihood(X)
        return (jll - torch.logsumexp(jll, dim=1, keepdim=True)).numpy()

    def predict_proba(self, X) -> np.ndarray:
        return np.exp(self.predict_log_proba(X))

    def predict(self, X) -> np.ndarray:
        best = self._joint_log_likelihood(X).argmax(1).numpy()
        return self.classes_[best]

    def _priors(self, counts: torch.Tensor, given) -> torch.Tensor:
        if given is None:
            return counts / counts.sum()
        given = np.asarray(given, dtype=np.float64)
        if given.shape != (len(self.classes_),):
            raise ParameterError(
                f"{type(self).__name__}: the priors must have one value per class "
                f"({len(self.classes_)}), found shape {given.shape}"
            )
        if (given < 0).any() or not np.isclose(given.sum(), 1.0):
            raise ParameterError(
                f"{type(self).__name__}: the priors must be non-negative and sum to 1, found {given.tolist()}"
            )
        return torch.from_numpy(given).to(counts.dtype)


class GaussianNB(_BaseNB):
    """Gaussian naive Bayes: per class and feature a mean and a variance (plus `var_smoothing` times the
    largest feature variance, as scikit-learn)."""

    def __init__(self, *, priors=None, var_smoothing: float = 1e-9):
        self.priors = priors
        self.var_smoothing = var_smoothing

    def fit(self, X, y) -> GaussianNB:
        if not (isinstance(self.var_smoothing, int | float) and self.var_smoothing >= 0):
            raise ParameterError(
                f"GaussianNB: var_smoothing must be a non-negative number, found {self.var_smoothing!r}"
            )
        X, y = check_X_y(self, X, y, accept_sparse=False)
        classes, encoded = encode_labels(self, y)
        x = dense(X).to(torch.float64)
        Y = _one_hot(encoded, len(classes), torch.float64)
        counts = Y.sum(0)
        mean = (Y.T @ x) / counts[:, None]
        # E[(x - mean)^2] per class from centred rows: stabler than E[x^2] - mean^2
        centred = x - mean[torch.from_numpy(encoded)]
        var = (Y.T @ (centred * centred)) / counts[:, None]
        self.epsilon_ = float(self.var_smoothing * x.var(0, correction=0).max())
        self.classes_ = classes
        self.class_count_ = counts.numpy()
        self.class_prior_ = self._priors(counts, self.priors).numpy()
        self.theta_ = mean.numpy()
        self.var_ = (var + self.epsilon_).numpy()
        return self

    def _joint_log_likelihood(self, X) -> torch.Tensor:
        self._check_fitted("theta_")
        X = check_X(self, X, reset=False, accept_sparse=False)
        x = dense(X).to(torch.float64)
        mean, var = torch.from_numpy(self.theta_), torch.from_numpy(self.var_)
        inv = 1 / var
        # -1/2 sum_j (x_j - m_j)^2 / v_j expanded into two matrix products over all classes at once
        quad = (x * x) @ inv.T - 2 * x @ (mean * inv).T + (mean * mean * inv).sum(1)[None, :]
        log_norm = -0.5 * torch.log(2 * np.pi * var).sum(1)
        with np.errstate(divide="ignore"):
            log_prior = torch.from_numpy(np.log(self.class_prior_))
        return log_prior[None, :] + log_norm[None, :] - 0.5 * quad


class MultinomialNB(_BaseNB):
    """Multinomial naive Bayes on non-negative counts with additive (Laplace/Lidstone) smoothing `alpha`."""

    def __init__(self, *, alpha: float = 1.0, fit_prior: bool = True, class_prior=None):
        self.alpha = alpha
        self.fit_prior = fit_prior
        self.class_prior = class_prior

    def fit(self, X, y) -> MultinomialNB:
        if not (isinstance(self.alpha, int | float) and self.alpha >= 0):
            raise ParameterError(f"MultinomialNB: alpha must be a non-negative number, found {self.alpha!r}")
        X, y = check_X_y(self, X, y)
        check_nonnegative(self, X)
        classes, encoded = encode_labels(self, y)
        self.classes_ = classes
        Y = _one_hot(encoded, len(classes), torch.float64)
        if sp.issparse(X):
            counts = torch.from_numpy(np.asarray((sp.csr_matrix(Y.numpy().T) @ X).todense(), dtype=np.float64))
        else:
            counts = Y.T @ dense(X).to(torch.float64)
        class_count = Y.sum(0)
        smoothed = counts + self.alpha
        self.feature_count_ = counts.numpy()
        self.class_count_ = class_count.numpy()
        with np.errstate(divide="ignore"):
            self.feature_log_prob_ = (torch.log(smoothed) - torch.log(smoothed.sum(1, keepdim=True))).numpy()
            if self.class_prior is not None:
                prior = self._priors(class_count, self.class_prior)
            elif self.fit_prior:
                prior = class_count / class_count.sum()
            else:
                prior = torch.full((len(classes),), 1.0 / len(classes), dtype=torch.float64)
            self.class_log_prior_ = torch.log(prior).numpy()
        return self

    def _joint_log_likelihood(self, X) -> torch.Tensor:
        self._check_fitted("feature_log_prob_")
        X = check_X(self, X, reset=False)
        check_nonnegative(self, X)
        flp = torch.from_numpy(self.feature_log_prob_)
        if sp.issparse(X):
            jll = torch.from_numpy(np.asarray(X.astype(np.float64) @ self.feature_log_prob_.T))
        else:
            jll = dense(X).to(torch.float64) @ flp.T
        return jll + torch.from_numpy(self.class_log_prior_)[None, :]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.input_tags.positive_only = True
        tags.classifier_tags.poor_score = True  # as scikit-learn's: shifted blobs are not count data
        return tags
