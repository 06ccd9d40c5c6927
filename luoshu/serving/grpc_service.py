"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` on an `InferenceServer`.

Inputs arrive either typed (`InferInputTensor.contents`, the repeated field of the tensor's
datatype) or raw (`raw_input_contents`, one little-endian buffer per input, in order); a
request mixing the two is refused, as the protocol requires. Outputs go back as raw
contents, as Triton sends them. Refusals carry the protocol's status codes
(INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, INTERNAL) and the same messages as over HTTP.
"""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import numpy as np

from luoshu.serving.proto import grpc_predict_v2_pb2 as pb
from luoshu.serving.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from luoshu.serving.protocol import (
    InferRequest,
    RequestedOutput,
    RequestError,
    array_from_bytes,
    array_to_bytes,
    check_shape,
    datatype_of,
    dtype_of,
)
from luoshu.serving.server import InferenceServer, ServerError

# Which repeated field of InferTensorContents carries each datatype (FP16 and BF16: raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _parameter(value: pb.InferParameter):
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)


def decode_request(msg: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as an `InferRequest` (raises RequestError naming the input at fault)."""
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise RequestError(f"raw_input_contents has {len(raw)} buffers for {len(msg.inputs)} inputs")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(msg.inputs):
        name = tensor.name
        if name in inputs:
            raise RequestError(f"input {name!r} appears twice")
        has_contents = tensor.HasField("contents")
        if raw:
            if has_contents:
                raise RequestError(
                    f"input {name!r} sets 'contents' while the request uses raw_input_contents; use one or the other"
                )
            inputs[name] = array_from_bytes(name, tensor.datatype, list(tensor.shape), raw[i])
            continue
        where = f"input {name!r}"
        dtype = dtype_of(tensor.datatype, where)
        shape = check_shape(list(tensor.shape), where)
        field = _CONTENTS_FIELD.get(tensor.datatype)
        if field is None:
            raise RequestError(f"{where}: datatype {tensor.datatype} travels only as raw_input_contents")
        if not has_contents:
            raise RequestError(f"{where}: no contents and no raw_input_contents")
        for other in set(_CONTENTS_FIELD.values()) - {field}:
            if len(getattr(tensor.contents, other)):
                raise RequestError(
                    f"{where}: datatype {tensor.datatype} expects its values in {field}, found them in {other}"
                )
        values = getattr(tensor.contents, field)
        n = int(np.prod(shape)) if shape else 1
        if len(values) != n:
            raise RequestError(f"{where}: shape {list(shape)} needs {n} elements, {field} has {len(values)}")
        if dtype.kind == "O":
            arr = np.array(list(values), dtype=object)
        else:
            arr = np.asarray(values, dtype=np.result_type(dtype, np.int64) if dtype.kind in "iu" else dtype)
            if dtype.kind in "iu" and arr.size:
                info = np.iinfo(dtype)
                if arr.min() < info.min or arr.max() > info.max:
                    raise RequestError(f"{where}: values outside the range of {tensor.datatype}")
            arr = arr.astype(dtype, copy=False)
        inputs[name] = arr.reshape(shape)
    if not inputs:
        raise RequestError("the request has no inputs")
    outputs = [RequestedOutput(o.name, True) for o in msg.outputs] or None
    params = {k: _parameter(v) for k, v in msg.parameters.items()}
    return InferRequest(msg.model_name, msg.model_version or None, inputs, msg.id or None, outputs, True, params)


def encode_response(
    model_name: str, model_version: str, request: InferRequest, outputs: dict[str, np.ndarray]
) -> pb.ModelInferResponse:
    reply = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request.id or "")
    names = [o.name for o in request.outputs] if request.outputs is not None else list(outputs)
    for name in names:
        array = outputs[name]
        reply.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=list(array.shape))
        reply.raw_output_contents.append(array_to_bytes(array))
    return reply


class _Service(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, server: InferenceServer):
        self.server = server

    def _abort(self, context, exc: RequestError):
        context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc))

    def ServerLive(self, request, context):  # noqa: N802 - the protocol's method names
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.server.ready)

    def ModelReady(self, request, context):  # noqa: N802
        return pb.ModelReadyResponse(ready=self.server.model_ready(request.name, request.version or None))

    def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(**self.server.server_metadata())

    def ModelMetadata(self, request, context):  # noqa: N802
        try:
            meta = self.server.metadata(request.name, request.version or None)
        except RequestError as exc:
            self._abort(context, exc)
        reply = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for kind in ("inputs", "outputs"):
            for t in meta[kind]:
                getattr(reply, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return reply

    def ModelInfer(self, request, context):  # noqa: N802
        start, entry = time.perf_counter(), None
        try:
            decoded = decode_request(request)
            entry, future = self.server.submit(decoded)
            outputs = future.result()
            reply = encode_response(entry.name, entry.version, decoded, outputs)
        except RequestError as exc:
            self._count(entry, request, "fail", start)
            self._abort(context, exc)
        self._count(entry, request, "success", start)
        return reply

    def _count(self, entry, request, status: str, start: float) -> None:
        if entry is None:
            try:
                entry = self.server.entry(request.model_name, request.model_version or None)
            except RequestError:
                entry = None
        name, version = (entry.name, entry.version) if entry is not None else ("", "")
        self.server.metrics.on_request(name, version, "grpc", status, time.perf_counter() - start)


def create_grpc_server(server: InferenceServer) -> tuple[grpc.Server, int]:
    """A grpc.Server with the service on `config.host:config.grpc_port` (not started) and its bound port."""
    config = server.config
    options = [
        ("grpc.max_receive_message_length", config.max_body_bytes),
        ("grpc.max_send_message_length", max(config.max_body_bytes, 64 << 20)),
        ("grpc.so_reuseport", 0),
    ]
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.grpc_threads, thread_name_prefix="luoshu-serve-grpc"),
        options=options,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Service(server), grpc_server)
    host = f"[{config.host}]" if ":" in config.host else config.host
    try:
        port = grpc_server.add_insecure_port(f"{host}:{config.grpc_port}")
    except RuntimeError as exc:
        raise ServerError(f"cannot bind gRPC on {config.host}:{config.grpc_port}: {exc}") from None
    if port == 0:
        raise ServerError(f"cannot bind gRPC on {config.host}:{config.grpc_port}")
    return grpc_server, port
