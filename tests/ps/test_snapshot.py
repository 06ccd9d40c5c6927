"""Snapshots: atomic files with verified checksums, newest-good restore, and training that continues
identically after servers are killed and restarted (in-process servers; subprocesses in
test_server_processes.py)."""

import json
import logging
import time

import numpy as np
import pytest

from luoshu import ps
from luoshu.ps import snapshot as S


def _arrays():
    return {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], dtype=np.int64)}


def test_round_trip_keep_and_order(tmp_path):
    paths = [S.write_snapshot(tmp_path, 1, 3, {"n": i}, _arrays(), keep=2) for i in range(4)]
    assert [p.name for p in S.list_snapshots(tmp_path, 1, 3)] == ["snap-00000003", "snap-00000002"]
    assert not paths[0].exists() and paths[3].exists()
    meta, arrays = S.read_snapshot(paths[3], 1, 3)
    assert meta == {"n": 3}
    for k, v in _arrays().items():
        np.testing.assert_array_equal(arrays[k], v)
        assert arrays[k].dtype == v.dtype
    manifest = json.loads((paths[3] / "manifest.json").read_text())
    assert set(manifest["files"]) == {"a.npy", "b.npy"} and len(manifest["files"]["a.npy"]["sha256"]) == 64


def test_corrupt_or_truncated_newest_falls_back_to_the_previous_good_one(tmp_path, caplog):
    S.write_snapshot(tmp_path, 0, 1, {"n": 0}, _arrays(), keep=3)
    newest = S.write_snapshot(tmp_path, 0, 1, {"n": 1}, _arrays(), keep=3)
    data = bytearray((newest / "a.npy").read_bytes())
    data[-1] ^= 0xFF
    (newest / "a.npy").write_bytes(bytes(data))
    with pytest.raises(ps.SnapshotError, match="a.npy does not match its SHA-256"):
        S.read_snapshot(newest, 0, 1)
    with caplog.at_level(logging.WARNING, logger="luoshu.ps"):
        path, meta, _ = S.load_newest(tmp_path, 0, 1)
    assert meta == {"n": 0} and path.name == "snap-00000000" and "skipping a bad snapshot" in caplog.text
    (newest / "a.npy").write_bytes(bytes(data[:20]))
    with pytest.raises(ps.SnapshotError, match="should have .* bytes, found 20"):
        S.read_snapshot(newest, 0, 1)
    (newest / "manifest.json").write_text("{")
    with pytest.raises(ps.SnapshotError, match="unreadable manifest"):
        S.read_snapshot(newest, 0, 1)


def test_snapshots_of_another_server_and_leftover_temp_dirs_are_not_used(tmp_path):
    good = S.write_snapshot(tmp_path, 0, 2, {"n": 0}, _arrays())
    with pytest.raises(ps.SnapshotError, match="belongs to server 0 of 2, this is server 1 of 2"):
        S.read_snapshot(good, 1, 2)
    (S.server_dir(tmp_path, 0, 2) / ".tmp-snap-00000009-1").mkdir()  # a crash mid-write
    assert S.load_newest(tmp_path, 0, 2)[0] == good
    assert S.load_newest(tmp_path, 1, 2) is None


def _steps(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 30, 16), rng.standard_normal((16, 4)).astype(np.float32),
             rng.standard_normal((2, 3)).astype(np.float32)) for _ in range(n)]


def _setup(c):
    c.create_table("e", 4, optimizer=("adam", {"lr": 0.05}))
    c.create_table("g", 4, optimizer=("adagrad", {"lr": 0.1}), num_rows=25)
    c.create_dense("w", np.ones((2, 3), np.float32), optimizer=("momentum", {"lr": 0.1, "momentum": 0.9}))


def _step(c, ids, grads, dense_grad):
    c.push("e", ids, grads).result(10)
    c.push("g", ids, grads).result(10)
    c.push_dense("w", dense_grad).result(10)


def _state(c):
    return (*c.pull("e", np.arange(30)), *c.pull("g", np.arange(30)), c.pull_dense("w"))


def test_kill_restart_restore_continues_identically(tmp_path):
    steps = _steps(5)
    with ps.start_local_servers(2, in_process=True) as servers, ps.connect(addresses=servers) as c:
        _setup(c)
        for s in steps:
            _step(c, *s)
        expected = _state(c)
    with ps.start_local_servers(2, snapshot_dir=tmp_path, in_process=True) as servers:
        c = ps.connect(addresses=servers, timeout_s=5)
        _setup(c)
        for s in steps[:3]:
            _step(c, *s)
        paths = c.snapshot()
        assert len(paths) == 2 and all("snap-00000000" in p for p in paths)
        for k in range(2):
            servers.kill(k)
            servers.restart(k)
        hello = c.hello()
        assert all(h["restored_from"] == p for h, p in zip(hello, paths))
        _setup(c)  # idempotent: the restored tables have the same configuration
        for s in steps[3:]:
            _step(c, *s)
        got = _state(c)
        c.close()
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_periodic_snapshots_and_restore_skips_a_corrupt_newest(tmp_path):
    with ps.start_local_servers(1, snapshot_dir=tmp_path, snapshot_every_s=0.1, in_process=True) as servers:
        c = ps.connect(addresses=servers, timeout_s=5)
        c.create_table("e", 2, optimizer=("sgd", {"lr": 1.0}), init=("zeros",))
        c.push("e", [1], np.ones((1, 2), np.float32)).result(10)
        first = c.snapshot()[0]
        for _ in range(500):
            if c.stats()["servers"][0]["snapshots"] >= 3:
                break
            time.sleep(0.02)
        assert c.stats()["servers"][0]["snapshots"] >= 3
        servers.kill(0)
        snaps = S.list_snapshots(tmp_path, 0, 1)
        assert len(snaps) == 2 and first not in map(str, snaps)  # kept the newest two
        (snaps[0] / "manifest.json").write_text("garbage")
        servers.restart(0)
        assert c.hello()[0]["restored_from"] == str(snaps[1])
        rows, versions = c.pull("e", [1])
        np.testing.assert_array_equal(rows, [[-1.0, -1.0]])
        assert versions[0] == 1
        c.close()
