"""ONNX export by walking the IR: every op of an inference graph through its mapping in `mappings.py`.

`export(model_or_package, path)` takes a package directory (or an `InferenceModel`, or a
`luoshu.nn.Module` with `example_inputs`), refuses the graph up front if any op has no mapping
(naming each such op), emits the nodes op by op, stores the weights as initializers, checks the
result with `onnx.checker` and writes it; models over 2 GB keep their weights in one external
data file beside the `.onnx` file (protobuf cannot hold more), written there straight from the
tensors (page-aligned, never copied into the protobuf) and checked by path.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from luoshu.core import dtypes
from luoshu.onnx.mappings import MAPPINGS, OnnxExportError

MIN_OPSET = 17
PROTO_LIMIT = 2 * 1024**3  # protobuf's hard limit on one serialised message
EXTERNAL_THRESHOLD = 1024  # with external data, smaller weights stay inside the model file
_HEADROOM = 64 * 1024**2  # nodes and metadata beside the weights


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise OnnxExportError("luoshu.onnx needs the `onnx` package: pip install onnx") from exc
    return onnx, helper, numpy_helper


class _Builder:
    """Collects nodes and initializers; mappings call `node`, `const`, `ints`, `scalar`, `cast`, `reduce`."""

    def __init__(self, opset: int, external=None):
        onnx, self.helper, self.numpy_helper = _onnx()
        self.TensorProto = onnx.TensorProto
        self.opset = opset
        self.external = external  # (open binary file, its name beside the model) for large weights
        self.nodes: list = []
        self.initializers: list = []
        self._names = itertools.count()
        self._consts: dict = {}
        self.current = ""  # the luoshu op being emitted, for node names

    def fresh(self, prefix: str = "t") -> str:
        return f"{prefix}_{next(self._names)}"

    def node(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs):
        outputs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(
            self.helper.make_node(op_type, inputs, outputs, name=self.fresh(self.current or op_type), **attrs)
        )
        return outputs[0] if n_out == 1 else outputs

    def initializer(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        if self.external is None or array.nbytes < EXTERNAL_THRESHOLD:
            self.initializers.append(self.numpy_helper.from_array(array, name))
            return name
        # Written straight to the data file: never copied into the protobuf (which could not hold it)
        f, location = self.external
        offset = -f.tell() % 4096 + f.tell()  # page-aligned, so runtimes can map the file
        f.seek(offset)
        array.tofile(f)
        tensor = self.TensorProto(
            name=name, dims=list(array.shape), data_type=self.helper.np_dtype_to_tensor_dtype(array.dtype)
        )
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = self.TensorProto.EXTERNAL
        self.initializers.append(tensor)
        return name

    def const(self, array: np.ndarray) -> str:
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        name = self.initializer(self.fresh("const"), array)
        if key is not None:
            self._consts[key] = name
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64))

    def scalar(self, value, dtype: str) -> str:
        return self.const(np.asarray(value, dtype=dtypes.to_numpy(dtype)))

    def onnx_type(self, dtype: str) -> int:
        return self.helper.np_dtype_to_tensor_dtype(np.dtype(dtypes.to_numpy(dtype)))

    def cast(self, name: str, dtype: str) -> str:
        if dtype == "bfloat16":
            return self.node("Cast", [name], to=self.TensorProto.BFLOAT16)
        return self.node("Cast", [name], to=self.onnx_type(dtype))

    def reduce(self, kind: str, name: str, axes: list[int], keepdims: bool) -> str:
        # ReduceSum takes its axes as an input from opset 13, the other reductions from opset 18
        if kind == "ReduceSum" or self.opset >= 18:
            return self.node(kind, [name, self.ints(axes)], keepdims=int(keepdims))
        return self.node(kind, [name], axes=list(axes), keepdims=int(keepdims))


def _resolve(model_or_package, example_inputs):
    from luoshu.nn.module import Module
    from luoshu.serving.package import InferenceModel, load, trace

    if isinstance(model_or_package, InferenceModel):
        return model_or_package
    if isinstance(model_or_package, Module):
        if example_inputs is None:
            raise OnnxExportError("export: a Module needs example_inputs (as luoshu.serving.export takes them)")
        return trace(model_or_package, example_inputs)
    if isinstance(model_or_package, (str, Path)):
        return load(model_or_package)
    raise OnnxExportError(
        f"export: expected a package directory, an InferenceModel or a luoshu.nn.Module, found "
        f"{type(model_or_package).__name__}"
    )


def unmapped_ops(model) -> list[str]:
    """Names of the model's ops that have no ONNX mapping, in order of first use."""
    seen = []
    for op in model.ops:
        if op.opdef.name not in MAPPINGS and op.opdef.name not in seen:
            seen.append(op.opdef.name)
    return seen


def to_onnx(model, opset: int = MIN_OPSET, dynamic_batch: bool = True, batch_size: int = 1, external=None):
    """The `onnx.ModelProto` of an `InferenceModel`: weights inside, or with `external` (an open
    binary file and its name relative to the model file) those of 1 KiB or more written there."""
    _, helper, _ = _onnx()
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise OnnxExportError(f"export: opset must be an int >= {MIN_OPSET}, found {opset!r}")
    missing = unmapped_ops(model)
    if missing:
        raise OnnxExportError(
            f"export: model {model.name!r} uses op(s) without an ONNX mapping: {', '.join(repr(m) for m in missing)}"
        )
    b = _Builder(opset, external)
    names: dict[int, str | None] = {}
    weight_of = {id(t): key for key, t in model.weights.items()}

    def dims(shape):
        if dynamic_batch:
            return ["batch" if d == -1 and i == 0 else (f"d{i}" if d == -1 else d) for i, d in enumerate(shape)]
        return [batch_size if d == -1 else d for d in shape]

    graph_inputs = []
    for t, spec in zip(model.input_tensors, model.inputs):
        names[id(t)] = spec.name
        graph_inputs.append(helper.make_tensor_value_info(spec.name, b.onnx_type(t.dtype), dims(spec.shape)))

    def name_of(t, reader: str) -> str:
        if id(t) in names:
            name = names[id(t)]
            if name is None:
                raise OnnxExportError(f"export: {reader} reads an output its producer's mapping does not compute")
            return name
        if id(t) not in weight_of:
            raise OnnxExportError(f"export: {reader} reads a tensor that is not in the model")
        value = t.value.detach().cpu()
        if value.dtype == torch.bfloat16:
            raise OnnxExportError(f"export: weight {weight_of[id(t)]!r} is bfloat16, which NumPy cannot hold")
        names[id(t)] = b.initializer(weight_of[id(t)], value.numpy())
        return names[id(t)]

    for op in model.ops:
        b.current = op.opdef.name
        ins = [name_of(t, f"op '{op.opdef.name}'") for t in op.inputs]
        outs = MAPPINGS[op.opdef.name](b, op, ins)
        outs = [outs] if isinstance(outs, str) else list(outs)
        if len(outs) != len(op.outputs):
            raise OnnxExportError(
                f"export: the mapping of '{op.opdef.name}' produced {len(outs)} outputs for the op's {len(op.outputs)}"
            )
        for t, name in zip(op.outputs, outs):
            names[id(t)] = name
    graph_outputs = []
    for t, spec in zip(model.output_tensors, model.outputs):
        src = name_of(t, f"output {spec.name!r}")
        b.nodes.append(helper.make_node("Identity", [src], [spec.name], name=f"output_{spec.name}"))
        graph_outputs.append(helper.make_tensor_value_info(spec.name, b.onnx_type(t.dtype), dims(spec.shape)))
    graph = helper.make_graph(b.nodes, model.name, graph_inputs, graph_outputs, initializer=b.initializers)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="luoshu",
        model_version=int(model.version) if model.version.isdigit() else 0,
    )
    proto.doc_string = f"{model.name} version {model.version}, exported by luoshu from its IR"
    return proto


def export(
    model_or_package,
    path,
    opset: int = MIN_OPSET,
    dynamic_batch: bool = True,
    *,
    example_inputs=None,
    batch_size: int = 1,
    external_data: bool | None = None,
) -> Path:
    """Writes the ONNX model of a package directory / `InferenceModel` / Module (with `example_inputs`)
    to `path` and returns it. The batch dimension stays symbolic ("batch") unless `dynamic_batch=False`
    (then it is `batch_size`). Weights go to `<path>.data` when the model would pass protobuf's 2 GB
    (or when `external_data=True`). The file passes `onnx.checker` before this returns."""
    onnx, _, _ = _onnx()
    model = _resolve(model_or_package, example_inputs)
    path = Path(path)
    weight_bytes = sum(t.value.numel() * t.value.element_size() for t in model.weights.values())
    if external_data is None:
        external_data = weight_bytes + _HEADROOM >= PROTO_LIMIT
    if not external_data:
        proto = to_onnx(model, opset, dynamic_batch, batch_size)
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise OnnxExportError(f"export: the ONNX model of {model.name!r} fails onnx.checker: {exc}") from exc
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(proto, str(path))
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.parent / (path.name + ".data")
    try:
        with open(data, "wb") as f:
            proto = to_onnx(model, opset, dynamic_batch, batch_size, external=(f, data.name))
        onnx.save_model(proto, str(path))
        onnx.checker.check_model(str(path))  # by path: the model and its data file together
    except onnx.checker.ValidationError as exc:
        path.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        raise OnnxExportError(f"export: the ONNX model of {model.name!r} fails onnx.checker: {exc}") from exc
    except BaseException:
        data.unlink(missing_ok=True)
        raise
    return path
