"""luoshu.ml against scikit-learn on the same data: KMeans, MiniBatchKMeans, KNN, LDA, NMF, LogisticRegression, FM.

Each case fits (or predicts with) luoshu's estimator and scikit-learn's on the same arrays, repeats
interleaved (luoshu, sklearn, luoshu, sklearn ...), the first pair a warm-up; it prints median seconds,
the time ratio (sklearn / luoshu: above 1 means luoshu is faster) and each side's quality (inertia,
accuracy, held-out perplexity, reconstruction error, log loss). A second ratio compares the CPU
seconds the process spent (all threads): on a machine other jobs share, it moves far less with their
load than the wall clock does, and at --threads 1 it is the same work measured. Both sides get the same threads (torch
intra-op threads, and scikit-learn's OpenMP/BLAS pools through threadpoolctl).

    .venv/bin/python benchmarks/bench_ml.py [--repeats 5] [--threads 2] [--scale 1.0] [--cases kmeans lda ...]

--scale multiplies the sample counts (1.0: KMeans 100k x 32, KNN 20k train / 5k queries x 32, LDA 2k docs x
2k words, NMF 5k x 500, LogisticRegression 50k x 50, FM 40k one-hot rows x 200 against a PyTorch FM, as
scikit-learn has none). lda_gibbs: luoshu's collapsed Gibbs LDA (50 sweeps) against scikit-learn's online
variational LDA on the LDA row's data.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import scipy.sparse as sp
import torch


def _time(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process over all its threads, result)."""
    tick, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - tick, time.process_time() - cpu, out


def case_kmeans(scale: float):
    from sklearn.cluster import KMeans as Ref
    from sklearn.datasets import make_blobs

    from luoshu.ml import KMeans

    X, _ = make_blobs(int(100_000 * scale), n_features=32, centers=16, cluster_std=4.0, random_state=0)
    X = X.astype(np.float32)
    ours = lambda: KMeans(16, n_init=1, max_iter=100, random_state=0).fit(X)  # noqa: E731
    ref = lambda: Ref(16, n_init=1, max_iter=100, random_state=0, algorithm="lloyd").fit(X)  # noqa: E731
    quality = lambda m: ("inertia", float(m.inertia_))  # noqa: E731
    return f"KMeans fit {X.shape[0]}x32 k=16 float32", ours, ref, quality, quality


def case_minibatch(scale: float):
    from sklearn.cluster import MiniBatchKMeans as Ref
    from sklearn.datasets import make_blobs

    from luoshu.ml import MiniBatchKMeans

    X, _ = make_blobs(int(100_000 * scale), n_features=32, centers=16, cluster_std=4.0, random_state=0)
    X = X.astype(np.float32)
    ours = lambda: MiniBatchKMeans(16, batch_size=2048, random_state=0).fit(X)  # noqa: E731
    ref = lambda: Ref(16, batch_size=2048, random_state=0).fit(X)  # noqa: E731
    quality = lambda m: ("inertia", float(m.inertia_))  # noqa: E731
    return f"MiniBatchKMeans fit {X.shape[0]}x32 k=16", ours, ref, quality, quality


def case_knn(scale: float):
    from sklearn.datasets import make_classification
    from sklearn.neighbors import KNeighborsClassifier as Ref

    from luoshu.ml import KNeighborsClassifier

    n_train, n_query = int(20_000 * scale), int(5_000 * scale)
    X, y = make_classification(n_train + n_query, n_features=32, n_informative=16, n_classes=4, random_state=0)
    Xtr, Xte, ytr, yte = X[:n_train], X[n_train:], y[:n_train], y[n_train:]
    ours_model = KNeighborsClassifier(10).fit(Xtr, ytr)
    ref_model = Ref(10, algorithm="brute").fit(Xtr, ytr)  # brute: what scikit-learn picks itself at 32 dims
    ours = lambda: ours_model.predict(Xte)  # noqa: E731
    ref = lambda: ref_model.predict(Xte)  # noqa: E731
    quality = lambda pred: ("accuracy", float((pred == yte).mean()))  # noqa: E731
    return f"KNN predict {n_query} queries on {n_train}x32, k=10", ours, ref, quality, quality


def _lda_corpus(scale: float):
    """Documents of 100 words drawn from a known 10-topic model over 2k words: (training CSR, 500 held-out)."""
    rng = np.random.default_rng(0)
    n_docs, n_words, k = int(2_000 * scale), 2_000, 10
    topics = rng.dirichlet(np.full(n_words, 0.02), k)
    theta = rng.dirichlet(np.full(k, 0.2), n_docs + 500)
    counts = np.stack([rng.multinomial(100, t @ topics) for t in theta]).astype(np.float64)
    return sp.csr_matrix(counts[:n_docs]), sp.csr_matrix(counts[n_docs:])


def case_lda(scale: float):
    from sklearn.decomposition import LatentDirichletAllocation as Ref

    from luoshu.ml import LDA

    X, held = _lda_corpus(scale)
    kwargs = dict(learning_method="online", max_iter=5, batch_size=256, random_state=0)
    ours = lambda: LDA(10, **kwargs).fit(X)  # noqa: E731
    ref = lambda: Ref(10, **kwargs).fit(X)  # noqa: E731
    quality = lambda m: ("held-out perplexity", float(m.perplexity(held)))  # noqa: E731
    return f"LDA online fit {X.shape[0]} docs x {X.shape[1]} words, 10 topics, 5 passes", ours, ref, quality, quality


def case_lda_gibbs(scale: float):
    """Collapsed Gibbs sampling (50 sweeps) against scikit-learn's online variational fit of the LDA row (5
    passes): time, and held-out perplexity by the same variational bound given each model's components_."""
    from sklearn.decomposition import LatentDirichletAllocation as Ref

    from luoshu.ml import LDA

    X, held = _lda_corpus(scale)
    ours = lambda: LDA(10, learning_method="gibbs", max_iter=50, random_state=0).fit(X)  # noqa: E731
    ref = lambda: Ref(10, learning_method="online", max_iter=5, batch_size=256, random_state=0).fit(X)  # noqa: E731
    quality = lambda m: ("held-out perplexity", float(m.perplexity(held)))  # noqa: E731
    return f"LDA gibbs fit {X.shape[0]} docs, 50 sweeps (sklearn online)", ours, ref, quality, quality


def case_nmf(scale: float):
    from sklearn.decomposition import NMF as Ref

    from luoshu.ml import NMF

    rng = np.random.default_rng(0)
    n = int(5_000 * scale)
    X = np.abs(rng.normal(size=(n, 20))) @ np.abs(rng.normal(size=(20, 500))) + np.abs(rng.normal(size=(n, 500)))
    ours = lambda: NMF(20, max_iter=200, random_state=0).fit(X)  # noqa: E731
    ref = lambda: Ref(20, max_iter=200, random_state=0).fit(X)  # noqa: E731
    quality = lambda m: ("reconstruction error", float(m.reconstruction_err_))  # noqa: E731
    return f"NMF (cd) fit {n}x500, 20 components", ours, ref, quality, quality


def case_logistic(scale: float):
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression as Ref
    from sklearn.metrics import log_loss

    from luoshu.ml import LogisticRegression

    X, y = make_classification(int(50_000 * scale), n_features=50, n_informative=20, random_state=0)
    ours = lambda: LogisticRegression(C=1.0).fit(X, y)  # noqa: E731
    ref = lambda: Ref(C=1.0, max_iter=1000).fit(X, y)  # noqa: E731
    quality = lambda m: ("train log loss", float(log_loss(y, m.predict_proba(X))))  # noqa: E731
    return f"LogisticRegression (L2) fit {X.shape[0]}x50", ours, ref, quality, quality


def case_fm(scale: float):
    """FM on one-hot CTR-like rows; scikit-learn has no FM, so the reference is the FM a PyTorch user writes
    (embedding tables, torch.optim.Adagrad, same factors, epochs, batch and learning rate). Of the variants a
    PyTorch user would write for it (this one; foreach Adagrad; one [w | V] table through F.embedding, dense or
    with sparse gradients and Adagrad's sparse update) this was the fastest or level at 1 thread: 0.31-0.33 s
    against 0.21-0.64 s, 0.41-0.43 s and 0.59-0.68 s at scale 0.5, load average ~6."""
    from sklearn.metrics import log_loss

    from luoshu.ml import FactorizationMachine

    rng = np.random.default_rng(0)
    n, fields, values, factors = int(40_000 * scale), 10, 20, 8
    ids = rng.integers(0, values, size=(n, fields)) + np.arange(fields) * values  # one id per field
    hidden = rng.normal(0, 0.5, size=(fields * values, 4))
    emb = hidden[ids]  # (n, fields, 4)
    logit = 0.5 * ((emb.sum(1) ** 2).sum(1) - (emb**2).sum((1, 2))) / 3 - 0.2
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    X = sp.csr_matrix(
        (np.ones(n * fields), ids.reshape(-1), np.arange(0, n * fields + 1, fields)), (n, fields * values)
    )
    n_test = n // 5
    Xtr, ytr, Xte, yte, ids_tr, ids_te = X[n_test:], y[n_test:], X[:n_test], y[:n_test], ids[n_test:], ids[:n_test]
    kw = dict(n_factors=factors, n_epochs=5, batch_size=256, learning_rate=0.05, reg_factors=1e-3)

    def ref():
        gen = torch.Generator().manual_seed(0)
        d = fields * values
        w0 = torch.zeros(1, requires_grad=True)
        w = torch.zeros(d, requires_grad=True)
        V = (torch.randn(d, factors, generator=gen) * 0.01).requires_grad_()
        opt = torch.optim.Adagrad([w0, w, V], lr=0.05)
        idx, target = torch.from_numpy(ids_tr), torch.from_numpy(ytr).float()

        def score(i):
            e = V[i]
            return w0 + w[i].sum(1) + 0.5 * ((e.sum(1) ** 2) - (e * e).sum(1)).sum(1)

        for _ in range(5):
            perm = torch.randperm(len(idx), generator=gen)
            for a in range(0, len(idx), 256):
                b = perm[a : a + 256]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(score(idx[b]), target[b])
                loss = loss + 1e-3 * 0.5 * (V[idx[b]] ** 2).sum() / len(b)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            return torch.sigmoid(score(torch.from_numpy(ids_te))).numpy()

    ours = lambda: FactorizationMachine(random_state=0, **kw).fit(Xtr, ytr).predict_proba(Xte)[:, 1]  # noqa: E731
    quality = lambda p: ("test log loss", float(log_loss(yte, p)))  # noqa: E731
    return f"FM fit {len(ytr)} one-hot rows x {fields * values} (PyTorch reference)", ours, ref, quality, quality


CASES = {
    "fm": case_fm,
    "kmeans": case_kmeans,
    "minibatch": case_minibatch,
    "knn": case_knn,
    "lda": case_lda,
    "lda_gibbs": case_lda_gibbs,
    "nmf": case_nmf,
    "logistic": case_logistic,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs after one warm-up pair")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # scikit-learn's convergence notices
    print(f"threads {args.threads}, {args.repeats} timed repeats (median), scale {args.scale}")
    print(f"{'case':58s} {'luoshu s':>9s} {'sklearn s':>9s} {'speed-up':>8s} {'cpu':>7s}  "
          "quality (luoshu / sklearn)")
    with threadpool_limits(args.threads):
        for name in args.cases:
            title, ours, ref, q_ours, q_ref = CASES[name](args.scale)
            times_ours, times_ref, cpu_ours, cpu_ref = [], [], [], []
            for r in range(args.repeats + 1):
                t_ours, c_ours, out_ours = _time(ours)
                t_ref, c_ref, out_ref = _time(ref)
                if r:  # the first pair warms caches, thread pools and lazy imports
                    times_ours.append(t_ours)
                    times_ref.append(t_ref)
                    cpu_ours.append(c_ours)
                    cpu_ref.append(c_ref)
            a, b = statistics.median(times_ours), statistics.median(times_ref)
            cpu = statistics.median(cpu_ref) / statistics.median(cpu_ours)
            metric, va = q_ours(out_ours)
            _, vb = q_ref(out_ref)
            print(f"{title:58s} {a:9.3f} {b:9.3f} {b / a:7.2f}x {cpu:6.2f}x  {metric} {va:.6g} / {vb:.6g}", flush=True)


if __name__ == "__main__":
    main()
