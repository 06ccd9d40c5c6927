"""Sequence length fed at run time and packed rows (issue 12, items 1 and 5).

One graph with (None, None) token placeholders must compute, at every fed length, what a
graph built at that fixed length computes (whose numbers tests/models/test_language.py checks
against PyTorch models), with one compiled plan; a packed row with reset positions and a
block-diagonal causal mask must give the loss sum and the gradients of its sequences run one
by one."""

import numpy as np
import pytest
import torch

import luoshu as ls
from luoshu import data, models

VOCAB = 23
GPT = models.GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=32)
LLAMA = models.LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=32)
BERT = models.BertConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=48,
    max_position_embeddings=32,
    dropout=0.0,
)
F = ls.nn.functional


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(name):
    ls.manual_seed(0)
    model = models.GPT2(GPT) if name == "gpt2" else models.Llama(LLAMA)
    return model.to(dtype="float64")


def _lm_loss(logits, targets):
    """Summed next-token cross entropy (targets of -100 skipped)."""
    return F.cross_entropy(logits.reshape((-1, VOCAB)), targets.reshape((-1,)), reduction="sum")


def _dense(g):
    """A gradient as a dense array: eager IndexedSlices, graph IndexedSlicesValue or dense."""
    if isinstance(g, ls.IndexedSlices):
        return g.to_dense().numpy()
    if hasattr(g, "to_dense"):
        return g.to_dense()
    return g.numpy() if isinstance(g, ls.Tensor) else np.asarray(g)


def _graph_loss_and_grads(model, length):
    """A graph of the summed LM loss and its parameter gradients; `length` None = run-time."""
    params = model.parameters()
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, length), "int64")
        targets = ls.placeholder("targets", (None, length), "int64")
        loss = _lm_loss(model(ids), targets)
        grads = ls.gradients(loss, params)
    return g, ids, targets, [loss, *grads]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_one_graph_serves_every_length_as_fixed_graphs_do(name):
    model = _model(name)
    rng = np.random.default_rng(1)
    g, ids, targets, fetches = _graph_loss_and_grads(model, None)
    for length in (8, 16, 24):
        tokens = rng.integers(0, VOCAB, (2, length + 1))
        feed = {ids: tokens[:, :-1], targets: tokens[:, 1:]}
        got = g.run(fetches, feed)
        fixed_g, fixed_ids, fixed_targets, fixed_fetches = _graph_loss_and_grads(model, length)
        want = fixed_g.run(fixed_fetches, {fixed_ids: tokens[:, :-1], fixed_targets: tokens[:, 1:]})
        assert len(got) == len(want) == 1 + len(model.parameters())
        for i, (a, b) in enumerate(zip(got, want)):
            np.testing.assert_allclose(
                _dense(a), _dense(b), rtol=1e-10, atol=1e-12, err_msg=f"{name} length {length} fetch {i}"
            )
        # Eager mode (the length known, as always there) gives the same numbers.
        model.zero_grad()
        loss = _lm_loss(model(ls.tensor(tokens[:, :-1])), ls.tensor(tokens[:, 1:]))
        loss.backward()
        np.testing.assert_allclose(float(got[0]), loss.item(), rtol=1e-10)
        for p, a in zip(model.parameters(), got[1:]):
            np.testing.assert_allclose(_dense(a), _dense(p.grad), rtol=1e-10, atol=1e-12)
    assert len(g._plans) == 1  # compiled once for the feed signature, run at three lengths


def test_bert_runtime_length_with_padding_mask_matches_fixed_graphs():
    ls.manual_seed(0)
    model = models.Bert(BERT).to(dtype="float64")
    model.eval()
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, None), "int64")
        mask = ls.placeholder("mask", (None, None), "int64")
        seq, pooled = model(ids, attention_mask=mask)
    rng = np.random.default_rng(2)
    for length in (8, 16, 24):
        tokens = rng.integers(0, VOCAB, (3, length))
        real = (np.arange(length)[None] < np.array([[length], [length - 3], [5]])).astype(np.int64)
        got = g.run([seq, pooled], {ids: tokens, mask: real})
        want_seq, want_pooled = model(ls.tensor(tokens), attention_mask=ls.tensor(real))
        np.testing.assert_allclose(got[0], want_seq.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got[1], want_pooled.numpy(), rtol=1e-10, atol=1e-12)
    assert len(g._plans) == 1


def test_transformer_runtime_lengths_match_eager():
    ls.manual_seed(0)
    config = models.TransformerConfig(
        src_vocab_size=VOCAB,
        tgt_vocab_size=VOCAB,
        d_model=32,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=48,
        dropout=0.0,
        max_len=32,
        pad_id=0,
    )
    model = models.Transformer(config).to(dtype="float64")
    model.eval()
    with ls.Graph() as g:
        src = ls.placeholder("src", (None, None), "int64")
        tgt = ls.placeholder("tgt", (None, None), "int64")
        logits = model(src, tgt)
    rng = np.random.default_rng(5)
    for s, t in ((8, 5), (16, 9), (24, 24)):
        src_ids, tgt_ids = rng.integers(1, VOCAB, (2, s)), rng.integers(1, VOCAB, (2, t))
        src_ids[1, s - 3 :] = 0  # padding, masked out of attention
        got = g.run(logits, {src: src_ids, tgt: tgt_ids})
        want = model(ls.tensor(src_ids), ls.tensor(tgt_ids)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert len(g._plans) == 1


def test_multihead_attention_causal_and_3d_masks_at_runtime_lengths_match_torch():
    ls.manual_seed(0)
    m = ls.nn.MultiheadAttention(8, 2, batch_first=True, dtype="float64")
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    ref.load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in m.state_dict().items()})
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, None, 8), "float64")
        mask3 = ls.placeholder("mask3", (None, None, None), "float64")
        causal, _ = m(x, x, x, need_weights=False, is_causal=True)
        masked, _ = m(x, x, x, need_weights=False, attn_mask=mask3)
    rng = np.random.default_rng(6)
    for length in (3, 7):
        xs = rng.standard_normal((2, length, 8))
        m3 = rng.standard_normal((2 * 2, length, length))
        got = g.run([causal, masked], {x: xs, mask3: m3})
        t = torch.from_numpy(xs)
        blocked = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
        want_causal = ref(t, t, t, need_weights=False, attn_mask=blocked)[0].detach().numpy()
        want_masked = ref(t, t, t, need_weights=False, attn_mask=torch.from_numpy(m3))[0].detach().numpy()
        np.testing.assert_allclose(got[0], want_causal, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got[1], want_masked, rtol=1e-10, atol=1e-12)


def _sequences(seed=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n) for n in (7, 3, 11, 2, 6, 5, 9, 4)]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_packed_rows_train_as_their_sequences_one_by_one(name):
    sequences = _sequences()
    packed = data.pack_sequences(sequences, budget=16)
    assert packed.num_rows < len(sequences)  # rows really hold several sequences
    assert (packed.segment_ids.max(axis=1) > 1).any()

    # Reference: each sequence alone, eagerly, its loss summed over its next-token targets.
    model = _model(name)
    model.zero_grad()
    total = 0.0
    for s in sequences:
        loss = _lm_loss(model(ls.tensor(s[None, :-1])), ls.tensor(s[None, 1:]))
        loss.backward()
        total += loss.item()
    want_grads = [_dense(p.grad) for p in model.parameters()]

    # Packed: one graph with a run-time length, positions and segment ids.
    params = model.parameters()
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, None), "int64")
        positions = ls.placeholder("positions", (None, None), "int64")
        segments = ls.placeholder("segments", (None, None), "int64")
        labels = ls.placeholder("labels", (None, None), "int64")
        loss = _lm_loss(model(ids, positions=positions, segment_ids=segments), labels)
        fetches = [loss, *ls.gradients(loss, params)]
    got = g.run(
        fetches, {ids: packed.tokens, positions: packed.positions, segments: packed.segment_ids, labels: packed.labels}
    )
    np.testing.assert_allclose(float(got[0]), total, rtol=1e-10)
    for p, a, b in zip(model.named_parameters(), got[1:], want_grads):
        np.testing.assert_allclose(_dense(a), b, rtol=1e-9, atol=1e-12, err_msg=p[0])

    # The same packed rows eagerly, and the logits of each sequence where the packer put it.
    logits = model(
        ls.tensor(packed.tokens), positions=ls.tensor(packed.positions), segment_ids=ls.tensor(packed.segment_ids)
    ).numpy()
    for i, s in enumerate(sequences):
        alone = model(ls.tensor(s[None])).numpy()[0]
        np.testing.assert_allclose(packed.sequence(logits, i), alone, rtol=1e-10, atol=1e-12)


def test_without_the_mask_packed_sequences_would_see_each_other():
    """The block-diagonal mask matters: positions reset alone do not isolate the sequences."""
    model = _model("gpt2")
    packed = data.pack_sequences(_sequences()[:2], budget=10)  # lengths 7 and 3 share a row
    tokens, positions = ls.tensor(packed.tokens), ls.tensor(packed.positions)
    masked = model(tokens, positions=positions, segment_ids=ls.tensor(packed.segment_ids)).numpy()
    unmasked = model(tokens, positions=positions).numpy()
    second = packed.placement[1]
    assert second[1] > 0  # it sits behind the first
    row, start, n = second
    assert not np.allclose(masked[row, start : start + n], unmasked[row, start : start + n])


def test_bucketed_step_trains_as_the_whole_batch():
    """A step over bucket groups (each packed into rows) accumulates the gradients of the batch."""
    sequences = [s for s in data.synthetic_sequences(12, VOCAB, min_len=2, max_len=24, seed=4)]
    groups = data.bucket_batch(sequences, [24, 8, 0], row_tokens=[24, 16])
    assert sum(gr.tokens for gr in groups) == sum(len(s) for s in sequences)
    model = _model("llama")
    model.zero_grad()
    for gr in groups:
        if gr.rows.num_rows:
            r = gr.rows
            logits = model(ls.tensor(r.tokens), positions=ls.tensor(r.positions), segment_ids=ls.tensor(r.segment_ids))
            _lm_loss(logits, ls.tensor(r.labels)).backward()
    packed_grads = [_dense(p.grad) for p in model.parameters()]
    model.zero_grad()
    for s in sequences:
        _lm_loss(model(ls.tensor(s[None, :-1])), ls.tensor(s[None, 1:])).backward()
    for (name, p), a in zip(model.named_parameters(), packed_grads):
        np.testing.assert_allclose(a, _dense(p.grad), rtol=1e-9, atol=1e-12, err_msg=name)


def test_bad_inputs_are_refused():
    model = _model("llama")
    ids = ls.tensor(np.zeros((1, 4), np.int64))
    with pytest.raises(ls.Error, match="positions must be integer"):
        model(ids, positions=ls.tensor(np.zeros((1, 4))))
    with pytest.raises(ls.Error, match="positions must be integer"):
        model(ids, positions=ls.tensor(np.zeros((1, 5), np.int64)))
    with pytest.raises(ls.Error, match="segment_ids must be"):
        model(ids, segment_ids=ls.tensor(np.zeros((4,), np.int64)))
    for name in ("gpt2", "llama"):  # a fed length over the maximum (32) is refused when the plan runs
        with ls.Graph() as g:
            ph = ls.placeholder("ids", (None, None), "int64")
            logits = _model(name)(ph)
        with pytest.raises(ls.Error, match="fed size 33 of axis .* exceeds the limit 32"):
            g.run(logits, {ph: np.zeros((1, 33), np.int64)})
    attention = models.language.Attention(8, 2, rotary=True)  # no max_positions
    with ls.Graph(), pytest.raises(ls.Error, match="need max_positions"):
        attention(ls.placeholder("x", (None, None, 8), "float32"))
