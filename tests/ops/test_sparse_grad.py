"""The embedding gradients are IndexedSlices (eager and define-and-run), never dense tables."""

from __future__ import annotations

import numpy as np
import torch

import luoshu as ls
import luoshu.nn.functional as F

ROWS, DIM = 1000, 4
IDS = np.array([[3, 7, 3], [999, 0, 7]])  # repeated ids, first and last row


def _table(seed=0):
    return np.random.default_rng(seed).standard_normal((ROWS, DIM))


def _cotangent(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


def _torch_grad(table, forward, cot):
    w = torch.tensor(table, requires_grad=True)
    (forward(w) * torch.tensor(cot)).sum().backward()
    return w.grad.numpy()


def _check_slices(indices, values, dense_shape, expected, ids):
    indices, values = np.asarray(indices), np.asarray(values)
    np.testing.assert_array_equal(indices, ids.reshape(-1))
    assert values.shape == (ids.size, DIM)  # one row per looked-up id, not a table
    assert tuple(dense_shape) == (ROWS, DIM)
    dense = np.zeros((ROWS, DIM))
    np.add.at(dense, indices, values)
    np.testing.assert_allclose(dense, expected, rtol=1e-12, atol=1e-12)
    touched = np.unique(ids)
    np.testing.assert_allclose(dense[touched], expected[touched], rtol=1e-12, atol=1e-12)


def test_embedding_eager_grad_is_indexed_slices():
    table, cot = _table(), _cotangent(IDS.shape + (DIM,))
    w = ls.tensor(table, requires_grad=True)
    y = F.embedding(ls.tensor(IDS), w)
    (y * ls.tensor(cot)).sum().backward()
    assert isinstance(w.grad, ls.IndexedSlices)
    expected = _torch_grad(table, lambda t: torch.nn.functional.embedding(torch.tensor(IDS), t), cot)
    _check_slices(w.grad.indices.numpy(), w.grad.values.numpy(), w.grad.dense_shape, expected, IDS)


def test_embedding_padding_idx_rows_get_zero_gradient():
    table, cot = _table(), _cotangent(IDS.shape + (DIM,))
    w = ls.tensor(table, requires_grad=True)
    (F.embedding(ls.tensor(IDS), w, padding_idx=7) * ls.tensor(cot)).sum().backward()
    assert isinstance(w.grad, ls.IndexedSlices)
    values = w.grad.values.numpy()
    np.testing.assert_array_equal(values[IDS.reshape(-1) == 7], 0.0)
    expected = _torch_grad(table, lambda t: torch.nn.functional.embedding(torch.tensor(IDS), t, padding_idx=7), cot)
    _check_slices(w.grad.indices.numpy(), values, w.grad.dense_shape, expected, IDS)


def test_embedding_two_lookups_accumulate_sparse():
    table = _table()
    other = np.array([5, 3])
    cot1, cot2 = _cotangent(IDS.shape + (DIM,)), _cotangent((2, DIM), seed=2)
    w = ls.tensor(table, requires_grad=True)
    loss = (F.embedding(ls.tensor(IDS), w) * ls.tensor(cot1)).sum() + \
        (F.embedding(ls.tensor(other), w) * ls.tensor(cot2)).sum()
    loss.backward()
    assert isinstance(w.grad, ls.IndexedSlices)
    assert w.grad.values.shape == (IDS.size + other.size, DIM)
    t = torch.tensor(table, requires_grad=True)
    emb = torch.nn.functional.embedding
    ((emb(torch.tensor(IDS), t) * torch.tensor(cot1)).sum() + (emb(torch.tensor(other), t) * torch.tensor(cot2)).sum()
     ).backward()
    np.testing.assert_allclose(w.grad.to_dense().numpy(), t.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_embedding_graph_grad_is_indexed_slices():
    table, cot = _table(), _cotangent(IDS.shape + (DIM,))
    w = ls.tensor(table, requires_grad=True)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", IDS.shape, "int64")
        c = ls.placeholder("cot", cot.shape, "float64")
        loss = (F.embedding(ids, w) * c).sum()
        grad, = ls.gradients(loss, [w])
    assert isinstance(grad, ls.IndexedSlices)
    # No op of the graph makes a table-sized tensor: the gradient stays sparse end to end.
    assert all(t.shape != (ROWS, DIM) for op in g.ops for t in op.outputs)
    value = g.run(grad, {ids: IDS, c: cot})
    assert isinstance(value, ls.IndexedSlicesValue)
    expected = _torch_grad(table, lambda t: torch.nn.functional.embedding(torch.tensor(IDS), t), cot)
    _check_slices(value.indices, value.values, value.dense_shape, expected, IDS)


def test_embedding_bag_grad_is_indexed_slices():
    table = _table()
    ids, offsets = np.array([3, 7, 3, 999, 0]), np.array([0, 2, 2])  # an empty bag in the middle
    cot = _cotangent((3, DIM))
    for mode in ("sum", "mean"):
        w = ls.tensor(table, requires_grad=True)
        (F.embedding_bag(ls.tensor(ids), w, ls.tensor(offsets), mode=mode) * ls.tensor(cot)).sum().backward()
        assert isinstance(w.grad, ls.IndexedSlices), mode
        expected = _torch_grad(table, lambda t, m=mode: torch.nn.functional.embedding_bag(
            torch.tensor(ids), t, torch.tensor(offsets), mode=m), cot)
        _check_slices(w.grad.indices.numpy(), w.grad.values.numpy(), w.grad.dense_shape, expected, ids)
