"""Learning-rate schedulers against torch.optim.lr_scheduler, and their effect on compiled graphs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import luoshu as ls
import luoshu.optim as optim

N = 30
LRS = (0.1, 0.03)  # two parameter groups


def _luoshu_opt():
    a, b = ls.tensor(np.ones(2), requires_grad=True), ls.tensor(np.ones(3), requires_grad=True)
    return optim.SGD([{"params": [a], "lr": LRS[0]}, {"params": [b], "lr": LRS[1]}], lr=1.0, momentum=0.9)


def _torch_opt():
    a, b = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    return torch.optim.SGD([{"params": [a], "lr": LRS[0]}, {"params": [b], "lr": LRS[1]}], lr=1.0, momentum=0.9)


def _lrs(scheduler, opt, steps=N):
    out = [scheduler.get_last_lr()]
    for _ in range(steps):
        opt.step()
        scheduler.step()
        out.append(scheduler.get_last_lr())
        assert [g["lr"] for g in opt.param_groups] == out[-1]
    return out


SCHEDULERS = [
    ("step", lambda o: optim.StepLR(o, step_size=4, gamma=0.5),
     lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5)),
    ("multistep", lambda o: optim.MultiStepLR(o, milestones=[3, 8, 8, 20], gamma=0.3),
     lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[3, 8, 8, 20], gamma=0.3)),
    ("exponential", lambda o: optim.ExponentialLR(o, gamma=0.9),
     lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)),
    ("cosine", lambda o: optim.CosineAnnealingLR(o, T_max=10, eta_min=0.001),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=0.001)),
    ("linear_warmup", lambda o: optim.LinearWarmup(o, warmup_steps=7, start_factor=0.25),
     lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=7)),
    ("cosine_warmup", lambda o: optim.CosineWarmup(o, warmup_steps=5, total_steps=20),
     lambda o: torch.optim.lr_scheduler.LambdaLR(
         o, lambda t: t / 5 if t < 5 else 0.5 * (1 + math.cos(math.pi * min(1.0, (t - 5) / 15))))),
]


@pytest.mark.parametrize("case", SCHEDULERS, ids=[c[0] for c in SCHEDULERS])
def test_learning_rates_match_torch(case):
    _, ours, theirs = case
    lo, to = _luoshu_opt(), _torch_opt()
    ours_lrs = _lrs(ours(lo), lo)
    theirs_lrs = _lrs(theirs(to), to)
    np.testing.assert_allclose(np.array(ours_lrs), np.array(theirs_lrs), rtol=1e-10, atol=1e-15)


def test_cosine_warmup_formula_with_min_lr():
    opt = _luoshu_opt()
    sched = optim.CosineWarmup(opt, warmup_steps=4, total_steps=12, min_lr=0.01)
    lrs = _lrs(sched, opt, steps=15)
    for t, (lr0, _) in enumerate(lrs):
        if t < 4:
            expected = 0.1 * t / 4
        else:
            expected = 0.01 + (0.1 - 0.01) * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - 4) / 8)))
        assert lr0 == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert lrs[12][0] == pytest.approx(0.01) and lrs[15][0] == pytest.approx(0.01)


PLATEAU = [
    dict(mode="min", factor=0.5, patience=2),
    dict(mode="min", factor=0.5, patience=1, cooldown=2, threshold=0.05, threshold_mode="abs", min_lr=0.02),
    dict(mode="max", factor=0.3, patience=0, threshold=0.1, min_lr=[0.0, 0.01]),
]


@pytest.mark.parametrize("kwargs", PLATEAU)
def test_reduce_on_plateau_matches_torch(kwargs):
    metrics = np.abs(np.sin(np.arange(40) * 0.7)) + np.linspace(1.0, 0.5, 40)
    lo, to = _luoshu_opt(), _torch_opt()
    ours = optim.ReduceLROnPlateau(lo, **kwargs)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(to, **kwargs)
    for m in metrics:
        ours.step(m)
        theirs.step(m)
        np.testing.assert_allclose(ours.get_last_lr(), theirs.get_last_lr(), rtol=1e-12)
    assert ours.get_last_lr() != list(LRS)


@pytest.mark.parametrize("case", SCHEDULERS, ids=[c[0] for c in SCHEDULERS])
def test_state_dict_round_trip(case):
    _, ours, _ = case
    opt = _luoshu_opt()
    sched = ours(opt)
    _lrs(sched, opt, steps=6)
    sd = json.loads(json.dumps(sched.state_dict()))
    rest = _lrs(sched, opt, steps=6)

    opt2 = _luoshu_opt()
    sched2 = ours(opt2)
    sched2.load_state_dict(sd)
    for group, lr in zip(opt2.param_groups, sd["_last_lr"]):
        group["lr"] = lr
    np.testing.assert_allclose(_lrs(sched2, opt2, steps=6), rest, rtol=1e-12)
    with pytest.raises(ls.CheckpointError):
        sched2.load_state_dict({"last_epoch": 3})


def test_plateau_state_dict_round_trip():
    opt = _luoshu_opt()
    sched = optim.ReduceLROnPlateau(opt, patience=1)
    for m in (1.0, 1.0, 1.0, 0.5):
        sched.step(m)
    sd = json.loads(json.dumps(sched.state_dict()))
    other = optim.ReduceLROnPlateau(_luoshu_opt(), patience=5)
    other.load_state_dict(sd)
    assert other.state_dict() == sd
    with pytest.raises(ls.CheckpointError):
        other.load_state_dict({**sd, "mode": "sideways"})


def test_scheduler_changes_the_lr_of_a_compiled_graph():
    w = ls.tensor(np.zeros(3), requires_grad=True)
    opt = optim.SGD([w], lr=1.0)
    sched = optim.StepLR(opt, step_size=1, gamma=0.5)
    with ls.Graph() as g:
        x = ls.placeholder("x", (3,), "float64")
        train = opt.minimize((w * x).sum())  # gradient x: each step moves w by -lr * x
    xv = np.array([1.0, 2.0, 4.0])
    previous = w.numpy()
    for lr in (1.0, 0.5, 0.25, 0.125):
        g.run(train, {x: xv})
        np.testing.assert_allclose(previous - w.numpy(), lr * xv)
        previous = w.numpy()
        sched.step()
    assert len(g._plans) == 1  # one compiled plan served every learning rate


def test_bad_arguments_raise():
    opt = _luoshu_opt()
    for bad in (lambda: optim.StepLR(opt, step_size=0), lambda: optim.CosineAnnealingLR(opt, T_max=0),
                lambda: optim.CosineWarmup(opt, warmup_steps=10, total_steps=5),
                lambda: optim.LinearWarmup(opt, warmup_steps=0),
                lambda: optim.ReduceLROnPlateau(opt, factor=1.5),
                lambda: optim.ReduceLROnPlateau(opt, mode="up"),
                lambda: optim.StepLR(object(), step_size=1)):
        with pytest.raises(ls.Error):
            bad()
