"""`Optimizer`: parameter groups, per-parameter state, and the one update path.

Eager `step()` and the define-and-run update op recorded by `minimize()` (`optimizer_update`,
in `luoshu/ops/update.py`) both end in `Optimizer.apply_gradients`, which takes plain torch values: a dense gradient per
parameter, or an `(indices, values)` pair for a sparse (`IndexedSlices`) one. It
unscales (with a loss scaler), clips by global norm, adds L2/L1 regularisation and
hands each parameter group to the optimizer's `_rule` as lists of tensors, so dense
updates run as multi-tensor (`torch._foreach_*` / fused) kernels. A sparse gradient is
coalesced, the touched rows of the parameter and its state are gathered, updated by
the same rule, and scattered back: untouched rows and their state never change
(TF LazyAdam / torch SparseAdam semantics; bias correction uses the table's step).
A *global* sparse gradient (`(indices, values, GLOBAL)`, update kind "g", HugeCTR's
`Update_t.Global`) updates every row as the dense gradient it stands for would, zero
where no row was touched: its rows are written into a persistent zero buffer, the rule
runs over the whole parameter, and the rows are zeroed again — no table-sized gradient
is allocated, filled or scattered per step.

Updates are in place on each parameter's torch value, so a compiled plan, which reads
`param._value` at every run, sees them.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
from collections.abc import Iterable, Iterator, Mapping
from itertools import repeat
from typing import ClassVar

import torch

from luoshu.compiler import states
from luoshu.core import context, dtypes, live
from luoshu.core.autodiff import gradients
from luoshu.core.errors import CheckpointError, Error, GradientError, GraphError
from luoshu.core.op import apply
from luoshu.core.tensor import IndexedSlices, Tensor


# --- helpers over torch values ---------------------------------------------------------
def _coalesce(indices: torch.Tensor, values: torch.Tensor, param: torch.Tensor):
    """Unique rows (sorted) and the summed values of each: one entry per touched row."""
    indices = indices.reshape(-1)
    values = values.reshape((indices.numel(),) + tuple(param.shape[1:]))
    if values.dtype != param.dtype:
        values = values.to(param.dtype)
    if indices.numel():
        low, high = (int(v) for v in torch.aminmax(indices))
        if low < 0 or high >= param.shape[0]:
            raise GradientError(f"sparse gradient rows must be in [0, {param.shape[0]}) for a parameter of shape "
                                f"{tuple(param.shape)}, found rows {low}..{high}")
    rows, inverse = _unique_rows(indices, param.shape[0])
    summed = values.new_zeros((rows.numel(),) + tuple(param.shape[1:]))
    summed.index_add_(0, inverse, values)
    return rows, summed


# Up to this many table rows per index, marking the touched rows in a table-long mask beats
# sorting the indices (torch.unique): ~1.1 vs ~1.7 ms for 26k indices into a 400k-row table.
_MARK_ROWS_PER_INDEX = 32


def _unique_rows(indices: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.unique(indices, return_inverse=True) for indices known to lie in [0, num_rows)."""
    if not indices.numel() or num_rows > _MARK_ROWS_PER_INDEX * indices.numel():
        return torch.unique(indices, return_inverse=True)
    indices = indices.to(torch.int64)
    touched = torch.zeros(num_rows, dtype=torch.bool, device=indices.device)
    touched.index_fill_(0, indices, True)
    rows = touched.nonzero().squeeze(1)
    position = torch.empty(num_rows, dtype=torch.int64, device=indices.device)
    position.index_copy_(0, rows, torch.arange(rows.numel(), device=indices.device))
    return rows, position.index_select(0, indices)


def _groups_by_device_dtype(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Positions of `tensors` bucketed by (device, dtype), as fused kernels need."""
    first = tensors[0]
    if all(t.device == first.device and t.dtype == first.dtype for t in tensors):
        return [list(range(len(tensors)))]
    buckets: dict = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    return list(buckets.values())


def _total_norm(tensors: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all `tensors` together, as if concatenated (widest dtype, first device)."""
    norms = torch._foreach_norm(tensors, norm_type)
    device = tensors[0].device
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = [n.to(device=device, dtype=dtype) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def _scaled(tensors: list[torch.Tensor], factor: torch.Tensor) -> list[torch.Tensor]:
    """`tensors` times the scalar tensor `factor`, as new tensors (multi-tensor kernels)."""
    out: list = [None] * len(tensors)
    for idx in _groups_by_device_dtype(tensors):
        first = tensors[idx[0]]
        results = torch._foreach_mul([tensors[i] for i in idx], factor.to(device=first.device, dtype=first.dtype))
        for i, r in zip(idx, results):
            out[i] = r
    return out


def clip_grad_norm_(params, max_norm: float, norm_type: float = 2.0) -> Tensor:
    """Scales the gradients of `params` so their global norm is at most `max_norm`.

    Sparse gradients count as their dense equivalents (repeated rows summed first). The
    scaled gradients replace `.grad` (eager gradients may be broadcast views or shared
    between parameters, so they are not written in place). Returns the total norm
    before clipping, as an eager scalar tensor (like torch).
    """
    params = [params] if isinstance(params, Tensor) else list(params)
    params = [p for p in params if p.grad is not None]
    if not params:
        return Tensor.from_value(torch.zeros(()))
    with torch.no_grad():
        norm_sources, to_scale = [], []
        for p in params:
            g = p.grad
            if isinstance(g, IndexedSlices):
                norm_sources.append(_coalesce(g.indices.value, g.values.value, p.value)[1])
                to_scale.append(g.values.value)
            else:
                norm_sources.append(g.value)
                to_scale.append(g.value)
        total = _total_norm(norm_sources, float(norm_type))
        coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        for p, value in zip(params, _scaled(to_scale, coef)):
            g = p.grad
            p.grad = (IndexedSlices(g.indices, Tensor.from_value(value), g.dense_shape)
                      if isinstance(g, IndexedSlices) else Tensor.from_value(value))
    return Tensor.from_value(total)


def _json_value(key: str, value):
    """Hyperparameters as JSON values (tuples become lists); raises for anything else."""
    if isinstance(value, tuple):
        value = list(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise Error(f"optimizer hyperparameter {key!r} = {value!r} is not JSON-serialisable") from None
    return value


class _StateView(Mapping):
    """`optimizer.state[param]`: the dict of state tensors of one parameter."""

    def __init__(self, optimizer: Optimizer):
        self._opt = optimizer

    def __getitem__(self, param):
        index = self._opt._index.get(id(param)) if isinstance(param, Tensor) else None
        state = None if index is None else self._opt._state[index]
        if state is None:
            raise KeyError(param)
        return state

    def __iter__(self) -> Iterator[Tensor]:
        return (p for p, s in zip(self._opt._params, self._opt._state) if s is not None)

    def __len__(self) -> int:
        return sum(s is not None for s in self._opt._state)


# --- the optimizer base ------------------------------------------------------------------
class Optimizer:
    """Base class: parameter groups, lazily created state, `step`, `minimize`, state dicts.

    Subclasses define `_state_names(group)` (the state tensors a group needs),
    optionally `_initial_state(group, name, param)`, and `_rule(group, params, grads,
    state, steps, fresh, lr)`, which updates lists of tensors in place with multi-tensor
    kernels. `steps` are the per-parameter float32 step counters, already incremented;
    `fresh[i]` says the state of parameter `i` was created in this step; `lr` is the
    group's learning rate (a float, or a 0-d tensor in a compiled step: `luoshu.optim.lowered`).
    """

    # True where the rule applies `weight_decay` itself (AdamW, LAMB) instead of the
    # base adding L2 to the gradient.
    decoupled_weight_decay: ClassVar[bool] = False

    def __init__(self, params, defaults: dict, max_grad_norm: float | None = None):
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise Error(f"{type(self).__name__}: max_grad_norm must be positive, found {max_grad_norm}")
        self.defaults = {"weight_decay": 0.0, "l1": 0.0, **defaults}
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        # Tensor parallelism installs `shard_norm(indices, grads) -> total norm`: the norm over
        # every shard of the model, not just this rank's (luoshu.compiler.states).
        self.shard_norm = None
        self.param_groups: list[dict] = []
        self._params: list[Tensor] = []
        self._group_of: list[int] = []
        self._index: dict[int, int] = {}
        self._state: list[dict | None] = []
        self._grad_buffers: dict[int, torch.Tensor] = {}  # global sparse updates' scratch gradients
        # parameter indices of an all-dense update -> their split into parameter groups (`_apply_dense`)
        self._dense_splits: dict[tuple, list[tuple[dict, list[int] | None]]] = {}
        if isinstance(params, Tensor):
            params = [params]
        groups = list(params)
        if not groups:
            raise Error(f"{type(self).__name__} got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)
        self._key = live.register(self)  # what optimizer_update names in its attributes

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v}" for k, v in self.defaults.items())
        return f"{type(self).__name__}({len(self._params)} params in {len(self.param_groups)} groups, {hyper})"

    # --- parameters -------------------------------------------------------------------
    def add_param_group(self, group: dict) -> None:
        """Adds a group of parameters with its own hyperparameters (defaults fill the rest)."""
        if not isinstance(group, dict) or "params" not in group:
            raise Error(f"{type(self).__name__}: a parameter group is a dict with a 'params' entry, "
                        f"found {type(group).__name__}")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen = set()
        for p in params:
            if not isinstance(p, Tensor) or p._value is None or p.producer is not None:
                raise Error(f"{type(self).__name__}: parameters must be leaf tensors with a value, found {p!r}")
            if not dtypes.is_floating(p.dtype):
                raise Error(f"{type(self).__name__}: parameter {p.name or ''} has dtype {p.dtype}; "
                            "only floating tensors can be optimized")
            if id(p) in self._index or id(p) in seen:
                raise Error(f"{type(self).__name__}: parameter {p!r} appears in more than one place")
            seen.add(id(p))
        filled = {**self.defaults, **{k: v for k, v in group.items() if k != "params"}}
        self._validate_group(filled)
        filled["params"] = params
        gi = len(self.param_groups)
        self.param_groups.append(filled)
        for p in params:
            self._index[id(p)] = len(self._params)
            self._params.append(p)
            self._group_of.append(gi)
            self._state.append(None)

    def _validate_group(self, group: dict) -> None:
        for key in ("lr", "weight_decay", "l1"):
            value = group.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise Error(f"{type(self).__name__}: {key} must be a non-negative number, found {value!r}")
        self._check_group(group)

    def _check_group(self, group: dict) -> None:
        """Subclasses validate their hyperparameters here."""

    @property
    def state(self) -> Mapping:
        return _StateView(self)

    def parameters(self) -> list[Tensor]:
        return list(self._params)

    def zero_grad(self) -> None:
        for p in self._params:
            p.grad = None

    # --- stepping ---------------------------------------------------------------------
    def step(self, closure=None):
        """Applies the gradients in `.grad` (eager); parameters without one are skipped."""
        loss = closure() if closure is not None else None
        grads = []
        for i, p in enumerate(self._params):
            if p.grad is not None:
                grads.append((i, gradient_value(p, p.grad)))
        if grads:
            self.apply_gradients(grads)
        return loss

    def minimize(self, loss: Tensor, var_list=None, loss_scaler=None):
        """Differentiates `loss` and updates the parameters.

        Eager: computes the gradients and applies them at once (returns None; `.grad` is
        not touched). Define-and-run: records the gradient ops and one update op and
        returns its output, to fetch with the loss: `g.run([loss, train_op], feed)`.
        With `loss_scaler`, the loss is scaled, and the update unscales, skips the step
        when a gradient overflowed and updates the scale.
        """
        if not isinstance(loss, Tensor):
            raise GradientError(f"minimize takes a loss tensor, found {type(loss).__name__}")
        if var_list is None:
            indices = list(range(len(self._params)))
        else:
            var_list = [var_list] if isinstance(var_list, Tensor) else list(var_list)
            missing = [p for p in var_list if id(p) not in self._index]
            if missing:
                raise Error(f"minimize: {missing[0]!r} is not a parameter of this {type(self).__name__}")
            indices = [self._index[id(p)] for p in var_list]
        params = [self._params[i] for i in indices]
        graph = loss.graph
        if graph is None:
            target = loss_scaler.scale(loss) if loss_scaler is not None else loss
            grads = gradients(target, params)
            pairs = [(i, gradient_value(p, g)) for i, p, g in zip(indices, params, grads) if g is not None]
            if not pairs:
                raise GradientError(f"minimize: the loss does not depend on any of the {len(params)} parameters")
            self.apply_gradients(pairs, loss_scaler)
            return None

        scope = graph if context.current_graph() is not graph else contextlib.nullcontext()
        with scope:
            target = loss_scaler.scale(loss) if loss_scaler is not None else loss
            update = self.update_op(graph, indices, gradients(target, params), loss_scaler)
        if update is None:
            raise GradientError(f"minimize: the loss does not depend on any of the {len(params)} parameters")
        return update

    def update_op(self, graph, indices: list[int], grads: list, loss_scaler=None, global_rows=frozenset()):
        """Records the define-and-run update op applying gradient tensors `grads` to the
        parameters at `indices` (entries whose gradient is None are skipped); returns its
        output, or None when no gradient is given. The sparse gradients of the parameters
        whose index is in `global_rows` update every row (kind "g"), the others only the
        rows they touch."""
        inputs, used, kinds = [], [], []
        for i, g in zip(indices, grads):
            if g is None:
                continue
            used.append(i)
            if isinstance(g, IndexedSlices):
                inputs += [g.indices, g.values]
                kinds.append("g" if i in global_rows else "s")
            else:
                inputs.append(g)
                kinds.append("d")
        if not used:
            return None
        live.keep_alive(graph, self)
        scaler_key = -1
        if loss_scaler is not None:
            live.keep_alive(graph, loss_scaler)
            scaler_key = loss_scaler._key
        return apply("optimizer_update", *inputs, optimizer=self._key, params=tuple(used),
                     kinds="".join(kinds), loss_scaler=scaler_key)

    def apply_gradients(self, grads: list, loss_scaler=None, clip_coef: torch.Tensor | None = None) -> None:
        """The update path of both modes: `grads` pairs a parameter index with a torch
        tensor (dense), an `(indices, values)` tuple (sparse) or `(indices, values, GLOBAL)`
        (sparse applied to every row). Data-parallel sync modes call it with synchronised
        gradients. `clip_coef`: global-norm clipping's factor, computed by the caller over these
        and the gradients it applies elsewhere (ZeRO's shards), in place of the norm of `grads`
        (whose sum over a group would be a collective only some ranks of a pipeline reach)."""
        if torch.is_grad_enabled():  # a plan's update op runs with gradients off already
            with torch.no_grad():
                self._apply_gradients(grads, loss_scaler, clip_coef)
        else:
            self._apply_gradients(grads, loss_scaler, clip_coef)

    def _apply_gradients(self, grads: list, loss_scaler, clip_coef) -> None:
        if self._apply_dense(grads, loss_scaler, clip_coef):
            return
        entries = self._entries(grads)
        if not entries:
            return
        if loss_scaler is not None and loss_scaler.enabled:
            unscaled, skip = loss_scaler._unscale_and_update([_dense_part(g) for _, g in entries])
            if skip:
                return
            entries = _replace_dense_parts(entries, unscaled)
        if self.max_grad_norm is not None:
            clipped = self._clipped([i for i, _ in entries], [_dense_part(g) for _, g in entries], clip_coef)
            entries = _replace_dense_parts(entries, clipped)
        if len(self.param_groups) == 1:
            self._update_group(self.param_groups[0], entries)
            return
        by_group: dict[int, list] = {}
        for i, g in entries:
            by_group.setdefault(self._group_of[i], []).append((i, g))
        for gi, items in by_group.items():
            self._update_group(self.param_groups[gi], items)

    def _clipped(self, indices: list[int], tensors: list[torch.Tensor], clip_coef) -> list[torch.Tensor]:
        """`tensors` (the dense parts of the gradients of parameters `indices`) scaled by global-norm
        clipping's factor: `clip_coef` where the caller computed it, else from their norm."""
        coef = clip_coef
        if coef is None:
            # a graph's states pass installs `shard_norm`; an eager TP step asks for it here
            shard_norm = self.shard_norm or states.eager_shard_norm(self.parameters())
            total = _total_norm(tensors) if shard_norm is None else shard_norm(indices, tensors)
            coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        return _scaled(tensors, coef)

    def _apply_dense(self, grads: list, loss_scaler, clip_coef) -> bool:
        """`apply_gradients` for the common step, with less Python per parameter: every gradient
        dense, of its parameter's shape and dtype, contiguous, and every parameter contiguous with
        its state made (any step but the first). Checked in bulk before anything changes; False
        (nothing done) where a gradient or parameter is not like that, and `apply_gradients` goes
        the general way. The same kernels in the same order as `_update_group`.

        Per step `_update_group` did several checks and list appends per parameter: at ~20
        parameters a third of the update op's time, and more after a wait (a collective's), when
        little of that Python is in cache. Only the split of the parameters into groups is kept
        between steps; values and state are read afresh, so nothing stale is held or used."""
        if not grads:
            return False
        tensors = list(map(_second, grads))
        if not all(map(isinstance, tensors, repeat(torch.Tensor))):
            return False
        key = tuple(map(_first, grads))
        try:
            params = list(map(self._params.__getitem__, key))
            found = list(map(self._state.__getitem__, key))
        except (IndexError, TypeError):
            return False
        values = list(map(_value_of, params))
        if None in found or not (all(map(_contiguous, values)) and all(map(_contiguous, tensors))
                                 and all(map(operator.eq, map(_shape_of, tensors), map(_shape_of, values)))
                                 and all(map(operator.is_, map(_dtype_of, tensors), map(_dtype_of, values)))):
            return False
        split = self._dense_splits.get(key)
        if split is None:
            split = self._dense_splits[key] = self._dense_split(key)
        runs = []
        for group, positions in split:
            pick = (lambda xs: xs) if positions is None else (lambda xs, at=positions: [xs[k] for k in at])
            group_states = pick(found)
            try:
                state = {name: [st[name] for st in group_states] for name in self._state_names(group)}
                steps = [st["step"] for st in group_states]
            except KeyError:  # the group's hyperparameters now need a state not made yet
                return False
            runs.append((group, pick, pick(values), state, steps))
        if loss_scaler is not None and loss_scaler.enabled:
            tensors, skip = loss_scaler._unscale_and_update(tensors)
            if skip:
                return True
        if self.max_grad_norm is not None:
            tensors = self._clipped(list(key), tensors, clip_coef)
        for group, pick, group_values, state, steps in runs:
            if self._counts_steps:
                torch._foreach_add_(steps, 1.0)
            group_grads = self._regularize(group, group_values, pick(tensors))
            self._rule(group, group_values, group_grads, state, steps, [False] * len(steps), group["lr"])
        return True

    def _dense_split(self, key: tuple) -> list[tuple[dict, list[int] | None]]:
        """[(parameter group, positions in `key` of its parameters (None: all of them))], groups in
        order of first appearance, as `apply_gradients` updates them."""
        by_group: dict[int, list[int]] = {}
        for k, i in enumerate(key):
            by_group.setdefault(self._group_of[i], []).append(k)
        if len(by_group) == 1:
            return [(self.param_groups[next(iter(by_group))], None)]
        return [(self.param_groups[gi], positions) for gi, positions in by_group.items()]

    def _entries(self, grads: list) -> list:
        """Gradients checked and put in the layout the rules take (sparse ones coalesced)."""
        entries = []
        for i, g in grads:
            p = self._params[i]._value
            if isinstance(g, tuple):
                entries.append((i, _coalesce(g[0], g[1], p) + tuple(g[2:])))
                continue
            if g.shape != p.shape:
                raise GradientError(f"{type(self).__name__}: the gradient of parameter {i} has shape "
                                    f"{tuple(g.shape)}, the parameter {tuple(p.shape)}")
            # Fused kernels need a layout like the parameter's; eager gradients can be
            # broadcast (stride-0) views.
            entries.append((i, (g if g.dtype == p.dtype else g.to(p.dtype)).contiguous()))
        return entries

    def lowered_update(self, indices, kinds: str):
        """The update of parameters `indices` (gradient kinds `kinds`) as pure tensor math for
        whole-step compilation (`luoshu.optim.lowered.LoweredUpdate`; with sparse kinds
        `luoshu.optim.lowered_sparse.SparseLoweredUpdate`); an `Error` says why not."""
        from luoshu.optim.lowered import LoweredUpdate  # it builds on this module
        from luoshu.optim.lowered_sparse import SparseLoweredUpdate

        return (LoweredUpdate if set(kinds) <= {"d"} else SparseLoweredUpdate)(self, indices, kinds)

    def gradient_norm_squared(self, grads: list) -> torch.Tensor:
        """The squared global norm of `grads` as `apply_gradients` counts it for clipping
        (a sparse gradient as the dense one it stands for)."""
        with torch.no_grad():
            entries = self._entries(grads)
            tensors = [_dense_part(g) for _, g in entries]
            if self.shard_norm is not None:  # tensor parallel: summed over the TP group (a collective)
                return self.shard_norm.squared([i for i, _ in entries], tensors).double()
            return _total_norm(tensors).double() ** 2 if tensors else torch.zeros((), dtype=torch.float64)

    def _update_group(self, group: dict, items: list) -> None:
        names = self._state_names(group)
        params, grads, steps, fresh = [], [], [], []
        state: dict[str, list] = {name: [] for name in names}
        # Updated on copies and written back: (position in the lists, parameter value,
        # rows (None: the whole non-contiguous parameter), its state dict).
        sparse = []
        zero_after = []  # (persistent gradient buffer, rows written into it) of global sparse updates
        for i, g in items:
            p = self._params[i]._value
            st = self._state[i]
            fresh.append(st is None)
            if st is None:
                st = self._state[i] = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
            for name in names:
                if name not in st:
                    st[name] = self._initial_state(group, name, p)
            steps.append(st["step"])
            if isinstance(g, tuple) and len(g) == 3:  # global: every row, zero gradient where untouched
                rows, values, _ = g
                if not p.is_contiguous():
                    raise GradientError(f"{type(self).__name__}: a global sparse update needs a contiguous "
                                        f"parameter, parameter {i} is not")
                buffer = self._zero_grad_buffer(i, p)
                buffer.index_copy_(0, rows, values)
                zero_after.append((buffer, rows))
                params.append(p)
                grads.append(buffer)
                for name in names:
                    state[name].append(st[name])
            elif isinstance(g, tuple):
                rows, values = g
                sparse.append((len(params), p, rows, st))
                params.append(p.index_select(0, rows))
                grads.append(values)
                for name in names:
                    state[name].append(st[name].index_select(0, rows))
            else:
                if not p.is_contiguous():  # updated through a contiguous copy, like sparse rows
                    sparse.append((len(params), p, None, st))
                    p = p.contiguous()
                params.append(p)
                grads.append(g)
                for name in names:
                    state[name].append(st[name])
        if self._counts_steps:
            torch._foreach_add_(steps, 1.0)
        grads = self._regularize(group, params, grads)
        try:
            self._rule(group, params, grads, state, steps, fresh, group["lr"])
        finally:  # rules never write their gradients: zeroing the rows restores an all-zero buffer
            for buffer, rows in zero_after:
                buffer.index_fill_(0, rows, 0)
        for pos, p, rows, st in sparse:
            if rows is None:
                p.copy_(params[pos])
                continue
            p.index_copy_(0, rows, params[pos])
            for name in names:
                st[name].index_copy_(0, rows, state[name][pos])

    def _zero_grad_buffer(self, i: int, p: torch.Tensor) -> torch.Tensor:
        """Parameter i's persistent all-zero gradient buffer (scratch, not state: never saved)."""
        buffer = self._grad_buffers.get(i)
        if buffer is None or buffer.shape != p.shape or buffer.dtype != p.dtype or buffer.device != p.device:
            buffer = self._grad_buffers[i] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return buffer

    def _regularize(self, group, params, grads):
        weight_decay, l1 = group["weight_decay"], group["l1"]
        if weight_decay and not self.decoupled_weight_decay:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        if l1:
            grads = torch._foreach_add(grads, torch._foreach_sign(params), alpha=l1)
        return grads

    # --- what subclasses define -------------------------------------------------------
    # Whether the rule reads the per-parameter step counters (bias corrections, lr decay);
    # when not, they are not incremented: a kernel launch per parameter saved each step.
    _counts_steps: ClassVar[bool] = True

    def _state_names(self, group: dict) -> list[str]:
        return []

    def _initial_state(self, group: dict, name: str, param: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(param, memory_format=torch.contiguous_format)

    def _rule(self, group, params, grads, state, steps, fresh, lr) -> None:
        raise NotImplementedError

    def _takes_deferred_matmuls(self, group: dict) -> bool:
        """Whether `_rule`, with a tensor `lr`, takes gradients left as matmuls
        (`luoshu.compiler.inductor.DeferredMatmul`) for `group`."""
        return False

    # --- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """`{"tensors": {key: torch.Tensor}, "meta": JSON-able dict}`; parameters are named
        by their index in the optimizer's parameter list ("state.3.exp_avg")."""
        groups = []
        for gi, group in enumerate(self.param_groups):
            hyper = {k: _json_value(k, v) for k, v in group.items() if k != "params"}
            hyper["params"] = [i for i, g in enumerate(self._group_of) if g == gi]
            groups.append(hyper)
        tensors, state_meta = {}, {}
        for i, st in enumerate(self._state):
            if st is None:
                continue
            names = sorted(k for k in st if k != "step")
            state_meta[str(i)] = {"step": int(st["step"].item()), "tensors": names}
            for name in names:
                tensors[f"state.{i}.{name}"] = st[name].detach().clone()
        meta = {
            "num_params": len(self._params),
            "param_shapes": [list(p.shape) for p in self._params],
            "max_grad_norm": self.max_grad_norm,
            "param_groups": groups,
            "state": state_meta,
        }
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restores a `state_dict()`. Everything is checked first; on any mismatch a
        `CheckpointError` is raised and the optimizer is left exactly as it was."""
        new_groups, new_state, max_grad_norm = self._check_state_dict(state_dict)
        for group, hyper in zip(self.param_groups, new_groups):
            group.clear()
            group.update(hyper)
        self._state = new_state
        self.max_grad_norm = max_grad_norm

    def _check_state_dict(self, state_dict):
        name = type(self).__name__
        fail = lambda msg: CheckpointError(f"{name}.load_state_dict: {msg}")  # noqa: E731
        if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("tensors"), Mapping) \
                or not isinstance(state_dict.get("meta"), Mapping):
            raise fail("expected a dict with 'tensors' (a dict) and 'meta' (a dict)")
        tensors, meta = state_dict["tensors"], state_dict["meta"]
        for key in ("num_params", "param_groups", "state"):
            if key not in meta:
                raise fail(f"meta has no {key!r} entry")
        if meta["num_params"] != len(self._params):
            raise fail(f"the state is for {meta['num_params']} parameters, this optimizer has {len(self._params)}")
        shapes = meta.get("param_shapes")
        if shapes is not None:
            for i, (shape, p) in enumerate(zip(shapes, self._params)):
                if tuple(shape) != tuple(p.shape):
                    raise fail(f"parameter {i} has shape {tuple(p.shape)}, the state was saved for {tuple(shape)}")
        max_grad_norm = meta.get("max_grad_norm", self.max_grad_norm)
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise fail(f"max_grad_norm must be a positive number or null, found {max_grad_norm!r}")
        groups = meta["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise fail(f"the state has {len(groups) if isinstance(groups, list) else 'no list of'} parameter "
                       f"groups, this optimizer has {len(self.param_groups)}")
        new_groups = []
        for gi, (saved, current) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, Mapping):
                raise fail(f"parameter group {gi} is not a dict")
            mine = [i for i, g in enumerate(self._group_of) if g == gi]
            if list(saved.get("params", ())) != mine:
                raise fail(f"parameter group {gi} holds parameters {list(saved.get('params', ()))}, "
                           f"this optimizer's holds {mine}")
            missing = sorted(set(self.defaults) - set(saved))
            if missing:
                raise fail(f"parameter group {gi} lacks hyperparameters {missing}")
            hyper = {}
            for key, value in saved.items():
                if key == "params":
                    continue
                default = current.get(key, self.defaults.get(key))
                if isinstance(default, tuple):
                    if not isinstance(value, (list, tuple)) or len(value) != len(default):
                        raise fail(f"group {gi} hyperparameter {key!r} must be a sequence of {len(default)}, "
                                   f"found {value!r}")
                    value = tuple(value)
                elif isinstance(default, bool):
                    if not isinstance(value, bool):
                        raise fail(f"group {gi} hyperparameter {key!r} must be a bool, found {value!r}")
                elif isinstance(default, (int, float)):
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                        raise fail(f"group {gi} hyperparameter {key!r} must be a finite number, found {value!r}")
                hyper[key] = value
            try:
                self._validate_group({**self.defaults, **hyper})
            except Error as exc:
                raise fail(f"group {gi}: {exc}") from None
            hyper["params"] = current["params"]
            new_groups.append(hyper)

        saved_state = meta["state"]
        if not isinstance(saved_state, Mapping):
            raise fail("meta 'state' must be a dict")
        new_state: list[dict | None] = [None] * len(self._params)
        expected_keys = set()
        for key, entry in saved_state.items():
            try:
                i = int(key)
            except (TypeError, ValueError):
                raise fail(f"state key {key!r} is not a parameter index") from None
            if not 0 <= i < len(self._params):
                raise fail(f"state for parameter {i}, but there are {len(self._params)} parameters")
            if not isinstance(entry, Mapping) or not isinstance(entry.get("step"), int) or entry["step"] < 0 \
                    or not isinstance(entry.get("tensors"), list):
                raise fail(f"state of parameter {i} needs a non-negative integer 'step' and a 'tensors' list")
            p = self._params[i]._value
            wanted = set(self._state_names(new_groups[self._group_of[i]]))
            if set(entry["tensors"]) != wanted:
                raise fail(f"parameter {i} has state tensors {sorted(entry['tensors'])}, "
                           f"{name} with these hyperparameters needs {sorted(wanted)}")
            st = {"step": torch.full((), float(entry["step"]), dtype=torch.float32, device=p.device)}
            for tname in entry["tensors"]:
                tkey = f"state.{i}.{tname}"
                expected_keys.add(tkey)
                t = tensors.get(tkey)
                if not isinstance(t, torch.Tensor):
                    raise fail(f"tensor {tkey!r} is missing")
                if tuple(t.shape) != tuple(p.shape):
                    raise fail(f"tensor {tkey!r} has shape {tuple(t.shape)}, parameter {i} has {tuple(p.shape)}")
                if t.dtype != p.dtype:
                    raise fail(f"tensor {tkey!r} has dtype {dtypes.dtype_name(t.dtype)}, parameter {i} has "
                               f"{dtypes.dtype_name(p.dtype)}")
                st[tname] = t.detach().to(device=p.device, copy=True).contiguous()
            new_state[i] = st
        unknown = sorted(set(tensors) - expected_keys)
        if unknown:
            raise fail(f"unknown tensors {unknown[:5]}{' …' if len(unknown) > 5 else ''}")
        return new_groups, new_state, (None if max_grad_norm is None else float(max_grad_norm))


def gradient_value(param: Tensor, grad):
    """A gradient as `apply_gradients` takes it: a torch tensor, or `(indices, values)` for IndexedSlices."""
    if isinstance(grad, IndexedSlices):
        if tuple(grad.dense_shape) != tuple(param.shape):
            raise GradientError(f"sparse gradient of dense shape {grad.dense_shape} for a parameter of shape "
                                f"{param.shape}")
        pair = (grad.indices._value, grad.values._value)
        if pair[0] is None or pair[1] is None:
            raise GraphError("a symbolic IndexedSlices gradient cannot be applied eagerly")
        return pair
    if not isinstance(grad, Tensor):
        raise GradientError(f"a gradient must be a Tensor or IndexedSlices, found {type(grad).__name__}")
    if grad._value is None:
        raise GraphError(f"the gradient {grad!r} is symbolic; eager step() needs eager gradients")
    return grad._value


def _dense_part(g):
    return g[1] if isinstance(g, tuple) else g


# what `Optimizer._apply_dense` maps over a step's gradients and parameters (C-level, no Python per item)
_first, _second = operator.itemgetter(0), operator.itemgetter(1)
_value_of = operator.attrgetter("_value")
_shape_of = operator.attrgetter("shape")
_dtype_of = operator.attrgetter("dtype")
_contiguous = torch.Tensor.is_contiguous


def _replace_dense_parts(entries: list, tensors: Iterable[torch.Tensor]) -> list:
    return [(i, (g[0], t, *g[2:]) if isinstance(g, tuple) else t) for (i, g), t in zip(entries, tensors)]
