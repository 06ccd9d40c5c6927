"""The worker's parameter-server client: sharded, concurrent, asynchronous pull/push with futures.

A `Client` holds one ZeroMQ DEALER socket per server, all owned by one background I/O
thread; user threads hand it requests through a queue and get `concurrent.futures.Future`s
back. A pull or push is split by shard (`protocol.shard_of`), one request per server goes
out at once, and the replies are reassembled in the caller's id order. Every request has
a deadline (`timeout_s`): a server that died or never came up fails the request with a
`ServerUnavailableError` naming the server and its address, never a hang. Requests wait
in the client's own queue, not in ZeroMQ's (``ZMQ_IMMEDIATE``), so a request that timed
out is dropped and can never reach a server that comes back later.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import weakref
import zlib
from collections import deque
from concurrent.futures import Future

import numpy as np

from luoshu.distributed import env as dist
from luoshu.ps import auth as A
from luoshu.ps import protocol as P
from luoshu.ps.protocol import STORE_PREFIX, PSError, ServerUnavailableError, TableError


class _Request:
    __slots__ = ("request_id", "server", "op", "frames", "deadline", "on_reply", "on_error", "sent")

    def __init__(self, request_id, server, op, frames, deadline, on_reply, on_error):
        self.request_id, self.server, self.op, self.frames = request_id, server, op, frames
        self.deadline, self.on_reply, self.on_error = deadline, on_reply, on_error
        self.sent = False


class _Gather:
    """Completes `future` with `finish(parts)` once all `n` parts arrived; the first error wins."""

    def __init__(self, n: int, finish, future: Future):
        self.parts = [None] * n
        self.left = n
        self.finish, self.future = finish, future
        self.lock = threading.Lock()

    def part(self, i: int, value) -> None:
        with self.lock:
            if self.future.done():
                return
            self.parts[i] = value
            self.left -= 1
            last = self.left == 0
        if last:
            try:
                result = self.finish(self.parts)
            except BaseException as exc:  # noqa: BLE001 - delivered through the future
                self._fail(exc)
                return
            self._set(result)

    def _set(self, result) -> None:
        try:
            self.future.set_result(result)
        except Exception:  # noqa: BLE001 - already failed by another part
            pass

    def _fail(self, exc: BaseException) -> None:
        try:
            self.future.set_exception(exc)
        except Exception:  # noqa: BLE001 - already completed
            pass

    def error(self, exc: BaseException) -> None:
        self._fail(exc)


class _PushGather:
    """The outcome of a push to every shard: completes once EVERY shard answered (or timed out), so a
    failure can say exactly which shards applied the push (`PartialPushError`) and which did not."""

    def __init__(self, n: int, table: str, future: Future, name_of):
        self.outcomes: list = [None] * n  # True (applied) or the exception
        self.left, self.table, self.future, self.name_of = n, table, future, name_of
        self.lock = threading.Lock()

    def _record(self, k: int, outcome) -> None:
        with self.lock:
            if self.outcomes[k] is not None:
                return
            self.outcomes[k] = outcome
            self.left -= 1
            if self.left:
                return
        applied = [k for k, o in enumerate(self.outcomes) if o is True]
        failed = {k: o for k, o in enumerate(self.outcomes) if o is not True}
        if not failed:
            self.future.set_result(None)
        elif not applied:  # nothing changed anywhere: the shards are still in step
            self.future.set_exception(failed[min(failed)])
        else:
            reasons = "; ".join(f"{self.name_of(k)}: {exc}" for k, exc in failed.items())
            self.future.set_exception(P.PartialPushError(
                f"push to table {self.table!r} was applied by servers {applied} but not by servers "
                f"{sorted(failed)} ({reasons}); the shards are out of step until Client.resync() rolls them "
                "back to a common snapshot", self.table, applied, failed))

    def part(self, k: int) -> None:
        self._record(k, True)

    def error(self, k: int, exc: BaseException) -> None:
        self._record(k, exc)


def _ids_array(ids, table: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
        raise TableError(f"table {table!r}: ids must be integers, found dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise TableError(f"table {table!r}: ids must fit in int64, found {arr.max()}")
    return np.ascontiguousarray(arr, dtype=np.int64).reshape(-1)


class Client:
    """A worker's connection to all parameter servers (see `luoshu.ps.connect`)."""

    def __init__(self, addresses: list[str], worker_rank: int = 0, timeout_s: float = 30.0,
                 secret: str | None = None):
        import zmq

        if not addresses:
            raise PSError("a parameter-server client needs at least one server address")
        if not timeout_s > 0:
            raise PSError(f"timeout_s must be positive, found {timeout_s}")
        self.addresses = list(addresses)
        self.num_servers = len(self.addresses)
        self.worker_rank = int(worker_rank)
        self.timeout_s = float(timeout_s)
        self._zmq = zmq
        self._ctx = zmq.Context()
        self._socks = []
        for addr in self.addresses:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IMMEDIATE, 1)
            s.setsockopt(zmq.RECONNECT_IVL, 50)
            s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            A.secure_client(s, secret)
            s.connect(addr)
            self._socks.append(s)
        endpoint = f"inproc://luoshu-ps-client-{id(self)}-{os.getpid()}"
        self._wake_recv = self._ctx.socket(zmq.PAIR)
        self._wake_recv.bind(endpoint)
        self._wake_send = self._ctx.socket(zmq.PAIR)
        self._wake_send.connect(endpoint)
        self._wake_lock = threading.Lock()
        self._outbox: deque = deque()
        self._ids = itertools.count(1)
        self._closing = False
        self._closed = False
        self._told_servers = False
        self._tables: dict[str, dict] = {}
        self.counters = {"requests": 0, "rows_pulled": 0, "rows_pushed": 0, "bytes_sent": 0, "bytes_received": 0,
                         "timeouts": 0}
        self._thread = threading.Thread(target=self._io_loop, name="luoshu-ps-client", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"Client(worker {self.worker_rank}, {self.num_servers} servers: {self.addresses})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _server_name(self, k: int) -> str:
        return f"parameter server {k} at {self.addresses[k]}"

    # --- the I/O thread ------------------------------------------------------------------------
    def _submit(self, server: int, op: int, args: dict | None, arrays, on_reply, on_error,
                timeout_s: float | None = None) -> None:
        if self._closing:
            raise PSError("this parameter-server client is closed")
        request_id = next(self._ids)
        frames = P.encode(op, request_id, self.worker_rank, args, arrays)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        self._outbox.append(_Request(request_id, server, op, frames, deadline, on_reply, on_error))
        self.counters["requests"] += 1
        self.counters["bytes_sent"] += sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)
        with self._wake_lock:
            self._wake_send.send(b"", copy=True)

    def _io_loop(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._wake_recv, zmq.POLLIN)
        for s in self._socks:
            poller.register(s, zmq.POLLIN)
        pending: dict[int, _Request] = {}
        unsent = [deque() for _ in self._socks]
        next_expiry_check = 0.0
        while True:
            if any(unsent):
                timeout = 2
            elif pending:
                timeout = max(1, min(100, int((min(r.deadline for r in pending.values()) - time.monotonic()) * 1000)))
            else:
                timeout = 200
            events = dict(poller.poll(timeout))
            if self._wake_recv in events:
                while True:
                    try:
                        self._wake_recv.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            while self._outbox:
                req = self._outbox.popleft()
                pending[req.request_id] = req
                unsent[req.server].append(req)
            if self._closing:
                break
            for k, s in enumerate(self._socks):
                if s not in events:
                    continue
                while True:
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_reply(k, frames, pending)
            for k, queue in enumerate(unsent):
                while queue:
                    req = queue[0]
                    if req.request_id not in pending:  # expired while queued
                        queue.popleft()
                        continue
                    try:
                        self._socks[k].send_multipart(req.frames, flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    req.sent = True
                    req.frames = None
                    queue.popleft()
            now = time.monotonic()
            if pending and now >= next_expiry_check:
                next_expiry_check = now + 0.02
                for rid in [rid for rid, r in pending.items() if r.deadline <= now]:
                    req = pending.pop(rid)
                    if req.op == P.BYE:  # the server may be gone before it answers
                        continue
                    self.counters["timeouts"] += 1
                    how = "did not answer" if req.sent else "could not be reached for"
                    self._deliver_error(req, ServerUnavailableError(
                        f"{self._server_name(req.server)} {how} a {P.OP_NAMES.get(req.op, req.op)} request "
                        f"within {self.timeout_s:g} s (worker {self.worker_rank}); is the server dead?"))
        for req in pending.values():
            self._deliver_error(req, PSError("the parameter-server client was closed before the reply came"))
        while self._outbox:
            self._deliver_error(self._outbox.popleft(), PSError("the parameter-server client was closed"))

    def _on_reply(self, k: int, frames, pending: dict) -> None:
        self.counters["bytes_received"] += sum(f.buffer.nbytes for f in frames)
        try:
            msg = P.decode(frames)
        except P.ProtocolError as exc:
            rid, _ = P.peek_request_id(frames)
            req = pending.pop(rid, None)
            if req is not None:
                self._deliver_error(req, P.ProtocolError(f"{self._server_name(k)} sent a bad reply: {exc}"))
            return
        req = pending.pop(msg.request_id, None)
        if req is None:
            return  # the reply to a request that already timed out
        if msg.status != P.STATUS_OK:
            cls = P.ERROR_KINDS.get(msg.args.get("kind"), PSError)
            self._deliver_error(req, cls(f"{self._server_name(k)}: {msg.args.get('error', 'unknown error')}"))
            return
        try:
            req.on_reply(msg)
        except BaseException as exc:  # noqa: BLE001 - delivered through the future
            self._deliver_error(req, exc)

    @staticmethod
    def _deliver_error(req: _Request, exc: BaseException) -> None:
        try:
            req.on_error(exc)
        except Exception:  # noqa: BLE001 - a completed future
            pass

    # --- request helpers -----------------------------------------------------------------------
    def _call_all(self, op: int, args_of, servers=None, arrays_of=None, timeout_s=None) -> list:
        """Sends one request to each of `servers` (default all) and waits for all replies' messages."""
        servers = list(range(self.num_servers)) if servers is None else list(servers)
        future: Future = Future()
        gather = _Gather(len(servers), lambda parts: parts, future)
        for i, k in enumerate(servers):
            self._submit(k, op, args_of(k), arrays_of(k) if arrays_of else (),
                         lambda msg, i=i: gather.part(i, msg), gather.error, timeout_s)
        return self._wait(future, timeout_s)

    def _wait_s(self, timeout_s: float | None = None) -> float:
        # A server gives up on a waiting request (a sync pull, a barrier) a little before the client would,
        # so the error names the missing workers rather than blaming the server.
        return 0.8 * (self.timeout_s if timeout_s is None else timeout_s)

    def _wait(self, future: Future, timeout_s: float | None = None):
        # The I/O thread fails every request by its deadline; the margin only guards against a dead thread.
        return future.result(timeout=(self.timeout_s if timeout_s is None else timeout_s) + 30.0)

    # --- tables ----------------------------------------------------------------------------------
    def create_table(self, name: str, dim: int, *, num_rows: int | None = None, id_policy: str = "hash",
                     init=("normal", 0.0, 0.01), optimizer=("adam", {"lr": 1e-3}), dtype: str = "float32",
                     sync_workers: int | None = None, seed: int = 0, step_mode: str = "table") -> dict:
        """Creates a sharded table on every server (idempotent: the same call from every worker is fine;
        a different configuration under an existing name is refused). Returns its configuration.

        - `num_rows` / `id_policy`: ids outside [0, num_rows) are hashed into range ("hash") or refused
          with `IdOutOfRangeError` ("refuse"); None takes any int64 id.
        - `init`: ("normal", mean, std), ("truncated_normal", mean, std), ("uniform", low, high),
          ("constant", value) or ("zeros",); rows are a pure function of (name, seed, id): see `initial_rows`.
        - `optimizer`: (name, hyperparameters) of a `luoshu.optim` optimizer ("sgd", "momentum", "nesterov",
          "adagrad", "rmsprop", "adam", "adamw", "lamb"), applied lazily to the touched rows.
        - `step_mode`: "table" (bias corrections / lr decay count the table's updates, as `luoshu.optim`
          and torch SparseAdam) or "row" (each row counts its own updates; Adam, AdamW, AdaGrad).
        - `sync_workers=N`: one update per step from the summed pushes of N workers (see `push`).
        """
        if isinstance(optimizer, (list, tuple)) and len(optimizer) == 2 and optimizer[1] is None:
            optimizer = (optimizer[0], {})
        if isinstance(optimizer, str):
            optimizer = (optimizer, {})
        args = {"name": name, "dim": dim, "num_rows": num_rows, "id_policy": id_policy, "init": list(
            init) if isinstance(init, (list, tuple)) else init, "optimizer": _jsonable(optimizer), "dtype": dtype,
            "sync_workers": sync_workers, "seed": seed, "step_mode": step_mode}
        replies = self._call_all(P.CREATE_TABLE, lambda k: args)
        config = replies[0].args["config"]
        self._tables[name] = config
        return dict(config)

    def table_config(self, name: str) -> dict:
        """A table's configuration (asked of server 0 once, then cached)."""
        config = self._tables.get(name)
        if config is None:
            config = self._call_all(P.TABLE_INFO, lambda k: {"table": name}, servers=[0])[0].args["config"]
            self._tables[name] = config
        return config

    def _split(self, name: str, ids) -> tuple[dict, np.ndarray, list]:
        config = self.table_config(name)
        ids = _ids_array(ids, name)
        mapped = P.map_ids(ids, config["num_rows"], config["id_policy"], name)
        if self.num_servers == 1:
            return config, mapped, [None]
        shard = P.shard_of(mapped, self.num_servers)
        order = np.argsort(shard, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(shard, minlength=self.num_servers))])
        return config, mapped, [order[bounds[k]:bounds[k + 1]] for k in range(self.num_servers)]

    def pull_async(self, name: str, ids) -> Future:
        """Starts a pull of the rows of `ids`; the future's `.result(timeout)` is (rows, versions)."""
        config, mapped, positions = self._split(name, ids)
        n, dim = mapped.size, config["dim"]
        future: Future = Future()
        if n == 0:
            future.set_result((np.empty((0, dim), dtype=config["dtype"]), np.empty(0, dtype=np.int64)))
            return future
        servers = [k for k, pos in enumerate(positions) if pos is None or pos.size]

        def finish(parts):
            if positions[0] is None:
                rows, versions = parts[0]
                return np.array(rows), np.array(versions)
            rows = np.empty((n, dim), dtype=config["dtype"])
            versions = np.empty(n, dtype=np.int64)
            for k, (r, v) in zip(servers, parts):
                rows[positions[k]] = r
                versions[positions[k]] = v
            return rows, versions

        gather = _Gather(len(servers), finish, future)
        for i, k in enumerate(servers):
            part = mapped.copy() if positions[k] is None else mapped[positions[k]]
            self._submit(k, P.PULL, {"table": name, "wait_s": self._wait_s()}, (part,),
                         lambda msg, i=i: gather.part(i, (msg.arrays[0], msg.arrays[1])), gather.error)
        self.counters["rows_pulled"] += n
        return future

    def pull(self, name: str, ids) -> tuple[np.ndarray, np.ndarray]:
        """The rows of `ids` (len(ids), dim) and each row's version (number of updates applied)."""
        return self._wait(self.pull_async(name, ids))

    def push(self, name: str, ids, grads, scale: float = 1.0) -> Future:
        """Sends gradients of rows `ids` (duplicates are summed, times `scale`); the server applies
        its optimizer and bumps each touched row's version. The future completes on acceptance."""
        config, mapped, positions = self._split(name, ids)
        grads = np.asarray(grads)
        if grads.dtype.kind != "f" or grads.shape != (mapped.size, config["dim"]):
            raise TableError(f"push to table {name!r}: grads must be floating with shape "
                             f"({mapped.size}, {config['dim']}), found {grads.dtype}{list(grads.shape)}")
        grads = np.ascontiguousarray(grads)
        # Checked here, not only on the servers: a shard refusing its part while the others apply
        # theirs would leave the table out of step.
        if grads.size and not np.isfinite(grads).all():
            bad = int(grads.size - np.isfinite(grads).sum())
            raise P.ProtocolError(f"push to table {name!r}: {bad} gradient values are NaN or infinite; refused, "
                                  "nothing sent")
        if not (isinstance(scale, (int, float, np.floating)) and np.isfinite(scale)):
            raise P.ProtocolError(f"push to table {name!r}: scale must be a finite number, found {scale!r}")
        future: Future = Future()
        gather = _PushGather(self.num_servers, name, future, self._server_name)
        # Every server gets a part, empty or not, so the table step advances on every shard.
        for k in range(self.num_servers):
            if positions[0] is None:
                # Private copies: frames leave zero-copy later, and the caller may reuse its buffers at once.
                part_ids, part_grads = mapped.copy(), grads.copy()
            else:
                part_ids, part_grads = mapped[positions[k]], grads[positions[k]]
            self._submit(k, P.PUSH, {"table": name, "scale": float(scale)}, (part_ids, part_grads),
                         lambda msg, k=k: gather.part(k), lambda exc, k=k: gather.error(k, exc))
        self.counters["rows_pushed"] += mapped.size
        return future

    # --- dense tensors -------------------------------------------------------------------------------
    def dense_home(self, name: str) -> int:
        """The server that holds dense tensor `name` (a stable hash of the name)."""
        return zlib.crc32(name.encode()) % self.num_servers

    def create_dense(self, name: str, array, optimizer=("adam", {"lr": 1e-3}), *, sync_workers: int | None = None,
                     dtype: str | None = None) -> dict:
        """Places a dense tensor (initial value `array`) on its server; idempotent across workers."""
        array = np.ascontiguousarray(array)
        if isinstance(optimizer, str):
            optimizer = (optimizer, {})
        dtype = dtype or ("float64" if array.dtype == np.float64 else "float32")
        args = {"name": name, "shape": list(array.shape), "dtype": dtype, "optimizer": _jsonable(optimizer),
                "sync_workers": sync_workers}
        reply = self._call_all(P.CREATE_DENSE, lambda k: args, servers=[self.dense_home(name)],
                               arrays_of=lambda k: (array.astype(dtype, copy=False),))[0]
        return reply.args["config"]

    def pull_dense_async(self, name: str) -> Future:
        future: Future = Future()
        gather = _Gather(1, lambda parts: parts[0], future)
        self._submit(self.dense_home(name), P.PULL_DENSE, {"name": name, "wait_s": self._wait_s()}, (),
                     lambda msg: gather.part(0, (np.array(msg.arrays[0]), msg.args["version"])), gather.error)
        return future

    def pull_dense(self, name: str, with_version: bool = False):
        """The dense tensor's current value (and its version: the number of updates, if asked)."""
        value, version = self._wait(self.pull_dense_async(name))
        return (value, version) if with_version else value

    def push_dense(self, name: str, grad, scale: float = 1.0) -> Future:
        """Sends a dense gradient; its server applies the optimizer (one update per sync round)."""
        grad = np.array(grad, order="C")  # a private copy: the frame leaves later
        future: Future = Future()
        gather = _Gather(1, lambda parts: None, future)
        self._submit(self.dense_home(name), P.PUSH_DENSE, {"name": name, "scale": float(scale)}, (grad,),
                     lambda msg: gather.part(0, None), gather.error)
        return future

    # --- control -------------------------------------------------------------------------------
    def hello(self) -> list[dict]:
        """Each server's identity, tables and restore status; checks the server list is consistent."""
        infos = [m.args for m in self._call_all(P.HELLO, lambda k: {})]
        for k, info in enumerate(infos):
            if (info["server_index"], info["num_servers"]) != (k, self.num_servers):
                raise PSError(f"{self._server_name(k)} says it is server {info['server_index']} of "
                              f"{info['num_servers']}, the client expected server {k} of {self.num_servers}")
        return infos

    def snapshot(self, tag: str | None = None) -> list[str]:
        """Makes every server write a snapshot now; returns their paths. With `tag` (1-64 characters of
        [A-Za-z0-9_.-], e.g. f"step-{step}") the snapshots can later be restored together by `resync`."""
        args = {} if tag is None else {"tag": tag}
        return [m.args["path"] for m in self._call_all(P.SNAPSHOT, lambda k: args)]

    def resync(self) -> str:
        """Rolls every server back to the newest snapshot tag that all of them hold, so the shards of
        every table are at the same step again (after a `PartialPushError`, or a server that restarted
        from its snapshot while the others went on); returns that tag, for the worker to resume from it.
        Raises `SnapshotError` when the servers share no tagged snapshot."""
        infos = self.hello()
        common = None
        for info in infos:
            tags = info.get("snapshot_tags") or []
            common = list(tags) if common is None else [t for t in common if t in tags]
        if not common:
            raise P.SnapshotError(f"resync: the servers share no tagged snapshot (their tags: "
                                  f"{[info.get('snapshot_tags') for info in infos]}); take one with snapshot(tag=...)")
        tag = common[0]  # newest first on every server
        self._call_all(P.RESTORE, lambda k: {"tag": tag})
        self._tables.clear()
        return tag

    def stats(self) -> dict:
        """{"servers": [per-server counters and tables], "client": this client's counters}."""
        return {"servers": [m.args for m in self._call_all(P.STATS, lambda k: {})], "client": dict(self.counters)}

    def barrier(self, timeout_s: float | None = None) -> None:
        """Waits until every worker of the job has reached a barrier (held by server 0)."""
        self._call_all(P.BARRIER, lambda k: {"wait_s": self._wait_s(timeout_s)}, servers=[0], timeout_s=timeout_s)

    def shutdown_servers(self, force: bool = False, timeout_s: float | None = None) -> None:
        """Tells the servers this worker is done; they exit once every worker has (or at once with force)."""
        self._told_servers = True
        replies = self._call_all(P.SHUTDOWN, lambda k: {"force": bool(force)}, timeout_s=timeout_s)
        # Tell each stopping server its reply arrived, so it can exit now rather than after its grace period.
        for k, reply in enumerate(replies):
            if reply.args.get("stopping"):
                self._submit(k, P.BYE, {}, (), lambda msg: None, lambda exc: None, timeout_s=2.0)

    def close(self) -> None:
        """Stops the I/O thread and closes the sockets (pending requests fail)."""
        if self._closed:
            return
        self._closing = True
        with self._wake_lock:
            self._wake_send.send(b"")
        self._thread.join(timeout=5.0)
        for s in (*self._socks, self._wake_send, self._wake_recv):
            s.close(linger=0)
        self._ctx.term()
        self._closed = True


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def connect(store=None, addresses=None, worker_rank: int | None = None, timeout_s: float = 30.0,
            secret: str | None = None) -> Client:
    """Connects a worker to the parameter servers: by `addresses` (a list, or what
    `start_local_servers` returned) or through `store`, where `serve` published them (by default
    the launcher's store, with `worker_rank` = `luoshu.distributed.rank()`).
    `secret` authenticates this worker (default: the servers' own from `start_local_servers`,
    else the job's `LUOSHU_JOB_SECRET`; see `luoshu.ps.auth`).
    Checks every server answers (else `ServerUnavailableError` within `timeout_s`)."""
    # Under `luoshu launch --servers S`, luoshu.distributed knows the rendezvous store and this worker's rank
    # (torchrun's RANK also counts the server processes).
    if dist.is_initialized():
        if addresses is None and store is None and dist.num_servers() > 0:
            store, _ = dist.ps_store()
        if worker_rank is None:
            worker_rank = dist.rank()
    if addresses is None:
        if store is None:
            raise PSError("connect needs store= (a torch.distributed Store), addresses=, or a job started by "
                          "`luoshu launch --servers S` with luoshu.distributed.init() called")
        num = int(store.get(f"{STORE_PREFIX}/num_servers").decode())
        addresses = [store.get(f"{STORE_PREFIX}/{k}/address").decode() for k in range(num)]
    elif hasattr(addresses, "addresses"):
        if secret is None:
            secret = getattr(addresses, "secret", None)
        addresses = addresses.addresses
    elif isinstance(addresses, str):
        addresses = [addresses]
    if worker_rank is None:
        worker_rank = int(os.environ.get("LUOSHU_WORKER_RANK", os.environ.get("RANK", "0")))
    client = Client(list(addresses), worker_rank, timeout_s, secret if secret is not None else A.job_secret())
    try:
        client.hello()
    except BaseException:
        client.close()
        raise
    if dist.is_initialized():
        # The job's own servers (found through the launcher's store) are told at the worker's exit, so a
        # script that never calls shutdown_servers() still lets them stop at once.
        job_store = dist.ps_store()[0]
        dist.on_shutdown(_at_job_exit(client, tell_servers=job_store is not None and store is job_store))
    return client


EXIT_TIMEOUT_S = 5.0


def _at_job_exit(client: Client, tell_servers: bool):
    """The hook `luoshu.distributed.shutdown` runs for `client` (held weakly: it may be gone by then)."""
    ref = weakref.ref(client)

    def hook() -> None:
        c = ref()
        if c is None or c._closed:
            return
        try:
            if tell_servers and not c._told_servers:
                c.shutdown_servers(timeout_s=EXIT_TIMEOUT_S)
        finally:
            c.close()

    return hook
