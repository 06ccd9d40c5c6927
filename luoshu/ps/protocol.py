"""The parameter-server wire protocol: message layout, validation, errors, id hashing and initial rows.

A message is a ZeroMQ multipart message of frames:

    [header, args, array_0, ..., array_{n-1}]

- `header`: 24 bytes, little endian: magic ``b"LSPS"``, protocol version (u8), op code (u8),
  status (u8: 0 ok, 1 error), reserved (u8), number of array frames (u32), request id (u64),
  worker rank (i32).
- `args`: UTF-8 JSON object with the request's small arguments (table name, scale, ...) and,
  under ``"arrays"``, one ``[dtype, shape]`` pair per array frame.
- each array frame holds the raw C-order bytes of one NumPy array, sent without copies
  (``send_multipart(copy=False)``) and viewed without copies on receipt (``np.frombuffer``).

`decode` checks everything (magic, version, op, frame count, JSON, dtypes, shapes against
byte sizes) and raises `ProtocolError` naming what was wrong, so a malformed or truncated
message is refused before it can touch a table. Replies use the same layout; an error
reply has status 1 and carries ``{"error": message, "kind": error class name}``.

The module also holds what client and server must agree on bit for bit: the stable
64-bit id hash that picks a shard and maps out-of-range ids into a table, and the
counter-based initialiser that gives an id the same initial row on any server.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

from luoshu.core.errors import Error

# Keys of the job's rendezvous store under which the servers publish their addresses.
STORE_PREFIX = "luoshu/ps"

MAGIC = b"LSPS"
VERSION = 1
HEADER = struct.Struct("<4sBBBBIQi")
HEADER_SIZE = HEADER.size  # 24
MAX_ARRAYS = 64
MAX_ARGS_BYTES = 1 << 20

# Op codes. Values are part of the wire format: append, never renumber.
PING, HELLO, CREATE_TABLE, TABLE_INFO, PULL, PUSH, CREATE_DENSE, PULL_DENSE, PUSH_DENSE, SNAPSHOT, STATS, \
    BARRIER, SHUTDOWN, BYE, RESTORE = range(1, 16)
OP_NAMES = {PING: "ping", HELLO: "hello", CREATE_TABLE: "create_table", TABLE_INFO: "table_info", PULL: "pull",
            PUSH: "push", CREATE_DENSE: "create_dense", PULL_DENSE: "pull_dense", PUSH_DENSE: "push_dense",
            SNAPSHOT: "snapshot", STATS: "stats", BARRIER: "barrier", SHUTDOWN: "shutdown", BYE: "bye",
            RESTORE: "restore"}

STATUS_OK, STATUS_ERROR = 0, 1

# Only plain numeric dtypes travel; anything else (objects, structured) is refused.
WIRE_DTYPES = {"float16", "bfloat16", "float32", "float64", "int32", "int64", "uint8", "bool"}


# --- errors --------------------------------------------------------------------------------
class PSError(Error):
    """A parameter-server failure (base of the errors below)."""


class ProtocolError(PSError, ValueError):
    """A malformed, truncated or unknown message (names the part that was wrong)."""


class ServerUnavailableError(PSError, ConnectionError):
    """A server that did not answer within the timeout or could not be reached (names it)."""


class PartialPushError(ServerUnavailableError):
    """A push that some shards applied and others did not: `applied` and `failed` (server -> reason) say
    exactly which. The table is out of step across its shards until `Client.resync` rolls them back."""

    def __init__(self, message: str, table: str = "", applied: tuple = (), failed: dict | None = None):
        super().__init__(message)
        self.table, self.applied, self.failed = table, tuple(applied), dict(failed or {})


class WorkerTimeoutError(PSError, TimeoutError):
    """A synchronous step or barrier that timed out waiting for workers (names the missing ranks)."""


class TableError(PSError, KeyError):
    """An unknown table, a table re-created with a different configuration, or bad table arguments."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class IdOutOfRangeError(PSError, IndexError):
    """Ids outside a table's `num_rows` where its `id_policy` is "refuse"."""


class SnapshotError(PSError):
    """A snapshot that cannot be written, or is missing, corrupt or does not match this server."""


ERROR_KINDS = {cls.__name__: cls for cls in (PSError, ProtocolError, ServerUnavailableError, TableError,
                                              IdOutOfRangeError, SnapshotError, WorkerTimeoutError)}


# --- messages ------------------------------------------------------------------------------
@dataclass
class Message:
    """A decoded message: op code, status, request id, worker rank, JSON args and arrays."""

    op: int
    request_id: int = 0
    worker: int = 0
    args: dict = field(default_factory=dict)
    arrays: list = field(default_factory=list)
    status: int = STATUS_OK


def _dtype_name(a: np.ndarray) -> str:
    return a.dtype.name


def encode(op: int, request_id: int, worker: int, args: dict | None = None, arrays=(),
           status: int = STATUS_OK) -> list:
    """The frames of one message; array frames are the arrays themselves (zero copy)."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    meta = dict(args or {})
    meta["arrays"] = [[_dtype_name(a), list(a.shape)] for a in arrays]
    header = HEADER.pack(MAGIC, VERSION, op, status, 0, len(arrays), request_id, worker)
    return [header, json.dumps(meta, separators=(",", ":")).encode()] + arrays


def error_frames(request_id: int, worker: int, exc: BaseException, op: int = 0) -> list:
    kind = type(exc).__name__ if type(exc).__name__ in ERROR_KINDS else "PSError"
    return encode(op, request_id, worker, {"error": str(exc), "kind": kind}, status=STATUS_ERROR)


def _buffer(frame) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def peek_request_id(frames) -> tuple[int, int]:
    """(request id, worker) of a message whose header is at least intact, else (0, 0)."""
    if frames:
        head = bytes(_buffer(frames[0])[:HEADER_SIZE])
        if len(head) == HEADER_SIZE and head[:4] == MAGIC:
            _, _, _, _, _, _, request_id, worker = HEADER.unpack(head)
            return request_id, worker
    return 0, 0


def decode(frames) -> Message:
    """Parses and checks `frames` (bytes or zmq.Frame); raises `ProtocolError` for anything off."""
    if len(frames) < 2:
        raise ProtocolError(f"a message needs at least 2 frames (header, args), found {len(frames)}")
    head = _buffer(frames[0])
    if head.nbytes != HEADER_SIZE:
        raise ProtocolError(f"the header frame must be {HEADER_SIZE} bytes, found {head.nbytes}")
    magic, version, op, status, _, n_arrays, request_id, worker = HEADER.unpack(bytes(head))
    if magic != MAGIC:
        raise ProtocolError(f"bad magic: expected {MAGIC!r}, found {magic!r}")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (this side speaks {VERSION})")
    if op not in OP_NAMES and not (op == 0 and status == STATUS_ERROR):
        raise ProtocolError(f"unknown op code {op}")
    if status not in (STATUS_OK, STATUS_ERROR):
        raise ProtocolError(f"unknown status {status}")
    if n_arrays > MAX_ARRAYS or len(frames) != 2 + n_arrays:
        raise ProtocolError(f"the header announces {n_arrays} array frames, the message has {len(frames) - 2}")
    raw = _buffer(frames[1])
    if raw.nbytes > MAX_ARGS_BYTES:
        raise ProtocolError(f"the args frame has {raw.nbytes} bytes, at most {MAX_ARGS_BYTES} are allowed")
    try:
        args = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the args frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(args, dict):
        raise ProtocolError(f"the args frame must be a JSON object, found {type(args).__name__}")
    specs = args.pop("arrays", [])
    if not isinstance(specs, list) or len(specs) != n_arrays:
        raise ProtocolError(f"args describe {len(specs) if isinstance(specs, list) else 'no list of'} arrays, "
                            f"the header announces {n_arrays}")
    arrays = []
    for i, spec in enumerate(specs):
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in WIRE_DTYPES and isinstance(spec[1], list)
                and len(spec[1]) <= 8 and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40
                                              for d in spec[1])):
            raise ProtocolError(f"array {i} has a bad description {spec!r}: expected [dtype, [dims]] with a dtype "
                                f"in {sorted(WIRE_DTYPES)}")
        dtype = _np_dtype(spec[0])
        shape = tuple(spec[1])
        buf = _buffer(frames[2 + i])
        expected = math.prod(shape) * dtype.itemsize
        if buf.nbytes != expected:
            raise ProtocolError(f"array {i} ({spec[0]}{list(shape)}) needs {expected} bytes, its frame has "
                                f"{buf.nbytes} (truncated?)")
        arrays.append(np.frombuffer(buf, dtype=dtype).reshape(shape))
    return Message(op=op, request_id=request_id, worker=worker, args=args, arrays=arrays, status=status)


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":  # NumPy has no bfloat16: the bits travel as uint16
        return np.dtype(np.uint16)
    return np.dtype(name)


# --- hashing and initial rows --------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser over a uint64 array (wrapping arithmetic): a stable, well-mixed hash."""
    x = np.asarray(x).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += _GOLDEN
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def shard_of(ids: np.ndarray, num_servers: int) -> np.ndarray:
    """The server (0..num_servers-1) that owns each id: a stable hash, the same on every process."""
    if num_servers == 1:
        return np.zeros(len(ids), dtype=np.int64)
    return (splitmix64(ids.view(np.uint64)) % np.uint64(num_servers)).astype(np.int64)


def map_ids(ids: np.ndarray, num_rows: int | None, id_policy: str, table: str) -> np.ndarray:
    """Ids as the table stores them: unchanged inside [0, num_rows); outside it hashed into range
    (policy "hash") or refused with `IdOutOfRangeError` (policy "refuse")."""
    if num_rows is None:
        return ids
    outside = (ids < 0) | (ids >= num_rows)
    if not outside.any():
        return ids
    if id_policy == "refuse":
        bad = ids[outside]
        raise IdOutOfRangeError(f"table {table!r} has num_rows={num_rows} and id_policy='refuse': "
                                f"{bad.size} ids outside [0, {num_rows}), e.g. {bad[:5].tolist()}")
    mapped = ids.copy()
    mapped[outside] = (splitmix64(ids[outside].view(np.uint64)) % np.uint64(num_rows)).astype(np.int64)
    return mapped


def _name_key(name: str, seed: int) -> np.uint64:
    # FNV-1a of the table name, mixed with the seed: tables with one seed still differ.
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return splitmix64(np.array([h ^ (seed & 0xFFFFFFFFFFFFFFFF)], dtype=np.uint64))[0]


INITIALIZERS = {"normal": 2, "uniform": 2, "truncated_normal": 2, "constant": 1, "zeros": 0}


def check_init(init) -> tuple:
    """`init` as a (kind, *numbers) tuple; raises `TableError` for an unknown kind or bad numbers."""
    if isinstance(init, str):
        init = (init,)
    if not isinstance(init, (list, tuple)) or not init or init[0] not in INITIALIZERS:
        raise TableError(f"init must be one of {sorted(INITIALIZERS)} with its numbers, e.g. ('normal', 0.0, 0.01); "
                         f"found {init!r}")
    kind, numbers = init[0], list(init[1:])
    if len(numbers) != INITIALIZERS[kind] or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        raise TableError(f"init {kind!r} takes {INITIALIZERS[kind]} finite numbers, found {numbers!r}")
    if kind in ("normal", "truncated_normal") and numbers[1] < 0:
        raise TableError(f"init {kind!r} needs a non-negative std, found {numbers[1]}")
    if kind == "uniform" and numbers[1] < numbers[0]:
        raise TableError(f"init 'uniform' needs low <= high, found {numbers}")
    return (kind, *[float(v) for v in numbers])


def _uniforms(ids: np.ndarray, key: np.uint64, count: int, stream: int) -> np.ndarray:
    """(len(ids), count) uniforms in (0, 1), a pure function of (key, id, column, stream)."""
    base = splitmix64(ids.view(np.uint64) ^ key)
    cols = (np.arange(count, dtype=np.uint64) + np.uint64(stream * count + 1)) * _GOLDEN
    with np.errstate(over="ignore"):
        bits = splitmix64(base[:, None] + cols[None, :])
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


def initial_rows(table: str, ids: np.ndarray, dim: int, init=("normal", 0.0, 0.01), seed: int = 0,
                 dtype: str = "float32") -> np.ndarray:
    """The initial rows of `ids` in table `table`: a pure function of (table, seed, id), so any
    server, in any order, and a single-process reference all produce the same numbers."""
    kind, *numbers = check_init(init)
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    n = ids.size
    if kind == "zeros":
        return np.zeros((n, dim), dtype=dtype)
    if kind == "constant":
        return np.full((n, dim), numbers[0], dtype=dtype)
    key = _name_key(table, seed)
    if kind == "uniform":
        low, high = numbers
        return (low + (high - low) * _uniforms(ids, key, dim, 0)).astype(dtype)
    mean, std = numbers
    # Box-Muller over two independent uniform streams.
    z = np.sqrt(-2.0 * np.log(_uniforms(ids, key, dim, 0))) * np.cos(2.0 * np.pi * _uniforms(ids, key, dim, 1))
    if kind == "truncated_normal":
        # Redraw outside two standard deviations (as torch.nn.init.trunc_normal_'s default bounds):
        # each redraw takes the next stream, still a pure function of the id.
        for stream in range(2, 64, 2):
            bad = np.abs(z) > 2.0
            if not bad.any():
                break
            fresh = np.sqrt(-2.0 * np.log(_uniforms(ids, key, dim, stream))) * \
                np.cos(2.0 * np.pi * _uniforms(ids, key, dim, stream + 1))
            z = np.where(bad, fresh, z)
        z = np.clip(z, -2.0, 2.0)
    return (mean + std * z).astype(dtype)
