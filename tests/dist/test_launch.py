"""`luoshu launch`: environment, servers, bad arguments and the dead-worker fault."""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytest

from luoshu.dist import launch as launcher
from tests.dist.launcher import ROOT, launch


def _parse(*argv: str):
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_arguments_map_onto_torchrun():
    script = str(ROOT / "tests/dist/dp_train.py")
    args = launcher._torchrun_args(_parse("-n", "2", "--servers", "1", script, "--out", "x"))
    assert args[:2] == ["--nproc-per-node", "3"] and "--standalone" in args
    assert args[-3:] == [script, "--out", "x"]
    multi = launcher._torchrun_args(_parse("-n", "4", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint",
                                           "head:29400", script))
    assert "--standalone" not in multi and multi[multi.index("--rdzv-endpoint") + 1] == "head:29400"


@pytest.mark.parametrize("argv, message", [
    (("-n", "0", "tests/dist/dp_train.py"), "at least 1 worker"),
    (("--servers", "-1", "tests/dist/dp_train.py"), "--servers"),
    (("no_such_script.py",), "does not exist"),
    (("--nnodes", "2", "tests/dist/dp_train.py"), "--rdzv-endpoint"),
])
def test_bad_arguments_are_refused(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert launcher.main(_parse(*argv)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.dist
@pytest.mark.timeout(150)
def test_a_killed_worker_stops_the_job_and_is_named():
    start = time.monotonic()
    job = launch(2, "tests/dist/die_script.py", "--victim", "1", timeout=120, extra=("--timeout", "30"))
    assert job.returncode == 1
    assert "worker rank 1" in job.stderr and "SIGKILL" in job.stderr, job.stderr[-2000:]
    assert time.monotonic() - start < 120


@pytest.mark.dist
@pytest.mark.slow  # tests/dist/test_ps_modes.py exercises launcher-started servers in the default run
@pytest.mark.timeout(300)
def test_servers_started_by_the_launcher_serve_the_workers(tmp_path):
    pytest.importorskip("zmq")
    job = launch(2, "tests/dist/ps_script.py", str(tmp_path), timeout=280, extra=("--servers", "1"))
    assert job.returncode == 0, job.stderr[-3000:]
    for rank in range(2):
        result = np.load(tmp_path / f"rank{rank}.npz")
        # each worker pushed -1 to its own row of a zero table with SGD lr 1: every worker sees both
        np.testing.assert_array_equal(result["rows"], np.ones((2, 2)))
        assert int(result["servers"]) == 1 and int(result["world"]) == 2


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_hung_worker_cannot_hang_the_job():
    # Worker 1 stops calling collectives; worker 0's all-reduce gives up after the
    # collective timeout and the launcher stops the job, quoting the error.
    job = launch(2, "tests/dist/die_script.py", "--victim", "1", "--hang", timeout=120, extra=("--timeout", "5"))
    assert job.returncode == 1
    assert "worker rank 0" in job.stderr and "all_reduce over all workers failed" in job.stderr, job.stderr[-2000:]
