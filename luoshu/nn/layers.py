"""Core layers: Linear, Embedding, Sequential, Identity, Flatten and the activation modules.

The layer zoo (convolution, normalisation, recurrent, attention) builds on these.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch

from luoshu.core import dtypes
from luoshu.core.errors import Error
from luoshu.core.tensor import normalize_device
from luoshu.nn import functional as F
from luoshu.nn import init
from luoshu.nn.module import Module, Parameter


def empty_parameter(shape, dtype="float32", device=None) -> Parameter:
    value = torch.empty(tuple(shape), dtype=dtypes.to_torch(dtype), device=normalize_device(device))
    return Parameter(value)


class Linear(Module):
    """`y = x @ weight.T + bias`, initialised like torch.nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype="float32", device=None):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise Error(f"Linear needs positive sizes, found in_features={in_features}, out_features={out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = empty_parameter((out_features, in_features), dtype, device)
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if bias:
            self.bias = empty_parameter((out_features,), dtype, device)
            bound = 1 / math.sqrt(in_features)
            init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _padding_row(layer: str, padding_idx: int | None, num_embeddings: int) -> int | None:
    """`padding_idx` checked and made non-negative (PyTorch accepts -num_embeddings..num_embeddings-1)."""
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise Error(f"{layer}: padding_idx {padding_idx} is outside [0, {num_embeddings})")
    return padding_idx % num_embeddings


def _embedding_table(num_embeddings: int, embedding_dim: int, padding_idx: int | None, weight, dtype, device):
    """The given `weight`, or a N(0, 1) table whose padding row is zero (PyTorch's initialisation)."""
    if weight is not None:
        return Parameter(weight)
    table = empty_parameter((num_embeddings, embedding_dim), dtype, device)
    init.normal_(table)
    if padding_idx is not None:
        table.value[padding_idx].zero_()
    return table


class SlotLayout:
    """Several id slots (CTR fields) in one table: slot s's id i is row `offsets[s] + i`.

    The one place that turns slot sizes into row offsets and checks (batch, num_slots) ids,
    for local slot tables (`luoshu.models.SlotEmbedding`) and parameter-server ones
    (`luoshu.ps.PSSlotEmbedding`) alike.
    """

    def __init__(self, slot_sizes, owner: str):
        sizes = [int(s) for s in slot_sizes]
        if not sizes or any(s <= 0 for s in sizes):
            raise Error(f"{owner}: slot sizes must be positive, found {list(slot_sizes)}")
        self.owner = owner
        self.sizes = sizes
        self.num_rows = sum(sizes)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def check_ids(self, shape) -> None:
        """(batch, num_slots) ids, else an error naming the owner and the shape found."""
        if len(shape) != 2 or shape[1] not in (None, len(self.sizes)):
            raise Error(f"{self.owner}: ids must be (batch, {len(self.sizes)}), found {tuple(shape)}")


class Embedding(Module):
    """A lookup table whose gradient is an IndexedSlices over the looked-up rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 dtype="float32", device=None, _weight=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = _padding_row("Embedding", padding_idx, num_embeddings)
        self.weight = _embedding_table(num_embeddings, embedding_dim, self.padding_idx, _weight, dtype, device)

    def forward(self, ids):
        return F.embedding(ids, self.weight, padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}" + (
            f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


class Sequential(Module):
    """Runs its modules in order; built from positional modules or an OrderedDict."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            for name, m in modules[0].items():
                self.add_module(name, m)
        else:
            for i, m in enumerate(modules):
                if not isinstance(m, Module):
                    raise Error(f"Sequential takes modules, found {type(m).__name__} at position {i}")
                self.add_module(str(i), m)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def __getitem__(self, index):
        items = list(self._modules.values())
        if isinstance(index, slice):
            return Sequential(*items[index])
        return items[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def append(self, module: Module) -> Sequential:
        self.add_module(str(len(self)), module)
        return self


class Identity(Module):
    def forward(self, x):
        return x


class Flatten(Module):
    """Flattens dims `start_dim..end_dim` into one (default: all but the batch dim)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        start = self.start_dim % x.ndim
        end = self.end_dim % x.ndim
        flat = x.shape[start:end + 1]
        middle = -1 if any(d is None for d in flat) else math.prod(flat)
        shape = tuple(-1 if d is None else d for d in x.shape[:start]) + (middle,) + tuple(
            -1 if d is None else d for d in x.shape[end + 1:])
        if sum(d == -1 for d in shape) > 1:
            raise Error(f"Flatten: input shape {x.shape} has unknown dims on both sides of the flattened range")
        return x.reshape(shape)


class _Activation(Module):
    _fn = None

    def forward(self, x):
        return type(self)._fn(x)


class ReLU(_Activation):
    _fn = staticmethod(F.relu)


class Sigmoid(_Activation):
    _fn = staticmethod(F.sigmoid)


class Tanh(_Activation):
    _fn = staticmethod(F.tanh)


class SiLU(_Activation):
    _fn = staticmethod(F.silu)


class LeakyReLU(Module):
    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        return F.leaky_relu(x, self.negative_slope)


class ELU(Module):
    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        return F.elu(x, self.alpha)


class GELU(Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, approximate=self.approximate)


class Softplus(Module):
    def __init__(self, beta: float = 1.0, threshold: float = 20.0):
        super().__init__()
        self.beta, self.threshold = beta, threshold

    def forward(self, x):
        return F.softplus(x, self.beta, self.threshold)


class Softmax(Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.softmax(x, dim=self.dim)


class LogSoftmax(Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.log_softmax(x, dim=self.dim)


class Dropout(Module):
    """Zeroes elements with probability p while training (scaling the rest by 1/(1-p)); identity in eval."""

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise Error(f"Dropout: p must be in [0, 1], found {p}")
        self.p, self.inplace = p, inplace

    def forward(self, x):
        if self.training and self.p == 1.0:
            return x * 0.0
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class EmbeddingBag(Module):
    """Sums or averages bags of embeddings (bags given by `offsets` or by the rows of 2-d ids)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, max_norm: float | None = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean", sparse: bool = False,
                 _weight=None, include_last_offset: bool = False, padding_idx: int | None = None,
                 dtype="float32", device=None):
        super().__init__()
        if max_norm is not None or scale_grad_by_freq:
            raise Error("EmbeddingBag: max_norm and scale_grad_by_freq are not supported")
        if mode not in ("sum", "mean"):  # the embedding_bag op has no 'max' kernel yet
            raise Error(f"EmbeddingBag: mode must be 'sum' or 'mean', found {mode!r}")
        padding_idx = _padding_row("EmbeddingBag", padding_idx, num_embeddings)
        self.num_embeddings, self.embedding_dim, self.mode = num_embeddings, embedding_dim, mode
        self.include_last_offset, self.padding_idx, self.sparse = include_last_offset, padding_idx, sparse
        self.weight = _embedding_table(num_embeddings, embedding_dim, padding_idx, _weight, dtype, device)

    def forward(self, input, offsets=None, per_sample_weights=None):
        return F.embedding_bag(input, self.weight, offsets, self.mode, per_sample_weights,
                               self.include_last_offset, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}"
