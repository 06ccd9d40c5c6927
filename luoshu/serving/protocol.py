"""The Open Inference Protocol's data model: datatypes, request errors, tensors decoded from JSON, binary and gRPC.

Both transports decode a request into an `InferRequest` (NumPy arrays by input name) and
encode `InferResponse` outputs back; `check_inputs` validates the arrays against the model's
`TensorSpec`s before anything runs. Every refusal is a `RequestError` carrying the HTTP
status and the gRPC code the protocol maps it to (Triton's mapping: not found 404 /
NOT_FOUND, unavailable 503 / UNAVAILABLE, internal 500 / INTERNAL, everything else 400 /
INVALID_ARGUMENT), and its message names the input, what was expected and what was found.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from luoshu.core.errors import Error

# v2 datatype -> NumPy dtype. BF16 has no NumPy dtype: it is refused as unsupported.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_DATATYPE_OF = {dtype.name: name for name, dtype in DATATYPES.items() if name != "BYTES"}
# NumPy kinds a JSON array may arrive as for each datatype (JSON integers are fine for floats).
_JSON_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}


class RequestError(Error, ValueError):
    """A request the server refuses; `status` is its HTTP status, `grpc_code` the name of its gRPC code."""

    status = 400
    grpc_code = "INVALID_ARGUMENT"


class NotFoundError(RequestError):
    """An unknown model, version or output."""

    status = 404
    grpc_code = "NOT_FOUND"


class UnavailableError(RequestError):
    """A model not loaded yet, or a server shutting down."""

    status = 503
    grpc_code = "UNAVAILABLE"


class ModelError(RequestError):
    """The model's kernel raised while running this request (the request's fault or the model's; not the server's)."""

    status = 500
    grpc_code = "INTERNAL"


def datatype_of(dtype: np.dtype | str) -> str:
    """The v2 datatype name of a NumPy dtype (or dtype name)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _DATATYPE_OF[dtype.name]
    except KeyError:
        raise RequestError(f"dtype {dtype.name} has no Open Inference Protocol datatype") from None


def dtype_of(datatype: object, where: str) -> np.dtype:
    if not isinstance(datatype, str):
        raise RequestError(f"{where}: 'datatype' must be a string, found {datatype!r}")
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise RequestError(f"{where}: unsupported datatype {datatype!r}; expected one of {sorted(DATATYPES)}") from None


@dataclass
class RequestedOutput:
    name: str
    binary: bool = False


@dataclass
class InferRequest:
    """A decoded inference request: the arrays by input name, and which outputs to return how."""

    model_name: str
    model_version: str | None
    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None  # None: every output
    binary_outputs: bool = False  # the request-level `binary_data_output` parameter
    parameters: dict[str, Any] = field(default_factory=dict)


def check_shape(shape: object, where: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or any(
        isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in shape
    ):
        raise RequestError(f"{where}: 'shape' must be a list of non-negative integers, found {shape!r}")
    return tuple(int(d) for d in shape)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def array_from_json(name: str, datatype: object, shape: object, data: object) -> np.ndarray:
    """An input's JSON `data` (nested or flat, row-major) as an array of its datatype and shape."""
    where = f"input {name!r}"
    dtype = dtype_of(datatype, where)
    shape = check_shape(shape, where)
    if data is None:
        raise RequestError(f"{where}: no 'data' and no 'binary_data_size' parameter")
    if dtype.kind == "O":
        values = np.asarray(data, dtype=object).reshape(-1)
        if not all(isinstance(v, str) for v in values):
            raise RequestError(f"{where}: BYTES data in JSON must be strings")
        arr = np.array([v.encode() for v in values], dtype=object)
    else:
        try:
            raw = np.asarray(data)
        except (ValueError, TypeError):
            raise RequestError(f"{where}: 'data' is not a rectangular array of numbers") from None
        if raw.size and raw.dtype.kind not in _JSON_KINDS[dtype.kind]:
            raise RequestError(
                f"{where}: datatype {datatype} expects {_kind_words(dtype)} in 'data', found {_found_words(raw)}"
            )
        if dtype.kind in "iu" and raw.size:
            info = np.iinfo(dtype)
            if raw.min() < info.min or raw.max() > info.max:
                raise RequestError(f"{where}: values outside the range of {datatype} [{info.min}, {info.max}]")
        arr = raw.astype(dtype, copy=False).reshape(-1)
    if arr.size != _numel(shape):
        raise RequestError(f"{where}: shape {list(shape)} needs {_numel(shape)} elements, 'data' has {arr.size}")
    return arr.reshape(shape)


def _kind_words(dtype: np.dtype) -> str:
    return {"b": "booleans", "u": "integers", "i": "integers", "f": "numbers"}[dtype.kind]


def _found_words(raw: np.ndarray) -> str:
    return {"b": "booleans", "f": "non-integer numbers", "U": "strings", "S": "strings", "O": "mixed values"}.get(
        raw.dtype.kind, raw.dtype.name
    )


def array_from_bytes(name: str, datatype: object, shape: object, buffer: bytes | memoryview) -> np.ndarray:
    """An input sent as raw little-endian bytes (binary extension or gRPC raw contents)."""
    where = f"input {name!r}"
    dtype = dtype_of(datatype, where)
    shape = check_shape(shape, where)
    n = _numel(shape)
    if dtype.kind == "O":
        return _bytes_elements(where, buffer, n).reshape(shape)
    want = n * dtype.itemsize
    if len(buffer) != want:
        raise RequestError(f"{where}: shape {list(shape)} of {datatype} needs {want} bytes, found {len(buffer)}")
    return np.frombuffer(buffer, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def _bytes_elements(where: str, buffer: bytes | memoryview, n: int) -> np.ndarray:
    """BYTES elements on the wire: each a 4-byte little-endian length, then the bytes."""
    out, pos, buffer = [], 0, memoryview(buffer)
    for _ in range(n):
        if pos + 4 > len(buffer):
            raise RequestError(f"{where}: BYTES buffer ends inside element {len(out)} of {n}")
        (size,) = struct.unpack_from("<I", buffer, pos)
        pos += 4
        if pos + size > len(buffer):
            raise RequestError(f"{where}: BYTES element {len(out)} claims {size} bytes past the buffer's end")
        out.append(bytes(buffer[pos : pos + size]))
        pos += size
    if pos != len(buffer):
        raise RequestError(f"{where}: {len(buffer) - pos} bytes left over after {n} BYTES elements")
    return np.array(out, dtype=object)


def array_to_bytes(array: np.ndarray) -> bytes:
    """An output's raw little-endian row-major bytes."""
    if array.dtype.kind in "OSU":
        parts = []
        for v in array.reshape(-1):
            b = v.encode() if isinstance(v, str) else bytes(v)
            parts.append(struct.pack("<I", len(b)) + b)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def array_to_json_data(array: np.ndarray) -> list:
    if array.dtype.kind in "OSU":
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
    return array.reshape(-1).tolist()


# --- HTTP/REST -----------------------------------------------------------------------------------------

HEADER_LENGTH = "inference-header-content-length"


def parse_http_request(
    model_name: str, model_version: str | None, body: bytes, header_length: str | None
) -> InferRequest:
    """The JSON body (with the binary tensor extension's trailing bytes where `header_length` is given)."""
    if header_length is not None:
        try:
            json_len = int(header_length)
        except ValueError:
            raise RequestError(f"Inference-Header-Content-Length must be an integer, found {header_length!r}") from None
        if not 0 <= json_len <= len(body):
            raise RequestError(f"Inference-Header-Content-Length is {json_len}, the body has {len(body)} bytes")
        head, binary = body[:json_len], memoryview(body)[json_len:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = json.loads(head.decode())  # a str: json's encoding detection on bytes costs as much as the parse
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError("the request body nests JSON arrays or objects too deeply") from None
    if not isinstance(doc, dict):
        raise RequestError(f"the request body must be a JSON object, found {type(doc).__name__}")
    unknown = set(doc) - {"id", "parameters", "inputs", "outputs", "model_name", "model_version"}
    if unknown:
        raise RequestError(
            f"unknown request fields {sorted(unknown)}; expected id, parameters, inputs, outputs (and model_name, "
            f"model_version)"
        )
    # KServe's REST client also names the model in the body (as gRPC's ModelInferRequest
    # does); accepted where it agrees with the URL
    for key, expected in (("model_name", model_name), ("model_version", model_version)):
        given = doc.get(key)
        if given not in (None, "") and given != expected:
            raise RequestError(f"the body's {key} {given!r} differs from the URL's {expected!r}")
    parameters = _parameters(doc.get("parameters"), "the request")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(f"'id' must be a string, found {request_id!r}")
    inputs_doc = doc.get("inputs")
    if not isinstance(inputs_doc, list) or not inputs_doc:
        raise RequestError(f"'inputs' must be a non-empty list of tensors, found {inputs_doc!r:.80}")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(inputs_doc):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise RequestError(f"inputs[{i}] must be an object with a string 'name', found {tensor!r:.80}")
        name = tensor["name"]
        if name in inputs:
            raise RequestError(f"input {name!r} appears twice")
        extra = set(tensor) - {"name", "shape", "datatype", "parameters", "data"}
        if extra:
            raise RequestError(f"input {name!r}: unknown fields {sorted(extra)}")
        params = _parameters(tensor.get("parameters"), f"input {name!r}")
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in tensor:
                raise RequestError(f"input {name!r} has both 'data' and the binary_data_size parameter")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise RequestError(f"input {name!r}: binary_data_size must be a non-negative integer, found {size!r}")
            if offset + size > len(binary):
                raise RequestError(
                    f"input {name!r}: binary_data_size {size} runs past the body's "
                    f"{len(binary) - offset} remaining binary bytes"
                )
            inputs[name] = array_from_bytes(
                name, tensor.get("datatype"), tensor.get("shape"), binary[offset : offset + size]
            )
            offset += size
        else:
            inputs[name] = array_from_json(name, tensor.get("datatype"), tensor.get("shape"), tensor.get("data"))
    if offset != len(binary):
        raise RequestError(f"the body has {len(binary) - offset} binary bytes no input's binary_data_size claims")
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise RequestError(f"'outputs' must be a list, found {doc['outputs']!r:.80}")
        outputs = []
        for i, out in enumerate(doc["outputs"]):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise RequestError(f"outputs[{i}] must be an object with a string 'name', found {out!r:.80}")
            params = _parameters(out.get("parameters"), f"output {out['name']!r}")
            outputs.append(RequestedOutput(out["name"], bool(params.get("binary_data", False))))
    return InferRequest(
        model_name,
        model_version,
        inputs,
        request_id,
        outputs,
        bool(parameters.get("binary_data_output", False)),
        parameters,
    )


def _parameters(params: object, where: str) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise RequestError(f"{where}: 'parameters' must be an object, found {params!r:.80}")
    return params


def http_response_body(
    model_name: str, model_version: str, request: InferRequest, outputs: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """(body, JSON header length or None): binary outputs follow the JSON header when any is asked for."""
    tensors, chunks = [], []
    for out in _selected(request, outputs):
        array = outputs[out.name]
        tensor = {"name": out.name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if out.binary:
            raw = array_to_bytes(array)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = array_to_json_data(array)
        tensors.append(tensor)
    doc = {"model_name": model_name, "model_version": model_version, "outputs": tensors}
    if request.id is not None:
        doc["id"] = request.id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def _selected(request: InferRequest, outputs: dict[str, np.ndarray]) -> list[RequestedOutput]:
    if request.outputs is None:
        return [RequestedOutput(name, request.binary_outputs) for name in outputs]
    return request.outputs


def check_outputs(request: InferRequest, names: list[str]) -> None:
    """Refuses a request asking for an output the model does not have."""
    for out in request.outputs or []:
        if out.name not in names:
            raise RequestError(f"model {request.model_name!r} has no output {out.name!r}; outputs are {names}")
    if request.outputs is not None and len({o.name for o in request.outputs}) != len(request.outputs):
        raise RequestError("an output is requested twice")


def check_inputs(model_name: str, specs, inputs: dict[str, np.ndarray], max_batch_size: int | None) -> int:
    """Checks names, dtypes and shapes against the model's `TensorSpec`s; returns the batch size (rows).

    A dimension of -1 in a spec takes any size; dimension 0 of -1 is the batch dimension, which
    must agree across the inputs and (when the model batches) not exceed `max_batch_size`.
    """
    expected = {s.name: s for s in specs}
    missing = [n for n in expected if n not in inputs]
    if missing:
        raise RequestError(f"model {model_name!r}: missing input(s) {missing}; expected inputs {list(expected)}")
    extra = [n for n in inputs if n not in expected]
    if extra:
        raise RequestError(f"model {model_name!r}: unknown input(s) {extra}; expected inputs {list(expected)}")
    rows = None
    for spec in specs:
        array = inputs[spec.name]
        want = np.dtype(spec.dtype)
        if array.dtype != want and not (want.kind in "OSU" and array.dtype.kind == "O"):
            raise RequestError(
                f"model {model_name!r}, input {spec.name!r}: expected datatype "
                f"{datatype_of(want)}, found {datatype_of(array.dtype)}"
            )
        shape = tuple(spec.shape)
        ok = len(shape) == array.ndim and all(d == -1 or d == f for d, f in zip(shape, array.shape))
        if not ok:
            raise RequestError(
                f"model {model_name!r}, input {spec.name!r}: expected shape {list(shape)} "
                f"(-1: any size), found {list(array.shape)}"
            )
        if shape and shape[0] == -1:
            if rows is not None and array.shape[0] != rows:
                raise RequestError(
                    f"model {model_name!r}, input {spec.name!r}: batch size {array.shape[0]} "
                    f"differs from the other inputs' {rows}"
                )
            rows = array.shape[0]
    if rows is not None and max_batch_size is not None and rows > max_batch_size:
        raise RequestError(f"model {model_name!r}: batch size {rows} is above the maximum {max_batch_size}")
    return rows if rows is not None else 1
