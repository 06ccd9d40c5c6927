"""Checkpoints across layouts: a tensor-parallel job saves full tensors; a job of any layout loads them and reshards.

`save(path, model, optimizer, mesh)` all-gathers every split parameter and its optimizer
state over the TP group and writes the regular luoshu package (`luoshu.save`) from rank
0: full tensors, so the checkpoint does not depend on the layout it came from and loads
into one process with plain `luoshu.load`. `load(path, model, optimizer)` verifies and
reads the package into full-size buffers, then keeps this rank's block of every split
parameter and state (the split comes from the parameters' own states, i.e. the layout
of the job that loads). Call it on every rank, after `parallelize`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from luoshu.checkpoint import load as load_package
from luoshu.checkpoint import save as save_package
from luoshu.compiler import states
from luoshu.core import context
from luoshu.core.op import apply
from luoshu.core.tensor import Tensor
from luoshu.distributed import env
from luoshu.nn.module import Module
from luoshu.optim.optimizer import Optimizer


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


@contextmanager
def _full_tensors(model: Module, optimizer: Optimizer | None, group: tuple) -> Iterator[None]:
    """Every split parameter (and its optimizer state) as its full value while inside."""
    params = [p for p in model.parameters() if _split(p) is not None]
    states = _state_of(optimizer, params)
    restore = []
    try:
        for p, st in zip(params, states + [None] * (len(params) - len(states))):
            dim, _ = _split(p)
            restore.append((p, "_value", p._value))
            p._value = _gather(p._value, dim, group)
            if st is not None:
                for name in sorted(k for k in st if k != "step"):
                    restore.append((st, name, st[name]))
                    st[name] = _gather(st[name], dim, group)
        yield
    finally:
        for holder, name, value in reversed(restore):
            if isinstance(holder, dict):
                holder[name] = value
            else:
                setattr(holder, name, value)


def save(path, model: Module, optimizer: Optimizer | None = None, mesh=None, metadata: dict | None = None):
    """Writes the full-tensor package of a (tensor-)parallel `model` from rank 0 (collective)."""
    group = mesh.group("tp").ranks if mesh is not None else (0,)
    with _full_tensors(model, optimizer, group):
        if env.rank() == 0:
            meta = dict(metadata or {})
            if mesh is not None:
                meta["saved_from"] = {"dp": mesh.dp, "tp": mesh.tp, "pp": mesh.pp}
            save_package(path, model, optimizer, meta)
    env.barrier()


def load(path, model: Module, optimizer: Optimizer | None = None) -> dict:
    """Loads a full-tensor package into a model of any layout: this rank keeps its blocks."""
    params = [p for p in model.parameters() if _split(p) is not None]
    local = [p._value for p in params]
    for p in params:  # full-size buffers for the package to verify and copy into
        p._value = torch.empty(p.shape, dtype=p._value.dtype, device=p._value.device)
    try:
        meta = load_package(path, model, optimizer)
    except BaseException:
        for p, v in zip(params, local):
            p._value = v
        raise
    opt_states = _state_of(optimizer, params)
    strategy = states.default()
    index = strategy.index if strategy is not None else 0
    for p, st in zip(params, opt_states + [None] * (len(params) - len(opt_states))):
        dim, size = _split(p)
        p._value = _block(p._value, dim, size, index)
        if st is not None:
            for name in [k for k in st if k != "step"]:
                st[name] = _block(st[name], dim, size, index)
    return meta


__all__ = ["load", "save"]
