"""Nearest neighbours by brute force on batched distance kernels: `KNeighborsClassifier`.

Queries go in chunks; each chunk's distances to every training row are one matrix product
(``||q||^2 - 2 q.t + ||t||^2`` for Euclidean, a normalised product for cosine, `torch.cdist` for
Manhattan) followed by a compiled top-k pass (`_smallest_k`: one comparison per candidate once the row's k best
are found, where `torch.topk` sorts blocks), so memory stays at one cache-sized chunk x n_train block.

Dense float64 Euclidean queries are screened in float32 (half the GEMM's and the top-k's memory traffic, twice
its SIMD width): each row keeps its best `k + 4` candidates by the float32 score, which are then rescored in
float64 (`_rescore`); a row whose float64 k-th score is not below every uncandidate's float32 score by more
than a bound on the float32 rounding error is recomputed in float64 in full. So the neighbours and distances
are the float64 ones.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import ClassifierMixin

from luoshu.ml._validation import FLOATS, check_int, dense, row_slices, row_sq_norms
from luoshu.ml.base import DataError, Estimator, check_choice, check_X, check_X_y, encode_labels

# query rows per chunk x training rows: a distance block of <= 2 MB stays in the L2 cache from the GEMM that
# writes it to the top-k that reads it; blocks 16x larger run 3-4x slower
_BLOCK_BYTES = 1 << 21
_MIN_CHUNK = 16  # query rows: below this the GEMM's shape wastes more than the cache saves

METRICS = ("euclidean", "minkowski", "manhattan", "cosine")


@numba.njit(nogil=True, cache=True)
def _smallest_k(D, k, vals, idx):  # pragma: no cover - compiled
    """Per row of D: the k smallest values ascending, and their columns (equal values: lower column first)."""
    n, m = D.shape
    for i in range(n):
        count = 0
        for j in range(m):
            v = D[i, j]
            if count == k and not v < vals[i, k - 1]:
                continue
            # insertion into the sorted list of the row's best so far
            pos = count if count < k else k - 1
            while pos > 0 and vals[i, pos - 1] > v:
                vals[i, pos] = vals[i, pos - 1]
                idx[i, pos] = idx[i, pos - 1]
                pos -= 1
            vals[i, pos] = v
            idx[i, pos] = j
            if count < k:
                count += 1


_F32_UNIT = 2.0**-24  # float32's unit roundoff


@numba.njit(nogil=True, cache=True)
def _rescore(Q, T, t_sq, cand, screen_vals, slack, k, vals, idx):  # pragma: no cover - compiled
    """Per query row: float64 scores ||t||^2 - 2 q.t of its candidates `cand` (ascending by the float32 score
    `screen_vals`), the k smallest into vals/idx (equal values: lower column first). Returns a flag per row:
    True where every non-candidate, whose float32 score is >= the last candidate's, is provably no better
    (float32 error <= slack[i]) than the k-th."""
    n, m = cand.shape
    dim = Q.shape[1]
    exact = np.empty(m)
    ok = np.ones(n, np.bool_)
    for i in range(n):
        for c in range(m):
            t = cand[i, c]
            dot = 0.0
            for f in range(dim):
                dot += Q[i, f] * T[t, f]
            exact[c] = t_sq[t] - 2.0 * dot
        for c in range(k):  # selection of the k smallest by (score, column)
            best = -1
            for e in range(m):
                if exact[e] == np.inf:
                    continue
                if best < 0 or exact[e] < exact[best] or (exact[e] == exact[best] and cand[i, e] < cand[i, best]):
                    best = e
            vals[i, c] = exact[best]
            idx[i, c] = cand[i, best]
            exact[best] = np.inf
        ok[i] = vals[i, k - 1] < screen_vals[i, m - 1] - slack[i]
    return ok


def _dot_t(A, B) -> torch.Tensor:
    """A @ B.T for dense tensors or SciPy CSR matrices (SciPy does the sparse products)."""
    if sp.issparse(A) or sp.issparse(B):
        a = A if sp.issparse(A) else A.numpy()
        b = B if sp.issparse(B) else B.numpy()
        out = a @ b.T
        return torch.from_numpy(np.asarray(out.todense() if sp.issparse(out) else out))
    return A @ B.T


class KNeighborsClassifier(ClassifierMixin, Estimator):
    """k-nearest-neighbour vote (uniform or 1/distance weights) by brute force.

    metric: "euclidean" (= "minkowski" with p=2), "manhattan" (= "minkowski" with p=1) or "cosine".
    Ties in the vote go to the smallest class label; equidistant neighbours are ordered by training row.
    """

    def __init__(self, n_neighbors: int = 5, *, weights: str = "uniform", metric: str = "minkowski", p: int = 2):
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.metric = metric
        self.p = p

    def _metric(self) -> str:
        check_choice(self, "metric", self.metric, METRICS)
        if self.metric == "minkowski":
            check_choice(self, "p", self.p, (1, 2))
            return "euclidean" if self.p == 2 else "manhattan"
        return self.metric

    def fit(self, X, y) -> KNeighborsClassifier:
        check_int(self, "n_neighbors", self.n_neighbors)
        check_choice(self, "weights", self.weights, ("uniform", "distance"))
        metric = self._metric()
        X, y = check_X_y(self, X, y)  # float64: distances to compare across queries
        self.classes_, self._y = encode_labels(self, y)
        self._y = torch.from_numpy(self._y.astype(np.int64))
        self._fit_X = X if sp.issparse(X) and metric != "manhattan" else dense(X)
        if metric == "cosine":
            norms = row_sq_norms(self._fit_X).sqrt().clamp_min(1e-12)
            self._fit_X = (
                (sp.diags(1 / norms.numpy()) @ self._fit_X).tocsr()
                if sp.issparse(self._fit_X)
                else self._fit_X / norms[:, None]
            )
        self._fit_sq = row_sq_norms(self._fit_X)
        self._metric_ = metric
        self._dtype = X.dtype
        self._set_screen()
        self.n_samples_fit_ = X.shape[0]
        return self

    def _set_screen(self) -> None:
        """The float32 copy of the training rows that screens dense float64 Euclidean queries (or None)."""
        X = self._fit_X
        screen = self._metric_ == "euclidean" and not sp.issparse(X) and X.dtype == torch.float64
        self._screen_X = X.float() if screen else None
        self._screen_sq = self._fit_sq.float() if screen else None
        self._fit_norm_max = float(self._fit_sq.max().sqrt()) if screen and X.shape[0] else 0.0

    def _chunk_rows(self, itemsize: int) -> int:
        return max(_MIN_CHUNK, _BLOCK_BYTES // (itemsize * max(self.n_samples_fit_, 1)))

    def _screened(self, Q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(squared distances, indices) of the k nearest training rows of dense float64 queries Q by float32
        screening and float64 rescoring, and the rows the float32 bound could not certify (done in float64)."""
        n, (n_fit, dim) = Q.shape[0], self._screen_X.shape
        m = min(n_fit, k + 4)
        Q32 = Q.float()
        screen_vals = torch.empty(n, m, dtype=torch.float32)
        cand = torch.empty(n, m, dtype=torch.int64)
        chunk = self._chunk_rows(4)
        partial = torch.empty(min(chunk, n), n_fit, dtype=torch.float32)
        for s in row_slices(n, chunk):
            block = partial[: s.stop - s.start]
            torch.addmm(self._screen_sq[None, :], Q32[s], self._screen_X.T, alpha=-2, out=block)
            _smallest_k(block.numpy(), m, screen_vals[s].numpy(), cand[s].numpy())
        # |error| of a float32 score: inputs rounded (2u), the dot product over dim terms (dim u) and the adds
        # of ||t||^2 (4u, with its own rounding), each times the size of its terms; twice that first-order bound
        q_sq = row_sq_norms(Q)
        slack = 2 * _F32_UNIT * (2 * (dim + 4) * q_sq.sqrt() * self._fit_norm_max + 4 * self._fit_norm_max**2)
        if m == n_fit:
            slack = torch.full_like(slack, -np.inf)  # every training row is a candidate: nothing to certify
        vals = torch.empty(n, k, dtype=torch.float64)
        idx = torch.empty(n, k, dtype=torch.int64)
        ok = _rescore(
            Q.numpy(), self._fit_X.numpy(), self._fit_sq.numpy(), cand.numpy(), screen_vals.double().numpy(),
            slack.numpy(), k, vals.numpy(), idx.numpy(),
        )  # fmt: skip
        vals += q_sq[:, None]
        redo = torch.from_numpy(~ok).nonzero()[:, 0]
        if redo.numel():
            vals[redo], idx[redo] = self._nearest(Q[redo], k)
        return vals, idx, redo

    def _nearest(self, X, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances, squared for Euclidean, indices) of the k nearest training rows, chunk by chunk."""
        n = X.shape[0]
        vals = torch.empty(n, k, dtype=self._fit_sq.dtype)
        idx = torch.empty(n, k, dtype=torch.int64)
        for s in row_slices(n, self._chunk_rows(self._fit_sq.element_size())):
            Q = X[s].astype(self._dtype) if sp.issparse(X) else dense(X[s]).to(self._fit_sq.dtype)
            d, offset = self._distances(Q)
            _smallest_k(d.contiguous().numpy(), k, vals[s].numpy(), idx[s].numpy())
            if offset is not None:
                vals[s] += offset[:, None]
        return vals, idx

    def _distances(self, Q) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(a score per training row that ranks like the distance, what each query row adds to it to give
        the distance or None). Euclidean ranks by ||t||^2 - 2 q.t, one fused GEMM; ||q||^2 is added to the
        k kept values only."""
        if self._metric_ == "manhattan":
            return torch.cdist(dense(Q), self._fit_X, p=1), None
        if self._metric_ == "cosine":
            return 1 - _dot_t(Q, self._fit_X), None
        if sp.issparse(Q) or sp.issparse(self._fit_X):
            partial = _dot_t(Q, self._fit_X).mul_(-2).add_(self._fit_sq[None, :])
        else:
            partial = torch.addmm(self._fit_sq[None, :], Q, self._fit_X.T, alpha=-2)
        return partial, row_sq_norms(Q)

    def kneighbors(self, X=None, n_neighbors: int | None = None, return_distance: bool = True):
        """(distances, indices) of the `n_neighbors` nearest training rows of each query row. X=None queries
        the training rows themselves, each excluding itself (as scikit-learn)."""
        self._check_fitted("n_samples_fit_")
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        check_int(self, "n_neighbors", k)
        query_is_train = X is None
        if query_is_train:
            X = self._fit_X if sp.issparse(self._fit_X) else self._fit_X.numpy()
            k_search = k + 1
        else:
            X = check_X(self, X, reset=False, dtype=FLOATS)
            if self._metric_ == "cosine":
                norms = row_sq_norms(X if sp.issparse(X) else dense(X)).sqrt().clamp_min(1e-12).numpy()
                X = (sp.diags(1 / norms) @ X).tocsr() if sp.issparse(X) else X / norms[:, None]
            k_search = k
        if k_search > self.n_samples_fit_:
            raise DataError(
                f"KNeighborsClassifier: Expected n_neighbors <= n_samples_fit, but "
                f"n_neighbors = {k_search}, n_samples_fit = {self.n_samples_fit_}, "
                f"n_samples = {X.shape[0]}"
            )
        if self._screen_X is not None and not sp.issparse(X):
            vals, idx, _ = self._screened(dense(X).to(torch.float64), k_search)
        else:
            vals, idx = self._nearest(X, k_search)
        dist, ind = vals.clamp_min_(0), idx
        if query_is_train:
            # drop each row's own index (or, among duplicates found first, the farthest hit)
            own = idx == torch.arange(idx.shape[0])[:, None]
            drop = torch.where(own.any(1), own.to(torch.int8).argmax(1), torch.full((idx.shape[0],), k))
            keep = torch.ones_like(idx, dtype=torch.bool)
            keep[torch.arange(idx.shape[0]), drop] = False
            dist, ind = vals[keep].reshape(-1, k), idx[keep].reshape(-1, k)
        if self._metric_ == "euclidean":
            dist = dist.sqrt_()
        return (dist.numpy(), ind.numpy()) if return_distance else ind.numpy()

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities: the (weighted) share of each class among the neighbours."""
        dist, ind = self.kneighbors(X)
        dist, ind = torch.from_numpy(dist), torch.from_numpy(ind)
        labels = self._y[ind]
        if self.weights == "uniform":
            w = torch.ones_like(dist)
        else:
            zero = dist == 0
            # an exact match decides alone (as scikit-learn): weight 1 on zero distances, 0 elsewhere
            w = torch.where(zero.any(1, keepdim=True), zero.to(dist.dtype), 1 / dist.clamp_min(1e-300))
        votes = torch.zeros(dist.shape[0], len(self.classes_), dtype=dist.dtype).scatter_add_(1, labels, w)
        return (votes / votes.sum(1, keepdim=True)).numpy()

    def predict(self, X) -> np.ndarray:
        best = np.argmax(self.predict_proba(X), axis=1)
        return self.classes_[best]

    def _fitted_state(self) -> dict:
        state = super()._fitted_state()
        X = self._fit_X
        state["fit_rows_"] = (
            {"indptr": X.indptr, "indices": X.indices, "data": X.data, "shape": list(X.shape)}
            if sp.issparse(X)
            else X.numpy()
        )
        state["fit_labels_"] = self._y.numpy()
        return state

    def _restore_state(self, state: dict) -> None:
        state = dict(state)
        rows, labels = state.pop("fit_rows_"), state.pop("fit_labels_")
        super()._restore_state(state)
        self._fit_X = (
            sp.csr_matrix((rows["data"], rows["indices"], rows["indptr"]), shape=tuple(rows["shape"]))
            if isinstance(rows, dict)
            else torch.from_numpy(rows)
        )
        self._y = torch.from_numpy(labels)
        self._fit_sq = row_sq_norms(self._fit_X)
        self._metric_ = self._metric()
        self._dtype = np.float64
        self._set_screen()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags
