"""Linear models: `LogisticRegression` (L1/L2/elastic-net, binary and multinomial), `LinearRegression`, `Ridge`,
`LinearSVC` (hinge / squared hinge), on torch float64 kernels.

The objectives are scikit-learn's, so the optimum is the same point:
- LogisticRegression: `C * sum(log loss) + (1 - l1_ratio)/2 ||W||^2 + l1_ratio ||W||_1`
  (intercept unpenalised; multinomial softmax for more than two classes). Smooth
  penalties go to L-BFGS, the L1 part to FISTA's soft-threshold.
- Ridge / LinearRegression: the closed form on centred data (minimum-norm least squares
  when alpha = 0).
- LinearSVC: liblinear's dual `min 1/2 a'(Q + D)a - 1'a, 0 <= a <= U` (hinge: U = C, D = 0;
  squared hinge: U = inf, D = 1/(2C)), one-vs-rest, the intercept a feature of value
  `intercept_scaling` that is penalised like the others; solved by projected FISTA.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import ClassifierMixin, RegressorMixin

from luoshu.ml.base import (
    DataError,
    Estimator,
    ParameterError,
    check_choice,
    check_positive,
    check_X,
    check_X_y,
    encode_labels,
    to_torch,
)
from luoshu.ml.solvers import fista, lbfgs, spectral_norm_sq

__all__ = ["LinearRegression", "LinearSVC", "LogisticRegression", "Ridge"]


class _Design:
    """X and X^T as torch operators (dense or sparse CSR), so models never branch on the format."""

    def __init__(self, X):
        self.n, self.d = X.shape
        self.sparse = sp.issparse(X)
        self.X = to_torch(X)
        self.Xt = to_torch(sp.csr_matrix(X.T)) if self.sparse else self.X.T

    def mv(self, W: torch.Tensor) -> torch.Tensor:
        return self.X @ W

    def rmv(self, R: torch.Tensor) -> torch.Tensor:
        return self.Xt @ R


def _linear_tags(tags):
    tags.input_tags.sparse = True
    return tags


class LogisticRegression(ClassifierMixin, Estimator):
    """Logistic regression with scikit-learn's objective; `penalty` in {"l2", "l1", "elasticnet", None}.

    With `ps="launch"` or `ps_addresses=` the weights live on parameter servers (binary, L2 or no
    penalty): `n_epochs`, `batch_size` and `learning_rate` set its mini-batch AdaGrad, `ps_table`
    names the servers' table. Without them (the default) the fit is L-BFGS / FISTA in this process.
    """

    def __init__(
        self,
        penalty: str | None = "l2",
        C: float = 1.0,
        l1_ratio: float = 0.5,
        fit_intercept: bool = True,
        max_iter: int = 1000,
        tol: float = 1e-6,
        ps: str | None = None,
        ps_addresses: list[str] | None = None,
        n_epochs: int = 20,
        batch_size: int = 256,
        learning_rate: float = 0.1,
        random_state: int | None = None,
        ps_table: str = "luoshu_ml_logistic",
    ):
        self.penalty = penalty
        self.C = C
        self.l1_ratio = l1_ratio
        self.fit_intercept = fit_intercept
        self.max_iter = max_iter
        self.tol = tol
        self.ps = ps
        self.ps_addresses = ps_addresses
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.random_state = random_state
        self.ps_table = ps_table

    def __sklearn_tags__(self):
        return _linear_tags(super().__sklearn_tags__())

    def _penalties(self) -> tuple[float, float]:
        """(L2 weight, L1 weight) of the penalty relative to the summed loss (i.e. divided by C)."""
        if self.penalty is None:
            return 0.0, 0.0
        if self.penalty == "l2":
            return 1.0 / self.C, 0.0
        if self.penalty == "l1":
            return 0.0, 1.0 / self.C
        r = self.l1_ratio
        return (1.0 - r) / self.C, r / self.C

    def fit(self, X, y):
        check_choice(self, "penalty", self.penalty, ("l2", "l1", "elasticnet", None))
        check_positive(self, C=self.C, max_iter=self.max_iter, tol=self.tol)
        if self.penalty == "elasticnet" and not 0.0 <= self.l1_ratio <= 1.0:
            raise ParameterError(f"LogisticRegression: l1_ratio must be in [0, 1], found {self.l1_ratio!r}")
        if self.ps is not None or self.ps_addresses is not None:
            return self._fit_on_servers(X, y)
        X, y = check_X_y(self, X, y)
        self.classes_, codes = encode_labels(self, y)
        self.feature_ids_ = None
        design = _Design(X)
        n, d = X.shape
        k = 1 if len(self.classes_) == 2 else len(self.classes_)
        codes_t = torch.from_numpy(codes)
        target = (codes_t == 1).double()[:, None] if k == 1 else torch.nn.functional.one_hot(codes_t, k).double()
        l2, l1 = self._penalties()
        # The loss is averaged (so tol does not scale with n); the penalties follow.
        l2, l1 = l2 / n, l1 / n
        fit_b = self.fit_intercept

        def unpack(theta):
            W = theta[: d * k].view(d, k)
            b = theta[d * k :] if fit_b else torch.zeros(k, dtype=torch.float64)
            return W, b

        def smooth(theta):
            W, b = unpack(theta)
            Z = design.mv(W) + b
            if k == 1:
                loss = torch.nn.functional.softplus(Z) - target * Z
                R = torch.sigmoid(Z) - target
            else:
                lse = torch.logsumexp(Z, dim=1, keepdim=True)
                loss = lse - (Z * target).sum(1, keepdim=True)
                R = torch.exp(Z - lse) - target
            gW = design.rmv(R) / n + l2 * W
            f = float(loss.sum()) / n + 0.5 * l2 * float((W * W).sum())
            g = torch.cat([gW.reshape(-1), R.sum(0) / n]) if fit_b else gW.reshape(-1)
            return f, g

        theta0 = torch.zeros(d * k + (k if fit_b else 0), dtype=torch.float64)
        if l1 == 0.0:
            theta, self.n_iter_ = lbfgs(smooth, theta0, max_iter=self.max_iter, tol=self.tol)
        else:

            def objective(theta):
                f, g = smooth(theta)
                return f, g

            def prox(v, step):
                out = v.clone()
                w = out[: d * k]
                out[: d * k] = torch.sign(w) * torch.clamp(w.abs() - step * l1, min=0.0)
                return out

            lip = spectral_norm_sq(design.mv, design.rmv, d) / n * (0.25 if k == 1 else 0.5) + l2 + 1.0 / n
            theta, self.n_iter_ = fista(
                objective, prox, theta0, lipschitz=lip, max_iter=self.max_iter * 20, tol=self.tol
            )
        W, b = unpack(theta)
        self.coef_ = W.T.contiguous().numpy()
        self.intercept_ = b.numpy().copy()
        self.n_iter_ = max(int(self.n_iter_), 1)
        return self

    def _fit_on_servers(self, X, y) -> LogisticRegression:
        from luoshu.ml.fm import SparseLogisticRegression
        from luoshu.ml.ps_training import rows_over_workers

        name = "LogisticRegression"
        if self.ps is not None:
            check_choice(self, "ps", self.ps, ("launch",))
        if self.penalty not in ("l2", None):
            raise ParameterError(
                f"{name}: training on parameter servers takes penalty 'l2' or None, found {self.penalty!r}"
            )
        if not self.fit_intercept:
            raise ParameterError(f"{name}: training on parameter servers fits an intercept; found fit_intercept=False")
        X, y = check_X_y(self, X, y)
        classes, _ = encode_labels(self, y)
        if len(classes) != 2:
            raise DataError(f"{name}: training on parameter servers is binary, found {len(classes)} classes")
        n_total = rows_over_workers(self, X.shape[0])
        # sklearn's C * sum(loss) + ||w||^2 / 2 is, per sample, mean(loss) + ||w||^2 / (2 C n)
        l2 = 0.0 if self.penalty is None else 1.0 / (self.C * n_total)
        inner = SparseLogisticRegression(
            n_epochs=self.n_epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            reg_linear=l2,
            random_state=self.random_state,
            ps_addresses=self.ps_addresses,
            ps=self.ps,
            ps_table=self.ps_table,
        ).fit(sp.csr_matrix(X), y)
        self.classes_ = inner.classes_
        self.feature_ids_ = inner.feature_ids_
        self.coef_ = inner.w_.T.copy()  # (1, len(feature_ids_))
        self.intercept_ = inner.w0_.copy()
        self.loss_curve_ = inner.loss_curve_
        self.n_iter_ = inner.n_iter_
        return self

    def decision_function(self, X) -> np.ndarray:
        self._check_fitted("coef_")
        X = check_X(self, X, reset=False)
        if getattr(self, "feature_ids_", None) is not None:
            from luoshu.ml.fm import columns_of_ids

            X = columns_of_ids(X, self.feature_ids_)
            if len(self.feature_ids_) == 0:  # columns_of_ids keeps one (empty) column
                return np.full(X.shape[0], float(self.intercept_[0]))
        Z = (to_torch(X) @ torch.from_numpy(self.coef_.T.copy())).numpy() + self.intercept_
        return Z[:, 0] if Z.shape[1] == 1 else Z

    def predict_proba(self, X) -> np.ndarray:
        Z = torch.from_numpy(np.asarray(self.decision_function(X)))
        if Z.dim() == 1:
            p = torch.sigmoid(Z)
            return torch.stack([1 - p, p], dim=1).numpy()
        return torch.softmax(Z, dim=1).numpy()

    def predict_log_proba(self, X) -> np.ndarray:
        return np.log(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        Z = self.decision_function(X)
        idx = (Z > 0).astype(np.int64) if Z.ndim == 1 else Z.argmax(1)
        return self.classes_[idx]


def _centred_solve(estimator, X, y, alpha: float, fit_intercept: bool):
    """Least squares with an L2 penalty `alpha` on the coefficients only; returns (coef (t, d), intercept (t,))."""
    n, d = X.shape
    Y = torch.from_numpy(np.asarray(y, dtype=np.float64).reshape(n, -1))
    design = _Design(X)
    if fit_intercept:
        x_mean = design.rmv(torch.ones(n, dtype=torch.float64)) / n
        y_mean = Y.mean(0)
    else:
        x_mean = torch.zeros(d, dtype=torch.float64)
        y_mean = torch.zeros(Y.shape[1], dtype=torch.float64)
    if design.sparse or alpha > 0:
        # Gram of the centred X without densifying a sparse X: X'X - n m m'
        if design.sparse:
            gram = (design.Xt @ design.X.to_dense()) if d * n <= 5e7 else None
            if gram is None:
                raise ParameterError(
                    f"{type(estimator).__name__}: a sparse X of {n} x {d} is too large for the closed-form solve"
                )
        else:
            gram = design.X.T @ design.X
        gram = gram - n * torch.outer(x_mean, x_mean)
        rhs = design.rmv(Y) - n * torch.outer(x_mean, y_mean)
        if alpha > 0:
            coef = torch.linalg.solve(gram + alpha * torch.eye(d, dtype=torch.float64), rhs)
        else:
            coef = torch.linalg.lstsq(gram, rhs, driver="gelsd").solution
    else:
        Xc = design.X - x_mean
        coef = torch.linalg.lstsq(Xc, Y - y_mean, driver="gelsd").solution
    intercept = y_mean - x_mean @ coef
    return coef.T.contiguous().numpy(), intercept.numpy()


class _LeastSquares(RegressorMixin, Estimator):
    def __sklearn_tags__(self):
        tags = _linear_tags(super().__sklearn_tags__())
        tags.target_tags.multi_output = True
        return tags

    def _fit(self, X, y, alpha: float):
        X, y = check_X_y(self, X, y, multi_output=True, y_numeric=True)
        coef, intercept = _centred_solve(self, X, y, alpha, self.fit_intercept)
        if np.ndim(y) == 1:
            coef, intercept = coef[0], float(intercept[0])
        self.coef_, self.intercept_ = coef, intercept
        return self

    def predict(self, X) -> np.ndarray:
        self._check_fitted("coef_")
        X = check_X(self, X, reset=False)
        coef = np.atleast_2d(self.coef_)
        out = (to_torch(X) @ torch.from_numpy(np.ascontiguousarray(coef.T))).numpy() + self.intercept_
        return out[:, 0] if np.ndim(self.coef_) == 1 else out


class LinearRegression(_LeastSquares):
    """Ordinary least squares (minimum-norm solution when X is rank deficient)."""

    def __init__(self, fit_intercept: bool = True):
        self.fit_intercept = fit_intercept

    def fit(self, X, y):
        return self._fit(X, y, 0.0)


class Ridge(_LeastSquares):
    """Least squares with `alpha * ||w||^2` (intercept unpenalised), solved in closed form."""

    def __init__(self, alpha: float = 1.0, fit_intercept: bool = True):
        self.alpha = alpha
        self.fit_intercept = fit_intercept

    def fit(self, X, y):
        if not (isinstance(self.alpha, (int, float, np.number)) and self.alpha >= 0):
            raise ParameterError(f"Ridge: alpha must be a non-negative number, found {self.alpha!r}")
        return self._fit(X, y, float(self.alpha))


class LinearSVC(ClassifierMixin, Estimator):
    """A linear support-vector classifier (liblinear's formulation, one-vs-rest for several classes)."""

    def __init__(
        self,
        C: float = 1.0,
        loss: str = "squared_hinge",
        fit_intercept: bool = True,
        intercept_scaling: float = 1.0,
        max_iter: int = 2000,
        tol: float = 1e-4,
    ):
        self.C = C
        self.loss = loss
        self.fit_intercept = fit_intercept
        self.intercept_scaling = intercept_scaling
        self.max_iter = max_iter
        self.tol = tol

    def __sklearn_tags__(self):
        return _linear_tags(super().__sklearn_tags__())

    def fit(self, X, y):
        check_choice(self, "loss", self.loss, ("hinge", "squared_hinge"))
        check_positive(self, C=self.C, max_iter=self.max_iter, tol=self.tol, intercept_scaling=self.intercept_scaling)
        X, y = check_X_y(self, X, y)
        self.classes_, codes = encode_labels(self, y)
        if self.fit_intercept:
            col = np.full((X.shape[0], 1), float(self.intercept_scaling))
            X = sp.hstack([X, sp.csr_matrix(col)], format="csr") if sp.issparse(X) else np.hstack([X, col])
        design = _Design(X)
        n, d = X.shape
        k = 1 if len(self.classes_) == 2 else len(self.classes_)
        codes_t = torch.from_numpy(codes)
        if k == 1:
            sign = torch.where(codes_t == 1, 1.0, -1.0).double()[:, None]
        else:
            sign = 2.0 * torch.nn.functional.one_hot(codes_t, k).double() - 1.0
        C = float(self.C)
        diag, upper = (0.0, C) if self.loss == "hinge" else (0.5 / C, float("inf"))

        def dual(a_flat):
            A = a_flat.view(n, k)
            W = design.rmv(A * sign)  # (d, k): w_k = sum_i a_ik y_ik x_i
            f = 0.5 * float((W * W).sum()) + 0.5 * diag * float((A * A).sum()) - float(A.sum())
            G = sign * design.mv(W) + diag * A - 1.0
            return f, G.reshape(-1)

        def project(v, step):
            return v.clamp(min=0.0, max=upper)

        lip = spectral_norm_sq(design.mv, design.rmv, d) + diag
        a, self.n_iter_ = fista(
            dual, project, torch.zeros(n * k, dtype=torch.float64), lipschitz=lip, max_iter=self.max_iter, tol=self.tol
        )
        W = design.rmv(a.view(n, k) * sign).T.contiguous()  # (k, d)
        if self.fit_intercept:
            self.coef_ = W[:, :-1].contiguous().numpy()
            self.intercept_ = (W[:, -1] * float(self.intercept_scaling)).numpy().copy()
        else:
            self.coef_, self.intercept_ = W.numpy(), np.zeros(k)
        self.n_iter_ = max(int(self.n_iter_), 1)
        return self

    def decision_function(self, X) -> np.ndarray:
        self._check_fitted("coef_")
        X = check_X(self, X, reset=False)
        Z = (to_torch(X) @ torch.from_numpy(self.coef_.T.copy())).numpy() + self.intercept_
        return Z[:, 0] if Z.shape[1] == 1 else Z

    def predict(self, X) -> np.ndarray:
        Z = self.decision_function(X)
        idx = (Z > 0).astype(np.int64) if Z.ndim == 1 else Z.argmax(1)
        return self.classes_[idx]
