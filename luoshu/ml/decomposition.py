"""Matrix decompositions: the `LDA` topic model (variational Bayes, online or batch) and `NMF`.

LDA follows Hoffman, Blei & Bach (2010) and scikit-learn's `LatentDirichletAllocation`: the E-step is its per-
document loop compiled by numba (`_e_step_docs`: each document's topic weights updated over its CSR row's words
until they change by less than `mean_change_tol`, digamma as scikit-learn computes it); the M-step blends the
sufficient statistics into `components_` with step (offset + t)^-decay (online) or replaces them (batch).
`learning_method="gibbs"` fits by collapsed Gibbs sampling instead (Griffiths & Steyvers 2004): a compiled sweep
(`_gibbs_sweep`) over the corpus' tokens, one per unit of count, resamples each token's topic from its
document's and its word's topic counts; `components_` is then the topic-word counts plus the prior, averaged
over the second half of the sweeps, and `transform`, `perplexity` and `score` run the same variational E-step
given `components_` as the other methods, so perplexities compare on one definition.

NMF minimises the Frobenius norm ||X - WH|| with W, H >= 0 by coordinate descent on one column/row at a time
(HALS, the update scikit-learn's "cd" solver makes) or by Lee & Seung's multiplicative updates ("mu").
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.extmath import randomized_svd

from luoshu.ml._validation import check_int, check_nonnegative, rng_of, row_slices
from luoshu.ml.base import DataError, Estimator, ParameterError, check_choice, check_X

_EPS = float(np.finfo(np.float64).eps)
_BLOCK_BYTES = 1 << 20  # NMF: a block of rows of X that stays in one core's L2 (1 MB) between its two products


def _dirichlet_expectation(a: torch.Tensor) -> torch.Tensor:
    """E[log x] for x ~ Dirichlet(a), row-wise."""
    return torch.special.digamma(a) - torch.special.digamma(a.sum(1, keepdim=True))


class _Corpus:
    """A document-word count matrix as CSR parts (row of each non-zero, word, count) in float64."""

    def __init__(self, X):
        X = sp.csr_matrix(X, dtype=np.float64)
        self.X = X
        self.n_docs, self.n_words = X.shape

    def part(self, s: slice):
        sub = self.X[s]
        rows = torch.from_numpy(np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr)))
        return rows, torch.from_numpy(sub.indices.astype(np.int64)), torch.from_numpy(sub.data), sub.shape[0]


def _likelihood_term(prior: float, distr: torch.Tensor, dirichlet: torch.Tensor, size: int) -> float:
    """E[log p(x | prior)] - E[log q(x | distr)] for Dirichlet rows (scikit-learn's `_loglikelihood`)."""
    score = ((prior - distr) * dirichlet).sum()
    score += (torch.lgamma(distr) - torch.lgamma(torch.tensor(prior, dtype=distr.dtype))).sum()
    score += (torch.lgamma(torch.tensor(prior * size, dtype=distr.dtype)) - torch.lgamma(distr.sum(1))).sum()
    return float(score)


@numba.njit(nogil=True, cache=True)
def _gibbs_sweep(tok_doc, tok_word, z, ndk, nwk, nk, alpha, eta, uniforms):  # pragma: no cover - compiled
    """One collapsed Gibbs sweep over the tokens in order: token i leaves its topic z[i] and joins topic t with
    probability proportional to (n_dt + alpha) (n_wt + eta) / (n_t + V eta), by the inverse CDF at uniforms[i].
    ndk (docs, K), nwk (words, K) and nk (K,) count every token by topic; all three are updated in place."""
    n_topics = nk.shape[0]
    v_eta = nwk.shape[0] * eta
    cdf = np.empty(n_topics)
    inv_nk = np.empty(n_topics)
    for t in range(n_topics):
        inv_nk[t] = 1.0 / (nk[t] + v_eta)
    for i in range(tok_doc.shape[0]):
        d = tok_doc[i]
        w = tok_word[i]
        t = z[i]
        ndk[d, t] -= 1
        nwk[w, t] -= 1
        nk[t] -= 1
        inv_nk[t] = 1.0 / (nk[t] + v_eta)
        total = 0.0
        for s in range(n_topics):  # the word's row and the document's row: contiguous
            total += (ndk[d, s] + alpha) * (nwk[w, s] + eta) * inv_nk[s]
            cdf[s] = total
        u = uniforms[i] * total
        t = 0
        while t < n_topics - 1 and cdf[t] <= u:
            t += 1
        z[i] = t
        ndk[d, t] += 1
        nwk[w, t] += 1
        nk[t] += 1
        inv_nk[t] = 1.0 / (nk[t] + v_eta)


@numba.njit(nogil=True, cache=True, inline="always")
def _psi(x):  # pragma: no cover - compiled
    """The digamma function as scikit-learn's LDA computes it (recurrence to x >= 6, then the asymptotic series)."""
    if x <= 1e-6:
        return -0.577215664901532860606512090082402431 - 1.0 / x
    result = 0.0
    while x < 6.0:
        result -= 1.0 / x
        x += 1.0
    r = 1.0 / x
    result += np.log(x) - 0.5 * r
    r = r * r
    return result - r * ((1.0 / 12) - r * ((1.0 / 120) - r * (1.0 / 252)))


@numba.njit(nogil=True, cache=True, inline="always")
def _exp_dirichlet(gamma, out):  # pragma: no cover - compiled
    """out = exp(E[log theta]) for theta ~ Dirichlet(gamma)."""
    total = 0.0
    for k in range(gamma.shape[0]):
        total += gamma[k]
    psi_total = _psi(total)
    for k in range(gamma.shape[0]):
        out[k] = np.exp(_psi(gamma[k]) - psi_total)


@numba.njit(nogil=True, cache=True, inline="always")
def _norm_phi(theta, beta_t, words, start, stop, norm):  # pragma: no cover - compiled
    for j in range(start, stop):
        w = words[j]
        acc = 0.0
        for k in range(theta.shape[0]):
            acc += theta[k] * beta_t[w, k]
        norm[j - start] = acc + 2.220446049250313e-16


@numba.njit(nogil=True, cache=True)
def _e_step_docs(indptr, words, counts, beta_t, gamma, alpha, max_iter, tol, sstats_t):  # pragma: no cover
    """The variational E-step of each document (row of gamma, updated in place from its initial value),
    as scikit-learn's per-document loop: theta's expectation from gamma, then up to `max_iter` updates
    gamma = alpha + theta * (counts / (theta . beta_w)) . beta_w over the document's words, stopping once
    gamma's mean absolute change is below `tol`. With a non-empty `sstats_t` (V x K) each document adds
    theta (x) counts / norm_phi at its words (the caller multiplies by exp E[log beta])."""
    n, k_topics = gamma.shape
    longest = 0
    for d in range(n):
        longest = max(longest, indptr[d + 1] - indptr[d])
    norm = np.empty(longest)
    theta = np.empty(k_topics)
    acc = np.empty(k_topics)
    for d in range(n):
        start, stop = indptr[d], indptr[d + 1]
        g = gamma[d]
        _exp_dirichlet(g, theta)
        _norm_phi(theta, beta_t, words, start, stop, norm)
        for _ in range(max_iter):
            acc[:] = 0.0
            for j in range(start, stop):
                scale = counts[j] / norm[j - start]
                w = words[j]
                for k in range(k_topics):
                    acc[k] += scale * beta_t[w, k]
            change = 0.0
            for k in range(k_topics):
                new = alpha + theta[k] * acc[k]
                change += abs(new - g[k])
                g[k] = new
            _exp_dirichlet(g, theta)
            _norm_phi(theta, beta_t, words, start, stop, norm)
            if change / k_topics < tol:
                break
        if sstats_t.shape[0]:
            for j in range(start, stop):
                scale = counts[j] / norm[j - start]
                w = words[j]
                for k in range(k_topics):
                    sstats_t[w, k] += theta[k] * scale


class LDA(ClassNamePrefixFeaturesOutMixin, TransformerMixin, Estimator):
    """Latent Dirichlet allocation by variational Bayes or collapsed Gibbs sampling (scikit-learn's parameters and
    attributes).

    learning_method "batch" / "online": variational Bayes as scikit-learn's; "gibbs": `max_iter` sweeps of
    collapsed Gibbs sampling over the tokens (counts rounded to whole tokens), deterministic for a seed.

    `fit(X)` on document-word counts (dense or CSR); `transform(X)` gives each document's topic mixture
    (rows sum to 1); `components_[k, w]` is topic k's variational parameter for word w; `perplexity(X)` is
    exp(-bound / word count) under the variational bound; `score(X)` the bound itself.
    """

    def __init__(
        self,
        n_components: int = 10,
        *,
        doc_topic_prior: float | None = None,
        topic_word_prior: float | None = None,
        learning_method: str = "batch",
        learning_decay: float = 0.7,
        learning_offset: float = 10.0,
        max_iter: int = 10,
        batch_size: int = 128,
        evaluate_every: int = -1,
        perp_tol: float = 1e-1,
        mean_change_tol: float = 1e-3,
        max_doc_update_iter: int = 100,
        random_state=None,
    ):
        self.n_components = n_components
        self.doc_topic_prior = doc_topic_prior
        self.topic_word_prior = topic_word_prior
        self.learning_method = learning_method
        self.learning_decay = learning_decay
        self.learning_offset = learning_offset
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.evaluate_every = evaluate_every
        self.perp_tol = perp_tol
        self.mean_change_tol = mean_change_tol
        self.max_doc_update_iter = max_doc_update_iter
        self.random_state = random_state

    # --- the variational steps ----------------------------------------------------------------------
    def _e_step(self, corpus: _Corpus, s: slice, exp_elog_beta: torch.Tensor, rng, want_sstats: bool):
        """(unnormalised doc-topic gamma of rows s, sufficient statistics K x V or None)."""
        sub = corpus.X[s]
        n, k = sub.shape[0], self.n_components
        if rng is not None:
            gamma = rng.gamma(100.0, 1.0 / 100.0, (n, k))
        else:
            gamma = np.ones((n, k))
        beta_t = np.ascontiguousarray(exp_elog_beta.numpy().T)  # V x K: a word's topics contiguous
        sstats_t = np.zeros((corpus.n_words, k) if want_sstats else (0, k))
        _e_step_docs(sub.indptr, sub.indices, sub.data, beta_t, gamma, float(self.doc_topic_prior_),
                     self.max_doc_update_iter, float(self.mean_change_tol), sstats_t)
        if not want_sstats:
            return torch.from_numpy(gamma), None
        return torch.from_numpy(gamma), torch.from_numpy(sstats_t.T) * exp_elog_beta

    def _sstats(self, corpus: _Corpus, s: slice, rng) -> torch.Tensor:
        total = torch.zeros(self.n_components, corpus.n_words, dtype=torch.float64)
        offset = s.start
        for c in row_slices(s.stop - s.start, 4096):
            total += self._e_step(corpus, slice(offset + c.start, offset + c.stop), self._exp_elog_beta, rng, True)[1]
        return total

    def _doc_topics(self, corpus: _Corpus) -> torch.Tensor:
        out = torch.empty(corpus.n_docs, self.n_components, dtype=torch.float64)
        for s in row_slices(corpus.n_docs, 4096):
            out[s] = self._e_step(corpus, s, self._exp_elog_beta, None, False)[0]
        return out

    def _set_components(self, components: torch.Tensor) -> None:
        self._components = components
        self._exp_elog_beta = torch.exp(_dirichlet_expectation(components))
        self.components_ = components.numpy()
        self.exp_dirichlet_component_ = self._exp_elog_beta.numpy()

    def _check_params(self) -> None:
        check_int(self, "n_components", self.n_components)
        check_int(self, "max_iter", self.max_iter)
        check_int(self, "batch_size", self.batch_size)
        check_int(self, "max_doc_update_iter", self.max_doc_update_iter)
        check_choice(self, "learning_method", self.learning_method, ("batch", "online", "gibbs"))
        for name in ("doc_topic_prior", "topic_word_prior"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int | float) and v > 0):
                raise ParameterError(f"LDA: {name} must be a positive number or None, found {v!r}")
        if not 0.5 < self.learning_decay <= 1.0 and self.learning_method == "online":
            raise ParameterError(
                f"LDA: learning_decay must be in (0.5, 1] for convergence, found {self.learning_decay}"
            )

    def fit(self, X, y=None) -> LDA:
        self._check_params()
        X = check_X(self, X, reset=True)
        check_nonnegative(self, X)
        corpus = _Corpus(X)
        # a legacy RandomState drawing in scikit-learn's order (components, then each E-step's gammas), so a
        # seed gives the very fit scikit-learn's LatentDirichletAllocation gives
        from sklearn.utils import check_random_state

        rng = check_random_state(self.random_state)
        k = self.n_components
        self.doc_topic_prior_ = 1.0 / k if self.doc_topic_prior is None else float(self.doc_topic_prior)
        self.topic_word_prior_ = 1.0 / k if self.topic_word_prior is None else float(self.topic_word_prior)
        if self.learning_method == "gibbs":
            return self._fit_gibbs(corpus, rng)
        self._set_components(torch.from_numpy(rng.gamma(100.0, 1.0 / 100.0, (k, corpus.n_words))))
        self.n_batch_iter_ = 1
        last_bound = None
        n = corpus.n_docs
        self.n_iter_ = 0
        for i in range(self.max_iter):
            if self.learning_method == "online":
                for s in row_slices(n, self.batch_size):
                    sstats = self._sstats(corpus, s, rng)
                    rho = (self.learning_offset + self.n_batch_iter_) ** -self.learning_decay
                    update = self.topic_word_prior_ + n * sstats / (s.stop - s.start)
                    self._set_components((1 - rho) * self._components + rho * update)
                    self.n_batch_iter_ += 1
            else:
                self._set_components(self.topic_word_prior_ + self._sstats(corpus, slice(0, n), rng))
                self.n_batch_iter_ += 1
            self.n_iter_ += 1
            if self.evaluate_every > 0 and (i + 1) % self.evaluate_every == 0:
                bound = self._perplexity(corpus, self._doc_topics(corpus))
                if last_bound is not None and abs(last_bound - bound) < self.perp_tol:
                    break
                last_bound = bound
        self.bound_ = self._perplexity(corpus, self._doc_topics(corpus))
        return self

    def _fit_gibbs(self, corpus: _Corpus, rng) -> LDA:
        """Collapsed Gibbs sampling from uniformly drawn topics; components_ = topic-word counts (averaged over
        the sweeps after the first half, the burn-in) + topic_word_prior."""
        X, k = corpus.X, self.n_components
        counts = np.rint(X.data).astype(np.int64)  # a token per unit of count
        tok_doc = np.repeat(np.repeat(np.arange(corpus.n_docs), np.diff(X.indptr)), counts)
        tok_word = np.repeat(X.indices.astype(np.int64), counts)
        z = rng.randint(0, k, tok_doc.shape[0]).astype(np.int64)
        ndk = np.zeros((corpus.n_docs, k), np.int64)
        nwk = np.zeros((corpus.n_words, k), np.int64)
        np.add.at(ndk, (tok_doc, z), 1)
        np.add.at(nwk, (tok_word, z), 1)
        nk = nwk.sum(0)
        alpha, eta = self.doc_topic_prior_, self.topic_word_prior_
        burn_in = self.max_iter // 2
        average = np.zeros((corpus.n_words, k))
        last_bound = None
        self.n_iter_ = 0
        for i in range(self.max_iter):
            _gibbs_sweep(tok_doc, tok_word, z, ndk, nwk, nk, alpha, eta, rng.random_sample(tok_doc.shape[0]))
            self.n_iter_ += 1
            if i >= burn_in:
                average += nwk
            if self.evaluate_every > 0 and (i + 1) % self.evaluate_every == 0:
                self._set_components(torch.from_numpy(nwk.T + eta))
                bound = self._perplexity(corpus, self._doc_topics(corpus))
                if last_bound is not None and abs(last_bound - bound) < self.perp_tol:
                    break
                last_bound = bound
        if self.n_iter_ <= burn_in:  # stopped by perp_tol within the burn-in: the last sample
            average, samples = nwk, 1
        else:
            samples = self.n_iter_ - burn_in
        self._set_components(torch.from_numpy(np.ascontiguousarray(average.T / samples + eta)))
        self.n_batch_iter_ = self.n_iter_ + 1
        self.bound_ = self._perplexity(corpus, self._doc_topics(corpus))
        return self

    def _corpus(self, X) -> _Corpus:
        self._check_fitted("components_")
        X = check_X(self, X, reset=False)
        check_nonnegative(self, X)
        return _Corpus(X)

    def transform(self, X, *, normalize: bool = True) -> np.ndarray:
        """Each document's topic mixture (rows sum to 1 unless normalize=False)."""
        gamma = self._doc_topics(self._corpus(X))
        if normalize:
            gamma = gamma / gamma.sum(1, keepdim=True)
        return gamma.numpy()

    def _bound(self, corpus: _Corpus, gamma: torch.Tensor) -> float:
        elog_theta = _dirichlet_expectation(gamma)
        elog_beta = _dirichlet_expectation(self._components)
        score = 0.0
        for s in row_slices(corpus.n_docs, 4096):
            rows, cols, counts, _ = corpus.part(s)
            temp = elog_theta[s][rows] + elog_beta[:, cols].T
            score += float((counts * torch.logsumexp(temp, 1)).sum())
        score += _likelihood_term(self.doc_topic_prior_, gamma, elog_theta, self.n_components)
        score += _likelihood_term(self.topic_word_prior_, self._components, elog_beta, corpus.n_words)
        return score

    def _perplexity(self, corpus: _Corpus, gamma: torch.Tensor) -> float:
        words = corpus.X.sum()
        if words == 0:
            raise DataError("LDA: perplexity of a corpus without words is undefined (every count is 0)")
        return float(np.exp(-self._bound(corpus, gamma) / words))

    def perplexity(self, X) -> float:
        """exp(-(variational bound) / (number of words)) of X; lower is better."""
        corpus = self._corpus(X)
        return self._perplexity(corpus, self._doc_topics(corpus))

    def score(self, X, y=None) -> float:
        """The variational lower bound of log p(X) (higher is better)."""
        corpus = self._corpus(X)
        return self._bound(corpus, self._doc_topics(corpus))

    @property
    def _n_features_out(self) -> int:
        return self.components_.shape[0]

    def _fitted_state(self) -> dict:
        state = super()._fitted_state()
        state.pop("exp_dirichlet_component_", None)  # a function of components_
        return state

    def _restore_state(self, state: dict) -> None:
        super()._restore_state(state)
        self._set_components(torch.from_numpy(np.asarray(self.components_, dtype=np.float64)))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.input_tags.positive_only = True
        return tags


# --- NMF -----------------------------------------------------------------------------------------------
# The factors live as NumPy arrays W (n x k) and Ht = H.T (p x k), both C-contiguous: the products X @ Ht and
# X.T @ W are then the layouts NumPy's BLAS runs fastest at 1 thread (torch's, and a transposed operand, were
# 1.5-3x slower on these tall-by-20 shapes), and each factor's rows are the coordinates its sweep updates.


def _cross(X, B: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = X @ B for dense or sparse X (dense into the preallocated `out`, no temporary)."""
    if sp.issparse(X):
        out[...] = X @ B
    else:
        np.dot(X, B, out=out)
    return out


def _residual_sq(X_sq: float, A: np.ndarray, XB: np.ndarray, BtB: np.ndarray) -> float:
    """||X - A B^T||^2 without forming A B^T: ||X||^2 - 2 <A, X B> + <A^T A, B^T B> (X B and B^T B given)."""
    return max(X_sq - 2 * float(np.vdot(A, XB)) + float(np.vdot(A.T @ A, BtB)), 0.0)


@numba.njit(nogil=True, cache=True)
def _hals_sweep(A, gram, cross):  # pragma: no cover - compiled; tested through `NMF`
    n, k = A.shape
    block = 64
    a, g, violation = np.empty((k, block)), np.empty(block), np.zeros(block)
    for start in range(0, n, block):
        m = min(block, n - start)
        for b in range(m):  # the block's rows, transposed: the loops over rows below are unit-stride (SIMD)
            for r in range(k):
                a[r, b] = A[start + b, r]
        for j in range(k):
            hess = gram[j, j]
            if hess <= 0:
                continue
            for b in range(m):
                g[b] = -cross[start + b, j]
            for r in range(k):
                w = gram[r, j]
                for b in range(m):
                    g[b] += a[r, b] * w
            for b in range(m):
                old, grad = a[j, b], g[b]
                violation[b] += abs(grad if old > 0 else min(grad, 0.0))
                new = old - grad / hess
                a[j, b] = new if new > 0 else 0.0
        for b in range(m):
            for r in range(k):
                A[start + b, r] = a[r, b]
    return violation.sum()


def _hals(A: np.ndarray, gram: np.ndarray, cross: np.ndarray) -> float:
    """One coordinate-descent sweep over the columns of A (n x k, C-contiguous float64) for min ||.||:
    A[:, j] += (cross[:, j] - A @ gram[:, j]) / gram[j, j], clipped at 0 — in place, each column using the
    columns already updated. A row's entry of column j depends only on that row, so the compiled sweep takes
    64 rows at a time through all columns, vectorised across the rows, with each entry's arithmetic in
    scikit-learn's order (`_update_cdnmf_fast`). Returns the sweep's violation: the summed magnitude of the
    projected gradient (scikit-learn's measure)."""
    return float(_hals_sweep(A, gram, cross))


class NMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, Estimator):
    """Non-negative matrix factorisation X ~ W H (Frobenius loss), W = transform(X), H = components_.

    solver "cd": coordinate descent on one column of W / row of H at a time (HALS); "mu": multiplicative
    updates. init "nndsvda" (SVD-based, zeros filled with the mean of X; the default when n_components <=
    min(n_samples, n_features)), "nndsvd" or "random". Stopping rules as scikit-learn's (see `_solve`).
    """

    def __init__(
        self,
        n_components: int | None = None,
        *,
        init: str | None = None,
        solver: str = "cd",
        tol: float = 1e-4,
        max_iter: int = 200,
        random_state=None,
    ):
        self.n_components = n_components
        self.init = init
        self.solver = solver
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state

    def _initialise(self, X, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
        n, p = X.shape
        init = self.init or ("nndsvda" if k <= min(n, p) else "random")
        check_choice(self, "init", init, ("random", "nndsvd", "nndsvda"))
        mean = float(X.mean())
        if init == "random":
            avg = np.sqrt(mean / k)
            W = avg * np.abs(rng.standard_normal((n, k)))
            H = avg * np.abs(rng.standard_normal((k, p)))
            return W, H
        if k > min(n, p):
            raise ParameterError(
                f"NMF: init={init!r} needs n_components <= min(n_samples, n_features) = "
                f"{min(n, p)}, found {k}; use init='random'"
            )
        if k < min(n, p):  # the top k singular triples only: randomized SVD, power iterations (as scikit-learn's,
            # dense or sparse; ARPACK's svds on sparse X took 3x scikit-learn's whole "mu" fit)
            U, S, Vt = randomized_svd(X, k, random_state=int(rng.integers(2**32 - 1)))
        else:
            U, S, Vt = np.linalg.svd(X.toarray() if sp.issparse(X) else X, full_matrices=False)
        U, S, Vt = U[:, :k], S[:k], Vt[:k]
        W, H = np.zeros((n, k)), np.zeros((k, p))
        W[:, 0], H[0] = np.sqrt(S[0]) * np.abs(U[:, 0]), np.sqrt(S[0]) * np.abs(Vt[0])
        for j in range(1, k):
            x, y = U[:, j], Vt[j]
            xp, yp, xn, yn = np.maximum(x, 0), np.maximum(y, 0), np.abs(np.minimum(x, 0)), np.abs(np.minimum(y, 0))
            xpn, ypn, xnn, ynn = (np.linalg.norm(v) for v in (xp, yp, xn, yn))
            mp, mn = xpn * ypn, xnn * ynn
            # keep the sign pattern (positive or negative parts) carrying more of the singular pair
            u, v, sigma = (xp / xpn, yp / ypn, mp) if mp > mn else (xn / max(xnn, _EPS), yn / max(ynn, _EPS), mn)
            lam = np.sqrt(S[j] * sigma)
            W[:, j], H[j] = lam * u, lam * v
        W[W < 1e-6], H[H < 1e-6] = 0, 0
        if init == "nndsvda":
            W[W == 0], H[H == 0] = mean, mean
        return W, H

    def _check_params(self) -> None:
        if self.n_components is not None:
            check_int(self, "n_components", self.n_components)
        check_int(self, "max_iter", self.max_iter)
        check_choice(self, "solver", self.solver, ("cd", "mu"))

    def _prepare(self, X, reset: bool):
        X = check_X(self, X, reset=reset)
        check_nonnegative(self, X)
        if sp.issparse(X):
            X = X.astype(np.float64)
            return X, float(X.multiply(X).sum())
        X = np.ascontiguousarray(X, dtype=np.float64)
        return X, float(np.vdot(X, X))

    def _solve(self, X, X_sq: float, W: np.ndarray, Ht: np.ndarray, update_H: bool):
        """Alternating updates of W and (if update_H) Ht = H.T, each a fresh C-contiguous copy updated in place;
        returns (W, Ht, iterations, ||X - W H||^2). "cd" stops when the sweep's projected-gradient violation
        falls to `tol` times the first one; "mu" when ||X - WH|| (checked every 10 iterations) improved by less
        than `tol` times its initial value (both as scikit-learn). Every error comes from the iteration's own
        Gram and cross products (`_residual_sq`), never from another product with X."""
        W, Ht = np.array(W, dtype=np.float64, order="C"), np.array(Ht, dtype=np.float64, order="C")
        (n, k), p = W.shape, Ht.shape[0]
        HHt, XHt, WtW, XtW, XtW_part = (np.empty(shape) for shape in ((k, k), (n, k), (k, k), (p, k), (p, k)))
        # W's half-step by blocks of rows (a row of W depends only on its row of X H^T), X.T @ W accumulated
        # from each block right after it, while that block of X is still in cache: ~12% less CPU time for the
        # two products than two passes over the whole X. Sparse X goes whole (slicing CSR copies it).
        if sp.issparse(X):
            blocks = [(X, X.T, W, XHt)]
        else:
            rows = max(1, _BLOCK_BYTES // (8 * p))
            blocks = [(X[s], X[s].T, W[s], XHt[s]) for s in row_slices(n, rows)]
        mu = self.solver == "mu"

        def residual_sq() -> float:  # W and Ht as they stand, from the products of their last update
            return _residual_sq(X_sq, Ht, XtW, WtW) if update_H else _residual_sq(X_sq, W, XHt, HHt)

        err_init = err_prev = np.sqrt(_residual_sq(X_sq, W, _cross(X, Ht, XHt), Ht.T @ Ht)) if mu else None
        violation_init = None
        it = 0
        for it in range(1, self.max_iter + 1):  # noqa: B007
            np.dot(Ht.T, Ht, out=HHt)
            violation = 0.0
            for b, (X_rows, X_rows_T, W_rows, XHt_rows) in enumerate(blocks):
                _cross(X_rows, Ht, XHt_rows)
                if mu:
                    W_rows *= XHt_rows / np.maximum(W_rows @ HHt, _EPS)
                else:
                    violation += _hals(W_rows, HHt, XHt_rows)
                if update_H:
                    _cross(X_rows_T, W_rows, XtW_part if b else XtW)
                    if b:
                        XtW += XtW_part
            if update_H:
                np.dot(W.T, W, out=WtW)
                if mu:
                    Ht *= XtW / np.maximum(Ht @ WtW, _EPS)
                else:
                    violation += _hals(Ht, WtW, XtW)
            if not mu:
                if violation_init is None:
                    violation_init = violation
                if violation_init == 0 or violation / violation_init <= self.tol:
                    break
            elif self.tol > 0 and it % 10 == 0:
                err = np.sqrt(residual_sq())
                if err_init > 0 and (err_prev - err) / err_init < self.tol:
                    break
                err_prev = err
        return W, Ht, it, residual_sq()

    def fit_transform(self, X, y=None, W=None, H=None) -> np.ndarray:
        self._check_params()
        X, X_sq = self._prepare(X, reset=True)
        k = self.n_components or X.shape[1]
        rng = rng_of(self.random_state)
        if W is not None and H is not None:
            W0, H0 = np.asarray(W, dtype=np.float64), np.asarray(H, dtype=np.float64)
            if W0.shape != (X.shape[0], k) or H0.shape != (k, X.shape[1]) or (W0 < 0).any() or (H0 < 0).any():
                raise DataError(
                    f"NMF: custom W, H must be non-negative of shapes {(X.shape[0], k)} and "
                    f"{(k, X.shape[1])}, found {W0.shape} and {H0.shape}"
                )
        else:
            W0, H0 = self._initialise(X, k, rng)
        W, Ht, it, err_sq = self._solve(X, X_sq, W0, H0.T, update_H=True)
        self.components_ = np.ascontiguousarray(Ht.T)
        self.n_components_ = k
        self.n_iter_ = it
        self.reconstruction_err_ = float(np.sqrt(err_sq))
        return W

    def fit(self, X, y=None) -> NMF:
        self.fit_transform(X)
        return self

    def transform(self, X) -> np.ndarray:
        """W for new rows with H fixed (initialised at sqrt(mean(X) / k), as scikit-learn)."""
        self._check_fitted("components_")
        X, X_sq = self._prepare(X, reset=False)
        k = self.n_components_
        W = np.full((X.shape[0], k), np.sqrt(max(float(X.mean()), 0.0) / k))
        return self._solve(X, X_sq, W, np.asarray(self.components_).T, update_H=False)[0]

    def inverse_transform(self, X) -> np.ndarray:
        self._check_fitted("components_")
        W = np.asarray(X, dtype=np.float64)
        if W.ndim != 2 or W.shape[1] != self.n_components_:
            raise DataError(
                f"NMF.inverse_transform: expected W with {self.n_components_} columns, found shape {W.shape}"
            )
        return W @ self.components_

    @property
    def _n_features_out(self) -> int:
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.input_tags.positive_only = True
        return tags
