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
CTR models' slot tables (row-wise). The DP axis of the mesh averages gradients with the
bucketed all-reduce pass.

Data: ranks of one TP group feed the same rows; `mesh.batch_slice(global_batch)` gives a
rank's rows. Build the model with the same seed everywhere (or let `parallelize`
broadcast rank 0's values first) and create the optimizer after `parallelize`.
"""

from __future__ import annotations

import fnmatch

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
) -> TensorParallel:
    """Splits `model`'s parameters over `mesh`'s TP axis by `plan` (default `MEGATRON_PLAN`) and
    makes define-and-run graphs that read them compile to this rank's tensor-parallel plan.

    Every check runs before any parameter changes. Returns a `TensorParallel`.
    """
    if not isinstance(model, Module):
        raise Error(f"parallelize: expected a luoshu.nn.Module, found {type(model).__name__}")
    mesh = _check_mesh(mesh)
    plan = MEGATRON_PLAN if plan is None else dict(plan)
    for pattern, layout in plan.items():
        if layout not in (COLWISE, ROWWISE, ROWS):
            raise Error(
                f"parallelize: plan entry {pattern!r} has layout {layout!r}; the layouts are {(COLWISE, ROWWISE, ROWS)}"
            )
    tp = mesh.tp
    todo: list[tuple[str, Tensor, int | None]] = []
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


def gather_parameters(model: Module, mesh: DeviceMesh) -> dict[str, torch.Tensor]:
    """Every parameter's full value (split ones all-gathered over the TP group), by name."""
    out = {}
    for name, p in model.named_parameters():
        value = p._value
        if p.ds and not p.ds[0].is_pure_duplicate():
            dim = next(iter(p.ds[0].states))
            with context.no_grad():
                moved = value.movedim(dim, 0).contiguous()
                gathered = apply("all_gather", Tensor.from_value(moved), group=mesh.group("tp").ranks).value
                value = gathered.movedim(0, dim)
        out[name] = value.clone()
    return out


__all__ = ["COLWISE", "MEGATRON_PLAN", "ROWS", "ROWWISE", "TensorParallel", "gather_parameters", "parallelize"]
