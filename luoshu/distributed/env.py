"""The process environment: `init` from torchrun's variables, ranks, cached process groups, the store.

`luoshu launch -n N --servers S` (torchrun underneath) starts N + S processes per node.
On every node the first N local ranks are workers and the last S are parameter servers.
Workers form the default collective group by themselves: `rank()` and `world_size()`
count workers only, so a training script never sees the servers. Servers take no part
in any collective; `init()` hands them the rendezvous store and runs the server role
(`luoshu.ps` installs it with `set_server_role` when imported, as `import luoshu` does),
then exits the process so the script's training code never runs there. Everyone shares
the rendezvous `TCPStore` (`ps_store()`), e.g. to publish server addresses. Workers count
their exit in the store; once all have exited, a server that was never told to shut down
stops by itself (`workers_gone()`; `SERVER_GRACE_S` later it is ended regardless), so the job ends.

Leaving: `init()` registers an orderly `shutdown()` at interpreter exit, so a script that
never calls it still ends cleanly: the hooks of higher layers run first (`on_shutdown`;
`luoshu.ps` closes its clients and tells the job's servers), then the process groups are
destroyed (torch's Gloo threads would otherwise abort the interpreter's exit with
"terminate called without an active exception"), then the worker counts its exit.

Multi-node: every node runs `luoshu launch -n N --servers S --nnodes K --node-rank R
--rdzv-endpoint host:port script.py`; torchrun numbers the nodes (`GROUP_RANK`), worker
`i` of node `g` is worker rank `g * N + i` and server `j` of node `g` is server index
`g * S + j`, so K nodes give K * N workers and K * S servers.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist

from luoshu.core.dstates import DeviceGroup
from luoshu.core.errors import Error


class DistError(Error, RuntimeError):
    """A distributed failure: bad launch environment, a collective that failed, a dead peer."""


DEFAULT_TIMEOUT_S = 180.0  # bounds every collective: a dead peer never hangs the others forever
# The per-job secret parameter servers and workers authenticate each other with (luoshu.ps.auth).
JOB_SECRET_ENV = "LUOSHU_JOB_SECRET"


@dataclass
class _State:
    initialized: bool = False
    backend: str | None = None
    rank: int = 0  # worker rank (servers: their server index)
    world_size: int = 1  # workers
    local_rank: int = 0
    role: str = "worker"  # or "server"
    num_servers: int = 0
    store: object = None
    timeout: datetime.timedelta = field(default_factory=lambda: datetime.timedelta(seconds=DEFAULT_TIMEOUT_S))
    groups: dict = field(default_factory=dict)


_state = _State()


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise DistError(f"luoshu.distributed.init: the environment variable {name} is not set; start the script "
                            "with `luoshu launch -n N script.py` (or torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistError(f"luoshu.distributed.init: {name} must be an integer, found {raw!r}") from None


def _layout() -> tuple[str, int, int, int, int]:
    """(role, index within its role, number of workers, number of servers, local rank) from the env."""
    global_rank, global_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", 0)
    servers_per_node = _env_int("LUOSHU_SERVERS_PER_NODE", 0)
    if servers_per_node == 0:
        return "worker", global_rank, global_size, 0, local_rank
    local_size = _env_int("LOCAL_WORLD_SIZE")
    node = _env_int("GROUP_RANK", 0)
    workers_per_node = local_size - servers_per_node
    if workers_per_node < 1 or global_size % local_size:
        raise DistError(f"luoshu.distributed.init: {local_size} processes per node with {servers_per_node} servers per "
                        f"node leave no workers, or do not divide the world of {global_size}")
    nodes = global_size // local_size
    if local_rank < workers_per_node:
        return "worker", node * workers_per_node + local_rank, nodes * workers_per_node, \
            nodes * servers_per_node, local_rank
    return "server", node * servers_per_node + local_rank - workers_per_node, nodes * workers_per_node, \
        nodes * servers_per_node, local_rank


# A device-keyed backend string makes torch.distributed pick the backend per tensor device.
MIXED_BACKEND = "cpu:gloo,cuda:nccl"
BACKENDS = ("gloo", "nccl", MIXED_BACKEND)


def default_backend(cuda_available: bool) -> str:
    """Gloo for CPU tensors always; NCCL for CUDA tensors where CUDA exists."""
    return MIXED_BACKEND if cuda_available else "gloo"


def init(backend: str | None = None, timeout_s: float | None = None) -> None:
    """Joins the job described by the torchrun environment (a no-op when already joined).

    Without that environment (a plain `python script.py`) this is a single process:
    rank 0 of 1, and collectives are identities. `backend` defaults to Gloo, and where CUDA
    is available to `"cpu:gloo,cuda:nccl"`: each collective runs on the backend of its
    tensors' device (CPU tensors over Gloo, CUDA tensors over NCCL), so a job whose tensors
    stay on the CPU works on a CUDA machine too. `timeout_s` (default `LUOSHU_COMM_TIMEOUT` or
    180 s) bounds every collective. A parameter-server process does not return: it
    serves until the workers shut it down and then exits.
    """
    if _state.initialized:
        return
    if timeout_s is None:
        raw = os.environ.get("LUOSHU_COMM_TIMEOUT", DEFAULT_TIMEOUT_S)
        try:
            timeout_s = float(raw)
        except ValueError:
            raise DistError(f"luoshu.distributed.init: LUOSHU_COMM_TIMEOUT must be seconds, found {raw!r}") from None
    if not timeout_s > 0:
        raise DistError(f"luoshu.distributed.init: timeout_s must be positive, found {timeout_s}")
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        _state.__init__(initialized=True, timeout=timeout)
        return
    role, index, num_workers, num_servers, local_rank = _layout()
    _report_uncaught_errors()
    if backend is None:
        backend = default_backend(torch.cuda.is_available() and role == "worker")
    if backend not in BACKENDS:
        raise DistError(f"luoshu.distributed.init: backend must be one of {BACKENDS}, found {backend!r}")
    try:
        store, _, _ = next(torch_dist.rendezvous("env://", timeout=timeout))
    except (RuntimeError, ValueError) as exc:
        raise DistError(f"luoshu.distributed.init: cannot reach the rendezvous store at "
                        f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: {exc}") from exc
    _state.__init__(initialized=True, backend=backend, rank=index, world_size=num_workers, local_rank=local_rank,
                    role=role, num_servers=num_servers, store=store, timeout=timeout)
    os.environ["LUOSHU_WORKER_RANK" if role == "worker" else "LUOSHU_SERVER_INDEX"] = str(index)
    if num_servers and not os.environ.get(JOB_SECRET_ENV):
        # A multi-node job whose nodes were not given one secret: the first process to ask sets it in the
        # rendezvous store (which only the job's own processes join; weaker than a secret given to every node).
        import secrets

        os.environ[JOB_SECRET_ENV] = store.compare_set("luoshu/dist/job_secret", "", secrets.token_hex(32)).decode()
    if role == "server":
        _serve_and_exit(store, index, num_servers, num_workers)
    _register_exit()
    if "nccl" in backend:
        torch.cuda.set_device(local_rank)
    # Workers only: the servers never join a collective, so the default group (and
    # torch.distributed.get_rank()) number workers from 0.
    torch_dist.init_process_group(backend, store=torch_dist.PrefixStore("luoshu/workers", store), rank=index,
                                  world_size=num_workers, timeout=timeout)
    if num_workers > 1:
        _start_heartbeat()


def _report_uncaught_errors() -> None:
    """An uncaught exception goes to torchrun's error file too, so the launcher can quote it."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    handler, previous = ErrorHandler(), sys.excepthook

    def hook(kind, value, traceback):
        try:
            handler.record_exception(value)
        except Exception:  # reporting must never hide the original error
            pass
        previous(kind, value, traceback)

    sys.excepthook = hook


_WORKERS_EXITED = "luoshu/dist/workers_exited"
SERVER_GRACE_S = 10.0  # after the last worker exits, how long a server may still take to stop by itself


def _count_worker_exit(store) -> None:
    """A worker leaving: lets the servers know, so a job whose workers never shut the
    servers down (they did not use them, or forgot) still ends."""
    try:
        store.add(_WORKERS_EXITED, 1)
    except Exception:  # the job is ending anyway; the store may already be gone
        pass


def workers_gone() -> bool:
    """On a server: whether every worker of the job has left (counted its exit in the store)."""
    if _state.store is None:
        return False
    try:
        return _state.store.add(_WORKERS_EXITED, 0) >= _state.world_size
    except Exception:  # the rendezvous store is gone, and the job with it
        return True


def _exit_when_workers_are_gone(store, num_workers: int) -> None:
    def watch():
        while True:
            time.sleep(0.5)
            try:
                exited = store.add(_WORKERS_EXITED, 0)
            except Exception:  # the rendezvous store is gone, and the job with it
                exited = num_workers
            if exited >= num_workers:
                time.sleep(SERVER_GRACE_S)  # a normal shutdown through serve() finishes first
                os._exit(0)

    threading.Thread(target=watch, name="luoshu-server-watch", daemon=True).start()


# What a server process runs: `serve(store, index, num_servers, num_workers)`. This layer knows
# processes, not parameter servers; `luoshu.ps` (a layer above) installs its serve loop here.
_server_role: Callable[[object, int, int, int], None] | None = None


def set_server_role(serve: Callable[[object, int, int, int], None]) -> None:
    """Installs what a server process of a `luoshu launch --servers S` job runs."""
    global _server_role
    _server_role = serve


def _serve_and_exit(store, index: int, num_servers: int, num_workers: int) -> None:
    if _server_role is None:
        raise DistError(f"server {index}: no server role is installed; import luoshu (which loads luoshu.ps) "
                        "before luoshu.distributed.init()")
    _exit_when_workers_are_gone(store, num_workers)
    _server_role(store, index, num_servers, num_workers)
    # The serve loop has closed its sockets and written its snapshots. Leave without the
    # interpreter's teardown: destroying the rendezvous store's and the kernels' native threads
    # in static-destructor order aborted a loaded server now and then ("terminate called
    # without an active exception", SIGABRT), which the launcher rightly reports as a failure.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def is_initialized() -> bool:
    return _state.initialized


def is_distributed() -> bool:
    """True in a multi-process job (the collectives talk to other processes)."""
    return _state.initialized and _state.store is not None and torch_dist.is_initialized()


def rank() -> int:
    """This worker's rank among the workers (0 in a single process)."""
    return _state.rank


def world_size() -> int:
    """The number of workers (servers excluded; 1 in a single process)."""
    return _state.world_size


def local_rank() -> int:
    return _state.local_rank


def num_servers() -> int:
    return _state.num_servers


def is_server() -> bool:
    return _state.role == "server"


def backend() -> str | None:
    return _state.backend


def timeout() -> datetime.timedelta:
    return _state.timeout


def ps_store():
    """`(store, num_servers)`: the rendezvous store every process of the job shares (keys
    under "luoshu/ps/" are the parameter servers'), and the number of parameter servers;
    `(None, 0)` in a single process."""
    return _state.store, _state.num_servers


def barrier(group: DeviceGroup | None = None) -> None:
    """Waits until every worker of `group` (default: all workers) gets here."""
    pg = process_group(group)
    if pg is None:
        return
    ranks = _ranks_of(group)
    if _monitor is not None:
        _monitor.entered(ranks)
    try:
        torch_dist.barrier(group=pg)
    except RuntimeError as exc:
        late = _monitor.laggards(ranks) if _monitor is not None else ""
        raise DistError(f"barrier on worker ranks {ranks} failed: {late or 'a peer may have died'}: {exc}") from exc


def _ranks_of(group) -> tuple[int, ...]:
    if group is None:
        return tuple(range(_state.world_size))
    return tuple(group.ranks if isinstance(group, DeviceGroup) else group)


def process_group(group: DeviceGroup | tuple | list | None = None):
    """The torch process group of a `DeviceGroup` (worker ranks), created once and cached.

    None (or every worker) is the default group. Returns None in a single process, where
    collectives are identities, and on a worker outside the group. Only the members take
    part in creating a group (torch's local synchronisation), and they must create their
    groups in the same order, as SPMD programs do. As in torch, the members of a group
    are ordered by ascending rank: all_gather and all_to_all blocks follow that order.
    """
    ranks = _ranks_of(group)
    for r in ranks:
        if not 0 <= r < _state.world_size:
            raise DistError(f"device group {ranks} names worker rank {r}, but there are {_state.world_size} workers")
    if not is_distributed() or _state.rank not in ranks:
        return None
    members = tuple(sorted(ranks))
    if members == tuple(range(_state.world_size)):
        return torch_dist.group.WORLD
    pg = _state.groups.get(members)
    if pg is None:
        pg = _state.groups[members] = torch_dist.new_group(list(members), timeout=_state.timeout,
                                                           use_local_synchronization=True)
    return pg


def group_size(group: DeviceGroup | tuple | list | None = None) -> int:
    return len(_ranks_of(group)) if is_distributed() else 1


def group_rank(group: DeviceGroup | tuple | list | None = None) -> int:
    """This worker's position in `group` by ascending rank (-1 when not a member)."""
    members = sorted(_ranks_of(group))
    return members.index(_state.rank) if _state.rank in members else -1


# --- per-rank progress: who did not arrive --------------------------------------------------------
_HEARTBEAT = "luoshu/dist/heartbeat/"
HEARTBEAT_S = 0.5


class _Monitor:
    """Counts the collectives this worker entered per group and publishes the counts with a time stamp
    in the store every `HEARTBEAT_S` (its own thread and store connection). When a collective fails,
    `laggards` compares the members' counts: a member behind this one never arrived (and its heartbeat's
    age tells a stuck process, still beating, from a dead or frozen one)."""

    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world
        self.counts: dict[tuple, int] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="luoshu-heartbeat", daemon=True)
        self.thread.start()

    def _key(self, ranks) -> tuple:
        members = tuple(sorted(ranks)) if ranks else ()
        return () if members == tuple(range(self.world)) else members

    def entered(self, ranks) -> None:
        key = self._key(ranks)
        self.counts[key] = self.counts.get(key, 0) + 1

    def _beat(self) -> None:
        counts = {",".join(map(str, k)): v for k, v in list(self.counts.items())}
        with self.lock:
            self.store.set(f"{_HEARTBEAT}{self.rank}", json.dumps({"t": time.time(), "counts": counts}))

    def _run(self) -> None:
        while True:
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store may be gone at the job's end
                pass
            if self.stopped.wait(HEARTBEAT_S):
                return

    def _read(self, rank: int) -> dict | None:
        key = f"{_HEARTBEAT}{rank}"
        with self.lock:
            if not self.store.check([key]):
                return None
            return json.loads(self.store.get(key).decode())

    def laggards(self, ranks) -> str:
        """Which members of the group did not arrive at this worker's current collective ("" if all did)."""
        key = self._key(ranks)
        mine = self.counts.get(key, 0)
        members = key or tuple(range(self.world))
        late, now = [], time.time()
        for r in members:
            if r == self.rank:
                continue
            beat = self._read(r)
            if beat is None:
                late.append((r, f"worker rank {r} never reported"))
                continue
            theirs = int(beat["counts"].get(",".join(map(str, key)), 0))
            if theirs < mine:
                age = now - float(beat["t"])
                state = "still running" if age < 5 * HEARTBEAT_S + 2 else f"silent for {age:.0f} s: dead or frozen?"
                late.append((r, f"worker rank {r} is at collective {theirs} ({state})"))
        if not late:
            return ""
        who = ", ".join(str(r) for r, _ in late)
        what = "all workers" if not key else f"worker ranks {key}"
        plural = "s" if len(late) > 1 else ""
        return (f"worker rank{plural} {who} did not arrive at collective {mine} over {what}, which worker rank "
                f"{self.rank} waited for; " + "; ".join(text for _, text in late))

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=2.0)


_monitor: _Monitor | None = None


def _start_heartbeat() -> None:
    global _monitor
    from luoshu.ops import comm

    try:  # its own connection: a store client is not shared between threads
        store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                    timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    except (KeyError, ValueError, RuntimeError):
        return  # no way to publish progress: collectives still work, failures just name no laggard
    _monitor = _Monitor(store, _state.rank, _state.world_size)
    comm.set_monitor(_monitor)


def _stop_heartbeat() -> None:
    global _monitor
    if _monitor is not None:
        from luoshu.ops import comm

        comm.set_monitor(None)
        _monitor.stop()
        _monitor = None


# Callables run when this process leaves the job (newest first): registered by higher layers.
_shutdown_hooks: list[Callable[[], None]] = []
_exit_registered = False


def on_shutdown(hook: Callable[[], None]) -> None:
    """Registers `hook` to run once when this process leaves the job (`shutdown()`, or the
    interpreter's exit after `init()`), before the process groups are destroyed."""
    _shutdown_hooks.append(hook)


def _register_exit() -> None:
    global _exit_registered
    if not _exit_registered:
        atexit.register(_at_exit)
        _exit_registered = True


def _at_exit() -> None:
    if _state.initialized:
        shutdown()


def shutdown() -> None:
    """Leaves the job (a no-op when not initialised): runs the `on_shutdown` hooks (parameter-server
    clients closed, servers told), destroys the process groups, and counts this worker's exit
    for the servers. `init()` registers it at interpreter exit; calling it earlier is fine."""
    failures = []
    while _shutdown_hooks:
        hook = _shutdown_hooks.pop()
        try:
            hook()
        except Exception as exc:  # noqa: BLE001 - every hook runs, and the groups are destroyed regardless
            failures.append(exc)
    _stop_heartbeat()
    if torch_dist.is_initialized():
        try:
            torch_dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - a peer may be gone already
            failures.append(exc)
        # A destroyed group lives on while anything refers to it, and its native threads with it
        # (Gloo's worker and transport loops); left to the interpreter's teardown they are
        # destroyed in static-destructor order, which aborted a loaded worker now and then
        # ("terminate called without an active exception"). Garbage holding them (a finished
        # job's graphs and plans are cycles) is freed now, while the interpreter is whole.
        gc.collect()
    if _state.role == "worker" and _state.num_servers and _state.store is not None:
        _count_worker_exit(_state.store)
    _state.__init__()
    for exc in failures:
        print(f"luoshu.distributed.shutdown: {type(exc).__name__}: {exc}", file=sys.stderr)
