"""Starting jobs through `luoshu launch` from the tests (a subprocess, so nothing outlives a test)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def launch(n: int, script: str, *args: str, timeout: float = 120, extra: tuple = ()) -> subprocess.CompletedProcess:
    """Runs `python -m luoshu.distributed.launch -n N script args...`; kills the whole job on timeout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "luoshu.distributed.launch", "-n", str(n), *extra, str(ROOT / script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the launcher and every process it started
        out, err = proc.communicate()
        raise AssertionError(f"job {script} did not finish in {timeout} s\n{out}\n{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(nnodes: int, n: int, script: str, *args: str, timeout: float = 180,
                 extra: tuple = ()) -> list[subprocess.CompletedProcess]:
    """Simulates `nnodes` machines on localhost: one `luoshu launch --nnodes ...` per node,
    meeting at one c10d rendezvous endpoint."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = []
    for node in range(nnodes):
        cmd = [sys.executable, "-m", "luoshu.distributed.launch", "-n", str(n), "--nnodes", str(nnodes), "--node-rank",
               str(node), "--rdzv-endpoint", endpoint, "--rdzv-id", "luoshu-test", *extra, str(ROOT / script), *args]
        procs.append((cmd, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True, start_new_session=True)))
    results = []
    try:
        for cmd, proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{nnodes}-node job {script} did not finish in {timeout} s") from None
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.communicate()
    return results
