"""HugeCTR's `SparseEmbedding` on a luoshu table: keys → rows (slot offsets or a growing hash
index), and one vector per slot by sum or mean over the slot's keys.

With `slot_size_array` known, slot s's key k is row `offset[s] + k`, as HugeCTR offsets
Parquet keys. Without it (Norm / Raw data with global keys), rows are handed out on first
touch by a sorted, vectorised key index with the capacity HugeCTR derives from
`workspace_size_per_gpu_in_mb` (or `max_vocabulary_size_per_gpu`). The last row is padding:
always zero, used for missing keys and the unused places of short multi-hot slots.

Lookups: one key per slot uses `embedding`, several use `embedding_bag` (sum / mean,
padding ignored); the gradient is an IndexedSlices, so the optimizer touches only the rows
seen (HugeCTR's Local / LazyGlobal updates). Under `Update_t.Global` the model hands the same
IndexedSlices to the optimizer as a global update (kind "g"): every row's optimizer state
moves each step, as HugeCTR's global update does, without a table-sized gradient per step.
(A table sharded over processes still gathers with `index_select`, whose gradient is dense.)
"""

from __future__ import annotations

import numpy as np
import torch

from luoshu import ops
from luoshu.core.autodiff import gradients
from luoshu.ctr.config import CTRError, DataReaderSparseParam, Optimizer_t, SparseEmbedding
from luoshu.nn import functional as F
from luoshu.nn.layers import SlotLayout, empty_parameter
from luoshu.nn.module import Module
from luoshu.ops import comm
from luoshu.ps import PSEmbedding
from luoshu.ps.protocol import initial_rows

# Every placement starts a table from the same rows: a pure function of (table name, seed, row),
# which the parameter servers compute too (luoshu.ps.initial_rows).
INITIALIZER = ("uniform", -0.05, 0.05)


def initial_table(name: str, rows: int, dim: int, seed: int) -> np.ndarray:
    return initial_rows(f"ctr/{name}", np.arange(rows, dtype=np.int64), dim, INITIALIZER, seed=seed)


def vocabulary_capacity(spec: SparseEmbedding) -> int:
    """Rows of a hash table: `max_vocabulary_size_per_gpu`, else the workspace over the vector size."""
    if spec.max_vocabulary_size_per_gpu:
        return int(spec.max_vocabulary_size_per_gpu)
    rows = int(spec.workspace_size_per_gpu_in_mb * (1 << 20) // (4 * max(spec.embedding_vec_size, 1)))
    if rows < 1:
        raise CTRError(f"SparseEmbedding {spec.sparse_embedding_name!r} workspace_size_per_gpu_in_mb: without a "
                       f"slot_size_array the table needs a workspace (or max_vocabulary_size_per_gpu), found "
                       f"{spec.workspace_size_per_gpu_in_mb}")
    return rows


class SparseEmbeddingTable(Module):
    """One embedding table: `emb_vector` (rows + 1 padding row, vec_size) and, for hash tables,
    `key` (the key stored in each row, -1 where free)."""

    def __init__(self, spec: SparseEmbedding, sparse: DataReaderSparseParam, slot_sizes: list[int] | None,
                 global_update: bool = False, seed: int = 0):
        super().__init__()
        self.name, self.combiner = spec.sparse_embedding_name, spec.combiner
        self.vec_size, self.num_slots, self.hotness = spec.embedding_vec_size, sparse.slot_num, sparse.max_nnz
        self.global_update = global_update
        self.slot_sizes = list(slot_sizes) if slot_sizes else None
        if self.slot_sizes is not None:
            layout = SlotLayout(self.slot_sizes, f"SparseEmbedding {self.name!r}")
            self.rows, self.offsets = layout.num_rows, layout.offsets
        else:
            self.rows = vocabulary_capacity(spec)
            self.register_buffer("key", np.full(self.rows, -1, dtype=np.int64))
        self.emb_vector = empty_parameter((self.rows + 1, self.vec_size))
        with torch.no_grad():
            self.emb_vector.value[:self.rows].copy_(torch.from_numpy(initial_table(self.name, self.rows,
                                                                                  self.vec_size, seed)))
            self.emb_vector.value[self.rows].zero_()
        self._sorted_keys: np.ndarray | None = None
        self._sorted_rows: np.ndarray | None = None
        self._count = 0

    @property
    def pad(self) -> int:
        return self.rows

    # --- keys → rows ------------------------------------------------------------------
    def reset_index(self) -> None:
        """Rebuilds the hash index from `key` (after loading weights)."""
        if self.slot_sizes is not None:
            return
        keys = self.key.value.cpu().numpy()
        used = np.flatnonzero(keys >= 0)
        order = np.argsort(keys[used], kind="stable")
        self._sorted_keys, self._sorted_rows = keys[used][order], used[order]
        self._count = int(used.max()) + 1 if used.size else 0

    def rows_of(self, keys: np.ndarray, insert: bool) -> np.ndarray:
        """Row of every key of a (batch, slots, hotness) array (-1 = padding → the padding row);
        with `insert`, unseen keys of a hash table get fresh rows, else the padding row."""
        if self.slot_sizes is not None:
            present = keys >= 0
            sizes = np.asarray(self.slot_sizes)[None, :, None]
            bad = present & (keys >= sizes)
            if bad.any():
                b, s, _ = np.argwhere(bad)[0]
                raise CTRError(f"SparseEmbedding {self.name!r}: slot {s} holds key {keys[b, s].max()}, beyond its "
                               f"slot_size_array entry {self.slot_sizes[s]}")
            return np.where(present, keys + self.offsets[None, :, None], self.pad)
        if self._sorted_keys is None:
            self.reset_index()
        flat = keys.reshape(-1)
        valid = flat >= 0
        uniq, inverse = np.unique(flat[valid], return_inverse=True)
        pos = np.searchsorted(self._sorted_keys, uniq)
        clipped = np.minimum(pos, max(len(self._sorted_keys) - 1, 0))
        found = (pos < len(self._sorted_keys)) & (self._sorted_keys[clipped] == uniq) if len(self._sorted_keys) \
            else np.zeros(len(uniq), bool)
        rows_u = np.where(found, self._sorted_rows[clipped] if len(self._sorted_rows) else 0, self.pad)
        new = ~found
        if insert and new.any():
            count = int(new.sum())
            if self._count + count > self.rows:
                raise CTRError(f"SparseEmbedding {self.name!r}: {self._count + count} distinct keys exceed the "
                               f"table's {self.rows} rows; raise workspace_size_per_gpu_in_mb or give "
                               f"slot_size_array")
            fresh = np.arange(self._count, self._count + count, dtype=np.int64)
            key = self.key.value  # on the model's device; written through torch, not a NumPy view
            key[torch.from_numpy(fresh).to(key.device)] = torch.from_numpy(uniq[new]).to(key.device)
            rows_u[new] = fresh
            self._sorted_keys = np.insert(self._sorted_keys, pos[new], uniq[new])
            self._sorted_rows = np.insert(self._sorted_rows, pos[new], fresh)
            self._count += count
        out = np.full(flat.shape, self.pad, dtype=np.int64)
        out[valid] = rows_u[inverse]
        return out.reshape(keys.shape)

    # --- lookup -------------------------------------------------------------------------
    def forward(self, rows):
        """(batch, slots, hotness) int64 rows → (batch, slots, vec_size)."""
        S, k, d = self.num_slots, self.hotness, self.vec_size
        w = self.emb_vector
        if k == 1:
            return F.embedding(ops.reshape(rows, (-1, S)), w, padding_idx=self.pad)
        bags = F.embedding_bag(ops.reshape(rows, (-1, k)), w, mode=self.combiner, padding_idx=self.pad)
        return ops.reshape(bags, (-1, S, d))

    def extra_repr(self) -> str:
        kind = "slot offsets" if self.slot_sizes is not None else "hash"
        return f"{self.name}: rows={self.rows}, vec={self.vec_size}, slots={self.num_slots}, {kind}, {self.combiner}"


class ShardedTable(SparseEmbeddingTable):
    """One rank's part of a table split over the workers of a multi-process job.

    `placement="distributed"` (DistributedSlotSparseEmbeddingHash): row g lives on rank g % W.
    `placement="localized"` (LocalizedSlotSparseEmbeddingHash): slot s lives whole on rank s % W.
    Every rank draws the full table from the shared seed and keeps its rows, so the job starts
    from the rows one process would. A lookup sends each key to its owner (all-to-all of equal
    blocks: one slot per key of the batch per rank, padding where another rank owns it), the
    owners gather their rows and send them back (the dual all-to-all, whose gradient carries
    the row gradients to the owners), and the vectors are combined per slot as before.
    """

    def __init__(self, spec: SparseEmbedding, sparse: DataReaderSparseParam, slot_sizes: list[int] | None,
                 global_update: bool, world: int, rank: int, placement: str, seed: int = 0):
        if not slot_sizes:
            raise CTRError(f"SparseEmbedding {spec.sparse_embedding_name!r}: a {placement} table over {world} "
                           f"processes needs the slots' sizes (DataReaderParams or SparseEmbedding slot_size_array)")
        super().__init__(spec, sparse, slot_sizes, global_update, seed)
        self.world, self.rank, self.placement = world, rank, placement
        rows = np.arange(self.rows)
        if placement == "distributed":
            self.owner = (rows % world).astype(np.int64)
        else:
            slot_of_row = np.repeat(np.arange(len(self.slot_sizes)), self.slot_sizes)
            self.owner = (slot_of_row % world).astype(np.int64)
        self.local = np.zeros(self.rows, dtype=np.int64)
        self.shard_rows = []
        for r in range(world):
            mine = np.flatnonzero(self.owner == r)
            self.local[mine] = np.arange(len(mine))
            self.shard_rows.append(mine)
        full = self.emb_vector.value
        mine = torch.from_numpy(self.shard_rows[rank])
        shard = torch.cat([full[mine], torch.zeros(1, self.vec_size, dtype=full.dtype)])
        self.emb_vector = empty_parameter(tuple(shard.shape))
        with torch.no_grad():
            self.emb_vector.value.copy_(shard)
        self.local_pad = len(self.shard_rows[rank])

    def route(self, rows: np.ndarray) -> np.ndarray:
        """For each rank, the local row it must look up for each key of this batch (padding elsewhere)."""
        flat = rows.reshape(-1)
        valid = flat != self.pad
        owners = np.where(valid, self.owner[np.minimum(flat, self.rows - 1)], -1)
        locals_ = np.where(valid, self.local[np.minimum(flat, self.rows - 1)], 0)
        pads = [len(s) for s in self.shard_rows]
        send = np.empty((self.world, flat.size), dtype=np.int64)
        for r in range(self.world):
            send[r] = np.where(owners == r, locals_, pads[r])
        return send.reshape(-1)

    def forward(self, rows, send=None):
        S, k, d = self.num_slots, self.hotness, self.vec_size
        requests = comm.all_to_all(send)
        if self.global_update:
            vectors = ops.index_select(self.emb_vector, 0, requests)
            vectors = vectors * ops.unsqueeze(ops.cast(ops.not_equal(requests, self.local_pad), "float32"), 1)
        else:
            vectors = F.embedding(requests, self.emb_vector, padding_idx=self.local_pad)
        answers = comm.all_to_all(vectors)  # block r: rank r's rows for this rank's keys
        gathered = ops.sum(ops.reshape(answers, (self.world, -1, d)), axis=0)
        per_key = ops.reshape(gathered, (-1, S, k, d))
        if k == 1:
            return ops.reshape(per_key, (-1, S, d))
        out = ops.sum(per_key, axis=2)
        if self.combiner == "mean":
            present = ops.cast(ops.not_equal(rows, self.pad), "float32")
            out = out / ops.clamp(ops.unsqueeze(ops.sum(present, axis=2), 2), min=1.0)
        return out

    def full_table(self) -> np.ndarray:
        """The whole table (rows + padding row), gathered from every rank (a collective call)."""
        import torch.distributed as torch_dist

        longest = max(len(s) for s in self.shard_rows)
        mine = self.emb_vector.value[:-1]
        padded = torch.zeros(longest, self.vec_size, dtype=mine.dtype)
        padded[:len(mine)] = mine
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch_dist.all_gather(parts, padded)
        full = np.zeros((self.rows + 1, self.vec_size), dtype=np.float32)
        for r, rows in enumerate(self.shard_rows):
            full[rows] = parts[r][:len(rows)].cpu().numpy()
        return full

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.placement} over {self.world} ranks (rank {self.rank}: " \
               f"{self.local_pad} rows)"


def ps_optimizer_spec(opt, lr: float) -> tuple[str, dict]:
    """The server-side optimizer (luoshu.ps) an `OptParamsPy` describes."""
    t, lr = opt.optimizer_type, opt.lr if opt.lr is not None else lr
    if t is Optimizer_t.Adam:
        return "adam", {"lr": lr, "betas": [opt.beta1, opt.beta2], "eps": opt.epsilon}
    if t is Optimizer_t.AdaGrad:
        return "adagrad", {"lr": lr, "initial_accumulator_value": opt.initial_accu_value, "eps": opt.epsilon}
    if t is Optimizer_t.Nesterov:
        return "nesterov", {"lr": lr, "momentum": opt.momentum_factor}
    if t is Optimizer_t.MomentumSGD and opt.momentum_factor:
        return "momentum", {"lr": lr, "momentum": opt.momentum_factor}
    return "sgd", {"lr": lr}


class PSTable(Module):
    """An embedding table on the parameter servers (luoshu.ps), read through the HET cache.

    Rows are the same global rows as a local table's (slot offsets applied), created on the
    servers with the same seeded initial values; the padding row exists there too but every
    lookup of it is masked to zero, so it never gets a gradient. The gradient is pushed by a
    `ps_push` op and the server applies the table's optimizer (synchronous over the workers).
    """

    def __init__(self, spec: SparseEmbedding, sparse: DataReaderSparseParam, slot_sizes: list[int] | None,
                 client, optimizer: tuple, world: int, seed: int, staleness: int = 0, cache_capacity: int = 0):
        super().__init__()
        if not slot_sizes:
            raise CTRError(f"SparseEmbedding {spec.sparse_embedding_name!r}: a parameter-server table needs the "
                           f"slots' sizes (slot_size_array)")
        self.name, self.combiner = spec.sparse_embedding_name, spec.combiner
        self.vec_size, self.num_slots, self.hotness = spec.embedding_vec_size, sparse.slot_num, sparse.max_nnz
        self.slot_sizes = list(slot_sizes)
        self.rows = int(sum(self.slot_sizes))
        self.offsets = SlotLayout(self.slot_sizes, f"SparseEmbedding {self.name!r}").offsets
        self.remote = PSEmbedding(client, f"ctr/{self.name}", self.vec_size, num_embeddings=self.rows + 1,
                                init=INITIALIZER, optimizer=optimizer, id_policy="refuse",
                                sync_workers=world if world > 1 else None, cache_capacity=cache_capacity,
                                staleness=staleness, seed=seed)

    @property
    def pad(self) -> int:
        return self.rows

    rows_of = SparseEmbeddingTable.rows_of

    def forward(self, rows):
        S, k, d = self.num_slots, self.hotness, self.vec_size
        looked = ops.reshape(self.remote(ops.reshape(rows, (-1,))), (-1, S, k, d))
        mask = ops.unsqueeze(ops.cast(ops.not_equal(rows, self.pad), "float32"), 3)
        out = ops.sum(looked * mask, axis=2)
        if self.combiner == "mean" and k > 1:
            out = out / ops.clamp(ops.sum(mask, axis=2), min=1.0)
        return out

    def push_op(self, loss_target):
        """The op that pushes this table's gradient of `loss_target` (one per training step)."""
        return self.remote.push_op(gradients(loss_target, [self.remote.weight])[0])

    def full_table(self) -> np.ndarray:
        """Every row (and the padding row) as the servers hold them now."""
        self.remote.flush()
        rows, _ = self.remote.client.pull(self.remote.table, np.arange(self.rows + 1))
        return np.asarray(rows)

    def extra_repr(self) -> str:
        return f"{self.name}: rows={self.rows}, vec={self.vec_size}, slots={self.num_slots}, on the parameter servers"
