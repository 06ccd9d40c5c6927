"""The inference server: models by name and version, their batchers, and the HTTP and gRPC front ends.

`InferenceServer(models, ServerConfig(...))` serves any objects with the inference-model
protocol (`name`, `version`, `inputs`/`outputs` lists of `TensorSpec`, and
`__call__(feeds) -> outputs`), or package paths that `luoshu.serving.load` opens, or
zero-argument callables returning a model. `start()` binds the HTTP (FastAPI + uvicorn) and
gRPC (grpcio) ports on `config.host` only and loads the models in the background: the server
is live at once and ready once every model has loaded. `stop()` stops accepting, lets every
queued request finish (drains), and closes the ports. `infer(request)` is the one path both
transports take: validate, queue, wait.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from luoshu.core.errors import Error
from luoshu.serving.batching import DynamicBatcher
from luoshu.serving.metrics import ServingMetrics
from luoshu.serving.protocol import (
    InferRequest,
    NotFoundError,
    RequestError,
    UnavailableError,
    check_inputs,
    check_outputs,
    datatype_of,
)

log = logging.getLogger("luoshu.serving")

SERVER_NAME = "luoshu"
IMAGE = "luoshu:0.1.0"  # what the Dockerfile builds and deploy/ runs (tests check they agree)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
PLATFORM = "luoshu_graph"
# The protocol's extensions this server implements (GET /v2 lists them).
EXTENSIONS = ("binary_tensor_data", "statistics", "model_configuration")
# REST paths the deployment files point probes at (deploy/ tests read these).
LIVE_PATH = "/v2/health/live"
READY_PATH = "/v2/health/ready"
METRICS_PATH = "/metrics"


class ServerError(Error):
    """A server that cannot start as configured (port in use, bad settings, a model that does not load)."""


@dataclass
class ServerConfig:
    """How `luoshu serve` runs. `max_batch_size` bounds both a request's batch and a run's."""

    host: str = DEFAULT_HOST
    http_port: int | None = DEFAULT_HTTP_PORT  # None: no HTTP; 0: any free port
    grpc_port: int | None = DEFAULT_GRPC_PORT  # None: no gRPC; 0: any free port
    max_batch_size: int = 64
    max_queue_delay_ms: float = 0.0  # 0 (Triton's default): batch what queued while the model ran
    dynamic_batching: bool = True
    workers: int = 1  # threads running each model's batches (Triton's instance count)
    max_body_bytes: int = 64 << 20  # larger HTTP bodies and gRPC messages are refused
    grpc_threads: int = 16
    drain_timeout_s: float = 30.0

    def __post_init__(self):
        for name in ("max_batch_size", "workers", "max_body_bytes", "grpc_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServerError(f"server config: {name} must be a positive integer, found {value!r}")
        if not isinstance(self.max_queue_delay_ms, (int, float)) or self.max_queue_delay_ms < 0:
            raise ServerError(f"server config: max_queue_delay_ms must be >= 0, found {self.max_queue_delay_ms!r}")
        for name in ("http_port", "grpc_port"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536):
                raise ServerError(f"server config: {name} must be a port number in [0, 65535], found {value!r}")


def _version_key(version: str):
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


class _Entry:
    """One loaded model version and its batcher."""

    def __init__(self, model, config: ServerConfig, metrics: ServingMetrics):
        self.model = model
        self.name, self.version = str(model.name), str(model.version)
        self.inputs, self.outputs = list(model.inputs), list(model.outputs)
        self.output_names = [s.name for s in self.outputs]
        # A model batches when every input's dimension 0 is dynamic.
        self.batchable = bool(self.inputs) and all(len(s.shape) and s.shape[0] == -1 for s in self.inputs)
        self.max_batch_size = config.max_batch_size if self.batchable else None
        name, version = self.name, self.version
        self.batcher = DynamicBatcher(
            f"{name}:{version}",
            self._run,
            max_batch_size=config.max_batch_size,
            max_delay_s=config.max_queue_delay_ms / 1000.0,
            workers=config.workers,
            batched=config.dynamic_batching and self.batchable,
            on_batch=lambda record: metrics.on_batch(name, version, record),
        )

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.model(inputs)
        return {name: np.asarray(outputs[name]) for name in self.output_names}

    def metadata(self, versions: list[str]) -> dict:
        def tensor(s):
            return {"name": s.name, "datatype": datatype_of(s.dtype), "shape": list(s.shape)}

        return {
            "name": self.name,
            "versions": versions,
            "platform": PLATFORM,
            "inputs": [tensor(s) for s in self.inputs],
            "outputs": [tensor(s) for s in self.outputs],
        }

    def config(self) -> dict:
        """Triton's model configuration, the parts that apply."""

        def tensor(s):
            dims = list(s.shape[1:]) if self.batchable else list(s.shape)
            data_type = "TYPE_" + datatype_of(s.dtype).replace("BYTES", "STRING")
            return {"name": s.name, "data_type": data_type, "dims": dims}

        out = {
            "name": self.name,
            "platform": PLATFORM,
            "max_batch_size": self.max_batch_size or 0,
            "input": [tensor(s) for s in self.inputs],
            "output": [tensor(s) for s in self.outputs],
        }
        if self.batcher.batched:
            out["dynamic_batching"] = {"max_queue_delay_microseconds": int(self.batcher.max_delay_s * 1e6)}
        return out


ModelSource = object  # an inference model, a package path, or a callable returning a model


class InferenceServer:
    """Serves models over the Open Inference Protocol (HTTP and gRPC); see the module docstring."""

    def __init__(self, models: Sequence[ModelSource], config: ServerConfig | None = None, *, stores: Sequence = ()):
        if not models:
            raise ServerError("the server needs at least one model")
        self.config = config or ServerConfig()
        self.metrics = ServingMetrics()
        for store in stores:  # embedding stores whose tiers /metrics reports
            self.metrics.add_store(store)
        self._sources = list(models)
        self._entries: dict[str, dict[str, _Entry]] = {}
        self._lock = threading.Lock()
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._stopping = False
        self._http = None
        self.http_socket: socket.socket | None = None
        self._http_thread: threading.Thread | None = None
        self._grpc = None
        self.http_port: int | None = None
        self.grpc_port: int | None = None

    # --- models ---------------------------------------------------------------------------------------
    def add_model(self, model) -> None:
        """Adds one loaded model version (refuses a name and version already served)."""
        for attr in ("name", "version", "inputs", "outputs"):
            if not hasattr(model, attr):
                raise ServerError(f"{model!r} is not an inference model: it has no {attr!r}")
        entry = _Entry(model, self.config, self.metrics)
        with self._lock:
            versions = self._entries.setdefault(entry.name, {})
            if entry.version in versions:
                entry.batcher.close()
                raise ServerError(f"model {entry.name!r} version {entry.version!r} is given twice")
            versions[entry.version] = entry

    def _load_all(self) -> None:
        try:
            for source in self._sources:
                if isinstance(source, (str, os.PathLike)):
                    from luoshu.serving.package import load

                    model = load(Path(source))
                elif callable(source) and not hasattr(source, "inputs"):
                    model = source()
                else:
                    model = source
                self.add_model(model)
                log.info("loaded model %s version %s", model.name, model.version)
        except BaseException as exc:  # noqa: BLE001 - reported by wait_ready and kept from readiness
            self._load_error = exc
            log.info("loading the models failed: %s", exc)  # wait_ready and serve_forever raise it
        finally:
            self._loaded.set()

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and self._load_error is None and not self._stopping

    def wait_ready(self, timeout: float | None = None) -> None:
        """Blocks until every model has loaded; raises the loading error if one failed."""
        if not self._loaded.wait(timeout):
            raise ServerError(f"the models did not load within {timeout} s")
        if self._load_error is not None:
            raise ServerError(f"a model failed to load: {self._load_error}") from self._load_error

    def model_names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def versions(self, name: str) -> list[str]:
        with self._lock:
            return sorted(self._entries.get(name, {}), key=_version_key)

    def entry(self, name: str, version: str | None = None) -> _Entry:
        """The model version a request names (the newest version where none is given)."""
        with self._lock:
            versions = self._entries.get(name)
            if versions is None:
                if not self._loaded.is_set():
                    raise UnavailableError(f"model {name!r} is not loaded yet")
                raise NotFoundError(f"unknown model {name!r}; models are {sorted(self._entries)}")
            if version in (None, ""):
                version = max(versions, key=_version_key)
            if version not in versions:
                raise NotFoundError(
                    f"model {name!r} has no version {version!r}; versions are {sorted(versions, key=_version_key)}"
                )
            return versions[version]

    def model_ready(self, name: str, version: str | None = None) -> bool:
        try:
            self.entry(name, version)
        except RequestError:
            return False
        return not self._stopping

    def metadata(self, name: str, version: str | None = None) -> dict:
        return self.entry(name, version).metadata(self.versions(name))

    def server_metadata(self) -> dict:
        from luoshu import __version__

        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def statistics(self, name: str | None = None, version: str | None = None) -> dict:
        entries = (
            [self.entry(name, version)]
            if name
            else [e for n in self.model_names() for e in (self._entries[n][v] for v in self.versions(n))]
        )
        return {"model_stats": [self.metrics.stats(e.name, e.version).as_dict(e.name, e.version) for e in entries]}

    # --- inference ------------------------------------------------------------------------------------
    def submit(self, request: InferRequest) -> tuple[_Entry, Future]:
        """Validates a decoded request and queues it; the future gets the outputs or a RequestError."""
        if self._stopping:
            raise UnavailableError("the server is shutting down")
        entry = self.entry(request.model_name, request.model_version)
        rows = check_inputs(entry.name, entry.inputs, request.inputs, entry.max_batch_size)
        check_outputs(request, entry.output_names)
        return entry, entry.batcher.submit(request.inputs, rows)

    def infer(self, request: InferRequest, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Runs one request through its model's queue (blocking) and returns the outputs."""
        _, future = self.submit(request)
        return future.result(timeout)

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self, wait: bool = False, timeout: float | None = None) -> InferenceServer:
        """Binds the ports and loads the models in the background (`wait=True`: until they are ready)."""
        try:
            if self.config.http_port is not None:
                self._start_http()
            if self.config.grpc_port is not None:
                self._start_grpc()
        except BaseException:
            self.stop()
            raise
        threading.Thread(target=self._load_all, name="luoshu-serve-load", daemon=True).start()
        if wait:
            self.wait_ready(timeout)
        return self

    def _start_http(self) -> None:
        import uvicorn

        from luoshu.serving.http import create_app

        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted connections only for sockets that say
        # so, and without it every reply with a body waits ~40 ms for a delayed ACK (Nagle)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.http_port))
        except OSError as exc:
            sock.close()
            raise ServerError(f"cannot bind HTTP on {self.config.host}:{self.config.http_port}: {exc}") from None
        sock.listen(2048)
        self.http_socket = sock
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(self),
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=self.config.drain_timeout_s,
        )
        self._http = uvicorn.Server(config)
        self._http_thread = threading.Thread(
            target=self._http.run, kwargs={"sockets": [sock]}, name="luoshu-serve-http", daemon=True
        )
        self._http_thread.start()
        deadline = time.monotonic() + 30
        while not self._http.started:
            if not self._http_thread.is_alive() or time.monotonic() > deadline:
                raise ServerError(f"the HTTP server on {self.config.host}:{self.http_port} did not start")
            time.sleep(0.005)

    def _start_grpc(self) -> None:
        from luoshu.serving.grpc_service import create_grpc_server

        self._grpc, self.grpc_port = create_grpc_server(self)
        self._grpc.start()

    def stop(self) -> None:
        """Graceful shutdown: refuse new requests, finish every queued one, close the ports."""
        if self._stopping and self._http is None and self._grpc is None:
            return
        self._stopping = True
        with self._lock:
            entries = [e for versions in self._entries.values() for e in versions.values()]
        # Queued requests finish first; their handlers are still waiting to send the replies.
        for entry in entries:
            entry.batcher.close(self.config.drain_timeout_s)
        if self._grpc is not None:
            self._grpc.stop(grace=self.config.drain_timeout_s).wait(self.config.drain_timeout_s)
            self._grpc = None
        if self._http is not None:
            self._http.should_exit = True
            if self._http_thread is not None:
                self._http_thread.join(self.config.drain_timeout_s + 5)
            self._http = None

    def serve_forever(self) -> None:
        """Runs until SIGINT or SIGTERM (main thread), then shuts down gracefully."""
        import signal

        stop = threading.Event()
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            frozen = False
            while not stop.wait(0.05 if not frozen else 0.5):
                if self._loaded.is_set() and self._load_error is not None:
                    raise ServerError(f"a model failed to load: {self._load_error}") from self._load_error
                if self._loaded.is_set() and not frozen:
                    _freeze_startup_objects()
                    frozen = True
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.stop()

    def __enter__(self) -> InferenceServer:
        return self.start(wait=True)

    def __exit__(self, *exc) -> None:
        self.stop()


def _freeze_startup_objects() -> None:
    """Moves every object alive after loading (modules, models, the web stack) out of the cyclic
    garbage collector's reach. Otherwise every full (generation 2) collection walks them all:
    in `luoshu serve` with DCN those took 50-200 ms on 2 busy cores (more when loaded), and
    every request in flight waits for one; frozen, the collections while serving stay under
    1 ms. Full collections are rare under steady traffic (none in a few thousand requests),
    so this guards a long-running server's tail. Only for the process `luoshu serve` owns:
    frozen objects are never collected, a leak for a host program's own garbage."""
    import gc

    gc.collect()
    gc.freeze()


def serve(models: Sequence[ModelSource], *, stores: Sequence = (), **config) -> InferenceServer:
    """Starts a server on the given models (keyword arguments: `ServerConfig` fields) and waits until ready."""
    return InferenceServer(models, ServerConfig(**config), stores=stores).start(wait=True)


def store_backed_sources(packages: Sequence[str | os.PathLike], store_config) -> tuple[list, object]:
    """Model sources for `packages` whose weights named like the store's tables are served from one
    `EmbeddingStore` (filled from the first package holding them, unless its RocksDB tier is read-only,
    that is, already written); returns (sources, store)."""
    from luoshu.serving.embedding_store import EmbeddingStore, StoreConfig
    from luoshu.serving.package import load
    from luoshu.serving.store_model import StoreBackedModel

    config = store_config if isinstance(store_config, StoreConfig) else StoreConfig.from_json(store_config)
    store = EmbeddingStore(config)
    filled = threading.Lock()
    state = {"filled": config.persistent_read_only}

    def source(path):
        def build():
            model = load(path)
            tables = {name: name for name in store.tables if name in model.weights}
            if not tables:
                return model
            with filled:
                if not state["filled"]:
                    for name in tables:
                        store.load(name, model.weights[name].numpy())
                    state["filled"] = True
            served = StoreBackedModel(model, store, tables)
            served.release_tables()
            return served

        return build

    return [source(p) for p in packages], store
