"""The parameter server (HET): ZeroMQ servers with key-sharded tables and server-side optimizers, and the client.

Servers: `serve` (run by the launcher in server processes) or `start_local_servers` (subprocesses,
for tests and single-machine use). Workers: `connect` returns a `Client` with
`create_table` / `pull` / `pull_async` / `push` (futures), dense tensors, `snapshot`,
`stats`, `barrier`, `shutdown_servers`. `initial_rows` reproduces a table's seeded
initial rows in a single process, for references.

Training on the servers: `HETCache` (the worker cache with LRU/LFU and a staleness bound),
`PSEmbedding` / `PSSlotEmbedding` (tables on the servers, read through the cache, usable in
eager and graph mode). The "ps" and "hybrid" modes of `luoshu.parallel.DataParallel`
(`luoshu.parallel.ps_modes`, a layer above) move a model's embedding tables here.

Importing this package installs `serve` as the server role of `luoshu.distributed`, so the
server processes of `luoshu launch --servers S` run it.
"""

import warnings as _warnings

from luoshu.distributed import env as _env
from luoshu.ps.cache import CacheError, CacheStats, HETCache
from luoshu.ps.client import Client, connect
from luoshu.ps.embedding import (
    PSEmbedding,
    PSSlotEmbedding,
    prefetch,
    ps_embeddings,
    push_gradients,
    replace_embeddings,
)
from luoshu.ps.local import LocalServers, start_local_servers
from luoshu.ps.protocol import (
    IdOutOfRangeError,
    PartialPushError,
    ProtocolError,
    PSError,
    ServerUnavailableError,
    SnapshotError,
    TableError,
    WorkerTimeoutError,
    initial_rows,
    map_ids,
    shard_of,
)
from luoshu.ps.server import ParameterServer, serve

_env.set_server_role(serve)

# Former names, kept for one release.
_RENAMED = {"Embedding": "PSEmbedding", "SlotEmbedding": "PSSlotEmbedding"}


def __getattr__(name: str):
    if name in _RENAMED:
        _warnings.warn(f"luoshu.ps.{name} is now luoshu.ps.{_RENAMED[name]}", DeprecationWarning, stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module 'luoshu.ps' has no attribute {name!r}")


__all__ = [
    "CacheError", "CacheStats", "HETCache", "PSEmbedding", "PSSlotEmbedding",
    "prefetch", "ps_embeddings", "push_gradients", "replace_embeddings",
    "Client", "IdOutOfRangeError", "PartialPushError", "LocalServers", "PSError", "ParameterServer", "ProtocolError",
    "ServerUnavailableError", "SnapshotError", "TableError", "connect", "initial_rows", "map_ids", "serve",
    "shard_of", "start_local_servers", "WorkerTimeoutError",
]
