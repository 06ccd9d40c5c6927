"""Servers as real subprocesses: SIGKILL + restart + restore continues training identically, a dead
server gives a clear error within the timeout, and shutdown ends the processes."""

import numpy as np
import pytest

from luoshu import ps

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]


def _steps(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(-1000, 1000, 32), rng.standard_normal((32, 4)).astype(np.float32)) for _ in range(n)]


def _run(c, steps):
    for ids, grads in steps:
        c.push("e", ids, grads).result(30)


def test_killed_server_restarts_from_its_snapshot_and_training_continues(tmp_path):
    steps = _steps(6)
    ids = np.arange(-1000, 1000)
    with ps.start_local_servers(1, in_process=True) as ref_servers, ps.connect(addresses=ref_servers) as ref:
        ref.create_table("e", 4, optimizer=("adam", {"lr": 0.05}))
        _run(ref, steps)
        expected = ref.pull("e", ids)
    with ps.start_local_servers(2, snapshot_dir=tmp_path) as servers:
        c = ps.connect(addresses=servers, timeout_s=30)
        c.create_table("e", 4, optimizer=("adam", {"lr": 0.05}))
        _run(c, steps[:4])
        c.snapshot()
        pid = servers.processes[1].pid
        servers.kill(1)
        assert servers.processes[1].returncode == -9
        with ps.Client(servers.addresses[:1], timeout_s=30, secret=servers.secret) as alone:  # server 0 serves on
            assert alone.stats()["servers"][0]["tables"]["e"]["step"] == 4
        with pytest.raises(ps.ServerUnavailableError, match=r"parameter server 1 at tcp://127\.0\.0\.1:\d+"):
            ps.Client(servers.addresses, timeout_s=1.0, secret=servers.secret).pull("e", ids)
        servers.restart(1)
        assert servers.processes[1].pid != pid and c.hello()[1]["restored_from"]
        _run(c, steps[4:])
        got = c.pull("e", ids)
        c.shutdown_servers()
        assert servers.wait(30) == [0, 0]
        c.close()
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.slow
def test_dead_server_process_fails_requests_within_the_timeout():
    with ps.start_local_servers(2) as servers:
        c = ps.connect(addresses=servers, timeout_s=2.0)
        c.create_table("e", 4, optimizer=("sgd", {"lr": 0.1}))
        c.pull("e", np.arange(100))
        servers.kill(0)
        with pytest.raises(ps.ServerUnavailableError, match=r"parameter server 0 at tcp://127\.0\.0\.1:\d+"):
            c.pull("e", np.arange(100))
        rows, _ = c.pull("e", np.array([i for i in range(100) if ps.shard_of(np.array([i]), 2)[0] == 1]))
        assert rows.shape[1] == 4  # the live server keeps serving its shard
        c.close()
