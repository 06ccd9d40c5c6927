"""Embeddings whose table lives on the parameter servers, read through the HET cache.

`PSEmbedding` (and `PSSlotEmbedding`, one table for every slot of a CTR model) works in eager
and define-and-run graphs alike. Its forward is the `ps_lookup` operator: the batch's rows
come from the worker cache, which pulls what it cannot serve (rows the previous step's
`prefetch` asked for are already on their way). Its gradient is an `IndexedSlices` over
the looked-up ids of the table's handle, `embedding.weight`; that gradient is pushed to
the servers, never applied locally: eagerly with `push_gradients`, in a graph by the
`ps_push` operator (`embedding.push_op(grad)`, or the ps/hybrid modes of
`luoshu.parallel.DataParallel`, which do it for every table of a model). The server applies
the table's optimizer.

The handle is a leaf tensor of shape (num_rows, dim) that holds no rows; it is not a
`Parameter`, so a local optimizer never sees it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from luoshu.core import context, live
from luoshu.core.errors import Error, GraphError
from luoshu.core.op import apply
from luoshu.core.tensor import IndexedSlices, Tensor
from luoshu.nn.layers import Embedding as LocalEmbedding
from luoshu.nn.layers import SlotLayout
from luoshu.nn.module import Module
from luoshu.ps.cache import POLICIES, HETCache

# Rows of a table whose size is not declared (hashed ids of any value).
UNBOUNDED_ROWS = 2**62


class PSEmbedding(Module):
    """A lookup table of `embedding_dim` columns stored on the parameter servers.

    ```python
    servers = luoshu.ps.start_local_servers(2)
    client = luoshu.ps.connect(addresses=servers)
    emb = luoshu.ps.PSEmbedding(client, "items", 16, num_embeddings=10**6, optimizer=("adagrad", {"lr": 0.05}),
                              cache_capacity=100_000, staleness=2)
    out = emb(ids)                    # eager or inside a Graph
    loss.backward(); emb.push_gradients()            # eager
    train = [opt.minimize(loss), emb.push_op(luoshu.gradients(loss, emb.weight)[0])]  # graph
    ```

    The table is created on the servers (idempotently: every worker may create it with
    the same arguments). `num_embeddings=None` takes any int64 id (hashed onto the
    servers); with a number, ids outside [0, num_embeddings) are hashed or refused per
    `id_policy`. `sync_workers=N` makes the table synchronous over N workers (one update
    per step from all their pushes); `scale` multiplies every pushed gradient (1/N to
    average N workers' gradients). `cache_capacity` rows are cached under the LRU or LFU
    `cache_policy`, served while at most `staleness` steps old (0: exact).
    """

    def __init__(self, client, name: str, embedding_dim: int, num_embeddings: int | None = None, *,
                 init=("normal", 0.0, 0.01), optimizer=("sgd", {"lr": 0.01}), id_policy: str = "hash",
                 sync_workers: int | None = None, cache_capacity: int = 0, cache_policy: str = "lru",
                 staleness: int = 0, scale: float = 1.0, seed: int = 0, create: bool = True):
        super().__init__()
        if not isinstance(name, str) or not name:
            raise Error(f"luoshu.ps.PSEmbedding: name must be a non-empty string, found {name!r}")
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim <= 0:
            raise Error(f"luoshu.ps.PSEmbedding {name!r}: embedding_dim must be a positive integer, "
                        f"found {embedding_dim!r}")
        if num_embeddings is not None and (isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int)
                                           or num_embeddings <= 0):
            raise Error(f"luoshu.ps.PSEmbedding {name!r}: num_embeddings must be a positive integer or None, "
                        f"found {num_embeddings!r}")
        if cache_policy not in POLICIES:
            raise Error(f"luoshu.ps.PSEmbedding {name!r}: cache_policy must be one of {POLICIES}, "
                        f"found {cache_policy!r}")
        self.client, self.table = client, name
        self.embedding_dim, self.num_embeddings = embedding_dim, num_embeddings
        if create:
            config = client.create_table(name, embedding_dim, num_rows=num_embeddings, id_policy=id_policy,
                                         init=init, optimizer=optimizer, sync_workers=sync_workers, seed=seed)
            sync = config.get("sync_workers") is not None
        else:
            sync = client.table_config(name).get("sync_workers") is not None
        self.cache = HETCache(client, name, embedding_dim, cache_capacity, cache_policy, staleness,
                              scale=scale, sync=sync)
        rows = num_embeddings if num_embeddings is not None else UNBOUNDED_ROWS
        # The handle: the table in the IR. Its value holds no rows; ps_lookup ignores it.
        self.weight = Tensor((rows, embedding_dim), "float32", "cpu", value=torch.empty((0, embedding_dim)),
                             requires_grad=True, name=name, kind="ps_table")
        self._key = live.register(self)  # what ps_lookup / ps_push name in their attributes

    def forward(self, ids):
        live.keep_alive(context.current_graph(), self)
        return apply("ps_lookup", self.weight, ids, table=self._key)

    # --- the step -----------------------------------------------------------------------------
    def prefetch(self, ids) -> None:
        """Starts pulling the rows of the next batch's `ids` (NumPy or torch) while this one computes."""
        self.cache.prefetch(_as_numpy_ids(ids))

    def push_gradients(self, grad=None) -> None:
        """Eager: pushes `grad` (default: `weight.grad`, then cleared) and ends the table's step.
        Call it once per step, also when the table got no gradient (synchronous tables count steps)."""
        if grad is None:
            grad, self.weight.grad = self.weight.grad, None
        if grad is None:
            self.cache.end_step()
            return
        if not isinstance(grad, IndexedSlices):
            raise Error(f"luoshu.ps.PSEmbedding {self.table!r}: the gradient must be an IndexedSlices, "
                        f"found {type(grad).__name__}")
        if grad.indices.symbolic:
            raise GraphError(f"luoshu.ps.PSEmbedding {self.table!r}: a symbolic gradient is pushed by "
                             "push_op(grad) inside the graph")
        self.cache.accumulate(grad.indices.value, grad.values.value)
        self.cache.end_step()

    def push_op(self, grad: IndexedSlices, carry: Tensor | None = None) -> Tensor:
        """Define-and-run: the op that pushes `grad` (from `luoshu.gradients(loss, emb.weight)`)
        and ends the step; fetch it with the training step. Eager: pushes at once."""
        if not isinstance(grad, IndexedSlices):
            raise Error(f"luoshu.ps.PSEmbedding {self.table!r}: push_op takes the IndexedSlices gradient of "
                        f"emb.weight, found {type(grad).__name__}")
        graph = grad.values.graph
        scope = graph if graph is not None and context.current_graph() is not graph else contextlib.nullcontext()
        live.keep_alive(graph, self)
        with scope:
            inputs = (grad.indices, grad.values) + ((carry,) if carry is not None else ())
            return apply("ps_push", *inputs, table=self._key)

    def flush(self) -> None:
        """Writes every gradient still in the cache back to the servers and waits for it."""
        self.cache.flush()

    def stats(self) -> dict:
        """The cache's statistics: hit rate, rows and bytes pulled and pushed, ..."""
        return self.cache.stats.as_dict()

    def extra_repr(self) -> str:
        rows = "any" if self.num_embeddings is None else self.num_embeddings
        return (f"table={self.table!r}, rows={rows}, dim={self.embedding_dim}, cache={self.cache.capacity} "
                f"{self.cache.policy}, staleness={self.cache.staleness}")


class PSSlotEmbedding(PSEmbedding):
    """`luoshu.models.SlotEmbedding` on the servers: one table for every slot, slot s's id i
    being row offsets[s] + i; takes (batch, num_slots) ids."""

    def __init__(self, client, name: str, slot_sizes, embedding_dim: int, **kwargs):
        layout = SlotLayout(slot_sizes, f"luoshu.ps.PSSlotEmbedding {name!r}")
        kwargs.setdefault("id_policy", "refuse")
        super().__init__(client, name, embedding_dim, num_embeddings=layout.num_rows, **kwargs)
        self._layout = layout
        self.slot_sizes = layout.sizes
        self.register_buffer("offsets", layout.offsets)

    def forward(self, sparse):
        self._layout.check_ids(sparse.shape)
        return super().forward(sparse + self.offsets)

    def prefetch(self, sparse) -> None:
        ids = _as_numpy_ids(sparse)
        self._layout.check_ids(ids.shape)
        self.cache.prefetch(ids + self._layout.offsets)


def _as_numpy_ids(ids) -> np.ndarray:
    if isinstance(ids, Tensor):
        ids = ids.value
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids)


# --- helpers over a model ---------------------------------------------------------------------
def ps_embeddings(module: Module) -> list[PSEmbedding]:
    """Every parameter-server embedding in `module` (depth first, each once)."""
    seen, out = set(), []
    for m in module.modules():
        if isinstance(m, PSEmbedding) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def prefetch(module: Module, ids) -> None:
    """Prefetches `ids` (the next batch) in every parameter-server embedding of `module` that
    takes the same ids (the CTR models: every table reads the (batch, slots) sparse input)."""
    for emb in ps_embeddings(module):
        emb.prefetch(ids)


def push_gradients(module: Module) -> None:
    """Eager: pushes and clears the gradient of every parameter-server embedding of `module`."""
    for emb in ps_embeddings(module):
        emb.push_gradients()


def replace_embeddings(module: Module, client, *, prefix: str = "", **options) -> list[PSEmbedding]:
    """Swaps every local embedding table of `module` for one on the parameter servers.

    `luoshu.nn.Embedding` becomes `PSEmbedding` and a slot table (a module with `slot_sizes`
    and an `offsets` buffer, as `luoshu.models.SlotEmbedding`) becomes `PSSlotEmbedding`,
    named `prefix` + the module's dotted path, with the same shape; the server initialises
    the rows with the local layer's distribution (normal with std 1 for `nn.Embedding`,
    0.01 for slot tables) unless `init` says otherwise (`options` pass on to the new
    embeddings: `optimizer`, `init`, `sync_workers`, `scale`, cache options). Returns the
    new embeddings (already placed in `module`).
    """
    created = []
    for path, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, PSEmbedding):
                continue
            full = f"{path}.{child_name}" if path else child_name
            if hasattr(child, "slot_sizes") and "offsets" in child._buffers:
                new = PSSlotEmbedding(client, prefix + full, child.slot_sizes, child.weight.shape[1], **options)
            elif isinstance(child, LocalEmbedding):
                if child.padding_idx is not None:
                    raise Error(f"replace_embeddings: {full} has padding_idx={child.padding_idx}; a parameter-"
                                "server table has no padding row")
                new = PSEmbedding(client, prefix + full, child.embedding_dim, child.num_embeddings,
                                **{"id_policy": "refuse", "init": ("normal", 0.0, 1.0), **options})
            else:
                continue
            setattr(parent, child_name, new)
            created.append(new)
    return created
