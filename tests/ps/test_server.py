"""Servers and client over real ZeroMQ sockets: optimizers vs NumPy / torch / luoshu.optim, sync mode,
sharding, id policies, dense tensors, barrier, malformed messages, dead servers, the store handshake.

Servers run as threads of the test process (`in_process=True`: instant start); the
subprocess variants are in test_server_processes.py (marked dist).
"""

import threading

import numpy as np
import pytest
import torch
import zmq

import luoshu as ls
from luoshu import ps
from luoshu.ps import auth
from luoshu.ps import protocol as P


@pytest.fixture
def servers():
    with ps.start_local_servers(2, in_process=True) as s:
        yield s


def _client(servers, rank=0, timeout_s=10.0):
    return ps.connect(addresses=servers, worker_rank=rank, timeout_s=timeout_s)


def _batches(steps=4, n=12, dim=3, high=20, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, high, n), rng.standard_normal((n, dim)).astype(np.float32)) for _ in range(steps)]


class NumpyLazyOptimizer:
    """An independent reference: per-row lazy SGD / momentum / AdaGrad / Adam over a dict of rows."""

    def __init__(self, kind, rows, hyper, row_steps=False):
        self.kind, self.h, self.row_steps = kind, hyper, row_steps
        self.rows = {k: v.astype(np.float64) for k, v in rows.items()}
        self.m, self.v, self.count = {}, {}, {}
        self.step = 0

    def push(self, ids, grads, scale=1.0):
        summed = {}
        for i, g in zip(ids.tolist(), grads.astype(np.float64) * scale):
            summed[i] = summed.get(i, 0.0) + g
        self.step += 1
        h = self.h
        for i, g in summed.items():
            p = self.rows[i]
            self.count[i] = self.count.get(i, 0) + 1
            t = self.count[i] if self.row_steps else self.step
            g = g + h.get("weight_decay", 0.0) * p
            if self.kind == "sgd":
                p -= h["lr"] * g
            elif self.kind == "momentum":
                buf = g if self.step == 1 else h["momentum"] * self.m.get(i, 0.0) + g
                self.m[i] = buf
                p -= h["lr"] * buf
            elif self.kind == "adagrad":
                self.v[i] = self.v.get(i, 0.0) + g * g
                clr = h["lr"] / (1 + (t - 1) * h.get("lr_decay", 0.0))
                p -= clr * g / (np.sqrt(self.v[i]) + h.get("eps", 1e-10))
            else:
                b1, b2 = h.get("betas", (0.9, 0.999))
                self.m[i] = b1 * self.m.get(i, 0.0) + (1 - b1) * g
                self.v[i] = b2 * self.v.get(i, 0.0) + (1 - b2) * g * g
                denom = np.sqrt(self.v[i]) / np.sqrt(1 - b2 ** t) + h.get("eps", 1e-8)
                p -= h["lr"] / (1 - b1 ** t) * self.m[i] / denom


@pytest.mark.parametrize("kind, hyper, row_steps", [
    ("sgd", {"lr": 0.5, "weight_decay": 0.1}, False),
    ("momentum", {"lr": 0.1, "momentum": 0.9}, False),
    ("adagrad", {"lr": 0.3, "lr_decay": 0.01}, False),
    ("adam", {"lr": 0.05, "betas": (0.8, 0.9)}, False),
    ("adam", {"lr": 0.05, "betas": (0.8, 0.9)}, True),
    ("adagrad", {"lr": 0.3, "lr_decay": 0.01}, True),
])
def test_pull_push_matches_a_numpy_reference(servers, kind, hyper, row_steps):
    batches = _batches()
    with _client(servers) as c:
        c.create_table("emb", 3, optimizer=(kind, hyper), step_mode="row" if row_steps else "table")
        all_ids = np.arange(20)
        rows0, versions0 = c.pull("emb", all_ids)
        np.testing.assert_array_equal(rows0, ps.initial_rows("emb", all_ids, 3))
        np.testing.assert_array_equal(versions0, 0)
        ref = NumpyLazyOptimizer(kind, dict(enumerate(rows0)), hyper, row_steps)
        for ids, grads in batches:
            c.push("emb", ids, grads, scale=0.5).result(10)
            ref.push(ids, grads, scale=0.5)
        rows, versions = c.pull("emb", all_ids)
    np.testing.assert_allclose(rows, np.stack([ref.rows[i] for i in all_ids]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(versions, [ref.count.get(i, 0) for i in all_ids])


def test_adam_matches_torch_sparse_adam_and_luoshu_optim(servers):
    batches = _batches(steps=5, high=15)
    with _client(servers) as c:
        c.create_table("e", 3, optimizer=("adam", {"lr": 0.1, "eps": 1e-12}), init=("uniform", -1.0, 1.0), seed=7)
        init = ps.initial_rows("e", np.arange(15), 3, ("uniform", -1.0, 1.0), seed=7)
        for ids, grads in batches:
            c.push("e", ids, grads)
        rows, _ = c.pull("e", np.arange(15))
    # torch.optim.SparseAdam (per-table step, lazy moments).
    weight = torch.nn.Parameter(torch.from_numpy(init.copy()))
    opt = torch.optim.SparseAdam([weight], lr=0.1, eps=1e-12)
    # luoshu.optim.Adam on an IndexedSlices gradient (the single-process reference a PS run is compared with).
    table = ls.tensor(init.copy(), requires_grad=True)
    ls_opt = ls.optim.Adam([table], lr=0.1, eps=1e-12)
    for ids, grads in batches:
        opt.zero_grad()
        weight.grad = torch.sparse_coo_tensor(torch.from_numpy(ids)[None], torch.from_numpy(grads), (15, 3),
                                              check_invariants=True)
        opt.step()
        ls_opt.apply_gradients([(0, (torch.from_numpy(ids), torch.from_numpy(grads)))])
    np.testing.assert_allclose(rows, weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows, table.numpy(), rtol=1e-6, atol=1e-7)


def test_pull_async_and_many_concurrent_futures(servers):
    with _client(servers) as c:
        c.create_table("e", 4, optimizer=("sgd", {"lr": 1.0}), init=("zeros",))
        futures = [c.push("e", np.array([i % 7]), np.ones((1, 4), np.float32)) for i in range(70)]
        for f in futures:
            f.result(10)
        pulls = [c.pull_async("e", np.arange(7)) for _ in range(5)]
        for f in pulls:
            rows, versions = f.result(10)
            np.testing.assert_array_equal(rows, -10.0)
            np.testing.assert_array_equal(versions, 10)
        rows, versions = c.pull("e", np.array([], dtype=np.int64))
        assert rows.shape == (0, 4) and versions.shape == (0,)


def test_the_caller_may_reuse_its_buffers_as_soon_as_push_returns():
    with ps.start_local_servers(1, in_process=True) as servers, _client(servers) as c:
        c.create_table("e", 64, optimizer=("sgd", {"lr": 1.0}), init=("zeros",))
        ids, grads = np.arange(2000), np.ones((2000, 64), np.float32)  # above pyzmq's copy threshold
        future = c.push("e", ids, grads)
        grads[:] = 100.0
        ids[:] = 0
        future.result(10)
        rows, versions = c.pull("e", np.arange(2000))
    np.testing.assert_array_equal(rows, -1.0)
    np.testing.assert_array_equal(versions, 1)


def test_sync_mode_two_workers_equal_one_worker_with_the_summed_gradient():
    steps = [(_batches(1, seed=2 * s)[0], _batches(1, seed=2 * s + 1)[0]) for s in range(3)]
    ids_all = np.arange(20)
    with ps.start_local_servers(2, num_workers=2, in_process=True) as servers:
        c0, c1 = _client(servers, 0), _client(servers, 1)
        for c in (c0, c1):
            c.create_table("sync", 3, optimizer=("adam", {"lr": 0.1}), sync_workers=2)
        # Worker 0's pull after its push waits for worker 1's push of the same step.
        c0.push("sync", *steps[0][0], scale=0.5).result(10)
        waiting = c0.pull_async("sync", ids_all)
        threading.Event().wait(0.3)
        assert not waiting.done()
        c1.push("sync", *steps[0][1], scale=0.5).result(10)
        results = {0: [waiting.result(10)], 1: [c1.pull("sync", ids_all)]}

        def worker(c, rank):
            for step in steps[1:]:
                c.push("sync", *step[rank], scale=0.5).result(10)
                results[rank].append(c.pull("sync", ids_all))

        threads = [threading.Thread(target=worker, args=(c, r)) for r, c in ((0, c0), (1, c1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        c0.close()
        c1.close()
    ref = NumpyLazyOptimizer("adam", dict(enumerate(ps.initial_rows("sync", ids_all, 3))), {"lr": 0.1})
    for k, (a, b) in enumerate(steps):
        ref.push(np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]]), scale=0.5)
        expect = np.stack([ref.rows[i] for i in ids_all])
        for rank in (0, 1):
            rows, versions = results[rank][k]
            np.testing.assert_allclose(rows, expect, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(versions, [ref.count.get(i, 0) for i in ids_all])


def _train(addresses, batches, name="e", **table):
    with _client(addresses) as c:
        c.create_table(name, 3, **table)
        for ids, grads in batches:
            c.push(name, ids, grads)
        return c.pull(name, np.arange(-5, 40))


def test_sharding_over_three_servers_equals_one():
    batches = _batches(steps=4, n=30, high=40)
    table = dict(optimizer=("adam", {"lr": 0.1}), init=("normal", 0.0, 1.0))
    with ps.start_local_servers(1, in_process=True) as one, ps.start_local_servers(3, in_process=True) as three:
        rows1, versions1 = _train(one, batches, **table)
        rows3, versions3 = _train(three, batches, **table)
        stats = ps.connect(addresses=three).stats()
    np.testing.assert_array_equal(rows1, rows3)
    np.testing.assert_array_equal(versions1, versions3)
    per_server = [s["tables"]["e"]["rows"] for s in stats["servers"]]
    assert sum(per_server) == 45 and min(per_server) > 0
    assert {s["tables"]["e"]["step"] for s in stats["servers"]} == {4}  # every shard counts every push


def test_id_policies(servers):
    with _client(servers) as c:
        c.create_table("h", 2, num_rows=10, id_policy="hash", optimizer=("sgd", {"lr": 1.0}))
        c.create_table("r", 2, num_rows=10, id_policy="refuse", optimizer=("sgd", {"lr": 1.0}))
        big = np.array([10, -4, 1 << 50])
        mapped = ps.map_ids(big, 10, "hash", "h")
        np.testing.assert_array_equal(c.pull("h", big)[0], c.pull("h", mapped)[0])
        c.push("h", big[:1], np.ones((1, 2), np.float32)).result(10)
        assert c.pull("h", mapped[:1])[1][0] == 1
        before = c.stats()
        with pytest.raises(ps.IdOutOfRangeError, match=r"'r'.*num_rows=10.*id_policy='refuse'"):
            c.pull("r", np.array([1, 10]))
        with pytest.raises(ps.IdOutOfRangeError):
            c.push("r", np.array([-1]), np.ones((1, 2), np.float32))
        after = c.stats()
        assert [s["tables"]["r"] for s in before["servers"]] == [s["tables"]["r"] for s in after["servers"]]
        with pytest.raises(ps.TableError, match="ids must be integers"):
            c.pull("h", np.array([0.5]))
        with pytest.raises(ps.TableError, match=r"grads must be floating with shape \(1, 2\)"):
            c.push("h", np.array([1]), np.ones((1, 3), np.float32))


def test_create_table_is_idempotent_and_other_workers_see_it(servers):
    with _client(servers, 0) as c0, _client(servers, 1) as c1:
        cfg = c0.create_table("t", 4, optimizer=("adagrad", {"lr": 0.1}), num_rows=100)
        assert c1.create_table("t", 4, optimizer=("adagrad", {"lr": 0.1}), num_rows=100) == cfg
        with pytest.raises(ps.TableError, match="another configuration.*dim"):
            c1.create_table("t", 8, optimizer=("adagrad", {"lr": 0.1}), num_rows=100)
        with _client(servers, 2) as c2:  # never created it: learns the configuration from the servers
            np.testing.assert_array_equal(c2.pull("t", [1, 2])[0], c0.pull("t", [1, 2])[0])
        with pytest.raises(ps.TableError, match="no table 'missing'"):
            c0.pull("missing", [1])


def test_dense_tensors_async_and_sync():
    rng = np.random.default_rng(0)
    value = rng.standard_normal((3, 4)).astype(np.float32)
    grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(6)]
    with ps.start_local_servers(2, num_workers=2, in_process=True) as servers:
        c0, c1 = _client(servers, 0), _client(servers, 1)
        c0.create_dense("w", value, optimizer=("adam", {"lr": 0.1}))
        c0.create_dense("ws", value, optimizer=("adam", {"lr": 0.1}), sync_workers=2)
        c1.create_dense("ws", value, optimizer=("adam", {"lr": 0.1}), sync_workers=2)
        for g in grads[:3]:
            c0.push_dense("w", g).result(10)
        for a, b in zip(grads[:3], grads[3:]):
            c0.push_dense("ws", a, scale=0.5).result(10)
            c1.push_dense("ws", b, scale=0.5).result(10)
        w, version = c0.pull_dense("w", with_version=True)
        ws = c1.pull_dense("ws")
        c0.close()
        c1.close()
    ref = torch.nn.Parameter(torch.from_numpy(value.copy()))
    ref_sync = torch.nn.Parameter(torch.from_numpy(value.copy()))
    opt, opt_sync = torch.optim.Adam([ref], lr=0.1), torch.optim.Adam([ref_sync], lr=0.1)
    for g, (a, b) in zip(grads[:3], zip(grads[:3], grads[3:])):
        ref.grad, ref_sync.grad = torch.from_numpy(g), torch.from_numpy(0.5 * (a + b))
        opt.step()
        opt_sync.step()
    np.testing.assert_allclose(w, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ws, ref_sync.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert version == 3


def test_a_missing_worker_is_named_within_the_timeout():
    with ps.start_local_servers(2, num_workers=2, in_process=True) as servers:
        c0 = _client(servers, 0, timeout_s=1.0)
        c0.create_table("s", 2, optimizer=("sgd", {"lr": 1.0}), sync_workers=2)
        c0.push("s", [1, 2, 3], np.ones((3, 2), np.float32)).result(10)
        with pytest.raises(ps.WorkerTimeoutError, match=r"step 1 still lacks the pushes of workers \[1\]"):
            c0.pull("s", [1, 2, 3])
        with pytest.raises(ps.WorkerTimeoutError, match=r"workers \[1\] did not arrive"):
            c0.barrier()
        c0.close()


def test_servers_stop_once_every_worker_has_shut_them_down():
    with ps.start_local_servers(2, num_workers=2, in_process=True) as servers:
        c0, c1 = _client(servers, 0), _client(servers, 1)
        c0.shutdown_servers()
        assert servers.alive(0) and servers.alive(1)  # still serving worker 1
        c1.create_dense("d", np.zeros(2, np.float32))
        c1.shutdown_servers()
        assert servers.wait(10) == [0, 0]
        c0.close()
        c1.close()


def test_barrier_waits_for_every_worker():
    with ps.start_local_servers(1, num_workers=2, in_process=True) as servers:
        c0, c1 = _client(servers, 0), _client(servers, 1)
        done = threading.Event()
        t = threading.Thread(target=lambda: (c0.barrier(), done.set()))
        t.start()
        assert not done.wait(0.3)
        c1.barrier()
        t.join(10)
        assert done.is_set()
        c0.close()
        c1.close()


def test_malformed_messages_are_answered_and_the_server_keeps_serving(servers):
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.RCVTIMEO, 10_000)
    auth.secure_client(raw, servers.secret)  # a member of the job sending garbage (outsiders are refused)
    raw.connect(servers.addresses[0])
    with _client(servers) as c:
        c.create_table("e", 2, optimizer=("sgd", {"lr": 1.0}))
        before = c.pull("e", np.arange(10))
        good = P.encode(P.PUSH, 9, 0, {"table": "e"}, (np.arange(2, dtype=np.int64), np.ones((2, 2), np.float32)))
        garbage = [
            [b"hello"],
            [good[0][:7], good[1]],
            [good[0], good[1], np.arange(2, dtype=np.int64).tobytes()],  # grads frame missing
            [good[0], good[1], np.arange(2, dtype=np.int64).tobytes(), b"\0" * 5],  # truncated grads
            [good[0], b"\xff\xfe", b"", b""],
        ]
        for frames in garbage:
            raw.send_multipart(frames)
            reply = P.decode(raw.recv_multipart())
            assert reply.status == P.STATUS_ERROR and reply.args["kind"] == "ProtocolError", reply.args
        after = c.pull("e", np.arange(10))
        np.testing.assert_array_equal(before[0], after[0])
        stats = c.stats()["servers"][0]
        assert stats["errors"] == len(garbage)
    raw.close()


def test_dead_server_gives_a_clear_error_within_the_timeout():
    with ps.start_local_servers(2, in_process=True) as servers:
        c = _client(servers, timeout_s=1.0)
        c.create_table("e", 2, optimizer=("sgd", {"lr": 1.0}))
        ids = np.arange(40)
        c.pull("e", ids)
        servers.kill(1)
        with pytest.raises(ps.ServerUnavailableError, match=r"parameter server 1 at tcp://.*within 1 s"):
            c.pull("e", ids)
        with pytest.raises(ps.ServerUnavailableError, match="parameter server 1"):
            c.push("e", ids, np.ones((40, 2), np.float32)).result(30)
        c.close()
    with pytest.raises(ps.ServerUnavailableError, match="parameter server 0"):
        ps.connect(addresses=["tcp://127.0.0.1:1"], timeout_s=0.5)


def test_serve_publishes_its_address_in_a_store():
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    # The server gets its own store client, as it would in its own process (a client is not thread-safe).
    server_store = TCPStore("127.0.0.1", store.port, is_master=False)
    thread = threading.Thread(target=ps.serve, args=(server_store, 0, 1, 1), kwargs={"host": "127.0.0.1"},
                              daemon=True)
    thread.start()
    with ps.connect(store=store, worker_rank=0, timeout_s=10) as c:
        c.create_table("e", 2, optimizer=("sgd", {"lr": 1.0}), init=("zeros",))
        c.push("e", [3], np.ones((1, 2), np.float32)).result(10)
        np.testing.assert_array_equal(c.pull("e", [3])[0], [[-1.0, -1.0]])
        c.shutdown_servers()
    thread.join(10)
    assert not thread.is_alive()
