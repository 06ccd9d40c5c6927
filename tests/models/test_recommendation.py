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
    """In float64, so a wrong term cannot hide under float32 rounding; every parameter's gradient is
    compared (embedding rows, cross network, the deep MLP and the head)."""
    cfg = models.CTRConfig(**{**CFG.__dict__, "cross_type": kind})
    ls.manual_seed(0)
    model = models.DCN(cfg).to(dtype="float64")
    if kind == "v1":  # non-zero cross biases, so the factored cross network's shared-vector terms count
        rng = np.random.default_rng(3)
        for i in range(cfg.num_cross_layers):
            bias = getattr(model.cross, f"bias{i}")
            bias.value.copy_(torch.from_numpy(rng.standard_normal(bias.shape) * 0.3))
    ref = TorchDCN(cfg).double()
    ref.load_state_dict(_torch_state(model, kind))
    dense, sparse = _inputs()
    dense = dense.astype(np.float64)
    out = model(ls.tensor(dense), ls.tensor(sparse))
    tout = ref(torch.from_numpy(dense), torch.from_numpy(sparse))
    assert out.dtype == "float64"
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-12, atol=1e-12)
    weights = np.random.default_rng(5).standard_normal(len(dense))  # not all-ones: every sample counts apart
    (out * ls.tensor(weights)).sum().backward()
    (tout * torch.from_numpy(weights)).sum().backward()
    grad = model.embedding.weight.grad
    assert isinstance(grad, ls.IndexedSlices)
    theirs = dict(ref.named_parameters())
    mine = _luoshu_params(model, kind)
    assert sorted(mine) == sorted(theirs)  # every torch parameter is compared, the deep part included
    for name, p in mine.items():
        g = p.grad.to_dense().numpy() if isinstance(p.grad, ls.IndexedSlices) else p.grad.numpy()
        np.testing.assert_allclose(g, theirs[name].grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


def _luoshu_params(model, kind) -> dict:
    """luoshu's parameters under the torch model's names."""
    out = {"embedding.weight": model.embedding.weight, "head.weight": model.head.weight, "head.bias": model.head.bias}
    for i in range(CFG.num_cross_layers):
        if kind == "v1":
            out[f"w.{i}"], out[f"b.{i}"] = getattr(model.cross, f"weight{i}"), getattr(model.cross, f"bias{i}")
        else:
            layer = getattr(model.cross, f"layer{i}")
            out[f"cross.{i}.weight"], out[f"cross.{i}.bias"] = layer.weight, layer.bias
    out.update({f"deep.{name}": p for name, p in model.deep.named_parameters()})
    return out


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


# --- the other CTR models and NCF against PyTorch, written from their papers, in float64 --------------------

class TorchSlotEmbedding(torch.nn.Module):
    def __init__(self, sizes, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(sum(sizes), dim))
        self.register_buffer("offsets", torch.tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]])))

    def forward(self, sparse):
        return torch.nn.functional.embedding(sparse + self.offsets, self.weight)


def _torch_mlp(dims, final_activation=True):
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(torch.nn.Linear(a, b))
        if final_activation or i < len(dims) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


class TorchWideAndDeep(torch.nn.Module):
    """Cheng et al. 2016: a linear model over ids and dense features plus an MLP over the embeddings."""

    def __init__(self, cfg):
        super().__init__()
        self.embedding = TorchSlotEmbedding(cfg.slot_sizes, cfg.embedding_dim)
        self.wide_embedding = TorchSlotEmbedding(cfg.slot_sizes, 1)
        self.wide_dense = torch.nn.Linear(cfg.dense_dim, 1)
        self.deep = _torch_mlp((cfg.dense_dim + len(cfg.slot_sizes) * cfg.embedding_dim, *cfg.mlp_dims, 1), False)

    def forward(self, dense, sparse):
        x = torch.cat([dense, self.embedding(sparse).flatten(1)], 1)
        return (self.wide_embedding(sparse).sum((1, 2)) + self.wide_dense(dense)[:, 0] + self.deep(x)[:, 0])


class TorchDeepFM(torch.nn.Module):
    """Guo et al. 2017: first-order terms + FM pairwise interactions <v_i, v_j> + an MLP, shared embeddings."""

    def __init__(self, cfg):
        super().__init__()
        self.embedding = TorchSlotEmbedding(cfg.slot_sizes, cfg.embedding_dim)
        self.first_order = TorchSlotEmbedding(cfg.slot_sizes, 1)
        self.dense_linear = torch.nn.Linear(cfg.dense_dim, 1)
        self.deep = _torch_mlp((cfg.dense_dim + len(cfg.slot_sizes) * cfg.embedding_dim, *cfg.mlp_dims, 1), False)

    def forward(self, dense, sparse):
        emb = self.embedding(sparse)
        n = emb.shape[1]
        pairwise = sum((emb[:, i] * emb[:, j]).sum(1) for i in range(n) for j in range(i + 1, n))  # literally
        x = torch.cat([dense, emb.flatten(1)], 1)
        return self.first_order(sparse).sum((1, 2)) + self.dense_linear(dense)[:, 0] + pairwise + self.deep(x)[:, 0]


class TorchDLRM(torch.nn.Module):
    """Naumov et al. 2019: bottom MLP, pairwise dot products of (dense vector, embeddings), top MLP."""

    def __init__(self, cfg):
        super().__init__()
        d, n = cfg.embedding_dim, len(cfg.slot_sizes) + 1
        self.embedding = TorchSlotEmbedding(cfg.slot_sizes, d)
        self.bottom = _torch_mlp((cfg.dense_dim, *cfg.bottom_mlp_dims, d))
        self.top = _torch_mlp((d + n * (n - 1) // 2, *cfg.mlp_dims, 1), False)
        self.register_buffer("upper", torch.zeros(n * (n - 1) // 2, dtype=torch.int64))  # luoshu's bookkeeping

    def forward(self, dense, sparse):
        z = self.bottom(dense)
        feats = torch.cat([z[:, None], self.embedding(sparse)], 1)
        rows, cols = torch.triu_indices(feats.shape[1], feats.shape[1], 1)
        dots = torch.bmm(feats, feats.transpose(1, 2))[:, rows, cols]
        return self.top(torch.cat([z, dots], 1))[:, 0]


class TorchNCF(torch.nn.Module):
    """He et al. 2017: GMF (elementwise product of embeddings) and an MLP tower, fused by one linear head."""

    def __init__(self, cfg):
        super().__init__()
        half = cfg.mlp_dims[0] // 2
        self.gmf_user, self.gmf_item = TorchSlotEmbedding([cfg.num_users], cfg.gmf_dim), \
            TorchSlotEmbedding([cfg.num_items], cfg.gmf_dim)
        self.mlp_user, self.mlp_item = TorchSlotEmbedding([cfg.num_users], half), \
            TorchSlotEmbedding([cfg.num_items], half)
        self.mlp = _torch_mlp(cfg.mlp_dims)
        self.head = torch.nn.Linear(cfg.gmf_dim + cfg.mlp_dims[-1], 1)

    def forward(self, users, items):
        u, i = users[:, None], items[:, None]
        gmf = (self.gmf_user(u) * self.gmf_item(i))[:, 0]
        tower = self.mlp(torch.cat([self.mlp_user(u), self.mlp_item(i)], 2)[:, 0])
        return self.head(torch.cat([gmf, tower], 1))[:, 0]


_CFG_ALL = models.CTRConfig(dense_dim=4, slot_sizes=[11, 7, 5], embedding_dim=4, mlp_dims=(16, 8),
                            bottom_mlp_dims=(8,))


@pytest.mark.parametrize("name,ref_class", [("WideAndDeep", TorchWideAndDeep), ("DeepFM", TorchDeepFM),
                                            ("DLRM", TorchDLRM), ("NCF", TorchNCF)])
def test_ctr_models_match_pytorch_forward_and_every_gradient(name, ref_class):
    ls.manual_seed(1)
    rng = np.random.default_rng(2)
    if name == "NCF":
        cfg = models.NCFConfig(num_users=9, num_items=13, gmf_dim=3, mlp_dims=(8, 6, 4))
        inputs = (rng.integers(0, 9, 7), rng.integers(0, 13, 7))
    else:
        cfg = _CFG_ALL
        dense, sparse = _inputs(7, seed=4)
        inputs = (dense.astype(np.float64), sparse)
    model = getattr(models, name)(cfg).to(dtype="float64")
    for p in model.parameters():  # O(1) values everywhere, so no term is negligible
        p.value.copy_(torch.from_numpy(rng.standard_normal(p.shape) * 0.5))
    ref = ref_class(cfg).double()
    state = model.state_dict()
    ref.load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in state.items()})
    out = model(*(ls.tensor(x) for x in inputs))
    tout = ref(*(torch.from_numpy(x) for x in inputs))
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-12, atol=1e-12)
    weights = rng.standard_normal(len(inputs[0]))
    (out * ls.tensor(weights)).sum().backward()
    (tout * torch.from_numpy(weights)).sum().backward()
    theirs = dict(ref.named_parameters())
    mine = dict(model.named_parameters())
    assert sorted(mine) == sorted(theirs)
    for key, p in mine.items():
        g = p.grad.to_dense().numpy() if isinstance(p.grad, ls.IndexedSlices) else p.grad.numpy()
        np.testing.assert_allclose(g, theirs[key].grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=f"{name}: {key}")
