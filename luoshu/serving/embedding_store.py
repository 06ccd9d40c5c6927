"""The hierarchical embedding store for inference: hot cache -> host hash table -> RocksDB, as HugeCTR's HPS.

A lookup of a table's ids goes down the tiers: a bounded hot cache (LRU or LFU), a host-memory
table (bounded or not, with an overflow policy), and a persistent RocksDB tier (`rocksdict`)
that holds every row. Each tier serves what it has; the misses fall through, and rows found
lower are filled into the tiers above. Ids found nowhere get the table's default row.

Both volatile tiers are the same vectorised structure (as the parameter server's HET cache,
`luoshu/ps/cache.py`, does it): the resident ids are one sorted array searched with
`np.searchsorted`, each slot has an eviction score, and eviction takes the lowest scores with
`np.argpartition`; no Python loop runs per id. The cache evicts exactly what it must; the
host tier, once over capacity, evicts down to `overflow_resolution_target` of it (HPS's
overflow handling) by its policy: `evict_least_used` (LFU), `evict_least_recent` (LRU),
`evict_oldest` (insertion order) or `evict_random`.

Rows come from a training package (`from_package`: the model's embedding weights, read through
`luoshu.serving.load`, which verifies the manifest) or from the parameter server's snapshots
(`from_ps_snapshots`). A trainer streams fresh rows with `update(table, ids, rows)` (an
in-process queue); they become visible at the next `refresh()` (or every
`refresh_interval_s` in a background thread), written through every tier; `listen(address)`
takes the same updates from other processes over ZeroMQ (`UpdateFeed(address).send(...)` on the
trainer's side). A store opened on a read-only RocksDB refuses updates with `ReadOnlyTierError`.

Configuration (JSON, in the spirit of HPS's; every key optional except "tables"):

    {"hot_cache": {"capacity": 4096, "policy": "lru"},
     "volatile_db": {"capacity": 100000, "overflow_policy": "evict_least_used",
                     "overflow_resolution_target": 0.8, "initial_cache_rate": 1.0},
     "persistent_db": {"type": "rocks_db", "path": "/var/lib/luoshu/embeddings", "read_only": false},
     "refresh_interval_s": 0,
     "tables": [{"name": "embedding.weight", "dim": 16, "default_value": 0.0,
                 "hot_cache": {"capacity": 1024}}]}

`capacity` counts rows; a volatile_db capacity of null is unbounded; a hot_cache capacity of 0
switches the cache off. A table's own "hot_cache"/"volatile_db" entries override the top level.
`initial_cache_rate` is the share of the host tier filled at load (the rest fills on demand).
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from luoshu.core.errors import Error

CACHE_POLICIES = ("lru", "lfu")
OVERFLOW_POLICIES = {
    "evict_least_used": "lfu",
    "evict_least_recent": "lru",
    "evict_oldest": "fifo",
    "evict_random": "random",
}
TIERS = ("hot_cache", "host", "persistent")
_TICK_BITS = 40  # LFU scores put the use count above the last-use tick


class StoreError(Error, ValueError):
    """An embedding store configured or used wrongly (names the table, what was expected and found)."""


class ReadOnlyTierError(StoreError):
    """A write to a store whose persistent tier was opened read-only."""


# --- configuration ----------------------------------------------------------------------------------------


@dataclass
class TableConfig:
    name: str
    dim: int
    default_value: float | list[float] = 0.0
    cache_capacity: int = 4096
    cache_policy: str = "lru"
    host_capacity: int | None = None  # None: unbounded
    overflow_policy: str = "evict_least_used"
    overflow_resolution_target: float = 0.8
    initial_cache_rate: float = 1.0
    dtype: str = "float32"

    def __post_init__(self):
        where = f"embedding table {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise StoreError(f"an embedding table needs a non-empty string name, found {self.name!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim <= 0:
            raise StoreError(f"{where}: dim must be a positive integer, found {self.dim!r}")
        if isinstance(self.cache_capacity, bool) or not isinstance(self.cache_capacity, int) or self.cache_capacity < 0:
            raise StoreError(
                f"{where}: hot_cache capacity must be a non-negative integer, found {self.cache_capacity!r}"
            )
        if self.cache_policy not in CACHE_POLICIES:
            raise StoreError(f"{where}: hot_cache policy must be one of {CACHE_POLICIES}, found {self.cache_policy!r}")
        if self.host_capacity is not None and (
            isinstance(self.host_capacity, bool) or not isinstance(self.host_capacity, int) or self.host_capacity < 1
        ):
            raise StoreError(
                f"{where}: volatile_db capacity must be a positive integer or null, found {self.host_capacity!r}"
            )
        if self.overflow_policy not in OVERFLOW_POLICIES:
            raise StoreError(
                f"{where}: overflow_policy must be one of {sorted(OVERFLOW_POLICIES)}, found {self.overflow_policy!r}"
            )
        for key in ("overflow_resolution_target", "initial_cache_rate"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise StoreError(f"{where}: {key} must be a number in [0, 1], found {value!r}")
        default = np.asarray(self.default_value, dtype=np.float64)
        if default.ndim > 1 or (default.ndim == 1 and default.shape[0] != self.dim):
            raise StoreError(
                f"{where}: default_value must be a number or a list of {self.dim} numbers, "
                f"found shape {list(default.shape)}"
            )

    def default_row(self) -> np.ndarray:
        return np.broadcast_to(np.asarray(self.default_value, dtype=self.dtype), (self.dim,)).copy()


@dataclass
class StoreConfig:
    tables: dict[str, TableConfig] = field(default_factory=dict)
    persistent_path: str | None = None
    persistent_read_only: bool = False
    refresh_interval_s: float = 0.0  # > 0: a background thread applies queued updates this often

    @classmethod
    def from_json(cls, source: dict | str | os.PathLike) -> StoreConfig:
        """The config from a dict or a JSON file (see the module docstring for the keys)."""
        if isinstance(source, (str, os.PathLike)):
            try:
                source = json.loads(Path(source).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise StoreError(f"embedding store config {source}: cannot read it as JSON ({exc})") from None
        if not isinstance(source, dict):
            raise StoreError(f"an embedding store config must be a JSON object, found {type(source).__name__}")
        _known(source, {"hot_cache", "volatile_db", "persistent_db", "tables", "refresh_interval_s"}, "the config")
        top_cache = _section(source, "hot_cache", {"capacity", "policy"}, "the config")
        top_host = _section(
            source,
            "volatile_db",
            {"capacity", "overflow_policy", "overflow_resolution_target", "initial_cache_rate", "type"},
            "the config",
        )
        persistent = _section(source, "persistent_db", {"type", "path", "read_only"}, "the config")
        if persistent and persistent.get("type", "rocks_db") != "rocks_db":
            raise StoreError(f"persistent_db type must be 'rocks_db', found {persistent.get('type')!r}")
        if top_host.get("type", "hash_map") != "hash_map":
            raise StoreError(f"volatile_db type must be 'hash_map', found {top_host.get('type')!r}")
        tables_doc = source.get("tables")
        if not isinstance(tables_doc, list) or not tables_doc:
            raise StoreError(f"the config needs 'tables', a non-empty list, found {tables_doc!r}")
        tables = {}
        for i, t in enumerate(tables_doc):
            if not isinstance(t, dict):
                raise StoreError(f"tables[{i}] must be an object, found {t!r}")
            _known(t, {"name", "dim", "default_value", "hot_cache", "volatile_db", "dtype"}, f"tables[{i}]")
            cache = {**top_cache, **_section(t, "hot_cache", {"capacity", "policy"}, f"tables[{i}]")}
            host = {
                **top_host,
                **_section(
                    t,
                    "volatile_db",
                    {"capacity", "overflow_policy", "overflow_resolution_target", "initial_cache_rate", "type"},
                    f"tables[{i}]",
                ),
            }
            config = TableConfig(
                name=t.get("name"),
                dim=t.get("dim"),
                default_value=t.get("default_value", 0.0),
                cache_capacity=cache.get("capacity", 4096),
                cache_policy=cache.get("policy", "lru"),
                host_capacity=host.get("capacity"),
                overflow_policy=host.get("overflow_policy", "evict_least_used"),
                overflow_resolution_target=host.get("overflow_resolution_target", 0.8),
                initial_cache_rate=host.get("initial_cache_rate", 1.0),
                dtype=t.get("dtype", "float32"),
            )
            if config.name in tables:
                raise StoreError(f"embedding table {config.name!r} is configured twice")
            tables[config.name] = config
        interval = source.get("refresh_interval_s", 0.0)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval < 0:
            raise StoreError(f"refresh_interval_s must be a non-negative number, found {interval!r}")
        return cls(tables, persistent.get("path"), bool(persistent.get("read_only", False)), float(interval))


def _known(doc: dict, keys: set, where: str) -> None:
    unknown = set(doc) - keys
    if unknown:
        raise StoreError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(keys)}")


def _section(doc: dict, key: str, keys: set, where: str) -> dict:
    value = doc.get(key) or {}
    if not isinstance(value, dict):
        raise StoreError(f"{where}: {key!r} must be an object, found {value!r}")
    _known(value, keys, f"{where}.{key}")
    return value


# --- the volatile tiers ---------------------------------------------------------------------------------


@dataclass
class TierStats:
    lookups: int = 0  # unique ids that reached the tier
    hits: int = 0
    evictions: int = 0
    inserts: int = 0

    def as_dict(self) -> dict:
        return {**self.__dict__, "hit_rate": self.hits / self.lookups if self.lookups else 0.0}


class RowTier:
    """A bounded (or unbounded) vectorised id -> row table with an eviction policy.

    `policy`: "lru", "lfu", "fifo" (insertion order) or "random". `target` is the fill the tier
    evicts down to once a put would pass capacity (1.0: just enough).
    """

    def __init__(
        self, dim: int, capacity: int | None, policy: str, dtype=np.float32, target: float = 1.0, seed: int = 0
    ):
        self.dim, self.capacity, self.policy, self.target = dim, capacity, policy, target
        self.dtype = np.dtype(dtype)
        self.stats = TierStats()
        self._keys = np.empty(0, np.int64)  # resident ids, sorted
        self._slot_of = np.empty(0, np.int64)  # the slot of each resident id
        size = max(16, min(capacity, 1 << 16)) if capacity is not None else 1024
        self._rows = np.zeros((size, dim), self.dtype)
        self._score = np.zeros(size, np.int64)
        self._count = np.zeros(size, np.int64)
        self._free = np.arange(size - 1, -1, -1, dtype=np.int64)
        self._tick = 0
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self._keys)

    def resident_ids(self) -> np.ndarray:
        return self._keys.copy()

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, slots of the found) for sorted unique ids."""
        if not len(self._keys):
            return np.zeros(len(ids), bool), np.empty(0, np.int64)
        pos = np.minimum(np.searchsorted(self._keys, ids), len(self._keys) - 1)
        found = self._keys[pos] == ids
        return found, self._slot_of[pos[found]]

    def _use(self, slots: np.ndarray) -> None:
        n = len(slots)
        ticks = np.arange(self._tick + 1, self._tick + n + 1, dtype=np.int64)
        self._tick += n
        if self.policy == "lru":
            self._score[slots] = ticks
        elif self.policy == "lfu":
            self._count[slots] += 1
            self._score[slots] = (self._count[slots] << _TICK_BITS) | ticks

    def get(self, ids: np.ndarray, count: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, rows of the found ids) for sorted unique ids; counts uses for the policy."""
        found, slots = self._find(ids)
        if count:
            self.stats.lookups += len(ids)
            self.stats.hits += len(slots)
        self._use(slots)
        return found, self._rows[slots]

    def put(self, ids: np.ndarray, rows: np.ndarray, only_resident: bool = False) -> None:
        """Writes rows of sorted unique ids: overwrites resident ones, inserts the others (evicting if full)."""
        found, slots = self._find(ids)
        self._rows[slots] = rows[found]
        if only_resident:
            return
        new_ids, new_rows = ids[~found], rows[~found]
        if not len(new_ids):
            return
        if self.capacity is not None:
            if len(new_ids) > self.capacity:  # a batch larger than the tier: keep what fits
                new_ids, new_rows = new_ids[: self.capacity], new_rows[: self.capacity]
            overflow = len(self._keys) + len(new_ids) - self.capacity
            if overflow > 0:
                goal = int(self.capacity * self.target) - len(new_ids)
                self._evict(max(overflow, len(self._keys) - max(goal, 0)))
        slots = self._take_slots(len(new_ids))
        self._rows[slots] = new_rows
        self._count[slots] = 0
        if self.policy == "fifo":
            self._score[slots] = np.arange(self._tick + 1, self._tick + len(slots) + 1)
            self._tick += len(slots)
        else:
            self._use(slots)
        pos = np.searchsorted(self._keys, new_ids)
        self._keys = np.insert(self._keys, pos, new_ids)
        self._slot_of = np.insert(self._slot_of, pos, slots)
        self.stats.inserts += len(new_ids)

    def _evict(self, count: int) -> None:
        count = min(count, len(self._keys))
        if count <= 0:
            return
        scores = self._rng.random(len(self._keys)) if self.policy == "random" else self._score[self._slot_of]
        pick = np.argpartition(scores, count - 1)[:count] if count < len(self._keys) else np.arange(len(self._keys))
        self._free = np.concatenate([self._free, self._slot_of[pick]])
        keep = np.ones(len(self._keys), bool)
        keep[pick] = False
        self._keys, self._slot_of = self._keys[keep], self._slot_of[keep]
        self.stats.evictions += count

    def _take_slots(self, n: int) -> np.ndarray:
        if len(self._free) < n:
            old = len(self._rows)
            size = max(old * 2, old + n)
            if self.capacity is not None:
                size = max(min(size, self.capacity), old + n - len(self._free))
            rows = np.zeros((size, self.dim), self.dtype)
            rows[:old] = self._rows
            self._rows = rows
            self._score = np.concatenate([self._score, np.zeros(size - old, np.int64)])
            self._count = np.concatenate([self._count, np.zeros(size - old, np.int64)])
            self._free = np.concatenate([np.arange(size - 1, old - 1, -1, dtype=np.int64), self._free])
        slots, self._free = self._free[len(self._free) - n :], self._free[: len(self._free) - n]
        return slots


# --- the persistent tier ----------------------------------------------------------------------------------


class RocksTier:
    """Every row of one table in RocksDB (`rocksdict`, raw mode): 8-byte big-endian id -> row bytes."""

    def __init__(self, path: str | os.PathLike, dim: int, dtype, read_only: bool = False):
        from rocksdict import AccessType, Options, Rdict

        self.path, self.dim, self.dtype, self.read_only = Path(path), dim, np.dtype(dtype), read_only
        self.stats = TierStats()
        self._row_bytes = dim * self.dtype.itemsize
        options = Options(raw_mode=True)
        try:
            if read_only:
                if not self.path.is_dir():
                    raise StoreError(f"read-only persistent tier {self.path}: no database there")
                self._db = Rdict(str(self.path), options, access_type=AccessType.read_only())
            else:
                options.create_if_missing(True)
                self.path.mkdir(parents=True, exist_ok=True)
                self._db = Rdict(str(self.path), options)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - rocksdict raises plain exceptions for I/O and lock errors
            raise StoreError(f"cannot open the persistent tier at {self.path}: {exc}") from None

    @staticmethod
    def _keys(ids: np.ndarray) -> list[bytes]:
        raw = ids.astype(">i8").tobytes()
        return [raw[i : i + 8] for i in range(0, len(raw), 8)]

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, rows of the found) for unique ids."""
        self.stats.lookups += len(ids)
        if not len(ids):
            return np.zeros(0, bool), np.empty((0, self.dim), self.dtype)
        values = self._db.get(self._keys(ids))
        found = np.fromiter((v is not None for v in values), bool, len(values))
        hits = [v for v in values if v is not None]
        for v in hits[:1]:
            if len(v) != self._row_bytes:
                raise StoreError(
                    f"persistent tier {self.path}: a row has {len(v)} bytes, expected {self._row_bytes} "
                    f"({self.dim} x {self.dtype.name}); was it written for another table?"
                )
        self.stats.hits += len(hits)
        rows = (
            np.frombuffer(b"".join(hits), self.dtype).reshape(-1, self.dim)
            if hits
            else np.empty((0, self.dim), self.dtype)
        )
        return found, rows

    def put(self, ids: np.ndarray, rows: np.ndarray, chunk: int = 1 << 16) -> None:
        if self.read_only:
            raise ReadOnlyTierError(
                f"the persistent tier at {self.path} is read-only; it refuses writes "
                f"({len(ids)} rows); open the store with read_only false to update it"
            )
        from rocksdict import WriteBatch

        rows = np.ascontiguousarray(rows, self.dtype)
        for start in range(0, len(ids), chunk):
            batch = WriteBatch(raw_mode=True)
            part = rows[start : start + chunk]
            raw = part.tobytes()
            for i, key in enumerate(self._keys(ids[start : start + chunk])):
                batch.put(key, raw[i * self._row_bytes : (i + 1) * self._row_bytes])
            self._db.write(batch)

    def count(self) -> int:
        return sum(1 for _ in self._db.keys())

    def close(self) -> None:
        self._db.close()


# --- the store ----------------------------------------------------------------------------------------------


class _Table:
    def __init__(self, config: TableConfig, persistent: RocksTier | None):
        self.config = config
        self.dim, self.dtype = config.dim, np.dtype(config.dtype)
        self.default = config.default_row()
        self.cache = (
            RowTier(config.dim, config.cache_capacity, config.cache_policy, self.dtype)
            if config.cache_capacity
            else None
        )
        self.host = RowTier(
            config.dim,
            config.host_capacity,
            OVERFLOW_POLICIES[config.overflow_policy],
            self.dtype,
            target=config.overflow_resolution_target,
        )
        self.persistent = persistent
        self.defaults = 0  # unique ids found in no tier
        self.lookup_calls = 0
        self.lookup_seconds = 0.0
        self.lock = threading.Lock()
        self.updates: queue.Queue = queue.Queue()


class EmbeddingStore:
    """Tiered embedding tables for inference; see the module docstring."""

    def __init__(self, config: StoreConfig | dict | str | os.PathLike):
        self.config = config if isinstance(config, StoreConfig) else StoreConfig.from_json(config)
        if not self.config.tables:
            raise StoreError("an embedding store needs at least one table")
        self._tables: dict[str, _Table] = {}
        for name, tc in self.config.tables.items():
            persistent = None
            if self.config.persistent_path is not None:
                persistent = RocksTier(
                    Path(self.config.persistent_path) / _dir_name(name),
                    tc.dim,
                    tc.dtype,
                    self.config.persistent_read_only,
                )
            self._tables[name] = _Table(tc, persistent)
        self._stop = threading.Event()
        self._refresher = None
        self._listeners: list[threading.Thread] = []
        self.rejected_updates = 0  # feed messages refused (malformed, unknown table, bad rows)
        self.feed_errors: list[str] = []  # the newest few refusals, for diagnosis
        if self.config.refresh_interval_s > 0:
            self._refresher = threading.Thread(target=self._refresh_loop, name="embedding-store-refresh", daemon=True)
            self._refresher.start()

    # --- loading --------------------------------------------------------------------------------------------
    def table(self, name: str) -> _Table:
        try:
            return self._tables[name]
        except KeyError:
            raise StoreError(f"the embedding store has no table {name!r}; tables are {sorted(self._tables)}") from None

    @property
    def tables(self) -> list[str]:
        return list(self._tables)

    def load(self, name: str, rows: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Loads rows of a table (ids default to 0..n-1; calls add up): all into RocksDB, the first
        `initial_cache_rate` of the host tier's capacity into host memory."""
        t = self.table(name)
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != t.dim:
            raise StoreError(f"table {name!r}: rows must be (n, {t.dim}), found {list(rows.shape)}")
        ids = np.arange(len(rows), dtype=np.int64) if ids is None else np.asarray(ids)
        if ids.shape != (len(rows),) or ids.dtype.kind not in "iu":
            raise StoreError(f"table {name!r}: ids must be {len(rows)} integers, found {ids.dtype} {list(ids.shape)}")
        ids = ids.astype(np.int64)
        order = np.argsort(ids, kind="stable")
        ids, rows = ids[order], np.ascontiguousarray(rows[order], t.dtype)
        if len(ids) > 1 and np.any(ids[1:] == ids[:-1]):
            raise StoreError(f"table {name!r}: ids repeat")
        capacity = t.config.host_capacity
        with t.lock:
            if t.persistent is None and capacity is not None and len(t.host) + len(ids) > capacity:
                raise StoreError(
                    f"table {name!r}: {len(t.host) + len(ids)} rows do not fit the host tier's capacity {capacity} "
                    "and there is no persistent tier to hold the rest; configure persistent_db"
                )
            if t.persistent is not None:
                t.persistent.put(ids, rows)
                # the host tier starts with the first initial_cache_rate of its capacity (HPS's initial_cache_rate)
                room = len(ids) if capacity is None else int(capacity * t.config.initial_cache_rate) - len(t.host)
                fill = max(0, min(len(ids), room))
            else:
                fill = len(ids)
            if fill:
                t.host.put(ids[:fill], rows[:fill])

    @classmethod
    def from_package(cls, path, config: StoreConfig | dict | str | os.PathLike) -> EmbeddingStore:
        """A store whose tables are weights of a model package (configured table names = weight names),
        read shard by shard (`luoshu.serving.weight_rows`, after the manifest verifies)."""
        from luoshu.serving.package import PackageError, weight_rows

        store = cls(config)
        try:
            for name in store.tables:
                for first, rows in weight_rows(path, name):
                    store.load(name, rows, np.arange(first, first + len(rows), dtype=np.int64))
        except PackageError as exc:
            store.close()
            raise StoreError(f"embedding table {name!r} from package {path}: {exc}") from exc
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def from_ps_snapshots(
        cls, root, num_servers: int, config: StoreConfig | dict | str | os.PathLike
    ) -> EmbeddingStore:
        """A store whose tables come from the newest good snapshot of each of `num_servers` parameter servers."""
        from luoshu.ps.snapshot import load_newest

        store = cls(config)
        found: dict[str, list] = {name: [] for name in store.tables}
        for index in range(num_servers):
            newest = load_newest(root, index, num_servers)
            if newest is None:
                store.close()
                raise StoreError(f"no good snapshot of parameter server {index} of {num_servers} under {root}")
            _, meta, arrays = newest
            for entry in meta.get("tables", []):
                name = entry["config"]["name"]
                if name in found:
                    found[name].append((arrays[f"{entry['prefix']}.ids"], arrays[f"{entry['prefix']}.rows"]))
        for name, parts in found.items():
            if not parts:
                store.close()
                raise StoreError(f"the parameter-server snapshots under {root} have no table {name!r}")
            store.load(name, np.concatenate([r for _, r in parts]), np.concatenate([i for i, _ in parts]))
        return store

    # --- lookups --------------------------------------------------------------------------------------------
    def lookup(self, name: str, ids) -> np.ndarray:
        """Rows of `ids` (any shape of integers) as `ids.shape + (dim,)`."""
        t = self.table(name)
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise StoreError(f"table {name!r}: ids must be integers, found {ids.dtype}")
        start = time.perf_counter()
        uniq, inverse = np.unique(ids.reshape(-1).astype(np.int64), return_inverse=True)
        out = np.empty((len(uniq), t.dim), t.dtype)
        with t.lock:
            missing = np.ones(len(uniq), bool)
            if t.cache is not None:
                found, rows = t.cache.get(uniq)
                out[found] = rows
                missing &= ~found
            idx = np.flatnonzero(missing)
            if len(idx):
                found, rows = t.host.get(uniq[idx])
                out[idx[found]] = rows
                if t.cache is not None and found.any():
                    t.cache.put(uniq[idx[found]], rows)
                idx = idx[~found]
            if len(idx) and t.persistent is not None:
                found, rows = t.persistent.get(uniq[idx])
                out[idx[found]] = rows
                if found.any():
                    t.host.put(uniq[idx[found]], rows)
                    if t.cache is not None:
                        t.cache.put(uniq[idx[found]], rows)
                idx = idx[~found]
            if len(idx):
                out[idx] = t.default
                t.defaults += len(idx)
            t.lookup_calls += 1
            t.lookup_seconds += time.perf_counter() - start
        return out[inverse.reshape(-1)].reshape(ids.shape + (t.dim,))

    # --- updates --------------------------------------------------------------------------------------------
    def update(self, name: str, ids, rows) -> None:
        """Queues fresh rows from a trainer; `refresh()` makes them visible."""
        t = self.table(name)
        if t.persistent is not None and t.persistent.read_only:
            raise ReadOnlyTierError(
                f"table {name!r}: the persistent tier at {t.persistent.path} is read-only; "
                "updates are refused (they would be lost on eviction)"
            )
        ids, rows = np.asarray(ids), np.asarray(rows)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise StoreError(
                f"table {name!r}: update ids must be a 1-d integer array, found {ids.dtype} {list(ids.shape)}"
            )
        if rows.shape != (len(ids), t.dim) or rows.dtype.kind != "f":
            raise StoreError(
                f"table {name!r}: update rows must be floats of shape {[len(ids), t.dim]}, found "
                f"{rows.dtype} {list(rows.shape)}"
            )
        if not np.isfinite(rows).all():
            raise StoreError(f"table {name!r}: update rows contain NaN or infinite values; refused")
        t.updates.put((ids.astype(np.int64), rows.astype(t.dtype)))

    def refresh(self) -> int:
        """Applies every queued update to every tier; returns the number of rows written."""
        written = 0
        for t in self._tables.values():
            batches = []
            while True:
                try:
                    batches.append(t.updates.get_nowait())
                except queue.Empty:
                    break
            if not batches:
                continue
            ids = np.concatenate([b[0] for b in batches])
            rows = np.concatenate([b[1] for b in batches])
            # the newest row of an id wins: unique over the reversed order keeps the last occurrence
            uniq, first_from_end = np.unique(ids[::-1], return_index=True)
            rows = rows[::-1][first_from_end]
            with t.lock:
                if t.persistent is not None:
                    t.persistent.put(uniq, rows)
                    t.host.put(uniq, rows, only_resident=True)
                else:
                    t.host.put(uniq, rows)
                if t.cache is not None:
                    t.cache.put(uniq, rows, only_resident=True)
            written += len(uniq)
        return written

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.config.refresh_interval_s):
            self.refresh()

    def listen(self, address: str = "tcp://127.0.0.1:0") -> str:
        """Receives updates from trainers (`UpdateFeed`) on a ZeroMQ PULL socket bound at `address`
        (port 0: any free port); returns the bound address. Rows arrive through `update`, so they
        become visible at the next refresh; a malformed message is counted in `rejected_updates`
        and dropped, never raised into the store."""
        import zmq

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 30)
        try:
            if address.endswith(":0"):
                port = sock.bind_to_random_port(address.rsplit(":", 1)[0])
                address = f"{address.rsplit(':', 1)[0]}:{port}"
            else:
                sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close()
            raise StoreError(f"embedding store: cannot listen for updates on {address}: {exc}") from None
        thread = threading.Thread(target=self._listen_loop, args=(sock,), name="embedding-store-feed", daemon=True)
        self._listeners.append(thread)
        thread.start()
        return address

    def _listen_loop(self, sock) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                frames = sock.recv_multipart(copy=True)
                try:
                    table, ids, rows = decode_update(frames)
                    self.update(table, ids, rows)
                except StoreError as exc:
                    self.rejected_updates += 1
                    self.feed_errors = (self.feed_errors + [str(exc)])[-8:]
        finally:
            sock.close()

    # --- bookkeeping ----------------------------------------------------------------------------------------
    def stats(self) -> dict:
        out = {}
        for name, t in self._tables.items():
            tiers = {}
            if t.cache is not None:
                tiers["hot_cache"] = t.cache.stats.as_dict()
            tiers["host"] = t.host.stats.as_dict()
            if t.persistent is not None:
                tiers["persistent"] = t.persistent.stats.as_dict()
            out[name] = {
                "tiers": tiers,
                "defaults": t.defaults,
                "lookup_calls": t.lookup_calls,
                "lookup_seconds": t.lookup_seconds,
                "host_rows": len(t.host),
                "cache_rows": len(t.cache) if t.cache is not None else 0,
            }
        return out

    def close(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(5)
        for thread in self._listeners:
            thread.join(5)
        for t in self._tables.values():
            if t.persistent is not None:
                t.persistent.close()

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the update feed from training ---------------------------------------------------------------------------

_FEED_MAGIC = b"luoshu-embedding-update/1"


def encode_update(table: str, ids, rows) -> list[bytes]:
    """One feed message: magic, table name, a JSON header (dtype, rows, dim), raw ids, raw rows."""
    ids = np.ascontiguousarray(ids, dtype="<i8")
    rows = np.ascontiguousarray(rows)
    if rows.ndim != 2 or rows.shape[0] != ids.shape[0] or rows.dtype.kind != "f":
        raise StoreError(
            f"an update of {table!r} needs (n,) ids and (n, dim) float rows, found ids {list(ids.shape)} "
            f"and rows {rows.dtype} {list(rows.shape)}"
        )
    header = json.dumps(
        {"dtype": rows.dtype.newbyteorder("<").str, "rows": int(rows.shape[0]), "dim": int(rows.shape[1])}
    ).encode()
    return [_FEED_MAGIC, table.encode(), header, ids.tobytes(), rows.astype(rows.dtype.newbyteorder("<")).tobytes()]


def decode_update(frames: list[bytes]) -> tuple[str, np.ndarray, np.ndarray]:
    """(table, ids, rows) of a feed message; StoreError naming what is wrong with a malformed one."""
    if len(frames) != 5 or frames[0] != _FEED_MAGIC:
        raise StoreError(f"update feed: not a luoshu embedding update ({len(frames)} frames)")
    try:
        table = frames[1].decode()
        header = json.loads(frames[2])
        dtype, n, dim = np.dtype(header["dtype"]), int(header["rows"]), int(header["dim"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"update feed: unreadable header ({exc})") from None
    if dtype.kind != "f" or n < 0 or dim <= 0:
        raise StoreError(f"update feed: rows must be floats with n >= 0 and dim > 0, found {dtype} {n} x {dim}")
    if len(frames[3]) != 8 * n or len(frames[4]) != n * dim * dtype.itemsize:
        raise StoreError(
            f"update feed, table {table!r}: {n} x {dim} {dtype} rows need {8 * n} id bytes and "
            f"{n * dim * dtype.itemsize} row bytes, found {len(frames[3])} and {len(frames[4])}"
        )
    return table, np.frombuffer(frames[3], "<i8"), np.frombuffer(frames[4], dtype).reshape(n, dim)


class UpdateFeed:
    """A trainer's side of the update stream: `feed.send(table, ids, rows)` pushes fresh rows to a
    serving store's `listen` address (ZeroMQ PUSH; messages queue while the server is away)."""

    def __init__(self, address: str):
        import zmq

        self._sock = zmq.Context.instance().socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.connect(address)

    def send(self, table: str, ids, rows) -> None:
        self._sock.send_multipart(encode_update(table, ids, rows))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> UpdateFeed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _dir_name(table: str) -> str:
    # a table name becomes one directory name (weight names have dots; nothing may climb out)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", table).lstrip(".") or "table"
