"""Recommendation models: Wide&Deep, DeepFM, DCN (v1 and v2 cross), DLRM, NCF.

CTR models take `dense` (batch, dense_dim) floats and `sparse` (batch, num_slots)
int64 ids, one id per slot, each in [0, slot_size). All slots share one
`SlotEmbedding` table, so a forward pass is one lookup and the backward one sparse
(IndexedSlices) update, however many slots there are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from luoshu import ops
from luoshu.core.errors import Error
from luoshu.nn import functional as F
from luoshu.nn import init
from luoshu.nn.layers import Linear, ReLU, Sequential, SlotLayout, empty_parameter
from luoshu.nn.module import Module, Parameter


@dataclass
class CTRConfig:
    """Shapes shared by the CTR models (defaults: the HugeCTR DCN quick start, 13 dense + 26 slots)."""

    dense_dim: int = 13
    slot_sizes: list[int] = field(default_factory=lambda: [1000] * 26)
    embedding_dim: int = 16
    mlp_dims: tuple[int, ...] = (1024, 1024)
    num_cross_layers: int = 6
    cross_type: str = "v1"  # "v1": x0 * (x·w) + b + x; "v2": x0 * (W x + b) + x
    bottom_mlp_dims: tuple[int, ...] = (512, 256)  # DLRM's dense tower; its last dim becomes embedding_dim

    def __post_init__(self):
        if not self.slot_sizes or any(s <= 0 for s in self.slot_sizes):
            raise Error(f"CTRConfig: slot_sizes must be positive, found {self.slot_sizes}")
        if self.cross_type not in ("v1", "v2"):
            raise Error(f"CTRConfig: cross_type must be 'v1' or 'v2', found {self.cross_type!r}")

    @property
    def num_slots(self) -> int:
        return len(self.slot_sizes)


class SlotEmbedding(Module):
    """One table holding every slot's rows; slot s's id i is row offsets[s] + i."""

    def __init__(self, slot_sizes, embedding_dim: int, std: float = 0.01):
        super().__init__()
        self._layout = SlotLayout(slot_sizes, "SlotEmbedding")
        self.slot_sizes = self._layout.sizes
        self.embedding_dim = embedding_dim
        self.weight = empty_parameter((self._layout.num_rows, embedding_dim))
        init.normal_(self.weight, 0.0, std)
        self.register_buffer("offsets", self._layout.offsets)

    def forward(self, sparse):
        """(batch, num_slots) ids → (batch, num_slots, embedding_dim)."""
        self._layout.check_ids(sparse.shape)
        return F.embedding(sparse + self.offsets, self.weight)

    def extra_repr(self) -> str:
        return f"slots={len(self.slot_sizes)}, rows={sum(self.slot_sizes)}, dim={self.embedding_dim}"


def mlp(dims, final_activation: bool = True) -> Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(Linear(a, b))
        if final_activation or i < len(dims) - 2:
            layers.append(ReLU())
    return Sequential(*layers)


class CrossNetwork(Module):
    """DCN's explicit feature crossing: v1 (a weight vector per layer) or v2 (a matrix)."""

    def __init__(self, dim: int, num_layers: int, cross_type: str = "v1"):
        super().__init__()
        self.cross_type, self.num_layers = cross_type, num_layers
        for i in range(num_layers):
            if cross_type == "v1":
                w = empty_parameter((dim,))
                init.normal_(w, 0.0, 1.0 / np.sqrt(dim))
                setattr(self, f"weight{i}", w)
                setattr(self, f"bias{i}", Parameter(np.zeros(dim, np.float32)))
            else:
                setattr(self, f"layer{i}", Linear(dim, dim))

    def forward(self, x0):
        if self.cross_type == "v1":
            return self._cross_v1(x0)
        x = x0
        for i in range(self.num_layers):
            x = x0 * getattr(self, f"layer{i}")(x) + x
        return x

    def _cross_v1(self, x0):
        """x_{l+1} = x0 (x_l . w_l) + b_l + x_l, computed in its factored form.

        Every x_l is x0 * s_l + c_l with a per-sample scalar s_l (s_0 = 1) and a vector shared by
        the batch, c_l = b_0 + ... + b_{l-1}; then x_l . w_l = s_l (x0 . w_l) + c_l . w_l. So one
        (batch, dim) @ (dim, layers) product and per-sample scalar steps replace the layers'
        full-width products, sums and adds (forward and backward): the same function, a few
        passes over the (batch, dim) activations instead of ~13 per layer.
        """
        weights = [getattr(self, f"weight{i}") for i in range(self.num_layers)]
        if not weights:
            return x0
        # x0 . w_l for every layer; as a linear layer (weights as rows) BLAS runs it ~2x faster than x0 @ W
        projections = ops.split(ops.linear(x0, ops.stack(weights, axis=0)), self.num_layers, axis=1)
        scale, shift = None, None  # s_l (batch, 1), c_l (dim,); None: s_0 = 1, c_0 = 0
        for i, (w, x0w) in enumerate(zip(weights, projections)):
            xw = x0w if scale is None else scale * x0w  # x_l . w_l, (batch, 1)
            if shift is not None:
                xw = xw + ops.sum(shift * w)
            scale = 1.0 + xw if scale is None else scale + xw
            bias = getattr(self, f"bias{i}")
            shift = bias if shift is None else shift + bias
        return x0 * scale + shift


class _CTRModel(Module):
    def __init__(self, config: CTRConfig):
        super().__init__()
        self.config = config
        self.embedding = SlotEmbedding(config.slot_sizes, config.embedding_dim)

    def _flat_inputs(self, dense, sparse):
        emb = self.embedding(sparse)
        flat = ops.reshape(emb, (-1, self.config.num_slots * self.config.embedding_dim))
        return ops.concat([dense, flat], axis=1), emb


class DCN(_CTRModel):
    """Deep & Cross Network: cross network and MLP in parallel, concatenated into one logit."""

    def __init__(self, config: CTRConfig):
        super().__init__(config)
        dim = config.dense_dim + config.num_slots * config.embedding_dim
        self.cross = CrossNetwork(dim, config.num_cross_layers, config.cross_type)
        self.deep = mlp((dim, *config.mlp_dims))
        self.head = Linear(dim + config.mlp_dims[-1], 1)

    def forward(self, dense, sparse):
        x0, _ = self._flat_inputs(dense, sparse)
        both = ops.concat([self.cross(x0), self.deep(x0)], axis=1)
        return ops.reshape(self.head(both), (-1,))


class WideAndDeep(_CTRModel):
    """A linear (wide) part over ids and dense features plus an MLP (deep) part."""

    def __init__(self, config: CTRConfig):
        super().__init__(config)
        self.wide_embedding = SlotEmbedding(config.slot_sizes, 1)
        self.wide_dense = Linear(config.dense_dim, 1)
        dim = config.dense_dim + config.num_slots * config.embedding_dim
        self.deep = mlp((dim, *config.mlp_dims, 1), final_activation=False)

    def forward(self, dense, sparse):
        x, _ = self._flat_inputs(dense, sparse)
        wide = ops.sum(ops.reshape(self.wide_embedding(sparse), (-1, self.config.num_slots)), axis=1, keepdims=True)
        return ops.reshape(wide + self.wide_dense(dense) + self.deep(x), (-1,))


class DeepFM(_CTRModel):
    """First-order terms + factorisation-machine pairwise terms + an MLP over the same embeddings."""

    def __init__(self, config: CTRConfig):
        super().__init__(config)
        self.first_order = SlotEmbedding(config.slot_sizes, 1)
        self.dense_linear = Linear(config.dense_dim, 1)
        dim = config.dense_dim + config.num_slots * config.embedding_dim
        self.deep = mlp((dim, *config.mlp_dims, 1), final_activation=False)

    def forward(self, dense, sparse):
        x, emb = self._flat_inputs(dense, sparse)
        first = ops.sum(ops.reshape(self.first_order(sparse), (-1, self.config.num_slots)), axis=1, keepdims=True)
        summed = ops.sum(emb, axis=1)  # (batch, dim)
        pairwise = 0.5 * ops.sum(summed * summed - ops.sum(emb * emb, axis=1), axis=1, keepdims=True)
        return ops.reshape(first + self.dense_linear(dense) + pairwise + self.deep(x), (-1,))


class DLRM(_CTRModel):
    """Bottom MLP on dense features, dot-product interaction with the embeddings, top MLP."""

    def __init__(self, config: CTRConfig):
        super().__init__(config)
        d = config.embedding_dim
        self.bottom = mlp((config.dense_dim, *config.bottom_mlp_dims, d))
        n = config.num_slots + 1
        rows, cols = np.triu_indices(n, k=1)
        self.register_buffer("upper", (rows * n + cols).astype(np.int64))  # flat (i < j) positions of n x n
        self.top = mlp((d + n * (n - 1) // 2, *config.mlp_dims, 1), final_activation=False)

    def forward(self, dense, sparse):
        n = self.config.num_slots + 1
        bottom = self.bottom(dense)  # (batch, d)
        feats = ops.concat([ops.unsqueeze(bottom, 1), self.embedding(sparse)], axis=1)  # (batch, n, d)
        dots = ops.reshape(ops.matmul(feats, ops.transpose(feats, 1, 2)), (-1, n * n))
        upper = ops.index_select(dots, 1, self.upper)
        return ops.reshape(self.top(ops.concat([bottom, upper], axis=1)), (-1,))


@dataclass
class NCFConfig:
    num_users: int
    num_items: int
    gmf_dim: int = 8
    mlp_dims: tuple[int, ...] = (64, 32, 16, 8)


class NCF(Module):
    """Neural collaborative filtering: GMF (embedding product) and an MLP, fused into one logit."""

    def __init__(self, config: NCFConfig):
        super().__init__()
        self.config = config
        half = config.mlp_dims[0] // 2
        self.gmf_user = SlotEmbedding([config.num_users], config.gmf_dim)
        self.gmf_item = SlotEmbedding([config.num_items], config.gmf_dim)
        self.mlp_user = SlotEmbedding([config.num_users], half)
        self.mlp_item = SlotEmbedding([config.num_items], half)
        self.mlp = mlp(config.mlp_dims)
        self.head = Linear(config.gmf_dim + config.mlp_dims[-1], 1)

    def forward(self, users, items):
        u, i = ops.unsqueeze(users, 1), ops.unsqueeze(items, 1)
        gmf = ops.reshape(self.gmf_user(u) * self.gmf_item(i), (-1, self.config.gmf_dim))
        mlp_in = ops.reshape(ops.concat([self.mlp_user(u), self.mlp_item(i)], axis=2), (-1, self.config.mlp_dims[0]))
        return ops.reshape(self.head(ops.concat([gmf, self.mlp(mlp_in)], axis=1)), (-1,))


class LogisticRegression(_CTRModel):
    """One weight per id and per dense feature: the CTR baseline."""

    def __init__(self, config: CTRConfig):
        super().__init__(CTRConfig(config.dense_dim, list(config.slot_sizes), 1))
        self.dense_linear = Linear(config.dense_dim, 1)

    def forward(self, dense, sparse):
        ids = ops.reshape(self.embedding(sparse), (-1, self.config.num_slots))
        return ops.reshape(ops.sum(ids, axis=1, keepdims=True) + self.dense_linear(dense), (-1,))
