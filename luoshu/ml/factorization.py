"""Matrix factorisation for recommendation: `MatrixFactorization` (ALS or SGD; explicit ratings or implicit
feedback).

Explicit feedback minimises sum_(u,i) (r_ui - mean - p_u.q_i)^2 + reg (n_u |p_u|^2 + n_i |q_i|^2) (ALS-WR,
Zhou et al. 2008: per-rating regularisation, the same objective per-rating SGD minimises). Implicit feedback
is Hu, Koren & Volinsky (2008): preference 1 on every observed pair with confidence 1 + alpha r_ui, 0 with
confidence 1 elsewhere, + reg (|P|^2 + |Q|^2). An ALS half-step is one batched solve: the per-user Gram
matrices are scattered from all ratings at once (`index_add_` of outer products, in chunks), then
`torch.linalg.solve` solves every user's system together.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from luoshu.ml._validation import check_int, rng_of
from luoshu.ml.base import DataError, Estimator, ParameterError, check_choice, check_positive

_OUTER_ELEMENTS = 1 << 23  # ratings per chunk x factors^2 while scattering Gram matrices


def _interactions(estimator, X, y):
    """(users, items, values, n_users, n_items) from (user, item) pairs + y, or from a user x item CSR matrix."""
    name = type(estimator).__name__
    if sp.issparse(X):
        if y is not None:
            raise DataError(
                f"{name}: give either a user x item sparse matrix or (user, item) pairs with y, not "
                "a sparse matrix and y"
            )
        M = sp.coo_matrix(X)
        users, items, values = M.row.astype(np.int64), M.col.astype(np.int64), M.data.astype(np.float64)
        shape = M.shape
    else:
        pairs = np.asarray(X)
        if pairs.ndim != 2 or pairs.shape[1] != 2:
            raise DataError(
                f"{name}: X must be (user, item) pairs of shape (n, 2) or a user x item sparse matrix, "
                f"found shape {pairs.shape}"
            )
        if pairs.size and not np.all(np.isfinite(pairs.astype(np.float64))):
            raise DataError(f"{name}: X contains NaN or infinity; (user, item) pairs must be integer ids")
        if pairs.size and (np.any(pairs != np.round(pairs)) or pairs.min() < 0):
            raise DataError(f"{name}: user and item ids must be non-negative integers")
        users, items = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
        values = np.ones(len(users)) if y is None else np.asarray(y, dtype=np.float64).reshape(-1)
        if len(values) != len(users):
            raise DataError(f"{name}: {len(users)} (user, item) pairs but {len(values)} values in y")
        shape = (int(users.max()) + 1 if len(users) else 0, int(items.max()) + 1 if len(items) else 0)
    if len(users) == 0:
        raise DataError(f"{name}: no interactions to fit (found 0 ratings)")
    if not np.all(np.isfinite(values)):
        raise DataError(f"{name}: the ratings contain NaN or infinity")
    return users, items, values, shape[0], shape[1]


def _scatter_normal_equations(
    rows: torch.Tensor, other: torch.Tensor, gram_weight: torch.Tensor, rhs_weight: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A[r] = sum over ratings of r: w_g o o^T, b[r] = sum w_r o, for the other side's factors o."""
    f = other.shape[1]
    A = torch.zeros(n_rows, f, f, dtype=other.dtype)
    b = torch.zeros(n_rows, f, dtype=other.dtype)
    step = max(1, _OUTER_ELEMENTS // (f * f))
    for start in range(0, len(rows), step):
        r, o = rows[start : start + step], other[start : start + step]
        A.index_add_(0, r, (o * gram_weight[start : start + step, None])[:, :, None] * o[:, None, :])
        b.index_add_(0, r, o * rhs_weight[start : start + step, None])
    return A, b


class MatrixFactorization(Estimator):
    """Low-rank factorisation R ~ mean + P Q^T of a user x item matrix.

    fit(X, y): X is (user, item) integer pairs of shape (n, 2) with ratings y (implicit: y are interaction
    strengths, default 1), or a user x item SciPy sparse matrix of ratings with y=None. `predict(pairs)` gives
    the model's score of each pair; `recommend(users, k)` the k best-scoring items per user.

    solver "als" (alternating least squares, exact per half-step) or "sgd" (mini-batch SGD on the same
    objective; implicit feedback samples `negatives` unobserved items per observed pair).
    """

    def __init__(
        self,
        n_factors: int = 10,
        *,
        solver: str = "als",
        feedback: str = "explicit",
        reg: float = 0.05,
        alpha: float = 10.0,
        n_iter: int = 15,
        lr: float = 0.05,
        batch_size: int = 1024,
        negatives: int = 4,
        init_std: float = 0.1,
        random_state=None,
    ):
        self.n_factors = n_factors
        self.solver = solver
        self.feedback = feedback
        self.reg = reg
        self.alpha = alpha
        self.n_iter = n_iter
        self.lr = lr
        self.batch_size = batch_size
        self.negatives = negatives
        self.init_std = init_std
        self.random_state = random_state

    def _check_params(self) -> None:
        check_int(self, "n_factors", self.n_factors)
        check_int(self, "n_iter", self.n_iter)
        check_int(self, "batch_size", self.batch_size)
        check_int(self, "negatives", self.negatives, low=0)
        check_choice(self, "solver", self.solver, ("als", "sgd"))
        check_choice(self, "feedback", self.feedback, ("explicit", "implicit"))
        check_positive(self, lr=self.lr, init_std=self.init_std, alpha=self.alpha)
        if not (isinstance(self.reg, int | float) and self.reg >= 0):
            raise ParameterError(f"MatrixFactorization: reg must be a non-negative number, found {self.reg!r}")

    def fit(self, X, y=None) -> MatrixFactorization:
        self._check_params()
        users, items, values, n_users, n_items = _interactions(self, X, y)
        if self.feedback == "implicit" and values.min() < 0:
            raise DataError(
                f"MatrixFactorization: implicit feedback must be non-negative interaction strengths, "
                f"found {values.min():g}"
            )
        rng = rng_of(self.random_state)
        f = self.n_factors
        P = torch.from_numpy(rng.normal(0, self.init_std, (n_users, f)))
        Q = torch.from_numpy(rng.normal(0, self.init_std, (n_items, f)))
        u, i, v = torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(values)
        mean = float(v.mean()) if self.feedback == "explicit" else 0.0
        if self.solver == "als":
            for _ in range(self.n_iter):
                P = self._als_half(u, i, v - mean, Q, n_users)
                Q = self._als_half(i, u, v - mean, P, n_items)
        else:
            P, Q = self._sgd(u, i, v - mean, P, Q, n_items, rng)
        self.user_factors_, self.item_factors_ = P.numpy(), Q.numpy()
        self.mean_ = mean
        self.n_users_, self.n_items_ = n_users, n_items
        self.n_features_in_ = 2  # predict takes (user, item) pairs
        return self

    def _als_half(
        self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, other: torch.Tensor, n_rows: int
    ) -> torch.Tensor:
        """The exact minimiser of the objective over one side's factors with the other side fixed."""
        f = other.shape[1]
        eye = torch.eye(f, dtype=other.dtype)
        o = other[cols]
        if self.feedback == "explicit":
            A, b = _scatter_normal_equations(rows, o, torch.ones_like(values), values, n_rows)
            counts = torch.bincount(rows, minlength=n_rows).to(other.dtype)
            # a row without ratings gets the regularised solution 0 (counts clamped so A stays invertible)
            A += self.reg * counts.clamp_min(1)[:, None, None] * eye
            if self.reg == 0:
                A += 1e-10 * eye
        else:
            confidence = 1 + self.alpha * values
            A, b = _scatter_normal_equations(rows, o, confidence - 1, confidence, n_rows)
            A += (other.T @ other + max(self.reg, 1e-10) * eye)[None]
        return torch.linalg.solve(A, b)

    def _sgd(self, u, i, v, P, Q, n_items: int, rng):
        n = len(u)
        reg, lr = self.reg, self.lr
        for _ in range(self.n_iter):
            order = torch.from_numpy(rng.permutation(n))
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                bu, bi, bv = u[idx], i[idx], v[idx]
                if self.feedback == "explicit":
                    target, weight = bv, torch.ones_like(bv)
                else:
                    neg_items = torch.from_numpy(rng.integers(0, n_items, len(idx) * self.negatives))
                    bu = torch.cat([bu, bu.repeat(self.negatives)])
                    bi = torch.cat([bi, neg_items])
                    target = torch.cat([torch.ones_like(bv), torch.zeros(len(neg_items), dtype=bv.dtype)])
                    weight = torch.cat([1 + self.alpha * bv, torch.ones(len(neg_items), dtype=bv.dtype)])
                pu, qi = P[bu], Q[bi]
                err = (weight * (target - (pu * qi).sum(1)))[:, None]
                # gradient steps of (per-rating) regularised squared error; index_add_ sums repeated ids
                P.index_add_(0, bu, lr * (err * qi - reg * pu))
                Q.index_add_(0, bi, lr * (err * pu - reg * qi))
        return P, Q

    def _pairs(self, X) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted("user_factors_")
        pairs = np.asarray(X)
        if pairs.ndim != 2 or pairs.shape[1] != 2:
            raise DataError(
                f"MatrixFactorization: expected (user, item) pairs of shape (n, 2), found shape {pairs.shape}"
            )
        if pairs.size and not np.all(np.isfinite(pairs.astype(np.float64))):
            raise DataError("MatrixFactorization: the pairs contain NaN or infinity")
        users, items = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
        for name, ids, n in (("user", users, self.n_users_), ("item", items, self.n_items_)):
            if ids.size and (ids.min() < 0 or ids.max() >= n):
                bad = ids[(ids < 0) | (ids >= n)][0]
                raise DataError(
                    f"MatrixFactorization: {name} id {bad} is unknown (the model has {n} {name}s, ids 0..{n - 1})"
                )
        return torch.from_numpy(users), torch.from_numpy(items)

    def predict(self, X) -> np.ndarray:
        """mean + p_u.q_i for each (user, item) pair."""
        u, i = self._pairs(X)
        P, Q = torch.from_numpy(self.user_factors_), torch.from_numpy(self.item_factors_)
        return ((P[u] * Q[i]).sum(1) + self.mean_).numpy()

    def score(self, X, y) -> float:
        """Minus the root-mean-square error of predict(X) against y (higher is better)."""
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        pred = self.predict(X)
        if len(y) != len(pred):
            raise DataError(f"MatrixFactorization: {len(pred)} pairs but {len(y)} values in y")
        return -float(np.sqrt(np.mean((pred - y) ** 2)))

    def recommend(self, users, k: int = 10) -> np.ndarray:
        """The k items of highest score for each user (n_users x k item ids, best first)."""
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        u, _ = self._pairs(np.stack([users, np.zeros_like(users)], 1))
        check_int(self, "k", k)
        scores = torch.from_numpy(self.user_factors_)[u] @ torch.from_numpy(self.item_factors_).T
        return torch.topk(scores, min(k, self.n_items_), dim=1).indices.numpy()
