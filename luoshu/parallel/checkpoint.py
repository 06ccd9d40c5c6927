"""Checkpoints across layouts: the `luoshu.checkpoint` layout hook that makes `ls.save` / `ls.load` of a sharded job
write and read full tensors.

Installed at import of `luoshu.parallel`, so plain `ls.save(path, model, optimizer)` and
`ls.load(path, model, optimizer)` handle a sharded job:

- tensor parallel (`parallelize`: parameters with split states): `ls.save` all-gathers every
  split parameter and its optimizer state over the TP group, and rank 0 writes the regular
  package — full tensors, so the checkpoint does not depend on the layout it came from and
  loads into one process; `ls.load` reads the full package into full-size buffers on every
  rank, then keeps this rank's block of every split parameter and state (the split comes from
  the parameters' own states: the layout of the job that loads).
- ZeRO (`DataParallel(..., zero=...)`, its optimizer reached as `dp.sync`): `ls.save` writes
  the optimizer state of `dp.sync.consolidated_state_dict()` (the plain optimizer's layout;
  under tensor parallelism then gathered over the TP group like the parameters) from rank 0;
  `ls.load` gives the plain state to `dp.sync.load_state_dict` (under tensor parallelism: this
  rank's blocks of it). Under ZeRO-3 both
  run inside `dp.sync.gathered_parameters()`, so the parameters are written and read whole. A
  ZeRO checkpoint loads into a plain run and a plain one into ZeRO.

- pipeline (`pipeline(...)`, compiled): each rank trains only its stage's parameters, so
  `ls.save` first gathers the stages (`Pipeline.gather_stages`: every parameter and its
  optimizer state broadcast from the stage that trains it, over the pp group), then writes
  as above (with TP inside the stages, the TP gather follows); `ls.load` reads the full
  package on every rank (each rank then trains its stage's part). A pipeline checkpoint loads
  into one process, and one process's into a pipeline of any pp (or pp x tp). Under ZeRO
  (`pipeline(..., zero=1 | 2 | 3)`) each stage's shard state is first consolidated over its DP
  group (ZeRO-3: the stage's parameters gathered over it while they are written or read);
  `ls.load` gives the plain state to the ZeRO mode, whose shards take their slices.

All these `save`s are collectives: call them on every rank. A job with none of them (plain
data parallelism) saves as before, from whichever rank calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as torch_dist

from luoshu import checkpoint as package
from luoshu.compiler import states
from luoshu.core import context, live
from luoshu.core.errors import CheckpointError
from luoshu.core.op import apply
from luoshu.core.tensor import Tensor
from luoshu.distributed import env
from luoshu.nn.module import Module
from luoshu.optim.optimizer import Optimizer
from luoshu.parallel.pipeline import pipeline_of
from luoshu.parallel.tensor_parallel import original_order, placed_order, placed_tables
from luoshu.parallel.zero import ZeroSync


def _split(p: Tensor):
    """(split dim, group size) of a parameter, or None when it is whole on every rank."""
    if not p.ds or p.ds[0] is None or p.ds[0].is_pure_duplicate():
        return None
    return next(iter(p.ds[0].states)), p.ds[0].device_num


def _gather(value: torch.Tensor, dim: int, group: tuple) -> torch.Tensor:
    with context.no_grad():
        moved = Tensor.from_value(value.movedim(dim, 0).contiguous())
        return apply("all_gather", moved, group=group).value.movedim(0, dim).contiguous()


def _block(value: torch.Tensor, dim: int, size: int, index: int) -> torch.Tensor:
    return value.chunk(size, dim)[index].contiguous().clone()


def _state_of(optimizer: Optimizer | None, params: list) -> list:
    if optimizer is None:
        return []
    index = {id(p): i for i, p in enumerate(optimizer.parameters())}
    return [(optimizer._state[index[id(p)]] if id(p) in index else None) for p in params]


def _split_parameters(model: Module) -> list:
    return [p for p in model.parameters() if _split(p) is not None]


def _zero_of(optimizer) -> ZeroSync | None:
    """The live ZeRO sync mode that shards `optimizer`'s state, if any."""
    if optimizer is None:
        return None
    return next((s for s in live.alive() if isinstance(s, ZeroSync) and s.dp.optimizer is optimizer), None)


def _distributed_pipeline(module, optimizer):
    """The compiled pipeline of more than one stage that trains `module`, if any."""
    pipe = pipeline_of(module, optimizer) if isinstance(module, Module) else None
    return pipe if pipe is not None and pipe.stages > 1 and env.is_distributed() else None


def _tp_group() -> tuple:
    strategy = states.default()
    return tuple(strategy.group) if strategy is not None else (0,)


def _placed(model: Module) -> dict:
    """id(weight) -> (its table module, original row of each placed row, original offsets, original shape)."""
    return {id(w): (m, rows, offsets, shape) for m, w, rows, offsets, shape in placed_tables(model)}


def _full_state_dict(state_dict: dict, optimizer: Optimizer, model: Module, group: tuple) -> dict:
    """An optimizer `state_dict()` of this rank's TP blocks (ZeRO's consolidated one) with every
    split parameter's state all-gathered over `group` (a table-wise table's in its original order)."""
    index = {id(p): i for i, p in enumerate(optimizer.parameters())}
    placed = _placed(model)
    tensors = dict(state_dict["tensors"])
    for p in _split_parameters(model):
        entry = state_dict["meta"]["state"].get(str(index.get(id(p), -1)))
        dim, _ = _split(p)
        for name in (entry or {}).get("tensors", []):
            key = f"state.{index[id(p)]}.{name}"
            value = _gather(tensors[key], dim, group)
            table = placed.get(id(p))
            tensors[key] = value if table is None else original_order(value, table[1], table[3])
    return {"tensors": tensors, "meta": state_dict["meta"]}


@contextmanager
def _full_tensors(model: Module, optimizer: Optimizer | None, group: tuple) -> Iterator[None]:
    """Every split parameter (and its optimizer state) as its full value while inside; a table-wise
    table in its original row order, shape and slot offsets."""
    params = _split_parameters(model)
    states_ = _state_of(optimizer, params)
    placed = _placed(model)
    restore = []
    try:
        for p, st in zip(params, states_ + [None] * (len(params) - len(states_))):
            dim, _ = _split(p)
            table = placed.get(id(p))

            def full(value, dim=dim, table=table):
                value = _gather(value, dim, group)
                return value if table is None else original_order(value, table[1], table[3])

            restore.append((p, "_value", p._value))
            p._value = full(p._value)
            if table is not None:
                offsets = table[0]._buffers["offsets"]
                restore += [(p, "shape", p.shape), (offsets, "_value", offsets._value)]
                p.shape, offsets._value = tuple(table[3]), table[2].clone()
            if st is not None:
                for name in sorted(k for k in st if k != "step"):
                    restore.append((st, name, st[name]))
                    st[name] = full(st[name])
        yield
    finally:
        for holder, name, value in reversed(restore):
            if isinstance(holder, dict):
                holder[name] = value
            else:
                setattr(holder, name, value)


class _ShardedLayouts(package.LayoutHook):
    """The layout hook of tensor parallelism, ZeRO and pipelines (see the module docstring)."""

    def applies(self, module, optimizer) -> bool:
        return (
            (isinstance(module, Module) and bool(_split_parameters(module)))
            or _zero_of(optimizer) is not None
            or _distributed_pipeline(module, optimizer) is not None
        )

    def save(self, path, module, optimizer, metadata, group: tuple | None = None) -> Path | None:
        pipe = _distributed_pipeline(module, optimizer)
        whole_state = None
        zero = _zero_of(optimizer)
        group = _tp_group() if group is None else group
        whole = zero.gathered_parameters() if zero is not None else contextlib.nullcontext()  # ZeRO-3's shards
        with whole:
            if pipe is not None:  # every rank holds the whole model (its TP blocks) and its optimizer state
                # (ZeRO: each stage's shards consolidated over its DP group, then gathered over the stages)
                whole_state = pipe.gather_stages(with_state=optimizer is not None and optimizer is pipe.optimizer)
            # every rank takes part in the gathers; one writes. ZeRO's state is consolidated over the
            # DP group first (this rank's TP blocks), then gathered over the TP group.
            opt_state = None
            if zero is not None:
                consolidated = whole_state if whole_state is not None else zero.consolidated_state_dict()
                opt_state = _full_state_dict(consolidated, optimizer, module, group)
            with _full_tensors(module, optimizer if zero is None else None, group):
                written = _written_by_rank0(path, lambda: package.save_full(path, module, optimizer, metadata,
                                                                            opt_state))
        return written

    def load(self, path, module, optimizer) -> dict:
        zero = _zero_of(optimizer)
        if zero is not None:  # ZeRO-3: load into whole parameters; each rank keeps its shard after
            with zero.gathered_parameters():
                return self._load(path, module, optimizer, zero)
        return self._load(path, module, optimizer, None)

    def _load(self, path, module, optimizer, zero) -> dict:
        params = _split_parameters(module)
        placed = _placed(module)
        local = [(p._value, p.shape) for p in params]
        offsets = {
            id(p): (t[0]._buffers["offsets"], t[0]._buffers["offsets"]._value)
            for p in params
            if (t := placed.get(id(p))) is not None
        }
        for p in params:  # full-size buffers (a table-wise table: its original shape) to verify and copy into
            if id(p) in placed:
                p.shape = tuple(placed[id(p)][3])
            p._value = torch.empty(p.shape, dtype=p._value.dtype, device=p._value.device)
        # ZeRO under TP: the model's optimizer takes the full state first, cut to this rank's blocks
        # below, and ZeRO then takes those (a plain state dict of this layout) for its shards
        tp_zero = zero is not None and bool(params)
        load_state = None if zero is None else optimizer.load_state_dict if tp_zero else zero.load_state_dict
        pipe = _distributed_pipeline(module, optimizer)
        if pipe is not None and optimizer is pipe.optimizer:  # a stage keeps its own parameters' state only
            load_state = _own_stage_state(optimizer, load_state or optimizer.load_state_dict, set(pipe.param_index))
        try:
            meta = package.load_full(path, module, optimizer, load_state)
        except BaseException:
            for p, (v, shape) in zip(params, local):
                p._value, p.shape = v, shape
            raise
        finally:
            for buffer, placed_offsets in offsets.values():  # the file holds the original order's offsets
                buffer._value = placed_offsets
        opt_states = _state_of(optimizer, params)
        strategy = states.default()
        index = strategy.index if strategy is not None else 0
        for p, st, (local_value, shape) in zip(params, opt_states + [None] * (len(params) - len(opt_states)), local):
            dim, size = _split(p)
            table = placed.get(id(p))

            def mine(value, dim=dim, size=size, table=table):
                if table is not None:
                    value = placed_order(value, table[1])
                return _block(value, dim, size, index)

            # into the rank's own storage: under ZeRO-1/2 a parameter views the shards' flat buffer
            block = mine(p._value)
            p._value, p.shape = local_value.copy_(block), shape
            if st is not None:
                for name in [k for k in st if k != "step"]:
                    st[name] = mine(st[name])
        if tp_zero:
            zero.load_state_dict(optimizer.state_dict())
        return meta


def _written_by_rank0(path, write) -> Path | None:
    """Rank 0 runs `write` (the package's own staged write: a failure keeps what `path` held), then every
    rank learns whether it succeeded (a collective): on a failure every rank raises, not only rank 0
    (whose peers would otherwise go on, or wait at the next collective, as if it were saved)."""
    written, failure = None, None
    if env.rank() == 0:
        try:
            written = write()
        except Exception as exc:  # re-raised below, after the peers have been told
            failure = exc
    if env.is_distributed():
        failed = torch.tensor([failure is not None], dtype=torch.int64)
        torch_dist.broadcast(failed, src=0)
        if failure is None and bool(failed.item()):
            raise CheckpointError(f"checkpoint {path}: writing it failed on rank 0 (see its error); "
                                          "what the path held before is kept")
    if failure is not None:
        raise failure
    return written


def _own_stage_state(optimizer: Optimizer, load_state, owned: set):
    """`load_state` given only the state of `optimizer`'s parameters `owned` (a pipeline stage's:
    the other stages' state would sit unused in this rank's memory), once the whole state checks."""

    def load(state_dict: dict) -> None:
        optimizer._check_state_dict(state_dict)  # all of it, before any is dropped
        meta = state_dict["meta"]
        kept = {k: v for k, v in meta["state"].items() if int(k) in owned}
        tensors = {f"state.{k}.{name}": state_dict["tensors"][f"state.{k}.{name}"]
                   for k, entry in kept.items() for name in entry["tensors"]}
        load_state({"tensors": tensors, "meta": {**meta, "state": kept}})

    return load


_HOOK = _ShardedLayouts()
package.set_layout_hook(_HOOK)


def save(path, model: Module, optimizer: Optimizer | None = None, mesh=None, metadata: dict | None = None):
    """`ls.save` of a sharded job with the mesh it ran on recorded in the metadata (collective)."""
    meta = dict(metadata or {})
    if mesh is not None:
        meta["saved_from"] = {"dp": mesh.dp, "tp": mesh.tp, "pp": mesh.pp}
    if _HOOK.applies(model, optimizer):
        _HOOK.save(path, model, optimizer, meta, mesh.group("tp").ranks if mesh is not None else None)
    else:
        _written_by_rank0(path, lambda: package.save_full(path, model, optimizer, meta))


def load(path, model: Module, optimizer: Optimizer | None = None) -> dict:
    """`ls.load`: loads a full-tensor package into a model of any layout; this rank keeps its blocks."""
    return package.load(path, model, optimizer)


__all__ = ["load", "save"]
