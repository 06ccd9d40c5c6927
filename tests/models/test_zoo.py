"""The model registry (`luoshu.models.MODELS`, `build`) and NCF's ranking against a popularity baseline."""

import dataclasses

import numpy as np
import pytest
import torch

import luoshu as ls
from luoshu import metrics, models


def test_registry_names_tasks_and_classes():
    assert {"mlp", "lenet", "alexnet", "vgg16", "resnet", "resnet18", "resnet34", "resnet50", "lstm", "transformer",
            "bert", "gpt2", "llama", "wdl", "deepfm", "dcn", "dlrm", "lr", "ncf"} <= set(models.MODELS)
    for name, (config, model, task) in models.MODELS.items():
        assert dataclasses.is_dataclass(config) and issubclass(model, ls.nn.Module), name
        assert task in models.TASKS, name
    assert models.MODELS["dcn"] == (models.CTRConfig, models.DCN, "ctr")
    assert models.MODELS["ncf"][2] == "rating" and models.MODELS["transformer"][2] == "seq2seq"


def test_build_passes_config_fields():
    model = models.build("resnet50", num_classes=3, width=2)
    assert isinstance(model, models.ResNet) and model.config.depth == 50 and model.fc.out_features == 3
    assert models.build("resnet", depth=34, width=2).config.depth == 34
    dcn = models.build("dcn", dense_dim=2, slot_sizes=[3, 4], embedding_dim=2, mlp_dims=(4,), num_cross_layers=1)
    out = dcn(ls.tensor(np.zeros((2, 2), np.float32)), ls.tensor(np.array([[0, 1], [2, 3]])))
    assert out.shape == (2,)
    assert isinstance(models.build("ncf", num_users=3, num_items=4), models.NCF)


def test_build_refuses_bad_names_and_fields():
    with pytest.raises(ls.Error, match=r"unknown model 'resnet101'.*known models: alexnet, bert"):
        models.build("resnet101")
    with pytest.raises(ls.Error, match=r"unknown config field\(s\) \['layers'\].*n_layer"):
        models.build("gpt2", layers=2)
    with pytest.raises(ls.Error, match=r"NCFConfig needs field\(s\) \['num_items'\]"):
        models.build("ncf", num_users=3)
    with pytest.raises(ls.Error, match="depth must be one of"):
        models.build("resnet", depth=101)
    with pytest.raises(ls.Error, match="unknown config field"):
        models.resnet18(depth=50)


def _ratings(num_users=300, num_items=120, clusters=6, per_user=12, seed=0):
    """Implicit feedback with taste clusters: each user draws items from their cluster's block,
    with a popularity skew inside the block; one item per user is held out (leave-one-out)."""
    rng = np.random.default_rng(seed)
    block = num_items // clusters
    taste = rng.integers(0, clusters, num_users)
    skew = 1.0 / np.arange(1, block + 1) ** 0.7
    train, held_out = [], np.zeros(num_users, np.int64)
    for u in range(num_users):
        start = taste[u] * block
        items = start + rng.choice(block, per_user, replace=False, p=skew / skew.sum())
        held_out[u] = items[-1]
        train += [(u, i) for i in items[:-1]]
    return np.array(train), held_out


def test_ncf_beats_popularity_on_hit_rate():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small kernels: one thread beats two on a shared CPU
    try:
        _ncf_beats_popularity()
    finally:
        torch.set_num_threads(threads)


def _ncf_beats_popularity():
    num_users, num_items = 300, 120
    train, held_out = _ratings(num_users, num_items)
    seen = np.zeros((num_users, num_items), bool)
    seen[train[:, 0], train[:, 1]] = True
    ls.manual_seed(0)
    model = models.NCF(models.NCFConfig(num_users=num_users, num_items=num_items, gmf_dim=16,
                                        mlp_dims=(32, 16, 8)))
    with ls.Graph() as g:
        users = ls.placeholder("users", (None,), "int64")
        items = ls.placeholder("items", (None,), "int64")
        labels = ls.placeholder("labels", (None,))
        logits = model(users, items)
        loss = ls.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        step = ls.optim.Adam(model.parameters(), lr=0.01).minimize(loss)
    rng = np.random.default_rng(1)
    for _ in range(6):  # each epoch: every positive with 4 sampled negatives (He et al. 2017)
        neg_users = np.repeat(train[:, 0], 4)
        u = np.concatenate([train[:, 0], neg_users])
        i = np.concatenate([train[:, 1], rng.integers(0, num_items, len(neg_users))])
        y = np.concatenate([np.ones(len(train)), np.zeros(len(neg_users))]).astype(np.float32)
        order = rng.permutation(len(u))
        for b in range(0, len(order), 512):
            idx = order[b:b + 512]
            g.run([loss, step], {users: u[idx], items: i[idx], labels: y[idx]})
    grid_u, grid_i = np.repeat(np.arange(num_users), num_items), np.tile(np.arange(num_items), num_users)
    scores = g.run(logits, {users: grid_u, items: grid_i}).reshape(num_users, num_items)
    scores[seen] = -np.inf  # rank only items the user has not interacted with
    popularity = np.bincount(train[:, 1], minlength=num_items).astype(float)[None].repeat(num_users, 0)
    popularity[seen] = -np.inf
    ncf_hr = metrics.hit_rate_at_k(held_out, scores, k=10)
    pop_hr = metrics.hit_rate_at_k(held_out, popularity, k=10)
    print(f"NCF HR@10 {ncf_hr:.3f}, popularity HR@10 {pop_hr:.3f}")
    assert ncf_hr > pop_hr + 0.1, f"NCF HR@10 {ncf_hr:.3f} vs popularity {pop_hr:.3f}"


@pytest.mark.parametrize(("name", "kwargs", "inputs"), [
    ("resnet18", dict(num_classes=3, width=2), lambda r: [r.standard_normal((2, 3, 8, 8)).astype(np.float32)]),
    ("gpt2", dict(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8), lambda r: [r.integers(0, 11, (2, 5))]),
    ("llama", dict(vocab_size=11, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, multiple_of=4, max_seq_len=8),
     lambda r: [r.integers(0, 11, (2, 5))]),
])
def test_zoo_models_round_trip_through_checkpoints(tmp_path, name, kwargs, inputs):
    rng = np.random.default_rng(0)
    ls.manual_seed(0)
    model = models.build(name, **kwargs)
    model(*(ls.tensor(x) for x in inputs(rng)))  # a training-mode pass moves BatchNorm's running statistics
    model.eval()
    xs = [ls.tensor(x) for x in inputs(rng)]
    expected = model(*xs).numpy()
    ls.save(tmp_path / "ckpt", model)
    ls.manual_seed(1)
    fresh = models.build(name, **kwargs).eval()
    assert not np.allclose(fresh(*xs).numpy(), expected)
    ls.load(tmp_path / "ckpt", fresh)
    np.testing.assert_allclose(fresh(*xs).numpy(), expected, rtol=1e-6, atol=1e-7)
