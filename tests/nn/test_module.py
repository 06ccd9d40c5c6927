"""Module, Parameter, core layers and initialisers."""

import math

import numpy as np
import pytest
import torch

import luoshu as ls
from luoshu import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2, bias=False)
        self.register_buffer("steps", np.zeros((), np.int64))

    def forward(self, x):
        return self.out(self.fc(x).relu())


def test_registration_names_and_state_dict():
    m = Block()
    assert [n for n, _ in m.named_parameters()] == ["fc.weight", "fc.bias", "out.weight"]
    assert list(m.state_dict()) == ["fc.weight", "fc.bias", "out.weight", "steps"]
    assert m.out.bias is None
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(seq) == 3 and isinstance(seq[1], nn.ReLU)


def test_train_eval_propagate():
    m = nn.Sequential(Block(), nn.Sequential(nn.ReLU()))
    m.eval()
    assert not any(x.training for x in m.modules())
    m.train()
    assert all(x.training for x in m.modules())


def test_load_state_dict_validates_before_changing_anything():
    a, b = Block(), Block()
    before = {k: v.numpy() for k, v in b.state_dict().items()}
    bad = dict(a.state_dict())
    bad["out.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ls.CheckpointError, match=r"out.weight.*\(2, 4\).*\(3, 3\)"):
        b.load_state_dict(bad)
    with pytest.raises(ls.CheckpointError, match="missing keys"):
        b.load_state_dict({"fc.weight": a.fc.weight})
    with pytest.raises(ls.CheckpointError, match="unexpected key"):
        b.load_state_dict({**a.state_dict(), "extra": np.zeros(1)})
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), before[k])
    b.load_state_dict(a.state_dict())
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), a.state_dict()[k].numpy())


def test_linear_matches_torch_forward_and_backward():
    layer = nn.Linear(5, 3, dtype="float64")
    ref = torch.nn.Linear(5, 3, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(layer.weight.numpy()))
        ref.bias.copy_(torch.from_numpy(layer.bias.numpy()))
    x = np.random.default_rng(0).standard_normal((4, 2, 5))
    out = layer(ls.tensor(x))
    out.sum().backward()
    tout = ref(torch.from_numpy(x))
    tout.sum().backward()
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.weight.grad.numpy(), ref.weight.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.bias.grad.numpy(), ref.bias.grad.numpy(), rtol=1e-12)


def test_initialisers_are_seeded_and_have_torch_bounds():
    ls.manual_seed(3)
    a = nn.Linear(100, 50)
    ls.manual_seed(3)
    b = nn.Linear(100, 50)
    np.testing.assert_array_equal(a.weight.numpy(), b.weight.numpy())
    bound = 1 / math.sqrt(100)  # kaiming_uniform(a=sqrt(5)) as torch.nn.Linear
    assert np.abs(a.weight.numpy()).max() <= bound and np.abs(a.weight.numpy()).max() > 0.9 * bound
    w = nn.Parameter(np.zeros((400, 300), np.float32))
    nn.init.xavier_normal_(w)
    assert abs(w.numpy().std() - math.sqrt(2 / 700)) < 0.003
    nn.init.kaiming_normal_(w, nonlinearity="relu")
    assert abs(w.numpy().std() - math.sqrt(2 / 300)) < 0.003
    nn.init.trunc_normal_(w, std=1.0, a=-0.5, b=0.5)
    assert np.abs(w.numpy()).max() <= 0.5
    nn.init.xavier_uniform_(w)
    assert np.abs(w.numpy()).max() <= math.sqrt(6 / 700)
    nn.init.constant_(w, 0.25)
    assert (w.numpy() == 0.25).all()
    with pytest.raises(ls.Error, match="rank >= 2"):
        nn.init.xavier_uniform_(nn.Parameter(np.zeros(3, np.float32)))


def test_module_works_in_both_modes_with_shared_parameters():
    m = Block()
    x = np.random.default_rng(1).standard_normal((6, 3)).astype(np.float32)
    eager = m(ls.tensor(x)).numpy()
    with ls.Graph() as g:
        xp = ls.placeholder("x", (None, 3))
        y = m(xp)
    np.testing.assert_array_equal(g.run(y, {xp: x}), eager)


def test_to_dtype_casts_parameters():
    m = Block().to(dtype="float64")
    assert all(p.dtype == "float64" and p.value.dtype == torch.float64 for p in m.parameters())
    assert m.steps.dtype == "int64"


def test_embedding_layer_padding_row():
    emb = nn.Embedding(10, 4, padding_idx=0)
    assert (emb.weight.numpy()[0] == 0).all()
    out = emb(ls.tensor(np.array([[0, 3], [3, 9]])))
    assert out.shape == (2, 2, 4)
    out.sum().backward()
    g = emb.weight.grad
    assert isinstance(g, ls.IndexedSlices)
    dense = g.to_dense().numpy()
    assert (dense[0] == 0).all() and (dense[3] == 2).all() and (dense[9] == 1).all()
