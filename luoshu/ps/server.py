"""Parameter-server processes: key-sharded tables and dense tensors, server-side optimizers, sync rounds.

One server owns the rows of every table whose ids hash to it (`protocol.shard_of`) and a
share of the dense tensors (each lives whole on the server its name hashes to). Rows are
created on first touch (pull or push) from the table's seeded initialiser. Updates reuse
`luoshu.optim`'s rules on the gathered touched rows, so a sparse push applies exactly
the lazy update a single-process `luoshu.optim` step applies to an `IndexedSlices`
gradient (untouched rows and their state never change; Adam's bias correction uses the
table's step, the number of updates the table received, as torch SparseAdam). With
``step_mode="row"`` Adam and AdaGrad count steps per row instead (HET's per-row clock).

Every push reaches every server (an empty part where a server owns none of the ids),
so the table step is the same on all shards. In synchronous mode (``sync_workers=N``)
the pushes of one step from all N workers are summed and applied as ONE update once all
have arrived; a worker's pull after its push waits for that update.

The loop is single-threaded over a ZeroMQ ROUTER socket: a request is decoded and
checked in full before it changes anything; a malformed one is logged and answered
with an error, and the server keeps serving.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import socket
import sys
import time
from collections import deque

import numpy as np
import torch

from luoshu.core.errors import Error
from luoshu.optim.rules import UpdateRule
from luoshu.ps import auth as A
from luoshu.ps import protocol as P
from luoshu.ps import snapshot as S
from luoshu.ps.protocol import STORE_PREFIX, ProtocolError, PSError, SnapshotError, TableError, WorkerTimeoutError

log = logging.getLogger("luoshu.ps")

TABLE_DTYPES = {"float32": torch.float32, "float64": torch.float64}

SHUTDOWN_GRACE_S = 5.0

# Bounds on what one request may ask for: a client value is checked against these before it is used.
MAX_NAME_CHARS = 256
MAX_DIM = 1 << 15
MAX_NUM_ROWS = 1 << 62
DEFAULT_WAIT_S = 60.0
MAX_WAIT_S = 24 * 3600.0

# The args each op takes (besides "arrays", which `protocol.decode` consumes) and how many arrays it
# carries. Anything else is refused: the server never reads a key it did not define here.
OP_ARGS = {
    P.PING: frozenset(), P.HELLO: frozenset(), P.SNAPSHOT: frozenset({"tag"}), P.RESTORE: frozenset({"tag"}),
    P.STATS: frozenset(), P.BYE: frozenset(),
    P.CREATE_TABLE: frozenset({"name", "dim", "num_rows", "id_policy", "init", "optimizer", "dtype",
                               "sync_workers", "seed", "step_mode"}),
    P.TABLE_INFO: frozenset({"table"}), P.PULL: frozenset({"table", "wait_s"}),
    P.PUSH: frozenset({"table", "scale"}),
    P.CREATE_DENSE: frozenset({"name", "shape", "dtype", "optimizer", "sync_workers"}),
    P.PULL_DENSE: frozenset({"name", "wait_s"}), P.PUSH_DENSE: frozenset({"name", "scale"}),
    P.BARRIER: frozenset({"wait_s"}), P.SHUTDOWN: frozenset({"force"}),
}
OP_ARRAYS = {P.PULL: 1, P.PUSH: 2, P.CREATE_DENSE: 1, P.PUSH_DENSE: 1}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_request(msg: P.Message) -> None:
    """Refuses args the op does not take and a wrong number of arrays, before any handler runs."""
    allowed = OP_ARGS[msg.op]
    unknown = sorted(set(msg.args) - allowed)
    name = P.OP_NAMES[msg.op]
    if unknown:
        raise ProtocolError(f"{name} takes the args {sorted(allowed)}, found unknown {unknown}")
    expected = OP_ARRAYS.get(msg.op, 0)
    if len(msg.arrays) != expected:
        raise ProtocolError(f"{name} takes {expected} arrays, found {len(msg.arrays)}")


def _wait_arg(args: dict, what: str) -> float:
    """The seconds a waiting request may wait (the client's `wait_s`), checked."""
    wait_s = args.get("wait_s", DEFAULT_WAIT_S)
    if not _is_number(wait_s) or not 0 < wait_s <= MAX_WAIT_S:
        raise ProtocolError(f"{what}: wait_s must be a number of seconds in (0, {MAX_WAIT_S:g}], found {wait_s!r}")
    return float(wait_s)


def _name_arg(value, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
        raise TableError(f"{what} must be a non-empty string of at most {MAX_NAME_CHARS} characters, "
                         f"found {value!r:.80}")
    return value


def _scale_arg(args: dict, what: str) -> float:
    scale = args.get("scale", 1.0)
    if not _is_number(scale) or not math.isfinite(scale):
        raise ProtocolError(f"{what}: scale must be a finite number, found {scale!r}")
    return float(scale)


_TAG = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _tag_arg(args: dict, what: str, required: bool) -> str | None:
    tag = args.get("tag")
    if tag is None and not required:
        return None
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise ProtocolError(f"{what}: tag must be 1-64 characters of [A-Za-z0-9_.-], found {tag!r:.80}")
    return tag


class _Waiting:
    """A request the server holds (a sync pull, a barrier): its reply address and the server's own deadline.
    The deadline lives here, never in the client's args, so no client value is trusted after the check."""

    __slots__ = ("identity", "msg", "variable", "deadline", "wait_s")

    def __init__(self, identity: bytes, msg: P.Message, variable, wait_s: float):
        self.identity, self.msg, self.variable, self.wait_s = identity, msg, variable, wait_s
        self.deadline = time.monotonic() + wait_s


# --- a vectorised id -> slot map -----------------------------------------------------------
class IdIndex:
    """Open-addressing hash map from int64 ids to dense slots 0..size-1, vectorised over batches."""

    def __init__(self, capacity: int = 1024):
        self.size = 0
        self._alloc(max(16, 1 << (int(capacity) - 1).bit_length()))

    def _alloc(self, capacity: int) -> None:
        self._mask = np.uint64(capacity - 1)
        self._keys = np.zeros(capacity, dtype=np.int64)
        self._slots = np.full(capacity, -1, dtype=np.int64)

    def _home(self, ids: np.ndarray) -> np.ndarray:
        return (P.splitmix64(ids.view(np.uint64) ^ np.uint64(0x5851F42D4C957F2D)) & self._mask).astype(np.int64)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """The slot of each id, -1 where absent."""
        out = np.full(ids.size, -1, dtype=np.int64)
        pos = self._home(ids)
        pending = np.arange(ids.size)
        mask = int(self._mask)
        while pending.size:
            p = pos[pending]
            slot = self._slots[p]
            empty = slot < 0
            hit = ~empty & (self._keys[p] == ids[pending])
            out[pending[hit]] = slot[hit]
            pending = pending[~empty & ~hit]
            pos[pending] = (pos[pending] + 1) & mask
        return out

    def insert(self, ids: np.ndarray) -> np.ndarray:
        """Adds distinct absent `ids`; returns their new slots (size, size+1, ...)."""
        new_slots = np.arange(self.size, self.size + ids.size, dtype=np.int64)
        if 2 * (self.size + ids.size) > self._slots.size:
            old_keys, old_slots = self._keys[self._slots >= 0], self._slots[self._slots >= 0]
            capacity = self._slots.size
            while 2 * (self.size + ids.size) > capacity:
                capacity *= 2
            self._alloc(capacity)
            self._place(old_keys, old_slots)
        self._place(ids, new_slots)
        self.size += ids.size
        return new_slots

    def _place(self, ids: np.ndarray, slots: np.ndarray) -> None:
        pos = self._home(ids)
        pending = np.arange(ids.size)
        mask = int(self._mask)
        while pending.size:
            p = pos[pending]
            free = self._slots[p] < 0
            cand, cpos = pending[free], p[free]
            # Several new ids may want one free cell: the first of each takes it, the rest probe on.
            cells, first = np.unique(cpos, return_index=True)
            winners = cand[first]
            self._keys[cells] = ids[winners]
            self._slots[cells] = slots[winners]
            taken = np.zeros(ids.size, dtype=bool)
            taken[winners] = True
            occupied = pending[~free]
            pos[occupied] = (pos[occupied] + 1) & mask
            pending = pending[~taken[pending]]

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, slots) of every entry, ordered by slot."""
        used = self._slots >= 0
        ids, slots = self._keys[used], self._slots[used]
        order = np.argsort(slots)
        return ids[order], slots[order]


# --- server-side optimizer rules -------------------------------------------------------------
class _Rule(UpdateRule):
    """A table's or dense tensor's rule: `luoshu.optim`'s `UpdateRule`, its errors as `TableError`s."""

    def __init__(self, spec, step_mode: str, where: str):
        if not (isinstance(spec, (list, tuple)) and len(spec) == 2 and isinstance(spec[0], str)
                and isinstance(spec[1], dict)):
            raise TableError(f"{where}: optimizer must be (name, {{hyperparameters}}), e.g. ('adam', {{'lr': 1e-3}}); "
                             f"found {spec!r}")
        if step_mode not in ("table", "row"):
            raise TableError(f"{where}: step_mode must be 'table' or 'row', found {step_mode!r}")
        try:
            super().__init__(spec[0], dict(spec[1]), row_steps=step_mode == "row")
        except Error as exc:
            raise TableError(f"{where}: {exc}") from None


# --- synchronous rounds -----------------------------------------------------------------------
class _SyncRounds:
    """Collects each worker's k-th push into round k; a round completes when all N have pushed."""

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.pushed = [0] * num_workers
        self.applied = 0
        self.rounds: deque = deque()

    def check_worker(self, worker: int, what: str) -> None:
        if not 0 <= worker < self.num_workers:
            raise PSError(f"{what} is synchronous over {self.num_workers} workers (ranks 0..{self.num_workers - 1}), "
                          f"found a request from worker {worker}")

    def add(self, worker: int, part) -> list:
        """Adds a push; returns the parts of each round it completed (ordered by worker rank)."""
        r = self.pushed[worker] - self.applied
        while len(self.rounds) <= r:
            self.rounds.append({})
        self.rounds[r][worker] = part
        self.pushed[worker] += 1
        done = []
        while self.rounds and len(self.rounds[0]) == self.num_workers:
            parts = self.rounds.popleft()
            self.applied += 1
            done.append([parts[w] for w in sorted(parts)])
        return done

    def must_wait(self, worker: int) -> bool:
        return 0 <= worker < self.num_workers and self.pushed[worker] > self.applied

    def missing(self) -> list[int]:
        """The workers whose push of the next round has not arrived."""
        return [w for w in range(self.num_workers) if self.pushed[w] <= self.applied]


# --- tables and dense tensors --------------------------------------------------------------------
def _table_config(args: dict) -> dict:
    """A table's configuration from create_table args, checked and normalised (JSON-able)."""
    name = _name_arg(args.get("name"), "a table name")
    dim = args.get("dim")
    if not _is_int(dim) or not 0 < dim <= MAX_DIM:
        raise TableError(f"table {name!r}: dim must be an integer in [1, {MAX_DIM}], found {dim!r}")
    num_rows = args.get("num_rows")
    if num_rows is not None and (not _is_int(num_rows) or not 0 < num_rows <= MAX_NUM_ROWS):
        raise TableError(f"table {name!r}: num_rows must be an integer in [1, 2**62] or None, found {num_rows!r}")
    policy = args.get("id_policy", "hash")
    if policy not in ("hash", "refuse"):
        raise TableError(f"table {name!r}: id_policy must be 'hash' or 'refuse', found {policy!r}")
    dtype = args.get("dtype", "float32")
    if dtype not in TABLE_DTYPES:
        raise TableError(f"table {name!r}: dtype must be one of {sorted(TABLE_DTYPES)}, found {dtype!r}")
    sync = args.get("sync_workers")
    if sync is not None and (not _is_int(sync) or not 0 < sync <= 1 << 20):
        raise TableError(f"table {name!r}: sync_workers must be a positive integer or None, found {sync!r}")
    seed = args.get("seed", 0)
    if not _is_int(seed) or not -(1 << 63) <= seed < 1 << 64:
        raise TableError(f"table {name!r}: seed must be a 64-bit integer, found {seed!r}")
    step_mode = args.get("step_mode", "table")
    if step_mode not in ("table", "row"):
        raise TableError(f"table {name!r}: step_mode must be 'table' or 'row', found {step_mode!r}")
    optimizer = args.get("optimizer")
    if isinstance(optimizer, (list, tuple)) and len(optimizer) == 2:
        optimizer = [str(optimizer[0]).lower(), optimizer[1]]
    return {"name": name, "dim": dim, "num_rows": num_rows, "id_policy": policy, "init": list(P.check_init(
        args.get("init", ("normal", 0.0, 0.01)))), "optimizer": optimizer, "dtype": dtype, "sync_workers": sync,
        "seed": seed, "step_mode": step_mode}


class _Variable:
    """What tables and dense tensors share: the rule, the step, sync rounds, counters."""

    def __init__(self, config: dict, where: str):
        self.config = config
        self.where = where
        self.rule = _Rule(config["optimizer"], config.get("step_mode", "table"), where)
        self.dtype = TABLE_DTYPES[config["dtype"]]
        self.step = torch.zeros((), dtype=torch.float32)
        self.updates = 0
        self.sync = _SyncRounds(config["sync_workers"]) if config["sync_workers"] else None
        self.counters = {"pulls": 0, "pushes": 0, "rows_pulled": 0, "rows_pushed": 0, "updates": 0}

    def _advance(self) -> bool:
        """Counts one update; returns whether the state is fresh (the first update), as luoshu.optim."""
        fresh = self.updates == 0
        self.updates += 1
        self.counters["updates"] += 1
        if self.rule.counts_steps:
            self.step += 1.0
        return fresh


class _Table(_Variable):
    def __init__(self, config: dict):
        super().__init__(config, f"table {config['name']!r}")
        self.name, self.dim = config["name"], config["dim"]
        self.index = IdIndex()
        self.size = 0
        # A small first block: a wide table must not cost a large allocation before it has rows.
        self._reserve(max(16, min(1024, (1 << 20) // self.dim)))

    def _reserve(self, capacity: int) -> None:
        old = getattr(self, "rows", None)
        if old is not None and old.shape[0] >= capacity:
            return
        new_cap = max(capacity, 2 * (old.shape[0] if old is not None else 0))
        rows = torch.empty((new_cap, self.dim), dtype=self.dtype)
        state = {n: torch.empty((new_cap, self.dim), dtype=self.dtype) for n in self.rule.state_names}
        versions = np.zeros(new_cap, dtype=np.int64)
        row_steps = torch.zeros(new_cap, dtype=torch.float32)
        if old is not None:
            n = self.size
            rows[:n] = old[:n]
            for name in state:
                state[name][:n] = self.state[name][:n]
            versions[:n] = self.versions[:n]
            row_steps[:n] = self.row_steps[:n]
        self.rows, self.state, self.versions, self.row_steps = rows, state, versions, row_steps

    def slots(self, ids: np.ndarray) -> np.ndarray:
        """The slots of `ids`, creating (and initialising) the rows of ids seen for the first time."""
        slots = self.index.lookup(ids)
        missing = slots < 0
        if missing.any():
            new_ids = np.unique(ids[missing])
            self._add_rows(new_ids, torch.from_numpy(P.initial_rows(
                self.name, new_ids, self.dim, self.config["init"], self.config["seed"], self.config["dtype"])))
            slots = self.index.lookup(ids)
        return slots

    def _add_rows(self, ids: np.ndarray, rows: torch.Tensor, state: dict | None = None,
                  versions: np.ndarray | None = None, row_steps: np.ndarray | None = None) -> None:
        self._reserve(self.size + ids.size)
        new = self.index.insert(ids)
        lo, hi = int(new[0]) if new.size else self.size, self.size + ids.size
        self.rows[lo:hi] = rows
        for name in self.rule.state_names:
            self.state[name][lo:hi] = (state[name] if state is not None
                                       else self.rule.initial_state(name, self.rows[lo:hi]))
        self.versions[lo:hi] = 0 if versions is None else versions
        self.row_steps[lo:hi] = 0 if row_steps is None else torch.from_numpy(row_steps)
        self.size = hi

    def check_ids(self, ids: np.ndarray) -> None:
        num_rows = self.config["num_rows"]
        if num_rows is not None and ids.size and (ids.min() < 0 or ids.max() >= num_rows):
            bad = ids[(ids < 0) | (ids >= num_rows)]
            raise P.IdOutOfRangeError(f"table {self.name!r} has num_rows={num_rows}: {bad.size} ids outside "
                                      f"[0, {num_rows}), e.g. {bad[:5].tolist()}")

    def pull(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slots = self.slots(ids)
        self.counters["pulls"] += 1
        self.counters["rows_pulled"] += ids.size
        # NumPy fancy indexing on a view of the torch storage: much cheaper than torch indexing at these sizes.
        return self.rows.numpy()[slots], self.versions[slots]

    def apply(self, parts: list) -> None:
        """One update from `parts`, a list of (ids, grads) already scaled: duplicates summed."""
        ids = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        grads = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        fresh = self._advance()
        if ids.size == 0:
            return
        slots = self.slots(ids)
        uniq, inverse = np.unique(slots, return_inverse=True)
        # Duplicates summed in order of occurrence with torch's index_add_, as luoshu.optim's coalescing does.
        summed = grads.new_zeros((uniq.size, self.dim))
        summed.index_add_(0, torch.from_numpy(inverse.reshape(-1)), grads)
        param = torch.from_numpy(self.rows.numpy()[uniq])
        state = {n: torch.from_numpy(self.state[n].numpy()[uniq]) for n in self.rule.state_names}
        row_steps = self.row_steps.numpy()
        row_steps[uniq] += 1.0
        self.rule.apply(param, summed, state, self.step, fresh, torch.from_numpy(row_steps[uniq]))
        self.rows.numpy()[uniq] = param.numpy()
        for n in self.rule.state_names:
            self.state[n].numpy()[uniq] = state[n].numpy()
        self.versions[uniq] += 1

    def info(self) -> dict:
        return {**self.config, "rows": self.size, "step": int(self.step.item()), "updates": self.updates,
                **self.counters}

    def snapshot_arrays(self, prefix: str) -> dict:
        n = self.size
        ids, slots = self.index.items()
        arrays = {f"{prefix}.ids": ids, f"{prefix}.rows": self.rows.numpy()[slots],
                  f"{prefix}.versions": self.versions[:n][slots],
                  f"{prefix}.row_steps": self.row_steps.numpy()[slots]}
        for name in self.rule.state_names:
            arrays[f"{prefix}.state.{name}"] = self.state[name].numpy()[slots]
        return arrays

    def restore(self, entry: dict, arrays: dict, prefix: str) -> None:
        ids = arrays[f"{prefix}.ids"]
        n = ids.size
        expect = {f"{prefix}.rows": (n, self.dim), f"{prefix}.versions": (n,), f"{prefix}.row_steps": (n,),
                  **{f"{prefix}.state.{s}": (n, self.dim) for s in self.rule.state_names}}
        for key, shape in expect.items():
            if key not in arrays or arrays[key].shape != shape:
                found = arrays[key].shape if key in arrays else "missing"
                raise SnapshotError(f"{self.where}: snapshot array {key} should have shape {shape}, found {found}")
        self._add_rows(ids.astype(np.int64), torch.from_numpy(arrays[f"{prefix}.rows"]).to(self.dtype),
                       {s: torch.from_numpy(arrays[f"{prefix}.state.{s}"]).to(self.dtype)
                        for s in self.rule.state_names},
                       arrays[f"{prefix}.versions"], arrays[f"{prefix}.row_steps"].astype(np.float32))
        self.step.fill_(float(entry["step"]))
        self.updates = int(entry["updates"])


def _check_finite(grads: np.ndarray, what: str) -> None:
    # A NaN or infinite gradient would poison the rows and their optimizer state for good.
    if grads.size and not np.isfinite(grads).all():
        bad = int(grads.size - np.isfinite(grads).sum())
        raise ProtocolError(f"{what}: {bad} gradient values are NaN or infinite; refused, nothing changed")


def _dense_config(args: dict) -> dict:
    name = _name_arg(args.get("name"), "a dense tensor name")
    sync = args.get("sync_workers")
    if sync is not None and (not _is_int(sync) or not 0 < sync <= 1 << 20):
        raise TableError(f"dense {name!r}: sync_workers must be a positive integer or None, found {sync!r}")
    dtype = args.get("dtype", "float32")
    if dtype not in TABLE_DTYPES:
        raise TableError(f"dense {name!r}: dtype must be one of {sorted(TABLE_DTYPES)}, found {dtype!r}")
    shape = args.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and 0 <= d < 1 << 40 for d in shape):
        raise TableError(f"dense {name!r}: shape must be a list of at most 8 non-negative ints, found {shape!r}")
    optimizer = args.get("optimizer")
    if isinstance(optimizer, (list, tuple)) and len(optimizer) == 2:
        optimizer = [str(optimizer[0]).lower(), optimizer[1]]
    return {"name": name, "shape": shape, "dtype": dtype, "optimizer": optimizer, "sync_workers": sync,
            "step_mode": "table"}


class _Dense(_Variable):
    def __init__(self, config: dict, value: np.ndarray):
        super().__init__(config, f"dense {config['name']!r}")
        self.name = config["name"]
        self.value = torch.from_numpy(np.array(value, dtype=config["dtype"]))
        self.state = {n: self.rule.initial_state(n, self.value) for n in self.rule.state_names}
        self.version = 0

    def apply(self, parts: list) -> None:
        grad = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
        fresh = self._advance()
        self.rule.apply(self.value, grad, self.state, self.step, fresh)
        self.version += 1

    def info(self) -> dict:
        return {**self.config, "step": int(self.step.item()), "updates": self.updates, "version": self.version,
                **self.counters}


# --- the server ---------------------------------------------------------------------------------------
class ParameterServer:
    """The state and request handling of one server; `run` drives it from a ZeroMQ ROUTER socket."""

    def __init__(self, server_index: int, num_servers: int, num_workers: int, snapshot_dir=None,
                 snapshot_every_s: float | None = None, keep_snapshots: int = 2):
        if not 0 <= server_index < num_servers:
            raise PSError(f"server_index must be in [0, {num_servers}), found {server_index}")
        if num_workers <= 0:
            raise PSError(f"num_workers must be positive, found {num_workers}")
        self.server_index, self.num_servers, self.num_workers = server_index, num_servers, num_workers
        self.snapshot_dir = None if snapshot_dir is None else str(snapshot_dir)
        self.snapshot_every_s = snapshot_every_s
        self.keep_snapshots = keep_snapshots
        self.tables: dict[str, _Table] = {}
        self.dense: dict[str, _Dense] = {}
        self.deferred: list[_Waiting] = []  # pulls waiting for a sync round
        self.barrier_waiting: dict[int, _Waiting] = {}
        self.barrier_generation = 0
        self.shutdown_from: set[int] = set()
        self.stopping = False  # every worker asked to shut down: exit once they have their replies
        self.stop_deadline = 0.0
        self.bye_from: set[int] = set()
        self.bye_expected: set[int] = set()  # workers told "stopping", whose BYE confirms they read it
        self.crashed = False  # set from another thread to stop at once, as a killed process would
        self.started = time.time()
        self.last_snapshot = time.monotonic()
        self.restored_from: str | None = None
        self.restored_tag: str | None = None
        self.counters = {"requests": 0, "errors": 0, "bytes_in": 0, "bytes_out": 0, "snapshots": 0,
                         "refused_connections": 0}
        self.name = f"parameter server {server_index}"
        if self.snapshot_dir is not None:
            self.restore()

    # --- dispatch -----------------------------------------------------------------------------
    def handle(self, identity: bytes, frames: list) -> list:
        """Answers one request; returns the (identity, reply frames) to send (deferred pulls may be released)."""
        self.counters["requests"] += 1
        try:
            self.counters["bytes_in"] += sum(P._buffer(f).nbytes for f in frames)
            msg = P.decode(frames)
            if msg.status != P.STATUS_OK:
                raise ProtocolError("a request must have status 0")
            _check_request(msg)
            handler = self._HANDLERS[msg.op]
            return handler(self, identity, msg)
        except Exception as exc:  # noqa: BLE001 - one bad request must never take the server down
            self.counters["errors"] += 1
            request_id, worker = P.peek_request_id(frames)
            if isinstance(exc, PSError):
                log.warning("%s: refused a request from worker %s: %s", self.name, worker, exc)
                err = exc
            elif isinstance(exc, Error):
                err = PSError(str(exc))
            elif isinstance(exc, (ValueError, TypeError, KeyError, IndexError, OverflowError)):
                log.warning("%s: refused a malformed request from worker %s: %r", self.name, worker, exc)
                err = ProtocolError(f"bad request: {type(exc).__name__}: {exc}")
            else:
                log.exception("%s: a request from worker %s failed", self.name, worker)
                err = PSError(f"the server failed on this request: {type(exc).__name__}: {exc}")
            return [(identity, P.error_frames(request_id, worker, err))]

    def _check_worker(self, msg: P.Message) -> None:
        if not 0 <= msg.worker < self.num_workers:
            raise PSError(f"{P.OP_NAMES[msg.op]} on {self.name}: the job has {self.num_workers} workers "
                          f"(ranks 0..{self.num_workers - 1}), found a request from worker {msg.worker}")

    def _reply(self, identity, msg: P.Message, args=None, arrays=()) -> list:
        return [(identity, P.encode(msg.op, msg.request_id, msg.worker, args, arrays))]

    def _table(self, args: dict) -> _Table:
        name = args.get("table")
        if not isinstance(name, str):
            raise TableError(f"a table name must be a string, found {name!r:.80}")
        table = self.tables.get(name) if isinstance(name, str) else None
        if table is None:
            raise TableError(f"no table {name!r} on {self.name} (tables: {sorted(self.tables)})")
        return table

    def _dense(self, args: dict) -> _Dense:
        name = args.get("name")
        if not isinstance(name, str):
            raise TableError(f"a dense tensor name must be a string, found {name!r:.80}")
        dense = self.dense.get(name) if isinstance(name, str) else None
        if dense is None:
            raise TableError(f"no dense tensor {name!r} on {self.name} (dense: {sorted(self.dense)})")
        return dense

    def _ping(self, identity, msg):
        return self._reply(identity, msg, {"server": self.server_index})

    def _hello(self, identity, msg):
        return self._reply(identity, msg, {"server_index": self.server_index, "num_servers": self.num_servers,
                                            "num_workers": self.num_workers, "protocol": P.VERSION,
                                            "tables": {n: t.config for n, t in self.tables.items()},
                                            "dense": {n: d.config for n, d in self.dense.items()},
                                            "restored_from": self.restored_from, "restored_tag": self.restored_tag,
                                            "snapshot_tags": [] if self.snapshot_dir is None else S.list_tags(
                                                self.snapshot_dir, self.server_index, self.num_servers)})

    def _create_table(self, identity, msg):
        config = _table_config(msg.args)
        existing = self.tables.get(config["name"])
        if existing is not None:
            if existing.config != config:
                diff = {k: (existing.config[k], config[k]) for k in config if existing.config.get(k) != config[k]}
                raise TableError(f"table {config['name']!r} exists with another configuration; "
                                 f"differences (existing, requested): {diff}")
        else:
            self.tables[config["name"]] = _Table(config)
        return self._reply(identity, msg, {"config": config})

    def _table_info(self, identity, msg):
        return self._reply(identity, msg, {"config": self._table(msg.args).config})

    def _ids_arg(self, msg: P.Message, table: _Table, n_arrays: int) -> np.ndarray:
        if len(msg.arrays) != n_arrays:
            raise ProtocolError(f"{P.OP_NAMES[msg.op]} on table {table.name!r} takes {n_arrays} arrays, "
                                f"found {len(msg.arrays)}")
        ids = msg.arrays[0]
        if ids.dtype != np.int64 or ids.ndim != 1:
            raise ProtocolError(f"{P.OP_NAMES[msg.op]} on table {table.name!r}: ids must be a 1-D int64 array, "
                                f"found {ids.dtype}{list(ids.shape)}")
        table.check_ids(ids)
        return ids

    def _pull(self, identity, msg, waited: _Waiting | None = None):
        table = self._table(msg.args)
        ids = self._ids_arg(msg, table, 1)
        wait_s = _wait_arg(msg.args, f"pull from table {table.name!r}") if waited is None else waited.wait_s
        if table.sync is not None:
            table.sync.check_worker(msg.worker, table.where)
            if table.sync.must_wait(msg.worker):
                self._defer(identity, msg, table, wait_s)
                return []
        rows, versions = table.pull(ids)
        return self._reply(identity, msg, None, (rows, versions))

    def _push(self, identity, msg):
        table = self._table(msg.args)
        ids = self._ids_arg(msg, table, 2)
        grads = msg.arrays[1]
        if grads.shape != (ids.size, table.dim) or grads.dtype.kind != "f":
            raise ProtocolError(f"push to table {table.name!r}: grads must be floating with shape "
                                f"({ids.size}, {table.dim}), found {grads.dtype}{list(grads.shape)}")
        scale = _scale_arg(msg.args, f"push to table {table.name!r}")
        _check_finite(grads, f"push to table {table.name!r}")
        g = torch.from_numpy(np.array(grads, dtype=table.config["dtype"]))
        if scale != 1.0:
            g.mul_(scale)
            # A finite scale times finite gradients can still overflow the table's dtype.
            _check_finite(g.numpy(), f"push to table {table.name!r} (gradients times scale {scale:g})")
        table.counters["pushes"] += 1
        table.counters["rows_pushed"] += ids.size
        if table.sync is None:
            table.apply([(ids, g)])
            return self._reply(identity, msg, {"applied": True})
        table.sync.check_worker(msg.worker, table.where)
        rounds = table.sync.add(msg.worker, (np.array(ids), g))
        for parts in rounds:
            table.apply(parts)
        return self._reply(identity, msg, {"applied": bool(rounds)}) + (self._release() if rounds else [])

    def _defer(self, identity, msg: P.Message, variable: _Variable, wait_s: float) -> None:
        self.deferred.append(_Waiting(identity, msg, variable, wait_s))

    def _release(self) -> list:
        """Answers the deferred pulls whose round has been applied (each its own error, if it fails now)."""
        waiting, self.deferred = self.deferred, []
        out = []
        for w in waiting:
            try:
                out += self._HANDLERS[w.msg.op](self, w.identity, w.msg, waited=w)
            except Exception as exc:  # noqa: BLE001 - the failure belongs to the waiting request, not this one
                self.counters["errors"] += 1
                log.warning("%s: a deferred request of worker %s failed: %s", self.name, w.msg.worker, exc)
                err = exc if isinstance(exc, PSError) else PSError(f"{type(exc).__name__}: {exc}")
                out.append((w.identity, P.error_frames(w.msg.request_id, w.msg.worker, err)))
        return out

    def expire(self, now: float | None = None) -> list:
        """Error replies for pulls and barriers that waited past their deadline, naming the missing workers."""
        now = time.monotonic() if now is None else now
        out = []
        if any(w.deadline <= now for w in self.deferred):
            keep = []
            for w in self.deferred:
                if w.deadline > now:
                    keep.append(w)
                    continue
                var = w.variable
                err = WorkerTimeoutError(
                    f"{var.where} on {self.name}: synchronous step {var.sync.applied + 1} still lacks the pushes of "
                    f"workers {var.sync.missing()} after {w.wait_s:g} s (dead or stuck?); "
                    f"the pull of worker {w.msg.worker} gives up")
                log.error("%s", err)
                out.append((w.identity, P.error_frames(w.msg.request_id, w.msg.worker, err)))
            self.deferred = keep
        if self.barrier_waiting and min(w.deadline for w in self.barrier_waiting.values()) <= now:
            missing = [r for r in range(self.num_workers) if r not in self.barrier_waiting]
            err = WorkerTimeoutError(f"barrier on {self.name}: workers {missing} did not arrive (dead or stuck?)")
            log.error("%s", err)
            for w in self.barrier_waiting.values():
                out.append((w.identity, P.error_frames(w.msg.request_id, w.msg.worker, err)))
            self.barrier_waiting = {}
        return out

    def _create_dense(self, identity, msg):
        config = _dense_config(msg.args)
        existing = self.dense.get(config["name"])
        if existing is not None:
            if existing.config != config:
                raise TableError(f"dense {config['name']!r} exists with another configuration: "
                                 f"{existing.config} vs {config}")
        else:
            if len(msg.arrays) != 1 or list(msg.arrays[0].shape) != config["shape"]:
                raise ProtocolError(f"create_dense {config['name']!r} needs one array of shape {config['shape']}")
            self.dense[config["name"]] = _Dense(config, msg.arrays[0])
        return self._reply(identity, msg, {"config": config})

    def _pull_dense(self, identity, msg, waited: _Waiting | None = None):
        dense = self._dense(msg.args)
        wait_s = _wait_arg(msg.args, f"pull of dense {dense.name!r}") if waited is None else waited.wait_s
        if dense.sync is not None:
            dense.sync.check_worker(msg.worker, dense.where)
            if dense.sync.must_wait(msg.worker):
                self._defer(identity, msg, dense, wait_s)
                return []
        dense.counters["pulls"] += 1
        # A copy: frames go out zero-copy after this returns, and the next push updates the value in place.
        return self._reply(identity, msg, {"version": dense.version}, (dense.value.numpy().copy(),))

    def _push_dense(self, identity, msg):
        dense = self._dense(msg.args)
        if len(msg.arrays) != 1 or list(msg.arrays[0].shape) != dense.config["shape"] \
                or msg.arrays[0].dtype.kind != "f":
            found = [f"{a.dtype}{list(a.shape)}" for a in msg.arrays]
            raise ProtocolError(f"push_dense {dense.name!r} needs one floating array of shape "
                                f"{dense.config['shape']}, found {found}")
        scale = _scale_arg(msg.args, f"push_dense {dense.name!r}")
        _check_finite(msg.arrays[0], f"push_dense {dense.name!r}")
        g = torch.from_numpy(np.array(msg.arrays[0], dtype=dense.config["dtype"]))
        if scale != 1.0:
            g.mul_(scale)
            _check_finite(g.numpy(), f"push_dense {dense.name!r} (gradient times scale {scale:g})")
        dense.counters["pushes"] += 1
        if dense.sync is None:
            dense.apply([g])
            return self._reply(identity, msg, {"applied": True})
        dense.sync.check_worker(msg.worker, dense.where)
        rounds = dense.sync.add(msg.worker, g)
        for parts in rounds:
            dense.apply(parts)
        return self._reply(identity, msg, {"applied": bool(rounds)}) + (self._release() if rounds else [])

    def _snapshot(self, identity, msg):
        path = self.snapshot(_tag_arg(msg.args, f"snapshot of {self.name}", required=False))
        return self._reply(identity, msg, {"path": str(path)})

    def _restore(self, identity, msg):
        """Rolls every table and dense tensor back to the snapshot tagged `tag` (see `Client.resync`)."""
        tag = _tag_arg(msg.args, f"restore of {self.name}", required=True)
        if self.snapshot_dir is None:
            raise SnapshotError(f"{self.name} has no snapshot_dir to restore from")
        out = []
        # Requests waiting on the state being replaced are answered, not left to time out.
        err = PSError(f"{self.name} was rolled back to snapshot {tag!r} while this request waited")
        for w in [*self.deferred, *self.barrier_waiting.values()]:
            out.append((w.identity, P.error_frames(w.msg.request_id, w.msg.worker, err)))
        if not self.restore(tag):
            raise SnapshotError(f"{self.name} has no good snapshot tagged {tag!r} (tags: "
                                f"{S.list_tags(self.snapshot_dir, self.server_index, self.num_servers)})")
        self.deferred, self.barrier_waiting = [], {}
        steps = {n: int(t.step.item()) for n, t in self.tables.items()}
        return out + self._reply(identity, msg, {"restored_tag": tag, "steps": steps})

    def _stats(self, identity, msg):
        return self._reply(identity, msg, self.stats())

    def _barrier(self, identity, msg):
        self._check_worker(msg)
        wait_s = _wait_arg(msg.args, f"barrier on {self.name}")
        out = []
        previous = self.barrier_waiting.get(msg.worker)
        if previous is not None:  # a worker that gave up and came again: its old request is answered, not lost
            out.append((previous.identity, P.error_frames(previous.msg.request_id, msg.worker, PSError(
                f"barrier on {self.name}: worker {msg.worker} entered the barrier again; this request is dropped"))))
        self.barrier_waiting[msg.worker] = _Waiting(identity, msg, None, wait_s)
        if len(self.barrier_waiting) < self.num_workers:
            return out
        waiting, self.barrier_waiting = self.barrier_waiting, {}
        self.barrier_generation += 1
        for w in waiting.values():
            out += self._reply(w.identity, w.msg, {"generation": self.barrier_generation})
        return out

    def _shutdown(self, identity, msg):
        self._check_worker(msg)
        force = msg.args.get("force", False)
        if not isinstance(force, bool):
            raise ProtocolError(f"shutdown on {self.name}: force must be true or false, found {force!r:.80}")
        self.shutdown_from.add(msg.worker)
        if force or len(self.shutdown_from) >= self.num_workers:
            if not self.stopping:
                self.stop_deadline = time.monotonic() + SHUTDOWN_GRACE_S
            self.stopping = True
        if self.stopping:
            self.bye_expected.add(msg.worker)
        return self._reply(identity, msg, {"stopping": self.stopping})

    def _bye(self, identity, msg):
        self._check_worker(msg)
        self.bye_from.add(msg.worker)
        return self._reply(identity, msg)

    def finished(self) -> bool:
        """Whether the loop should end: crashed, or stopping and every worker that asked has its reply
        (its BYE came) or the grace period is over. Closing at once could drop the last replies: a
        client socket discards what it has not read when the connection goes."""
        if self.crashed:
            return True
        return self.stopping and (self.bye_from >= self.bye_expected or time.monotonic() >= self.stop_deadline)

    _HANDLERS = {P.PING: _ping, P.HELLO: _hello, P.CREATE_TABLE: _create_table, P.TABLE_INFO: _table_info,
                 P.PULL: _pull, P.PUSH: _push, P.CREATE_DENSE: _create_dense, P.PULL_DENSE: _pull_dense,
                 P.PUSH_DENSE: _push_dense, P.SNAPSHOT: _snapshot, P.STATS: _stats, P.BARRIER: _barrier,
                 P.SHUTDOWN: _shutdown, P.BYE: _bye, P.RESTORE: _restore}

    # --- stats, snapshots ----------------------------------------------------------------------
    def stats(self) -> dict:
        return {"server_index": self.server_index, "uptime_s": time.time() - self.started, **self.counters,
                "tables": {n: t.info() for n, t in self.tables.items()},
                "dense": {n: d.info() for n, d in self.dense.items()}, "restored_from": self.restored_from}

    def snapshot(self, tag: str | None = None):
        """Writes a snapshot of every table and dense tensor (rows, versions, optimizer state)."""
        if self.snapshot_dir is None:
            raise SnapshotError(f"{self.name} has no snapshot_dir; start it with one to take snapshots")
        meta = {"tables": [], "dense": [], "tag": tag}
        arrays = {}
        for i, table in enumerate(self.tables.values()):
            meta["tables"].append({"config": table.config, "prefix": f"t{i}", "step": int(table.step.item()),
                                   "updates": table.updates})
            arrays.update(table.snapshot_arrays(f"t{i}"))
        for i, dense in enumerate(self.dense.values()):
            meta["dense"].append({"config": dense.config, "prefix": f"d{i}", "step": int(dense.step.item()),
                                  "updates": dense.updates, "version": dense.version})
            arrays[f"d{i}.value"] = dense.value.numpy()
            for s in dense.rule.state_names:
                arrays[f"d{i}.state.{s}"] = dense.state[s].numpy()
        path = S.write_snapshot(self.snapshot_dir, self.server_index, self.num_servers, meta, arrays,
                                keep=self.keep_snapshots)
        self.counters["snapshots"] += 1
        self.last_snapshot = time.monotonic()
        log.info("%s: snapshot written to %s", self.name, path)
        return path

    def restore(self, tag: str | None = None) -> bool:
        """Restores the newest good snapshot, if any; returns whether one was restored."""
        found = (S.load_newest(self.snapshot_dir, self.server_index, self.num_servers) if tag is None
                 else S.load_tagged(self.snapshot_dir, self.server_index, self.num_servers, tag))
        if found is None:
            return False
        path, meta, arrays = found
        tables, dense = {}, {}
        try:
            for entry in meta.get("tables", []):
                table = _Table(_table_config(entry["config"]))
                table.restore(entry, arrays, entry["prefix"])
                tables[table.name] = table
            for entry in meta.get("dense", []):
                config = _dense_config(entry["config"])
                p = entry["prefix"]
                d = _Dense(config, arrays[f"{p}.value"])
                for s in d.rule.state_names:
                    d.state[s] = torch.from_numpy(np.array(arrays[f"{p}.state.{s}"], dtype=config["dtype"]))
                d.step.fill_(float(entry["step"]))
                d.updates, d.version = int(entry["updates"]), int(entry["version"])
                dense[d.name] = d
        except (KeyError, TypeError, ValueError, Error) as exc:
            raise SnapshotError(f"{self.name}: snapshot {path} does not describe valid tables: {exc}") from exc
        self.tables, self.dense = tables, dense
        self.restored_from = str(path)
        self.restored_tag = meta.get("tag") if isinstance(meta.get("tag"), str) else None
        log.info("%s: restored %d tables and %d dense tensors from %s", self.name, len(tables), len(dense), path)
        return True

    # --- the loop ------------------------------------------------------------------------------
    def run(self, sock, ready=None, stop_when=None, monitor=None) -> None:
        """Serves requests on the bound ROUTER `sock` until the workers shut the server down (or,
        checked twice a second, `stop_when()` says every worker has left without doing so)."""
        import zmq

        if ready is not None:
            ready()
        next_check = time.monotonic() + 0.5
        while not self.finished():
            if stop_when is not None and not self.stopping and time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.5
                try:
                    gone = stop_when()
                except Exception:  # noqa: BLE001 - a failing check is no reason to stop serving
                    gone = False
                if gone:
                    log.info("%s: every worker has left; stopping", self.name)
                    self.stopping, self.stop_deadline = True, time.monotonic()
                    continue
            timeout = 200
            if self.snapshot_every_s and self.snapshot_dir is not None:
                due = self.last_snapshot + self.snapshot_every_s - time.monotonic()
                if due <= 0:
                    self._periodic_snapshot()
                    continue
                timeout = max(1, min(timeout, int(due * 1000)))
            ready = sock.poll(timeout, zmq.POLLIN)
            if monitor is not None:
                self._count_refused(monitor)
            if self.deferred or self.barrier_waiting:
                self._send(sock, self._expire_safely())
            if not ready:
                continue
            while True:
                try:
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                identity, body = frames[0].bytes, frames[1:]
                self._send(sock, self.handle(identity, body))
                if self.finished():
                    break
        if self.snapshot_dir is not None and self.snapshot_every_s and not self.crashed:
            self._periodic_snapshot()

    def _count_refused(self, monitor) -> None:
        """Counts the failed handshakes the socket monitor reported (peers without the job's keys)."""
        import zmq

        while True:
            try:
                monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except Exception:  # noqa: BLE001 - a monitor that fails must not end the loop
                return
            self.counters["refused_connections"] += 1
            log.warning("%s: refused a connection that did not authenticate", self.name)

    def _send(self, sock, replies: list) -> None:
        for ident, reply in replies:
            self.counters["bytes_out"] += sum(getattr(f, "nbytes", len(f)) for f in reply)
            try:
                sock.send_multipart([ident, *reply], copy=False)
            except Exception as exc:  # noqa: BLE001 - one reply that cannot go must not end the loop
                log.error("%s: could not send a reply: %s", self.name, exc)

    def _expire_safely(self) -> list:
        """`expire`, which must never end the loop: should it fail, everything waiting is answered with the error."""
        try:
            return self.expire()
        except Exception as exc:  # noqa: BLE001 - a bug here must not take the server down
            log.exception("%s: expiring waiting requests failed", self.name)
            err = PSError(f"{self.name} dropped this waiting request after an internal error: {exc}")
            waiting = [*self.deferred, *self.barrier_waiting.values()]
            self.deferred, self.barrier_waiting = [], {}
            return [(w.identity, P.error_frames(w.msg.request_id, w.msg.worker, err)) for w in waiting]

    def _periodic_snapshot(self) -> None:
        try:
            self.snapshot()
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop the serving
            log.error("%s: periodic snapshot failed: %s", self.name, exc)
            self.last_snapshot = time.monotonic()


def _configure(sock) -> None:
    import zmq

    sock.setsockopt(zmq.LINGER, 1000)
    # Never drop a reply (a ROUTER silently drops at the high-water mark): clients bound what is in flight.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)


class ServerSocket:
    """A server's bound ROUTER socket with its context, and, for a job with a secret, CURVE
    authentication: the ZAP handler that admits the job's client key, and a monitor that counts
    failed handshakes (`refused_connections` in the server's stats)."""

    def __init__(self, host: str, port: int | None, secret: str | None):
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        _configure(self.sock)
        self.auth = self.monitor = None
        try:
            if secret:
                self.auth = A.Authenticator(self.ctx, secret)
                A.secure_server(self.sock, secret)
                self.monitor = self.sock.get_monitor_socket(
                    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            self.port = _bind(self.sock, host, port)
        except BaseException:
            self.close()
            raise

    def close(self, linger: int | None = None) -> None:
        if self.monitor is not None:
            try:
                self.sock.disable_monitor()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self.monitor.close(linger=0)
            self.monitor = None
        if self.auth is not None:
            self.auth.close()
            self.auth = None
        self.sock.close(linger=linger)
        self.ctx.term()


def _bind(sock, host: str, port: int | None) -> int:
    if port:
        sock.bind(f"tcp://{host}:{port}")
        return port
    return sock.bind_to_random_port(f"tcp://{host}")


def _local_ip_towards(peer: str) -> str:
    """This machine's address as `peer` would reach it (no packet is sent)."""
    if peer in ("127.0.0.1", "localhost", ""):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def serve(store, server_index: int, num_servers: int, num_workers: int, snapshot_dir=None,
          snapshot_every_s: float | None = None, host: str | None = None, port: int | None = None,
          secret: str | None = None) -> None:
    """Runs parameter server `server_index` of `num_servers` until the workers shut it down.

    The server binds a TCP port on one interface, `host` (default `LUOSHU_PS_HOST`, else this
    machine's address towards the rendezvous host: loopback on a single node), never on all of
    them; on a restart it takes the port it published before, so clients reconnect. It admits
    only peers holding the job's `secret` (default `LUOSHU_JOB_SECRET`, which the launcher sets;
    see `luoshu.ps.auth`), restores the newest good snapshot under `snapshot_dir`, and publishes
    its address in `store` (a torch.distributed Store) under ``luoshu/ps/<index>/address`` for
    `luoshu.ps.connect(store=...)`.
    """
    key = f"{STORE_PREFIX}/{server_index}/address"
    if port is None and store is not None and store.check([key]):
        port = int(store.get(key).decode().rsplit(":", 1)[1])
    if host is None:
        host = os.environ.get("LUOSHU_PS_HOST") or _local_ip_towards(os.environ.get("MASTER_ADDR", "127.0.0.1"))
    server = ParameterServer(server_index, num_servers, num_workers, snapshot_dir, snapshot_every_s)
    ss = ServerSocket(host, port, secret if secret is not None else A.job_secret())
    try:
        address = f"tcp://{host}:{ss.port}"

        def publish():
            if store is not None:
                store.set(f"{STORE_PREFIX}/num_servers", str(num_servers))
                store.set(key, address)
            log.info("%s listening on %s", server.name, address)

        from luoshu.distributed import env as dist

        server.run(ss.sock, publish, stop_when=dist.workers_gone if store is not None else None, monitor=ss.monitor)
    finally:
        ss.close()


READY_LINE = "LUOSHU_PS_READY"


def main(argv=None) -> int:
    """Entry of a server subprocess (`python -m luoshu.ps.server`): prints its address once ready.
    The job's secret comes in the environment (`LUOSHU_JOB_SECRET`), never on the command line."""
    parser = argparse.ArgumentParser(description="one luoshu parameter server")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--num-servers", type=int, required=True)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--snapshot-dir", default=None)
    parser.add_argument("--snapshot-every-s", type=float, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LUOSHU_PS_LOG", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)
    server = ParameterServer(args.index, args.num_servers, args.num_workers, args.snapshot_dir,
                             args.snapshot_every_s)
    ss = ServerSocket(args.host, args.port or None, A.job_secret())
    try:
        def ready():
            print(f"{READY_LINE} tcp://{args.host}:{ss.port}", flush=True)

        server.run(ss.sock, ready, monitor=ss.monitor)
    finally:
        ss.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
