"""End-to-end training: eager == define-and-run, mixed precision (the `luoshu train` command: test_cli.py)."""

import numpy as np

import luoshu as ls
from luoshu import nn
from luoshu.data import load_digits


def _digits(seed):
    x, y = load_digits()
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:int(0.8 * len(x))], order[int(0.8 * len(x)):]
    return x[train], y[train], x[test], y[test]


def _mlp(seed):
    ls.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))


def _batches(steps, batch=16):
    xtr, ytr, _, _ = _digits(0)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, len(xtr), batch)
        yield xtr[idx], ytr[idx]


def test_eager_and_define_and_run_give_identical_losses():
    model = _mlp(1)
    opt = ls.optim.Adam(model.parameters(), lr=0.01)
    eager = []
    for xb, yb in _batches(20):
        loss = nn.functional.cross_entropy(model(ls.tensor(xb)), ls.tensor(yb))
        opt.zero_grad()
        loss.backward()
        opt.step()
        eager.append(loss.item())

    model = _mlp(1)
    opt = ls.optim.Adam(model.parameters(), lr=0.01)
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 64))
        y = ls.placeholder("y", (None,), "int64")
        loss = nn.functional.cross_entropy(model(x), y)
        train = opt.minimize(loss)
    graph = [float(g.run([loss, train], {x: xb, y: yb})[0]) for xb, yb in _batches(20)]
    assert eager == graph
    assert graph[-1] < graph[0]


def _accuracy(autocast: bool):
    xtr, ytr, xte, yte = _digits(0)
    model = _mlp(2)
    opt = ls.optim.Adam(model.parameters(), lr=0.01)
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 64))
        y = ls.placeholder("y", (None,), "int64")
        if autocast:
            with ls.autocast("bfloat16"):
                logits = model(x)
                loss = nn.functional.cross_entropy(logits, y)
        else:
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
        train = opt.minimize(loss)
    rng = np.random.default_rng(0)
    for _ in range(6):
        order = rng.permutation(len(xtr))
        for b in range(0, len(order) - 31, 32):
            g.run([loss, train], {x: xtr[order[b:b + 32]], y: ytr[order[b:b + 32]]})
    assert all(p.dtype == "float32" for p in model.parameters())  # master weights stay fp32
    return float((g.run(logits, {x: xte}).argmax(1) == yte).mean()), logits, loss


def test_mixed_precision_matches_fp32_accuracy():
    fp32, _, _ = _accuracy(False)
    bf16, logits, loss = _accuracy(True)
    assert logits.dtype == "bfloat16" and loss.dtype == "float32"
    assert fp32 > 0.93 and bf16 > fp32 - 0.03, (fp32, bf16)

