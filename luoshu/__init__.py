"""luoshu: a distributed deep-learning system — dataflow graphs or eager, one operator library."""

from luoshu import (  # noqa: F401
    dist,  # noqa: F401  (the former luoshu.distributed + luoshu.parallel; its names warn)
    distributed,
    nn,
    ops,  # noqa: F401  (registers every operator and the Tensor methods)
    optim,
    parallel,
    ps,  # noqa: F401  (installs the server role of luoshu.distributed)
    runtime,  # noqa: F401  (installs the plan builder behind Graph.run)
)
from luoshu.amp import autocast
from luoshu.checkpoint import load, save
from luoshu.core import (
    CheckpointError,
    DeviceError,
    DeviceGroup,
    DStates,
    DTypeError,
    Error,
    ExecutionError,
    FeedError,
    GradientError,
    Graph,
    GraphError,
    IndexedSlices,
    IndexedSlicesValue,
    OpError,
    ShapeError,
    Tensor,
    enable_grad,
    gradients,
    manual_seed,
    no_grad,
    placeholder,
    tensor,
)

__version__ = "0.1.0"

_LAZY = ("onnx", "serving")  # the deployment layer, imported on first use: it sits above everything here


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"luoshu.{name}")
    raise AttributeError(f"module 'luoshu' has no attribute {name!r}")

__all__ = [
    "CheckpointError", "DStates", "DTypeError", "DeviceError", "DeviceGroup", "Error", "ExecutionError",
    "FeedError", "GradientError", "Graph", "GraphError", "IndexedSlices", "IndexedSlicesValue", "OpError",
    "ShapeError", "Tensor", "autocast", "distributed", "enable_grad", "gradients", "load", "manual_seed", "nn",
    "no_grad", "ops", "optim", "parallel", "placeholder", "ps", "save", "tensor",
]
