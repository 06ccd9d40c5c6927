"""The HET worker cache: hot embedding rows kept on the worker under a staleness bound.

After HET (Miao et al., VLDB 2022). Every row on the server carries a version (one per
update applied to it). The worker keeps up to `capacity` rows with the version it pulled
and the worker clock (its step count) at which it pulled them. In synchronous training
(the table's `sync_workers` set) the server applies at most one update per row per step,
so a row pulled `a` steps ago lags the server by at most `a` versions: the cache serves it
without a round trip while `a <= staleness` (read bound). Gradients of cached rows
accumulate locally and are written back in one push when the row would pass the bound
on the next step (write bound), or when it is evicted. `staleness=0` pulls every row of
every batch after the previous step's update and pushes every gradient at once: exact
synchronous training. With asynchronous tables and a single writer the same bound holds;
with several asynchronous writers it counts steps, not versions (as in SSP).

Everything is vectorised over whole batches: the resident ids are one sorted array
searched with `np.searchsorted`; LRU and LFU keep a score per slot (the access tick of
the last use, unique per id occurrence; LFU prefixes the access count) and eviction takes
the lowest scores with `np.argpartition`. No Python loop runs per id.

The cache talks to anything with the parameter-server client's table calls:
`pull(name, ids) -> (rows, versions)`, `pull_async(name, ids) -> Future`, and
`push(name, ids, grads, scale=...) -> Future`. Pushes are not waited for: a pull issued
after a push reaches each server after it, as the client sends every request to a
server in order over one socket. Every push's future is kept until its reply has come;
`end_step` raises the first push (in issue order) that has failed by then and `flush`
waits for all of them, so a refused push is never lost silently, whatever order the
replies arrive in.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field

import numpy as np
import torch

from luoshu.ps.protocol import PSError

POLICIES = ("lru", "lfu")
_ID_BYTES = 8
_VERSION_BYTES = 8
# LFU scores put the access count above the last-use tick: ticks stay below 2**40.
_TICK_BITS = 40


class CacheError(PSError, ValueError):
    """A cache configured or used wrongly (names the table, what was expected and found)."""


@dataclass
class CacheStats:
    """Counters since creation (or `reset_stats`); hit rates count unique rows per batch."""

    lookups: int = 0  # ids looked up (with repeats)
    unique: int = 0  # unique ids per batch, summed over batches
    hits: int = 0  # unique ids served from the cache without a round trip
    prefetched: int = 0  # unique ids served from a prefetch issued during an earlier step
    rows_pulled: int = 0
    rows_pushed: int = 0
    bytes_pulled: int = 0  # ids sent + rows and versions received
    bytes_pushed: int = 0  # ids and gradient rows sent
    pulls: int = 0  # pull requests
    pushes: int = 0  # push requests
    evictions: int = 0
    write_backs: int = 0  # rows whose accumulated gradient was pushed
    steps: int = 0
    max_served_lag: int = 0  # the largest age (steps since pull) of a row served
    extra: dict = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.unique if self.unique else 0.0

    @property
    def miss_rate(self) -> float:
        return 1.0 - self.hit_rate if self.unique else 0.0

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out["hit_rate"] = self.hit_rate
        out["bytes_per_step"] = (self.bytes_pulled + self.bytes_pushed) / self.steps if self.steps else 0.0
        return out


class HETCache:
    """A worker-side cache of one parameter-server table (rows of `dim` floats).

    Use per step: `rows = cache.lookup(ids)` (any shape of int64 ids; returns
    `ids.shape + (dim,)`), then `cache.accumulate(ids, grads)` with the gradient rows
    of those ids (repeats are summed), then `cache.end_step()`, which writes back what
    the bounds require in one push and advances the clock. `prefetch(next_ids)` during a
    step starts pulling the next batch's rows early. `flush()` writes every accumulated
    gradient back.

    `capacity` is in rows (0: no cache, every row pulled and pushed each step, the
    cache-less PS). A batch with more unique ids than `capacity` is served whole and
    trimmed at the end of the step. `scale` multiplies every pushed gradient (1/N for
    N data-parallel workers averaging their gradients). `sync=True` (a table created
    with `sync_workers`) pushes once every step, even with nothing to write, as the
    server counts one push per worker per step.
    """

    def __init__(self, client, table: str, dim: int, capacity: int, policy: str = "lru", staleness: int = 0, *,
                 scale: float = 1.0, sync: bool = False, dtype=np.float32):
        if policy not in POLICIES:
            raise CacheError(f"cache of table {table!r}: policy must be one of {POLICIES}, found {policy!r}")
        for what, value in (("capacity", capacity), ("staleness", staleness), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise CacheError(f"cache of table {table!r}: {what} must be a non-negative integer, found {value!r}")
        if dim == 0:
            raise CacheError(f"cache of table {table!r}: dim must be positive, found 0")
        self.client, self.table, self.dim = client, table, int(dim)
        self.capacity, self.policy, self.staleness = int(capacity), policy, int(staleness)
        self.scale, self.sync, self.dtype = float(scale), bool(sync), np.dtype(dtype)
        self.clock = 0  # the worker's step count for this table
        self.stats = CacheStats()
        self._tick = 0  # access counter: every looked-up id occurrence gets its own tick
        # The resident ids, sorted, and the storage slot of each.
        self._keys = np.empty(0, np.int64)
        self._slot_of = np.empty(0, np.int64)
        self._alloc(max(self.capacity, 16))
        # The current batch: its unique ids and their slots (valid from lookup to end_step).
        self._batch_keys = np.empty(0, np.int64)
        self._batch_slots = np.empty(0, np.int64)
        # Gradients leaving the cache this step (evicted rows): pushed with end_step's push.
        self._out_ids: list[np.ndarray] = []
        self._out_grads: list[np.ndarray] = []
        self._pushes: list = []  # the future of every push whose reply has not been looked at, in issue order
        self._staged: list = []  # prefetches: (sorted ids, future, clock at issue)
        self._deferred_prefetch: np.ndarray | None = None
        self._served_ids = self._served_versions = np.empty(0, np.int64)
        self._unique_memo: list = []

    # --- storage ------------------------------------------------------------------------
    def _alloc(self, size: int) -> None:
        self._rows = np.zeros((size, self.dim), self.dtype)
        self._pending = np.zeros((size, self.dim), self.dtype)
        self._has_pending = np.zeros(size, bool)
        self._fetched = np.zeros(size, np.int64)  # clock at which the row was pulled
        self._version = np.zeros(size, np.int64)  # server version of the row as pulled
        self._score = np.zeros(size, np.int64)  # eviction order: lowest goes first
        self._free = np.arange(size - 1, -1, -1, dtype=np.int64)  # a stack: pop from the end

    def _grow(self, needed: int) -> None:
        old = len(self._rows)
        size = max(old * 2, old + needed)
        for name in ("_rows", "_pending"):
            arr = getattr(self, name)
            new = np.zeros((size, self.dim), self.dtype)
            new[:old] = arr
            setattr(self, name, new)
        for name in ("_has_pending", "_fetched", "_version", "_score"):
            arr = getattr(self, name)
            new = np.zeros(size, arr.dtype)
            new[:old] = arr
            setattr(self, name, new)
        self._free = np.concatenate([np.arange(size - 1, old - 1, -1, dtype=np.int64), self._free])

    def _take_slots(self, n: int) -> np.ndarray:
        if n > len(self._free):
            self._grow(n - len(self._free))
        slots = self._free[len(self._free) - n:][::-1].copy()
        self._free = self._free[:len(self._free) - n]
        return slots

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        pos = np.searchsorted(self._keys, key)
        return bool(pos < len(self._keys) and self._keys[pos] == key)

    def resident_ids(self) -> np.ndarray:
        """The ids held now, sorted."""
        return self._keys.copy()

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For sorted unique `ids`: whether each is resident, and its slot (-1 if not)."""
        pos = np.searchsorted(self._keys, ids)
        inside = pos < len(self._keys)
        found = np.zeros(len(ids), bool)
        found[inside] = self._keys[pos[inside]] == ids[inside]
        slots = np.full(len(ids), -1, np.int64)
        slots[found] = self._slot_of[pos[found]]
        return found, slots

    def _insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Adds sorted unique non-resident `ids` to the sorted index."""
        pos = np.searchsorted(self._keys, ids)
        self._keys = np.insert(self._keys, pos, ids)
        self._slot_of = np.insert(self._slot_of, pos, slots)

    def _remove(self, ids: np.ndarray) -> None:
        pos = np.searchsorted(self._keys, np.sort(ids))
        keep = np.ones(len(self._keys), bool)
        keep[pos] = False
        self._keys, self._slot_of = self._keys[keep], self._slot_of[keep]

    # --- the step ---------------------------------------------------------------------------
    def _check_ids(self, ids) -> np.ndarray:
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise CacheError(f"cache of table {self.table!r}: ids must be integers, found dtype {ids.dtype}")
        return ids.astype(np.int64, copy=False)

    def _unique(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`np.unique(flat, return_inverse=True)`, remembered for the last two id arrays: a step
        sees the same ids in prefetch, lookup and accumulate."""
        for key, result in self._unique_memo:
            if key.shape == flat.shape and np.array_equal(key, flat):
                return result
        result = np.unique(flat, return_inverse=True)
        self._unique_memo = [(flat.copy(), result), *self._unique_memo[:1]]
        return result

    def lookup(self, ids) -> np.ndarray:
        """The rows of `ids` (`ids.shape + (dim,)`), pulling what the cache cannot serve."""
        ids = self._check_ids(ids)
        flat = ids.reshape(-1)
        uniq, inverse = self._unique(flat)
        # The last occurrence of each id gives it its access tick (LRU order within a batch).
        last = np.full(len(uniq), -1, np.int64)
        np.maximum.at(last, inverse, np.arange(len(flat), dtype=np.int64))
        counts = np.bincount(inverse, minlength=len(uniq)).astype(np.int64)
        ticks = self._tick + last
        self._tick += len(flat)

        found, slots = self._find(uniq)
        age = np.where(found, self.clock - self._fetched[np.maximum(slots, 0)], 0)
        valid = found & (age <= self.staleness)
        stats = self.stats
        stats.lookups += len(flat)
        stats.unique += len(uniq)
        stats.hits += int(valid.sum())
        if valid.any():
            stats.max_served_lag = max(stats.max_served_lag, int(age[valid].max()))

        need = ~valid
        if need.any():
            need_ids = uniq[need]
            # Invariant of end_step: a row past the bound carries no unpushed gradient.
            rows, versions, stamps = self._gather_missing(need_ids)
            stale = found[need]
            new_slots = np.empty(len(need_ids), np.int64)
            new_slots[stale] = slots[need][stale]
            fresh = ~stale
            if fresh.any():
                new_slots[fresh] = self._take_slots(int(fresh.sum()))
                self._insert(need_ids[fresh], new_slots[fresh])
                self._has_pending[new_slots[fresh]] = False
                self._pending[new_slots[fresh]] = 0
                self._score[new_slots[fresh]] = 0
            self._rows[new_slots] = rows
            self._version[new_slots] = versions
            self._fetched[new_slots] = stamps
            slots[need] = new_slots
            served_lag = self.clock - stamps
            if len(served_lag):
                stats.max_served_lag = max(stats.max_served_lag, int(served_lag.max()))
        self._staged = []

        if self.policy == "lru":
            self._score[slots] = ticks
        else:
            freq = (self._score[slots] >> _TICK_BITS) + counts
            self._score[slots] = (freq << _TICK_BITS) | ticks
        self._batch_keys, self._batch_slots = uniq, slots
        self._served_ids, self._served_versions = uniq, self._version[slots]
        excess = len(self._keys) - self.capacity
        if excess > 0:
            self._evict(excess, exclude=slots)
        return self._rows[slots][inverse].reshape(ids.shape + (self.dim,))

    def _gather_missing(self, ids: np.ndarray):
        """Rows for sorted `ids`: from prefetches within the bound, the rest pulled now."""
        rows = np.empty((len(ids), self.dim), self.dtype)
        versions = np.zeros(len(ids), np.int64)
        stamps = np.full(len(ids), self.clock, np.int64)
        todo = np.ones(len(ids), bool)
        for staged_ids, future, stamp in self._staged:
            if self.clock - stamp > self.staleness:
                continue
            pos = np.searchsorted(staged_ids, ids)
            inside = pos < len(staged_ids)
            hit = np.zeros(len(ids), bool)
            hit[inside] = staged_ids[pos[inside]] == ids[inside]
            hit &= todo
            if not hit.any():
                continue
            staged_rows, staged_versions = future.result()
            rows[hit] = staged_rows[pos[hit]]
            versions[hit] = staged_versions[pos[hit]]
            stamps[hit] = stamp
            todo &= ~hit
            self.stats.prefetched += int(hit.sum())
        if todo.any():
            pull_ids = ids[todo]
            pulled, pulled_versions = self.client.pull(self.table, pull_ids)
            self._count_pull(len(pull_ids))
            rows[todo] = pulled
            versions[todo] = pulled_versions
        return rows, versions, stamps

    def _count_pull(self, n: int) -> None:
        self.stats.pulls += 1
        self.stats.rows_pulled += n
        self.stats.bytes_pulled += n * (_ID_BYTES + _VERSION_BYTES + self.dim * self.dtype.itemsize)

    def _check_pushes(self, wait: bool = False, timeout_s: float | None = None) -> None:
        """Forgets the pushes whose replies came (all of them first, with `wait`) and raises the
        first failure among them in issue order, noting how many failed: their gradients are lost."""
        if not self._pushes:
            return
        if wait:
            _, not_done = concurrent.futures.wait(self._pushes, timeout=timeout_s)
            if not_done:
                raise CacheError(f"cache of table {self.table!r}: {len(not_done)} pushes still have no reply "
                                 f"after {timeout_s:g} s")
        done = [f for f in self._pushes if f.done()]
        if not done:
            return
        self._pushes = [f for f in self._pushes if not f.done()]
        failed = [f.exception() for f in done if f.exception() is not None]
        if failed:
            first = failed[0]
            first.add_note(f"cache of table {self.table!r}: {len(failed)} pushes failed; their gradients were not "
                           "applied (this is the first of them)")
            raise first

    def _evict(self, count: int, exclude: np.ndarray | None = None) -> None:
        """Drops the `count` lowest-scored resident rows (not those in `exclude`), writing
        back their accumulated gradients."""
        slots = self._slot_of
        keys = self._keys
        if exclude is not None and len(exclude):
            keep = ~np.isin(slots, exclude)
            slots, keys = slots[keep], keys[keep]
        count = min(count, len(slots))
        if count <= 0:
            return
        scores = self._score[slots]
        pick = np.argpartition(scores, count - 1)[:count] if count < len(slots) else np.arange(len(slots))
        gone_slots, gone_keys = slots[pick], keys[pick]
        pending = self._has_pending[gone_slots]
        if pending.any():
            self._out_ids.append(gone_keys[pending])
            self._out_grads.append(self._pending[gone_slots[pending]].copy())
            self.stats.write_backs += int(pending.sum())
        self._has_pending[gone_slots] = False
        self._remove(gone_keys)
        self._free = np.concatenate([self._free, gone_slots])
        self.stats.evictions += count

    def accumulate(self, ids, grads) -> None:
        """Adds gradient rows for `ids` (looked up this step; repeats are summed) to the
        rows' pending gradients; pushed by `end_step` as the bounds require."""
        ids = self._check_ids(ids).reshape(-1)
        if isinstance(grads, torch.Tensor):
            grads = grads.detach().cpu()
        else:
            grads = torch.from_numpy(np.ascontiguousarray(grads))
        grads = grads.reshape(len(ids), -1) if len(ids) else grads.reshape(0, self.dim)
        if grads.shape[1] != self.dim:
            raise CacheError(f"cache of table {self.table!r}: gradient rows must have {self.dim} values, "
                             f"found shape {tuple(grads.shape)} for {len(ids)} ids")
        uniq, inverse = self._unique(ids)
        summed = torch.zeros((len(uniq), self.dim), dtype=grads.dtype)
        summed.index_add_(0, torch.from_numpy(inverse.reshape(-1)), grads)
        summed = summed.numpy().astype(self.dtype, copy=False)
        found, slots = self._find(uniq)
        if not found.all():
            # Rows that were not looked up (or already trimmed): straight to the server.
            self._out_ids.append(uniq[~found])
            self._out_grads.append(summed[~found])
        slots = slots[found]
        self._pending[slots] += summed[found]
        self._has_pending[slots] = True

    def end_step(self, next_ids=None) -> None:
        """Ends the step: pushes the gradients the bounds require (one push) and advances
        the clock. `next_ids` (optional) are prefetched right after the push."""
        nxt = self.clock + 1
        slots = self._slot_of
        due = self._has_pending[slots] & (nxt - self._fetched[slots] > self.staleness)
        if due.any():
            due_slots = slots[due]
            self._out_ids.append(self._keys[due])
            self._out_grads.append(self._pending[due_slots].copy())
            self._pending[due_slots] = 0
            self._has_pending[due_slots] = False
            self.stats.write_backs += int(due.sum())
        excess = len(self._keys) - self.capacity
        if excess > 0:  # a batch larger than the cache: trim it now
            self._evict(excess)
        self._push_out()
        self.clock = nxt
        self.stats.steps += 1
        self._batch_keys = self._batch_slots = np.empty(0, np.int64)
        if next_ids is None:
            next_ids, self._deferred_prefetch = self._deferred_prefetch, None
        if next_ids is not None:
            self._issue_prefetch(self._unique(self._check_ids(next_ids).reshape(-1))[0], self.clock)
        # Last, so the step itself is complete (its push sent, the clock advanced) when a failure is raised.
        self._check_pushes()

    def _push_out(self, force: bool = False) -> None:
        if self._out_ids:
            ids = np.concatenate(self._out_ids)
            grads = np.concatenate(self._out_grads)
        else:
            ids, grads = np.empty(0, np.int64), np.empty((0, self.dim), self.dtype)
        self._out_ids, self._out_grads = [], []
        if len(ids) == 0 and not (self.sync or force):
            return
        if len(ids) > 1 and not np.all(ids[1:] > ids[:-1]):
            order = np.argsort(ids, kind="stable")
            ids, grads = ids[order], grads[order]
            if np.any(ids[1:] == ids[:-1]):  # one row twice (evicted and sent directly): sum
                uniq, inverse = np.unique(ids, return_inverse=True)
                summed = np.zeros((len(uniq), self.dim), grads.dtype)
                np.add.at(summed, inverse, grads)
                ids, grads = uniq, summed
        self._pushes.append(self.client.push(self.table, ids, grads, scale=self.scale))
        self.stats.pushes += 1
        self.stats.rows_pushed += len(ids)
        self.stats.bytes_pushed += len(ids) * (_ID_BYTES + self.dim * self.dtype.itemsize)

    def prefetch(self, ids) -> None:
        """Starts pulling the rows the next step will need and the cache cannot serve.

        With `staleness >= 1` rows not resident are pulled at once (stamped with the
        current clock, so they count one step old when served); with `staleness == 0`
        the pull must follow this step's update, so it is issued by `end_step`.
        """
        ids = self._check_ids(ids)
        if self.staleness == 0:
            self._deferred_prefetch = ids
            return
        uniq, _ = self._unique(ids.reshape(-1))
        found, _ = self._find(uniq)
        self._issue_prefetch(uniq[~found], self.clock)

    def _issue_prefetch(self, uniq: np.ndarray, stamp: int) -> None:
        """Pulls sorted unique `uniq` asynchronously for the step at clock `stamp`."""
        if stamp == self.clock and len(self._keys):
            found, slots = self._find(uniq)
            valid = np.zeros(len(uniq), bool)
            valid[found] = self.clock - self._fetched[slots[found]] <= self.staleness
            uniq = uniq[~valid]
        if len(uniq) == 0:
            return
        self._staged.append((uniq, self.client.pull_async(self.table, uniq), stamp))
        self._count_pull(len(uniq))

    def flush(self, refresh: bool = True, timeout_s: float | None = None) -> None:
        """Writes back every accumulated gradient now (one push) and waits for the replies of every
        push still outstanding, raising the first that failed; with `refresh` re-pulls the resident
        rows, so the cache then holds exactly the server's rows. On a synchronous table this is
        one push of a round: every worker must flush together."""
        slots = self._slot_of
        pending = self._has_pending[slots]
        if pending.any():
            self._out_ids.append(self._keys[pending])
            self._out_grads.append(self._pending[slots[pending]].copy())
            self._pending[slots[pending]] = 0
            self._has_pending[slots[pending]] = False
            self.stats.write_backs += int(pending.sum())
        if self._out_ids or self.sync:  # a synchronous table counts this push in every worker's rounds
            self._push_out(force=True)
        self._check_pushes(wait=True, timeout_s=timeout_s)
        self._staged = []
        if refresh and len(self._keys):
            rows, versions = self.client.pull(self.table, self._keys)
            self._count_pull(len(self._keys))
            self._rows[self._slot_of] = rows
            self._version[self._slot_of] = versions
            self._fetched[self._slot_of] = self.clock

    # --- inspection -----------------------------------------------------------------------
    def cached_rows(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """The cached rows and versions of resident `ids` (raises for ids not resident)."""
        ids = self._check_ids(ids).reshape(-1)
        order = np.argsort(ids)
        found, slots = self._find(ids[order])
        if not found.all():
            raise CacheError(f"cache of table {self.table!r}: ids {ids[order][~found][:5].tolist()} are not resident")
        out_slots = np.empty(len(ids), np.int64)
        out_slots[order] = slots
        return self._rows[out_slots].copy(), self._version[out_slots].copy()

    def served_versions(self) -> tuple[np.ndarray, np.ndarray]:
        """The unique ids of the last lookup (sorted) and the versions of the rows served for them."""
        return self._served_ids.copy(), self._served_versions.copy()

    def pending_rows(self) -> int:
        return int(self._has_pending[self._slot_of].sum())

    def reset_stats(self) -> None:
        self.stats = CacheStats()

    def __repr__(self) -> str:
        return (f"HETCache(table={self.table!r}, dim={self.dim}, {len(self)}/{self.capacity} rows, "
                f"policy={self.policy!r}, staleness={self.staleness}, clock={self.clock})")
