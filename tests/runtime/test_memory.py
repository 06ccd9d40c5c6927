"""Plan memory accounting against an independent replay of every allocation and free, and
against sizes worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import luoshu as ls


def _replay_peak(plan, feeds) -> tuple[int, int]:
    """Brute force: run every op keeping every value, then, step by step, sum the distinct
    non-parameter storages of the tensors produced so far whose last reader has not yet run
    (readers and fetches found from the ops themselves, not from the plan's free lists)."""
    ops = [step.op for step in plan.steps]
    values: dict[int, torch.Tensor] = {}
    for t, v in zip(plan.feed_tensors, feeds):
        values[id(t)] = v
    params = {t._value.untyped_storage().data_ptr() for t in plan.leaf_tensors
              if t.kind == "variable" or t.requires_grad}
    for t in plan.leaf_tensors:
        values[id(t)] = t._value
    born = {id(t): -1 for t in list(plan.feed_tensors) + list(plan.leaf_tensors)}
    last = dict(born)
    fetched = {id(t) for op in ops for t in op.outputs if plan.slot_of.get(id(t)) in plan.fetch_slots}
    with torch.no_grad():
        for i, op in enumerate(ops):
            out = op.opdef.compute(*[values[id(t)] for t in op.inputs], **op.attrs)
            outs = (out,) if len(op.outputs) == 1 else tuple(out)
            for t, v in zip(op.outputs, outs):
                values[id(t)] = v
                born[id(t)] = last[id(t)] = i
            for t in op.inputs:
                last[id(t)] = i
    peak = (0, -2)
    for i in range(-1, len(ops)):
        live = {}
        for key, v in values.items():
            if not isinstance(v, torch.Tensor) or born[key] > i:
                continue
            if last[key] < i and key not in fetched:
                continue
            storage = v.untyped_storage()
            if storage.data_ptr() not in params:
                live[storage.data_ptr()] = storage.nbytes()
        total = sum(live.values())
        if total > peak[0]:
            peak = (total, i)
    return peak


def _mlp_step(optimizer=ls.optim.Adam):
    ls.manual_seed(0)
    with ls.Graph() as g:
        x = ls.placeholder("x", shape=(None, 20), dtype="float32")
        y = ls.placeholder("y", shape=(None,), dtype="int64")
        model = ls.nn.Sequential(ls.nn.Linear(20, 16), ls.nn.Tanh(), ls.nn.Linear(16, 5))
        loss = ls.nn.functional.cross_entropy(model(x), y)
        train = optimizer(model.parameters(), lr=0.01).minimize(loss)
    rng = np.random.default_rng(0)
    feed = {x: rng.standard_normal((12, 20)).astype(np.float32), y: rng.integers(0, 5, 12)}
    return g, [loss, train], feed, model


@pytest.mark.parametrize("optimizer", [ls.optim.SGD, ls.optim.Adam])
def test_peak_equals_a_brute_force_replay(optimizer):
    g, fetches, feed, _ = _mlp_step(optimizer)
    plan = g.plan(fetches, feed)
    feeds = [torch.from_numpy(np.ascontiguousarray(feed[t])) for t in plan.feed_tensors]
    expected, step = _replay_peak(plan, feeds)
    report = g.memory(fetches, feed)
    assert report.gradients + report.activations == expected
    assert report.peak_step == step
    assert max(report.timeline) == expected


def test_parameters_and_optimizer_state_by_hand():
    g, fetches, feed, model = _mlp_step(ls.optim.Adam)
    report = g.memory(fetches, feed)
    n_params = 20 * 16 + 16 + 16 * 5 + 5
    assert report.parameters == n_params * 4  # float32
    # Adam: exp_avg and exp_avg_sq per parameter, plus one float32 step counter per parameter
    assert report.optimizer_state == 2 * n_params * 4 + len(model.parameters()) * 4
    assert report.peak_bytes == report.parameters + report.optimizer_state + report.gradients + report.activations
    assert report.peak_gradients == n_params * 4  # every gradient is alive when the update reads them
    assert "peak" in str(report) and report.peak_op


def test_forward_only_by_hand():
    """x (4, 3) @ w (3, 2) -> relu -> sum over float32: the peak is x + the matmul result + relu."""
    w = ls.tensor(np.ones((3, 2), np.float32), requires_grad=True)
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 3))
        y = (x @ w).relu().sum()
    report = g.memory(y, {x: np.ones((4, 3), np.float32)})
    assert report.optimizer_state == 0 and report.gradients == 0
    # after matmul: x (48 B) + matmul (32 B) live; after relu: matmul freed? relu reads it, so
    # x is freed after matmul, matmul after relu: the peak is 48 + 32 after the matmul.
    assert report.activations == 48 + 32 and report.peak_op == "matmul"


def test_memory_runs_the_step():
    g, fetches, feed, model = _mlp_step(ls.optim.SGD)
    before = model.parameters()[0].numpy().copy()
    g.memory(fetches, feed)
    assert not np.array_equal(before, model.parameters()[0].numpy())


def test_an_activation_read_only_for_its_shape_dies_at_its_last_real_reader():
    """h = x @ w feeds only `h + b` in the forward; the backward reads h only for its run-time
    shape (sum_to's `like`, the batch is fed). The plan hands sum_to a one-element stand-in, so
    h is freed right after the add instead of living until the add's backward; the gradients
    still equal torch.autograd's."""
    rng = np.random.default_rng(0)
    w0, b0 = rng.standard_normal((64, 256)).astype(np.float32), rng.standard_normal(256).astype(np.float32)
    x0 = rng.standard_normal((32, 64)).astype(np.float32)
    w, b = ls.tensor(w0, requires_grad=True), ls.tensor(b0, requires_grad=True)
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 64))
        h = x @ w
        loss = (h + b).tanh().sum()
        grads = ls.gradients(loss, [w, b])
    plan = g.plan(grads, {x: x0})
    h_slot = plan.slot_of[id(h)]
    freed_at = next(step for step in plan.steps if h_slot in step.frees)
    assert freed_at.op.opdef.name == "add"  # its last real reader, in the forward
    sum_to = [step for step in plan.steps if step.op.opdef.name == "sum_to" and step.op.inputs[1] is h]
    assert sum_to and all(h_slot not in step.inputs for step in sum_to)
    report = g.memory(grads, {x: x0})
    feeds = [torch.from_numpy(x0)]
    assert report.gradients + report.activations == _replay_peak(plan, feeds)[0]

    tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    (torch.from_numpy(x0) @ tw + tb).tanh().sum().backward()
    for got, want in zip(report.outputs, (tw.grad, tb.grad)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
