"""`luoshu launch`: starts a training script on N worker (+ S server) processes per node via torchrun.

    luoshu launch -n N [--servers S] [--nnodes K --node-rank R --rdzv-endpoint host:port] script.py args...
    python -m luoshu.distributed.launch -n N script.py args...

This is torchrun's elastic agent (`torch.distributed.run`), so rendezvous, multi-node
runs and a Kubernetes PyTorchJob (which runs torchrun on every pod) work the same way.
Each node runs N + S local processes: local ranks 0..N-1 are workers, N..N+S-1 are
parameter servers (`LUOSHU_SERVERS_PER_NODE=S`; see `luoshu.distributed.env` for the numbering).
When any process dies the agent stops all the others, and this command exits non-zero
with a message naming the dead process's rank, role, pid and exit code or signal.

Multi-node: run the same command on every node with `--nnodes K --rdzv-endpoint
host:port` (torchrun's c10d rendezvous numbers the nodes). Kubernetes: a PyTorchJob
whose pods run `luoshu launch -n N --nnodes $PET_NNODES --rdzv-endpoint
$MASTER_ADDR:$MASTER_PORT script.py`; a PyTorchJob that starts the script directly
(one process per pod, RANK / WORLD_SIZE / MASTER_ADDR set) works too, without servers.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

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
    parser.add_argument("--max-restarts", dest="max_restarts", type=int, default=0,
                        help="restarts of the whole group after a failure (default 0: fail fast)")
    parser.add_argument("--log-dir", dest="log_dir", default=None, help="directory for per-process logs")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds any collective may wait before failing (LUOSHU_COMM_TIMEOUT, default 180)")
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
    try:
        torchrun.run(torch_args)
    except ChildFailedError as exc:
        first = sorted(exc.failures.items(), key=lambda kv: getattr(kv[1], "timestamp", 0))
        lines = [_describe(rank, f, args.nproc_per_node, args.servers) for rank, f in first]
        print(f"luoshu launch: {lines[0]}; the other processes of the job were stopped.", file=sys.stderr)
        for (_, f), line in zip(first[1:], lines[1:]):
            if getattr(f, "exitcode", None) != -signal.SIGTERM:  # SIGTERM: stopped by the agent
                print(f"luoshu launch: also failed: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="luoshu launch", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_cli())
