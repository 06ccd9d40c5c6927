"""`luoshu launch`: environment, servers, bad arguments and the dead-worker fault."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pytest

from luoshu.distributed import launch as launcher
from tests.distributed.launcher import ROOT, launch


def _parse(*argv: str):
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_arguments_map_onto_torchrun():
    script = str(ROOT / "tests/parallel/dp_train.py")
    args = launcher._torchrun_args(_parse("-n", "2", "--servers", "1", script, "--out", "x"))
    assert args[:2] == ["--nproc-per-node", "3"] and "--standalone" in args
    assert args[-3:] == [script, "--out", "x"]
    multi = launcher._torchrun_args(_parse("-n", "4", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint",
                                           "head:29400", script))
    assert "--standalone" not in multi and multi[multi.index("--rdzv-endpoint") + 1] == "head:29400"


@pytest.mark.parametrize("argv, message", [
    (("-n", "0", "tests/parallel/dp_train.py"), "at least 1 worker"),
    (("--servers", "-1", "tests/parallel/dp_train.py"), "--servers"),
    (("no_such_script.py",), "does not exist"),
    (("--nnodes", "2", "tests/parallel/dp_train.py"), "--rdzv-endpoint"),
])
def test_bad_arguments_are_refused(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert launcher.main(_parse(*argv)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.dist
@pytest.mark.timeout(150)
def test_a_killed_worker_stops_the_job_and_is_named():
    start = time.monotonic()
    job = launch(2, "tests/distributed/die_script.py", "--victim", "1", timeout=120, extra=("--timeout", "30"))
    assert job.returncode == 1
    assert "worker rank 1" in job.stderr and "SIGKILL" in job.stderr, job.stderr[-2000:]
    assert time.monotonic() - start < 120


@pytest.mark.dist
@pytest.mark.slow  # tests/parallel/test_ps_modes.py exercises launcher-started servers in the default run
@pytest.mark.timeout(300)
def test_servers_started_by_the_launcher_serve_the_workers(tmp_path):
    pytest.importorskip("zmq")
    job = launch(2, "tests/distributed/ps_script.py", str(tmp_path), timeout=280, extra=("--servers", "1"))
    assert job.returncode == 0, job.stderr[-3000:]
    for rank in range(2):
        result = np.load(tmp_path / f"rank{rank}.npz")
        # each worker pushed -1 to its own row of a zero table with SGD lr 1: every worker sees both
        np.testing.assert_array_equal(result["rows"], np.ones((2, 2)))
        assert int(result["servers"]) == 1 and int(result["world"]) == 2


@pytest.mark.dist
@pytest.mark.slow  # 20 s of collective timeout; the heartbeat naming itself is checked by test_the_monitor_...
@pytest.mark.timeout(150)
def test_a_hung_worker_cannot_hang_the_job_and_is_named():
    # Worker 1 stops calling collectives; worker 0's all-reduce gives up after the collective
    # timeout, names worker 1 from the heartbeats, and the launcher leads with worker 1.
    # 20 s, not less: the timeout also bounds joining, and on a loaded machine worker 1 may start late
    job = launch(2, "tests/distributed/die_script.py", "--victim", "1", "--hang", timeout=120,
                 extra=("--timeout", "20"))
    assert job.returncode == 1
    first = job.stderr[job.stderr.index("luoshu launch:"):]
    assert first.startswith("luoshu launch: worker rank 1 hung: it did not arrive at collective 4 over all workers"), \
        job.stderr[-2000:]
    assert "all_reduce over all workers failed" in job.stderr and "still running" in job.stderr, job.stderr[-2000:]


@pytest.mark.dist
@pytest.mark.timeout(150)
def test_a_worker_hung_after_its_last_collective_is_stopped_and_named():
    start = time.monotonic()
    job = launch(2, "tests/distributed/die_script.py", "--victim", "1", "--hang-at-end", timeout=120,
                 extra=("--timeout", "8"))
    assert job.returncode == 1
    assert "worker rank 1 (pid" in job.stderr and "did not finish within 8 s after worker rank 0 ended" in \
        job.stderr, job.stderr[-2000:]
    assert time.monotonic() - start < 100


def test_the_monitor_names_the_members_behind_this_one():
    from luoshu.distributed import env as dist_env

    class Store(dict):
        def set(self, k, v):
            self[k] = v.encode()

        def check(self, keys):
            return all(k in self for k in keys)

        def get(self, k):
            return self[k]

    store = Store()
    monitors = [dist_env._Monitor.__new__(dist_env._Monitor) for _ in range(3)]
    for r, m in enumerate(monitors):  # no thread: beats by hand
        m.store, m.rank, m.world, m.counts = store, r, 3, {}
        m.lock = __import__("threading").Lock()
    for _ in range(4):
        monitors[0].entered(())
        monitors[2].entered((0, 1, 2))  # the whole world, spelled out: the same group
    for _ in range(2):
        monitors[1].entered(())
    monitors[0].entered((0, 2))
    for m in monitors:
        m._beat()
    text = monitors[0].laggards(())
    assert text.startswith("worker rank 1 did not arrive at collective 4 over all workers") and \
        "worker rank 1 is at collective 2 (still running)" in text, text
    assert monitors[2].laggards([2, 0, 1]).startswith("worker rank 1 did not arrive")
    late = monitors[0].laggards((0, 2))
    assert late.startswith("worker rank 2 did not arrive at collective 1 over worker ranks (0, 2)"), late
    assert monitors[1].laggards(()) == ""  # rank 1 is the one behind: nobody is late for it
    del store["luoshu/dist/heartbeat/2"]
    assert "worker rank 2 never reported" in monitors[0].laggards(())


@pytest.mark.parametrize("env, expected", [
    # one node, 2 workers: plain torchrun numbering
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, ("worker", 1, 2, 0, 1)),
    # one node, 2 workers + 1 server: local rank 2 is server 0
    ({"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3", "GROUP_RANK": "0",
      "LUOSHU_SERVERS_PER_NODE": "1"}, ("server", 0, 2, 1, 2)),
    # two nodes of 2 workers + 1 server: on node 1, local rank 1 is worker 3, local rank 2 is server 1
    ({"RANK": "4", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "3", "GROUP_RANK": "1",
      "LUOSHU_SERVERS_PER_NODE": "1"}, ("worker", 3, 4, 2, 1)),
    ({"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3", "GROUP_RANK": "1",
      "LUOSHU_SERVERS_PER_NODE": "1"}, ("server", 1, 4, 2, 2)),
])
def test_workers_and_servers_are_numbered_per_node(env, expected, monkeypatch):
    from luoshu.distributed import env as dist_env

    for key in ("LOCAL_WORLD_SIZE", "GROUP_RANK", "LUOSHU_SERVERS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert dist_env._layout() == expected


def test_a_bad_environment_is_refused(monkeypatch):
    import luoshu as ls
    from luoshu.distributed import env as dist_env

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ls.distributed.DistError, match="WORLD_SIZE must be an integer"):
        dist_env._layout()
    monkeypatch.setenv("LUOSHU_COMM_TIMEOUT", "soon")
    monkeypatch.setattr(dist_env, "_state", dist_env._State())
    with pytest.raises(ls.distributed.DistError, match="LUOSHU_COMM_TIMEOUT"):
        ls.distributed.init()
    assert not ls.distributed.is_initialized()


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_killed_server_stops_the_job_and_is_named():
    job = launch(2, "tests/distributed/kill_server_script.py", timeout=180, extra=("--servers", "1", "--timeout", "30"))
    assert job.returncode == 1
    assert "server 0 (process rank 2" in job.stderr and "SIGKILL" in job.stderr, job.stderr[-2000:]


def test_failures_are_described_by_role():
    from types import SimpleNamespace

    dead = SimpleNamespace(local_rank=1, pid=7, exitcode=-9, message="Signal 9 (SIGKILL) received by PID 7")
    assert launcher._describe(1, dead, 2, 0) == "worker rank 1 (pid 7) was killed by SIGKILL"
    # node 1 of two nodes with 2 workers + 1 server each: process rank 5 is server 1
    server = SimpleNamespace(local_rank=2, pid=8, exitcode=1, message={"message": "PSError: disk full"})
    assert launcher._describe(5, server, 2, 1) == \
        "server 1 (process rank 5, pid 8) exited with code 1: PSError: disk full"
    worker = SimpleNamespace(local_rank=0, pid=9, exitcode=1, message="")
    assert launcher._describe(3, worker, 2, 1) == "worker rank 2 (pid 9) exited with code 1"


def _run_without_shutdown(tmp_path, runs: int, extra: tuple = (), ps: bool = False) -> list[float]:
    """Runs exit_script.py `runs` times; every run must succeed. Returns, per run, the seconds from the
    last worker reaching the end of its script to the job's end."""
    lags = []
    for i in range(runs):
        out = tmp_path / f"run{i}"
        out.mkdir()
        job = launch(2, "tests/distributed/exit_script.py", str(out), *(["--ps"] if ps else []), timeout=120,
                     extra=extra)
        ended = time.time()
        assert job.returncode == 0, f"run {i} of {runs}: {job.stderr[-3000:]}"
        assert "terminate called" not in job.stderr, job.stderr[-3000:]
        lags.append(ended - max(float((out / f"end{r}").read_text()) for r in range(2)))
    return lags


@pytest.mark.dist
@pytest.mark.timeout(200)
def test_scripts_without_an_explicit_shutdown_end_cleanly(tmp_path):
    _run_without_shutdown(tmp_path, 2)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_scripts_without_an_explicit_shutdown_end_cleanly_20_of_20(tmp_path):
    _run_without_shutdown(tmp_path, 20)


@pytest.mark.dist
@pytest.mark.timeout(200)
def test_a_ps_job_without_an_explicit_shutdown_ends_promptly(tmp_path):
    pytest.importorskip("zmq")
    (lag,) = _run_without_shutdown(tmp_path, 1, extra=("--servers", "1"), ps=True)
    # the servers are told at the workers' exit; before, they idled SERVER_GRACE_S (10 s) first
    assert lag < 7.0, lag


def test_backend_follows_the_tensors_device():
    """CPU tensors always go over Gloo; where CUDA exists, CUDA tensors go over NCCL and CPU
    tensors still over Gloo (a device-keyed backend), so CPU models run on CUDA machines."""
    from luoshu.distributed import env

    assert env.default_backend(False) == "gloo"
    assert env.default_backend(True) == "cpu:gloo,cuda:nccl"
    assert env.default_backend(True) in env.BACKENDS


def test_ps_rows_arrive_on_the_ids_device():
    import numpy as np
    import torch

    from luoshu.core import live
    from luoshu.ops.ps import PSLookup

    class Cache:
        def lookup(self, ids):
            return np.ones(tuple(ids.shape) + (2,), np.float32)

    class Table:
        cache = Cache()

    table = Table()
    key = live.register(table)
    rows = PSLookup().compute(torch.empty(0, 2), torch.zeros(3, dtype=torch.int64, device="meta"), table=key)
    assert rows.device.type == "meta" and rows.shape == (3, 2)


@pytest.mark.dist
@pytest.mark.timeout(200)
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists native threads through /proc")
def test_shutdown_leaves_no_process_group_threads_behind(tmp_path):
    """Graphs, eager DataParallel and ZeRO layouts still alive at `shutdown()` must not keep the
    destroyed groups: their native threads (Gloo's workers and transport loop) would otherwise
    live on into the interpreter's teardown, which aborted a loaded worker now and then."""
    job = launch(2, "tests/distributed/held_groups_script.py", str(tmp_path), timeout=150)
    assert job.returncode == 0, job.stderr[-3000:]
    for r in range(2):
        left = (tmp_path / f"threads{r}").read_text().split()
        assert left and not [name for name in left if "gloo" in name], f"rank {r} threads after shutdown: {left}"
