"""`luoshu launch`: starts a training script on N worker (+ S server) processes per node via torchrun.

    luoshu launch -n N [--servers S] [--nnodes K --node-rank R --rdzv-endpoint host:port] script.py args...
    python -m luoshu.distributed.launch -n N script.py args...

This is torchrun's elastic agent (`torch.distributed.run`), so rendezvous, multi-node
runs and a Kubernetes PyTorchJob (which runs torchrun on every pod) work the same way.
Each node runs N + S local processes: local ranks 0..N-1 are workers, N..N+S-1 are
parameter servers (`LUOSHU_SERVERS_PER_NODE=S`; see `luoshu.distributed.env` for the numbering).
When any process dies the agent stops all the others, and this command exits non-zero
with a message naming the dead process's rank, role, pid and exit code or signal.

Hangs are named too: a collective that times out names the workers that never arrived
(from their heartbeats in the rendezvous store, see `luoshu.distributed.env`), and a
watchdog bounds the job's end: once a worker has finished, the others must finish within
`--timeout` seconds (default 180, the collective timeout), or the watchdog stops them and
names the ones still running (a rank that hangs after its last collective).

Multi-node: run the same command on every node with `--nnodes K --rdzv-endpoint
host:port` (torchrun's c10d rendezvous numbers the nodes). Kubernetes: a PyTorchJob
whose pods run `luoshu launch -n N --nnodes $PET_NNODES --rdzv-endpoint
$MASTER_ADDR:$MASTER_PORT script.py`; a PyTorchJob that starts the script directly
(one process per pod, RANK / WORLD_SIZE / MASTER_ADDR set) works too, without servers.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import sys
import threading
import time

from luoshu.core.errors import Error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `luoshu launch` options to `parser` (the `luoshu` CLI's subcommand)."""
    parser.add_argument("-n", "--nproc-per-node", dest="nproc_per_node", type=int, default=1,
                        help="worker processes per node (default 1)")
    parser.add_argument("--servers", type=int, default=0,
                        help="parameter-server processes per node, started besides the workers (default 0)")
    parser.add_argument("--nnodes", default="1", help="number of nodes, or MIN:MAX for elastic jobs (default 1)")
    parser.add_argument("--node-rank", dest="node_rank", type=int, default=0,
                        help="this node's rank with the static rendezvous (default 0)")
    parser.add_argument("--rdzv-endpoint", dest="rdzv_endpoint", default="",
                        help="host:port of the rendezvous (multi-node; every node passes the same)")
    parser.add_argument("--rdzv-backend", dest="rdzv_backend", default="c10d",
                        help="torchrun rendezvous backend for multi-node runs (default c10d)")
    parser.add_argument("--rdzv-id", dest="rdzv_id", default="luoshu", help="job id shared by the nodes")
    parser.add_argument("--rdzv-conf", dest="rdzv_conf", default="",
                        help="torchrun's rendezvous settings, e.g. is_host=1 on the node whose address the endpoint "
                             "names when torch cannot tell (network namespaces, NAT)")
    parser.add_argument("--max-restarts", dest="max_restarts", type=int, default=0,
                        help="restarts of the whole group after a failure (default 0: fail fast)")
    parser.add_argument("--log-dir", dest="log_dir", default=None, help="directory for per-process logs")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds any collective may wait before failing (LUOSHU_COMM_TIMEOUT, default 180)")
    parser.add_argument("--ps-host", dest="ps_host", default=None,
                        help="the address the parameter servers bind and publish (LUOSHU_PS_HOST; default: "
                             "loopback on one node, else this node's address towards the rendezvous host)")
    parser.add_argument("script", help="the Python training script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments passed to the script")


class LaunchError(Error):
    """Bad launcher arguments, or a process of the job that failed."""


def _torchrun_args(args) -> list[str]:
    if args.nproc_per_node < 1:
        raise LaunchError(f"luoshu launch: -n must be at least 1 worker per node, found {args.nproc_per_node}")
    if args.servers < 0:
        raise LaunchError(f"luoshu launch: --servers must be >= 0, found {args.servers}")
    if not os.path.isfile(args.script):
        raise LaunchError(f"luoshu launch: the script {args.script!r} does not exist")
    single_node = str(args.nnodes) in ("1", "1:1")
    out = ["--nproc-per-node", str(args.nproc_per_node + args.servers), "--nnodes", str(args.nnodes),
           "--max-restarts", str(args.max_restarts), "--monitor-interval", "0.1"]
    if single_node and not args.rdzv_endpoint:
        out.append("--standalone")
    else:
        if not args.rdzv_endpoint:
            raise LaunchError("luoshu launch: a multi-node job needs --rdzv-endpoint host:port (same on every node)")
        out += ["--rdzv-backend", args.rdzv_backend, "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id,
                "--node-rank", str(args.node_rank)]
        if args.rdzv_conf:
            out += ["--rdzv-conf", args.rdzv_conf]
    if args.log_dir:
        out += ["--log-dir", args.log_dir]
    return out + [args.script, *args.script_args]


def _describe(rank: int, failure, workers: int, servers: int) -> str:
    """One failed process in words: its role and number, pid, and how it ended."""
    per_node = workers + servers
    local = getattr(failure, "local_rank", rank % per_node)
    pid = getattr(failure, "pid", "?")
    node = rank // per_node
    if servers and local >= workers:
        who = f"server {node * servers + local - workers} (process rank {rank}, pid {pid})"
    else:
        who = f"worker rank {node * workers + local if servers else rank} (pid {pid})"
    code = getattr(failure, "exitcode", None)
    if code is not None and code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    message = getattr(failure, "message", "")
    if isinstance(message, dict):  # the error file of a process that recorded its exception
        message = str(message.get("message", ""))
    if len(message) > 400:
        message = message[:400] + " ..."
    noise = ("Signal", "exitcode", "To enable traceback")
    detail = f": {message}" if message and not any(n in message for n in noise) else ""
    return f"{who} {how}{detail}"


def _who(local_rank: int, workers: int, servers: int, node: int = 0) -> str:
    if servers and local_rank >= workers:
        return f"server {node * servers + local_rank - workers}"
    return f"worker rank {node * workers + local_rank}"


class _Watchdog:
    """Bounds the end of the job on this node: once a worker process has ended, every other process
    of the job must end within `limit_s`, or it is stopped (SIGKILL) and named. Reads the agent's
    children from /proc (Linux); elsewhere it does nothing."""

    def __init__(self, limit_s: float, workers: int, servers: int, node: int = 0, poll_s: float = 0.2):
        self.limit_s, self.workers, self.servers, self.node, self.poll_s = limit_s, workers, servers, node, poll_s
        self.seen: dict[int, int] = {}  # pid -> local rank
        self.first_end: tuple[float, int] | None = None  # (when, local rank) of the first worker to end
        self.message = ""
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="luoshu-launch-watchdog", daemon=True)

    def start(self) -> _Watchdog:
        if os.path.isdir("/proc"):
            self.thread.start()
        return self

    def stop(self) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2.0)

    @staticmethod
    def _children() -> dict[int, tuple[str, int | None]]:
        """pid -> (state letter, LOCAL_RANK) of this process's children."""
        me, out = os.getpid(), {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) != me:
                    continue
                local = None
                if fields[0] != "Z":
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
                    raw = env.get(b"LOCAL_RANK")
                    local = int(raw) if raw is not None else None
                out[int(entry)] = (fields[0], local)
            except (OSError, ValueError, IndexError):
                continue
        return out

    def _run(self) -> None:
        while not self.done.wait(self.poll_s):
            children = self._children()
            for pid, (_, local) in children.items():
                if local is not None and pid not in self.seen:
                    self.seen[pid] = local
            running = {pid: local for pid, local in self.seen.items()
                       if pid in children and children[pid][0] != "Z"}
            if self.first_end is None:
                ended = [local for pid, local in self.seen.items() if pid not in running and local < self.workers]
                if ended:
                    self.first_end = (time.monotonic(), min(ended))
                continue
            if not running:
                continue
            since, first = self.first_end
            if time.monotonic() - since < self.limit_s:
                continue
            names = [f"{_who(local, self.workers, self.servers, self.node)} (pid {pid})"
                     for pid, local in sorted(running.items(), key=lambda kv: kv[1])]
            self.message = (f"{', '.join(names)} did not finish within {self.limit_s:g} s after "
                            f"{_who(first, self.workers, self.servers, self.node)} ended (hung after its last "
                            "collective?); the launcher's watchdog stopped the job (raise --timeout if it "
                            "was still working)")
            for pid in running:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            return


_LATE = re.compile(r"worker ranks? ([\d, ]+) did not arrive at (collective \d+ over [^,;]+)")


def main(args) -> int:
    """Runs the job; returns the exit status (0 when every process succeeded)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torch_args = torchrun.get_args_parser().parse_args(_torchrun_args(args))
    except LaunchError as exc:
        print(exc, file=sys.stderr)
        return 2
    # torchrun's children inherit this environment.
    os.environ["LUOSHU_SERVERS_PER_NODE"] = str(args.servers)
    if args.timeout is not None:
        os.environ["LUOSHU_COMM_TIMEOUT"] = str(args.timeout)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from luoshu.distributed.env import DEFAULT_TIMEOUT_S, JOB_SECRET_ENV

    if args.servers:
        single_node = str(args.nnodes) in ("1", "1:1")
        if args.ps_host:
            os.environ["LUOSHU_PS_HOST"] = args.ps_host
        elif single_node:
            os.environ.setdefault("LUOSHU_PS_HOST", "127.0.0.1")  # nothing outside this machine needs them
        # The per-job secret servers and workers authenticate each other with (luoshu.ps.auth). Several
        # nodes must share one: set it on every node, or the processes agree on one through the store.
        if single_node:
            os.environ.setdefault(JOB_SECRET_ENV, secrets.token_hex(32))
    limit_s = args.timeout if args.timeout is not None else DEFAULT_TIMEOUT_S
    watchdog = _Watchdog(limit_s, args.nproc_per_node, args.servers, args.node_rank).start()
    try:
        torchrun.run(torch_args)
    except ChildFailedError as exc:
        watchdog.stop()
        if watchdog.message:
            print(f"luoshu launch: {watchdog.message}.", file=sys.stderr)
            return 1
        first = sorted(exc.failures.items(), key=lambda kv: getattr(kv[1], "timestamp", 0))
        lines = [_describe(rank, f, args.nproc_per_node, args.servers) for rank, f in first]
        for _, f in first:  # a collective that timed out names who never arrived: lead with that rank
            message = getattr(f, "message", "")
            message = str(message.get("message", "")) if isinstance(message, dict) else str(message)
            late = _LATE.search(message)
            if late:
                print(f"luoshu launch: worker rank {late.group(1)} hung: it did not arrive at {late.group(2)} "
                      "(reported by the rank that waited for it, below).", file=sys.stderr)
                break
        print(f"luoshu launch: {lines[0]}; the other processes of the job were stopped.", file=sys.stderr)
        for (_, f), line in zip(first[1:], lines[1:]):
            if getattr(f, "exitcode", None) != -signal.SIGTERM:  # SIGTERM: stopped by the agent
                print(f"luoshu launch: also failed: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        watchdog.stop()
    return 0


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="luoshu launch", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_cli())
