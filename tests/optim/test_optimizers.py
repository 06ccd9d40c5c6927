"""Optimizers against torch.optim (and LAMB against NumPy), in eager and define-and-run modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import luoshu as ls
import luoshu.optim as optim

STEPS = 20
SHAPES = [(5, 4), (4,), (4, 3), (3,)]
_rng = np.random.default_rng(0)
INIT = [_rng.standard_normal(s) * 0.5 for s in SHAPES]
XS = [_rng.standard_normal((6, 5)) for _ in range(STEPS)]


def _ls_loss(x, params):
    w1, b1, w2, b2 = params
    out = ls.ops.tanh(x @ w1 + b1) @ w2 + b2
    return (out * out).sum() * 0.5


def _torch_loss(x, params):
    w1, b1, w2, b2 = params
    out = torch.tanh(x @ w1 + b1) @ w2 + b2
    return (out * out).sum() * 0.5


def _ls_params(dtype=np.float64, device="cpu"):
    return [ls.tensor(v.astype(dtype), requires_grad=True, device=device) for v in INIT]


def _torch_params(dtype=torch.float64):
    return [torch.tensor(v, dtype=dtype, requires_grad=True) for v in INIT]


def run_luoshu(make_opt, mode, dtype=np.float64, steps=STEPS, params=None, opt=None, xs=XS, device="cpu"):
    """Trains the small MLP; returns the parameters after every step."""
    params = params if params is not None else _ls_params(dtype, device)
    opt = opt if opt is not None else make_opt(params)
    trajectory = []
    if mode == "graph":
        with ls.Graph() as g:
            x = ls.placeholder("x", (6, 5), str(np.dtype(dtype)), device=device)
            loss = _ls_loss(x, params)
            train = opt.minimize(loss)
        for xv in xs[:steps]:
            _, fetched = g.run([loss, train], {x: xv.astype(dtype)})
            assert fetched is None
            trajectory.append([p.numpy() for p in params])
    elif mode == "minimize":
        for xv in xs[:steps]:
            assert opt.minimize(_ls_loss(ls.tensor(xv.astype(dtype), device=device), params)) is None
            trajectory.append([p.numpy() for p in params])
    else:
        for xv in xs[:steps]:
            loss = _ls_loss(ls.tensor(xv.astype(dtype), device=device), params)
            loss.backward()
            opt.step()
            opt.zero_grad()
            trajectory.append([p.numpy() for p in params])
    return trajectory, params, opt


def run_torch(make_opt, dtype=torch.float64, steps=STEPS, loss_extra=None, clip=None):
    params = _torch_params(dtype)
    opt = make_opt(params)
    trajectory = []
    for xv in XS[:steps]:
        loss = _torch_loss(torch.tensor(xv, dtype=dtype), params)
        if loss_extra is not None:
            loss = loss + loss_extra(params)
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        trajectory.append([p.detach().numpy().copy() for p in params])
    return trajectory


def assert_same_trajectory(ours, ref, rtol=1e-5, atol=1e-7):
    assert len(ours) == len(ref)
    for step, (a, b) in enumerate(zip(ours, ref)):
        for i, (pa, pb) in enumerate(zip(a, b)):
            np.testing.assert_allclose(pa, pb, rtol=rtol, atol=atol, err_msg=f"step {step}, parameter {i}")


# (id, luoshu factory, torch factory)
CONFIGS = [
    ("sgd", lambda p: optim.SGD(p, lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
    ("sgd_momentum_dampening_wd",
     lambda p: optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("sgd_nesterov", lambda p: optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02)),
    ("momentum", lambda p: optim.Momentum(p, lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    ("nesterov", lambda p: optim.Nesterov(p, lr=0.05),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    ("adagrad", lambda p: optim.AdaGrad(p, lr=0.1), lambda p: torch.optim.Adagrad(p, lr=0.1)),
    ("adagrad_decay_wd_init",
     lambda p: optim.Adagrad(p, lr=0.1, lr_decay=0.05, weight_decay=0.01, initial_accumulator_value=0.1, eps=1e-8),
     lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.05, weight_decay=0.01, initial_accumulator_value=0.1,
                                   eps=1e-8)),
    ("rmsprop", lambda p: optim.RMSProp(p, lr=0.01), lambda p: torch.optim.RMSprop(p, lr=0.01)),
    ("rmsprop_centered_momentum_wd",
     lambda p: optim.RMSprop(p, lr=0.01, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.01),
     lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.01)),
    ("adam", lambda p: optim.Adam(p, lr=0.05), lambda p: torch.optim.Adam(p, lr=0.05)),
    ("adam_amsgrad_wd", lambda p: optim.Adam(p, lr=0.05, betas=(0.8, 0.99), weight_decay=0.05, amsgrad=True),
     lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.99), weight_decay=0.05, amsgrad=True)),
    ("adamw", lambda p: optim.AdamW(p, lr=0.05, weight_decay=0.1),
     lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1)),
    ("adamw_amsgrad", lambda p: optim.AdamW(p, lr=0.05, amsgrad=True),
     lambda p: torch.optim.AdamW(p, lr=0.05, amsgrad=True)),
    ("param_groups",
     lambda p: optim.Adam([{"params": p[:2], "lr": 0.02, "weight_decay": 0.1}, {"params": p[2:]}], lr=0.05),
     lambda p: torch.optim.Adam([{"params": p[:2], "lr": 0.02, "weight_decay": 0.1}, {"params": p[2:]}], lr=0.05)),
]


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_trajectory_matches_torch(config, mode):
    _, ours, theirs = config
    assert_same_trajectory(run_luoshu(ours, mode)[0], run_torch(theirs))


def test_eager_minimize_matches_step():
    ours, _, _ = run_luoshu(lambda p: optim.Adam(p, lr=0.05), "minimize")
    assert_same_trajectory(ours, run_torch(lambda p: torch.optim.Adam(p, lr=0.05)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_trajectory_matches_torch_on_cuda(config, mode):
    _, ours, theirs = config
    ref = run_torch(theirs)
    assert_same_trajectory(run_luoshu(ours, mode, device="cuda")[0], ref)
    lamb = lambda p: optim.LAMB(p, lr=0.02, betas=(0.9, 0.99), weight_decay=0.05, max_grad_norm=1.0)  # noqa: E731
    assert_same_trajectory(run_luoshu(lamb, mode, device="cuda")[0], run_luoshu(lamb, mode)[0])


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_float32_matches_torch(mode):
    ours, params, _ = run_luoshu(lambda p: optim.AdamW(p, lr=0.01), mode, dtype=np.float32)
    assert all(p.dtype == "float32" for p in params)
    ref = run_torch(lambda p: torch.optim.AdamW(p, lr=0.01), dtype=torch.float32)
    assert_same_trajectory(ours, ref, rtol=1e-5, atol=1e-5)


# --- LAMB against a NumPy reference of the formula ---------------------------------------
def _lamb_reference(lr, betas, eps, weight_decay, steps=STEPS):
    """LAMB (apex FusedLAMB, no grad averaging) in NumPy; gradients from torch autograd."""
    params = _torch_params()
    m = [np.zeros(s) for s in SHAPES]
    v = [np.zeros(s) for s in SHAPES]
    b1, b2 = betas
    trajectory = []
    for t, xv in enumerate(XS[:steps], start=1):
        for p in params:
            p.grad = None
        _torch_loss(torch.tensor(xv), params).backward()
        for i, p in enumerate(params):
            g = p.grad.numpy()
            w = p.detach().numpy()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            update = (m[i] / (1 - b1 ** t)) / (np.sqrt(v[i] / (1 - b2 ** t)) + eps) + weight_decay * w
            w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(update)
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            with torch.no_grad():
                p.copy_(torch.from_numpy(w - lr * ratio * update))
        trajectory.append([p.detach().numpy().copy() for p in params])
    return trajectory


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_lamb_matches_numpy_reference(mode, weight_decay):
    ours, _, _ = run_luoshu(lambda p: optim.LAMB(p, lr=0.02, betas=(0.9, 0.99), eps=1e-6,
                                                 weight_decay=weight_decay), mode)
    assert_same_trajectory(ours, _lamb_reference(0.02, (0.9, 0.99), 1e-6, weight_decay))


def test_lamb_trust_ratio_is_one_for_a_zero_parameter():
    p = ls.tensor(np.zeros(3), requires_grad=True)
    opt = optim.LAMB([p], lr=0.1, weight_decay=0.0)
    p.grad = ls.tensor(np.array([1.0, -2.0, 0.5]))
    opt.step()
    # ‖p‖ = 0, so the ratio is 1: the plain bias-corrected Adam step, sign(g) · lr at step 1.
    np.testing.assert_allclose(p.numpy(), -0.1 * np.sign([1.0, -2.0, 0.5]), rtol=1e-5)


# --- regularisation and clipping ---------------------------------------------------------
@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop"])
def test_l1_matches_an_l1_penalty_in_the_loss(name, mode):
    l1 = 0.03
    ours_cls = {"sgd": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, l1=l1),
                "adam": lambda p: optim.Adam(p, lr=0.05, l1=l1, weight_decay=0.01),
                "rmsprop": lambda p: optim.RMSprop(p, lr=0.01, l1=l1)}[name]
    ref_cls = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
               "adam": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.01),
               "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01)}[name]
    ref = run_torch(ref_cls, loss_extra=lambda ps: l1 * sum(p.abs().sum() for p in ps))
    assert_same_trajectory(run_luoshu(ours_cls, mode)[0], ref)


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("name", ["sgd", "adam", "adagrad"])
def test_max_grad_norm_matches_torch_clipping(name, mode):
    ours_cls = {"sgd": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, max_grad_norm=0.5),
                "adam": lambda p: optim.Adam(p, lr=0.05, max_grad_norm=0.5),
                "adagrad": lambda p: optim.Adagrad(p, lr=0.1, max_grad_norm=0.5)}[name]
    ref_cls = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
               "adam": lambda p: torch.optim.Adam(p, lr=0.05),
               "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1)}[name]
    assert_same_trajectory(run_luoshu(ours_cls, mode)[0], run_torch(ref_cls, clip=0.5))


def test_clip_grad_norm_helper_matches_torch_and_counts_sparse_rows():
    rng = np.random.default_rng(3)
    dense_g = rng.standard_normal((4, 3))
    idx = np.array([2, 0, 2, 5])
    vals = rng.standard_normal((4, 2))
    a = ls.tensor(np.zeros((4, 3)), requires_grad=True)
    table = ls.tensor(np.zeros((6, 2)), requires_grad=True)
    a.grad = ls.tensor(dense_g.copy())
    table.grad = ls.IndexedSlices(ls.tensor(idx), ls.tensor(vals.copy()), (6, 2))
    total = optim.clip_grad_norm_([a, table], 1.0)

    dense_table = np.zeros((6, 2))
    np.add.at(dense_table, idx, vals)
    ta, tt = torch.tensor(dense_g), torch.tensor(dense_table)
    ref_total = torch.nn.utils.clip_grad_norm_([torch.zeros(1)], 1.0)  # warm the API
    pa = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    pt = torch.zeros(6, 2, dtype=torch.float64, requires_grad=True)
    pa.grad, pt.grad = ta.clone(), tt.clone()
    ref_total = torch.nn.utils.clip_grad_norm_([pa, pt], 1.0)
    assert float(total) == pytest.approx(float(ref_total), rel=1e-12)
    np.testing.assert_allclose(a.grad.numpy(), pa.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(table.grad.numpy(), pt.grad.numpy(), rtol=1e-12)


# --- sparse (IndexedSlices) gradients ----------------------------------------------------
SPARSE_FACTORIES = {
    "sgd": lambda p: optim.SGD(p, lr=0.1),
    "momentum_wd_l1": lambda p: optim.Momentum(p, lr=0.1, weight_decay=0.01, l1=0.01),
    "nesterov": lambda p: optim.Nesterov(p, lr=0.1),
    "adagrad": lambda p: optim.Adagrad(p, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
    "rmsprop": lambda p: optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True, weight_decay=0.01),
    "adam": lambda p: optim.Adam(p, lr=0.05, weight_decay=0.01),
    "adam_amsgrad": lambda p: optim.Adam(p, lr=0.05, amsgrad=True),
    "adamw": lambda p: optim.AdamW(p, lr=0.05, weight_decay=0.1),
    "lamb": lambda p: optim.LAMB(p, lr=0.05),
    "adam_clipped": lambda p: optim.Adam(p, lr=0.05, max_grad_norm=0.3),
}


def _sparse_steps(rng, steps, rows=(1, 4, 7), width=3):
    """Per step: indices touching exactly `rows` (with repeats, shuffled) and their values."""
    out = []
    for _ in range(steps):
        idx = np.concatenate([np.array(rows), rng.choice(rows, size=4)])
        rng.shuffle(idx)
        out.append((idx, rng.standard_normal((len(idx), width))))
    return out


@pytest.mark.parametrize("name", list(SPARSE_FACTORIES))
def test_sparse_update_equals_dense_update_on_touched_rows(name):
    make = SPARSE_FACTORIES[name]
    rng = np.random.default_rng(1)
    table0 = rng.standard_normal((10, 3))
    rows = np.array([1, 4, 7])
    table = ls.tensor(table0.copy(), requires_grad=True)
    sub = ls.tensor(table0[rows].copy(), requires_grad=True)  # the touched rows as a dense parameter
    sparse_opt, dense_opt = make([table]), make([sub])
    for idx, vals in _sparse_steps(rng, 8):
        table.grad = ls.IndexedSlices(ls.tensor(idx), ls.tensor(vals), (10, 3))
        dense = np.zeros((10, 3))
        np.add.at(dense, idx, vals)
        sub.grad = ls.tensor(dense[rows])
        sparse_opt.step()
        dense_opt.step()
        np.testing.assert_allclose(table.numpy()[rows], sub.numpy(), rtol=1e-10, atol=1e-12)
        untouched = np.setdiff1d(np.arange(10), rows)
        np.testing.assert_array_equal(table.numpy()[untouched], table0[untouched])


def test_sparse_update_is_lazy_for_untouched_rows_and_their_state():
    rng = np.random.default_rng(2)
    table0 = rng.standard_normal((6, 2))
    table = ls.tensor(table0.copy(), requires_grad=True)
    opt = optim.Adam([table], lr=0.1)
    table.grad = ls.IndexedSlices(ls.tensor(np.array([0, 3, 3])), ls.tensor(np.ones((3, 2))), (6, 2))
    opt.step()
    after_first = table.numpy()
    state = {k: v.clone() for k, v in opt.state[table].items()}
    table.grad = ls.IndexedSlices(ls.tensor(np.array([5])), ls.tensor(np.ones((1, 2))), (6, 2))
    opt.step()
    st = opt.state[table]
    assert float(st["step"]) == 2.0
    # Rows 0 and 3 were not touched by the second step: neither they nor their moments move.
    np.testing.assert_array_equal(table.numpy()[[0, 3]], after_first[[0, 3]])
    for name in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(st[name][[0, 3]], state[name][[0, 3]], rtol=0, atol=0)
        assert torch.all(st[name][[1, 2, 4]] == 0)
    # Row 5 got its first moment update with the bias correction of step 2.
    m = 0.1 * 1.0
    v = 0.001 * 1.0
    expected = table0[5] - 0.1 * (m / (1 - 0.9 ** 2)) / (np.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
    np.testing.assert_allclose(table.numpy()[5], expected, rtol=1e-10)


def test_sparse_and_dense_parameters_in_one_step_and_in_a_graph():
    """The update op takes (indices, values) pairs for sparse parameters in define-and-run too."""
    rng = np.random.default_rng(4)
    table0, w0 = rng.standard_normal((8, 3)), rng.standard_normal((3,))
    steps = [(rng.integers(0, 8, size=5), rng.standard_normal((5, 3)), rng.standard_normal(3)) for _ in range(5)]

    def eager():
        table, w = ls.tensor(table0.copy(), requires_grad=True), ls.tensor(w0.copy(), requires_grad=True)
        opt = optim.Adam([w, table], lr=0.05, max_grad_norm=1.0)
        for idx, vals, gw in steps:
            table.grad = ls.IndexedSlices(ls.tensor(idx), ls.tensor(vals), (8, 3))
            w.grad = ls.tensor(gw)
            opt.step()
        return table.numpy(), w.numpy()

    def graph():
        table, w = ls.tensor(table0.copy(), requires_grad=True), ls.tensor(w0.copy(), requires_grad=True)
        opt = optim.Adam([w, table], lr=0.05, max_grad_norm=1.0)
        with ls.Graph() as g:
            gw = ls.placeholder("gw", (3,), "float64")
            idx = ls.placeholder("idx", (None,), "int64")
            vals = ls.placeholder("vals", (None, 3), "float64")
            train = ls.core.apply("optimizer_update", gw, idx, vals, optimizer=opt._key, params=(0, 1),
                                  kinds="ds")
        for i, v, gwv in steps:
            assert g.run(train, {gw: gwv, idx: i, vals: v}) is None
        return table.numpy(), w.numpy()

    (t_e, w_e), (t_g, w_g) = eager(), graph()
    np.testing.assert_array_equal(t_e, t_g)
    np.testing.assert_array_equal(w_e, w_g)
    assert not np.array_equal(t_e, table0)


@pytest.mark.parametrize("name", list(SPARSE_FACTORIES))
def test_global_sparse_update_equals_dense_update_of_the_scattered_gradient(name):
    """Kind "g" (HugeCTR's Update_t.Global): every row moves as under the dense gradient the
    IndexedSlices stands for, with a dense parameter of the same optimizer beside it."""
    make = SPARSE_FACTORIES[name]
    rng = np.random.default_rng(6)
    table0, w0 = rng.standard_normal((10, 3)), rng.standard_normal(3)
    steps = [(rng.integers(0, 10, size=6), rng.standard_normal((6, 3)), rng.standard_normal(3)) for _ in range(6)]
    steps[3] = (np.array([], np.int64), np.zeros((0, 3)), steps[3][2])  # a step without rows

    table, w = ls.tensor(table0.copy(), requires_grad=True), ls.tensor(w0.copy(), requires_grad=True)
    opt = make([w, table])
    with ls.Graph() as g:
        gw = ls.placeholder("gw", (3,), "float64")
        idx = ls.placeholder("idx", (None,), "int64")
        vals = ls.placeholder("vals", (None, 3), "float64")
        train = ls.core.apply("optimizer_update", gw, idx, vals, optimizer=opt._key, params=(0, 1), kinds="dg")
    dense_table, dense_w = ls.tensor(table0.copy(), requires_grad=True), ls.tensor(w0.copy(), requires_grad=True)
    dense_opt = make([dense_w, dense_table])
    for i, v, gwv in steps:
        g.run(train, {gw: gwv, idx: i, vals: v})
        full = np.zeros((10, 3))
        np.add.at(full, i, v)
        dense_table.grad, dense_w.grad = ls.tensor(full), ls.tensor(gwv)
        dense_opt.step()
        np.testing.assert_allclose(table.numpy(), dense_table.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(w.numpy(), dense_w.numpy(), rtol=1e-10, atol=1e-12)
        assert not opt._grad_buffers[1].any()  # the scratch gradient is all zero between steps
    for k, v in dense_opt.state[dense_table].items():
        torch.testing.assert_close(opt.state[table][k], v, rtol=1e-10, atol=1e-12)


def test_minimize_with_a_sparse_gradient_if_an_embedding_op_exists():
    if "embedding" not in ls.core.registered_ops():
        pytest.skip("no embedding op registered yet")
    rng = np.random.default_rng(5)
    table0 = rng.standard_normal((10, 4))
    ids = np.array([[1, 3], [3, 7]])
    results = []
    for mode in ("eager", "graph"):
        table = ls.tensor(table0.copy(), requires_grad=True)
        opt = optim.Adam([table], lr=0.1)
        if mode == "eager":
            for _ in range(3):
                loss = (ls.ops.embedding(ls.tensor(ids), table) ** 2).sum()
                loss.backward()
                assert isinstance(table.grad, ls.IndexedSlices)
                opt.step()
                opt.zero_grad()
        else:
            with ls.Graph() as g:
                x = ls.placeholder("ids", (2, 2), "int64")
                loss = (ls.ops.embedding(x, table) ** 2).sum()
                train = opt.minimize(loss)
            for _ in range(3):
                g.run([loss, train], {x: ids})
        results.append(table.numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12)
    untouched = [0, 2, 4, 5, 6, 8, 9]
    np.testing.assert_array_equal(results[0][untouched], table0[untouched])


# --- stepping details --------------------------------------------------------------------
def test_step_skips_parameters_without_a_gradient_and_zero_grad_clears():
    a, b = ls.tensor(np.ones(3), requires_grad=True), ls.tensor(np.ones(2), requires_grad=True)
    opt = optim.Adam([a, b], lr=0.1)
    a.grad = ls.tensor(np.ones(3))
    opt.step()
    assert b not in opt.state and a in opt.state
    np.testing.assert_array_equal(b.numpy(), np.ones(2))
    assert not np.allclose(a.numpy(), 1.0)
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_state_tensors_are_lazy_and_match_the_parameter():
    p = ls.tensor(np.ones((2, 3), dtype=np.float32), requires_grad=True)
    opt = optim.Adam([p], amsgrad=True)
    assert len(opt.state) == 0
    p.grad = ls.tensor(np.ones((2, 3), dtype=np.float32))
    opt.step()
    st = opt.state[p]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert all(st[k].dtype == torch.float32 and st[k].shape == (2, 3) for k in ("exp_avg", "exp_avg_sq"))


def test_update_op_is_registered_not_differentiable_and_checked_here():
    opdef = ls.core.get_opdef("optimizer_update")
    assert opdef.differentiable is False
    assert opdef.tested_by == "tests/optim/test_optimizers.py"


def test_graph_update_op_attrs_are_json():
    p = ls.tensor(np.ones(3), requires_grad=True)
    opt = optim.SGD([p], lr=0.1)
    with ls.Graph() as g:
        x = ls.placeholder("x", (3,), "float64")
        train = opt.minimize((p * x).sum())
    op = train.producer[0]
    assert op.opdef.name == "optimizer_update"
    json.dumps(op.attrs)
    g.run(train, {x: np.array([1.0, 2.0, 3.0])})
    np.testing.assert_allclose(p.numpy(), [0.9, 0.8, 0.7])


def test_graph_keeps_its_optimizer_alive():
    p = ls.tensor(np.ones(3), requires_grad=True)
    with ls.Graph() as g:
        x = ls.placeholder("x", (3,), "float64")
        train = optim.SGD([p], lr=0.5).minimize((p * x).sum())
    import gc

    gc.collect()
    g.run(train, {x: np.ones(3)})
    np.testing.assert_allclose(p.numpy(), [0.5, 0.5, 0.5])


def test_minimize_with_var_list_updates_only_those():
    a, b = ls.tensor(np.ones(2), requires_grad=True), ls.tensor(np.ones(2), requires_grad=True)
    opt = optim.SGD([a, b], lr=0.1)
    with ls.Graph() as g:
        train = opt.minimize((a * b).sum(), var_list=[b])
    g.run(train)
    np.testing.assert_allclose(a.numpy(), [1.0, 1.0])
    np.testing.assert_allclose(b.numpy(), [0.9, 0.9])


@pytest.mark.parametrize("bad", [
    lambda p: optim.SGD(p, lr=-1.0),
    lambda p: optim.SGD(p, lr=0.1, nesterov=True),
    lambda p: optim.Adam(p, betas=(0.9, 1.5)),
    lambda p: optim.RMSprop(p, alpha=2.0),
    lambda p: optim.Adam(p, max_grad_norm=0.0),
    lambda p: optim.Adam(p, weight_decay=-0.1),
    lambda p: optim.SGD(p + p, lr=0.1),
    lambda p: optim.SGD([], lr=0.1),
    lambda p: optim.SGD([ls.tensor(np.arange(3))], lr=0.1),
])
def test_bad_arguments_raise_luoshu_errors(bad):
    with pytest.raises(ls.Error):
        bad(_ls_params())


def test_minimize_without_a_path_to_the_parameters_raises():
    p, q = ls.tensor(np.ones(2), requires_grad=True), ls.tensor(np.ones(2), requires_grad=True)
    opt = optim.SGD([p], lr=0.1)
    with ls.Graph(), pytest.raises(ls.GradientError):
        opt.minimize((q * 2.0).sum())
    with pytest.raises(ls.Error):
        opt.minimize((p * 2.0).sum(), var_list=[q])


# --- state dicts -------------------------------------------------------------------------
STATEFUL = {
    "momentum": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1),
    "adagrad": lambda p: optim.Adagrad(p, lr=0.1, lr_decay=0.01),
    "rmsprop": lambda p: optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
    "adam": lambda p: optim.Adam(p, lr=0.05, amsgrad=True),
    "lamb": lambda p: optim.LAMB(p, lr=0.02, max_grad_norm=2.0),
}


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("name", list(STATEFUL))
def test_state_dict_round_trip_continues_the_trajectory(name, mode, tmp_path):
    from safetensors.torch import load_file, save_file

    make = STATEFUL[name]
    full, _, _ = run_luoshu(make, mode)
    first, params, opt = run_luoshu(make, mode, steps=10)
    sd = opt.state_dict()
    meta = json.loads(json.dumps(sd["meta"]))  # JSON-serialisable
    save_file({k: v.contiguous() for k, v in sd["tensors"].items()}, tmp_path / "opt.safetensors")
    tensors = load_file(tmp_path / "opt.safetensors")

    resumed_params = [ls.tensor(p.numpy(), requires_grad=True) for p in params]
    resumed_opt = make(resumed_params)
    resumed_opt.load_state_dict({"tensors": tensors, "meta": meta})
    rest, _, _ = run_luoshu(None, mode, params=resumed_params, opt=resumed_opt, xs=XS[10:], steps=10)
    assert_same_trajectory(first + rest, full, rtol=1e-12, atol=1e-14)


def test_state_dict_layout():
    _, params, opt = run_luoshu(lambda p: optim.Adam([{"params": p[:1]}, {"params": p[1:], "lr": 0.1}], lr=0.05),
                                "eager", steps=3)
    sd = opt.state_dict()
    assert set(sd["tensors"]) == {f"state.{i}.{n}" for i in range(4) for n in ("exp_avg", "exp_avg_sq")}
    meta = sd["meta"]
    assert meta["num_params"] == 4
    assert [g["params"] for g in meta["param_groups"]] == [[0], [1, 2, 3]]
    assert meta["param_groups"][1]["lr"] == 0.1 and meta["param_groups"][0]["betas"] == [0.9, 0.999]
    assert meta["state"]["2"]["step"] == 3


def _snapshot(opt):
    return ([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            {i: {k: v.clone() for k, v in st.items()} for i, st in enumerate(opt._state) if st is not None})


def _corruptions():
    def drop_tensor(sd):
        sd["tensors"].pop("state.0.exp_avg")

    def extra_tensor(sd):
        sd["tensors"]["state.0.velocity"] = sd["tensors"]["state.0.exp_avg"].clone()

    def wrong_shape(sd):
        sd["tensors"]["state.1.exp_avg"] = torch.zeros(7, dtype=torch.float64)

    def wrong_dtype(sd):
        sd["tensors"]["state.1.exp_avg"] = sd["tensors"]["state.1.exp_avg"].float()

    def wrong_count(sd):
        sd["meta"]["num_params"] = 3

    def wrong_groups(sd):
        sd["meta"]["param_groups"].append(dict(sd["meta"]["param_groups"][0]))

    def bad_hyper(sd):
        sd["meta"]["param_groups"][0]["lr"] = "fast"

    def bad_betas(sd):
        sd["meta"]["param_groups"][0]["betas"] = [0.9]

    def amsgrad_without_its_state(sd):
        sd["meta"]["param_groups"][0]["amsgrad"] = True

    def bad_index(sd):
        sd["meta"]["state"]["9"] = sd["meta"]["state"]["0"]

    def negative_step(sd):
        sd["meta"]["state"]["0"]["step"] = -1

    def not_a_dict(sd):
        sd.pop("tensors")

    return [drop_tensor, extra_tensor, wrong_shape, wrong_dtype, wrong_count, wrong_groups, bad_hyper,
            bad_betas, amsgrad_without_its_state, bad_index, negative_step, not_a_dict]


@pytest.mark.parametrize("corrupt", _corruptions(), ids=lambda f: f.__name__)
def test_mismatched_state_dict_raises_and_leaves_state_untouched(corrupt):
    _, _, source = run_luoshu(lambda p: optim.Adam(p, lr=0.05), "eager", steps=2)
    sd = source.state_dict()
    corrupt(sd)
    _, _, target = run_luoshu(lambda p: optim.Adam(p, lr=0.01), "eager", steps=3)
    before = _snapshot(target)
    with pytest.raises(ls.CheckpointError, match="Adam.load_state_dict"):
        target.load_state_dict(sd)
    after = _snapshot(target)
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    for i in before[1]:
        for k in before[1][i]:
            torch.testing.assert_close(before[1][i][k], after[1][i][k], rtol=0, atol=0)


def test_load_state_dict_for_a_different_model_raises():
    _, _, source = run_luoshu(lambda p: optim.Adam(p, lr=0.05), "eager", steps=1)
    other = optim.Adam([ls.tensor(np.ones((4, 5)), requires_grad=True)] + _ls_params()[1:])
    with pytest.raises(ls.CheckpointError, match="shape"):
        other.load_state_dict(source.state_dict())


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_broadcast_gradients_and_non_contiguous_parameters(config):
    """Eager gradients can be stride-0 views shared by two parameters; parameters can be
    transposed views. Both must update like torch's (fused kernels assume dense layouts)."""
    _, ours, theirs = config
    c0 = np.arange(6.0).reshape(2, 3) / 6.0

    def luoshu_run():
        a, b = ls.tensor(np.ones(3) * 0.5, requires_grad=True), ls.tensor(np.ones(3), requires_grad=True)
        c = ls.tensor(torch.tensor(c0).T, requires_grad=True)  # a transposed (non-contiguous) view
        opt = ours([a, b, c])
        for _ in range(5):
            ((a + b).sum() * 2.0 + (c * c * c).sum()).backward()
            opt.step()
            opt.zero_grad()
        return [a.numpy(), b.numpy(), c.numpy()]

    def torch_run():
        a = torch.full((3,), 0.5, dtype=torch.float64, requires_grad=True)
        b = torch.ones(3, dtype=torch.float64, requires_grad=True)
        c = torch.tensor(c0).T.clone().requires_grad_()
        opt = theirs([a, b, c])
        for _ in range(5):
            opt.zero_grad()
            ((a + b).sum() * 2.0 + (c * c * c).sum()).backward()
            opt.step()
        return [t.detach().numpy() for t in (a, b, c)]

    for x, y in zip(luoshu_run(), torch_run()):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


def test_sparse_rows_out_of_range_are_refused_before_any_change():
    table = ls.tensor(np.zeros((4, 2)), requires_grad=True)
    w = ls.tensor(np.zeros(2), requires_grad=True)
    opt = optim.Adam([w, table], lr=0.1)
    w.grad = ls.tensor(np.ones(2))
    table.grad = ls.IndexedSlices(ls.tensor(np.array([1, 4])), ls.tensor(np.ones((2, 2))), (4, 2))
    with pytest.raises(ls.GradientError, match=r"rows must be in \[0, 4\)"):
        opt.step()
    assert len(opt.state) == 0
    np.testing.assert_array_equal(w.numpy(), np.zeros(2))
