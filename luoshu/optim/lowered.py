"""The optimizers' dense update as traceable tensor math, for whole-step compilation.

`Optimizer.apply_gradients` branches in Python on each step (state created on the first step,
a loss scaler skipping a step, sparse rows) and runs torch's fused kernels, none of which
TorchDynamo traces into one graph. `LoweredUpdate` is the update of an update op's dense
gradients with those branches settled: the parameters, their state tensors, the step counters
and the learning rates (0-d tensors, so a scheduler changing them does not recompile) are
inputs the compiled step mutates in place. The math is the optimizer's own: clipping and L2/L1
regularisation reuse its functions and the rule is its `_rule`, called with the tensor learning
rate (`luoshu.optim.optimizers`: one copy of each rule). `luoshu.compiler.inductor` reaches it
through the `optimizer_update` op's `lower`.
"""

from __future__ import annotations

import torch

from luoshu.compiler.inductor import DeferredMatmul
from luoshu.core.errors import Error
from luoshu.optim.optimizer import _scaled, _total_norm

_NOT_HYPERPARAMETERS = ("lr", "params")


class LoweredUpdate:
    """The update of the optimizer's parameters `indices` (dense gradients, `kinds` all "d")
    as traceable tensor math: `inputs()` gives this step's tensors as one flat tuple (None
    before the optimizer has state, so the plan runs the first step), `compute(inputs, *grads)`
    applies it in place, and `constants()` are the hyperparameters `compute` reads as constants
    (a compiled step compiles again when they change). Raises `Error` naming what cannot be
    lowered."""

    # A gradient may come as a `DeferredMatmul`; it stays one where the rule adds it to the
    # parameter as it is (no clipping or regularisation reads it first), else it is computed.
    takes_deferred_matmuls = True

    def __init__(self, opt, indices, kinds: str):
        name = type(opt).__name__
        sparse = [(i, k) for i, k in zip(indices, kinds) if k != "d"]
        if sparse:
            raise Error(
                f"{name}: the sparse gradient (kind {sparse[0][1]!r}) of parameter {sparse[0][0]} has rows "
                "known only at run time; only dense updates are lowered"
            )
        if not getattr(type(opt)._rule, "takes_tensor_lr", False):
            raise Error(
                f"{name} has no lowered update rule: its rule takes no tensor learning rate (lowered: SGD, "
                "Momentum, Nesterov, Adam, AdamW, AdaGrad, RMSProp)"
            )
        if opt.shard_norm is not None:
            raise Error(f"{name}: clipping across tensor-parallel shards is not lowered")
        for i in indices:
            if not opt._params[i]._value.is_contiguous():
                raise Error(f"{name}: parameter {i} is not contiguous")
        self.opt = opt
        by_group: dict[int, list[int]] = {}
        for pos, i in enumerate(indices):
            by_group.setdefault(opt._group_of[i], []).append(pos)
        self.groups = list(by_group.items())  # (group index, positions in `indices`)
        # Everything below runs group by group: the update op's gradients are put in this order.
        self._order = [pos for _, positions in self.groups for pos in positions]
        self._indices = [indices[pos] for pos in self._order]
        self._lr_values = [None] * len(self.groups)
        self._lr_tensors = [
            torch.zeros((), dtype=torch.float64, device=opt._params[indices[positions[0]]]._value.device)
            for _, positions in self.groups
        ]

    def constants(self) -> tuple:
        """The hyperparameters other than the learning rates, which `compute` bakes in."""
        groups = self.opt.param_groups
        return (self.opt.max_grad_norm, *(
            tuple(v for k, v in groups[gi].items() if k not in _NOT_HYPERPARAMETERS) for gi, _ in self.groups))

    def inputs(self) -> tuple | None:
        """This step's tensors, group by group: the parameters, each state tensor by name, the
        step counters, then one learning rate per group; None while some parameter has no state
        yet (the first step creates it through the plan)."""
        opt = self.opt
        states, steps = [], []
        at = 0
        try:
            for k, (gi, positions) in enumerate(self.groups):
                group = opt.param_groups[gi]
                mine = [opt._state[i] for i in self._indices[at:at + len(positions)]]
                at += len(positions)
                steps += [st["step"] for st in mine]  # a TypeError or KeyError: no state yet
                for n in opt._state_names(group):
                    states += [st[n] for st in mine]
                lr = group["lr"]
                if lr != self._lr_values[k]:  # a scheduler moved it: one fill, no recompilation
                    self._lr_tensors[k].fill_(lr)
                    self._lr_values[k] = lr
        except (TypeError, KeyError):
            return None
        params = [opt._params[i]._value for i in self._indices]
        return (*params, *states, *steps, *self._lr_tensors)

    def compute(self, inputs: tuple, *grads) -> None:
        """Applies the update to `inputs()` (traced by TorchDynamo; `grads` in the update op's
        order)."""
        opt = self.opt
        n, n_groups = len(self._indices), len(self.groups)
        params, lrs = inputs[:n], inputs[-n_groups:]
        steps = list(inputs[len(inputs) - n - n_groups:len(inputs) - n_groups])
        grads = [grads[pos] for pos in self._order]
        at = 0
        for gi, positions in self.groups:
            group = opt.param_groups[gi]
            keep = (opt.max_grad_norm is None and opt._takes_deferred_matmuls(group) and not group["l1"]
                    and (not group["weight_decay"] or opt.decoupled_weight_decay))
            for k in range(at, at + len(positions)):
                g = grads[k]
                if isinstance(g, DeferredMatmul) and not (keep and g.a.dtype == g.b.dtype == params[k].dtype):
                    grads[k] = g.value()
            at += len(positions)
        grads = [g if not isinstance(g, torch.Tensor) or g.dtype == p.dtype else g.to(p.dtype)
                 for g, p in zip(grads, params)]
        if opt.max_grad_norm is not None:
            total = _total_norm(grads)
            grads = _scaled(grads, torch.clamp(opt.max_grad_norm / (total + 1e-6), max=1.0))
        if opt._counts_steps:
            torch._foreach_add_(steps, 1.0)
        at, cursor = 0, n
        for (gi, positions), lr in zip(self.groups, lrs):
            group, end = opt.param_groups[gi], at + len(positions)
            state = {}
            for name in opt._state_names(group):
                state[name] = list(inputs[cursor:cursor + len(positions)])
                cursor += len(positions)
            ps = list(params[at:end])
            gs = opt._regularize(group, ps, grads[at:end])
            # state exists (inputs() said so): no parameter is on its first step
            opt._rule(group, ps, gs, state, steps[at:end], [False] * len(ps), lr)
            at = end
