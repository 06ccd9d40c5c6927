"""The hierarchical embedding store: every tier answers with the source table's rows; eviction, fall-through,
fill-upward, defaults, updates, read-only and reopened RocksDB tiers, PS snapshots, configuration errors."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from luoshu import models, ps
from luoshu.serving import export, load, weight_rows
from luoshu.serving.embedding_store import (
    EmbeddingStore,
    ReadOnlyTierError,
    RowTier,
    StoreConfig,
    StoreError,
)
from tests.serving.conftest import DCN_SHAPE

DIM = 8


def _table(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _config(path=None, cache=16, host=40, read_only=False, **table) -> dict:
    doc = {
        "hot_cache": {"capacity": cache, "policy": "lru"},
        "volatile_db": {
            "capacity": host,
            "overflow_policy": "evict_least_used",
            "overflow_resolution_target": 0.75,
            "initial_cache_rate": 0.5,
        },
        "tables": [{"name": "emb", "dim": DIM, **table}],
    }
    if path is not None:
        doc["persistent_db"] = {"type": "rocks_db", "path": str(path), "read_only": read_only}
    return doc


def _power_law_ids(n_rows: int, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.minimum(rng.zipf(1.3, size=shape) - 1, n_rows - 1).astype(np.int64)


def test_every_tier_serves_the_source_rows(tmp_path):
    table = _table(400)
    with EmbeddingStore(_config(tmp_path / "db")) as store:
        store.load("emb", table)
        for step in range(30):
            ids = _power_law_ids(400, (64, 3), seed=step)
            np.testing.assert_array_equal(store.lookup("emb", ids), table[ids])
        stats = store.stats()["emb"]
    tiers = stats["tiers"]
    assert tiers["hot_cache"]["hits"] > 0 and tiers["host"]["hits"] > 0 and tiers["persistent"]["hits"] > 0
    assert tiers["hot_cache"]["evictions"] > 0 and tiers["host"]["evictions"] > 0
    assert stats["host_rows"] <= 40 and stats["cache_rows"] <= 16 and stats["defaults"] == 0
    assert 0 < tiers["hot_cache"]["hit_rate"] < 1


def test_a_table_ten_times_the_host_tier_serves_from_rocksdb(tmp_path):
    table = _table(2000, seed=3)
    with EmbeddingStore(_config(tmp_path / "db", cache=0, host=200)) as store:
        store.load("emb", table)
        ids = np.random.default_rng(1).permutation(2000)
        for chunk in np.array_split(ids, 10):
            np.testing.assert_array_equal(store.lookup("emb", chunk), table[chunk])
        assert store.stats()["emb"]["host_rows"] <= 200
        assert store.stats()["emb"]["tiers"]["persistent"]["hits"] >= 1800


def test_fall_through_fills_the_tiers_above(tmp_path):
    table = _table(100)
    with EmbeddingStore(_config(tmp_path / "db")) as store:
        store.load("emb", table)
        cfg = store.table("emb")
        assert len(cfg.host) == 20  # initial_cache_rate 0.5 of 40: ids 0..19
        ids = np.array([90, 91, 92])
        store.lookup("emb", ids)
        s = store.stats()["emb"]["tiers"]
        assert (s["hot_cache"]["hits"], s["host"]["hits"], s["persistent"]["hits"]) == (0, 0, 3)
        store.lookup("emb", ids)  # now all three from the hot cache
        s = store.stats()["emb"]["tiers"]
        assert (s["hot_cache"]["hits"], s["host"]["lookups"], s["persistent"]["lookups"]) == (3, 3, 3)
        host_found, _ = cfg.host.get(np.array([90, 91, 92]), count=False)
        assert host_found.all()


def test_per_table_settings_override_the_top_level():
    doc = _config(None, host=None)
    doc["tables"][0]["hot_cache"] = {"capacity": 3, "policy": "lfu"}
    doc["tables"][0]["volatile_db"] = {"capacity": 50}
    config = StoreConfig.from_json(doc).tables["emb"]
    assert (config.cache_capacity, config.cache_policy, config.host_capacity) == (3, "lfu", 50)
    assert config.overflow_policy == "evict_least_used"


def test_unknown_ids_get_the_default_row(tmp_path):
    default = np.linspace(-1, 1, DIM).tolist()
    with EmbeddingStore(_config(tmp_path / "db", default_value=default)) as store:
        store.load("emb", _table(10))
        rows = store.lookup("emb", np.array([[3, 10**12], [-5, 3]]))
        np.testing.assert_array_equal(rows[0, 1], np.float32(default))
        np.testing.assert_array_equal(rows[1, 0], np.float32(default))
        np.testing.assert_array_equal(rows[0, 0], _table(10)[3])
        assert store.stats()["emb"]["defaults"] == 2
    with EmbeddingStore(_config(None, host=None, default_value=0.5)) as store:
        store.load("emb", _table(4))
        np.testing.assert_array_equal(store.lookup("emb", np.array([7])), np.full((1, DIM), 0.5, np.float32))


@pytest.mark.parametrize("policy, evicted", [("lru", 0), ("lfu", 1), ("fifo", 2)])
def test_eviction_policies(policy, evicted):
    tier = RowTier(DIM, 3, policy)
    rows = _table(4)
    tier.put(np.array([2]), rows[2:3])  # the oldest row
    tier.put(np.array([0, 1]), rows[:2])
    for ids in ([2], [0], [0], [0], [1], [2], [2]):  # uses: 0 thrice, 1 once, 2 thrice; least recent: 0
        tier.get(np.array(ids))
    tier.put(np.array([3]), rows[3:])
    resident = set(tier.resident_ids().tolist())
    assert len(resident) == 3 and evicted not in resident and 3 in resident
    found, got = tier.get(np.array(sorted(resident)))
    np.testing.assert_array_equal(got, rows[sorted(resident)])


def test_host_overflow_evicts_down_to_the_target():
    tier = RowTier(DIM, 100, "random", target=0.5)
    tier.put(np.arange(100), _table(100))
    tier.put(np.array([1000]), _table(1))
    assert len(tier) == 50 and 1000 in set(tier.resident_ids().tolist())
    found, rows = tier.get(tier.resident_ids())
    assert found.all()


def test_rocksdb_tier_reopened_after_a_restart(tmp_path):
    table = _table(300, seed=5)
    with EmbeddingStore(_config(tmp_path / "db")) as store:
        store.load("emb", table)
    # a new process would open the same directory; nothing is loaded this time
    with EmbeddingStore(_config(tmp_path / "db", read_only=True)) as store:
        ids = np.random.default_rng(2).integers(0, 300, (50, 4))
        np.testing.assert_array_equal(store.lookup("emb", ids), table[ids])
        with pytest.raises(ReadOnlyTierError, match="read-only"):
            store.update("emb", np.array([1]), np.zeros((1, DIM), np.float32))
        with pytest.raises(ReadOnlyTierError, match="refuses writes"):
            store.table("emb").persistent.put(np.array([1]), np.zeros((1, DIM), np.float32))
    with EmbeddingStore(_config(tmp_path / "db")) as store:  # writable again: same rows
        np.testing.assert_array_equal(store.lookup("emb", np.arange(300)), table)


def test_a_read_only_tier_needs_a_database(tmp_path):
    with pytest.raises(StoreError, match="no database there"):
        EmbeddingStore(_config(tmp_path / "missing", read_only=True))


@pytest.mark.parametrize("persistent", [True, False])
def test_updates_are_visible_after_refresh(tmp_path, persistent):
    table = _table(100)
    path = tmp_path / "db" if persistent else None
    with EmbeddingStore(_config(path, host=40 if persistent else None)) as store:
        store.load("emb", table)
        hot = np.array([1, 2, 3])
        store.lookup("emb", hot)  # resident in the cache
        ids = np.array([1, 2, 99, 99, 250])
        fresh = np.random.default_rng(9).standard_normal((5, DIM)).astype(np.float32)
        store.update("emb", ids, fresh)
        np.testing.assert_array_equal(store.lookup("emb", ids[:3]), table[ids[:3]])  # not before the refresh
        assert store.refresh() == 4
        expected = table[[1, 2, 99, 3]].copy()
        expected[0], expected[1], expected[2] = fresh[0], fresh[1], fresh[3]  # the newest row of 99 wins
        np.testing.assert_array_equal(store.lookup("emb", np.array([1, 2, 99, 3])), expected)
        np.testing.assert_array_equal(store.lookup("emb", np.array([250])), fresh[4:])
        with pytest.raises(StoreError, match="NaN"):
            store.update("emb", np.array([0]), np.full((1, DIM), np.nan, np.float32))
        with pytest.raises(StoreError, match=r"shape \[2, 8\]"):
            store.update("emb", np.array([0, 1]), np.zeros((2, 3), np.float32))


def test_background_refresh(tmp_path):
    doc = _config(None, host=None)
    doc["refresh_interval_s"] = 0.02
    with EmbeddingStore(doc) as store:
        store.load("emb", _table(10))
        store.update("emb", np.array([4]), np.ones((1, DIM), np.float32))
        deadline = time.monotonic() + 5
        while not (store.lookup("emb", np.array([4])) == 1).all():
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_tables_from_a_package(tmp_path, packages, loaded):
    with EmbeddingStore.from_package(
        packages["dcn"], _config(tmp_path / "db", name="embedding.weight", dim=4)
    ) as store:
        want = loaded["dcn"].weights["embedding.weight"].numpy()
        np.testing.assert_array_equal(store.lookup("embedding.weight", np.arange(len(want))), want)
    # a table stored in row shards is read shard by shard
    sharded = export(
        tmp_path / "sharded",
        models.build("dcn", **DCN_SHAPE),
        (np.zeros((2, 4), np.float32), np.zeros((2, 6), np.int64)),
        name="dcn",
        max_shard_bytes=1000,
    )
    assert len(list(weight_rows(sharded, "embedding.weight"))) > 1
    config = _config(tmp_path / "db2", name="embedding.weight", dim=4)
    with EmbeddingStore.from_package(sharded, config) as store:
        want = load(sharded).weights["embedding.weight"].numpy()
        np.testing.assert_array_equal(store.lookup("embedding.weight", np.arange(len(want))), want)
    with pytest.raises(StoreError, match="no weight 'nope'"):
        EmbeddingStore.from_package(packages["dcn"], _config(None, host=None, name="nope", dim=4))


def test_tables_from_parameter_server_snapshots(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.arange(60)
    with ps.start_local_servers(2, snapshot_dir=tmp_path / "snaps", in_process=True) as servers:
        with ps.connect(addresses=servers) as client:
            client.create_table("emb", DIM, optimizer=("sgd", {"lr": 0.1}))
            for _ in range(3):
                batch = rng.integers(0, 60, 32)
                client.push("emb", batch, rng.standard_normal((32, DIM)).astype(np.float32)).result(10)
            rows, _ = client.pull("emb", ids)
            client.snapshot()
    with EmbeddingStore.from_ps_snapshots(tmp_path / "snaps", 2, _config(tmp_path / "db")) as store:
        np.testing.assert_allclose(store.lookup("emb", ids), rows, rtol=0, atol=0)
    with pytest.raises(StoreError, match="no good snapshot of parameter server 0 of 3"):
        EmbeddingStore.from_ps_snapshots(tmp_path / "snaps", 3, _config(None, host=None))


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: d.update(extra=1), "unknown keys ['extra']"),
        (lambda d: d["hot_cache"].update(policy="mru"), "policy must be one of"),
        (lambda d: d["volatile_db"].update(overflow_policy="drop"), "overflow_policy must be one of"),
        (lambda d: d["volatile_db"].update(overflow_resolution_target=1.5), "overflow_resolution_target"),
        (lambda d: d["tables"][0].update(dim=0), "dim must be a positive integer"),
        (lambda d: d["tables"][0].update(default_value=[1, 2]), "default_value must be a number or a list of 8"),
        (lambda d: d["tables"].append(dict(d["tables"][0])), "configured twice"),
        (lambda d: d.update(tables=[]), "non-empty list"),
        (lambda d: d.update(persistent_db={"type": "redis", "path": "x"}), "must be 'rocks_db'"),
    ],
)
def test_bad_configs_are_refused(change, words):
    doc = _config(None)
    change(doc)
    with pytest.raises(StoreError) as err:
        StoreConfig.from_json(doc)
    assert words in str(err.value)


def test_config_from_a_json_file_and_bad_use(tmp_path):
    path = tmp_path / "store.json"
    path.write_text(json.dumps(_config(None, host=5)))
    with EmbeddingStore(path) as store:
        with pytest.raises(StoreError, match="do not fit the host tier's capacity 5"):
            store.load("emb", _table(6))
        with pytest.raises(StoreError, match="no table 'other'"):
            store.lookup("other", np.array([1]))
        with pytest.raises(StoreError, match="ids must be integers"):
            store.lookup("emb", np.array([1.5]))
        with pytest.raises(StoreError, match=r"rows must be \(n, 8\)"):
            store.load("emb", np.zeros((3, 4), np.float32))


def test_updates_streamed_over_zeromq(tmp_path):
    import zmq

    from luoshu.serving.embedding_store import UpdateFeed

    table = _table(50)
    with EmbeddingStore(_config(tmp_path / "db")) as store:
        store.load("emb", table)
        address = store.listen("tcp://127.0.0.1:0")
        fresh = np.full((2, DIM), 3.0, np.float32)
        raw = zmq.Context.instance().socket(zmq.PUSH)
        raw.connect(address)
        raw.send_multipart([b"junk"])  # a malformed message: counted and dropped
        with UpdateFeed(address) as feed:
            feed.send("emb", np.array([4, 40]), fresh)
            feed.send("nope", np.array([1]), fresh[:1])  # an unknown table: refused, the store goes on
            deadline = time.monotonic() + 10
            while store.rejected_updates < 2 or store.table("emb").updates.empty():
                assert time.monotonic() < deadline, (store.rejected_updates, store.feed_errors)
                time.sleep(0.01)
        raw.close()
        assert any("no table 'nope'" in e for e in store.feed_errors)
        np.testing.assert_array_equal(store.lookup("emb", np.array([4])), table[[4]])  # before the refresh
        store.refresh()
        np.testing.assert_array_equal(
            store.lookup("emb", np.array([4, 40, 5])), np.stack([fresh[0], fresh[1], table[5]])
        )
