"""The wire protocol, id hashing, seeded initial rows, the id index, and request validation (no sockets)."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import luoshu as ls
from luoshu.ps import protocol as P
from luoshu.ps.server import IdIndex, ParameterServer


def _bytes(frames):
    return [f if isinstance(f, bytes) else np.ascontiguousarray(f).tobytes() for f in frames]


def test_encode_decode_round_trip():
    ids = np.array([3, -7, 1 << 40], dtype=np.int64)
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    msg = P.decode(_bytes(P.encode(P.PUSH, 77, 2, {"table": "t", "scale": 0.5}, (ids, rows))))
    assert (msg.op, msg.request_id, msg.worker, msg.status) == (P.PUSH, 77, 2, P.STATUS_OK)
    assert msg.args == {"table": "t", "scale": 0.5}
    np.testing.assert_array_equal(msg.arrays[0], ids)
    np.testing.assert_array_equal(msg.arrays[1], rows)
    assert msg.arrays[1].dtype == np.float32


def _good():
    return _bytes(P.encode(P.PULL, 5, 0, {"table": "t"}, (np.arange(4, dtype=np.int64),)))


@pytest.mark.parametrize("mutate, words", [
    (lambda f: f[:1], "at least 2 frames"),
    (lambda f: [f[0][:10]] + f[1:], "header frame must be 24 bytes"),
    (lambda f: [b"XXXX" + f[0][4:]] + f[1:], "bad magic"),
    (lambda f: [f[0][:4] + bytes([9]) + f[0][5:]] + f[1:], "version 9"),
    (lambda f: [f[0][:5] + bytes([200]) + f[0][6:]] + f[1:], "unknown op code 200"),
    (lambda f: f[:2], "announces 1 array frames, the message has 0"),
    (lambda f: f[:2] + [f[2][:17]], "truncated"),
    (lambda f: [f[0], b"{not json", f[2]], "not UTF-8 JSON"),
    (lambda f: [f[0], b"[1, 2]", f[2]], "JSON object"),
    (lambda f: [f[0], b'{"arrays": [["object", [4]]]}', f[2]], "bad description"),
    (lambda f: [f[0], b'{"arrays": [["int64", [-4]]]}', f[2]], "bad description"),
    (lambda f: [f[0], b'{"arrays": []}', f[2]], "describe 0 arrays"),
])
def test_decode_refuses_malformed_messages(mutate, words):
    with pytest.raises(P.ProtocolError, match=words):
        P.decode(mutate(_good()))
    assert issubclass(P.ProtocolError, ls.Error)


def test_shard_of_is_stable_and_balanced():
    ids = np.arange(-50_000, 50_000, dtype=np.int64)
    shard = P.shard_of(ids, 3)
    np.testing.assert_array_equal(shard, P.shard_of(ids[::-1].copy(), 3)[::-1])
    counts = np.bincount(shard, minlength=3)
    assert counts.min() > 0.3 * ids.size and counts.max() < 0.37 * ids.size
    # SplitMix64 of 0 is a published constant (Steele et al.'s reference output for seed 0).
    assert P.splitmix64(np.array([0], dtype=np.uint64))[0] == np.uint64(0xE220A8397B1DCDAF)


def test_map_ids_hashes_or_refuses():
    ids = np.array([0, 9, 10, -1, 123456789], dtype=np.int64)
    mapped = P.map_ids(ids, 10, "hash", "t")
    np.testing.assert_array_equal(mapped[:2], [0, 9])
    assert ((mapped >= 0) & (mapped < 10)).all()
    np.testing.assert_array_equal(mapped, P.map_ids(ids, 10, "hash", "t"))
    with pytest.raises(P.IdOutOfRangeError, match=r"num_rows=10.*3 ids outside \[0, 10\)"):
        P.map_ids(ids, 10, "refuse", "t")
    assert P.map_ids(ids, None, "refuse", "t") is ids


def test_initial_rows_are_a_function_of_the_id():
    ids = np.array([5, 1, 99, 5, -3], dtype=np.int64)
    rows = P.initial_rows("emb", ids, 6, ("normal", 0.0, 0.01), seed=1)
    np.testing.assert_array_equal(rows[0], rows[3])
    np.testing.assert_array_equal(rows[[2, 4]], P.initial_rows("emb", ids[[2, 4]], 6, ("normal", 0.0, 0.01), seed=1))
    assert not np.array_equal(rows, P.initial_rows("emb", ids, 6, ("normal", 0.0, 0.01), seed=2))
    assert not np.array_equal(rows, P.initial_rows("other", ids, 6, ("normal", 0.0, 0.01), seed=1))
    assert rows.dtype == np.float32 and rows.shape == (5, 6)


@pytest.mark.parametrize("init, mean, std, low, high", [
    (("normal", 1.0, 2.0), 1.0, 2.0, None, None),
    (("uniform", -1.0, 3.0), 1.0, 4.0 / np.sqrt(12), -1.0, 3.0),
    (("truncated_normal", 0.0, 1.0), 0.0, 0.8796, -2.0, 2.0),
])
def test_initial_row_distributions(init, mean, std, low, high):
    x = P.initial_rows("t", np.arange(20_000), 8, init, dtype="float64").ravel()
    assert abs(x.mean() - mean) < 0.03 * max(std, 1)
    assert abs(x.std() - std) < 0.03 * std
    if low is not None:
        assert x.min() >= low and x.max() <= high
    np.testing.assert_array_equal(P.initial_rows("t", np.arange(3), 2, ("constant", 0.5)), np.full((3, 2), 0.5))
    with pytest.raises(P.TableError, match="init must be one of"):
        P.initial_rows("t", np.arange(3), 2, ("xavier",))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=60), min_size=1, max_size=8))
def test_id_index_matches_a_dict(batches):
    index, ref = IdIndex(capacity=16), {}
    for batch in batches:
        ids = np.array(batch, dtype=np.int64)
        slots = index.lookup(ids)
        np.testing.assert_array_equal(slots, [ref.get(i, -1) for i in batch])
        new = np.unique(ids[slots < 0])
        for i, s in zip(new.tolist(), index.insert(new).tolist()):
            ref[i] = s
        np.testing.assert_array_equal(index.lookup(ids), [ref[i] for i in batch])
    ids, slots = index.items()
    assert dict(zip(ids.tolist(), slots.tolist())) == ref


# --- request validation on a server object (no sockets) ----------------------------------------------
def _request(server, op, args=None, arrays=(), worker=0, request_id=1):
    [(identity, reply)] = server.handle(b"w", _bytes(P.encode(op, request_id, worker, args, arrays)))
    return P.decode(_bytes(reply))


@pytest.fixture
def server():
    s = ParameterServer(0, 1, 1)
    msg = _request(s, P.CREATE_TABLE, {"name": "t", "dim": 3, "optimizer": ["sgd", {"lr": 1.0}]})
    assert msg.status == P.STATUS_OK
    return s


def test_bad_requests_get_error_replies_and_change_nothing(server):
    ids = np.array([1, 2], dtype=np.int64)
    before = _request(server, P.PULL, {"table": "t"}, (ids,)).arrays[0].copy()
    bad = [
        (P.PULL, {"table": "nope"}, (ids,), "TableError", "no table 'nope'"),
        (P.PULL, {"table": "t"}, (ids.astype(np.int32),), "ProtocolError", "1-D int64"),
        (P.PUSH, {"table": "t"}, (ids, np.ones((2, 4), np.float32)), "ProtocolError", r"shape \(2, 3\)"),
        (P.PUSH, {"table": "t"}, (ids,), "ProtocolError", "takes 2 arrays"),
        (P.PUSH, {"table": "t", "scale": "x"}, (ids, np.ones((2, 3), np.float32)), "ProtocolError", "scale"),
        (P.CREATE_TABLE, {"name": "t", "dim": 4, "optimizer": ["sgd", {"lr": 1.0}]}, (), "TableError", "differences"),
        (P.CREATE_TABLE, {"name": "u", "dim": 4, "optimizer": ["nadam", {}]}, (), "TableError", "unknown optimizer"),
        (P.CREATE_TABLE, {"name": "u", "dim": 4, "optimizer": ["adam", {"lr": -1}]}, (), "TableError", "lr"),
        (P.CREATE_TABLE, {"name": "u", "dim": 0, "optimizer": ["adam", {}]}, (), "TableError", "dim"),
        (P.SNAPSHOT, {}, (), "SnapshotError", "no snapshot_dir"),
        (P.PUSH, {"table": "t"}, (ids, np.array([[1, np.nan, 0], [np.inf, 0, 0]], np.float32)), "ProtocolError",
         "2 gradient values are NaN or infinite"),
    ]
    for op, args, arrays, kind, words in bad:
        msg = _request(server, op, args, arrays, request_id=42)
        assert msg.status == P.STATUS_ERROR and msg.request_id == 42
        assert msg.args["kind"] == kind, msg.args
        assert re.search(words, msg.args["error"]), msg.args["error"]
    # Garbage that cannot even be parsed still gets an answer, with request id 0.
    [(_, reply)] = server.handle(b"w", [b"garbage"])
    assert P.decode(_bytes(reply)).args["kind"] == "ProtocolError"
    after = _request(server, P.PULL, {"table": "t"}, (ids,))
    np.testing.assert_array_equal(after.arrays[0], before)
    assert "u" not in server.tables and server.counters["errors"] == len(bad) + 1


def test_refuse_policy_is_enforced_by_the_server():
    s = ParameterServer(0, 1, 1)
    _request(s, P.CREATE_TABLE, {"name": "r", "dim": 2, "num_rows": 10, "id_policy": "refuse",
                                 "optimizer": ["sgd", {"lr": 1.0}]})
    msg = _request(s, P.PULL, {"table": "r"}, (np.array([3, 10], dtype=np.int64),))
    assert msg.args["kind"] == "IdOutOfRangeError" and "[0, 10)" in msg.args["error"]
    assert s.tables["r"].size == 0


@settings(max_examples=60, deadline=None)
@given(frame=st.integers(0, 3), cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 400),
                                                                                   st.integers(1, 255)), max_size=4))
def test_fuzzed_messages_never_break_the_server(frame, cut, flips):
    s = ParameterServer(0, 1, 1)
    _request(s, P.CREATE_TABLE, {"name": "t", "dim": 3, "optimizer": ["adam", {}]})
    frames = _bytes(P.encode(P.PUSH, 3, 0, {"table": "t"}, (np.arange(4, dtype=np.int64),
                                                              np.ones((4, 3), np.float32))))
    data = bytearray(frames[frame])
    for pos, xor in flips:
        if data:
            data[pos % len(data)] ^= xor
    frames[frame] = bytes(data[:cut] if cut < len(data) else data)
    [(_, reply)] = s.handle(b"w", frames)
    P.decode(_bytes(reply))  # always a well-formed answer
    ok = _request(s, P.PULL, {"table": "t"}, (np.arange(4, dtype=np.int64),))
    assert ok.status == P.STATUS_OK and np.isfinite(ok.arrays[0]).all()
