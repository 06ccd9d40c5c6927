"""Activation recompute: the same gradients and updates as keeping every activation (dropout
on), and a plan that holds far fewer activation bytes (measured by the plan's own accounting,
itself checked against a brute-force replay in tests/runtime/test_memory.py)."""

from __future__ import annotations

import numpy as np
import pytest

import luoshu as ls
from luoshu.models import build

VOCAB, LENGTH, BATCH = 64, 32, 8


def _gpt2(layers: int, dropout: float, recompute):
    ls.manual_seed(0)
    return build("gpt2", vocab_size=VOCAB, n_layer=layers, n_head=4, n_embd=32, block_size=LENGTH,
                 dropout=dropout, recompute=recompute)


def _feed(ids, targets):
    rng = np.random.default_rng(0)
    return {ids: rng.integers(0, VOCAB, (BATCH, LENGTH)), targets: rng.integers(0, VOCAB, (BATCH, LENGTH))}


def _loss_and_grads(layers: int, dropout: float, recompute):
    model = _gpt2(layers, dropout, recompute)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, LENGTH), "int64")
        targets = ls.placeholder("targets", (None, LENGTH), "int64")
        loss = ls.nn.functional.cross_entropy(model(ids).reshape((-1, VOCAB)), targets.reshape((-1,)))
        grads = ls.gradients(loss, model.parameters())
    return g, [loss] + grads, _feed(ids, targets)


@pytest.mark.parametrize("scope", [True, "attention"])
def test_gradients_equal_without_recompute_with_dropout_on(scope):
    g0, fetches0, feed0 = _loss_and_grads(2, 0.1, False)
    g1, fetches1, feed1 = _loss_and_grads(2, 0.1, scope)
    ls.manual_seed(1)
    plain = g0.run(fetches0, feed0)
    ls.manual_seed(1)
    recomputed = g1.run(fetches1, feed1)
    assert g1.recompute_regions and all(r.copies for r in g1.recompute_regions)
    for a, b in zip(plain, recomputed):
        np.testing.assert_array_equal(a, b)  # the same kernels on the same values, the same masks


def test_training_steps_equal_without_recompute():
    params = []
    for recompute in (False, True):
        model = _gpt2(2, 0.1, recompute)
        opt = ls.optim.AdamW(model.parameters(), lr=1e-2)
        with ls.Graph() as g:
            ids = ls.placeholder("ids", (None, LENGTH), "int64")
            targets = ls.placeholder("targets", (None, LENGTH), "int64")
            loss = ls.nn.functional.cross_entropy(model(ids).reshape((-1, VOCAB)), targets.reshape((-1,)))
            train = opt.minimize(loss)
        feed = _feed(ids, targets)
        ls.manual_seed(3)
        losses = [g.run([loss, train], feed)[0] for _ in range(3)]
        params.append((losses, [p.numpy().copy() for p in model.parameters()]))
    np.testing.assert_array_equal(params[0][0], params[1][0])
    for a, b in zip(params[0][1], params[1][1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layers, factor", [(4, 2.5), (8, 4.0)])
def test_peak_activations_fall_with_the_block_count(layers, factor):
    """Measured (2 cores, batch 8, length 32, width 32): 2.86x with 4 blocks, 4.43x with 8.
    Without recompute every block's activations are alive at the top of the backward; with
    it, every block's input and one block's recomputed activations are."""
    peaks = []
    for recompute in (False, True):
        g, fetches, feed = _loss_and_grads(layers, 0.0, recompute)
        peaks.append(g.memory(fetches, feed).peak_activations)
    assert peaks[0] / peaks[1] >= factor, peaks


def test_eager_mode_is_unaffected():
    model = _gpt2(1, 0.0, True)
    ids = ls.tensor(np.random.default_rng(0).integers(0, VOCAB, (2, LENGTH)))
    loss = model(ids).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_random_op_without_replay_keeps_its_draw():
    class Noisy(ls.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = ls.nn.Linear(4, 4)

        def forward(self, x):
            h = self.linear(x).tanh()
            return (h * ls.ops.normal_like(h)).tanh()

    results = []
    for recompute in (False, True):
        ls.manual_seed(0)
        model = Noisy()
        if recompute:
            ls.nn.recompute(model)
        with ls.Graph() as g:
            x = ls.placeholder("x", (None, 4))
            loss = model(x).sum()
            grads = ls.gradients(loss, model.parameters())
        ls.manual_seed(5)
        results.append(g.run([loss] + grads, {x: np.ones((3, 4), np.float32)}))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments():
    with pytest.raises(ls.Error, match="takes a luoshu.nn.Module"):
        ls.nn.recompute(object())
    with pytest.raises(ls.Error, match="scope must be one of"):
        ls.nn.recompute(ls.nn.Linear(2, 2), scope="mlp")
    with pytest.raises(ls.Error, match="no attention module"):
        ls.nn.recompute(ls.nn.Linear(2, 2), scope="attention")
    with pytest.raises(ls.Error, match="recompute must be"):
        build("gpt2", n_layer=1, n_head=1, n_embd=8, vocab_size=8, block_size=8, recompute="mlp")
