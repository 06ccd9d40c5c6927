"""The optimizers' dense update as pure tensor math, for whole-step compilation.

`Optimizer.apply_gradients` runs torch's fused Adam/AdaGrad kernels and branches in Python on
each step (state created on the first step, a loss scaler skipping a step, sparse rows), which
TorchDynamo cannot trace into one graph. `LoweredUpdate` is the same update of an update op's
dense gradients written as tensor operations only: the parameters, their state tensors, the step
counters and the learning rates (0-d tensors, so a scheduler changing them does not recompile)
are inputs the compiled step mutates in place. Clipping and L2/L1 regularisation reuse the
optimizer's own functions; the rule is the fused kernels' formula (torch's
`FusedAdamKernel` / `FusedAdagradKernel`) or the optimizer's foreach rule with the learning rate
as a tensor. `luoshu.compiler.inductor` reaches it through the `optimizer_update` op's `lower`.
"""

from __future__ import annotations

import torch

from luoshu.core.errors import Error
from luoshu.optim.optimizer import _scaled, _total_norm
from luoshu.optim.optimizers import SGD, AdaGrad, Adam, RMSProp


class LoweredUpdate:
    """The update of the optimizer's parameters `indices` (dense gradients, `kinds` all "d")
    as traceable tensor math: `inputs()` gives this step's tensors (None before the optimizer
    has state, so the plan runs the first step), `compute(inputs, *grads)` applies it in place.
    Raises `Error` naming what cannot be lowered."""

    def __init__(self, opt, indices, kinds: str):
        name = type(opt).__name__
        sparse = [(i, k) for i, k in zip(indices, kinds) if k != "d"]
        if sparse:
            raise Error(
                f"{name}: the sparse gradient (kind {sparse[0][1]!r}) of parameter {sparse[0][0]} has rows "
                "known only at run time; only dense updates are lowered"
            )
        rule = _rule_of(type(opt))
        if rule is None:
            raise Error(
                f"{name} has no lowered update rule (lowered: SGD, Momentum, Nesterov, Adam, AdamW, AdaGrad, RMSProp)"
            )
        if opt.shard_norm is not None:
            raise Error(f"{name}: clipping across tensor-parallel shards is not lowered")
        for i in indices:
            if not opt._params[i]._value.is_contiguous():
                raise Error(f"{name}: parameter {i} is not contiguous")
        self.opt, self.rule = opt, rule
        self.indices = list(indices)
        by_group: dict[int, list[int]] = {}
        for pos, i in enumerate(self.indices):
            by_group.setdefault(opt._group_of[i], []).append(pos)
        self.groups = list(by_group.items())  # (group index, positions in `indices`)
        self._lr_values = [None] * len(self.groups)
        self._lr_tensors = [
            torch.zeros((), dtype=torch.float64, device=opt._params[self.indices[pos[0]]]._value.device)
            for _, pos in self.groups
        ]

    def inputs(self) -> tuple | None:
        """This step's (params, state lists by name per group, steps, learning rates), or None
        while some parameter has no state yet (the first step creates it through the plan)."""
        opt = self.opt
        params, steps, states = [], [], []
        for k, (gi, positions) in enumerate(self.groups):
            group = opt.param_groups[gi]
            names = opt._state_names(group)
            per_name: dict[str, list] = {n: [] for n in names}
            for pos in positions:
                i = self.indices[pos]
                st = opt._state[i]
                if st is None or any(n not in st for n in names):
                    return None
                params.append(opt._params[i]._value)
                steps.append(st["step"])
                for n in names:
                    per_name[n].append(st[n])
            states.append(per_name)
            lr = group["lr"]
            if lr != self._lr_values[k]:  # a scheduler moved it: one fill, no recompilation
                self._lr_tensors[k].fill_(lr)
                self._lr_values[k] = lr
        return params, states, steps, self._lr_tensors

    def compute(self, inputs: tuple, *grads) -> None:
        """Applies the update (traced by TorchDynamo; hyperparameters other than the learning
        rate are read as constants, so changing them recompiles)."""
        opt = self.opt
        params, states, steps, lrs = inputs
        grads = [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, params)]
        if opt.max_grad_norm is not None:
            total = _total_norm(grads)
            grads = _scaled(grads, torch.clamp(opt.max_grad_norm / (total + 1e-6), max=1.0))
        if opt._counts_steps:
            torch._foreach_add_(steps, 1.0)
        for (gi, positions), state, lr in zip(self.groups, states, lrs):
            group = opt.param_groups[gi]
            ps, st = [params[p] for p in positions], [steps[p] for p in positions]
            gs = opt._regularize(group, ps, [grads[p] for p in positions])
            self.rule(opt, group, ps, gs, state, st, lr)


def _sgd(opt, group, params, grads, state, steps, lr):
    momentum = group["momentum"]
    if momentum:  # state exists, so no parameter is on its first step (which copies the gradient)
        bufs = state["momentum_buffer"]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads, alpha=1.0 - group["dampening"])
        grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
    torch._foreach_add_(params, torch._foreach_mul(grads, -lr))


def _adam(opt, group, params, grads, state, steps, lr):
    beta1, beta2 = group["betas"]
    eps, amsgrad = group["eps"], group["amsgrad"]
    decay = group["weight_decay"] if opt.decoupled_weight_decay else 0.0
    for k, (p, g, step) in enumerate(zip(params, grads, steps)):
        m, v = state["exp_avg"][k], state["exp_avg_sq"][k]
        if decay:
            p.mul_(1.0 - lr * decay)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        if amsgrad:
            top = state["max_exp_avg_sq"][k]
            torch.maximum(top, v, out=top)
            v = top
        step_size = lr / (1.0 - torch.pow(beta1, step))
        denom = v.sqrt() / torch.sqrt(1.0 - torch.pow(beta2, step)) + eps
        p.sub_(step_size * m / denom)


def _adagrad(opt, group, params, grads, state, steps, lr):
    for p, g, s, step in zip(params, grads, state["sum"], steps):
        s.addcmul_(g, g)
        clr = lr / (1.0 + (step - 1.0) * group["lr_decay"])
        p.sub_(clr * g / (s.sqrt() + group["eps"]))


def _rmsprop(opt, group, params, grads, state, steps, lr):
    alpha = group["alpha"]
    square_avg = state["square_avg"]
    torch._foreach_mul_(square_avg, alpha)
    torch._foreach_addcmul_(square_avg, grads, grads, value=1.0 - alpha)
    if group["centered"]:
        grad_avg = state["grad_avg"]
        torch._foreach_lerp_(grad_avg, grads, 1.0 - alpha)
        avg = torch._foreach_addcmul(square_avg, grad_avg, grad_avg, value=-1.0)
        torch._foreach_sqrt_(avg)
    else:
        avg = torch._foreach_sqrt(square_avg)
    torch._foreach_add_(avg, group["eps"])
    if group["momentum"] > 0:
        bufs = state["momentum_buffer"]
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_addcdiv_(bufs, grads, avg)
        torch._foreach_add_(params, torch._foreach_mul(bufs, -lr))
    else:
        torch._foreach_add_(params, torch._foreach_mul(torch._foreach_div(grads, avg), -lr))


def _rule_of(cls):
    """The lowered rule of optimizer class `cls`: that of the nearest class in `_RULES` whose
    `_rule` `cls` still uses (a subclass with its own `_rule` has none; LAMB has none yet)."""
    for base in cls.__mro__:
        if base in _RULES:
            return _RULES[base] if cls._rule is base._rule else None
    return None


_RULES = {SGD: _sgd, Adam: _adam, AdaGrad: _adagrad, RMSProp: _rmsprop}
