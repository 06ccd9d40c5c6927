"""Benchmarks that time N processes start themselves through `luoshu launch`, once per count."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def forwarded(args: argparse.Namespace, skip: tuple[str, ...] = ("procs",)) -> list[str]:
    """The parsed options as command-line arguments again (lists as several values)."""
    out: list[str] = []
    for name, value in vars(args).items():
        if name in skip or value is None:
            continue
        out.append("--" + name.replace("_", "-"))
        out += [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
    return out


def run_per_process_count(script: str, args: argparse.Namespace) -> None:
    """Runs `script` with the same options under `luoshu launch -n N` for each N of `args.procs`,
    one thread per process; exits with the first failure's code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for n in args.procs:
        cmd = [sys.executable, "-m", "luoshu.distributed.launch", "-n", str(n), script, *forwarded(args)]
        code = subprocess.call(cmd, env=env)
        if code:
            sys.exit(code)
