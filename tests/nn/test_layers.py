"""The layer zoo against torch.nn: forward values and gradients of every parameter and input.

Each test builds the torch module, copies its state dict into the luoshu module (so the
parameter and buffer names must match torch's), and compares in float64.
"""

import numpy as np
import pytest
import torch

import luoshu as ls
from luoshu import nn

RTOL, ATOL = 1e-6, 1e-8


def _flat(out):
    if isinstance(out, (tuple, list)):
        return [leaf for item in out for leaf in _flat(item)]
    return [out]


def _load(module, ref, strict=True):
    module.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()}, strict=strict)
    return module


def _close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=what)


def check(module, ref, *inputs, seed=0, **kwargs):
    """Runs both modules on `inputs` (NumPy arrays; None passes through), compares every output,
    then backpropagates one random cotangent per output and compares every gradient."""
    _load(module, ref)
    t_in = [None if x is None else torch.tensor(x, requires_grad=np.issubdtype(x.dtype, np.floating))
            for x in inputs]
    l_in = [None if x is None else ls.tensor(x, requires_grad=np.issubdtype(x.dtype, np.floating))
            for x in inputs]
    t_out = _flat(ref(*t_in, **kwargs))
    l_out = _flat(module(*l_in, **kwargs))
    assert len(t_out) == len(l_out)
    rng = np.random.default_rng(seed)
    t_loss, l_loss = 0.0, 0.0
    for i, (t, lo) in enumerate(zip(t_out, l_out)):
        if t is None:
            assert lo is None, f"output {i} should be None"
            continue
        assert lo.shape == tuple(t.shape), (i, lo.shape, tuple(t.shape))
        _close(lo.numpy(), t.detach().numpy(), f"output {i}")
        if t.requires_grad:
            c = rng.standard_normal(tuple(t.shape))
            t_loss = t_loss + (t * torch.from_numpy(c)).sum()
            l_loss = l_loss + (lo * ls.tensor(c)).sum()
    t_loss.backward()
    l_loss.backward()
    params = dict(module.named_parameters())
    for name, p in ref.named_parameters():
        grad = params[name].grad
        grad = grad.to_dense() if isinstance(grad, ls.IndexedSlices) else grad
        # luoshu gives None where torch gives zeros (a weight that only multiplies a zero state)
        _close(np.zeros(tuple(p.shape)) if grad is None else grad.numpy(), p.grad.numpy(), f"grad of {name}")
    for i, (t, lo) in enumerate(zip(t_in, l_in)):
        if t is not None and t.requires_grad:
            _close(lo.grad.numpy(), t.grad.numpy(), f"grad of input {i}")
    return l_out


def _rand(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


F64 = {"dtype": "float64"}
T64 = {"dtype": torch.float64}


# --- convolution and pooling ----------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {},
    {"stride": 2, "padding": 1, "dilation": 2, "bias": False},
    {"groups": 2, "padding": "same"},
    {"padding": 2, "padding_mode": "reflect"},
])
def test_conv1d(kwargs):
    check(nn.Conv1d(4, 6, 3, **kwargs, **F64), torch.nn.Conv1d(4, 6, 3, **kwargs, **T64), _rand(2, 4, 11))


@pytest.mark.parametrize("kwargs", [
    {},
    {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2), "bias": False},
    {"groups": 2, "padding": "same", "padding_mode": "replicate"},
])
def test_conv2d(kwargs):
    check(nn.Conv2d(4, 6, (3, 2), **kwargs, **F64), torch.nn.Conv2d(4, 6, (3, 2), **kwargs, **T64),
          _rand(2, 4, 9, 8))


def test_conv2d_unbatched_input():
    check(nn.Conv2d(3, 2, 3, **F64), torch.nn.Conv2d(3, 2, 3, **T64), _rand(3, 6, 6))


@pytest.mark.parametrize("kwargs", [
    {},
    {"stride": 2, "padding": 1, "output_padding": 1, "groups": 2, "dilation": 1},
    {"stride": (2, 3), "bias": False, "dilation": 2},
])
def test_conv_transpose2d(kwargs):
    check(nn.ConvTranspose2d(4, 6, 3, **kwargs, **F64), torch.nn.ConvTranspose2d(4, 6, 3, **kwargs, **T64),
          _rand(2, 4, 5, 6))


def test_conv_transpose2d_output_size():
    m, ref = nn.ConvTranspose2d(3, 2, 3, stride=2, **F64), torch.nn.ConvTranspose2d(3, 2, 3, stride=2, **T64)
    x = _rand(1, 3, 4, 4)
    check(m, ref, x, output_size=(10, 10))
    assert m(ls.tensor(x), output_size=(9, 10)).shape == (1, 2, 9, 10)
    with pytest.raises(ls.Error, match="not reachable"):
        m(ls.tensor(x), output_size=(12, 12))


def test_conv_parameter_shapes_and_init_bounds():
    ls.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, groups=2)
    assert conv.weight.shape == (16, 4, 3, 3) and conv.bias.shape == (16,)
    bound = 1 / np.sqrt(4 * 9)  # kaiming_uniform(a=sqrt(5)) and the bias share 1/sqrt(fan_in)
    assert np.abs(conv.weight.numpy()).max() <= bound and np.abs(conv.weight.numpy()).max() > 0.8 * bound
    assert np.abs(conv.bias.numpy()).max() <= bound
    assert nn.ConvTranspose2d(8, 6, 3, groups=2).weight.shape == (8, 3, 3, 3)
    with pytest.raises(ls.Error, match="divisible by groups"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ls.Error, match="padding_mode"):
        nn.Conv1d(3, 4, 3, padding_mode="circular")


@pytest.mark.parametrize("make", [
    lambda m: m.MaxPool2d(3, stride=2, padding=1),
    lambda m: m.MaxPool2d((2, 3), dilation=(2, 1), ceil_mode=True),
    lambda m: m.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
    lambda m: m.AvgPool2d(2, ceil_mode=True, divisor_override=3),
    lambda m: m.AdaptiveAvgPool2d((3, 2)),
    lambda m: m.AdaptiveAvgPool2d(1),
])
def test_pooling(make):
    check(make(nn), make(torch.nn), _rand(2, 3, 9, 7))


# --- normalisation --------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "shape"), [("BatchNorm1d", (6, 4)), ("BatchNorm1d", (5, 4, 3)),
                                            ("BatchNorm2d", (3, 4, 5, 2))])
@pytest.mark.parametrize("kwargs", [{}, {"affine": False, "momentum": 0.3}, {"momentum": None},
                                    {"track_running_stats": False}])
def test_batch_norm_train_and_eval_follow_torch(cls, shape, kwargs):
    m, ref = getattr(nn, cls)(4, **kwargs, **F64), getattr(torch.nn, cls)(4, **kwargs, **T64)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    check(m, ref, _rand(*shape, seed=0) * 2 + 1)  # a training step: batch statistics, gradients
    for step in (1, 2):  # the running statistics update in place, as torch's do
        ref(torch.from_numpy(_rand(*shape, seed=step)))
        m(ls.tensor(_rand(*shape, seed=step)))
    for name, buf in ref.named_buffers():
        np.testing.assert_allclose(dict(m.named_buffers())[name].numpy(), buf.numpy(), rtol=1e-12, err_msg=name)
    m.eval()
    ref.eval()
    x = _rand(*shape, seed=7)
    eval_out = check(m, ref, x)[0].numpy()
    m.train()
    if kwargs.get("track_running_stats", True):  # eval normalises with the running statistics
        assert not np.allclose(eval_out, m(ls.tensor(x)).numpy())


def test_batch_norm_rank_is_checked():
    with pytest.raises(ls.Error, match="rank 4"):
        nn.BatchNorm2d(3)(ls.tensor(np.zeros((2, 3))))


@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False, "eps": 1e-3}])
def test_layer_norm(kwargs):
    m, ref = nn.LayerNorm((3, 5), **kwargs, **F64), torch.nn.LayerNorm((3, 5), **kwargs, **T64)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    check(m, ref, _rand(4, 3, 5))


@pytest.mark.parametrize("kwargs", [{}, {"eps": 1e-4}, {"elementwise_affine": False}])
def test_rms_norm(kwargs):
    m, ref = nn.RMSNorm(5, **kwargs, **F64), torch.nn.RMSNorm(5, **kwargs, **T64)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    check(m, ref, _rand(2, 3, 5))


@pytest.mark.parametrize("kwargs", [{}, {"affine": False, "eps": 1e-3}])
def test_group_norm(kwargs):
    m, ref = nn.GroupNorm(2, 6, **kwargs, **F64), torch.nn.GroupNorm(2, 6, **kwargs, **T64)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    check(m, ref, _rand(3, 6, 4, 2))


# --- dropout and embeddings -----------------------------------------------------------------
def test_dropout_scales_in_training_and_is_identity_in_eval():
    drop = nn.Dropout(0.25)
    x = np.ones((200, 50))
    y = drop(ls.tensor(x)).numpy()
    kept = y != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(y[kept], 1 / 0.75)
    drop.eval()
    np.testing.assert_array_equal(drop(ls.tensor(x)).numpy(), x)
    assert (nn.Dropout(1.0)(ls.tensor(x)).numpy() == 0).all()
    with pytest.raises(ls.Error, match="p must be"):
        nn.Dropout(1.5)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_with_offsets(mode):
    ids = np.array([1, 4, 4, 0, 7, 2, 9])
    offsets = np.array([0, 2, 2, 5])
    check(nn.EmbeddingBag(10, 3, mode=mode, **F64), torch.nn.EmbeddingBag(10, 3, mode=mode, **T64), ids, offsets)
    with pytest.raises(ls.Error, match="mode"):
        nn.EmbeddingBag(10, 3, mode="max")


def test_embedding_bag_2d_ids_weights_and_padding():
    ids = np.array([[1, 4, 0], [3, 3, 8]])
    kw = {"mode": "sum", "padding_idx": 0}
    check(nn.EmbeddingBag(10, 3, **kw, **F64), torch.nn.EmbeddingBag(10, 3, **kw, **T64), ids, None,
          _rand(2, 3))
    kw = {"mode": "sum", "include_last_offset": True}
    check(nn.EmbeddingBag(10, 3, **kw, **F64), torch.nn.EmbeddingBag(10, 3, **kw, **T64),
          np.array([2, 5, 5, 1]), np.array([0, 1, 4]))


# --- recurrent ------------------------------------------------------------------------------
RNN_CONFIGS = [
    {},
    {"num_layers": 2, "bidirectional": True},
    {"num_layers": 2, "batch_first": True, "bias": False},
]


def _sequence(kwargs, seed=1):
    """(L=5, N=3, 4) time-major, or (N=3, L=5, 4) with batch_first."""
    return _rand(3, 5, 4, seed=seed) if kwargs.get("batch_first") else _rand(5, 3, 4, seed=seed)


def _states(kwargs, size, seed):
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    return _rand(layers, 3, size, seed=seed)


@pytest.mark.parametrize("kwargs", RNN_CONFIGS + [{"nonlinearity": "relu", "num_layers": 2}])
def test_rnn(kwargs):
    m, ref = nn.RNN(4, 5, **kwargs, **F64), torch.nn.RNN(4, 5, **kwargs, **T64)
    check(m, ref, _sequence(kwargs))
    check(m, ref, _sequence(kwargs), _states(kwargs, 5, seed=2))


@pytest.mark.parametrize("kwargs", RNN_CONFIGS + [{"proj_size": 3, "num_layers": 2, "bidirectional": True}])
def test_lstm(kwargs):
    m, ref = nn.LSTM(4, 5, **kwargs, **F64), torch.nn.LSTM(4, 5, **kwargs, **T64)
    x = _sequence(kwargs)
    check(m, ref, x)
    h0, c0 = _states(kwargs, kwargs.get("proj_size") or 5, seed=2), _states(kwargs, 5, seed=3)
    _load(m, ref)
    xt, xl = torch.tensor(x, requires_grad=True), ls.tensor(x, requires_grad=True)
    ht, hl = torch.tensor(h0, requires_grad=True), ls.tensor(h0, requires_grad=True)
    ct, cl = torch.tensor(c0, requires_grad=True), ls.tensor(c0, requires_grad=True)
    out, (h, c) = m(xl, (hl, cl))
    tout, (th, tc) = ref(xt, (ht, ct))
    for a, b in [(out, tout), (h, th), (c, tc)]:
        _close(a.numpy(), b.detach().numpy(), "LSTM with initial states")
    cot = [_rand(*t.shape, seed=i) for i, t in enumerate((tout, th, tc))]
    sum((t * torch.from_numpy(k)).sum() for t, k in zip((tout, th, tc), cot)).backward()
    sum((t * ls.tensor(k)).sum() for t, k in zip((out, h, c), cot)).backward()
    for a, b in [(xl, xt), (hl, ht), (cl, ct)]:
        _close(a.grad.numpy(), b.grad.numpy(), "LSTM input and state gradients")
    with pytest.raises(ls.Error, match="initial states"):
        m(ls.tensor(x), (ls.tensor(h0[:, :2]), ls.tensor(c0[:, :2])))


@pytest.mark.parametrize("kwargs", RNN_CONFIGS)
def test_gru(kwargs):
    m, ref = nn.GRU(4, 5, **kwargs, **F64), torch.nn.GRU(4, 5, **kwargs, **T64)
    check(m, ref, _sequence(kwargs))
    check(m, ref, _sequence(kwargs), _states(kwargs, 5, seed=2))


def test_recurrent_unbatched_input_and_parameter_names():
    m, ref = nn.GRU(4, 5, bidirectional=True, **F64), torch.nn.GRU(4, 5, bidirectional=True, **T64)
    check(m, ref, _rand(7, 4), _rand(2, 5, seed=2))
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    assert [n for n, _ in lstm.named_parameters()] == [n for n, _ in torch.nn.LSTM(
        3, 4, num_layers=2, bidirectional=True).named_parameters()]
    assert np.abs(lstm.weight_hh_l1_reverse.numpy()).max() <= 0.5  # uniform(±1/sqrt(hidden))


@pytest.mark.parametrize("cls", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cells(cls):
    m, ref = getattr(nn, cls)(4, 5, **F64), getattr(torch.nn, cls)(4, 5, **T64)
    check(m, ref, _rand(3, 4))
    h = _rand(3, 5, seed=2)
    if cls == "LSTMCell":
        _load(m, ref)
        out = m(ls.tensor(_rand(3, 4)), (ls.tensor(h), ls.tensor(h * 2)))
        tout = ref(torch.from_numpy(_rand(3, 4)), (torch.from_numpy(h), torch.from_numpy(h * 2)))
        for a, b in zip(out, tout):
            _close(a.numpy(), b.detach().numpy(), "LSTMCell with states")
    else:
        check(m, ref, _rand(3, 4), h)


# --- attention ------------------------------------------------------------------------------
def _masks(n=2, length=4, source=5, heads=2, seed=4):
    rng = np.random.default_rng(seed)
    padding = np.zeros((n, source), bool)
    padding[0, -2:] = True
    return {"bool_padding": padding, "float_attn": rng.standard_normal((length, source)),
            "bool_attn": np.triu(np.ones((length, source), bool), 2),
            "attn_3d": rng.standard_normal((n * heads, length, source))}


@pytest.mark.parametrize("kwargs", [{}, {"batch_first": True, "bias": False}, {"kdim": 3, "vdim": 7},
                                    {"add_bias_kv": True, "add_zero_attn": True}])
@pytest.mark.parametrize("call", [{}, {"need_weights": False}, {"average_attn_weights": False},
                                  {"mask": "bool_padding"}, {"mask": "float_attn", "need_weights": False},
                                  {"mask": "bool_attn"}, {"mask": "attn_3d"}])
def test_multihead_attention(kwargs, call):
    call = dict(call)
    m, ref = nn.MultiheadAttention(6, 2, **kwargs, **F64), torch.nn.MultiheadAttention(6, 2, **kwargs, **T64)
    first = kwargs.get("batch_first", False)
    q = _rand(2, 4, 6) if first else _rand(4, 2, 6)
    k = _rand(2, 5, kwargs.get("kdim", 6), seed=2) if first else _rand(5, 2, kwargs.get("kdim", 6), seed=2)
    v = _rand(2, 5, kwargs.get("vdim", 6), seed=3) if first else _rand(5, 2, kwargs.get("vdim", 6), seed=3)
    mask = call.pop("mask", None)
    masks = _masks()
    padding = masks[mask] if mask == "bool_padding" else None
    attn = masks[mask] if mask in ("float_attn", "bool_attn", "attn_3d") else None
    _load(m, ref)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    lq, lk, lv = (ls.tensor(a, requires_grad=True) for a in (q, k, v))
    t_out = ref(tq, tk, tv, key_padding_mask=None if padding is None else torch.from_numpy(padding),
                attn_mask=None if attn is None else torch.from_numpy(attn), **call)
    l_out = m(lq, lk, lv, key_padding_mask=None if padding is None else ls.tensor(padding),
              attn_mask=None if attn is None else ls.tensor(attn), **call)
    _close(l_out[0].numpy(), t_out[0].detach().numpy(), "attention output")
    assert (l_out[1] is None) == (t_out[1] is None)
    c = _rand(*t_out[0].shape, seed=9)
    loss_t, loss_l = (t_out[0] * torch.from_numpy(c)).sum(), (l_out[0] * ls.tensor(c)).sum()
    if t_out[1] is not None:
        _close(l_out[1].numpy(), t_out[1].detach().numpy(), "attention weights")
        cw = _rand(*t_out[1].shape, seed=10)
        loss_t, loss_l = loss_t + (t_out[1] * torch.from_numpy(cw)).sum(), loss_l + (l_out[1] * ls.tensor(cw)).sum()
    loss_t.backward()
    loss_l.backward()
    params = dict(m.named_parameters())
    for name, p in ref.named_parameters():
        _close(params[name].grad.numpy(), p.grad.numpy(), f"grad of {name}")
    for a, b in [(lq, tq), (lk, tk), (lv, tv)]:
        _close(a.grad.numpy(), b.grad.numpy(), "input grad")


def test_multihead_attention_unbatched_and_init():
    m, ref = nn.MultiheadAttention(6, 3, **F64), torch.nn.MultiheadAttention(6, 3, **T64)
    check(m, ref, _rand(4, 6), _rand(5, 6, seed=2), _rand(5, 6, seed=3))
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert (m.in_proj_bias.numpy() == 0).all() and (m.out_proj.bias.numpy() == 0).all()
    assert np.abs(m.in_proj_weight.numpy()).max() <= np.sqrt(6 / (6 + 18))  # xavier_uniform
    with pytest.raises(ls.Error, match="multiple of"):
        nn.MultiheadAttention(6, 4)


# --- transformer layers ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"activation": "gelu", "norm_first": True, "batch_first": True},
                                    {"bias": False, "layer_norm_eps": 1e-3}])
def test_transformer_encoder_layer(kwargs):
    m = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, **kwargs, **F64)
    ref = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, **kwargs, **T64)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    first = kwargs.get("batch_first", False)
    x = _rand(2, 5, 8) if first else _rand(5, 2, 8)
    padding = np.zeros((2, 5), bool)
    padding[1, -1] = True
    check(m, ref, x)
    check(m, ref, x, np.triu(np.ones((5, 5), bool), 1), padding)


@pytest.mark.parametrize("kwargs", [{}, {"activation": "gelu", "norm_first": True, "batch_first": True}])
def test_transformer_decoder_layer(kwargs):
    m = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0, **kwargs, **F64)
    ref = torch.nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0, **kwargs, **T64)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    first = kwargs.get("batch_first", False)
    tgt = _rand(2, 4, 8) if first else _rand(4, 2, 8)
    memory = _rand(2, 6, 8, seed=2) if first else _rand(6, 2, 8, seed=2)
    causal = np.triu(np.full((4, 4), -np.inf), 1)
    padding = np.zeros((2, 6), bool)
    padding[0, :2] = True
    check(m, ref, tgt, memory)
    check(m, ref, tgt, memory, causal, None, None, padding)


def test_transformer_stacks_have_independent_layers():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, **F64)
    enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8, **F64))
    ref = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, 0.0, **T64), 2,
                                      norm=torch.nn.LayerNorm(8, **T64), enable_nested_tensor=False)
    assert enc.layers[0].linear1.weight is not enc.layers[1].linear1.weight
    check(enc, ref, _rand(5, 2, 8))


# --- define-and-run gives the eager numbers -------------------------------------------------
def _graph_matches_eager(model, x):
    """Forward and gradients of `model` on x, once eager and once in a define-and-run graph
    with an unknown batch size; the numbers must be identical."""
    c = _rand(*_flat(model(ls.tensor(x)))[0].shape, seed=5)
    params = model.parameters()
    model.zero_grad()
    xe = ls.tensor(x, requires_grad=True)
    out = _flat(model(xe))[0]
    (out * ls.tensor(c)).sum().backward()
    eager = [out.numpy(), xe.grad.numpy()] + [p.grad.numpy() for p in params]
    with ls.Graph() as g:
        xp = ls.placeholder("x", (None,) + x.shape[1:], "float64")
        out = _flat(model(xp))[0]
        grads = ls.gradients((out * ls.tensor(c)).sum(), [xp] + params)
    graph = g.run([out] + grads, {xp: x})
    assert len(graph) == len(eager)
    for a, b in zip(graph, eager):
        np.testing.assert_array_equal(a, b)


def test_conv_batchnorm_in_a_graph_matches_eager():
    ls.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, **F64), nn.BatchNorm2d(4, **F64), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3, **F64))
    x = _rand(2, 3, 8, 8)
    _graph_matches_eager(model, x)
    model.eval()
    _graph_matches_eager(model, x)


def test_lstm_in_a_graph_matches_eager():
    ls.manual_seed(0)
    _graph_matches_eager(nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True, **F64), _rand(3, 6, 4))
    _graph_matches_eager(nn.GRU(4, 5, batch_first=True, bias=False, **F64), _rand(2, 4, 4))


def test_transformer_encoder_layer_in_a_graph_matches_eager():
    ls.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True, **F64)
    _graph_matches_eager(layer, _rand(3, 5, 8))


def test_attention_in_a_graph_with_unknown_batch_and_length():
    ls.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True, **F64)
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, None, 8), "float64")
        y = layer(x)
        weights = layer.self_attn(x, x, x)[1]
    for shape in [(2, 5, 8), (3, 4, 8)]:
        xv = _rand(*shape)
        out, w = g.run([y, weights], {x: xv})
        np.testing.assert_allclose(out, layer(ls.tensor(xv)).numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(w, layer.self_attn(*[ls.tensor(xv)] * 3)[1].numpy(), rtol=1e-12)


def test_causal_attention_and_dropout():
    m, ref = nn.MultiheadAttention(6, 2, **F64), torch.nn.MultiheadAttention(6, 2, **T64)
    _load(m, ref)
    x = _rand(4, 2, 6)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(4, dtype=torch.float64)
    expected = ref(*[torch.from_numpy(x)] * 3, attn_mask=causal)[0].detach().numpy()
    for need_weights in (True, False):
        out = m(*[ls.tensor(x)] * 3, is_causal=True, need_weights=need_weights)[0]
        _close(out.numpy(), expected, "is_causal without a mask")
    layer = nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.5, **F64)
    a, b = layer(ls.tensor(x)).numpy(), layer(ls.tensor(x)).numpy()
    assert not np.allclose(a, b)  # dropout is random in training ...
    layer.eval()
    np.testing.assert_array_equal(layer(ls.tensor(x)).numpy(), layer(ls.tensor(x)).numpy())  # ... not in eval


def test_recurrent_needs_a_known_sequence_length_in_a_graph():
    with ls.Graph(), pytest.raises(ls.Error, match="sequence length"):
        nn.GRU(4, 5)(ls.placeholder("x", (None, 2, 4)))


def test_batch_norm_statistics_in_a_graph_follow_torch():
    m, ref = nn.BatchNorm1d(3, momentum=0.2, **F64), torch.nn.BatchNorm1d(3, momentum=0.2, **T64)
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 3), "float64")
        y = m(x)
    for step in range(3):
        b = _rand(8, 3, seed=step) * 3 + 1
        np.testing.assert_allclose(g.run(y, {x: b}), ref(torch.from_numpy(b)).detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(m.running_mean.numpy(), ref.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(m.running_var.numpy(), ref.running_var.numpy(), rtol=1e-12)
    m.eval()
    ref.eval()
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 3), "float64")
        y = m(x)
    b = _rand(4, 3, seed=9)
    np.testing.assert_allclose(g.run(y, {x: b}), ref(torch.from_numpy(b)).detach().numpy(), rtol=1e-10)
    with ls.Graph(), pytest.raises(ls.Error, match="momentum=None"):
        nn.BatchNorm1d(3, momentum=None)(ls.placeholder("x", (None, 3)))


# --- containers -----------------------------------------------------------------------------
def test_module_list_and_dict_register_their_modules():
    layers = nn.ModuleList([nn.Linear(2, 3), nn.ReLU()])
    layers.append(nn.Linear(3, 1))
    assert len(layers) == 3 and isinstance(layers[-1], nn.Linear)
    assert [n for n, _ in layers.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    layers.insert(0, nn.Identity())
    assert [n for n, _ in layers.named_parameters()][0] == "1.weight"
    del layers[0]
    assert isinstance(layers[0], nn.Linear) and len(layers[1:]) == 2
    heads = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 1)})
    heads["c"] = nn.Tanh()
    assert list(heads) == ["a", "b", "c"] and "b" in heads
    assert [n for n, _ in heads.named_parameters()] == ["a.weight", "a.bias", "b.weight", "b.bias"]
    with pytest.raises(ls.Error, match="modules"):
        layers.append(3)
    with pytest.raises(ls.Error, match="keys"):
        heads["x.y"] = nn.ReLU()
