"""The model package for inference: a traced IR graph plus its weights, run without the model's class.

`export(path, model, example_inputs)` traces `model` (a `luoshu.nn.Module`, in eval mode) in
define-and-run mode on placeholders whose batch dimension is dynamic, and writes the package of
DESIGN.md §6 through `luoshu.checkpoint.write_package`:

  graph.json            format / format_version, name, version, and "graph": the inputs and
                        outputs (name, dtype, shape with -1 for the batch), every value's meta,
                        and the ops in execution order (op name, attrs, input and output values)
  weights.safetensors   every leaf the graph reads (parameters and buffers by their state-dict
                        names, constants built inside `forward` as `const.N`)
  shard-K.safetensors   leaves over `max_shard_bytes` (large embedding tables), split by rows
  manifest.json         SHA-256 and size of every file above

`load(path)` verifies the manifest (hashes, sizes, format version), reads only files the manifest
lists, rebuilds the graph op by op through the `OpDef` registry (each op's shape rule re-runs and
must reproduce the recorded metas) and returns an `InferenceModel`, which runs the graph with the
ordinary plan executor. Nothing of the model's Python class is needed, and nothing is unpickled.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from luoshu import checkpoint
from luoshu.core import context, dtypes
from luoshu.core.errors import CheckpointError, Error, FeedError, OpError
from luoshu.core.graph import Graph
from luoshu.core.op import apply, get_opdef, topological_ops
from luoshu.core.tensor import Tensor

GRAPH_KIND = "inference"
GRAPH_VERSION = 1  # of the "graph" section; the package itself carries checkpoint.FORMAT_VERSION
DEFAULT_SHARD_BYTES = 1 << 30


class PackageError(CheckpointError):
    """A model package that is missing, corrupt, truncated, or does not describe a runnable graph."""


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of a packaged model; `-1` marks a dynamic dimension (the batch, dim 0)."""

    name: str
    dtype: str  # NumPy dtype name: "float32", "int64", ...
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


# --- attribute encoding ---------------------------------------------------------------------
# Op attributes are plain values; JSON lacks tuples and non-finite floats, so those are tagged
# and everything else is written as it is.
def _encode_attr(value, where: str):
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (tuple, list)):
        items = [_encode_attr(v, where) for v in value]
        return {"tuple": items} if isinstance(value, tuple) else items
    if isinstance(value, np.generic):
        return _encode_attr(value.item(), where)
    raise PackageError(
        f"{where}: attribute value {value!r} of type {type(value).__name__} cannot be written "
        "to graph.json (expected None, bool, int, float, str, or tuples/lists of them)"
    )


def _decode_attr(value, where: str):
    if isinstance(value, list):
        return [_decode_attr(v, where) for v in value]
    if isinstance(value, dict):
        if set(value) == {"tuple"} and isinstance(value["tuple"], list):
            return tuple(_decode_attr(v, where) for v in value["tuple"])
        if set(value) == {"float"} and value["float"] in ("inf", "-inf", "nan"):
            return float(value["float"])
        raise PackageError(f"{where}: unknown tagged attribute value {value!r}")
    return value


def _shape_json(shape) -> list[int]:
    return [-1 if d is None else int(d) for d in shape]


# --- tracing --------------------------------------------------------------------------------
def _example_arrays(model, example_inputs, input_names) -> tuple[list[str], list[np.ndarray]]:
    if isinstance(example_inputs, Mapping):
        names, values = list(example_inputs), list(example_inputs.values())
        if input_names is not None and list(input_names) != names:
            raise Error(f"export: input_names {list(input_names)} differ from the example_inputs keys {names}")
    else:
        values = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
        if input_names is not None:
            names = list(input_names)
        else:
            params = [
                p
                for p in inspect.signature(model.forward).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            names = [p.name for p in params[: len(values)]]
            names += [f"input{i}" for i in range(len(names), len(values))]
        if len(names) != len(values):
            raise Error(f"export: {len(names)} input_names for {len(values)} example inputs")
    arrays = []
    for name, v in zip(names, values):
        arr = v.numpy() if isinstance(v, Tensor) else np.asarray(v)
        if arr.ndim < 1:
            raise Error(f"export: example input {name!r} must have a batch dimension, found a scalar")
        dtypes.dtype_name(arr.dtype)  # refuses dtypes luoshu has no name for
        arrays.append(arr)
    if len(set(names)) != len(names):
        raise Error(f"export: input names must be unique, found {names}")
    return names, arrays


def _flatten_outputs(out) -> list:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten_outputs(o)]
    raise Error(f"export: the model must return tensors (or tuples of them), found {type(out).__name__}")


def trace(model, example_inputs, *, input_names=None, output_names=None, dynamic_batch: bool = True) -> InferenceModel:
    """Traces `model` on placeholders shaped like `example_inputs` (dim 0 dynamic unless
    `dynamic_batch=False`) into an in-memory `InferenceModel` sharing the model's weights."""
    from luoshu.nn.module import Module

    if not isinstance(model, Module):
        raise Error(f"export: expected a luoshu.nn.Module, found {type(model).__name__}")
    names, arrays = _example_arrays(model, example_inputs, input_names)
    was_training = [(m, m.training) for m in model.modules()]
    model.eval()
    graph = Graph("inference")
    try:
        with graph, context.no_grad():
            placeholders = [
                graph.placeholder(
                    n, ((None,) if dynamic_batch else (a.shape[0],)) + a.shape[1:], dtypes.dtype_name(a.dtype)
                )
                for n, a in zip(names, arrays)
            ]
            outputs = _flatten_outputs(model(*placeholders))
    finally:
        for m, flag in was_training:
            object.__setattr__(m, "training", flag)
    weight_names = {id(t): n for n, t in model.state_dict().items()}
    return from_graph(graph, placeholders, outputs, output_names, weight_names, name=type(model).__name__.lower())


def from_graph(
    graph: Graph,
    inputs: list[Tensor],
    outputs: list[Tensor],
    output_names=None,
    weight_names: Mapping[int, str] | None = None,
    *,
    name: str,
    version: int | str = 1,
    metadata: dict | None = None,
) -> InferenceModel:
    """An `InferenceModel` over `outputs` of a define-and-run `graph` fed by the placeholders
    `inputs`; every leaf the outputs read becomes a weight, named by `weight_names` (tensor id ->
    name), else `const.<its name>` or `const.N`."""
    names = [t.name for t in inputs]
    if output_names is None:
        output_names = ["output"] if len(outputs) == 1 else [f"output{i}" for i in range(len(outputs))]
    output_names = list(output_names)
    if len(output_names) != len(outputs) or len(set(output_names)) != len(output_names):
        raise Error(
            f"export: {len(output_names)} output_names {output_names} for the model's {len(outputs)} "
            "outputs (they must be unique)"
        )
    if set(output_names) & set(names):
        raise Error(f"export: output names {output_names} clash with input names {names}")
    weight_names = weight_names or {}
    fed = {id(t) for t in inputs}
    ops = topological_ops(outputs, graph)
    leaves: dict[int, Tensor] = {}
    for t in [t for op in ops for t in op.inputs] + list(outputs):
        if id(t) in fed or id(t) in leaves or (t.producer is not None and t.graph is graph):
            continue
        if t.kind == "placeholder":
            raise Error(f"export: the outputs depend on placeholder {t.name!r}, which is not one of the inputs {names}")
        leaves[id(t)] = t
    keys: dict[int, str] = {}
    for i, (tid, t) in enumerate(leaves.items()):
        key = weight_names.get(tid) or (f"const.{t.name}" if t.name else f"const.{i}")
        keys[tid] = key if key not in keys.values() else f"const.{i}"
    if len(set(keys.values())) != len(keys):
        raise Error("export: two weights share one name")
    weights = {keys[tid]: t for tid, t in leaves.items()}
    return InferenceModel(
        graph, inputs, outputs, output_names, weights, name=name, version=str(version), metadata=metadata
    )


# --- the model --------------------------------------------------------------------------------
class InferenceModel:
    """A packaged (or traced) model: `model({input name: array})` -> {output name: array}.

    Feeds are checked before anything runs: every input present and no other, the exact dtype,
    the rank and every static dimension, one batch size for all inputs; a mismatch raises a
    `FeedError` naming the input, what was expected and what was found.
    """

    def __init__(
        self,
        graph: Graph,
        inputs: list[Tensor],
        outputs: list[Tensor],
        output_names: list[str],
        weights: dict[str, Tensor],
        *,
        name: str,
        version: str,
        metadata: dict | None = None,
    ):
        self.graph = graph
        self.input_tensors = list(inputs)
        self.output_tensors = list(outputs)
        self.weights = dict(weights)  # weight name -> leaf tensor the graph reads
        self.name = name
        self.version = str(version)
        self.metadata = dict(metadata or {})
        self.inputs = [
            TensorSpec(t.name, dtypes.to_numpy(t.dtype).name, tuple(_shape_json(t.shape))) for t in self.input_tensors
        ]
        self.outputs = [
            TensorSpec(n, dtypes.to_numpy(t.dtype).name, tuple(_shape_json(t.shape)))
            for n, t in zip(output_names, self.output_tensors)
        ]
        self._input_names = {s.name for s in self.inputs}

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in self.inputs)
        outs = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in self.outputs)
        return f"InferenceModel({self.name!r}, version {self.version!r}, inputs ({ins}), outputs ({outs}))"

    @property
    def ops(self) -> list:
        """The IR ops the outputs depend on, in execution order."""
        return topological_ops(self.output_tensors, self.graph)

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feeds as NumPy arrays after every check (see the class docstring)."""
        if not isinstance(feeds, Mapping):
            raise FeedError(
                f"model {self.name!r}: feeds must be a mapping of input name to array, found {type(feeds).__name__}"
            )
        missing = [s.name for s in self.inputs if s.name not in feeds]
        extra = sorted(str(k) for k in feeds if k not in self._input_names)
        if missing or extra:
            raise FeedError(
                f"model {self.name!r}: expected inputs {[s.name for s in self.inputs]}, found "
                f"{sorted(map(str, feeds))}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {extra}" if extra else "")
            )
        out, batch = {}, None
        for spec in self.inputs:
            value = feeds[spec.name]
            arr = value if isinstance(value, np.ndarray) else np.asarray(value)
            if arr.dtype.name != spec.dtype:
                raise FeedError(
                    f"model {self.name!r} input {spec.name!r}: expected dtype {spec.dtype}, found {arr.dtype.name}"
                )
            if arr.ndim != len(spec.shape) or any(d != -1 and d != s for d, s in zip(spec.shape, arr.shape)):
                raise FeedError(
                    f"model {self.name!r} input {spec.name!r}: expected shape {list(spec.shape)} "
                    f"(-1 = any size), found {list(arr.shape)}"
                )
            if spec.shape and spec.shape[0] == -1:
                if batch is not None and arr.shape[0] != batch[1]:
                    raise FeedError(
                        f"model {self.name!r} input {spec.name!r}: batch size {arr.shape[0]} differs "
                        f"from the batch size {batch[1]} of input {batch[0]!r}"
                    )
                batch = batch or (spec.name, arr.shape[0])
            out[spec.name] = arr
        return out

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = self.check_feeds(feeds)
        values = self.graph.run(self.output_tensors, {t.name: checked[t.name] for t in self.input_tensors})
        return {spec.name: np.asarray(v) for spec, v in zip(self.outputs, values)}

    # --- graph.json ---------------------------------------------------------------------
    def graph_json(self, weight_files: Mapping[str, list] | None = None) -> dict:
        """The "graph" section of graph.json (see the module docstring)."""
        ids: dict[int, int] = {}
        values: list[dict] = []

        def value_id(t: Tensor) -> int:
            if id(t) not in ids:
                ids[id(t)] = len(values)
                values.append({"dtype": t.dtype, "shape": _shape_json(t.shape)})
            return ids[id(t)]

        for t in self.input_tensors:
            values_entry = value_id(t)
            values[values_entry]["input"] = t.name
        weight_of = {id(t): key for key, t in self.weights.items()}
        ops_json = []
        for index, op in enumerate(self.ops):
            for t in op.inputs:
                new = id(t) not in ids
                i = value_id(t)
                if new:
                    if id(t) not in weight_of:
                        raise PackageError(
                            f"op {index} ({op.opdef.name}) reads a tensor that is neither an input, "
                            "a weight nor the output of an earlier op"
                        )
                    values[i]["weight"] = weight_of[id(t)]
            ins = [ids[id(t)] for t in op.inputs]
            outs = [value_id(t) for t in op.outputs]
            where = f"op {index} ({op.opdef.name})"
            ops_json.append(
                {
                    "op": op.opdef.name,
                    "inputs": ins,
                    "outputs": outs,
                    "attrs": {k: _encode_attr(v, where) for k, v in op.attrs.items()},
                }
            )
        for t in self.output_tensors:
            if id(t) not in ids:
                i = value_id(t)
                values[i]["weight"] = weight_of[id(t)]
        return {
            "kind": GRAPH_KIND,
            "version": GRAPH_VERSION,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [{**s.to_json(), "value": ids[id(t)]} for s, t in zip(self.outputs, self.output_tensors)],
            "values": values,
            "ops": ops_json,
            "weights": {
                key: {
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "files": (weight_files or {}).get(key, ["weights.safetensors"]),
                }
                for key, t in self.weights.items()
            },
        }


# --- writing ----------------------------------------------------------------------------------
def _disk(t: Tensor) -> torch.Tensor:
    return t.value.detach().cpu().contiguous().clone()


def save(
    path, model: InferenceModel, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict | None = None
) -> Path:
    """Writes an `InferenceModel` as a package directory at `path`."""
    if max_shard_bytes < 1:
        raise Error(f"export: max_shard_bytes must be positive, found {max_shard_bytes}")
    small, sharded, files = {}, {}, {}
    for key, t in model.weights.items():
        nbytes = t.value.numel() * t.value.element_size()
        if nbytes > max_shard_bytes and t.ndim >= 1 and t.shape[0] > 1:
            sharded[key] = t
        else:
            small[key] = t
            files[key] = ["weights.safetensors"]
    shard_plan = []  # (file name, key, row start, row stop)
    for n, (key, t) in enumerate(sharded.items()):
        row_bytes = max(1, t.value[0].numel() * t.value.element_size())
        rows = max(1, max_shard_bytes // row_bytes)
        files[key] = []
        for k, start in enumerate(range(0, t.shape[0], rows)):
            name = f"shard-{n:03d}-{k:04d}.safetensors"
            shard_plan.append((name, key, start, min(start + rows, t.shape[0])))
            files[key].append(name)
    graph_section = model.graph_json(files)

    def write(staging: Path) -> None:
        save_file({k: _disk(t) for k, t in small.items()}, staging / "weights.safetensors")
        for name, key, start, stop in shard_plan:
            save_file({key: sharded[key].value[start:stop].detach().cpu().contiguous().clone()}, staging / name)
        checkpoint._write_json(
            staging / "graph.json",
            {
                "format": checkpoint.FORMAT,
                "format_version": checkpoint.FORMAT_VERSION,
                "name": model.name,
                "version": model.version,
                "graph": graph_section,
                "metadata": {**model.metadata, **(metadata or {})},
            },
        )

    return checkpoint.write_package(path, write)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def export(
    path,
    model,
    example_inputs,
    *,
    name: str | None = None,
    version: int | str = 1,
    input_names=None,
    output_names=None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: dict | None = None,
) -> Path:
    """Traces `model` on `example_inputs` (an array, a tuple of arrays in `forward`'s order, or
    {input name: array}) with a dynamic batch and writes the package at `path`; returns the path.
    Input names default to `forward`'s parameter names, outputs to "output" (or output0, output1...).
    Weights over `max_shard_bytes` go to row shards of their own."""
    traced = trace(model, example_inputs, input_names=input_names, output_names=output_names)
    traced.name = name or type(model).__name__.lower()
    traced.version = str(version)
    for what, value in (("name", traced.name), ("version", traced.version)):
        if not _NAME.match(value):
            raise Error(
                f"export: {what} must be letters, digits, '_', '.' or '-' (a URL path segment), found {value!r}"
            )
    return save(path, traced, max_shard_bytes=max_shard_bytes, metadata=metadata)


# --- loading ----------------------------------------------------------------------------------
def _field(doc: dict, key: str, kind, where: str):
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, kind):
        raise PackageError(
            f"{where}: expected {key!r} of type {getattr(kind, '__name__', kind)}, found {type(value).__name__}"
        )
    return value


def _spec_shape(shape, where: str) -> tuple:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape
    ):
        raise PackageError(f"{where}: a shape must be a list of ints (-1 = dynamic), found {shape!r}")
    return tuple(None if d == -1 else d for d in shape)


def _read_weights(path: Path, manifest_files: set[str], spec: dict) -> dict[str, torch.Tensor]:
    needed: dict[str, list[str]] = {}
    for key, entry in spec.items():
        files = _field(entry, "files", list, f"{path / 'graph.json'} weight {key!r}")
        for f in files:
            if f not in manifest_files:
                raise PackageError(
                    f"{path / 'graph.json'}: weight {key!r} is stored in {f!r}, which the manifest does not list"
                )
            needed.setdefault(f, [])
    loaded = {f: checkpoint.load_tensors(path / f) for f in needed}
    out = {}
    for key, entry in spec.items():
        where = f"{path} weight {key!r}"
        parts = []
        for f in entry["files"]:
            if key not in loaded[f]:
                raise PackageError(f"{where}: missing from {f}")
            parts.append(loaded[f][key])
        value = parts[0] if len(parts) == 1 else torch.cat(parts)
        shape = [int(d) for d in _field(entry, "shape", list, where)]
        dtype = _field(entry, "dtype", str, where)
        found_dtype = dtypes.dtype_name(value.dtype)
        if list(value.shape) != shape or found_dtype != dtype:
            raise PackageError(
                f"{where}: graph.json expects {dtype} {shape}, the weights file holds {found_dtype} {list(value.shape)}"
            )
        out[key] = value
    return out


def weight_rows(path, key: str) -> Iterator[tuple[int, np.ndarray]]:
    """The rows of one weight of a package, shard by shard: `(first row, rows)` pairs in row order.

    For tables too large to hold twice (an embedding store filling its tiers): the package is
    verified first, then only this weight's files are read, one at a time."""
    path = Path(path)
    doc = checkpoint.verify(path)
    listed = set(checkpoint._read_json(path / checkpoint.MANIFEST).get("files", {}))
    weights = doc.get("graph", {}).get("weights") if isinstance(doc.get("graph"), dict) else None
    if not isinstance(weights, dict) or key not in weights:
        raise PackageError(
            f"{path / 'graph.json'}: no weight {key!r}; the package has "
            f"{sorted(weights) if isinstance(weights, dict) else 'no inference graph'}"
        )
    start = 0
    for f in _field(weights[key], "files", list, f"{path} weight {key!r}"):
        if f not in listed:
            raise PackageError(
                f"{path / 'graph.json'}: weight {key!r} is stored in {f!r}, which the manifest does not list"
            )
        tensors = checkpoint.load_tensors(path / f)
        if key not in tensors:
            raise PackageError(f"{path} weight {key!r}: missing from {f}")
        rows = tensors[key].numpy()
        yield start, rows
        start += len(rows) if rows.ndim else 1


def load(path) -> InferenceModel:
    """Verifies and loads the package at `path` into a runnable `InferenceModel` (see the module docstring)."""
    path = Path(path)
    doc = checkpoint.verify(path)  # manifest, sizes, SHA-256, format version
    manifest = checkpoint._read_json(path / checkpoint.MANIFEST)
    where = str(path / "graph.json")
    g = doc.get("graph")
    if not isinstance(g, dict) or g.get("kind") != GRAPH_KIND:
        raise PackageError(
            f"{where}: holds no inference graph (a training checkpoint? export one with luoshu.serving.export)"
        )
    if g.get("version") != GRAPH_VERSION:
        raise PackageError(f"{where}: expected inference graph version {GRAPH_VERSION}, found {g.get('version')!r}")
    values = _field(g, "values", list, where)
    ops_json = _field(g, "ops", list, where)
    weight_specs = _field(g, "weights", dict, where)
    weights = _read_weights(path, set(manifest.get("files", {})), weight_specs)

    graph = Graph(f"package:{doc.get('name', path.name)}")
    tensors: list[Tensor | None] = [None] * len(values)
    leaves: dict[str, Tensor] = {}

    def check_meta(i: int, t: Tensor, what: str) -> None:
        meta = values[i]
        if not isinstance(meta, dict) or meta.get("dtype") != t.dtype or meta.get("shape") != _shape_json(t.shape):
            raise PackageError(
                f"{where}: {what} has {t.dtype} {_shape_json(t.shape)}, graph.json records "
                f"{meta.get('dtype') if isinstance(meta, dict) else meta!r} "
                f"{meta.get('shape') if isinstance(meta, dict) else ''}"
            )

    inputs = []
    for spec in _field(g, "inputs", list, where):
        name = _field(spec, "name", str, where)
        shape = _spec_shape(spec.get("shape"), f"{where} input {name!r}")
        try:
            t = graph.placeholder(name, shape, _field(spec, "dtype", str, where))
        except Error as exc:
            raise PackageError(f"{where} input {name!r}: {exc}") from None
        inputs.append(t)
    by_input = {t.name: t for t in inputs}
    for i, meta in enumerate(values):
        if not isinstance(meta, dict):
            raise PackageError(f"{where}: value {i} is not an object")
        if "input" in meta:
            if meta["input"] not in by_input:
                raise PackageError(f"{where}: value {i} names input {meta['input']!r}, which is not an input")
            tensors[i] = by_input[meta["input"]]
        elif "weight" in meta:
            key = meta["weight"]
            if key not in weights:
                raise PackageError(f"{where}: value {i} reads weight {key!r}, which graph.json does not list")
            if key not in leaves:
                leaves[key] = Tensor.from_value(weights[key], name=key)
            tensors[i] = leaves[key]
        else:
            continue
        check_meta(i, tensors[i], f"value {i}")

    with graph, context.no_grad(), context.autocast_scope(None):
        for index, entry in enumerate(ops_json):
            op_name = _field(entry, "op", str, f"{where} op {index}")
            what = f"op {index} ({op_name})"
            try:
                opdef = get_opdef(op_name)
            except OpError as exc:
                raise PackageError(f"{where}: {what}: {exc}") from None
            in_ids, out_ids = _field(entry, "inputs", list, where), _field(entry, "outputs", list, where)
            if not all(isinstance(i, int) and 0 <= i < len(values) and tensors[i] is not None for i in in_ids):
                raise PackageError(f"{where}: {what} reads values {in_ids}, not all of which are defined before it")
            if not all(isinstance(i, int) and 0 <= i < len(values) and tensors[i] is None for i in out_ids):
                raise PackageError(f"{where}: {what} writes values {out_ids}, which must be new value ids")
            attrs = {k: _decode_attr(v, f"{where}: {what}") for k, v in _field(entry, "attrs", dict, where).items()}
            try:
                result = apply(opdef, *[tensors[i] for i in in_ids], **attrs)
            except Error as exc:
                raise PackageError(f"{where}: {what} cannot be rebuilt: {exc}") from None
            outs = list(result) if isinstance(result, tuple) else [result]
            if len(outs) != len(out_ids):
                raise PackageError(f"{where}: {what} produces {len(outs)} outputs, graph.json records {len(out_ids)}")
            for i, t in zip(out_ids, outs):
                check_meta(i, t, f"{what} output")
                tensors[i] = t
    outputs, output_names = [], []
    for spec in _field(g, "outputs", list, where):
        name = _field(spec, "name", str, where)
        i = spec.get("value")
        if not isinstance(i, int) or not 0 <= i < len(values) or tensors[i] is None:
            raise PackageError(f"{where}: output {name!r} names value {i!r}, which no op produces")
        outputs.append(tensors[i])
        output_names.append(name)
    model = InferenceModel(
        graph,
        inputs,
        outputs,
        output_names,
        leaves,
        name=str(doc.get("name", path.name)),
        version=str(doc.get("version", "1")),
        metadata=doc.get("metadata") or {},
    )
    declared = [TensorSpec(s["name"], s.get("dtype"), tuple(s.get("shape", ()))) for s in g["outputs"]]
    if declared != model.outputs:
        raise PackageError(f"{where}: outputs {declared} do not match the rebuilt graph's {model.outputs}")
    return model
