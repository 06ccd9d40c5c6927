"""The Open Inference Protocol over HTTP/REST: a FastAPI app on an `InferenceServer`.

Routes: health (`/v2/health/live`, `/v2/health/ready`), server metadata (`/v2`), model
metadata, readiness, configuration and Triton's statistics (`/v2/models/{m}[/versions/{v}]
[/ready|/config|/stats]`, `/v2/models/stats`), inference (`POST .../infer`, JSON tensors or
Triton's binary tensor extension) and Prometheus metrics (`/metrics`). Bodies are read in
chunks and refused once past the size limit; every refusal is `{"error": "..."}` with the
protocol's status.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from luoshu.serving.protocol import (
    HEADER_LENGTH,
    RequestError,
    http_response_body,
    parse_http_request,
)
from luoshu.serving.server import LIVE_PATH, METRICS_PATH, READY_PATH, InferenceServer


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _bool_status(key: str, value: bool) -> Response:
    # The protocol's status code: 200 = true, 4xx = false (what Triton's client reads), and
    # the body of the protocol's OpenAPI spec, {"live": bool} / {"ready": bool} (what
    # KServe's client reads)
    return JSONResponse({key: value}, status_code=200 if value else 400)


def create_app(server: InferenceServer) -> FastAPI:
    app = FastAPI(title="luoshu inference server", docs_url=None, redoc_url=None, openapi_url=None)
    limit = server.config.max_body_bytes

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError):
        return _error(exc.status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        return _error(400, str(exc))

    @app.get(LIVE_PATH)
    async def live():
        return _bool_status("live", True)

    @app.get(READY_PATH)
    async def ready():
        return _bool_status("ready", server.ready)

    @app.get("/v2")
    async def server_metadata():
        return server.server_metadata()

    @app.get(METRICS_PATH)
    async def metrics():
        return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v2/models/stats")
    async def all_stats():
        return server.statistics()

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(prefix, _metadata, methods=["GET"])
        app.add_api_route(prefix + "/ready", _model_ready, methods=["GET"])
        app.add_api_route(prefix + "/config", _config, methods=["GET"])
        app.add_api_route(prefix + "/stats", _stats, methods=["GET"])
        # Inference is a plain Starlette route, matched first: FastAPI's per-request dependency solving
        # and the scan over every route cost more CPU than the rest of a small request's path.
        app.router.routes.insert(0, Route(prefix + "/infer", _infer_endpoint, methods=["POST"]))

    app.state.server = server
    app.state.limit = limit
    return app


async def _metadata(request: Request, name: str, version: str | None = None):
    return request.app.state.server.metadata(name, version)


async def _model_ready(request: Request, name: str, version: str | None = None):
    return _bool_status("ready", request.app.state.server.model_ready(name, version))


async def _config(request: Request, name: str, version: str | None = None):
    return request.app.state.server.entry(name, version).config()


async def _stats(request: Request, name: str, version: str | None = None):
    return request.app.state.server.statistics(name, version)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body has {declared} bytes, above the limit of {limit}")
    if request.headers.get("content-encoding", "identity") not in ("identity", ""):
        raise RequestError(
            f"unsupported Content-Encoding {request.headers['content-encoding']!r}; send the body uncompressed"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body is above the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _infer_endpoint(request: Request):
    params = request.path_params
    return await _infer(request, params["name"], params.get("version"))


async def _infer(request: Request, name: str, version: str | None = None):
    server: InferenceServer = request.app.state.server
    start = time.perf_counter()
    entry = None
    try:
        body = await _read_body(request, request.app.state.limit)
        parsed = parse_http_request(name, version, body, request.headers.get(HEADER_LENGTH))
        entry, future = server.submit(parsed)
        outputs = await asyncio.wrap_future(future)
        content, header_length = http_response_body(entry.name, entry.version, parsed, outputs)
    except RequestError as exc:
        _count(server, entry, name, version, "fail", start)
        return _error(exc.status, str(exc))
    _count(server, entry, name, version, "success", start)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


def _count(server: InferenceServer, entry, name: str, version: str | None, status: str, start: float) -> None:
    # Requests for models the server does not have are counted under "" so no client value becomes a label.
    model, ver = (entry.name, entry.version) if entry is not None else _known(server, name, version)
    server.metrics.on_request(model, ver, "http", status, time.perf_counter() - start)


def _known(server: InferenceServer, name: str, version: str | None) -> tuple[str, str]:
    try:
        entry = server.entry(name, version)
    except RequestError:
        return "", ""
    return entry.name, entry.version
