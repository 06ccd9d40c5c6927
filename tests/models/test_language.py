"""Language models: BERT, GPT-2 and LLaMA parity (forward and gradients) with PyTorch models written
here, graph == eager, LSTM / Transformer / GPT learn their synthetic tasks, tiny builds, bad configs."""

import math

import numpy as np
import pytest
import torch

import luoshu as ls
from luoshu import data, models

F = torch.nn.functional


@pytest.fixture(autouse=True)
def _one_thread():
    """These models run many small kernels, which one thread does faster than two on a shared CPU
    (OpenMP barriers spin when the cores are oversubscribed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(ref: torch.nn.Module, model) -> None:
    """luoshu's parameters into the torch model: both use the same names."""
    ref.load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in model.state_dict().items()})


def _compare_grads(model, ref, rtol=1e-6, atol=1e-9):
    tparams = dict(ref.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(tparams)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad.numpy() if not isinstance(p.grad, ls.IndexedSlices)
                                   else p.grad.to_dense().numpy(), tparams[name].grad.numpy(),
                                   rtol=rtol, atol=atol, err_msg=name)


class TorchProj(torch.nn.Module):
    """q/k/v/o projections under luoshu's names; the attention itself is spelled out (no sdpa)."""

    def __init__(self, dim, heads, kv_heads, bias):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = torch.nn.Linear(dim, dim, bias=bias)
        self.k_proj = torch.nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.v_proj = torch.nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.o_proj = torch.nn.Linear(dim, dim, bias=bias)

    def forward(self, x, keep=None, causal=False, rope=None):
        b, n, e = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = rope(q), rope(k)
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if keep is not None:
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, e)
        return self.o_proj(out)


# --- BERT ---------------------------------------------------------------------------------
class TorchBertLayer(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = TorchProj(c.hidden_size, c.num_heads, c.num_heads, True)
        self.attention_norm = torch.nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.intermediate = torch.nn.Linear(c.hidden_size, c.intermediate_size)
        self.output = torch.nn.Linear(c.intermediate_size, c.hidden_size)
        self.output_norm = torch.nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, keep):
        x = self.attention_norm(x + self.attention(x, keep))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


class TorchBert(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = torch.nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = torch.nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = torch.nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embedding_norm = torch.nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = torch.nn.ModuleList(TorchBertLayer(c) for _ in range(c.num_layers))
        self.pooler = torch.nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, ids, types, mask):
        pos = torch.arange(ids.shape[1])
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(types)
        x = self.embedding_norm(x)
        for layer in self.layers:
            x = layer(x, mask != 0)
        return x, torch.tanh(self.pooler(x[:, 0]))


class TorchBertForPreTraining(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bert = TorchBert(c)
        self.mlm_transform = torch.nn.Linear(c.hidden_size, c.hidden_size)
        self.mlm_norm = torch.nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlm_bias = torch.nn.Parameter(torch.zeros(c.vocab_size))
        self.nsp = torch.nn.Linear(c.hidden_size, 2)

    def forward(self, ids, types, mask):
        x, pooled = self.bert(ids, types, mask)
        h = self.mlm_norm(F.gelu(self.mlm_transform(x)))
        return h @ self.bert.word_embeddings.weight.T + self.mlm_bias, self.nsp(pooled)


BERT = models.BertConfig(vocab_size=23, hidden_size=16, num_layers=1, num_heads=4, intermediate_size=32,
                         max_position_embeddings=12, dropout=0.0)


def _bert_inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 23, (3, 7))
    types = (np.arange(7) >= 4).astype(np.int64)[None].repeat(3, 0)
    mask = np.ones((3, 7), np.int64)
    mask[1, 5:] = 0  # padding at the end of the second and third sequences
    mask[2, 3:] = 0
    mlm_labels = np.full((3, 7), -100)
    mlm_labels[:, 1] = rng.integers(0, 23, 3)
    mlm_labels[0, 4] = 5
    return ids, types, mask, mlm_labels, np.array([0, 1, 1])


def test_bert_layer_and_heads_match_pytorch():
    ls.manual_seed(0)
    model = models.BertForPreTraining(BERT).to(dtype="float64")
    ref = TorchBertForPreTraining(BERT).double()
    _load(ref, model)
    ids, types, mask, mlm_labels, nsp_labels = _bert_inputs()
    mlm, nsp = model(ls.tensor(ids), ls.tensor(types), ls.tensor(mask))
    tmlm, tnsp = ref(*(torch.from_numpy(a) for a in (ids, types, mask)))
    np.testing.assert_allclose(mlm.numpy(), tmlm.detach().numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(nsp.numpy(), tnsp.detach().numpy(), rtol=1e-6, atol=1e-9)
    model.loss(mlm, nsp, ls.tensor(mlm_labels), ls.tensor(nsp_labels)).backward()
    tloss = F.cross_entropy(tmlm.reshape(-1, 23), torch.from_numpy(mlm_labels).reshape(-1))
    (tloss + F.cross_entropy(tnsp, torch.from_numpy(nsp_labels))).backward()
    _compare_grads(model, ref)


def test_bert_without_types_or_mask_is_segment_zero_unmasked():
    ls.manual_seed(1)
    model = models.Bert(BERT)
    ids = np.random.default_rng(1).integers(1, 23, (2, 5))
    plain, _ = model(ls.tensor(ids))
    full, _ = model(ls.tensor(ids), ls.tensor(np.zeros_like(ids)), ls.tensor(np.ones_like(ids)))
    np.testing.assert_allclose(plain.numpy(), full.numpy(), rtol=1e-6, atol=1e-6)


# --- GPT-2 --------------------------------------------------------------------------------
class TorchGPTBlock(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps)
        self.attn = TorchProj(c.n_embd, c.n_head, c.n_head, True)
        self.ln_2 = torch.nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps)
        self.mlp = torch.nn.Module()
        self.mlp.c_fc = torch.nn.Linear(c.n_embd, 4 * c.n_embd)
        self.mlp.c_proj = torch.nn.Linear(4 * c.n_embd, c.n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x), causal=True)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT2(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.wte = torch.nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = torch.nn.Embedding(c.block_size, c.n_embd)
        self.h = torch.nn.ModuleList(TorchGPTBlock(c) for _ in range(c.n_layer))
        self.ln_f = torch.nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # tied LM head


GPT = models.GPTConfig(vocab_size=19, block_size=16, n_layer=1, n_head=2, n_embd=12)


def test_gpt_block_and_tied_head_match_pytorch():
    ls.manual_seed(0)
    model = models.GPT2(GPT).to(dtype="float64")
    ref = TorchGPT2(GPT).double()
    _load(ref, model)
    ids = np.random.default_rng(2).integers(0, 19, (2, 9))
    out = model(ls.tensor(ids))
    tout = ref(torch.from_numpy(ids))
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-6, atol=1e-9)
    w = np.random.default_rng(3).standard_normal(out.shape)
    (out * ls.tensor(w)).sum().backward()
    (tout * torch.from_numpy(w)).sum().backward()
    _compare_grads(model, ref)  # wte's gradient sums the lookup rows and the dense LM head


def test_gpt_graph_matches_eager_through_training_steps():
    ids = np.random.default_rng(4).integers(0, 19, (4, 10))

    def fresh():
        ls.manual_seed(5)
        model = models.GPT2(models.GPTConfig(**{**GPT.__dict__, "n_layer": 2, "dropout": 0.0}))
        return model, ls.optim.AdamW(model.parameters(), lr=1e-2)

    model, opt = fresh()
    eager = []
    for _ in range(3):
        logits = model(ls.tensor(ids[:, :-1]))
        loss = ls.nn.functional.cross_entropy(logits.reshape((-1, 19)), ls.tensor(ids[:, 1:].reshape(-1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        eager.append(loss.item())
    model, opt = fresh()
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 9), "int64")
        y = ls.placeholder("y", (None, 9), "int64")
        loss = ls.nn.functional.cross_entropy(model(x).reshape((-1, 19)), y.reshape((-1,)))
        train = opt.minimize(loss)
    graph = [float(g.run([loss, train], {x: ids[:, :-1], y: ids[:, 1:]})[0]) for _ in range(3)]
    np.testing.assert_allclose(graph, eager, rtol=1e-5)
    assert graph[-1] < graph[0]


# --- LLaMA --------------------------------------------------------------------------------
def _torch_rope(theta):
    """Rotary embeddings as complex multiplication: pair (x_i, x_{i+d/2}) is the complex number
    x_i + j·x_{i+d/2}, turned by pos·theta^(-2i/d) (Su et al. 2021, in Hugging Face's half layout)."""

    def rope(x):
        n, d = x.shape[-2], x.shape[-1]
        freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        turn = torch.polar(torch.ones(n, d // 2, dtype=torch.float64), torch.outer(torch.arange(n), freqs))
        z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * turn
        return torch.cat([z.real, z.imag], -1)

    return rope


class TorchRMSNorm(torch.nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class TorchLlama(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(c.vocab_size, c.dim)
        self.layers = torch.nn.ModuleList()
        for _ in range(c.n_layers):
            block = torch.nn.Module()
            block.input_layernorm = TorchRMSNorm(c.dim, c.norm_eps)
            block.self_attn = TorchProj(c.dim, c.n_heads, c.n_kv_heads or c.n_heads, False)
            block.post_attention_layernorm = TorchRMSNorm(c.dim, c.norm_eps)
            block.mlp = torch.nn.Module()
            block.mlp.gate_proj = torch.nn.Linear(c.dim, c.ffn_dim, bias=False)
            block.mlp.up_proj = torch.nn.Linear(c.dim, c.ffn_dim, bias=False)
            block.mlp.down_proj = torch.nn.Linear(c.ffn_dim, c.dim, bias=False)
            self.layers.append(block)
        self.norm = TorchRMSNorm(c.dim, c.norm_eps)
        self.lm_head = torch.nn.Linear(c.dim, c.vocab_size, bias=False)
        self.rope = _torch_rope(c.rope_theta)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for b in self.layers:
            x = x + b.self_attn(b.input_layernorm(x), causal=True, rope=self.rope)
            h = b.post_attention_layernorm(x)
            x = x + b.mlp.down_proj(F.silu(b.mlp.gate_proj(h)) * b.mlp.up_proj(h))
        return self.lm_head(self.norm(x))


LLAMA = models.LlamaConfig(vocab_size=17, dim=24, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=16,
                           max_seq_len=32, rope_theta=500.0)


def test_llama_block_matches_pytorch():
    assert LLAMA.ffn_dim == 64  # 2/3 of 4·24 = 64, already a multiple of 16
    ls.manual_seed(0)
    model = models.Llama(LLAMA).to(dtype="float64")
    for p in model.parameters():  # RMSNorm weights away from one, so a wrong placement shows
        if p.ndim == 1:
            p.value.uniform_(0.5, 1.5)
    ref = TorchLlama(LLAMA).double()
    _load(ref, model)
    ids = np.random.default_rng(5).integers(0, 17, (2, 11))
    out = model(ls.tensor(ids))
    tout = ref(torch.from_numpy(ids))
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-6, atol=1e-9)
    w = np.random.default_rng(6).standard_normal(out.shape)
    (out * ls.tensor(w)).sum().backward()
    (tout * torch.from_numpy(w)).sum().backward()
    _compare_grads(model, ref)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_dropout_path_matches_the_fused_path(causal):
    """While training, dropout on the probabilities needs the spelled-out attention; with a
    vanishing rate it must give the fused op's numbers (masks, causality and GQA included)."""
    ls.manual_seed(0)
    attn = models.Attention(16, 4, 2, causal=causal, rotary=True, dropout=1e-12)
    x = ls.tensor(np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32))
    keep = None if causal else ls.tensor(np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)[:, None, None])
    spelled = attn(x, keep).numpy()
    fused = attn.eval()(x, keep).numpy()
    np.testing.assert_allclose(spelled, fused, rtol=1e-5, atol=1e-6)
    attn.train()
    attn.attn_dropout = 0.5
    assert not np.allclose(attn(x, keep).numpy(), fused)


def test_rotary_keeps_norms_and_makes_scores_relative():
    cos, sin = models.rotary_tables(12, 8)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal(8), rng.standard_normal(8)
    rq = models.apply_rotary(ls.tensor(np.tile(q, (12, 1))), ls.tensor(cos), ls.tensor(sin)).numpy()
    rk = models.apply_rotary(ls.tensor(np.tile(k, (12, 1))), ls.tensor(cos), ls.tensor(sin)).numpy()
    np.testing.assert_allclose(np.linalg.norm(rq, axis=1), np.linalg.norm(q), rtol=1e-12)
    # <R_m q, R_n k> depends on m - n only
    np.testing.assert_allclose(rq[5] @ rk[2], rq[9] @ rk[6], rtol=1e-10)
    np.testing.assert_allclose(rq[3] @ rk[3], q @ k, rtol=1e-10)


# --- convergence --------------------------------------------------------------------------
def _pad(pairs, length):
    x, _ = data.pad_sequences([a for a, _ in pairs], 0, length)
    y, _ = data.pad_sequences([b for _, b in pairs], -100, length)
    return x, y


def _answer_accuracy(pred, targets) -> float:
    scored = targets != -100
    return float((pred[scored] == targets[scored]).mean())


def test_lstm_learns_to_reverse():
    """Reversing 2-6 tokens from 8 symbols: about 94% of answer tokens right after 250 steps."""
    vocab, length = 10, 12
    xtr, ytr = _pad(data.copy_task(4000, vocab, 2, 6, reverse=True, seed=0), length)
    xte, yte = _pad(data.copy_task(500, vocab, 2, 6, reverse=True, seed=1), length)
    ls.manual_seed(0)
    model = models.LSTMClassifier(models.LSTMClassifierConfig(vocab_size=vocab, num_classes=vocab, embed_dim=32,
                                                              hidden_size=64, per_token=True))
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, length), "int64")
        y = ls.placeholder("y", (None, length), "int64")
        logits = model(x)
        loss = ls.nn.functional.cross_entropy(logits.reshape((-1, vocab)), y.reshape((-1,)))
        train = ls.optim.Adam(model.parameters(), lr=1e-2).minimize(loss)
    for step in range(250):
        b = step * 64 % (len(xtr) - 64)
        g.run([loss, train], {x: xtr[b:b + 64], y: ytr[b:b + 64]})
    accuracy = _answer_accuracy(g.run(logits, {x: xte}).argmax(-1), yte)
    print(f"LSTM reverse-task answer accuracy {accuracy:.3f}")
    assert accuracy >= 0.9, f"LSTM reverse-task accuracy {accuracy:.3f}"


def _seq2seq(pairs, length):
    """copy_task's LM pairs as (source, decoder input = separator + answer[:-1], answer)."""
    src, tgt_in, tgt_out = [], [], []
    for inputs, targets in pairs:
        n = int((targets == -100).sum())
        src.append(inputs[:n])
        tgt_in.append(np.concatenate([[1], targets[n:-1]]))
        tgt_out.append(targets[n:])
    pad = data.pad_sequences
    return pad(src, 0, length)[0], pad(tgt_in, 0, length)[0], pad(tgt_out, -100, length)[0]


def test_transformer_learns_to_copy_with_greedy_decoding():
    """Copying 2-6 tokens: about 97% greedy-decoded answer tokens right after 150 steps."""
    vocab, length = 10, 6
    src, tin, tout = _seq2seq(data.copy_task(4000, vocab, 2, length, seed=0), length)
    tsrc, _, ttout = _seq2seq(data.copy_task(500, vocab, 2, length, seed=1), length)
    ls.manual_seed(0)
    model = models.Transformer(models.TransformerConfig(
        src_vocab_size=vocab, tgt_vocab_size=vocab, d_model=32, nhead=4, num_encoder_layers=1,
        num_decoder_layers=1, dim_feedforward=64, dropout=0.0, max_len=16))
    with ls.Graph() as g:
        s = ls.placeholder("src", (None, length), "int64")
        t_in = ls.placeholder("tgt_in", (None, length), "int64")
        t_out = ls.placeholder("tgt_out", (None, length), "int64")
        logits = model(s, t_in)
        loss = ls.nn.functional.cross_entropy(logits.reshape((-1, vocab)), t_out.reshape((-1,)))
        train = ls.optim.Adam(model.parameters(), lr=5e-3).minimize(loss)
    for step in range(150):
        b = step * 64 % (len(src) - 64)
        g.run([loss, train], {s: src[b:b + 64], t_in: tin[b:b + 64], t_out: tout[b:b + 64]})
    model.eval()
    decoded = np.zeros_like(tsrc)
    decoded[:, 0] = 1
    for i in range(length):  # causal: positions after i do not affect position i's prediction
        step = g.run(logits, {s: tsrc, t_in: decoded}).argmax(-1)
        if i + 1 < length:
            decoded[:, i + 1] = step[:, i]
    accuracy = _answer_accuracy(step, ttout)
    print(f"Transformer greedy copy accuracy {accuracy:.3f}")
    assert accuracy >= 0.9, f"Transformer greedy copy accuracy {accuracy:.3f}"


def test_gpt_memorises_a_tiny_corpus():
    text = "luoshu is the companion of hetu; both are magic squares."
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text])
    length = len(ids) - 1
    ls.manual_seed(0)
    model = models.GPT2(models.GPTConfig(vocab_size=len(chars), block_size=64, n_layer=2, n_head=2, n_embd=32))
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, length), "int64")
        y = ls.placeholder("y", (None, length), "int64")
        logits = model(x)
        loss = ls.nn.functional.cross_entropy(logits.reshape((-1, len(chars))), y.reshape((-1,)))
        train = ls.optim.Adam(model.parameters(), lr=1e-2).minimize(loss)
    feed = {x: ids[None, :-1], y: ids[None, 1:]}
    for _ in range(150):
        final, _ = g.run([loss, train], feed)
    print(f"GPT tiny-corpus loss {float(final):.4f}")
    assert float(final) < 0.05
    assert (g.run(logits, feed).argmax(-1)[0] == ids[1:]).all()


# --- every model at a tiny size; bad configs -------------------------------------------------
TINY = {
    "lstm": dict(vocab_size=20, num_classes=3, embed_dim=8, hidden_size=8, num_layers=2, bidirectional=True,
                 dropout=0.1),
    "transformer": dict(src_vocab_size=20, tgt_vocab_size=15, d_model=16, nhead=2, dim_feedforward=32,
                        norm_first=True, activation="gelu"),
    "bert": dict(vocab_size=20, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                 max_position_embeddings=16),
    "gpt2": dict(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1),
    "llama": dict(vocab_size=20, dim=16, n_layers=2, n_heads=4, n_kv_heads=1, multiple_of=8, max_seq_len=16,
                  tie_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_language_model_trains_a_step(name):
    ls.manual_seed(0)
    model = models.build(name, **TINY[name])
    task = models.MODELS[name][2]
    rng = np.random.default_rng(0)
    ids = ls.tensor(rng.integers(1, 15, (2, 6)))
    if task == "seq2seq":
        out = model(ids, ls.tensor(rng.integers(1, 15, (2, 4))))
        assert out.shape == (2, 4, 15)
    elif name == "bert":
        mlm, nsp = model(ids)
        assert mlm.shape == (2, 6, 20) and nsp.shape == (2, 2)
        out = mlm.sum() + nsp.sum()
    else:
        out = model(ids)
        assert out.shape == ((2, 3) if task == "sequence" else (2, 6, 20))
    before = [p.numpy().copy() for p in model.parameters()]
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    ls.optim.Adam(model.parameters(), lr=0.01).step()
    assert all(not np.array_equal(b, p.numpy()) for b, p in zip(before, model.parameters()))


def test_lstm_pooling_reads_the_last_real_token():
    ls.manual_seed(0)
    config = models.LSTMClassifierConfig(vocab_size=12, num_classes=4, embed_dim=8, hidden_size=8)
    model = models.LSTMClassifier(config)
    short = model(ls.tensor(np.array([[3, 4, 5]]))).numpy()
    padded = model(ls.tensor(np.array([[3, 4, 5, 0, 0]]))).numpy()
    np.testing.assert_allclose(padded, short, rtol=1e-5, atol=1e-6)
    mean = models.LSTMClassifier(models.LSTMClassifierConfig(**{**config.__dict__, "pooling": "mean"}))
    assert mean(ls.tensor(np.array([[3, 4, 5, 0]]))).shape == (1, 4)


def test_transformer_padding_does_not_change_the_real_positions():
    ls.manual_seed(0)
    model = models.Transformer(models.TransformerConfig(src_vocab_size=12, tgt_vocab_size=12, d_model=16, nhead=2,
                                                        dim_feedforward=16, dropout=0.0))
    a = model(ls.tensor(np.array([[4, 5, 6]])), ls.tensor(np.array([[1, 7]]))).numpy()
    b = model(ls.tensor(np.array([[4, 5, 6, 0, 0]])), ls.tensor(np.array([[1, 7, 0]]))).numpy()
    np.testing.assert_allclose(b[:, :2], a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("config", "kwargs", "match"), [
    (models.LlamaConfig, dict(dim=32, n_heads=4, n_kv_heads=3), "divisible by n_kv_heads"),
    (models.LlamaConfig, dict(dim=12, n_heads=4), "must be even"),
    (models.GPTConfig, dict(n_embd=10, n_head=3), "divisible by n_head"),
    (models.BertConfig, dict(dropout=1.0), "dropout must be in"),
    (models.TransformerConfig, dict(activation="swish"), "activation"),
    (models.LSTMClassifierConfig, dict(pooling="max"), "pooling"),
    (models.LSTMClassifierConfig, dict(vocab_size=5, padding_idx=5), "padding_idx"),
])
def test_bad_configs_are_refused(config, kwargs, match):
    with pytest.raises(ls.Error, match=match):
        config(**kwargs)


def test_bad_inputs_are_refused():
    model = models.GPT2(models.GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=4))
    with pytest.raises(ls.Error, match="exceeds the configured maximum 4"):
        model(ls.tensor(np.zeros((1, 5), np.int64)))
    with pytest.raises(ls.Error, match="integer token ids"):
        model(ls.tensor(np.zeros((1, 3), np.float32)))
    lstm = models.LSTMClassifier(models.LSTMClassifierConfig(vocab_size=10, embed_dim=4, hidden_size=4))
    with ls.Graph(), pytest.raises(ls.Error, match="sequence length must be known"):  # it unrolls over it
        lstm(ls.placeholder("ids", (None, None), "int64"))


@pytest.mark.parametrize("options", [dict(per_token=True), dict(pooling="mean", padding_idx=None),
                                     dict(pooling="last", padding_idx=None, bidirectional=False)])
def test_lstm_classifier_matches_torch_lstm_forward_and_every_gradient(options):
    """Beyond shapes: torch.nn.LSTM (same parameter names and gate order) under the same weights, float64."""
    cfg = dict(vocab_size=20, num_classes=3, embed_dim=5, hidden_size=6, num_layers=2, bidirectional=True,
               dropout=0.0)
    cfg.update(options)
    ls.manual_seed(0)
    model = models.build("lstm", **cfg).to(dtype="float64")
    dirs = 2 if cfg["bidirectional"] else 1
    ref = torch.nn.ModuleDict({"embedding": torch.nn.Embedding(20, 5),
                               "lstm": torch.nn.LSTM(5, 6, 2, batch_first=True, bidirectional=cfg["bidirectional"]),
                               "head": torch.nn.Linear(6 * dirs, 3)}).double()
    _load(ref, model)
    ids = np.random.default_rng(1).integers(1, 20, (4, 7))
    out = model(ls.tensor(ids))
    seq, _ = ref["lstm"](ref["embedding"](torch.from_numpy(ids)))
    if cfg.get("per_token"):
        pooled = seq
    elif cfg["pooling"] == "mean":
        pooled = seq.mean(1)
    else:
        pooled = seq[:, -1]
    tout = ref["head"](pooled)
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=1e-10, atol=1e-10)
    cot = np.random.default_rng(2).standard_normal(tuple(tout.shape))
    (out * ls.tensor(cot)).sum().backward()
    (tout * torch.from_numpy(cot)).sum().backward()
    theirs = dict(ref.named_parameters())
    assert set(theirs) == {k for k, _ in model.named_parameters()}
    for key, p in model.named_parameters():
        g = p.grad.to_dense().numpy() if isinstance(p.grad, ls.IndexedSlices) else p.grad.numpy()
        np.testing.assert_allclose(g, theirs[key].grad.numpy(), rtol=1e-9, atol=1e-10, err_msg=key)


class TorchSeq2Seq(torch.nn.Module):
    """The reference: torch's own encoder and decoder stacks under luoshu's module names, the
    sinusoidal positions computed here from Vaswani et al.'s formula."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.src_embedding = torch.nn.Embedding(c.src_vocab_size, c.d_model, padding_idx=c.pad_id)
        self.tgt_embedding = torch.nn.Embedding(c.tgt_vocab_size, c.d_model, padding_idx=c.pad_id)
        layer = dict(d_model=c.d_model, nhead=c.nhead, dim_feedforward=c.dim_feedforward, dropout=0.0,
                     activation=c.activation, batch_first=True, norm_first=c.norm_first)
        final = (lambda: torch.nn.LayerNorm(c.d_model)) if c.norm_first else (lambda: None)  # pre-LN ends in a norm
        self.encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(**layer), c.num_encoder_layers,
                                                   final(), enable_nested_tensor=False)
        self.decoder = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(**layer), c.num_decoder_layers,
                                                   final())
        self.generator = torch.nn.Linear(c.d_model, c.tgt_vocab_size)
        pos = torch.arange(c.max_len, dtype=torch.float64)[:, None]
        i = torch.arange(c.d_model, dtype=torch.float64)[None, :]
        angle = pos / 10000.0 ** (2 * torch.div(i, 2, rounding_mode="floor") / c.d_model)
        self.register_buffer("positions", torch.where(i % 2 == 0, torch.sin(angle), torch.cos(angle)))

    def embed(self, emb, ids):
        return emb(ids) * math.sqrt(self.c.d_model) + self.positions[: ids.shape[1]]

    def forward(self, src, tgt):
        src_pad, tgt_pad = src == self.c.pad_id, tgt == self.c.pad_id
        memory = self.encoder(self.embed(self.src_embedding, src), src_key_padding_mask=src_pad)
        causal = torch.triu(torch.ones(tgt.shape[1], tgt.shape[1], dtype=torch.bool), 1)
        x = self.decoder(self.embed(self.tgt_embedding, tgt), memory, tgt_mask=causal, tgt_is_causal=True,
                         tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad)
        return self.generator(x)


@pytest.mark.parametrize("norm_first, activation", [(False, "relu"), (True, "gelu")])
def test_transformer_seq2seq_matches_torch_forward_and_every_gradient(norm_first, activation):
    cfg = models.TransformerConfig(src_vocab_size=11, tgt_vocab_size=13, d_model=16, nhead=2, num_encoder_layers=2,
                                   num_decoder_layers=2, dim_feedforward=24, dropout=0.0, max_len=16, pad_id=0,
                                   norm_first=norm_first, activation=activation)
    ls.manual_seed(0)
    model = models.Transformer(cfg).to(dtype="float64")
    model.eval()
    ref = TorchSeq2Seq(cfg).double()
    state = {k: torch.from_numpy(v.numpy().copy()) for k, v in model.state_dict().items()}
    state["positions"] = ref.positions
    ref.load_state_dict(state)  # strict: the same parameter names on both sides
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 11, (3, 7)), rng.integers(1, 13, (3, 5))
    src[1, -2:] = 0  # padding
    tgt[2, -1] = 0
    weights = rng.standard_normal((3, 5, 13))
    out = model(ls.tensor(src), ls.tensor(tgt))
    (out * ls.tensor(weights)).sum().backward()
    expected = ref(torch.from_numpy(src), torch.from_numpy(tgt))
    (expected * torch.from_numpy(weights)).sum().backward()
    np.testing.assert_allclose(out.numpy(), expected.detach().numpy(), rtol=1e-6, atol=1e-8)
    _compare_grads(model, ref, rtol=1e-5, atol=1e-8)
