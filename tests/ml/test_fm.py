"""luoshu.ml.fm: gradients against torch autograd, quality against the generating model and LR, PS training."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.linear_model import LogisticRegression as SkLogisticRegression
from sklearn.metrics import r2_score, roc_auc_score

from luoshu import ml
from luoshu.ml.base import to_torch
from luoshu.ml.fm import FactorizationMachine, FieldAwareFM, _loss_and_residual


def fm_data(n=4000, d=30, k=4, seed=0):
    """Binary data drawn from a known FM: returns X (CSR, 0/1), y, the true scores."""
    rng = np.random.default_rng(seed)
    X = sp.random(n, d, density=0.2, random_state=seed + 1, format="csr", data_rvs=lambda s: np.ones(s))
    V, w = rng.normal(size=(d, k)), rng.normal(size=d) * 0.3
    Xd = X.toarray()
    score = Xd @ w + 0.5 * ((Xd @ V) ** 2 - Xd**2 @ V**2).sum(1)
    score = (score - score.mean()) / score.std() * 3
    return X, (rng.random(n) < 1 / (1 + np.exp(-score))).astype(int), score


@pytest.mark.parametrize("cls", [FactorizationMachine, FieldAwareFM])
@pytest.mark.parametrize("task, k_out", [("classification", 1), ("classification", 3), ("regression", 1)])
@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_gradients_equal_torch_autograd(cls, task, k_out, layout):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(7, 6)) * (rng.random((7, 6)) < 0.6)
    m = cls(task=task, n_factors=3, reg_factors=0.0)
    if cls is FieldAwareFM:
        m.fields_, m.n_fields_ = np.array([0, 0, 1, 1, 2, 2]), 3
    gen = torch.Generator().manual_seed(0)
    p = {
        k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
        for k, v in m._init_params(6, k_out, gen).items()
    }
    target = (
        torch.nn.functional.one_hot(torch.arange(7) % k_out, k_out).double()
        if k_out > 1
        else torch.tensor([[0.0], [1.0], [1.0], [0.0], [1.0], [0.0], [1.0]], dtype=torch.float64)
    )
    Xin = to_torch(sp.csr_matrix(X) if layout == "csr" else X)
    Z, cache = m._scores(Xin, p)
    _, R = _loss_and_residual(task, k_out, Z, target)
    ours = m._grads(Xin, p, cache, R)
    ref = {k: v.clone().requires_grad_() for k, v in p.items()}
    Zr, _ = m._scores(torch.from_numpy(X), ref)
    loss, _ = _loss_and_residual(task, k_out, Zr, target)
    loss.sum().backward()
    for name in p:
        torch.testing.assert_close(ours[name], ref[name].grad, atol=1e-12, rtol=1e-10)


def _pairwise_scores(cls, X, p, fields):
    """Scores by the definition (a sum over feature pairs i < j), independent of the O(nnz k) forms."""
    d = X.shape[1]
    upper = torch.triu(torch.ones(d, d, dtype=torch.float64), 1)
    if cls is FactorizationMachine:
        dots = torch.einsum("cik,cjk->ijc", p["V"], p["V"])  # <v_i, v_j> per output
    else:
        f = torch.from_numpy(fields)
        Vij = p["V"][:, f]  # (i, j, K, k): v_{i, F(j)}
        dots = (Vij * Vij.transpose(0, 1)).sum(3)  # <v_{i,F(j)}, v_{j,F(i)}>
    pair = torch.einsum("bi,bj,ijc,ij->bc", X, X, dots, upper)
    return p["w0"] + X @ p["w"] + pair


@pytest.mark.parametrize("cls", [FactorizationMachine, FieldAwareFM])
@pytest.mark.parametrize("task, k_out", [("classification", 1), ("classification", 3), ("regression", 1)])
def test_training_equals_torch_autograd_and_adagrad_on_touched_rows(cls, task, k_out):
    """Two epochs of batches of 4: the compiled epochs against torch autograd + torch.optim.Adagrad, with the
    penalty on the rows the batch touches (untouched rows get no gradient, so Adagrad leaves them alone)."""
    rng = np.random.default_rng(1)
    n, d = 10, 6
    X = rng.normal(size=(n, d)) * (rng.random((n, d)) < 0.4)
    y = rng.normal(size=n) if task == "regression" else np.arange(n) % (2 if k_out == 1 else k_out)
    fields = np.array([0, 0, 1, 1, 2, 2])
    kw = dict(task=task, n_factors=3, n_epochs=2, batch_size=4, learning_rate=0.3, reg_linear=0.05,
              reg_factors=0.1, init_std=0.5, random_state=4)  # fmt: skip
    m = cls(fields=fields, **kw) if cls is FieldAwareFM else cls(**kw)
    m.fit(sp.csr_matrix(X), y)
    # the reference starts where fit starts: the same seeds, initial parameters and row orders
    seeds = np.random.default_rng(4)
    gen = torch.Generator().manual_seed(int(seeds.integers(2**31)))
    m.n_fields_ = 3
    p = {k: v.clone().requires_grad_() for k, v in m._init_params(d, k_out, gen).items()}
    opt = torch.optim.Adagrad(list(p.values()), lr=0.3, eps=1e-10)
    Xt = torch.from_numpy(X)
    target = torch.from_numpy(y) if task == "regression" else torch.from_numpy(y).long()
    curve = []
    for _ in range(2):
        order, total = seeds.permutation(n), 0.0
        for start in range(0, n, 4):
            rows = torch.from_numpy(np.sort(order[start : start + 4]))
            Z = _pairwise_scores(cls, Xt[rows], p, fields)
            if task == "regression":
                loss = 0.5 * ((Z[:, 0] - target[rows]) ** 2).sum()
            elif k_out == 1:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    Z[:, 0], target[rows].double(), reduction="sum"
                )
            else:
                loss = torch.nn.functional.cross_entropy(Z, target[rows], reduction="sum")
            total += float(loss.detach())
            touched = (Xt[rows] != 0).any(0)
            penalty = 0.5 * (0.05 * (p["w"][touched] ** 2).sum() + 0.1 * (p["V"][..., touched, :] ** 2).sum()) \
                if cls is FactorizationMachine else \
                0.5 * (0.05 * (p["w"][touched] ** 2).sum() + 0.1 * (p["V"][touched] ** 2).sum())  # fmt: skip
            opt.zero_grad()
            (loss / len(rows) + penalty).backward()
            opt.step()
        curve.append(total / n)
    for name in ("w0", "w", "V"):
        np.testing.assert_allclose(getattr(m, name + "_"), p[name].detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m.loss_curve_, curve, rtol=1e-10)


def test_ffm_score_equals_the_pairwise_sum():
    m = FieldAwareFM(n_factors=2)
    m.fields_, m.n_fields_ = np.array([0, 1, 1, 2]), 3
    gen = torch.Generator().manual_seed(1)
    p = m._init_params(4, 1, gen)
    p["V"] = torch.randn(p["V"].shape, generator=gen, dtype=torch.float64)
    x = torch.randn(1, 4, generator=gen, dtype=torch.float64)
    Z, _ = m._scores(x, p)
    V, f = p["V"][:, :, 0, :], m.fields_
    brute = sum(float(V[i, f[j]] @ V[j, f[i]] * x[0, i] * x[0, j]) for i in range(4) for j in range(i + 1, 4))
    assert float(Z[0, 0]) == pytest.approx(brute, abs=1e-12)


def test_fm_learns_interactions_that_logistic_regression_cannot():
    X, y, score = fm_data()
    tr, te = slice(0, 3000), slice(3000, None)
    fm = FactorizationMachine(n_factors=4, n_epochs=30).fit(X[tr], y[tr])
    auc = roc_auc_score(y[te], fm.predict_proba(X[te])[:, 1])
    best = roc_auc_score(y[te], score[te])  # the generating model
    lr = roc_auc_score(y[te], SkLogisticRegression().fit(X[tr], y[tr]).decision_function(X[te]))
    assert auc > best - 0.03 and auc > lr + 0.1
    assert fm.loss_curve_[-1] < fm.loss_curve_[0]


def test_ffm_and_regression():
    X, y, score = fm_data(n=3000, d=16)
    fields = np.arange(16) // 4
    ffm = FieldAwareFM(fields=fields, n_factors=4, n_epochs=20).fit(X[:2200], y[:2200])
    assert roc_auc_score(y[2200:], ffm.predict_proba(X[2200:])[:, 1]) > roc_auc_score(y[2200:], score[2200:]) - 0.06
    reg = FactorizationMachine(task="regression", n_factors=4, n_epochs=40, learning_rate=0.2).fit(
        X[:2200], score[:2200]
    )
    assert r2_score(score[2200:], reg.predict(X[2200:])) > 0.9
    with pytest.raises(ml.DataError, match="fields"):
        FieldAwareFM(fields=[0, 1]).fit(X, y)


def test_fm_on_parameter_servers_with_hashed_ids_reaches_the_local_loss(tmp_path, monkeypatch):
    from luoshu import ps

    X, y, _ = fm_data(n=3000)
    rng = np.random.default_rng(3)
    hashed = np.sort(rng.choice(2**40, X.shape[1], replace=False))  # feature ids up to 2^40
    Xh = sp.csr_matrix((X.data, hashed[X.indices], X.indptr), shape=(X.shape[0], 2**40))
    local = FactorizationMachine(n_factors=4, n_epochs=10).fit(X, y)
    lr_local = ml.SparseLogisticRegression(n_epochs=10).fit(X, y)
    with ps.start_local_servers(2, in_process=True) as servers:
        # the estimator connects by address; the job's secret (as the launcher hands it) admits it
        monkeypatch.setenv("LUOSHU_JOB_SECRET", servers.secret)
        fm = FactorizationMachine(n_factors=4, n_epochs=10, ps_addresses=servers.addresses).fit(Xh, y)
        lr = ml.SparseLogisticRegression(n_epochs=10, ps_addresses=servers.addresses).fit(Xh, y)
    assert fm.loss_curve_[-1] == pytest.approx(local.loss_curve_[-1], rel=0.03)
    assert lr.loss_curve_[-1] == pytest.approx(lr_local.loss_curve_[-1], rel=0.03)
    sk = SkLogisticRegression(C=1e4).fit(X, y)  # logistic regression: the same ranking as scikit-learn's
    assert roc_auc_score(y, lr.predict_proba(Xh)[:, 1]) == pytest.approx(
        roc_auc_score(y, sk.decision_function(X)), abs=0.01
    )
    np.testing.assert_array_equal(fm.feature_ids_, hashed)
    assert roc_auc_score(y, fm.predict_proba(Xh)[:, 1]) == pytest.approx(
        roc_auc_score(y, local.predict_proba(X)[:, 1]), abs=0.01
    )
    fm.save(tmp_path / "fm")  # predicts without the servers, also after loading
    np.testing.assert_array_equal(ml.load(tmp_path / "fm").predict_proba(Xh), fm.predict_proba(Xh))


@pytest.mark.parametrize("cls", [FactorizationMachine, FieldAwareFM])
def test_repeated_csr_entries_count_as_their_sum(cls):
    X, y, _ = fm_data(n=300, d=8)
    # every entry split into two halves at the same (row, column): CSR built from its parts keeps both
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    order = np.argsort(np.r_[rows, rows], kind="stable")
    half = sp.csr_matrix(
        (np.r_[X.data, X.data][order] / 2, np.r_[X.indices, X.indices][order], 2 * X.indptr), shape=X.shape
    )
    assert half.nnz == 2 * X.nnz and not half.has_canonical_format
    a = cls(n_epochs=2, random_state=0).fit(X, y)
    b = cls(n_epochs=2, random_state=0).fit(half, y)
    np.testing.assert_allclose(a.V_, b.V_, rtol=1e-10, atol=1e-14)
    assert not half.has_canonical_format  # the caller's matrix is left as it was
