"""The parameter-server embedding: eager and graph training match torch autograd + torch.optim
on a local table; prefetching changes nothing but the traffic."""

import numpy as np
import pytest
import torch

import luoshu as ls
from luoshu import models, ps
from luoshu.ps.embedding import PSEmbedding as Embedding
from luoshu.ps.embedding import PSSlotEmbedding as SlotEmbedding
from luoshu.ps.embedding import ps_embeddings, replace_embeddings
from tests.ps.fake_client import FakeClient, initial_rows

DIM, LR, STEPS = 4, 0.5, 6


def _batches(steps=STEPS, batch=5, width=3, num_ids=30, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, num_ids, (batch, width)).astype(np.int64),
             rng.standard_normal((batch, width, DIM)).astype(np.float32)) for _ in range(steps)]


def _torch_reference(batches, rows, optimizer="sgd"):
    """The same steps on a local torch table: loss = sum(emb(ids) * target) ** 2 / batch."""
    table = torch.nn.Embedding.from_pretrained(torch.from_numpy(rows.copy()), freeze=False, sparse=True)
    opt = torch.optim.SGD(table.parameters(), lr=LR) if optimizer == "sgd" else \
        torch.optim.SparseAdam(table.parameters(), lr=0.05, eps=1e-12)
    for ids, target in batches:
        opt.zero_grad()
        out = table(torch.from_numpy(ids))
        ((out * torch.from_numpy(target)).sum(dim=(1, 2)) ** 2).mean().backward()
        opt.step()
    return table.weight.detach().numpy()


def _loss(out, target):
    return ((out * target).sum(axis=(1, 2)) ** 2).mean()


@pytest.mark.parametrize("capacity,staleness", [(0, 0), (8, 0), (100, 0)])
def test_eager_training_matches_torch(capacity, staleness):
    client = FakeClient(DIM)
    emb = Embedding(client, "t", DIM, 30, optimizer=("sgd", {"lr": LR}), cache_capacity=capacity,
                    staleness=staleness)
    batches = _batches()
    for step, (ids, target) in enumerate(batches):
        if step + 1 < len(batches):
            emb.prefetch(batches[step + 1][0])
        loss = _loss(emb(ls.tensor(ids)), ls.tensor(target))
        loss.backward()
        assert isinstance(emb.weight.grad, ls.IndexedSlices)
        emb.push_gradients()
        assert emb.weight.grad is None
    emb.flush()
    ids = np.arange(30)
    expected = _torch_reference(batches, initial_rows(ids, DIM))
    np.testing.assert_allclose(client.pull("t", ids)[0], expected, rtol=1e-5, atol=1e-6)
    assert emb.stats()["steps"] == STEPS


def test_graph_training_matches_eager_and_torch():
    client = FakeClient(DIM)
    emb = Embedding(client, "t", DIM, 30, optimizer=("sgd", {"lr": LR}), cache_capacity=10)
    with ls.Graph() as g:
        ids_ph = ls.placeholder("ids", (None, 3), "int64")
        target_ph = ls.placeholder("target", (None, 3, DIM))
        loss = _loss(emb(ids_ph), target_ph)
        (grad,) = ls.gradients(loss, [emb.weight])
        train = emb.push_op(grad)
    batches = _batches(seed=1)
    for step, (ids, target) in enumerate(batches):
        if step + 1 < len(batches):
            emb.prefetch(batches[step + 1][0])
        g.run([loss, train], {ids_ph: ids, target_ph: target})
    emb.flush()
    ids = np.arange(30)
    expected = _torch_reference(batches, initial_rows(ids, DIM))
    np.testing.assert_allclose(client.pull("t", ids)[0], expected, rtol=1e-5, atol=1e-6)
    assert emb.stats()["prefetched"] > 0


def test_slot_embedding_and_replacing_a_models_tables():
    cfg = models.CTRConfig(dense_dim=2, slot_sizes=[3, 4], embedding_dim=DIM, mlp_dims=(8,))
    model = models.WideAndDeep(cfg)
    created = replace_embeddings(model, _MultiDimClient(), prefix="wdl/", optimizer=("sgd", {"lr": LR}))
    assert [e.table for e in created] == ["wdl/embedding", "wdl/wide_embedding"]
    assert ps_embeddings(model) == created
    assert all(isinstance(e, SlotEmbedding) for e in created)
    assert not any(p is e.weight for p in model.parameters() for e in created)
    sparse = np.array([[0, 3], [2, 1]], np.int64)
    out = model(ls.tensor(np.ones((2, 2), np.float32)), ls.tensor(sparse))
    assert out.shape == (2,)
    with pytest.raises(ls.Error, match=r"\(batch, 2\)"):
        created[0].prefetch(np.zeros((2, 3), np.int64))


class _MultiDimClient:
    """A FakeClient per table (tables of different widths)."""

    def __init__(self):
        self.tables = {}

    def create_table(self, name, dim, **kwargs):
        self.tables[name] = FakeClient(dim)
        return self.tables[name].create_table(name, dim, **kwargs)

    def pull(self, name, ids):
        return self.tables[name].pull(name, ids)

    def pull_async(self, name, ids):
        return self.tables[name].pull_async(name, ids)

    def push(self, name, ids, grads, scale=1.0):
        return self.tables[name].push(name, ids, grads, scale)


def test_bad_arguments_are_refused():
    client = FakeClient(DIM)
    with pytest.raises(ls.Error, match="embedding_dim"):
        Embedding(client, "t", 0)
    with pytest.raises(ls.Error, match="cache_policy"):
        Embedding(client, "t", DIM, cache_policy="fifo")
    emb = Embedding(client, "t", DIM, 30, optimizer=("sgd", {"lr": LR}))
    with pytest.raises(ls.DTypeError, match="integers"):
        emb(ls.tensor(np.array([0.5], np.float32)))
    with pytest.raises(ls.Error, match="IndexedSlices"):
        emb.push_op(ls.tensor(np.zeros((2, DIM), np.float32)))


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_real_servers_adam_with_cache_matches_torch_sparse_adam():
    """Two server processes, a server-side Adam, a cache smaller than the id space: the final
    table equals torch.optim.SparseAdam on a local table (same seeded initial rows). A tiny eps:
    SparseAdam adds eps before the bias correction, torch.optim.Adam (the server's rule) after."""
    with ps.start_local_servers(2) as servers:
        client = ps.connect(addresses=servers)
        try:
            emb = Embedding(client, "adam_t", DIM, 30, init=("normal", 0.0, 0.1),
                            optimizer=("adam", {"lr": 0.05, "eps": 1e-12}), cache_capacity=12)
            batches = _batches(seed=2)
            for step, (ids, target) in enumerate(batches):
                if step + 1 < len(batches):
                    emb.prefetch(batches[step + 1][0])
                _loss(emb(ls.tensor(ids)), ls.tensor(target)).backward()
                emb.push_gradients()
            emb.flush()
            ids = np.arange(30)
            rows0 = ps.initial_rows("adam_t", ids, DIM, ("normal", 0.0, 0.1))
            expected = _torch_reference(batches, rows0, optimizer="adam")
            np.testing.assert_allclose(client.pull("adam_t", ids)[0], expected, rtol=1e-5, atol=1e-6)
        finally:
            client.close()
