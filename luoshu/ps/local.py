"""Parameter servers as local subprocesses, for tests and single-machine use without the launcher.

They bind loopback by default and admit only clients holding the secret this module creates for
them (`servers.secret`; `luoshu.ps.connect(addresses=servers)` uses it): see `luoshu.ps.auth`."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from luoshu.ps import auth as A
from luoshu.ps.protocol import PSError, ServerUnavailableError
from luoshu.ps.server import READY_LINE, ParameterServer, ServerSocket

_ROOT = str(Path(__file__).resolve().parents[2])
# `-c` rather than `-m luoshu.ps.server`: runpy warns when the package has already imported the module.
_ENTRY = "import sys; from luoshu.ps.server import main; sys.exit(main())"


class _ThreadServer:
    """A server running in a thread of this process (`in_process=True`): quick to start, for tests."""

    def __init__(self, k: int, owner: LocalServers, port: int):
        self.server = ParameterServer(k, owner.num_servers, owner.num_workers, owner.snapshot_dir,
                                      owner.snapshot_every_s)
        self.socket = ServerSocket(owner.host, port or None, owner.secret)
        self.address = f"tcp://{owner.host}:{self.socket.port}"
        self.thread = threading.Thread(target=self._run, name=f"luoshu-ps-server-{k}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.run(self.socket.sock, monitor=self.socket.monitor)
        finally:
            self.socket.close(linger=0)

    def poll(self):
        return None if self.thread.is_alive() else 0

    def crash(self) -> None:
        self.server.crashed = True
        self.thread.join()

    def wait(self, timeout=None):
        self.thread.join(timeout)
        return None if self.thread.is_alive() else 0


class LocalServers:
    """Handles on `num_servers` server subprocesses: addresses, kill/restart one, stop all.

    Use as a context manager (or call `stop`) so no server outlives its user.
    """

    def __init__(self, num_servers: int, num_workers: int = 1, snapshot_dir=None,
                 snapshot_every_s: float | None = None, host: str = "127.0.0.1", startup_timeout_s: float = 60.0,
                 log_level: str = "WARNING", in_process: bool = False, secret: str | None = None):
        if num_servers <= 0 or num_workers <= 0:
            raise PSError(f"need at least one server and one worker, found {num_servers} and {num_workers}")
        # One secret for these servers and their clients; "" turns authentication off (not recommended).
        self.secret = (secret if secret is not None else A.new_secret()) or None
        self.num_servers, self.num_workers = num_servers, num_workers
        self.snapshot_dir = None if snapshot_dir is None else str(snapshot_dir)
        self.snapshot_every_s = snapshot_every_s
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.log_level = log_level
        self.in_process = in_process
        self.processes: list = [None] * num_servers
        self.addresses: list[str] = [""] * num_servers
        try:
            if in_process:
                for k in range(num_servers):
                    self.processes[k] = _ThreadServer(k, self, 0)
                    self.addresses[k] = self.processes[k].address
                return
            for k in range(num_servers):
                self.processes[k] = self._spawn(k, 0)
            for k in range(num_servers):
                self.addresses[k] = self._wait_ready(k)
        except BaseException:
            self.stop()
            raise

    def __repr__(self) -> str:
        return f"LocalServers({self.addresses})"

    def __enter__(self) -> LocalServers:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, k: int, port: int) -> subprocess.Popen:
        cmd = [sys.executable, "-c", _ENTRY, "--index", str(k), "--num-servers", str(self.num_servers),
               "--num-workers", str(self.num_workers), "--host", self.host, "--port", str(port)]
        if self.snapshot_dir is not None:
            cmd += ["--snapshot-dir", self.snapshot_dir]
        if self.snapshot_every_s:
            cmd += ["--snapshot-every-s", str(self.snapshot_every_s)]
        env = dict(os.environ)
        env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("LUOSHU_PS_LOG", self.log_level)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.pop(A.SECRET_ENV, None)
        if self.secret is not None:  # in the environment, not argv: other users can read a command line
            env[A.SECRET_ENV] = self.secret
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True)

    def _wait_ready(self, k: int) -> str:
        proc = self.processes[k]
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerUnavailableError(f"parameter server {k} did not start within {self.startup_timeout_s:g} s")
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
            if ready:
                line = proc.stdout.readline()
                if line.startswith(READY_LINE):
                    return line.split()[1]
                if line == "":
                    raise ServerUnavailableError(f"parameter server {k} exited during start-up with code "
                                                 f"{proc.wait()}")
            elif proc.poll() is not None:
                raise ServerUnavailableError(f"parameter server {k} exited during start-up with code {proc.returncode}")

    def alive(self, k: int) -> bool:
        proc = self.processes[k]
        return proc is not None and proc.poll() is None

    def kill(self, k: int) -> None:
        """Kills server `k` at once (SIGKILL: no goodbye, no final snapshot), as a crash would."""
        proc = self.processes[k]
        if isinstance(proc, _ThreadServer):
            proc.crash()
        elif proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def restart(self, k: int) -> str:
        """Starts server `k` again on its old address; it restores its newest good snapshot."""
        if self.alive(k):
            raise PSError(f"parameter server {k} is still running; kill it first")
        self._close_pipe(k)
        port = int(self.addresses[k].rsplit(":", 1)[1])
        if self.in_process:
            self.processes[k] = _ThreadServer(k, self, port)
            return self.addresses[k]
        self.processes[k] = self._spawn(k, port)
        self.addresses[k] = self._wait_ready(k)
        return self.addresses[k]

    def _close_pipe(self, k: int) -> None:
        proc = self.processes[k]
        if isinstance(proc, subprocess.Popen) and proc.stdout is not None:
            proc.stdout.close()

    def wait(self, timeout_s: float | None = None) -> list[int | None]:
        """Waits for every server to exit (after `shutdown_servers`); returns their exit codes."""
        codes = []
        for proc in self.processes:
            if proc is None or isinstance(proc, _ThreadServer):
                codes.append(None if proc is None else proc.wait(timeout_s))
                continue
            try:
                codes.append(proc.wait(timeout=timeout_s))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminates every server still running (SIGTERM, then SIGKILL after `timeout_s`)."""
        for proc in self.processes:
            if isinstance(proc, _ThreadServer):
                proc.crash()
            elif proc is not None and proc.poll() is None:
                proc.terminate()
        for k, proc in enumerate(self.processes):
            if proc is None or isinstance(proc, _ThreadServer):
                continue
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._close_pipe(k)


def start_local_servers(num_servers: int, num_workers: int = 1, snapshot_dir=None,
                        snapshot_every_s: float | None = None, host: str = "127.0.0.1",
                        startup_timeout_s: float = 60.0, log_level: str = "WARNING",
                        in_process: bool = False, secret: str | None = None) -> LocalServers:
    """Starts `num_servers` parameter servers as subprocesses on this machine and waits until they listen.

    With `in_process=True` they run as threads of this process instead (instant start, one GIL:
    for tests and debugging); `kill` then stops a thread at once, discarding its memory as a crash would.

    They admit only clients holding `secret` (default: a fresh one, `servers.secret`).
    `luoshu.ps.connect(addresses=servers)` connects to them with it; `servers.stop()` (or a
    `with` block) ends them.
    """
    return LocalServers(num_servers, num_workers, snapshot_dir, snapshot_every_s, host, startup_timeout_s,
                        log_level, in_process, secret)
