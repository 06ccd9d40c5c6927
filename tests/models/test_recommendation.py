"""Recommendation models: forward parity with PyTorch, graph == eager, and they learn."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score as auc

import luoshu as ls
from luoshu import models

CFG = models.CTRConfig(dense_dim=4, slot_sizes=[11, 7, 5], embedding_dim=4, mlp_dims=(16, 8), num_cross_layers=3)


def _inputs(n=6, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((n, CFG.dense_dim)).astype(np.float32)
    sparse = np.stack([rng.integers(0, s, n) for s in CFG.slot_sizes], axis=1)
    return dense, sparse


class TorchDCN(torch.nn.Module):
    """The same DCN in PyTorch, written from the paper (Wang et al. 2017 / 2020)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embedding = torch.nn.Embedding(sum(cfg.slot_sizes), cfg.embedding_dim)
        self.offsets = torch.tensor(np.concatenate([[0], np.cumsum(cfg.slot_sizes)[:-1]]))
        dim = cfg.dense_dim + len(cfg.slot_sizes) * cfg.embedding_dim
        if cfg.cross_type == "v1":
            self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(dim)) for _ in range(cfg.num_cross_layers)])
            self.b = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(dim)) for _ in range(cfg.num_cross_layers)])
        else:
            self.cross = torch.nn.ModuleList([torch.nn.Linear(dim, dim) for _ in range(cfg.num_cross_layers)])
        dims = (dim, *cfg.mlp_dims)
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        self.deep = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(dim + cfg.mlp_dims[-1], 1)

    def forward(self, dense, sparse):
        emb = self.embedding(sparse + self.offsets).flatten(1)
        x0 = x = torch.cat([dense, emb], 1)
        for i in range(self.cfg.num_cross_layers):
            if self.cfg.cross_type == "v1":
                x = x0 * (x @ self.w[i]).unsqueeze(1) + self.b[i] + x
            else:
                x = x0 * self.cross[i](x) + x
        return self.head(torch.cat([x, self.deep(x0)], 1)).squeeze(1)


def _torch_state(model, kind):
    """luoshu's parameter names mapped onto the torch model's."""
    state = {"embedding.weight": model.embedding.weight.numpy(), "head.weight": model.head.weight.numpy(),
             "head.bias": model.head.bias.numpy()}
    for i in range(CFG.num_cross_layers):
        if kind == "v1":
            state[f"w.{i}"] = getattr(model.cross, f"weight{i}").numpy()
            state[f"b.{i}"] = getattr(model.cross, f"bias{i}").numpy()
        else:
            state[f"cross.{i}.weight"] = getattr(model.cross, f"layer{i}").weight.numpy()
            state[f"cross.{i}.bias"] = getattr(model.cross, f"layer{i}").bias.numpy()
    for name, p in model.deep.named_parameters():
        state[f"deep.{name}"] = p.numpy()
    return {k: torch.from_numpy(v) for k, v in state.items()}


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_dcn_matches_pytorch_forward_and_gradients(kind):
    cfg = models.CTRConfig(**{**CFG.__dict__, "cross_type": kind})
    ls.manual_seed(0)
    model = models.DCN(cfg)
    if kind == "v1":  # non-zero cross biases, so the factored cross network's shared-vector terms count
        rng = np.random.default_rng(3)
        for i in range(cfg.num_cross_layers):
            bias = getattr(model.cross, f"bias{i}")
            bias.value.copy_(torch.from_numpy(rng.standard_normal(bias.shape).astype(np.float32) * 0.3))
    ref = TorchDCN(cfg)
    ref.load_state_dict(_torch_state(model, kind))
    dense, sparse = _inputs()
    out = model(ls.tensor(dense), ls.tensor(sparse))
    tout = ref(torch.from_numpy(dense), torch.from_numpy(sparse))
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    tout.sum().backward()
    grad = model.embedding.weight.grad
    assert isinstance(grad, ls.IndexedSlices)
    np.testing.assert_allclose(grad.to_dense().numpy(), ref.embedding.weight.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.head.weight.grad.numpy(), ref.head.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
    for i in range(cfg.num_cross_layers):
        if kind == "v1":
            pairs = [(getattr(model.cross, f"weight{i}"), ref.w[i]), (getattr(model.cross, f"bias{i}"), ref.b[i])]
        else:
            layer = getattr(model.cross, f"layer{i}")
            pairs = [(layer.weight, ref.cross[i].weight), (layer.bias, ref.cross[i].bias)]
        for mine, theirs in pairs:
            np.testing.assert_allclose(mine.grad.numpy(), theirs.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["DCN", "WideAndDeep", "DeepFM", "DLRM", "LogisticRegression"])
def test_graph_and_eager_agree(name):
    ls.manual_seed(1)
    model = getattr(models, name)(CFG)
    dense, sparse = _inputs()
    eager = model(ls.tensor(dense), ls.tensor(sparse)).numpy()
    with ls.Graph() as g:
        d = ls.placeholder("dense", (None, CFG.dense_dim))
        s = ls.placeholder("sparse", (None, CFG.num_slots), "int64")
        out = model(d, s)
    np.testing.assert_allclose(g.run(out, {d: dense, s: sparse}), eager, rtol=1e-6)


def _learnable_ctr(n, seed):
    """Labels from a hidden model: per-id effects, a dense linear part and one pairwise interaction."""
    rng = np.random.default_rng(seed)
    dense, sparse = (lambda r: (r.standard_normal((n, CFG.dense_dim)).astype(np.float32),
                                np.stack([r.integers(0, s, n) for s in CFG.slot_sizes], 1)))(rng)
    truth = np.random.default_rng(99)
    effects = [truth.standard_normal(s) for s in CFG.slot_sizes]
    logit = dense @ truth.standard_normal(CFG.dense_dim) + sum(e[sparse[:, i]] for i, e in enumerate(effects))
    logit += 1.5 * effects[0][sparse[:, 0]] * effects[1][sparse[:, 1]]
    labels = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return dense, sparse, labels


@pytest.mark.parametrize("name", ["DCN", "WideAndDeep", "DeepFM", "DLRM"])
def test_models_learn_synthetic_ctr(name):
    ls.manual_seed(2)
    model = getattr(models, name)(CFG)
    opt = ls.optim.Adam(model.parameters(), lr=0.01)
    with ls.Graph() as g:
        d = ls.placeholder("dense", (None, CFG.dense_dim))
        s = ls.placeholder("sparse", (None, CFG.num_slots), "int64")
        y = ls.placeholder("label", (None,))
        logits = model(d, s)
        loss = ls.nn.functional.binary_cross_entropy_with_logits(logits, y)
        train = opt.minimize(loss)
    dense, sparse, labels = _learnable_ctr(4096, 0)
    for _ in range(4):
        for b in range(0, 4096, 128):
            g.run([loss, train], {d: dense[b:b + 128], s: sparse[b:b + 128], y: labels[b:b + 128]})
    td, ts, tl = _learnable_ctr(2048, 1)
    score = auc(tl, g.run(logits, {d: td, s: ts}))
    assert score > 0.75, f"{name}: test AUC {score:.3f}"


def test_ncf_shapes_and_sparse_grads():
    model = models.NCF(models.NCFConfig(num_users=10, num_items=20))
    out = model(ls.tensor(np.array([1, 2, 9])), ls.tensor(np.array([3, 4, 19])))
    assert out.shape == (3,)
    out.sum().backward()
    assert isinstance(model.gmf_item.weight.grad, ls.IndexedSlices)


def test_bad_slot_count_is_refused():
    model = models.DCN(CFG)
    with pytest.raises(ls.Error, match=r"\(batch, 3\)"):
        model(ls.tensor(np.zeros((2, 4), np.float32)), ls.tensor(np.zeros((2, 5), np.int64)))
