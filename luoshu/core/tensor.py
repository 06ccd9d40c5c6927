"""`Tensor` (a value in a graph, eager or symbolic) and `IndexedSlices` (a sparse row gradient)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from luoshu.core import dtypes
from luoshu.core.errors import DTypeError, Error, GradientError, GraphError
from luoshu.core.shapes import numel


class TensorMeta(NamedTuple):
    """What `OpDef.infer` returns per output; `device=None` means the inputs' device."""

    shape: tuple
    dtype: str
    device: str | None = None


def normalize_device(device) -> str:
    if device is None:
        return "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return str(dev)


# Attribute of a storage-less ("meta") value standing in for data kept elsewhere between uses (a
# ZeRO-3 parameter, whose rank holds only a shard): the message a read of the value raises.
RELEASED = "_luoshu_released"


def released_error(t: Tensor) -> Error:
    """The error for reading `t`, whose value is storage-less (a meta tensor)."""
    message = getattr(t._value, RELEASED, None)
    return Error(message or f"{t!r} holds a storage-less (meta) value: there is no data to read")


class Tensor:
    """A value in a graph.

    Eager tensors hold their `torch.Tensor` in `_value`; symbolic tensors of a
    define-and-run graph hold only their meta. Leaves with a value (parameters,
    constants) belong to no graph and can be used in any graph and in eager mode.
    """

    __slots__ = (
        "shape",
        "dtype",
        "device",
        "name",
        "producer",
        "requires_grad",
        "ds",
        "graph",
        "grad",
        "kind",
        "_value",
        "__weakref__",
    )
    __array_priority__ = 1000  # NumPy defers `ndarray + Tensor` to Tensor.__radd__

    def __init__(self, shape, dtype, device="cpu", *, value=None, producer=None, graph=None,
                 requires_grad=False, name=None, kind=None):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = device
        self.name = name
        self.producer = producer
        self.requires_grad = requires_grad
        self.ds = []
        self.graph = graph
        self.grad = None
        self.kind = kind
        self._value = value

    # --- construction ---------------------------------------------------------------
    @classmethod
    def from_value(cls, value: torch.Tensor, *, requires_grad=False, name=None, kind="constant"):
        """A leaf tensor wrapping a torch value (detached: luoshu keeps its own tape)."""
        if value.requires_grad:
            value = value.detach()
        return cls(value.shape, dtypes.dtype_name(value.dtype), str(value.device), value=value,
                   requires_grad=requires_grad, name=name, kind=kind)

    # --- meta -----------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_leaf(self) -> bool:
        return self.producer is None

    @property
    def symbolic(self) -> bool:
        return self._value is None

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self):

        return numel(self.shape)

    def __len__(self) -> int:
        if not self.shape or self.shape[0] is None:
            raise TypeError(f"len() of tensor with shape {self.shape}")
        return self.shape[0]

    def __repr__(self) -> str:
        label = self.name or (self.producer[0].opdef.name if self.producer else self.kind or "tensor")
        if self._value is None:
            return f"Tensor({label}, shape={self.shape}, dtype={self.dtype}, symbolic)"
        return f"Tensor({self._value!r}, dtype={self.dtype}, requires_grad={self.requires_grad})"

    # --- values ---------------------------------------------------------------------
    @property
    def value(self) -> torch.Tensor:
        """The underlying torch tensor of an eager tensor (shared, not copied)."""
        if self._value is None:
            raise GraphError(
                f"{self!r} is symbolic (define-and-run); fetch it with graph.run([...], feed_dict)"
            )
        if self._value.is_meta:
            raise released_error(self)
        return self._value

    def torch(self) -> torch.Tensor:
        return self.value

    def numpy(self) -> np.ndarray:
        """A NumPy copy of the value (a copy, so later in-place updates do not show through)."""
        v = self.value
        if v.dtype == torch.bfloat16:
            v = v.float()
        return v.detach().cpu().numpy().copy()

    def item(self):
        return self.value.item()

    def tolist(self):
        return self.value.tolist()

    def __bool__(self) -> bool:
        if self._value is None:
            raise GraphError(f"the truth value of symbolic {self!r} is unknown until run time")
        return bool(self._value)

    def __float__(self) -> float:
        return float(self.value)

    def __int__(self) -> int:
        return int(self.value)

    def __array__(self, dtype=None, copy=None):
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)

    def __hash__(self) -> int:  # `==` builds an op (luoshu.ops installs it), so tensors hash by identity
        return id(self)

    # `backward()` and every method that builds an op (`+`, `.sum()`, `==`, ...) are installed by
    # luoshu.ops.tensor_methods: ops and autodiff are built on Tensor, so Tensor cannot import them.

    def detach(self) -> Tensor:
        return Tensor.from_value(self.value)

    def requires_grad_(self, flag: bool = True) -> Tensor:
        if self.producer is not None:
            raise GradientError("requires_grad_ can only be set on leaf tensors")
        if flag and not dtypes.is_floating(self.dtype):
            raise DTypeError(f"only floating tensors can require gradients, found {self.dtype}")
        self.requires_grad = flag
        return self


class IndexedSlices:
    """A sparse gradient of a table: `values[i]` belongs to row `indices[i]` (rows may repeat).

    The embedding gradient is one of these, never a dense table-sized tensor;
    optimizers update only the touched rows.
    """

    __slots__ = ("indices", "values", "dense_shape")

    def __init__(self, indices: Tensor, values: Tensor, dense_shape):
        self.indices = indices
        self.values = values
        self.dense_shape = tuple(dense_shape)

    @property
    def dtype(self) -> str:
        return self.values.dtype

    @property
    def device(self) -> str:
        return self.values.device

    @property
    def shape(self) -> tuple:
        return self.dense_shape

    def numpy(self) -> np.ndarray:
        return self.to_dense().numpy()

    def __repr__(self) -> str:
        return f"IndexedSlices(rows={self.indices.shape}, dense_shape={self.dense_shape}, dtype={self.dtype})"


def make_constant(data, dtype=None, device=None, requires_grad=False, name=None, kind="constant") -> Tensor:
    """A leaf tensor from NumPy arrays, torch tensors, Python numbers or nested lists."""
    if isinstance(data, Tensor):
        data = data.value
    if isinstance(data, torch.Tensor):
        value = data.detach()
    elif isinstance(data, np.ndarray):
        # np.ascontiguousarray turns 0-d arrays into shape (1,); np.require keeps the rank.
        data = np.require(data, requirements="C")
        if data.dtype == np.float64 and dtype is None:
            value = torch.from_numpy(data)
        else:
            value = torch.as_tensor(data)
    else:
        try:
            value = torch.as_tensor(data)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise Error(f"cannot make a tensor from {type(data).__name__}: {exc}") from exc
    if dtype is not None:
        value = value.to(dtypes.to_torch(dtype))
    if device is not None:
        value = value.to(normalize_device(device))
    if requires_grad and not dtypes.is_floating(dtypes.dtype_name(value.dtype)):
        raise DTypeError(f"only floating tensors can require gradients, found {value.dtype}")
    return Tensor.from_value(value, requires_grad=requires_grad, name=name, kind=kind)


def tensor(data, dtype=None, device=None, requires_grad: bool = False, name=None) -> Tensor:
    """An eager tensor (a leaf) from NumPy arrays, torch tensors, Python numbers or lists."""
    return make_constant(data, dtype=dtype, device=device, requires_grad=requires_grad, name=name)
