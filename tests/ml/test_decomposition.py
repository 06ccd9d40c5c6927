"""LDA and NMF against scikit-learn (LatentDirichletAllocation, NMF) and against the generating topic model;
sparse input, bad input, model files and scikit-learn's estimator checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from sklearn import decomposition as skd
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import parametrize_with_checks

import luoshu
from luoshu import ml
from luoshu.ml import LDA, NMF


def topic_corpus(n_docs=600, n_topics=5, n_words=150, doc_len=60, seed=0):
    """Documents drawn from a known LDA model: (counts as CSR, the true topic-word distributions)."""
    rng = np.random.default_rng(seed)
    topics = rng.dirichlet(np.full(n_words, 0.05), n_topics)
    theta = rng.dirichlet(np.full(n_topics, 0.3), n_docs)
    counts = np.stack([rng.multinomial(doc_len, t @ topics) for t in theta]).astype(np.float64)
    return sp.csr_matrix(counts), topics


@pytest.mark.parametrize("method", ["batch", "online"])
def test_lda_equals_sklearn_for_the_same_seed(method):
    X, _ = topic_corpus()
    Xtr, Xte = X[:480], X[480:]
    kwargs = dict(learning_method=method, max_iter=5, batch_size=100, random_state=3)
    ours, ref = LDA(5, **kwargs).fit(Xtr), skd.LatentDirichletAllocation(5, **kwargs).fit(Xtr)
    np.testing.assert_allclose(ours.components_, ref.components_, rtol=1e-6)
    np.testing.assert_allclose(ours.transform(Xte), ref.transform(Xte), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours.perplexity(Xte), ref.perplexity(Xte), rtol=1e-7)
    np.testing.assert_allclose(ours.score(Xte), ref.score(Xte), rtol=1e-8)
    np.testing.assert_allclose(ours.bound_, ref.bound_, rtol=1e-7)


def test_lda_recovers_the_generating_topics():
    X, topics = topic_corpus(n_docs=400, seed=1)
    lda = LDA(5, max_iter=15, random_state=0).fit(X)
    learned = lda.components_ / lda.components_.sum(1, keepdims=True)
    cos = (topics @ learned.T) / np.outer(np.linalg.norm(topics, axis=1), np.linalg.norm(learned, axis=1))
    rows, cols = linear_sum_assignment(-cos)
    assert cos[rows, cols].min() > 0.9
    doc_topic = lda.transform(X)
    np.testing.assert_allclose(doc_topic.sum(1), 1.0, rtol=1e-10)
    # held-out perplexity within 1% of scikit-learn's on the same data
    Xte, _ = topic_corpus(n_docs=100, seed=1)
    ref = skd.LatentDirichletAllocation(5, max_iter=15, random_state=0).fit(X)
    assert lda.perplexity(Xte) <= ref.perplexity(Xte) * 1.01


def test_gibbs_recovers_the_generating_topics_at_sklearns_perplexity():
    X, topics = topic_corpus(n_docs=400, seed=1)
    lda = LDA(5, learning_method="gibbs", max_iter=100, random_state=0).fit(X)
    learned = lda.components_ / lda.components_.sum(1, keepdims=True)
    cos = (topics @ learned.T) / np.outer(np.linalg.norm(topics, axis=1), np.linalg.norm(learned, axis=1))
    rows, cols = linear_sum_assignment(-cos)
    assert cos[rows, cols].min() > 0.95
    doc_topic = lda.transform(X)
    np.testing.assert_allclose(doc_topic.sum(1), 1.0, rtol=1e-10)
    # held-out perplexity (the same variational definition) within 1% of scikit-learn's variational fit
    Xte, _ = topic_corpus(n_docs=100, seed=1)
    ref = skd.LatentDirichletAllocation(5, max_iter=15, random_state=0).fit(X)
    assert lda.perplexity(Xte) <= ref.perplexity(Xte) * 1.01
    assert lda.n_iter_ == 100 and np.isfinite(lda.bound_)


def test_gibbs_sweep_equals_the_sampling_rule_from_scratch():
    """The compiled sweep against the collapsed conditional recomputed from the assignments for every token
    (counts by bincount, no bookkeeping), with the same uniforms."""
    from luoshu.ml.decomposition import _gibbs_sweep

    rng = np.random.default_rng(0)
    n_docs, n_words, k, alpha, eta = 6, 9, 3, 0.4, 0.2
    tok_doc = np.repeat(np.arange(n_docs), 7)
    tok_word = rng.integers(0, n_words, tok_doc.size)
    z = rng.integers(0, k, tok_doc.size)
    uniforms = rng.random(tok_doc.size)
    ref = z.copy()
    for i in range(tok_doc.size):
        others = np.arange(tok_doc.size) != i
        n_dt = np.bincount(ref[others & (tok_doc == tok_doc[i])], minlength=k)
        n_wt = np.bincount(ref[others & (tok_word == tok_word[i])], minlength=k)
        n_t = np.bincount(ref[others], minlength=k)
        p = (n_dt + alpha) * (n_wt + eta) / (n_t + n_words * eta)
        ref[i] = np.searchsorted(np.cumsum(p), uniforms[i] * p.sum(), side="right")
    ndk = np.zeros((n_docs, k), np.int64)
    nwk = np.zeros((n_words, k), np.int64)
    np.add.at(ndk, (tok_doc, z), 1)
    np.add.at(nwk, (tok_word, z), 1)
    ours = z.copy()
    _gibbs_sweep(tok_doc, tok_word, ours, ndk, nwk, nwk.sum(0), alpha, eta, uniforms)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ndk, np.stack([np.bincount(ref[tok_doc == d], minlength=k) for d in range(6)]))


def test_gibbs_is_deterministic_for_a_seed():
    X, _ = topic_corpus(n_docs=100)
    a, b, c = (LDA(4, learning_method="gibbs", max_iter=5, random_state=s).fit(X) for s in (7, 7, 8))
    np.testing.assert_array_equal(a.components_, b.components_)
    assert not np.array_equal(a.components_, c.components_)


def test_gibbs_stops_on_perp_tol_with_the_last_sample():
    X, _ = topic_corpus(n_docs=100)
    lda = LDA(4, learning_method="gibbs", max_iter=40, evaluate_every=5, perp_tol=1e9, random_state=0).fit(X)
    assert lda.n_iter_ == 10  # evaluated at 5 and 10: within the burn-in (20), so the last sample's counts
    np.testing.assert_allclose(lda.components_.sum(), X.sum() + lda.topic_word_prior_ * 4 * X.shape[1])


def test_lda_dense_input_gives_the_sparse_result():
    X, _ = topic_corpus(n_docs=200)
    a, b = LDA(4, max_iter=3, random_state=0).fit(X), LDA(4, max_iter=3, random_state=0).fit(X.toarray())
    np.testing.assert_allclose(a.components_, b.components_, rtol=1e-12)


@pytest.mark.parametrize("solver", ["cd", "mu"])
@pytest.mark.parametrize("sparse", [False, True])
def test_nmf_reconstruction_error_within_one_percent_of_sklearn(solver, sparse):
    X = load_digits().data[:600]
    X = sp.csr_matrix(X) if sparse else X
    ours = NMF(8, solver=solver, max_iter=150, random_state=0)
    W = ours.fit_transform(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = skd.NMF(8, solver=solver, max_iter=150, random_state=0).fit(X)
    assert ours.reconstruction_err_ <= ref.reconstruction_err_ * 1.01
    dense = X.toarray() if sparse else X
    np.testing.assert_allclose(ours.reconstruction_err_, np.linalg.norm(dense - W @ ours.components_), rtol=1e-6)
    assert (W >= 0).all() and (ours.components_ >= 0).all()
    # transform (H fixed) reconstructs new rows about as well as scikit-learn's
    err = np.linalg.norm(dense[:200] - ours.inverse_transform(ours.transform(X[:200])))
    err_ref = np.linalg.norm(dense[:200] - ref.inverse_transform(ref.transform(X[:200])))
    assert err <= err_ref * 1.02


@pytest.mark.parametrize("n", [1, 64, 150])
def test_hals_sweep_equals_sklearns_cd_update(n):
    """The blocked sweep against scikit-learn's compiled coordinate-descent update (`_update_cdnmf_fast`):
    rows not a multiple of the block, a component with zero Hessian (an all-zero row of H)."""
    from sklearn.decomposition._cdnmf_fast import _update_cdnmf_fast

    from luoshu.ml.decomposition import _hals

    rng = np.random.default_rng(n)
    W, H, X = rng.random((n, 6)), rng.random((6, 40)), rng.random((n, 40)) * 3
    H[2] = 0
    W[rng.random(W.shape) < 0.3] = 0
    gram, cross = H @ H.T, X @ H.T
    ours, ref = W.copy(), W.copy()
    violation = _hals(ours, gram, cross)
    violation_ref = _update_cdnmf_fast(ref, gram, cross, np.arange(6, dtype=np.intp))
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(violation, violation_ref, rtol=1e-12)


@pytest.mark.parametrize("solver", ["cd", "mu"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("max_iter", [1, 7, 200])
def test_nmf_reconstruction_error_is_the_direct_norm(solver, sparse, max_iter):
    """reconstruction_err_ comes from the last iteration's Gram and cross products; it is ||X - WH||_F."""
    X = load_digits().data[:300]
    ours = NMF(6, solver=solver, max_iter=max_iter, random_state=0)
    W = ours.fit_transform(sp.csr_matrix(X) if sparse else X)
    np.testing.assert_allclose(ours.reconstruction_err_, np.linalg.norm(X - W @ ours.components_), rtol=1e-9)


@pytest.mark.parametrize("solver", ["cd", "mu"])
def test_nmf_row_blocks_follow_sklearn_from_the_same_start(solver, monkeypatch):
    """W's half-step by row blocks of X (7 rows here, so 43 blocks and a ragged last one) follows scikit-learn's
    whole-matrix updates from the same custom W, H."""
    from luoshu.ml import decomposition

    monkeypatch.setattr(decomposition, "_BLOCK_BYTES", 7 * 8 * 64)
    X = load_digits().data[:300]
    rng = np.random.default_rng(1)
    W0, H0 = rng.random((300, 6)), rng.random((6, 64))
    ours = NMF(6, solver=solver, init="random", max_iter=60)
    W = ours.fit_transform(X, W=W0, H=H0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = skd.NMF(6, solver=solver, init="custom", max_iter=60)
        W_ref = ref.fit_transform(X, W=W0.copy(), H=H0.copy())
    assert ours.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(W, W_ref, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ours.components_, ref.components_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ours.reconstruction_err_, ref.reconstruction_err_, rtol=1e-9)


def test_nmf_mu_stops_where_the_direct_errors_say():
    """The "mu" solver checks every 10 iterations whether ||X - WH|| improved by less than tol times its initial
    value; its stopping iteration against fits of 10, 20, ... iterations (tol=0) and their errors computed directly."""
    X = load_digits().data[:300]
    rng = np.random.default_rng(0)
    W0, H0 = rng.random((300, 6)), rng.random((6, 64))
    tol = 2e-3
    stopped = NMF(6, solver="mu", tol=tol, max_iter=400, init="random")
    stopped.fit_transform(X, W=W0, H=H0)
    errors = [np.linalg.norm(X - W0 @ H0)]
    expected = None
    for it in range(10, 401, 10):
        model = NMF(6, solver="mu", tol=0, max_iter=it, init="random")
        W = model.fit_transform(X, W=W0, H=H0)
        errors.append(np.linalg.norm(X - W @ model.components_))
        if (errors[-2] - errors[-1]) / errors[0] < tol:
            expected = it
            break
    assert expected is not None and stopped.n_iter_ == expected


def test_nmf_random_init_and_full_rank():
    X = np.abs(np.random.default_rng(0).normal(size=(40, 6)))
    ours = NMF(init="random", random_state=0, max_iter=400, tol=1e-8).fit(X)  # n_components = n_features
    assert ours.reconstruction_err_ < 1e-2 * np.linalg.norm(X)


def test_bad_input_is_refused():
    X, _ = topic_corpus(n_docs=50)
    lda = LDA(3, max_iter=2, random_state=0).fit(X)
    before = lda.components_.copy()
    with pytest.raises(luoshu.Error, match="Negative"):
        lda.fit(-X)
    np.testing.assert_array_equal(lda.components_, before)
    with pytest.raises(luoshu.Error, match="features"):
        lda.transform(X[:, :10])
    bad = X.toarray()
    bad[0, 0] = np.nan
    for est in (LDA(3), NMF(3)):
        with pytest.raises(luoshu.Error, match="NaN"):
            est.fit(bad)
        with pytest.raises(luoshu.Error):
            est.fit(np.empty((0, 5)))
        with pytest.raises(luoshu.Error, match="Negative"):
            est.fit(-X)
    with pytest.raises(luoshu.Error, match="learning_method"):
        LDA(learning_method="em").fit(X)
    with pytest.raises(luoshu.Error, match="solver"):
        NMF(solver="als").fit(X)
    with pytest.raises(ml.NotFittedError):
        NMF().transform(X)


def test_save_and_load(tmp_path):
    X, _ = topic_corpus(n_docs=60)
    for name, est in (("lda", LDA(3, max_iter=2, random_state=0)), ("nmf", NMF(3, random_state=0))):
        est.fit(X)
        est.save(tmp_path / name)
        np.testing.assert_allclose(ml.load(tmp_path / name).transform(X), est.transform(X), rtol=1e-12)


@parametrize_with_checks(
    [
        LDA(3, max_iter=3, random_state=0),
        LDA(3, learning_method="gibbs", max_iter=4, random_state=0),
        NMF(2, random_state=0),
    ]
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("tol", [1e-3, 1e-12])
def test_lda_compiled_e_step_equals_sklearns_per_document_loop(tol):
    """`_e_step_docs` against scikit-learn's `_update_doc_distribution` from the same initial gamma: the doc-topic
    weights and the sufficient statistics, with early stops (tol 1e-3) and without (1e-12: every iteration),
    an empty document among them."""
    from sklearn.decomposition._lda import _update_doc_distribution

    from luoshu.ml.decomposition import _e_step_docs

    X, _ = topic_corpus(n_docs=60, seed=4)
    X = sp.vstack([X[:10], sp.csr_matrix((1, X.shape[1])), X[10:]]).tocsr()
    rng = np.random.default_rng(5)
    beta = np.exp(rng.standard_normal((5, X.shape[1])))
    ref_gamma, ref_sstats = _update_doc_distribution(X, beta, 0.2, 100, tol, True, np.random.RandomState(7))
    gamma = np.random.RandomState(7).gamma(100.0, 1.0 / 100.0, (X.shape[0], 5))
    sstats_t = np.zeros((X.shape[1], 5))
    _e_step_docs(X.indptr, X.indices, X.data, np.ascontiguousarray(beta.T), gamma, 0.2, 100, tol, sstats_t)
    np.testing.assert_allclose(gamma, ref_gamma, rtol=1e-10)
    np.testing.assert_allclose(sstats_t.T, ref_sstats, rtol=1e-10, atol=1e-300)
    assert np.all(gamma[10] == 0.2)  # the empty document keeps the prior
