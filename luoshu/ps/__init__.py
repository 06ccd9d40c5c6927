"""The parameter server (HET): ZeroMQ servers with key-sharded tables and server-side optimizers, and the client.

Servers: `serve` (run by the launcher in server processes) or `start_local_servers` (subprocesses,
for tests and single-machine use). Workers: `connect` returns a `Client` with
`create_table` / `pull` / `pull_async` / `push` (futures), dense tensors, `snapshot`,
`stats`, `barrier`, `shutdown_servers`. `initial_rows` reproduces a table's seeded
initial rows in a single process, for references.

Training on the servers: `HETCache` (the worker cache with LRU/LFU and a staleness bound),
`Embedding` / `SlotEmbedding` (tables on the servers, read through the cache, usable in
eager and graph mode), and the "ps" and "hybrid" modes of `luoshu.dist.DataParallel`
(`luoshu.ps.data_parallel`), which move a model's embedding tables here.
"""

from luoshu.ps.cache import CacheError, CacheStats, HETCache
from luoshu.ps.client import Client, connect
from luoshu.ps.data_parallel import HybridStrategy, PSStrategy  # registers DataParallel's "ps" and "hybrid"
from luoshu.ps.embedding import Embedding, SlotEmbedding, prefetch, ps_embeddings, push_gradients, replace_embeddings
from luoshu.ps.local import LocalServers, start_local_servers
from luoshu.ps.protocol import (
    IdOutOfRangeError,
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

__all__ = [
    "CacheError", "CacheStats", "Embedding", "HETCache", "HybridStrategy", "PSStrategy", "SlotEmbedding",
    "prefetch", "ps_embeddings", "push_gradients", "replace_embeddings",
    "Client", "IdOutOfRangeError", "LocalServers", "PSError", "ParameterServer", "ProtocolError",
    "ServerUnavailableError", "SnapshotError", "TableError", "connect", "initial_rows", "map_ids", "serve",
    "shard_of", "start_local_servers", "WorkerTimeoutError",
]
