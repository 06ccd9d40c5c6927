"""A server survives hostile requests: forged bookkeeping, wrong types, out-of-range workers, a seeded fuzz of
every op code; afterwards it still serves results that match an independent NumPy reference."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from luoshu import ps
from luoshu.ps import auth
from luoshu.ps import protocol as P
from luoshu.ps.server import ParameterServer

WORKERS = 3


def _ask(server, op, args=None, arrays=(), worker=0, request_id=1):
    """Sends one request to `server.handle`; returns the decoded replies."""
    return [P.decode(frames) for _, frames in server.handle(b"id", P.encode(op, request_id, worker, args, arrays))]


def _table(server, name="t", dim=2, **extra):
    args = {"name": name, "dim": dim, "init": ["zeros"], "optimizer": ["sgd", {"lr": 1.0}], **extra}
    (reply,) = _ask(server, P.CREATE_TABLE, args)
    assert reply.status == P.STATUS_OK, reply.args


def test_a_forged_deadline_in_a_barrier_does_not_kill_the_server():
    server = ParameterServer(0, 1, WORKERS)
    # both forged forms the review found: a string deadline, and a number without its companion
    for worker, forged in ((1, {"_deadline": "soon"}), (2, {"_deadline": 0.0})):
        for reply in _ask(server, P.BARRIER, forged, worker=worker):
            assert reply.status == P.STATUS_ERROR and "_deadline" in reply.args["error"]
    server.expire(time.monotonic() + 1.0)  # raised TypeError / KeyError before the fix
    # the barrier itself still works for the real workers
    assert _ask(server, P.BARRIER, {"wait_s": 5.0}, worker=1) == []
    assert _ask(server, P.BARRIER, {"wait_s": 5.0}, worker=2) == []
    replies = _ask(server, P.BARRIER, {"wait_s": 5.0}, worker=0)
    assert len(replies) == 3 and all(r.status == P.STATUS_OK for r in replies)
    # unknown arguments are refused: only what the op takes may be sent
    (reply,) = _ask(server, P.PING, {"_deadline": "soon"})
    assert reply.status == P.STATUS_ERROR and "_deadline" in reply.args["error"]
    (reply,) = _ask(server, P.PING)
    assert reply.status == P.STATUS_OK


@pytest.mark.parametrize("wait_s", ["soon", -1, 0, float("inf"), 1e9, True, None, [1]])
def test_a_bad_wait_is_refused_with_a_message(wait_s):
    server = ParameterServer(0, 1, WORKERS)
    (reply,) = _ask(server, P.BARRIER, {"wait_s": wait_s}, worker=1)
    assert reply.status == P.STATUS_ERROR and "wait_s" in reply.args["error"], reply.args
    assert server.expire(time.monotonic() + 1e6) == []  # nothing was left waiting


def test_a_waiting_request_keeps_the_server_deadline_not_the_clients():
    server = ParameterServer(0, 1, WORKERS)
    assert _ask(server, P.BARRIER, {"wait_s": 0.5}, worker=1) == []
    assert server.expire(time.monotonic()) == []
    ((ident, frames),) = server.expire(time.monotonic() + 1.0)
    reply = P.decode(frames)
    assert reply.status == P.STATUS_ERROR and "[0, 2]" in reply.args["error"]


def test_one_client_cannot_stop_a_server_with_made_up_worker_ids():
    server = ParameterServer(0, 1, WORKERS)
    for worker in (WORKERS, WORKERS + 1, 99, -1, 2**31 - 1):
        (reply,) = _ask(server, P.SHUTDOWN, {}, worker=worker)
        assert reply.status == P.STATUS_ERROR and "worker" in reply.args["error"]
    (reply,) = _ask(server, P.SHUTDOWN, {"force": "yes"}, worker=0)
    assert reply.status == P.STATUS_ERROR and "force" in reply.args["error"]
    assert not server.stopping
    for worker in range(WORKERS):  # the real workers still can
        (reply,) = _ask(server, P.SHUTDOWN, {}, worker=worker)
        assert reply.status == P.STATUS_OK
    assert server.stopping


# --- the fuzz ---------------------------------------------------------------------------------------
_JUNK = [
    None,
    True,
    False,
    -1,
    0,
    1,
    3,
    2**31,
    2**63,
    2**70,
    -(2**70),
    1.5,
    -0.0,
    float("nan"),
    float("inf"),
    "",
    "t",
    "soon",
    "x" * 300,
    [],
    [1, 2],
    ["sgd"],
    ["sgd", {"lr": "fast"}],
    ["adam", {"lr": -1}],
    {"a": 1},
    {"lr": 1.0},
    [["zeros"]],
    ["normal", 0, -1],
    ["constant", "one"],
    [2**40],
    [-3],
    [1] * 9,
]
_KEYS = {
    P.CREATE_TABLE: [
        "name",
        "dim",
        "num_rows",
        "id_policy",
        "init",
        "optimizer",
        "dtype",
        "sync_workers",
        "seed",
        "step_mode",
    ],
    P.TABLE_INFO: ["table"],
    P.PULL: ["table", "wait_s"],
    P.PUSH: ["table", "scale"],
    P.CREATE_DENSE: ["name", "shape", "dtype", "optimizer", "sync_workers"],
    P.PULL_DENSE: ["name", "wait_s"],
    P.PUSH_DENSE: ["name", "scale"],
    P.BARRIER: ["wait_s"],
    P.SHUTDOWN: ["force"],
    P.SNAPSHOT: ["tag"],
    P.RESTORE: ["tag"],
}


def _random_array(rng):
    dtype = rng.choice(["int64", "int32", "float32", "float64", "uint8", "bool", "float16"])
    shape = [int(rng.integers(0, 5)) for _ in range(int(rng.integers(0, 3)))]
    a = (
        (rng.standard_normal(shape) * 10 ** int(rng.integers(0, 20)))
        if dtype.startswith("f")
        else rng.integers(-5, 2**40, size=shape)
    )
    with np.errstate(all="ignore"):
        return np.asarray(a).astype(dtype)


def _fuzz_request(rng, valid_table="t"):
    """One hostile request: a random op code, args mixing right names with junk values, odd worker ids."""
    op = int(rng.choice(sorted(P.OP_NAMES)))
    keys = _KEYS.get(op, [])
    args = {}
    for key in keys:
        if rng.random() < 0.6:
            args[key] = _JUNK[int(rng.integers(len(_JUNK)))]
    if op in (P.PULL, P.PUSH, P.TABLE_INFO) and rng.random() < 0.5:
        args["table"] = valid_table
    if rng.random() < 0.15:
        args[str(rng.choice(["_deadline", "_wait_s", "extra", "arrays2"]))] = _JUNK[int(rng.integers(len(_JUNK)))]
    arrays = [_random_array(rng) for _ in range(int(rng.integers(0, 4)))]
    if op in (P.PULL, P.PUSH) and rng.random() < 0.5:  # plausible ids, so the check reaches the later args
        n = int(rng.integers(0, 4))
        arrays = [rng.integers(0, 8, n).astype(np.int64)] + (
            [rng.standard_normal((n, int(rng.integers(1, 4)))).astype(np.float32)] if op == P.PUSH else []
        )
    if op == P.SHUTDOWN:  # in-range workers other than 0 would be real votes to stop; force must stay off
        args.pop("force", None) if args.get("force") is True else None
        worker = int(rng.choice([0, -1, WORKERS, WORKERS + 5, 2**31 - 1, -(2**31)]))
    else:
        worker = int(rng.choice([0, 1, 2, -1, WORKERS, 1000, 2**31 - 1, -(2**31)]))
    return op, args, arrays, worker


def _check_still_correct(server_or_client, ask):
    """A fresh SGD table and a dense tensor, pushed and pulled: must match NumPy."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 6, 10).astype(np.int64)
    grads = rng.standard_normal((10, 3)).astype(np.float32)
    expected = np.zeros((6, 3), np.float64)
    np.add.at(expected, ids, -0.5 * grads.astype(np.float64))
    ask(P.CREATE_TABLE, {"name": "check", "dim": 3, "init": ["zeros"], "optimizer": ["sgd", {"lr": 0.5}]})
    ask(P.PUSH, {"table": "check", "scale": 1.0}, (ids, grads))
    reply = ask(P.PULL, {"table": "check", "wait_s": 5.0}, (np.arange(6, dtype=np.int64),))
    np.testing.assert_allclose(reply.arrays[0], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(reply.arrays[1], np.bincount(ids, minlength=6) > 0)


def test_a_seeded_fuzz_of_every_op_leaves_the_server_serving_correct_results():
    rng = np.random.default_rng(1234)
    server = ParameterServer(0, 1, WORKERS)
    _table(server)
    answered = {op: 0 for op in P.OP_NAMES}
    clock = time.monotonic()
    for i in range(2500):
        op, args, arrays, worker = _fuzz_request(rng)
        try:
            frames = P.encode(op, i + 1, worker, args, arrays)
        except (TypeError, ValueError):  # json cannot even write it: not a request anyone can send
            continue
        replies = server.handle(b"fuzz", frames)
        answered[op] += bool(replies)
        if i % 50 == 0:
            clock += 100.0  # far past any wait a request could ask for: everything waiting must expire
            for _, frames in server.expire(clock):
                assert P.decode(frames).status == P.STATUS_ERROR
        assert not server.stopping, (op, args, worker)
    for _, frames in server.expire(clock + 1e6):
        assert P.decode(frames).status == P.STATUS_ERROR
    assert not server.deferred and not server.barrier_waiting
    assert all(answered.values()), answered  # every op code was tried and answered

    def ask(op, args, arrays=()):
        (reply,) = _ask(server, op, args, arrays)
        assert reply.status == P.STATUS_OK, reply.args
        return reply

    _check_still_correct(server, ask)


def test_raw_frames_over_a_socket_do_not_stop_a_server():
    zmq = pytest.importorskip("zmq")
    rng = np.random.default_rng(99)
    with ps.start_local_servers(1, num_workers=WORKERS, in_process=True) as servers:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        auth.secure_client(sock, servers.secret)  # a member of the job gone rogue: it holds the keys
        sock.connect(servers.addresses[0])
        try:
            for i in range(300):
                op, args, arrays, worker = _fuzz_request(rng)
                frames = P.encode(op, i + 1, worker, args, arrays)
                if rng.random() < 0.2:  # and some that break the frame layout itself
                    frames[1] = json.dumps({"arrays": "x"}).encode() if rng.random() < 0.5 else b"\xff{"
                sock.send_multipart(frames)
            deadline = time.monotonic() + 10
            while sock.poll(200) and time.monotonic() < deadline:
                sock.recv_multipart()
            assert servers.alive(0)

            def ask(op, args, arrays=()):
                sock.send_multipart(P.encode(op, 10**6, 0, args, arrays))
                while True:
                    assert sock.poll(10_000), "the server stopped answering"
                    reply = P.decode(sock.recv_multipart())
                    if reply.request_id == 10**6:
                        break
                assert reply.status == P.STATUS_OK, reply.args
                return reply

            _check_still_correct(None, ask)
        finally:
            sock.close()
            ctx.term()


# --- authentication -----------------------------------------------------------------------------------
def test_keys_are_derived_from_the_job_secret():
    zmq = pytest.importorskip("zmq")
    a, b = auth.keypair("s1", "server"), auth.keypair("s1", "server")
    assert a == b and a != auth.keypair("s2", "server") and a != auth.keypair("s1", "client")
    assert zmq.curve_public(a[1]) == a[0] and len(a[0]) == 40


def _raw_socket(ctx, address, secret=None):
    import zmq

    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    auth.secure_client(sock, secret)
    sock.connect(address)
    return sock


def test_peers_without_the_secret_are_refused_and_counted():
    zmq = pytest.importorskip("zmq")
    with ps.start_local_servers(1, num_workers=1, in_process=True) as servers:
        ctx = zmq.Context()
        try:
            plain = _raw_socket(ctx, servers.addresses[0])  # no CURVE at all
            forged = _raw_socket(ctx, servers.addresses[0], secret="guessed")  # CURVE, the wrong keys
            for sock in (plain, forged):
                sock.send_multipart(P.encode(P.SHUTDOWN, 1, 0, {"force": True}))
                sock.send_multipart(P.encode(P.PING, 2, 0))
            assert not plain.poll(1500) and not forged.poll(100)  # no answer: nothing reached the loop
            plain.close()
            forged.close()
        finally:
            ctx.term()
        assert servers.alive(0)
        with pytest.raises(ps.ServerUnavailableError):
            ps.connect(addresses=servers.addresses, secret="guessed", timeout_s=1.5)
        with ps.connect(addresses=servers, timeout_s=10) as client:  # the job's own keys
            stats = client.stats()["servers"][0]
            assert stats["refused_connections"] >= 3, stats
            assert stats["requests"] == 2, stats  # hello and stats of this client only
            assert not servers.processes[0].server.stopping


def test_subprocess_servers_get_the_secret_in_their_environment(tmp_path):
    pytest.importorskip("zmq")
    with ps.start_local_servers(1) as servers:
        assert servers.secret and servers.secret not in " ".join(servers.processes[0].args)
        with ps.connect(addresses=servers, timeout_s=30) as client:
            assert client.hello()[0]["server_index"] == 0
        with pytest.raises(ps.ServerUnavailableError):
            ps.connect(addresses=servers.addresses, secret="", timeout_s=1.5)
