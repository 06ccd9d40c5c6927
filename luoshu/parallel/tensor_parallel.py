"""`parallelize`: tensor (and sequence) parallelism by annotating a model's parameter states.

`parallelize(model, mesh)` applies Megatron-LM's layout to a model without changing its
code: it walks the modules, splits the parameters of the layers a plan names
(column-wise, row-wise, vocabulary/row-wise tables) over the mesh's TP axis, and
installs the `Strategy` under which the compiler's states pass turns every
define-and-run graph that reads those parameters into this rank's local graph; the
collectives come from the states (two all-reduces per transformer block forward, their
duals backward; with `sequence_parallel`, all-gathers and reduce-scatters instead).

The default plan (`MEGATRON_PLAN`) matches the zoo's module names: GPT-2 (c_fc / c_proj,
tied wte), LLaMA (gate/up/down_proj, lm_head, embed_tokens), BERT (intermediate /
output, word_embeddings, the tied MLM decoder's bias), their attention (q/k/v_proj
column-wise, heads split; o_proj row-wise; grouped-query kv heads split too) and the
CTR models' slot tables (row-wise; `tables="table"` places each slot's table whole on one rank
of the TP group instead, balanced by size). The DP axis of the mesh averages gradients with the
bucketed all-reduce pass.

Table-wise placement: a `SlotEmbedding` (DLRM, DCN, ... keep every slot in one table) gets its
slots assigned to the TP ranks, largest first onto the least-loaded rank; its rows are
reordered so that each rank's slots are contiguous, padded to the largest rank's rows, and the
table is split row-wise into those blocks: rank r holds exactly its slots' tables, whole. The
slot offsets follow the new order. A lookup then reads each slot on its owner only (the
others contribute zeros) and the states pass moves the outputs to where they are needed (the
all-reduce of the partial lookup). `gather_parameters` and the checkpoints give the table in
its original row order and shape.

Data: ranks of one TP group feed the same rows; `mesh.batch_slice(global_batch)` gives a
rank's rows. Build the model with the same seed everywhere (or let `parallelize`
broadcast rank 0's values first) and create the optimizer after `parallelize`.
"""

from __future__ import annotations

import fnmatch
import weakref

import torch

from luoshu.compiler import states
from luoshu.core import context
from luoshu.core.dstates import DStates
from luoshu.core.errors import Error
from luoshu.core.op import apply
from luoshu.core.tensor import Tensor
from luoshu.distributed import env
from luoshu.distributed.mesh import DeviceMesh
from luoshu.nn.module import Module
from luoshu.nn.parallel_layers import ShardingError, shard_parameter

COLWISE, ROWWISE, ROWS = "colwise", "rowwise", "rows"
TABLE_PLACEMENTS = ("row", "table")

# slot table module -> (original row of each placed row, -1 for padding; the original offsets):
# what turns a table-wise table back into its original order (gather_parameters, checkpoints)
_PLACED_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# module-name pattern (the last name component) -> layout. colwise: a Linear's weight and
# bias split on out; rowwise: its weight split on in; rows: a table (or a vocabulary-sized
# bias) split on its rows.
MEGATRON_PLAN: dict[str, str] = {
    "q_proj": COLWISE,
    "k_proj": COLWISE,
    "v_proj": COLWISE,
    "o_proj": ROWWISE,
    "c_fc": COLWISE,
    "c_proj": ROWWISE,
    "gate_proj": COLWISE,
    "up_proj": COLWISE,
    "down_proj": ROWWISE,
    "intermediate": COLWISE,
    "output": ROWWISE,
    "lm_head": COLWISE,
    "wte": ROWS,
    "embed_tokens": ROWS,
    "word_embeddings": ROWS,
    "mlm_bias": ROWS,
    "embedding": ROWS,
    "wide_embedding": ROWS,
    "first_order": ROWS,
}


class TensorParallel:
    """What `parallelize` returns: the mesh, the states-pass strategy and the split parameters."""

    def __init__(self, mesh: DeviceMesh, strategy: states.Strategy, split: dict[str, str]):
        self.mesh, self.strategy, self.split = mesh, strategy, split

    def __repr__(self) -> str:
        return (
            f"TensorParallel({self.mesh}, sequence_parallel={self.strategy.sequence_parallel}, "
            f"{len(self.split)} split parameters)"
        )

    def attach(self, graph) -> None:
        """Compiles `graph` under this strategy (graphs reading split parameters do by default)."""
        states.attach(graph, self.strategy)


def _check_mesh(mesh) -> DeviceMesh:
    if not isinstance(mesh, DeviceMesh):
        raise Error(f"parallelize: mesh must be a luoshu.distributed.DeviceMesh, found {type(mesh).__name__}")
    return mesh


def _broadcast(model: Module) -> None:
    """Every rank starts from rank 0's full values (a collective over all workers)."""
    if env.group_size(None) == 1:
        return
    with context.no_grad():
        for t in model.parameters():
            t._value.copy_(apply("broadcast", Tensor.from_value(t._value), src=0, group=()).value)


def _check_heads(name: str, module: Module, tp: int) -> None:
    for attr in ("num_heads", "num_kv_heads"):
        heads = getattr(module, attr, None)
        if isinstance(heads, int) and heads % tp:
            raise ShardingError(
                f"parallelize: {name}.{attr} = {heads} does not split over the tensor-parallel axis of size {tp}"
            )


def parallelize(
    model: Module,
    mesh: DeviceMesh,
    sequence_parallel: bool = False,
    plan: dict | None = None,
    broadcast: bool = True,
    bucket_size_mb: float = 25.0,
    tables: str = "row",
) -> TensorParallel:
    """Splits `model`'s parameters over `mesh`'s TP axis by `plan` (default `MEGATRON_PLAN`) and
    makes define-and-run graphs that read them compile to this rank's tensor-parallel plan.

    `tables`: "row" splits slot tables (CTR models) by rows, "table" places each slot's table
    whole on one rank (see the module docstring). Every check runs before any parameter
    changes. Returns a `TensorParallel`.
    """
    if not isinstance(model, Module):
        raise Error(f"parallelize: expected a luoshu.nn.Module, found {type(model).__name__}")
    mesh = _check_mesh(mesh)
    if tables not in TABLE_PLACEMENTS:
        raise Error(f"parallelize: tables must be one of {TABLE_PLACEMENTS}, found {tables!r}")
    plan = MEGATRON_PLAN if plan is None else dict(plan)
    for pattern, layout in plan.items():
        if layout not in (COLWISE, ROWWISE, ROWS):
            raise Error(
                f"parallelize: plan entry {pattern!r} has layout {layout!r}; the layouts are {(COLWISE, ROWWISE, ROWS)}"
            )
    tp = mesh.tp
    todo: list[tuple[str, Tensor, int | None]] = []
    placed: list[tuple[Module, Tensor]] = []
    for name, module in model.named_modules():
        if hasattr(module, "q_proj") and hasattr(module, "o_proj"):
            _check_heads(name or type(module).__name__, module, tp)
        leaf = name.rsplit(".", 1)[-1]
        layout = next((v for k, v in plan.items() if fnmatch.fnmatchcase(leaf, k)), None)
        own = module._parameters
        if layout is not None and "weight" in own and own["weight"] is not None:
            weight, bias = own["weight"], own.get("bias")
            if layout == COLWISE:
                todo.append((f"{name}.weight", weight, 0))
                if bias is not None:
                    todo.append((f"{name}.bias", bias, 0))
            elif layout == ROWWISE:
                todo.append((f"{name}.weight", weight, 1))
            elif tables == "table" and tp > 1 and _is_slot_table(module):
                placed.append((module, weight))
            else:
                todo.append((f"{name}.weight", weight, 0))
        for pname, p in own.items():  # plan entries naming parameters themselves (a vocabulary bias)
            if p is not None and pname != "weight" and plan.get(pname) == ROWS:
                todo.append((f"{name}.{pname}" if name else pname, p, 0))
    for full, p, dim in todo:
        if p.ds:
            raise ShardingError(f"parallelize: {full} already has distributed states {p.ds[0].states}")
        if tp > 1 and (dim >= len(p.shape) or p.shape[dim] % tp):
            raise ShardingError(
                f"parallelize: {full} dimension {dim} has size {p.shape[dim]}, which the "
                f"tensor-parallel axis of size {tp} does not divide"
            )
    if broadcast:
        _broadcast(model)
    split = {}
    names = {id(m): n for n, m in model.named_modules()}
    for module, weight in placed:  # reordered and padded: then an even row split holds whole tables
        _place_slots(module, weight, tp)
        todo.append((f"{names[id(module)]}.weight", weight, 0))
    for full, p, dim in todo:
        shard_parameter(p, dim, mesh, full)
        split[full] = f"split({dim})"
    for p in model.parameters():  # the rest is duplicated: annotated too, so graphs reading them compile here
        if not p.ds:
            p.ds = [DStates.duplicate(tp)]
    dp_group = mesh.group("dp").ranks if mesh.dp > 1 else ()
    for axis in ("tp", "dp"):  # groups are created collectively, in the same order on every rank
        if mesh.sizes[axis] > 1 and env.is_distributed():
            mesh.process_group(axis)
    strategy = states.Strategy(
        mesh.group("tp").ranks, mesh.index("tp"), bool(sequence_parallel), dp_group, max(1, int(bucket_size_mb * 2**20))
    )
    states.set_default(strategy)
    return TensorParallel(mesh, strategy, split)


def _is_slot_table(module: Module) -> bool:
    return hasattr(module, "slot_sizes") and "offsets" in module._buffers


def _place_slots(module: Module, weight: Tensor, tp: int) -> None:
    """Reorders `module`'s table so that each TP rank's slots (balanced by rows) are contiguous, padded
    to one block size; updates its slot offsets. `weight` holds the full table (before the split)."""
    sizes = list(module.slot_sizes)
    old_offsets = module._buffers["offsets"]._value.clone()
    load, owner = [0] * tp, [0] * len(sizes)
    for s in sorted(range(len(sizes)), key=lambda s: (-sizes[s], s)):  # largest first, least-loaded rank
        r = min(range(tp), key=lambda r: (load[r], r))
        owner[s], load[r] = r, load[r] + sizes[s]
    block = max(load)
    rows = torch.full((tp * block,), -1, dtype=torch.int64)
    new_offsets, filled = torch.empty_like(old_offsets), [0] * tp
    for s, size in enumerate(sizes):
        start = owner[s] * block + filled[owner[s]]
        filled[owner[s]] += size
        new_offsets[s] = start
        rows[start : start + size] = torch.arange(int(old_offsets[s]), int(old_offsets[s]) + size)
    full = weight._value
    placed = full.new_zeros((tp * block,) + tuple(full.shape[1:]))
    valid = rows >= 0
    placed[valid] = full[rows[valid]]
    weight._value, weight.shape = placed, tuple(placed.shape)
    module._buffers["offsets"]._value = new_offsets.to(old_offsets.device)
    _PLACED_TABLES[module] = (rows, old_offsets, tuple(full.shape))


def placed_tables(model: Module) -> list[tuple[Module, Tensor, torch.Tensor, torch.Tensor, tuple]]:
    """(module, weight, original row of each placed row, original offsets, original shape) of
    every table-wise table of `model`."""
    out = []
    for _, m in model.named_modules():
        if m in _PLACED_TABLES:
            rows, offsets, shape = _PLACED_TABLES[m]
            out.append((m, m._parameters["weight"], rows, offsets, shape))
    return out


def original_order(value: torch.Tensor, rows: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A placed table's full value in its original row order and shape."""
    out = value.new_empty(shape)
    valid = rows >= 0
    out[rows[valid]] = value[valid]
    return out


def placed_order(value: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """An original-order full table in the placed (reordered, padded) order."""
    out = value.new_zeros((len(rows),) + tuple(value.shape[1:]))
    valid = rows >= 0
    out[valid] = value[rows[valid]]
    return out


def gather_parameters(model: Module, mesh: DeviceMesh) -> dict[str, torch.Tensor]:
    """Every parameter's full value (split ones all-gathered over the TP group; table-wise tables in
    their original row order), by name."""
    placed = {id(w): (rows, shape) for _, w, rows, _, shape in placed_tables(model)}
    out = {}
    for name, p in model.named_parameters():
        value = p._value
        if p.ds and not p.ds[0].is_pure_duplicate():
            dim = next(iter(p.ds[0].states))
            with context.no_grad():
                moved = value.movedim(dim, 0).contiguous()
                gathered = apply("all_gather", Tensor.from_value(moved), group=mesh.group("tp").ranks).value
                value = gathered.movedim(0, dim)
        if id(p) in placed:
            value = original_order(value, *placed[id(p)])
        out[name] = value.clone()
    return out


__all__ = [
    "COLWISE",
    "MEGATRON_PLAN",
    "ROWS",
    "ROWWISE",
    "TABLE_PLACEMENTS",
    "TensorParallel",
    "gather_parameters",
    "original_order",
    "parallelize",
    "placed_order",
    "placed_tables",
]
