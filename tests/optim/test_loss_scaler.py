"""Dynamic loss scaling against torch.amp.GradScaler, in eager and define-and-run modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import luoshu as ls
import luoshu.optim as optim

INF, NAN = float("inf"), float("nan")
# Coefficients of a linear loss sum(p * c): the gradient is c; inf/nan ones overflow.
COEFFS = [np.array([1.0, -2.0, 0.5]), np.array([INF, 1.0, 1.0]), np.array([0.3, 0.3, -0.1]),
          np.array([0.2, 0.1, 0.4]), np.array([1.0, NAN, 1.0]), np.array([0.5, -0.5, 0.5]),
          np.array([-1.0, 1.0, 2.0]), np.array([0.1, 0.2, 0.3]), np.array([1.0, 1.0, 1.0])]
KW = dict(init_scale=8.0, growth_factor=2.0, backoff_factor=0.25, growth_interval=2)


def _torch_reference():
    p = torch.tensor([0.5, -0.5, 1.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", **KW)
    scales, values = [], []
    for c in COEFFS:
        opt.zero_grad()
        scaler.scale((p * torch.tensor(c)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        values.append(p.detach().numpy().copy())
    return scales, values


def _check(scales, values):
    ref_scales, ref_values = _torch_reference()
    assert scales == ref_scales
    for step, (a, b) in enumerate(zip(values, ref_values)):
        np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=f"step {step}")


def test_eager_scaler_matches_torch_grad_scaler():
    p = ls.tensor(np.array([0.5, -0.5, 1.0]), requires_grad=True)
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    scaler = optim.LossScaler(**KW)
    scales, values = [], []
    for c in COEFFS:
        opt.zero_grad()
        scaler.scale((p * ls.tensor(c)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        values.append(p.numpy())
    _check(scales, values)


@pytest.mark.parametrize("mode", ["graph", "minimize"])
def test_scaler_inside_the_update_matches_torch_grad_scaler(mode):
    p = ls.tensor(np.array([0.5, -0.5, 1.0]), requires_grad=True)
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    scaler = optim.LossScaler(**KW)
    scales, values = [], []
    if mode == "graph":
        with ls.Graph() as g:
            c = ls.placeholder("c", (3,), "float64")
            loss = (p * c).sum()
            train = opt.minimize(loss, loss_scaler=scaler)
        for cv in COEFFS:
            loss_value, fetched = g.run([loss, train], {c: cv})
            assert fetched is None
            scales.append(scaler.get_scale())
            values.append(p.numpy())
    else:
        for cv in COEFFS:
            opt.minimize((p * ls.tensor(cv)).sum(), loss_scaler=scaler)
            scales.append(scaler.get_scale())
            values.append(p.numpy())
    _check(scales, values)


def test_scale_multiplies_the_loss_and_disabled_is_a_pass_through():
    x = ls.tensor(np.array(3.0))
    assert float(optim.LossScaler(init_scale=4.0).scale(x)) == 12.0
    off = optim.LossScaler(enabled=False)
    assert off.scale(x) is x and off.get_scale() == 1.0
    p = ls.tensor(np.ones(2), requires_grad=True)
    opt = optim.SGD([p], lr=0.5)
    p.grad = ls.tensor(np.ones(2))
    off.step(opt)
    off.update()
    np.testing.assert_allclose(p.numpy(), [0.5, 0.5])


def test_skipped_step_leaves_parameters_and_state_untouched():
    p = ls.tensor(np.ones(3), requires_grad=True)
    opt = optim.Adam([p], lr=0.1)
    scaler = optim.LossScaler(init_scale=16.0)
    scaler.scale((p * ls.tensor(np.array([1.0, 2.0, 3.0]))).sum()).backward()
    scaler.step(opt)
    scaler.update()
    before = p.numpy()
    state = {k: v.clone() for k, v in opt.state[p].items()}
    opt.zero_grad()
    scaler.scale((p * ls.tensor(np.array([1.0, INF, 3.0]))).sum()).backward()
    scaler.step(opt)
    scaler.update()
    np.testing.assert_array_equal(p.numpy(), before)
    for k, v in opt.state[p].items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert scaler.get_scale() == 8.0


def test_unscale_then_clip_then_step():
    p = ls.tensor(np.zeros(2), requires_grad=True)
    opt = optim.SGD([p], lr=1.0)
    scaler = optim.LossScaler(init_scale=1024.0)
    scaler.scale((p * ls.tensor(np.array([3.0, 4.0]))).sum()).backward()
    scaler.unscale_(opt)
    np.testing.assert_allclose(p.grad.numpy(), [3.0, 4.0])
    assert float(optim.clip_grad_norm_([p], 1.0)) == pytest.approx(5.0)
    scaler.step(opt)
    scaler.update()
    np.testing.assert_allclose(p.numpy(), [-0.6, -0.8], rtol=1e-6)


def test_sparse_gradients_are_unscaled_too():
    table = ls.tensor(np.zeros((4, 2)), requires_grad=True)
    opt = optim.SGD([table], lr=1.0)
    scaler = optim.LossScaler(init_scale=64.0)
    table.grad = ls.IndexedSlices(ls.tensor(np.array([1, 1, 3])), ls.tensor(np.full((3, 2), 64.0)), (4, 2))
    scaler.step(opt)
    scaler.update()
    np.testing.assert_allclose(table.numpy(), [[0, 0], [-2, -2], [0, 0], [-1, -1]])


def test_misuse_raises():
    p = ls.tensor(np.ones(2), requires_grad=True)
    opt = optim.SGD([p], lr=0.1)
    scaler = optim.LossScaler()
    with pytest.raises(ls.Error, match="no inf checks"):
        scaler.update()
    scaler.scale(p.sum()).backward()
    scaler.unscale_(opt)
    with pytest.raises(ls.Error, match="already"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(ls.Error, match="already"):
        scaler.step(opt)
    for bad in (dict(init_scale=0.0), dict(growth_factor=1.0), dict(backoff_factor=1.5), dict(growth_interval=0)):
        with pytest.raises(ls.Error):
            optim.LossScaler(**bad)


def test_state_dict_round_trip_and_torch_keys():
    scaler = optim.LossScaler(**KW)
    p = ls.tensor(np.ones(2), requires_grad=True)
    opt = optim.SGD([p], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(p.sum()).backward()
        scaler.step(opt)
        scaler.update()
    sd = json.loads(json.dumps(scaler.state_dict()))
    ref = torch.amp.GradScaler("cpu", **KW)
    assert set(sd) == set(ref.state_dict())
    restored = optim.LossScaler()
    restored.load_state_dict(sd)
    assert restored.get_scale() == scaler.get_scale() == 16.0
    assert restored.state_dict() == sd
    with pytest.raises(ls.CheckpointError):
        restored.load_state_dict({"scale": 2.0})
    with pytest.raises(ls.CheckpointError):
        restored.load_state_dict({**sd, "scale": -1.0})
    assert restored.state_dict() == sd
