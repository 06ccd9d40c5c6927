"""Clustering: `KMeans` (k-means++ init, Lloyd iterations on batched distance kernels, optionally across the
workers of a `luoshu launch` job) and `MiniBatchKMeans`.

The distance kernel is ``||x||^2 - 2 x.c + ||c||^2`` as one matrix product per chunk of rows (dense or CSR),
so a Lloyd step is a GEMM per cache-sized chunk, then (dense rows) one compiled pass over the chunk that
takes each row's nearest centre and adds the row to that centre's sum and count. In a distributed fit
every worker holds its own rows; k-means++ draws each candidate from the global D^2 distribution (every
worker uses the same generator, the owner of the drawn row contributes it through an all-reduce), and
each Lloyd step all-reduces the per-cluster sums and counts, so the centres equal those of one process
on the concatenated rows.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import ClusterMixin, TransformerMixin

from luoshu.ml._validation import FLOATS, check_int, dense, rng_of, row_slices, row_sq_norms
from luoshu.ml.base import DataError, Estimator, ParameterError, check_choice, check_X

_CHUNK_ELEMENTS = 1 << 22  # rows per chunk x clusters: bounds the distance block at ~32 MB in float64
# rows per chunk x features: the chunk's rows (<= 1 MB) stay in the L2 cache from the distance GEMM to the
# per-cluster sums that read them again; one block of all rows goes out to memory and back (2x slower)
_CACHE_ELEMENTS = 1 << 17


class _Comm:
    """Sums over the workers of a distributed fit (identities in one process), on the all-reduce the
    data-parallel GBDT uses (`luoshu.ml.gbdt._Collectives`), plus this worker's rank."""

    def __init__(self, distributed: bool):
        from luoshu.ml.gbdt import _Collectives

        self.collectives = _Collectives(distributed)
        self.size = self.collectives.world
        self.rank = 0
        if distributed:
            from luoshu import distributed as processes

            self.rank = processes.rank()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.collectives.allreduce(t)

    def gather_scalars(self, value: float, dtype) -> torch.Tensor:
        """One value per worker, in rank order."""
        out = torch.zeros(self.size, dtype=dtype)
        out[self.rank] = value
        return self.sum(out)


class _Data:
    """One worker's rows as torch (dense or CSR) plus what the kernels need about them."""

    def __init__(self, X):
        self.X = X  # the validated NumPy array or SciPy CSR matrix
        self.sparse = sp.issparse(X)
        self.t = None if self.sparse else dense(X)
        self.sq = row_sq_norms(X if self.sparse else self.t)
        self.n, self.d = X.shape
        self.dtype = torch.float64 if X.dtype == np.float64 else torch.float32

    def rows(self, idx) -> torch.Tensor:
        if self.sparse:
            return torch.from_numpy(self.X[idx].toarray())
        return self.t[idx]

    def chunk(self, s: slice):
        return torch.from_numpy(self.X[s].toarray()) if self.sparse else self.t[s]

    def partial_sq_dist(self, C: torch.Tensor, s: slice = slice(None)) -> torch.Tensor:
        """||c||^2 - 2 x.c for rows `s` and each row of C: the squared distance less ||x||^2, which is the
        same for every centre, so the nearest centre is found without adding it."""
        c_sq = (C * C).sum(1)[None, :]
        if self.sparse:
            return c_sq - 2 * torch.from_numpy(np.asarray(self.X[s] @ C.T.numpy()))
        return torch.addmm(c_sq, self.t[s], C.T, alpha=-2)  # one GEMM

    def sq_dist(self, C: torch.Tensor, s: slice = slice(None)) -> torch.Tensor:
        """Squared distances of rows `s` to each row of C (clamped at 0 against rounding)."""
        d = self.partial_sq_dist(C, s)
        d += self.sq[s][:, None]
        return d.clamp_min_(0)

    def cluster_sums(self, labels: torch.Tensor, k: int, s: slice = slice(None)) -> torch.Tensor:
        if self.sparse:
            rows = self.X[s]
            one_hot = sp.csr_matrix(
                (np.ones(rows.shape[0], dtype=rows.dtype), (labels.numpy(), np.arange(rows.shape[0]))),
                shape=(k, rows.shape[0]),
            )
            return torch.from_numpy(np.asarray((one_hot @ rows).todense()))
        return torch.zeros(k, self.d, dtype=self.dtype).index_add_(0, labels, self.t[s])

    def chunk_rows(self, k: int) -> int:
        return max(256, min(_CHUNK_ELEMENTS // max(k, 1), _CACHE_ELEMENTS // max(self.d, 1)))


@numba.njit(nogil=True, cache=True)
def _nearest_and_sums(partial, x, x_sq, labels, mind, sums, counts):  # pragma: no cover - compiled
    """Per row of a chunk: the nearest centre (first of equals) from the partial distances, the squared
    distance (partial + ||x||^2, clamped at 0), and, when `sums` has rows, the row added to its centre's
    sum (float64) and count. One pass, where torch takes a min, an index_add_ and a bincount."""
    n, k = partial.shape
    d = x.shape[1]
    want_sums = sums.shape[0] > 0
    for i in range(n):
        best = partial[i, 0]
        j = 0
        for c in range(1, k):
            v = partial[i, c]
            if v < best:
                best = v
                j = c
        labels[i] = j
        mind[i] = max(best + x_sq[i], 0.0)
        if want_sums:
            counts[j] += 1.0
            for f in range(d):
                sums[j, f] += x[i, f]


def _assign(data: _Data, C: torch.Tensor, want_sums: bool):
    """(labels, squared distance to the nearest centre, per-cluster sums or None, counts) over all rows."""
    k = C.shape[0]
    labels = torch.empty(data.n, dtype=torch.int64)
    mind = torch.empty(data.n, dtype=data.dtype)
    if not data.sparse:
        sums64 = np.zeros((k if want_sums else 0, data.d))
        counts64 = np.zeros(k)
        x, sq, lab_np, mind_np = data.t.numpy(), data.sq.numpy(), labels.numpy(), mind.numpy()
        for s in row_slices(data.n, data.chunk_rows(k)):
            partial = data.partial_sq_dist(C, s).numpy()
            _nearest_and_sums(partial, x[s], sq[s], lab_np[s], mind_np[s], sums64, counts64)
        if not want_sums:
            counts64 = np.bincount(lab_np, minlength=k)
        sums = torch.from_numpy(sums64).to(data.dtype) if want_sums else None
        return labels, mind, sums, torch.from_numpy(counts64).to(data.dtype)
    sums = torch.zeros(k, data.d, dtype=data.dtype) if want_sums else None
    for s in row_slices(data.n, data.chunk_rows(k)):
        m, lab = data.partial_sq_dist(C, s).min(1)
        labels[s], mind[s] = lab, (m + data.sq[s]).clamp_min_(0)
        if want_sums:
            sums += data.cluster_sums(lab, k, s)
    counts = torch.bincount(labels, minlength=k).to(data.dtype)
    return labels, mind, sums, counts


def _kmeans_plusplus(data: _Data, k: int, rng: np.random.Generator, comm: _Comm) -> torch.Tensor:
    """Greedy k-means++ (as scikit-learn: 2 + log k candidates per step, keep the one lowering the potential
    most), drawing from the D^2 distribution over the rows of every worker."""
    counts = comm.gather_scalars(data.n, torch.float64).to(torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    total = int(offsets[-1])
    if total < k:
        raise DataError(f"KMeans: n_samples={total} should be >= n_clusters={k}")
    trials = 2 + int(math.log(k))

    def fetch(global_idx: np.ndarray) -> torch.Tensor:
        """Rows by global index; each worker fills the rows it owns, the all-reduce assembles them."""
        out = torch.zeros(len(global_idx), data.d, dtype=data.dtype)
        lo, hi = int(offsets[comm.rank]), int(offsets[comm.rank + 1])
        mine = (global_idx >= lo) & (global_idx < hi)
        if mine.any():
            out[torch.from_numpy(mine)] = data.rows(global_idx[mine] - lo)
        return comm.sum(out)

    centers = torch.empty(k, data.d, dtype=data.dtype)
    centers[0] = fetch(np.array([rng.integers(total)]))[0]
    closest = data.sq_dist(centers[:1])[:, 0]
    for c in range(1, k):
        local_sums = comm.gather_scalars(float(closest.sum()), torch.float64)
        potential = float(local_sums.sum())
        draws = rng.random(trials) * potential
        prefix = np.concatenate([[0.0], np.cumsum(local_sums.numpy())])
        owner = np.clip(np.searchsorted(prefix, draws, side="right") - 1, 0, comm.size - 1)
        picked = np.zeros(trials, dtype=np.int64)
        mine = owner == comm.rank
        if mine.any():
            cum = torch.cumsum(closest.to(torch.float64), 0).numpy()
            local = np.searchsorted(cum, draws[mine] - prefix[comm.rank], side="right")
            picked[mine] = np.minimum(local, data.n - 1) + int(offsets[comm.rank])
        picked = comm.sum(torch.from_numpy(picked)).numpy()
        candidates = fetch(picked)
        cand_closest = torch.minimum(closest[:, None], data.sq_dist(candidates))
        best = int(torch.argmin(comm.sum(cand_closest.sum(0).to(torch.float64))))
        centers[c] = candidates[best]
        closest = cand_closest[:, best].contiguous()
    return centers


def _random_init(data: _Data, k: int, rng: np.random.Generator, comm: _Comm) -> torch.Tensor:
    counts = comm.gather_scalars(data.n, torch.float64).to(torch.int64)
    total = int(counts.sum())
    if total < k:
        raise DataError(f"KMeans: n_samples={total} should be >= n_clusters={k}")
    idx = rng.choice(total, size=k, replace=False)
    lo = int(counts[: comm.rank].sum())
    out = torch.zeros(k, data.d, dtype=data.dtype)
    mine = (idx >= lo) & (idx < lo + data.n)
    if mine.any():
        out[torch.from_numpy(mine)] = data.rows(idx[mine] - lo)
    return comm.sum(out)


def _scaled_tol(data: _Data, tol: float, comm: _Comm) -> float:
    """scikit-learn's tolerance: `tol` times the mean per-feature variance of the (global) data."""
    if tol == 0:
        return 0.0
    if data.sparse:
        s = torch.from_numpy(np.asarray(data.X.sum(0)).ravel()).to(torch.float64)
        sq = torch.from_numpy(np.asarray(data.X.multiply(data.X).sum(0)).ravel()).to(torch.float64)
    else:
        s, sq = data.t.sum(0, dtype=torch.float64), (data.t.to(torch.float64) ** 2).sum(0)
    n = comm.sum(torch.tensor([float(data.n)], dtype=torch.float64))
    s, sq = comm.sum(s), comm.sum(sq)
    var = sq / n - (s / n) ** 2
    return float(var.mean()) * tol


class _KMeansBase(ClusterMixin, TransformerMixin, Estimator):
    def _check_params(self, X_n: int | None = None) -> None:
        check_int(self, "n_clusters", self.n_clusters)
        check_int(self, "max_iter", self.max_iter)
        if not (isinstance(self.tol, int | float) and self.tol >= 0):
            raise ParameterError(f"{type(self).__name__}: tol must be a non-negative number, found {self.tol!r}")
        if isinstance(self.init, str):
            check_choice(self, "init", self.init, ("k-means++", "random"))
        elif np.shape(self.init) != (self.n_clusters, getattr(self, "n_features_in_", np.shape(self.init)[-1])):
            raise ParameterError(
                f"{type(self).__name__}: init as an array must have shape (n_clusters, n_features) "
                f"= ({self.n_clusters}, {getattr(self, 'n_features_in_', '?')}), found "
                f"{np.shape(self.init)}"
            )

    def _init_centers(self, data: _Data, rng, comm: _Comm) -> torch.Tensor:
        if isinstance(self.init, str):
            return (_kmeans_plusplus if self.init == "k-means++" else _random_init)(data, self.n_clusters, rng, comm)
        return torch.as_tensor(np.asarray(self.init, dtype=data.X.dtype)).clone()

    def _data(self, X) -> _Data:
        self._check_fitted("cluster_centers_")
        X = check_X(self, X, reset=False, dtype=FLOATS)
        return _Data(X)

    def predict(self, X) -> np.ndarray:
        """The index of the nearest centre of each row."""
        data = self._data(X)
        C = torch.from_numpy(self.cluster_centers_.astype(data.X.dtype, copy=False))
        return _assign(data, C, False)[0].numpy()

    def transform(self, X) -> np.ndarray:
        """Euclidean distances of each row to every centre."""
        data = self._data(X)
        C = torch.from_numpy(self.cluster_centers_.astype(data.X.dtype, copy=False))
        out = torch.empty(data.n, self.n_clusters, dtype=data.dtype)
        for s in row_slices(data.n, data.chunk_rows(self.n_clusters)):
            out[s] = data.sq_dist(C, s).sqrt_()
        return out.numpy()

    def score(self, X, y=None) -> float:
        """Minus the inertia of X under the fitted centres (higher is better, as scikit-learn)."""
        data = self._data(X)
        C = torch.from_numpy(self.cluster_centers_.astype(data.X.dtype, copy=False))
        return -float(_assign(data, C, False)[1].sum(dtype=torch.float64))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags


class KMeans(_KMeansBase):
    """k-means with k-means++ (or random / given) initialisation and Lloyd iterations.

    `distributed=True` fits across the workers of a `luoshu launch -n N` job: each worker passes its own rows
    and every worker ends with the centres of the union (equal to one process fitted on the concatenated
    rows); `labels_` and `inertia_` then refer to this worker's rows and to all rows respectively.
    Empty clusters keep their previous centre (scikit-learn moves them to far points instead).
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init="k-means++",
        n_init="auto",
        max_iter: int = 300,
        tol: float = 1e-4,
        random_state=None,
        distributed: bool = False,
    ):
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.distributed = distributed

    def fit(self, X, y=None) -> KMeans:
        X = check_X(self, X, reset=True, dtype=FLOATS)
        self._check_params()
        n_init = self.n_init
        if n_init == "auto":
            n_init = 1 if isinstance(self.init, str) and self.init == "k-means++" else 10
        if not isinstance(self.init, str):
            n_init = 1
        check_int(self, "n_init", n_init)
        comm = _Comm(self.distributed)
        data = _Data(X)
        if not self.distributed and data.n < self.n_clusters:
            raise DataError(f"KMeans: n_samples={data.n} should be >= n_clusters={self.n_clusters}")
        rng = rng_of(self.random_state)
        tol = _scaled_tol(data, self.tol, comm)
        best = None
        for _ in range(n_init):
            result = self._lloyd(data, self._init_centers(data, rng, comm), tol, comm)
            if best is None or result[2] < best[2]:
                best = result
        centers, labels, inertia, n_iter = best
        self.cluster_centers_ = centers.numpy()
        self.labels_ = labels.numpy()
        self.inertia_ = inertia
        self.n_iter_ = n_iter
        return self

    def _lloyd(self, data: _Data, centers: torch.Tensor, tol: float, comm: _Comm):
        labels = None
        n_iter = 0
        for n_iter in range(1, self.max_iter + 1):  # noqa: B007  (n_iter_ is the count after the loop)
            new_labels, _, sums, counts = _assign(data, centers, True)
            sums, counts = comm.sum(sums), comm.sum(counts)
            new_centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
            shift = float(((new_centers - centers) ** 2).sum())
            centers = new_centers
            strict = labels is not None and bool(comm.sum(torch.tensor([int((new_labels != labels).any())]))[0] == 0)
            labels = new_labels
            if strict or shift <= tol:
                break
        # final E-step: labels and inertia consistent with the returned centres (as scikit-learn)
        labels, mind, _, _ = _assign(data, centers, False)
        inertia = float(comm.sum(mind.sum(dtype=torch.float64).reshape(1))[0])
        return centers, labels, inertia, n_iter


class MiniBatchKMeans(_KMeansBase):
    """Mini-batch k-means (Sculley 2010, scikit-learn's update): each step assigns a random batch and moves
    every centre towards its batch mean with a per-centre learning rate 1 / (rows seen so far); stops after
    `max_iter` passes worth of steps, or when the smoothed batch inertia has not improved for
    `max_no_improvement` steps, or when the centres move less than `tol`."""

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init="k-means++",
        max_iter: int = 100,
        batch_size: int = 1024,
        tol: float = 0.0,
        max_no_improvement: int | None = 10,
        init_size: int | None = None,
        n_init="auto",
        random_state=None,
    ):
        self.n_clusters = n_clusters
        self.init = init
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.tol = tol
        self.max_no_improvement = max_no_improvement
        self.init_size = init_size
        self.n_init = n_init
        self.random_state = random_state

    def fit(self, X, y=None) -> MiniBatchKMeans:
        X = check_X(self, X, reset=True, dtype=FLOATS)
        self._check_params()
        check_int(self, "batch_size", self.batch_size)
        data = _Data(X)
        k = self.n_clusters
        if data.n < k:
            raise DataError(f"MiniBatchKMeans: n_samples={data.n} should be >= n_clusters={k}")
        rng = rng_of(self.random_state)
        comm = _Comm(False)
        tol = _scaled_tol(data, self.tol, comm)
        # initialise on a subsample (as scikit-learn: 3 x batch_size rows), best of n_init by its inertia
        init_size = min(data.n, self.init_size or max(3 * self.batch_size, k))
        n_init = (
            self.n_init
            if self.n_init != "auto"
            else (1 if isinstance(self.init, str) and self.init == "k-means++" else 3)
        )
        check_int(self, "n_init", n_init)
        sub = _Data(X[rng.choice(data.n, init_size, replace=False)])
        centers, best = None, math.inf
        for _ in range(n_init if isinstance(self.init, str) else 1):
            c = self._init_centers(sub, rng, comm)
            inertia = float(_assign(sub, c, False)[1].sum())
            if inertia < best:
                centers, best = c, inertia
        batch = min(self.batch_size, data.n)
        n_steps = (self.max_iter * data.n) // batch
        seen = torch.zeros(k, dtype=data.dtype)
        ewa, ewa_best, no_improvement = None, math.inf, 0
        alpha = min(1.0, batch * 2.0 / (data.n + 1))
        step = 0
        for step in range(1, n_steps + 1):  # noqa: B007
            idx = rng.integers(0, data.n, batch)
            part = _Data(X[idx]) if data.sparse else None
            if part is None:
                rows = data.t[torch.from_numpy(idx)]
                part = _Data.__new__(_Data)
                part.X, part.sparse, part.t, part.sq = None, False, rows, data.sq[torch.from_numpy(idx)]
                part.n, part.d, part.dtype = batch, data.d, data.dtype
            labels, mind, sums, counts = _assign(part, centers, True)
            seen += counts
            moved = counts > 0
            new_centers = centers.clone()
            # c <- c + (sum - count * c) / seen  ==  running mean over every row assigned so far
            new_centers[moved] += (sums[moved] - counts[moved, None] * centers[moved]) / seen[moved, None]
            shift = float(((new_centers - centers) ** 2).sum())
            centers = new_centers
            batch_inertia = float(mind.sum()) / batch
            ewa = batch_inertia if ewa is None else ewa * (1 - alpha) + batch_inertia * alpha
            if tol > 0 and shift <= tol:
                break
            if ewa < ewa_best:
                ewa_best, no_improvement = ewa, 0
            else:
                no_improvement += 1
            if self.max_no_improvement is not None and no_improvement >= self.max_no_improvement:
                break
        labels, mind, _, _ = _assign(data, centers, False)
        self.cluster_centers_ = centers.numpy()
        self.labels_ = labels.numpy()
        self.inertia_ = float(mind.sum(dtype=torch.float64))
        self.n_steps_ = step
        self.n_iter_ = math.ceil(step * batch / data.n)
        return self
