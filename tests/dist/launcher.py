"""Starting jobs through `luoshu launch` from the tests (a subprocess, so nothing outlives a test)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def launch(n: int, script: str, *args: str, timeout: float = 120, extra: tuple = ()) -> subprocess.CompletedProcess:
    """Runs `python -m luoshu.dist.launch -n N script args...`; kills the whole job on timeout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "luoshu.dist.launch", "-n", str(n), *extra, str(ROOT / script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the launcher and every process it started
        out, err = proc.communicate()
        raise AssertionError(f"job {script} did not finish in {timeout} s\n{out}\n{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
