"""Sequence and language models: LSTM classifier, Transformer seq2seq, BERT, GPT-2 and LLaMA.

Token inputs are (batch, length) int64 ids; every model returns logits. Inside a
define-and-run graph the batch size may stay `None`, and so may the sequence length of
BERT, GPT-2, LLaMA and the encoder-decoder Transformer: their positions, rotary tables and
causal masks are then sized by the fed length when the graph runs, so one graph (and one
compiled plan) serves every length. The LSTM classifier still needs the length when the
graph is built (it unrolls over it). One `Attention` module serves BERT, GPT-2 and LLaMA: multi-head or
grouped-query, optionally causal and rotary, on the fused `scaled_dot_product_attention` op.

Packed rows (several sequences concatenated, see `luoshu.data.pack_sequences`): GPT-2 and
LLaMA take `positions=` (each sequence restarting at 0) and `segment_ids=` (attention stays
inside a segment: a block-diagonal causal mask), so a packed row trains exactly as its
sequences would one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from luoshu import ops
from luoshu.core.errors import Error
from luoshu.core.tensor import make_constant
from luoshu.nn import functional as F
from luoshu.nn import init
from luoshu.nn.container import ModuleList
from luoshu.nn.layers import Dropout, Embedding, Linear
from luoshu.nn.module import Module, Parameter
from luoshu.nn.norm import LayerNorm, RMSNorm
from luoshu.nn.recompute import SCOPES, recompute
from luoshu.nn.recurrent import LSTM
from luoshu.nn.transformer import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

IGNORE_INDEX = -100  # target value the losses skip (as torch's cross_entropy default)


def _positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise Error(f"{type(config).__name__}: {name} must be a positive int, found {value!r}")


def _probability(config, *names: str) -> None:
    for name in names:
        if not 0.0 <= getattr(config, name) < 1.0:
            raise Error(f"{type(config).__name__}: {name} must be in [0, 1), found {getattr(config, name)}")


def _check_recompute(config) -> None:
    if config.recompute not in (False, True, *SCOPES):
        raise Error(f"{type(config).__name__}: recompute must be false, true or one of {SCOPES}, "
                    f"found {config.recompute!r}")


def _recomputed(blocks: ModuleList, setting: bool | str) -> ModuleList:
    """`blocks` with each one marked for activation recompute as the config says."""
    if setting:
        for block in blocks:
            recompute(block, "full" if setting is True else setting)
    return blocks


def _divides(config, heads: str, dim: str) -> None:
    if getattr(config, dim) % getattr(config, heads):
        raise Error(f"{type(config).__name__}: {dim} ({getattr(config, dim)}) must be divisible by {heads} "
                    f"({getattr(config, heads)})")


def _check_ids(model: str, ids, max_len: int | None = None, runtime_length: bool = False) -> int | None:
    """Validates (batch, length) ids; returns the length (None: fed at run time, where allowed)."""
    if ids.ndim != 2 or ids.dtype not in ("int64", "int32"):
        raise Error(f"{model}: expected (batch, length) integer token ids, found shape {ids.shape} of {ids.dtype}")
    length = ids.shape[1]
    if length is None and not runtime_length:
        raise Error(f"{model}: the sequence length must be known when the graph is built; "
                    f"give the placeholder a fixed length, found shape {ids.shape}")
    if max_len is not None and length is not None and length > max_len:
        raise Error(f"{model}: sequence length {length} exceeds the configured maximum {max_len}")
    return length


def _check_like_ids(model: str, name: str, value, ids) -> None:
    """`positions` / `segment_ids` must be integer and (batch, length) like the ids (or (length,))."""
    if value is None:
        return
    if value.dtype not in ("int64", "int32") or value.ndim not in (1, 2) or \
            value.shape[-1] not in (None, ids.shape[1]) and ids.shape[1] is not None:
        raise Error(f"{model}: {name} must be integer, (batch, length) like the ids {ids.shape} or (length,), "
                    f"found shape {value.shape} of {value.dtype}")
    if name == "segment_ids" and value.ndim != 2:
        raise Error(f"{model}: segment_ids must be (batch, length) like the ids {ids.shape}, found {value.shape}")


def segment_mask(segment_ids):
    """(B, 1, L, L) bool, True where query i and key j lie in the same segment: the block-diagonal
    mask of packed rows (padding, segment 0 by `pack_sequences`' convention, attends only to
    padding, so no row of the softmax is empty)."""
    return ops.unsqueeze(ops.unsqueeze(segment_ids, 2) == ops.unsqueeze(segment_ids, 1), 1)


def causal_mask(x, axis: int = 1):
    """(L, L) bool lower-triangular mask for the run-time length of `x` along `axis`."""
    position = ops.arange_like(x, axis)
    return ops.unsqueeze(position, 1) >= ops.unsqueeze(position, 0)


def _init_normal(module: Module, std: float) -> None:
    """The GPT/BERT initialisation: N(0, std) weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (Linear, Embedding)):
            init.normal_(m.weight, 0.0, std)
            if isinstance(m, Linear) and m.bias is not None:
                init.zeros_(m.bias)
        elif isinstance(m, (LayerNorm, RMSNorm)) and m.weight is not None:
            init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                init.zeros_(m.bias)


# --- shared pieces ------------------------------------------------------------------------
def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """The (length, dim) sine/cosine table of Vaswani et al. 2017 (sines at even, cosines at odd dims)."""
    position = np.arange(length, dtype=np.float64)[:, None]
    freq = np.exp(np.arange(0, dim, 2, dtype=np.float64) * (-math.log(10000.0) / dim))
    table = np.zeros((length, dim))
    table[:, 0::2] = np.sin(position * freq)
    table[:, 1::2] = np.cos(position * freq)[:, : dim // 2]
    return table


def rotary_tables(length: int, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (length, head_dim), for rotary embeddings in the rotate-half layout
    (frequency i on dims i and i + head_dim/2, as Hugging Face's LLaMA)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles), np.sin(angles)


def apply_rotary(x, cos, sin):
    """Rotates (..., length, head_dim) query/key pairs (x_i, x_{i+d/2}) by the position's angles.

    A composite of split/neg/concat/mul rather than a fused op: its gradient (the inverse
    rotation) comes from autodiff, and the few elementwise kernels are small next to attention."""
    first, second = ops.split(x, 2, axis=-1)
    return x * cos + ops.concat([-second, first], axis=-1) * sin


def _table(array: np.ndarray, like):
    return make_constant(array, dtype=like.dtype, device=like.device)


def _gather_rows(table, positions):
    """table[positions] for (L,) or (B, L) integer positions -> (L, D) or (B, L, D)."""
    return ops.embedding(positions, table)


class Attention(Module):
    """Self-attention with `num_heads` query heads sharing `num_kv_heads` key/value heads (GQA;
    equal counts are ordinary multi-head attention), separate q/k/v/o projections, optional
    causal masking and rotary position embeddings on queries and keys. `dropout` applies to the
    attention probabilities and to the output (as BERT and GPT-2 do) while training.

    The length may be `None` (fed at run time); rotary embeddings then read their angles from a
    table of `max_positions` rows by position, as they do when `positions` are given."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, bias: bool = True,
                 causal: bool = False, rotary: bool = False, rope_theta: float = 10000.0, dropout: float = 0.0,
                 max_positions: int | None = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise Error(f"Attention: dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise Error(f"Attention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        if rotary and self.head_dim % 2:
            raise Error(f"Attention: rotary embeddings need an even head dim, found {self.head_dim}")
        self.causal, self.rotary, self.rope_theta = causal, rotary, rope_theta
        self.max_positions = max_positions
        kv = num_kv_heads * self.head_dim
        self.q_proj = Linear(dim, dim, bias=bias)
        self.k_proj = Linear(dim, kv, bias=bias)
        self.v_proj = Linear(dim, kv, bias=bias)
        self.o_proj = Linear(dim, dim, bias=bias)
        self.attn_dropout, self.resid_dropout = float(dropout), Dropout(dropout)
        self._rope_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _heads(self, x, heads: int, length: int | None):
        """(B, L, heads * D) -> (B, heads, L, D)."""
        # A known length keeps `reshape` (whose distributed-states rule tensor parallelism
        # uses); a run-time one needs `unflatten`, as batch and length are then both unknown.
        x = ops.unflatten(x, -1, (heads, self.head_dim)) if length is None else \
            x.reshape((-1, length, heads, self.head_dim))
        return ops.permute(x, 0, 2, 1, 3)

    def _rope(self, length: int | None, like, positions=None):
        """(cos, sin) broadcastable to (B, heads, L, head_dim)."""
        if positions is None and length is not None:
            if self._rope_cache is None or self._rope_cache[0] < length:
                self._rope_cache = (length, *rotary_tables(length, self.head_dim, self.rope_theta))
            _, cos, sin = self._rope_cache
            return _table(cos[:length], like), _table(sin[:length], like)
        if self.max_positions is None:
            raise Error("Attention: rotary embeddings at a run-time length or at given positions need "
                        "max_positions (the size of the angle table), found None")
        if self._rope_cache is None or self._rope_cache[0] < self.max_positions:
            self._rope_cache = (self.max_positions, *rotary_tables(self.max_positions, self.head_dim,
                                                                   self.rope_theta))
        _, cos, sin = self._rope_cache
        positions = ops.arange_like(like, 2, limit=self.max_positions) if positions is None else positions
        cos, sin = (_gather_rows(_table(t[:self.max_positions], like), positions) for t in (cos, sin))
        if positions.ndim == 2:  # (B, L, D) -> (B, 1, L, D): the same angles for every head
            cos, sin = ops.unsqueeze(cos, 1), ops.unsqueeze(sin, 1)
        return cos, sin

    def forward(self, x, mask=None, positions=None):
        """x: (B, L, dim), L may be None; mask: optional, broadcastable to (B, heads, L, L), bool
        (True = attend) or additive float — a causal attention also applies its causal mask;
        positions: optional (L,) or (B, L) integer positions for the rotary angles (default
        0..L-1)."""
        if x.ndim != 3 or x.shape[2] != self.dim:
            raise Error(f"Attention: expected (batch, length, {self.dim}), found {x.shape}")
        length = x.shape[1]
        q = self._heads(self.q_proj(x), self.num_heads, length)
        k = self._heads(self.k_proj(x), self.num_kv_heads, length)
        v = self._heads(self.v_proj(x), self.num_kv_heads, length)
        if self.rotary:
            cos, sin = self._rope(length, q, positions)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            # Query head h reads key/value head h // rep: repeat each kv head rep times in place.
            k, v = (ops.unsqueeze(t, 2).repeat(1, 1, rep, 1, 1) for t in (k, v))
            k, v = (ops.flatten(t, 1, 2) if length is None else t.reshape((-1, self.num_heads, length, self.head_dim))
                    for t in (k, v))
        if self.causal and mask is not None:  # the fused op takes a mask or is_causal, not both
            mask = _and_mask(mask, causal_mask(x))
        if self.training and self.attn_dropout:
            out = self._attend_with_dropout(q, k, v, mask, x)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None)
        out = ops.permute(out, 0, 2, 1, 3)
        out = ops.flatten(out, 2, 3) if length is None else out.reshape((-1, length, self.dim))
        return self.resid_dropout(self.o_proj(out))

    def _attend_with_dropout(self, q, k, v, mask, x):
        """The attention spelled out, since the fused op has no dropout on its probabilities."""
        scores = ops.matmul(q, ops.transpose(k, -2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if self.causal and mask is None:
            mask = causal_mask(x)
        if mask is not None:
            scores = ops.where(mask, scores, -np.inf) if mask.dtype == "bool" else scores + mask
        return ops.matmul(F.dropout(F.softmax(scores, dim=-1), self.attn_dropout, True), v)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, causal={self.causal}, "
                f"rotary={self.rotary}")


def _and_mask(mask, allowed):
    """`mask` (bool: True = attend, or additive float) restricted to where `allowed` (bool) holds."""
    if mask.dtype == "bool":
        return mask & allowed
    return ops.where(allowed, mask, -np.inf)


# --- LSTM classifier ----------------------------------------------------------------------
@dataclass
class LSTMClassifierConfig:
    """Embedding -> LSTM -> linear. `per_token=True` scores every position (tagging, or a language
    model when unidirectional); otherwise the sequence is pooled: the output at its last real
    token ("last"; lengths from `padding_idx`, right padding; a bidirectional LSTM's backward half is
    read at position 0) or the mean over real tokens ("mean")."""

    vocab_size: int = 1000
    num_classes: int = 2
    embed_dim: int = 64
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    padding_idx: int | None = 0
    pooling: str = "last"
    per_token: bool = False

    def __post_init__(self):
        _positive(self, "vocab_size", "num_classes", "embed_dim", "hidden_size", "num_layers")
        _probability(self, "dropout")
        if self.pooling not in ("last", "mean"):
            raise Error(f"LSTMClassifierConfig: pooling must be 'last' or 'mean', found {self.pooling!r}")
        if self.padding_idx is not None and not 0 <= self.padding_idx < self.vocab_size:
            raise Error(f"LSTMClassifierConfig: padding_idx must be in [0, {self.vocab_size}), "
                        f"found {self.padding_idx}")


class LSTMClassifier(Module):
    def __init__(self, config: LSTMClassifierConfig):
        super().__init__()
        self.config = config
        c = config
        self.embedding = Embedding(c.vocab_size, c.embed_dim, padding_idx=c.padding_idx)
        self.lstm = LSTM(c.embed_dim, c.hidden_size, c.num_layers, batch_first=True, dropout=c.dropout,
                         bidirectional=c.bidirectional)
        self.dropout = Dropout(c.dropout)
        self.head = Linear(c.hidden_size * (2 if c.bidirectional else 1), c.num_classes)

    def forward(self, ids):
        """(B, L) ids -> (B, num_classes) logits, or (B, L, num_classes) with per_token."""
        length = _check_ids("LSTMClassifier", ids)
        out, _ = self.lstm(self.embedding(ids))  # (B, L, H·dirs)
        if self.config.per_token:
            return self.head(self.dropout(out))
        pad = self.config.padding_idx
        if pad is None:
            pooled = ops.mean(out, axis=1) if self.config.pooling == "mean" else ops.squeeze(out[:, length - 1:], 1)
        else:
            real = ops.unsqueeze((ids != pad).astype(out.dtype), 2)  # (B, L, 1)
            if self.config.pooling == "mean":
                pooled = ops.sum(out * real, axis=1) / ops.clamp(ops.sum(real, axis=1), min=1.0)
            else:  # the output at position (number of real tokens - 1): right padding is assumed
                last = ops.clamp(ops.sum(real, axis=1, keepdims=True) - 1.0, min=0.0).astype("int64")  # (B, 1, 1)
                index = ops.broadcast_to(last, (-1, 1, out.shape[2]))
                pooled = ops.squeeze(ops.gather(out, 1, index), 1)
                if self.config.bidirectional:  # the backward direction ends at position 0
                    forward, _ = ops.split(pooled, 2, axis=1)
                    _, backward = ops.split(ops.squeeze(out[:, :1], 1), 2, axis=1)
                    pooled = ops.concat([forward, backward], axis=1)
        return self.head(self.dropout(pooled))


# --- Transformer encoder-decoder ----------------------------------------------------------
@dataclass
class TransformerConfig:
    """The encoder-decoder Transformer of Vaswani et al. 2017 (post-LN unless norm_first)."""

    src_vocab_size: int = 1000
    tgt_vocab_size: int = 1000
    d_model: int = 128
    nhead: int = 4
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    dim_feedforward: int = 512
    dropout: float = 0.1
    max_len: int = 512
    pad_id: int | None = 0
    norm_first: bool = False
    activation: str = "relu"

    def __post_init__(self):
        _positive(self, "src_vocab_size", "tgt_vocab_size", "d_model", "nhead", "num_encoder_layers",
                  "num_decoder_layers", "dim_feedforward", "max_len")
        _divides(self, "nhead", "d_model")
        _probability(self, "dropout")
        if self.activation not in ("relu", "gelu"):
            raise Error(f"TransformerConfig: activation must be 'relu' or 'gelu', found {self.activation!r}")


class Transformer(Module):
    """`forward(src, tgt)` -> (B, T, tgt_vocab) logits of the next target token at each position;
    `encode` and `decode` expose the two halves. Padding (pad_id) is masked out of attention, and
    the decoder's self-attention is causal."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = c = config
        self.src_embedding = Embedding(c.src_vocab_size, c.d_model, padding_idx=c.pad_id
                                       if c.pad_id is not None and c.pad_id < c.src_vocab_size else None)
        self.tgt_embedding = Embedding(c.tgt_vocab_size, c.d_model, padding_idx=c.pad_id
                                       if c.pad_id is not None and c.pad_id < c.tgt_vocab_size else None)
        for emb in (self.src_embedding, self.tgt_embedding):
            init.normal_(emb.weight, 0.0, c.d_model ** -0.5)  # times sqrt(d_model) below: unit scale
        self.dropout = Dropout(c.dropout)
        layer = dict(d_model=c.d_model, nhead=c.nhead, dim_feedforward=c.dim_feedforward, dropout=c.dropout,
                     activation=c.activation, batch_first=True, norm_first=c.norm_first)
        final = (lambda: LayerNorm(c.d_model)) if c.norm_first else (lambda: None)
        self.encoder = TransformerEncoder(TransformerEncoderLayer(**layer), c.num_encoder_layers, final())
        self.decoder = TransformerDecoder(TransformerDecoderLayer(**layer), c.num_decoder_layers, final())
        self.generator = Linear(c.d_model, c.tgt_vocab_size)
        self._positions = sinusoidal_positions(c.max_len, c.d_model)

    def _embed(self, embedding: Embedding, ids, what: str):
        length = _check_ids(f"Transformer ({what})", ids, self.config.max_len, runtime_length=True)
        x = embedding(ids) * math.sqrt(self.config.d_model)
        if length is None:  # the table's rows at 0..L-1, L read when the graph runs
            positions = _gather_rows(_table(self._positions, x), ops.arange_like(ids, 1, limit=self.config.max_len))
        else:
            positions = _table(self._positions[:length], x)
        return self.dropout(x + positions)

    def padding_mask(self, ids):
        """(B, L) bool, True at pad_id tokens (torch's key_padding_mask convention); None without pad_id."""
        return None if self.config.pad_id is None else ids == self.config.pad_id

    def encode(self, src, src_key_padding_mask=None):
        """(B, S) ids -> (B, S, d_model) memory."""
        return self.encoder(self._embed(self.src_embedding, src, "source"), src_key_padding_mask=src_key_padding_mask)

    def decode(self, tgt, memory, memory_key_padding_mask=None, tgt_key_padding_mask=None):
        """(B, T) target ids (shifted right) and the memory -> (B, T, tgt_vocab) logits, causally."""
        x = self._embed(self.tgt_embedding, tgt, "target")
        x = self.decoder(x, memory, tgt_key_padding_mask=tgt_key_padding_mask,
                         memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=True)
        return self.generator(x)

    def forward(self, src, tgt):
        src_mask = self.padding_mask(src)
        return self.decode(tgt, self.encode(src, src_mask), src_mask, self.padding_mask(tgt))


def _position_rows(table: Embedding, ids, length: int | None, positions=None):
    """The learned position embeddings of `ids`' positions: the first `length` rows of the
    table when the length is known and no positions are given (a slice, whose gradient is
    dense as before), else the rows at `positions` (default 0..L-1 read at run time)."""
    if positions is None and length is not None:
        return table.weight[:length]
    return table(ops.arange_like(ids, 1, limit=table.weight.shape[0]) if positions is None else positions)


# --- BERT ---------------------------------------------------------------------------------
@dataclass
class BertConfig:
    """BERT (Devlin et al. 2019); the defaults are BERT-base."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    recompute: bool | str = False  # True/"full": recompute each layer in the backward; "attention": its attention

    def __post_init__(self):
        _check_recompute(self)
        _positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size")
        _divides(self, "num_heads", "hidden_size")
        _probability(self, "dropout")


class BertLayer(Module):
    """Post-LN: x = LN(x + attention(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = Attention(c.hidden_size, c.num_heads, dropout=c.dropout)
        self.attention_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.intermediate = Linear(c.hidden_size, c.intermediate_size)
        self.output = Linear(c.intermediate_size, c.hidden_size)
        self.output_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.dropout)

    def forward(self, x, mask=None):
        x = self.attention_norm(x + self.attention(x, mask))
        return self.output_norm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))


class Bert(Module):
    """The encoder: `forward(input_ids, token_type_ids=None, attention_mask=None, position_ids=None)` ->
    (sequence output (B, L, H), pooled [CLS] output (B, H)). attention_mask: (B, L), nonzero = real
    token; position_ids: (B, L) or (L,), default 0..L-1 (L may be fed at run time)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.word_embeddings = Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = Embedding(c.type_vocab_size, c.hidden_size)
        self.embedding_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = Dropout(c.dropout)
        self.layers = _recomputed(ModuleList(BertLayer(c) for _ in range(c.num_layers)), c.recompute)
        self.pooler = Linear(c.hidden_size, c.hidden_size)
        _init_normal(self, c.initializer_range)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None):
        length = _check_ids("Bert", input_ids, self.config.max_position_embeddings, runtime_length=True)
        _check_like_ids("Bert", "position_ids", position_ids, input_ids)
        x = self.word_embeddings(input_ids) + _position_rows(self.position_embeddings, input_ids, length,
                                                             position_ids)
        if token_type_ids is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        else:  # every token is segment 0
            x = x + self.token_type_embeddings.weight[0]
        x = self.dropout(self.embedding_norm(x))
        mask = None
        if attention_mask is not None:
            if attention_mask.ndim != 2:
                raise Error(f"Bert: attention_mask must be (batch, length), found shape {attention_mask.shape}")
            mask = ops.unsqueeze(ops.unsqueeze(attention_mask != 0, 1), 1)  # (B, 1, 1, L), True = attend
        for layer in self.layers:
            x = layer(x, mask)
        pooled = F.tanh(self.pooler(ops.squeeze(x[:, :1], 1)))
        return x, pooled


class BertForPreTraining(Module):
    """BERT with the masked-LM head (transform, LayerNorm, decoder tied to the word embeddings)
    and the next-sentence head: `forward(...)` -> (mlm_logits (B, L, vocab), nsp_logits (B, 2))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.bert = Bert(c)
        self.mlm_transform = Linear(c.hidden_size, c.hidden_size)
        self.mlm_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlm_bias = Parameter(np.zeros(c.vocab_size, np.float32))
        self.nsp = Linear(c.hidden_size, 2)
        for m in (self.mlm_transform, self.nsp):
            init.normal_(m.weight, 0.0, c.initializer_range)
            init.zeros_(m.bias)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None):
        x, pooled = self.bert(input_ids, token_type_ids, attention_mask, position_ids)
        h = self.mlm_norm(F.gelu(self.mlm_transform(x)))
        mlm = F.linear(h, self.bert.word_embeddings.weight, self.mlm_bias)
        return mlm, self.nsp(pooled)

    @staticmethod
    def loss(mlm_logits, nsp_logits, mlm_labels, nsp_labels):
        """Masked-LM cross entropy over positions whose label is not -100, plus the NSP cross entropy."""
        vocab = mlm_logits.shape[-1]
        mlm = F.cross_entropy(mlm_logits.reshape((-1, vocab)), mlm_labels.reshape((-1,)), ignore_index=IGNORE_INDEX)
        return mlm + F.cross_entropy(nsp_logits, nsp_labels)


# --- GPT-2 --------------------------------------------------------------------------------
@dataclass
class GPTConfig:
    """GPT-2 (Radford et al. 2019); the defaults are the 124M model."""

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    recompute: bool | str = False  # True/"full": recompute each block in the backward; "attention": its attention

    def __post_init__(self):
        _check_recompute(self)
        _positive(self, "vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        _divides(self, "n_head", "n_embd")
        _probability(self, "dropout")


class GPTMLP(Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_fc = Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.c_proj = Linear(4 * c.n_embd, c.n_embd, bias=c.bias)
        self.dropout = Dropout(c.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class GPTBlock(Module):
    """Pre-LN: x = x + attention(LN(x)); x = x + MLP(LN(x)), with causal attention."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(c.n_embd, eps=c.layer_norm_eps, bias=c.bias)
        self.attn = Attention(c.n_embd, c.n_head, bias=c.bias, causal=True, dropout=c.dropout)
        self.ln_2 = LayerNorm(c.n_embd, eps=c.layer_norm_eps, bias=c.bias)
        self.mlp = GPTMLP(c)

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GPT2(Module):
    """Token + learned position embeddings, pre-LN blocks, final LN, LM head tied to the token
    embedding: `forward(ids, positions=None, segment_ids=None)` -> (B, L, vocab) next-token
    logits. L may be fed at run time. Packed rows: `positions` (B, L) restart at 0 in each
    sequence and `segment_ids` (B, L) keep attention inside a sequence."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.wte = Embedding(c.vocab_size, c.n_embd)
        self.wpe = Embedding(c.block_size, c.n_embd)
        self.drop = Dropout(c.dropout)
        self.h = _recomputed(ModuleList(GPTBlock(c) for _ in range(c.n_layer)), c.recompute)
        self.ln_f = LayerNorm(c.n_embd, eps=c.layer_norm_eps, bias=c.bias)
        _init_normal(self, 0.02)
        for block in self.h:  # residual projections scaled by depth (GPT-2 paper, section 2.3)
            for proj in (block.attn.o_proj, block.mlp.c_proj):
                init.normal_(proj.weight, 0.0, 0.02 / math.sqrt(2 * c.n_layer))

    def forward(self, ids, positions=None, segment_ids=None):
        length = _check_ids("GPT2", ids, self.config.block_size, runtime_length=True)
        _check_like_ids("GPT2", "positions", positions, ids)
        _check_like_ids("GPT2", "segment_ids", segment_ids, ids)
        x = self.drop(self.wte(ids) + _position_rows(self.wpe, ids, length, positions))
        mask = None if segment_ids is None else segment_mask(segment_ids)
        for block in self.h:
            x = block(x, mask)
        return F.linear(self.ln_f(x), self.wte.weight)


# --- LLaMA --------------------------------------------------------------------------------
@dataclass
class LlamaConfig:
    """LLaMA (Touvron et al. 2023): RMSNorm, rotary positions, SwiGLU, grouped-query attention.

    `hidden_dim` None picks Meta's rule: 2/3 of 4·dim, rounded up to a multiple of `multiple_of`.
    The defaults are LLaMA-2 7B."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    hidden_dim: int | None = None
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    initializer_range: float = 0.02
    recompute: bool | str = False  # True/"full": recompute each block in the backward; "attention": its attention

    def __post_init__(self):
        _check_recompute(self)
        _positive(self, "vocab_size", "dim", "n_layers", "n_heads", "multiple_of", "max_seq_len")
        _divides(self, "n_heads", "dim")
        if self.n_kv_heads is not None:
            _positive(self, "n_kv_heads")
            _divides(self, "n_kv_heads", "n_heads")
        if self.hidden_dim is not None:
            _positive(self, "hidden_dim")
        if (self.dim // self.n_heads) % 2:
            raise Error(f"LlamaConfig: the head dim dim / n_heads = {self.dim // self.n_heads} must be even "
                        "for rotary embeddings")

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class LlamaMLP(Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(Module):
    """Pre-norm (RMSNorm) causal GQA attention with rotary embeddings, then the SwiGLU MLP."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, eps=c.norm_eps)
        self.self_attn = Attention(c.dim, c.n_heads, c.n_kv_heads, bias=False, causal=True, rotary=True,
                                   rope_theta=c.rope_theta, max_positions=c.max_seq_len)
        self.post_attention_layernorm = RMSNorm(c.dim, eps=c.norm_eps)
        self.mlp = LlamaMLP(c.dim, c.ffn_dim)

    def forward(self, x, mask=None, positions=None):
        x = x + self.self_attn(self.input_layernorm(x), mask, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(Module):
    """`forward(ids, positions=None, segment_ids=None)` -> (B, L, vocab) next-token logits
    (parameter names follow Hugging Face's). L may be fed at run time; `positions` and
    `segment_ids` as GPT-2's (packed rows)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = c = config
        self.embed_tokens = Embedding(c.vocab_size, c.dim)
        self.layers = _recomputed(ModuleList(LlamaBlock(c) for _ in range(c.n_layers)), c.recompute)
        self.norm = RMSNorm(c.dim, eps=c.norm_eps)
        self.lm_head = None if c.tie_embeddings else Linear(c.dim, c.vocab_size, bias=False)
        _init_normal(self, c.initializer_range)

    def forward(self, ids, positions=None, segment_ids=None):
        _check_ids("Llama", ids, self.config.max_seq_len, runtime_length=True)
        _check_like_ids("Llama", "positions", positions, ids)
        _check_like_ids("Llama", "segment_ids", segment_ids, ids)
        x = self.embed_tokens(ids)
        mask = None if segment_ids is None else segment_mask(segment_ids)
        for layer in self.layers:
            x = layer(x, mask, positions)
        x = self.norm(x)
        return F.linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)
