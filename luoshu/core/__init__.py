"""The IR: `Tensor`, `Op`, the `OpDef` registry, `Graph` (eager and define-and-run), dtypes, devices."""

from luoshu.core.autodiff import gradients
from luoshu.core.context import current_graph, enable_grad, is_grad_enabled, no_grad
from luoshu.core.dstates import DeviceGroup, DStates
from luoshu.core.errors import (
    CheckpointError,
    DeviceError,
    DTypeError,
    Error,
    ExecutionError,
    FeedError,
    GradientError,
    GraphError,
    OpError,
    ShapeError,
)
from luoshu.core.graph import Graph, IndexedSlicesValue, placeholder
from luoshu.core.op import Op, OpDef, apply, get_opdef, register, registered_ops
from luoshu.core.random import manual_seed
from luoshu.core.tensor import IndexedSlices, Tensor, TensorMeta, tensor

__all__ = [
    "CheckpointError", "DStates", "DTypeError", "DeviceError", "DeviceGroup", "Error",
    "ExecutionError", "FeedError", "GradientError", "Graph", "GraphError", "IndexedSlices",
    "IndexedSlicesValue", "Op", "OpDef", "OpError", "ShapeError", "Tensor", "TensorMeta",
    "apply", "current_graph", "enable_grad", "get_opdef", "gradients", "is_grad_enabled",
    "manual_seed", "no_grad", "placeholder", "register", "registered_ops", "tensor",
]
