"""Tensor-parallel layers: column- and row-parallel linear, vocabulary-parallel embedding and loss.

Each layer is its plain counterpart (same parameter names, shapes and initialisation, so
a checkpoint moves between them) whose parameters carry distributed states over the
tensor-parallel axis of a `DeviceMesh` and hold only this rank's block. No layer
communicates: the compiler's states pass derives every collective from the states
(define-and-run graphs). Without a mesh (or with tp=1) they are the plain layers.

- `ColumnParallelLinear`: weight (out, in) split on out, bias split: the output is split
  on its last dim.
- `RowParallelLinear`: weight split on in; its input split on its last dim gives a
  partial output that the pass all-reduces (or reduce-scatters, with sequence
  parallelism) where a consumer needs it whole.
- `VocabParallelEmbedding`: the table split by rows (vocabulary ranges); each rank looks
  up the ids it owns and the partial results are summed.
- `vocab_parallel_cross_entropy`: the cross entropy of vocabulary-split logits; the
  states pass lowers it to Megatron's loss (max, sum of exponentials and the target
  logit combined over the group), so the full logits never gather.
"""

from __future__ import annotations

from luoshu.core.dstates import DStates
from luoshu.core.errors import Error
from luoshu.core.tensor import Tensor
from luoshu.nn import functional as F
from luoshu.nn.layers import Embedding, Linear


class ShardingError(Error):
    """A parameter that the tensor-parallel axis cannot split as asked (names it and the sizes)."""


def tp_coordinates(mesh) -> tuple[int, int]:
    """(tp size, this rank's tp index) of a DeviceMesh (or (1, 0) without one)."""
    if mesh is None:
        return 1, 0
    return mesh.tp, mesh.index("tp")


def shard_parameter(param: Tensor, dim: int | None, mesh, name: str | None = None) -> Tensor:
    """Annotates `param` split on `dim` (None: duplicate) over the mesh's TP axis and keeps only
    this rank's block as its value; the declared shape stays the global one."""
    size, index = tp_coordinates(mesh)
    name = name or param.name or "parameter"
    if size == 1 or dim is None:
        param.ds = [DStates.duplicate(size)]
        return param
    if dim is None:
        param.ds = [DStates.duplicate(size)]
        return param
    if not 0 <= dim < len(param.shape):
        raise ShardingError(f"{name}: cannot split dimension {dim} of a parameter of shape {param.shape}")
    if param.shape[dim] % size:
        raise ShardingError(
            f"{name}: dimension {dim} has size {param.shape[dim]}, which the tensor-parallel axis "
            f"of size {size} does not divide"
        )
    if param.ds:
        raise ShardingError(f"{name}: already has distributed states {param.ds[0].states}")
    param.ds = [DStates(size, {dim: size})]
    param._value = param._value.chunk(size, dim)[index].contiguous().clone()
    return param


class ColumnParallelLinear(Linear):
    """`Linear` with the output features split over the mesh's TP axis."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mesh=None, dtype="float32", device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        shard_parameter(self.weight, 0, mesh, "ColumnParallelLinear.weight")
        if self.bias is not None:
            shard_parameter(self.bias, 0, mesh, "ColumnParallelLinear.bias")


class RowParallelLinear(Linear):
    """`Linear` with the input features split over the mesh's TP axis (the bias is duplicated)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mesh=None, dtype="float32", device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        shard_parameter(self.weight, 1, mesh, "RowParallelLinear.weight")
        if self.bias is not None:
            shard_parameter(self.bias, None, mesh, "RowParallelLinear.bias")


class VocabParallelEmbedding(Embedding):
    """`Embedding` with the table's rows (the vocabulary) split over the mesh's TP axis."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        mesh=None,
        dtype="float32",
        device=None,
    ):
        super().__init__(num_embeddings, embedding_dim, padding_idx, dtype, device)
        shard_parameter(self.weight, 0, mesh, "VocabParallelEmbedding.weight")


def vocab_parallel_cross_entropy(
    logits: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> Tensor:
    """Cross entropy of (N, vocab) logits that are split on the vocabulary (a column-parallel
    head); the states pass computes it without gathering them."""
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ShardingError",
    "VocabParallelEmbedding",
    "shard_parameter",
    "tp_coordinates",
    "vocab_parallel_cross_entropy",
]
