"""`Module` and `Parameter`: stateful building blocks that work in eager and define-and-run."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

from luoshu.core import context, dtypes
from luoshu.core.errors import CheckpointError, Error
from luoshu.core.graph import RecomputeRegion
from luoshu.core.tensor import Tensor, make_constant, normalize_device


class Parameter(Tensor):
    """A trainable leaf tensor owned by a module (a variable of the graph)."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True, name: str | None = None):
        value = make_constant(data).value
        if requires_grad and not value.is_floating_point():
            raise Error(f"a trainable Parameter must be floating point, found {value.dtype}")
        super().__init__(value.shape, dtypes.dtype_name(value.dtype), str(value.device), value=value,
                         requires_grad=requires_grad, name=name, kind="variable")

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def _buffer(data) -> Tensor:
    t = make_constant(data)
    t.kind = "buffer"
    return t


class Module:
    """Base class of layers and models.

    Assigning a `Parameter` or a `Module` to an attribute registers it; buffers
    (non-trainable state such as running statistics) are registered with
    `register_buffer`. Calling the module runs `forward`, which builds ops in the
    current mode: eager values, or symbolic ops inside `with luoshu.Graph():`.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # --- registration ---------------------------------------------------------------
    def __setattr__(self, name: str, value) -> None:
        if "_parameters" not in self.__dict__:
            raise Error(f"{type(self).__name__}.__init__ must call super().__init__() before assigning {name!r}")
        for store in (self._parameters, self._buffers, self._modules):
            store.pop(name, None)
        if isinstance(value, Parameter):
            value.name = value.name or name
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        elif name in self.__dict__.get("_buffer_names", ()):
            self._buffers[name] = value if value is None or isinstance(value, Tensor) else _buffer(value)
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str):
        for store in ("_parameters", "_buffers", "_modules"):
            d = self.__dict__.get(store)
            if d is not None and name in d:
                return d[name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        for store in (self._parameters, self._buffers, self._modules):
            if name in store:
                del store[name]
                return
        object.__delattr__(self, name)

    def register_buffer(self, name: str, value) -> None:
        names = self.__dict__.setdefault("_buffer_names", set())
        names.add(name)
        self._buffers[name] = None if value is None else (value if isinstance(value, Tensor) else _buffer(value))
        self.__dict__.pop(name, None)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        if param is None:
            self._parameters.pop(name, None)
            object.__setattr__(self, name, None)
        else:
            setattr(self, name, param)

    def add_module(self, name: str, module: Module) -> None:
        setattr(self, name, module)

    # --- traversal ------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self._modules.items():
            if child is not None:
                yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_children(self) -> Iterator[tuple[str, Module]]:
        yield from ((n, m) for n, m in self._modules.items() if m is not None)

    def children(self) -> Iterator[Module]:
        for _, m in self.named_children():
            yield m

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Parameter]]:
        seen = set()
        modules = self.named_modules(prefix) if recurse else [(prefix, self)]
        for mod_prefix, module in modules:
            for name, p in module._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{mod_prefix}.{name}" if mod_prefix else name), p

    def parameters(self, recurse: bool = True) -> list[Parameter]:
        return [p for _, p in self.named_parameters(recurse=recurse)]

    def named_buffers(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Tensor]]:
        modules = self.named_modules(prefix) if recurse else [(prefix, self)]
        for mod_prefix, module in modules:
            for name, b in module._buffers.items():
                if b is not None:
                    yield (f"{mod_prefix}.{name}" if mod_prefix else name), b

    def buffers(self, recurse: bool = True) -> list[Tensor]:
        return [b for _, b in self.named_buffers(recurse=recurse)]

    # --- state ----------------------------------------------------------------------
    def state_dict(self) -> OrderedDict[str, Tensor]:
        """Parameters and buffers by dotted name (the tensors themselves, not copies)."""
        state = OrderedDict(self.named_parameters())
        state.update(self.named_buffers())
        return state

    def load_state_dict(self, state_dict, strict: bool = True) -> None:
        """Copies values in place; checks every name, shape and dtype before changing anything."""
        self._apply_staged(self._stage_state_dict(state_dict, strict))

    def _stage_state_dict(self, state_dict, strict: bool = True) -> list:
        """Validates a state dict against this module; returns the (target, source) copies to make."""
        own = self.state_dict()
        staged = []
        for name, value in state_dict.items():
            if name not in own:
                if strict:
                    raise CheckpointError(f"load_state_dict: unexpected key {name!r} for {type(self).__name__}")
                continue
            target = own[name]
            source = _to_torch(value)
            if tuple(source.shape) != target.shape:
                raise CheckpointError(f"load_state_dict: {name!r} expects shape {target.shape}, "
                                      f"found {tuple(source.shape)}")
            if dtypes.dtype_name(source.dtype) != target.dtype and not (
                dtypes.is_floating(target.dtype) and source.is_floating_point()
            ):
                raise CheckpointError(f"load_state_dict: {name!r} expects dtype {target.dtype}, "
                                      f"found {dtypes.dtype_name(source.dtype)}")
            staged.append((target, source))
        if strict:
            missing = sorted(set(own) - set(state_dict))
            if missing:
                raise CheckpointError(f"load_state_dict: missing keys {missing} for {type(self).__name__}")
        return staged

    @staticmethod
    def _apply_staged(staged: list) -> None:
        with torch.no_grad():
            for target, source in staged:
                target.value.copy_(source)

    # --- modes and placement --------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to(self, device=None, dtype=None) -> Module:
        """Moves (and for floating tensors casts) every parameter and buffer in place."""
        device = normalize_device(device) if device is not None else None
        dtype = dtypes.dtype_name(dtype) if dtype is not None else None
        for t in self.parameters() + self.buffers():
            target = dtype if dtype is not None and dtypes.is_floating(t.dtype) else t.dtype
            value = t.value.to(device=device or t.device, dtype=dtypes.to_torch(target))
            t._value, t.device, t.dtype = value, str(value.device), target
        return self

    # --- calling --------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        graph = context.current_graph() if self.__dict__.get("_recompute") else None
        if graph is None:
            return self.forward(*args, **kwargs)
        start = len(graph.ops)  # `luoshu.nn.recompute`: what this call records is one region
        out = self.forward(*args, **kwargs)
        outputs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, Tensor)]
        graph.recompute_regions.append(RecomputeRegion(graph.ops[start:], outputs))
        return out

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"({name}): {child!r}".replace("\n", "\n  ") for name, child in self._modules.items()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


def _to_torch(value) -> torch.Tensor:
    if isinstance(value, Tensor):
        return value.value
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise CheckpointError(f"load_state_dict: cannot load a {type(value).__name__}")
