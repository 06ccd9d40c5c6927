"""The optimizers' sparse (row-wise) update as traceable tensor math, for whole-step compilation.

`Optimizer.apply_gradients` coalesces a sparse gradient with `torch.unique`-like steps whose
output length is the number of distinct rows, known only at run time, so a compiled graph
cannot hold it as it is. Here the coalesced gradient keeps the static length of the batch's
ids: `coalesce_rows` gives one entry per id, the first `U` entries being the `U` distinct rows
(sorted, as the plan's) with their summed gradients, the rest repeating entry 0. Updating a
repeated row computes the same new row again, so writing all of them back (`index_copy_`)
gives exactly the plan's update; norms (clipping) are taken of the unpadded sums, whose
padding is zero.

`SparseLoweredUpdate` is `LoweredUpdate` for update ops with sparse kinds: "s" gathers the
touched rows of the parameter and of its state, runs the optimizer's lowered rule on them next
to the dense parameters of the same group and scatters them back (TF LazyAdam / torch
SparseAdam semantics, as the plan); "g" (HugeCTR's `Update_t.Global`) writes the rows into the
optimizer's persistent all-zero gradient buffer, runs the rule over the whole parameter and
zeroes the rows again. `Optimizer.lowered_update` builds it where a kind is not "d".
"""

from __future__ import annotations

import torch

from luoshu.ops.update import update_entries
from luoshu.optim.lowered import LoweredUpdate
from luoshu.optim.optimizer import _MARK_ROWS_PER_INDEX, _scaled, _total_norm


def coalesce_rows(indices: torch.Tensor, values: torch.Tensor, shape: tuple):
    """`(rows, summed, exact)` of a sparse gradient of a parameter of `shape`, with static shapes
    (one entry per id):
    `exact` holds the distinct rows' summed values in sorted row order, zero after the last;
    `rows` / `summed` are the same entries with the tail repeating entry 0 (a real row), so a
    row-wise update of all of them writes each touched row with its own value only."""
    indices = indices.reshape(-1).to(torch.int64)
    n = indices.numel()
    values = values.reshape((n,) + tuple(shape[1:]))
    num_rows = shape[0]
    if num_rows <= _MARK_ROWS_PER_INDEX * n:  # as `_unique_rows`: a table-long mask beats sorting
        touched = torch.zeros(num_rows, dtype=torch.bool, device=indices.device).index_fill_(0, indices, True)
        rank = torch.cumsum(touched, 0) - 1  # each row's position among the touched rows
        inverse = rank.index_select(0, indices)
    else:
        ordered, order = torch.sort(indices)
        first = torch.ones(n, dtype=torch.bool, device=indices.device)
        first[1:] = ordered[1:] != ordered[:-1]
        inverse = torch.empty_like(indices).index_copy_(0, order, torch.cumsum(first, 0) - 1)
    exact = values.new_zeros(values.shape).index_add_(0, inverse, values)
    rows = torch.zeros_like(indices).index_copy_(0, inverse, indices)  # repeated ids write the same row
    entry = torch.arange(n, device=indices.device)
    entry = torch.where(entry <= inverse.max(), entry, 0)  # the tail repeats entry 0
    return rows.index_select(0, entry), exact.index_select(0, entry), exact


class SparseLoweredUpdate(LoweredUpdate):
    """`LoweredUpdate` of an update op whose gradient kinds include sparse ones ("s", "g"):
    `inputs()` adds the optimizer's all-zero gradient buffers of the global ("g") parameters
    after the base's tensors, `compute(inputs, *flat_grads)` takes the update op's flat gradient
    inputs (indices and values for a sparse parameter) and applies the plan's update in place."""

    takes_deferred_matmuls = False  # every gradient arrives computed

    def __init__(self, opt, indices, kinds: str):
        # The base checks everything that does not depend on the kinds (rule, clipping, layout)
        # and orders the parameters group by group (`_order`, `_indices`).
        super().__init__(opt, indices, "d" * len(kinds))
        self.indices, self.kinds = list(indices), kinds
        self._kinds = [kinds[pos] for pos in self._order]  # in the base's group order

    def inputs(self) -> tuple | None:
        base = super().inputs()
        if base is None:
            return None
        opt = self.opt
        buffers = [opt._zero_grad_buffer(i, opt._params[i]._value)
                   for i, kind in zip(self._indices, self._kinds) if kind == "g"]
        return (*base, *buffers)

    def compute(self, inputs: tuple, *flat_grads) -> None:
        opt = self.opt
        n, n_groups, n_buffers = len(self._indices), len(self.groups), self._kinds.count("g")
        buffers = iter(inputs[len(inputs) - n_buffers:])
        inputs = inputs[:len(inputs) - n_buffers]
        params, lrs = inputs[:n], inputs[-n_groups:]
        steps = list(inputs[len(inputs) - n - n_groups:len(inputs) - n_groups])
        entries = update_entries(self.indices, self.kinds, flat_grads)
        entries = [entries[pos] for pos in self._order]
        # Coalesced first: clipping counts each sparse gradient as the dense one it stands for.
        grads, rows, exact = [], [None] * n, []
        for pos, (e, p) in enumerate(zip(entries, params)):
            if e.kind == "d":
                g = e.inputs[0]
                grads.append(g if g.dtype == p.dtype else g.to(p.dtype))
                exact.append(grads[-1])
                continue
            ids, values = e.inputs
            rows[pos], summed, unpadded = coalesce_rows(ids, values.to(p.dtype), tuple(p.shape))
            grads.append(summed)
            exact.append(unpadded)
        if opt.max_grad_norm is not None:
            total = _total_norm(exact)
            grads = _scaled(grads, torch.clamp(opt.max_grad_norm / (total + 1e-6), max=1.0))
        targets, zero_after = list(params), []
        for pos, (kind, p) in enumerate(zip(self._kinds, params)):
            if kind == "g":
                buffer = next(buffers)
                buffer.index_copy_(0, rows[pos], grads[pos])
                zero_after.append((buffer, rows[pos]))
                grads[pos] = buffer
            elif kind == "s":
                targets[pos] = p.index_select(0, rows[pos])
        if opt._counts_steps:
            torch._foreach_add_(steps, 1.0)
        at, cursor = 0, n
        for (gi, positions), lr in zip(self.groups, lrs):
            group, end = opt.param_groups[gi], at + len(positions)
            state, gathered = {}, {}
            for name in opt._state_names(group):
                state[name] = list(inputs[cursor:cursor + len(positions)])
                cursor += len(positions)
                gathered[name] = [v if self._kinds[k] != "s" else v.index_select(0, rows[k])
                                  for k, v in zip(range(at, end), state[name])]
            ps = targets[at:end]
            gs = opt._regularize(group, ps, grads[at:end])
            # state exists (inputs() said so): no parameter is on its first step
            opt._rule(group, ps, gs, gathered, steps[at:end], [False] * len(ps), lr)
            for k in range(at, end):
                if self._kinds[k] == "s":
                    params[k].index_copy_(0, rows[k], ps[k - at])
                    for name, values in state.items():
                        values[k - at].index_copy_(0, rows[k], gathered[name][k - at])
            at = end
        for buffer, touched in zero_after:  # rules never write their gradients: the buffer is all zero again
            buffer.index_fill_(0, touched, 0)


__all__ = ["SparseLoweredUpdate", "coalesce_rows"]
