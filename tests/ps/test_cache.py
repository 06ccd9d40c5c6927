"""The HET cache against a per-id reference model, an in-process server and NumPy sums."""

from collections import OrderedDict

import numpy as np
import pytest

from luoshu.ps.cache import CacheError, HETCache
from tests.ps.fake_client import FakeClient, LateFakeClient, RefusedPush, initial_rows

DIM = 4


class ReferenceCache:
    """LRU / LFU over single ids, written the obvious way (a dict per id, a Python loop)."""

    def __init__(self, capacity, policy, staleness):
        self.capacity, self.policy, self.staleness = capacity, policy, staleness
        self.entries = OrderedDict()  # id -> [last_use, freq, fetched_clock]
        self.tick = 0
        self.clock = 0
        self.hits = 0

    def _score(self, key):
        last, freq, _ = self.entries[key]
        return (last,) if self.policy == "lru" else (freq, last)

    def _evict(self, count, exclude):
        candidates = sorted((k for k in self.entries if k not in exclude), key=self._score)
        for k in candidates[:count]:
            del self.entries[k]

    def lookup(self, ids):
        batch = set()
        for i in ids.reshape(-1).tolist():
            if i not in batch:
                e = self.entries.get(i)
                if e is not None and self.clock - e[2] <= self.staleness:
                    self.hits += 1
                elif e is not None:
                    e[2] = self.clock
                else:
                    self.entries[i] = [0, 0, self.clock]
                batch.add(i)
            e = self.entries[i]
            e[0] = self.tick
            e[1] += 1
            self.tick += 1
        if len(self.entries) > self.capacity:
            self._evict(len(self.entries) - self.capacity, batch)

    def end_step(self):
        if len(self.entries) > self.capacity:
            self._evict(len(self.entries) - self.capacity, set())
        self.clock += 1


def _power_law_batches(steps, batch, num_ids, alpha=1.2, seed=0):
    rng = np.random.default_rng(seed)
    p = np.arange(1, num_ids + 1, dtype=np.float64) ** -alpha
    p /= p.sum()
    perm = rng.permutation(num_ids)  # hot ids are not the small ones
    return [perm[rng.choice(num_ids, size=batch, p=p)].astype(np.int64) for _ in range(steps)]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_eviction_order_and_hits_match_reference(policy):
    client = FakeClient(DIM)
    cache = HETCache(client, "t", DIM, capacity=20, policy=policy, staleness=1000)
    ref = ReferenceCache(20, policy, 1000)
    for ids in _power_law_batches(30, 12, 200, seed=1):
        cache.lookup(ids)
        ref.lookup(ids)
        np.testing.assert_array_equal(cache.resident_ids(), sorted(ref.entries))
        cache.end_step()
        ref.end_step()
    assert cache.stats.hits == ref.hits
    assert cache.stats.evictions > 0


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_batch_larger_than_capacity_is_served_then_trimmed(policy):
    client = FakeClient(DIM)
    cache = HETCache(client, "t", DIM, capacity=5, policy=policy, staleness=10)
    ref = ReferenceCache(5, policy, 10)
    for step in range(6):
        ids = np.arange(step, step + 9, dtype=np.int64).reshape(3, 3)
        rows = cache.lookup(ids)
        np.testing.assert_allclose(rows, initial_rows(ids.reshape(-1), DIM).reshape(3, 3, DIM))
        ref.lookup(ids)
        cache.end_step()
        ref.end_step()
        assert len(cache) == 5
        np.testing.assert_array_equal(cache.resident_ids(), sorted(ref.entries))


def test_hit_rate_on_power_law_ids_beats_uniform_and_matches_reference():
    num_ids, capacity = 2000, 200
    rates = {}
    for name, batches in (("power_law", _power_law_batches(60, 256, num_ids, seed=2)),
                          ("uniform", [np.random.default_rng(s).integers(0, num_ids, 256) for s in range(60)])):
        cache = HETCache(FakeClient(DIM), "t", DIM, capacity=capacity, policy="lfu", staleness=100)
        ref = ReferenceCache(capacity, "lfu", 100)
        for ids in batches:
            cache.lookup(ids)
            ref.lookup(ids)
            cache.end_step()
            ref.end_step()
        assert cache.stats.hits == ref.hits
        rates[name] = cache.stats.hit_rate
    # A 10% cache holds most of the power-law traffic's hot head, and about 10% of uniform ids.
    assert rates["power_law"] > 0.5
    assert rates["uniform"] < 0.2
    assert rates["power_law"] > 3 * rates["uniform"]


@pytest.mark.parametrize("staleness", [0, 1, 3])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_staleness_bound_and_write_back_consistency(staleness, policy):
    """Rows are never served more than `staleness` versions behind the server; after the final
    write-back the server holds init - lr * (every gradient ever given) and the cache equals it."""
    lr = 0.1
    client = FakeClient(DIM, lr=lr)
    cache = HETCache(client, "t", DIM, capacity=30, policy=policy, staleness=staleness)
    rng = np.random.default_rng(3)
    total = {}
    for ids in _power_law_batches(25, 16, 120, seed=4):
        rows = cache.lookup(ids)
        served_ids, served = cache.served_versions()
        np.testing.assert_array_equal(served_ids, np.unique(ids))
        lag = client.server_version(served_ids) - served
        assert lag.min() >= 0 and lag.max() <= staleness
        if staleness == 0:  # exact: the served rows are the server's rows now
            np.testing.assert_array_equal(rows.reshape(-1, DIM), client.pull("t", ids)[0])
        grads = rng.standard_normal((len(ids), DIM)).astype(np.float32)
        cache.accumulate(ids, grads)
        for i, g in zip(ids.tolist(), grads):
            total[i] = total.get(i, 0) + g.astype(np.float64)
        cache.end_step()
    assert cache.stats.max_served_lag <= staleness
    cache.flush(refresh=True)
    ids = np.array(sorted(total), np.int64)
    expected = initial_rows(ids, DIM) - lr * np.stack([total[i] for i in ids.tolist()])
    server_rows, _ = client.pull("t", ids)
    np.testing.assert_allclose(server_rows, expected, rtol=1e-5, atol=1e-5)
    resident = cache.resident_ids()
    cached, versions = cache.cached_rows(resident)
    np.testing.assert_array_equal(cached, client.pull("t", resident)[0])
    np.testing.assert_array_equal(versions, client.server_version(resident))
    assert cache.pending_rows() == 0


def test_staleness_saves_traffic():
    moved = {}
    for s in (0, 4):
        client = FakeClient(DIM)
        cache = HETCache(client, "t", DIM, capacity=100, staleness=s)
        for ids in _power_law_batches(20, 64, 500, seed=5):
            cache.lookup(ids)
            cache.accumulate(ids, np.ones((len(ids), DIM), np.float32))
            cache.end_step()
        moved[s] = cache.stats.rows_pulled + cache.stats.rows_pushed
        assert client.pulled_rows == cache.stats.rows_pulled
        assert client.pushed_rows == cache.stats.rows_pushed
    assert moved[4] < 0.6 * moved[0]


@pytest.mark.parametrize("staleness", [0, 2])
def test_prefetch_serves_the_next_batch(staleness):
    client = FakeClient(DIM)
    cache = HETCache(client, "t", DIM, capacity=50, staleness=staleness)
    batches = _power_law_batches(8, 20, 300, seed=6)
    for step, ids in enumerate(batches):
        rows = cache.lookup(ids)
        served_ids, served = cache.served_versions()
        lag = client.server_version(served_ids) - served
        assert lag.max() <= staleness
        if staleness == 0:
            np.testing.assert_array_equal(rows.reshape(-1, DIM), client.pull("t", ids)[0])
        if step + 1 < len(batches):
            cache.prefetch(batches[step + 1])
        cache.accumulate(ids, np.full((len(ids), DIM), 0.5, np.float32))
        cache.end_step()
    assert cache.stats.prefetched > 0


def test_capacity_zero_is_a_cacheless_ps():
    client = FakeClient(DIM)
    cache = HETCache(client, "t", DIM, capacity=0, staleness=5, sync=True)
    ids = np.array([3, 3, 7], np.int64)
    for _ in range(3):
        cache.lookup(ids)
        cache.accumulate(ids, np.ones((3, DIM), np.float32))
        cache.end_step()
    assert len(cache) == 0 and cache.stats.hits == 0
    assert cache.stats.rows_pulled == 6 and cache.stats.rows_pushed == 6
    cache.end_step()  # sync tables get one push per step, even an empty one
    assert client.push_calls == 4


def test_bad_configuration_and_input_are_refused():
    client = FakeClient(DIM)
    with pytest.raises(CacheError, match="policy"):
        HETCache(client, "t", DIM, capacity=4, policy="fifo")
    with pytest.raises(CacheError, match="capacity"):
        HETCache(client, "t", DIM, capacity=-1)
    cache = HETCache(client, "t", DIM, capacity=4)
    with pytest.raises(CacheError, match="integers"):
        cache.lookup(np.array([0.5]))
    cache.lookup(np.array([1, 2]))
    with pytest.raises(CacheError, match="4 values"):
        cache.accumulate(np.array([1, 2]), np.zeros((2, 3), np.float32))
    assert cache.pending_rows() == 0


def test_flush_of_a_synchronous_table_always_pushes_once():
    """Every worker's flush is one push of a synchronous round, with or without gradients."""
    client = FakeClient(DIM)
    cache = HETCache(client, "t", DIM, capacity=10, staleness=3, sync=True)
    cache.lookup(np.array([1, 2]))
    cache.end_step()
    calls = client.push_calls
    cache.flush()
    assert client.push_calls == calls + 1


# --- pushes whose replies come late and out of order ---------------------------------------------
def _step(cache, ids, grad=1.0):
    cache.lookup(ids)
    cache.accumulate(ids, np.full((len(ids), DIM), grad, np.float32))
    cache.end_step()


def test_a_refused_push_followed_by_another_is_reported_by_flush():
    # Push 0 is refused, push 1 accepted; neither reply has come when push 1 leaves, and the
    # replies then arrive newest first. The cache must still report push 0's loss.
    client = LateFakeClient(DIM)
    client.refuse(0)
    cache = HETCache(client, "t", DIM, capacity=0)
    _step(cache, np.array([1, 2]))
    _step(cache, np.array([3]))
    assert client.outstanding() == 2
    client.release_later(0.05, order="reverse")
    with pytest.raises(RefusedPush, match="push 0 was refused"):
        cache.flush(refresh=False)
    assert client.outstanding() == 0
    cache.flush(refresh=False)  # reported once; nothing else is outstanding


@pytest.mark.parametrize("order", ["reverse", "random", "fifo"])
def test_every_outstanding_push_is_waited_for_and_the_first_failure_surfaces(order):
    client = LateFakeClient(DIM)
    for k in (3, 5):
        client.refuse(k)
    cache = HETCache(client, "t", DIM, capacity=0)
    for step in range(8):
        _step(cache, np.array([step % 3, 10 + step]))
    assert client.outstanding() == 8  # all tracked: none was completed by the fake yet
    client.release(order=order, seed=3)
    with pytest.raises(RefusedPush, match="push 3 was refused") as info:
        cache.end_step()  # the next push call sees the failed replies: the first in issue order wins
    assert any("2 pushes failed" in note for note in info.value.__notes__)
    # the accepted pushes were applied: rows 10+s for s not in (3, 5) moved by -lr * 1
    for s in range(8):
        expected = initial_rows(np.array([10 + s]), DIM)[0] - (0.0 if s in (3, 5) else 0.1)
        np.testing.assert_allclose(client.rows[10 + s], expected, rtol=1e-6)


def test_flush_waits_for_every_reply_not_only_the_newest():
    client = LateFakeClient(DIM)
    cache = HETCache(client, "t", DIM, capacity=16, staleness=0)
    for step in range(4):
        _step(cache, np.array([step, 7]))
    assert client.outstanding() == 4
    client.release_later(0.02, order="reverse", gap_s=0.05)  # the newest reply first, then one by one
    cache.flush(refresh=False)
    assert client.outstanding() == 0
