"""`Graph`: the define-and-run mode (ops record, `run` compiles and executes) and placeholders."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import torch

from luoshu.core import context, dtypes
from luoshu.core.errors import Error, FeedError, GraphError, ShapeError
from luoshu.core.tensor import IndexedSlices, Tensor, normalize_device

# The runtime layer installs the function that compiles a fetch set into a runnable plan
# (core must not import the higher layers that build on it).
_plan_builder: Callable | None = None
# The backends `Graph.compile` takes (`luoshu.compiler.inductor`); "eager" and "aot_eager" only
# trace, for debugging a lowering.
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def set_plan_builder(builder: Callable) -> None:
    global _plan_builder
    _plan_builder = builder


class IndexedSlicesValue(NamedTuple):
    """A fetched `IndexedSlices`: NumPy indices and values plus the dense shape."""

    indices: np.ndarray
    values: np.ndarray
    dense_shape: tuple

    def to_dense(self) -> np.ndarray:
        dense = np.zeros(self.dense_shape, dtype=self.values.dtype)
        np.add.at(dense, self.indices, self.values)
        return dense


class RecomputeRegion:
    """Ops recorded by one call of a recomputed module, and the tensors it returned (kept:
    the next layer reads them anyway). The recompute pass sets `applied` once it rewrote the
    region and lists in `copies` the ops it recorded to recompute it."""

    __slots__ = ("ops", "outputs", "applied", "copies")

    def __init__(self, ops: list, outputs: list):
        self.ops, self.outputs, self.applied, self.copies = ops, outputs, False, []


_graph_ids = itertools.count()


class Graph:
    """A define-and-run graph.

    Inside `with Graph() as g:` ops only record; `g.run(fetches, feed_dict)` compiles
    the ops the fetches need into a flat plan once per (fetch set, fed placeholders),
    caches it, and runs it: NumPy in, NumPy out.
    """

    def __init__(self, name: str | None = None):
        self.name = name or f"graph{next(_graph_ids)}"
        self.ops: list = []
        self.placeholders: dict[str, Tensor] = {}
        self._plans: dict = {}
        self._compile_options: dict = {}  # fetch ids -> Graph.compile's options
        # The parallel strategy the next plans compile under (HotSPa runs one graph under several):
        # part of the plan-cache key, so each (strategy, fetches, feeds) keeps its own plan.
        self.strategy_key = None
        # Regions whose intermediate activations are recomputed in the backward instead of
        # kept (`luoshu.nn.recompute` records them; `luoshu.compiler.recompute` rewrites them).
        self.recompute_regions: list[RecomputeRegion] = []
        # id(gradient tensor) -> (it, the tensors it is the gradient of), recorded by autodiff: the
        # states pass reduce-scatters a partial gradient into its tensor's sequence split
        self.gradient_of: dict[int, tuple[Tensor, list[Tensor]]] = {}

    def __enter__(self) -> Graph:
        context.push_graph(self)
        return self

    def __exit__(self, *exc) -> None:
        context.pop_graph(self)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, ops={len(self.ops)}, placeholders={list(self.placeholders)})"

    # --- building -------------------------------------------------------------------
    def placeholder(self, name: str, shape, dtype="float32", device="cpu") -> Tensor:
        if name in self.placeholders:
            raise GraphError(f"graph '{self.name}' already has a placeholder named {name!r}")
        if not isinstance(name, str) or not name:
            raise GraphError(f"a placeholder's name must be a non-empty string, found {name!r}")
        try:
            dims = tuple(shape)
        except TypeError:
            raise ShapeError(f"placeholder {name!r}: shape must be a sequence of sizes, found {shape!r}") from None
        for d in dims:  # None (or -1) marks a dimension fed at run time; anything else is a size >= 0
            if not (d is None or (isinstance(d, int | np.integer) and not isinstance(d, bool) and d >= -1)):
                raise ShapeError(f"placeholder {name!r}: each dimension must be a size >= 0, or None (or -1) for one "
                                 f"known only at run time; found {d!r} in shape {shape!r}")
        shape = tuple(None if d is None or d == -1 else int(d) for d in dims)
        t = Tensor(shape, dtypes.dtype_name(dtype), normalize_device(device), graph=self,
                   name=name, kind="placeholder")
        self.placeholders[name] = t
        return t

    # --- running --------------------------------------------------------------------
    def _plan_for(self, flat: list, feeds: dict):
        key = (tuple(map(id, flat)), frozenset(feeds), self.strategy_key)
        plan = self._plans.get(key)
        if plan is None:
            if _plan_builder is None:
                raise Error("the luoshu runtime is not loaded; import luoshu, not luoshu.core")
            plan = _plan_builder(self, flat, feeds)
            options = self._compile_options.get(key[0])
            if options is not None:
                plan.compile(**options)
            self._plans[key] = plan
        return plan

    def compile(self, fetches, backend: str = "inductor", cuda_graphs: bool | None = None) -> None:
        """Runs `fetches` (a full training step: forward, backward and the update) as one
        compiled graph from now on: `run(fetches, ...)` lowers the plan to one torch.fx graph
        and compiles it with `backend` (TorchInductor). Where a step cannot be lowered, a
        `LoweringWarning` names the op and the plan runs it. `cuda_graphs` (None: where the
        parameters are on CUDA and the feed shapes static) captures the step as a CUDA graph."""
        if backend not in COMPILE_BACKENDS:
            raise GraphError(f"graph '{self.name}': unknown compile backend {backend!r}; expected one of "
                             f"{list(COMPILE_BACKENDS)}")
        flat, _ = self._flatten_fetches([fetches] if not isinstance(fetches, (list, tuple)) else list(fetches))
        key = tuple(map(id, flat))
        self._compile_options[key] = {"backend": backend, "cuda_graphs": cuda_graphs}
        for plan_key, plan in self._plans.items():
            if plan_key[0] == key:
                plan.compile(backend=backend, cuda_graphs=cuda_graphs)

    def plan(self, fetches, feed_dict: Mapping | None = None):
        """The compiled plan `run(fetches, feed_dict)` executes (compiled and cached on first use)."""
        flat, _ = self._flatten_fetches([fetches] if not isinstance(fetches, (list, tuple)) else list(fetches))
        return self._plan_for(flat, self._check_feeds(feed_dict or {}))

    def memory(self, fetches, feed_dict: Mapping | None = None):
        """Runs `fetches` once like `run` and returns the plan's memory report: peak live bytes,
        the step that reaches it, and parameters / optimizer state / gradients / activations;
        `report.outputs` holds the fetched values (NumPy, as `run` returns them)."""
        flat, _ = self._flatten_fetches([fetches] if not isinstance(fetches, (list, tuple)) else list(fetches))
        feeds = self._check_feeds(feed_dict or {})
        plan = self._plan_for(flat, feeds)
        report = plan.memory([feeds[id(p)] for p in plan.feed_tensors])
        report.outputs = [_to_numpy(v, t) for v, t in zip(report.outputs, flat)]
        return report

    def run(self, fetches, feed_dict: Mapping | None = None):
        """Computes `fetches` (a tensor or a list of them) given `feed_dict`."""
        single = not isinstance(fetches, (list, tuple))
        fetch_list = [fetches] if single else list(fetches)
        flat, structure = self._flatten_fetches(fetch_list)
        feeds = self._check_feeds(feed_dict or {})
        plan = self._plan_for(flat, feeds)
        values = plan.run([feeds[id(p)] for p in plan.feed_tensors])
        results = [_to_numpy(v, t) for v, t in zip(values, flat)]
        out = []
        for kind, n in structure:
            if kind == "slices":
                indices, vals = results[:2]
                out.append(IndexedSlicesValue(indices, vals, n))
                results = results[2:]
            else:
                out.append(results[0])
                results = results[1:]
        return out[0] if single else out

    def _flatten_fetches(self, fetch_list):
        flat, structure = [], []
        for f in fetch_list:
            if isinstance(f, IndexedSlices):
                flat += [f.indices, f.values]
                structure.append(("slices", f.dense_shape))
                continue
            if not isinstance(f, Tensor):
                raise GraphError(f"graph '{self.name}' can fetch tensors only, found {type(f).__name__}")
            if f.graph is not None and f.graph is not self:
                raise GraphError(f"fetch {f!r} belongs to graph '{f.graph.name}', not '{self.name}'")
            flat.append(f)
            structure.append(("tensor", None))
        return flat, structure

    def _check_feeds(self, feed_dict: Mapping) -> dict[int, torch.Tensor]:
        feeds: dict[int, torch.Tensor] = {}
        for key, value in feed_dict.items():
            ph = self.placeholders.get(key) if isinstance(key, str) else key
            if not isinstance(ph, Tensor) or ph.kind != "placeholder" or ph.graph is not self:
                raise FeedError(f"graph '{self.name}' can feed only its placeholders, found {key!r}; "
                                f"its placeholders are {sorted(self.placeholders)}")
            feeds[id(ph)] = _convert_feed(ph, value)
        return feeds


_NUMPY_DTYPES = {name: dtypes.to_numpy(name) for name in dtypes.FLOATING | dtypes.INTEGER | {"bool"}}


def _check_feed_shape(ph: Tensor, shape: tuple) -> None:
    if len(shape) != len(ph.shape) or any(d is not None and d != s for d, s in zip(ph.shape, shape)):
        expected = ", ".join("None" if d is None else str(d) for d in ph.shape)
        expected = f"({expected}{',' if len(ph.shape) == 1 else ''})"
        raise FeedError(f"placeholder {ph.name!r} expects shape {expected}, found {shape}")


def _convert_feed(ph: Tensor, value) -> torch.Tensor:
    """Checks a fed value against its placeholder and converts it without copying if it can."""
    target = _NUMPY_DTYPES[ph.dtype]
    if type(value) is np.ndarray and value.dtype == target and ph.device == "cpu" and ph.dtype != "bfloat16":
        _check_feed_shape(ph, value.shape)  # the common case: the right array, zero-copy
        if not value.flags.writeable or not value.flags.c_contiguous:
            value = np.ascontiguousarray(value).copy()
        return torch.from_numpy(value)
    if isinstance(value, Tensor):
        value = value.value
    if isinstance(value, torch.Tensor):
        source = dtypes.dtype_name(value.dtype)
        np_source = dtypes.to_numpy(source)
    else:
        if not isinstance(value, np.ndarray):
            value = np.asarray(value, dtype=target)
        np_source = value.dtype
        source = str(value.dtype)
    if not (np.can_cast(np_source, target, "same_kind") or (source == "bool" and ph.dtype != "bool")):
        raise FeedError(f"placeholder {ph.name!r} expects dtype {ph.dtype}, found {source}")
    _check_feed_shape(ph, tuple(value.shape))
    if isinstance(value, np.ndarray):
        if not value.flags.writeable or not value.flags.c_contiguous:
            value = np.ascontiguousarray(value).copy()
        value = torch.from_numpy(value)
    want = dtypes.to_torch(ph.dtype)
    if value.dtype != want or str(value.device) != ph.device:
        value = value.to(device=ph.device, dtype=want)
    return value


def _to_numpy(value, tensor: Tensor):
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        return value
    if value.dtype == torch.bfloat16:
        value = value.float()
    arr = value.detach().cpu().numpy()
    # Leaves (parameters) and views of them change in place on the next update: copy those.
    if tensor.producer is None or value._base is not None:
        arr = arr.copy()
    return arr


def placeholder(name: str, shape, dtype="float32", device="cpu") -> Tensor:
    """A value fed at run time; `None` in `shape` marks a dimension known only then."""
    graph = context.current_graph()
    if graph is None:
        raise GraphError(f"placeholder {name!r} needs a define-and-run graph: build it inside "
                         "`with luoshu.Graph() as g:`")
    return graph.placeholder(name, shape, dtype, device)
