"""The optimizers: SGD (momentum, Nesterov), AdaGrad, RMSProp, Adam, AdamW and LAMB.

Hyperparameters and update rules follow torch.optim (LAMB follows the paper / NVIDIA
apex FusedLAMB). Each `_rule` updates one parameter group's lists of tensors in place
with multi-tensor kernels: torch's fused Adam/AdamW/AdaGrad kernels where they exist,
`torch._foreach_*` otherwise. Weight decay (L2, added to the gradient) and `l1` are
applied by the base class before the rule, except where the decay is decoupled.

The rules are the one copy of each update, for the eager/plan update and for the compiled
whole step alike (`luoshu.optim.lowered`): `lr` is the group's float there and a 0-d tensor
here (so a scheduler moving it does not recompile), which TorchDynamo traces. Torch's fused
kernels take no traced tensors, so with a tensor `lr` the Adam and AdaGrad rules run the fused
kernels' formula in plain tensor ops instead. A rule that handles a tensor `lr` is marked
`@_takes_tensor_lr`; LAMB's is not (it needs the fused Adam kernel).
"""

from __future__ import annotations

import torch

from luoshu.core.errors import Error
from luoshu.optim.optimizer import Optimizer, _groups_by_device_dtype


def _check_range(opt, group, key, low=0.0, high=None, high_open=True):
    value = group[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bound = f"in [{low}, {high}{')' if high_open else ']'}" if high is not None else f">= {low}"
        raise Error(f"{type(opt).__name__}: {key} must be {bound}, found {value!r}")


def _check_betas(opt, group):
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
        raise Error(f"{type(opt).__name__}: betas must be two numbers in [0, 1), found {betas!r}")


def _pick(lists, idx):
    return [lists[i] for i in idx]


def _takes_tensor_lr(rule):
    """Marks a `_rule` whose `lr` may be a 0-d tensor: the compiled step can lower it."""
    rule.takes_tensor_lr = True
    return rule


def _add_scaled_(tensors, others, scale) -> None:
    """`tensors += scale * others` in place: one kernel for a float `scale`; a 0-d tensor
    `scale` (a lowered step's learning rate) goes through a product (no foreach add takes it),
    and there an `other` may be a weight gradient left as a matmul, added by one in-place addmm
    (`luoshu.compiler.inductor.DeferredMatmul`)."""
    if not isinstance(scale, torch.Tensor):
        torch._foreach_add_(tensors, others, alpha=scale)
        return
    dense = [k for k, other in enumerate(others) if isinstance(other, torch.Tensor)]
    for tensor, other in zip(tensors, others):
        if not isinstance(other, torch.Tensor):
            other.add_to_(tensor, scale)
    if dense:
        torch._foreach_add_(_pick(tensors, dense), torch._foreach_mul(_pick(others, dense), scale))


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum, as torch.optim.SGD."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, l1: float = 0.0,
                 max_grad_norm: float | None = None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, l1=l1)
        super().__init__(params, defaults, max_grad_norm)

    def _check_group(self, group):
        _check_range(self, group, "momentum")
        _check_range(self, group, "dampening")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise Error(f"{type(self).__name__}: Nesterov momentum needs momentum > 0 and zero dampening")

    _counts_steps = False

    def _state_names(self, group):
        return ["momentum_buffer"] if group["momentum"] else []

    def _takes_deferred_matmuls(self, group):
        return not group["momentum"]  # the gradient is only added to the parameter

    @_takes_tensor_lr
    def _rule(self, group, params, grads, state, steps, fresh, lr):
        momentum = group["momentum"]
        if momentum:
            bufs = state["momentum_buffer"]
            new = [i for i, f in enumerate(fresh) if f]
            old = [i for i, f in enumerate(fresh) if not f]
            # The first step takes the gradient as the buffer (no dampening), as torch does.
            if new:
                torch._foreach_copy_(_pick(bufs, new), _pick(grads, new))
            if old:
                old_bufs = _pick(bufs, old)
                torch._foreach_mul_(old_bufs, momentum)
                torch._foreach_add_(old_bufs, _pick(grads, old), alpha=1.0 - group["dampening"])
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        _add_scaled_(params, grads, -lr)


class Momentum(SGD):
    """SGD with heavy-ball momentum (Hetu's MomentumOptimizer)."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, l1: float = 0.0,
                 max_grad_norm: float | None = None):
        super().__init__(params, lr, momentum, dampening, nesterov, weight_decay, l1, max_grad_norm)


class Nesterov(SGD):
    """SGD with Nesterov momentum."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 l1: float = 0.0, max_grad_norm: float | None = None):
        super().__init__(params, lr, momentum, 0.0, True, weight_decay, l1, max_grad_norm)


class AdaGrad(Optimizer):
    """AdaGrad, as torch.optim.Adagrad (per-parameter lr decay by step count)."""

    def __init__(self, params, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, l1: float = 0.0,
                 max_grad_norm: float | None = None):
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps, l1=l1)
        super().__init__(params, defaults, max_grad_norm)

    def _check_group(self, group):
        for key in ("lr_decay", "initial_accumulator_value", "eps"):
            _check_range(self, group, key)

    def _state_names(self, group):
        return ["sum"]

    def _initial_state(self, group, name, param):
        return torch.full_like(param, group["initial_accumulator_value"], memory_format=torch.contiguous_format)

    @_takes_tensor_lr
    def _rule(self, group, params, grads, state, steps, fresh, lr):
        sums = state["sum"]
        if isinstance(lr, torch.Tensor):  # traced: the fused kernel's formula (FusedAdagradKernel)
            torch._foreach_addcmul_(sums, grads, grads)
            for p, g, s, step in zip(params, grads, sums, steps):
                clr = lr / (1.0 + (step - 1.0) * group["lr_decay"])
                p.sub_(clr * g / (s.sqrt() + group["eps"]))
            return
        for idx in _groups_by_device_dtype(params):
            # The fused kernel reads the (already incremented) step counters, never writes them.
            torch._fused_adagrad_(_pick(params, idx), _pick(grads, idx), _pick(sums, idx), _pick(steps, idx),
                                  lr=lr, lr_decay=group["lr_decay"], weight_decay=0.0,
                                  eps=group["eps"], maximize=False)


Adagrad = AdaGrad


class RMSProp(Optimizer):
    """RMSProp with optional momentum and centring, as torch.optim.RMSprop."""

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False,
                 l1: float = 0.0, max_grad_norm: float | None = None):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        centered=centered, l1=l1)
        super().__init__(params, defaults, max_grad_norm)

    def _check_group(self, group):
        _check_range(self, group, "alpha", 0.0, 1.0, high_open=False)
        _check_range(self, group, "eps")
        _check_range(self, group, "momentum")

    def _state_names(self, group):
        names = ["square_avg"]
        if group["momentum"] > 0:
            names.append("momentum_buffer")
        if group["centered"]:
            names.append("grad_avg")
        return names

    @_takes_tensor_lr
    def _rule(self, group, params, grads, state, steps, fresh, lr):
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
            _add_scaled_(params, bufs, -lr)
        elif isinstance(lr, torch.Tensor):  # no foreach addcdiv takes a 0-d tensor value
            _add_scaled_(params, torch._foreach_div(grads, avg), -lr)
        else:
            torch._foreach_addcdiv_(params, grads, avg, value=-lr)


RMSprop = RMSProp


class Adam(Optimizer):
    """Adam (weight_decay is L2 added to the gradient) with optional AMSGrad, as torch.optim.Adam."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, l1: float = 0.0,
                 max_grad_norm: float | None = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, l1=l1)
        super().__init__(params, defaults, max_grad_norm)

    def _check_group(self, group):
        _check_betas(self, group)
        _check_range(self, group, "eps")

    def _state_names(self, group):
        names = ["exp_avg", "exp_avg_sq"]
        if group["amsgrad"]:
            names.append("max_exp_avg_sq")
        return names

    @_takes_tensor_lr
    def _rule(self, group, params, grads, state, steps, fresh, lr):
        beta1, beta2 = group["betas"]
        amsgrad = group["amsgrad"]
        decoupled = self.decoupled_weight_decay
        if isinstance(lr, torch.Tensor):
            return _traced_adam(group, params, grads, state, steps, lr, decoupled)
        kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        for idx in _groups_by_device_dtype(params):
            # The fused kernels read the (already incremented) step counters, never write them.
            kernel(_pick(params, idx), _pick(grads, idx), _pick(state["exp_avg"], idx),
                   _pick(state["exp_avg_sq"], idx), _pick(state["max_exp_avg_sq"], idx) if amsgrad else [],
                   _pick(steps, idx), lr=lr, beta1=beta1, beta2=beta2,
                   weight_decay=group["weight_decay"] if decoupled else 0.0, eps=group["eps"],
                   amsgrad=amsgrad, maximize=False)


def _traced_adam(group, params, grads, state, steps, lr, decoupled) -> None:
    """Adam's update for a tensor `lr`: the fused kernels' formula (FusedAdamKernel) in tensor ops."""
    beta1, beta2 = group["betas"]
    eps, amsgrad = group["eps"], group["amsgrad"]
    decay = group["weight_decay"] if decoupled else 0.0
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


class AdamW(Adam):
    """Adam with decoupled weight decay, as torch.optim.AdamW."""

    decoupled_weight_decay = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, l1: float = 0.0,
                 max_grad_norm: float | None = None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, l1, max_grad_norm)


class LAMB(Optimizer):
    """LAMB (You et al. 2019; NVIDIA apex FusedLAMB without gradient averaging).

    update = m̂ / (√v̂ + eps) + weight_decay · p (bias-corrected Adam moments);
    p -= lr · (‖p‖ / ‖update‖) · update, the trust ratio taken as 1 where either norm is 0.
    For a sparse gradient the norms are those of the touched rows.
    """

    decoupled_weight_decay = True
    per_parameter_norms = True  # the trust ratio needs whole-parameter norms: not on tensor-parallel shards

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, l1: float = 0.0, max_grad_norm: float | None = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, l1=l1)
        super().__init__(params, defaults, max_grad_norm)

    def _check_group(self, group):
        _check_betas(self, group)
        _check_range(self, group, "eps")

    def _state_names(self, group):
        return ["exp_avg", "exp_avg_sq"]

    def _rule(self, group, params, grads, state, steps, fresh, lr):
        beta1, beta2 = group["betas"]
        update = torch._foreach_mul(params, 0.0) if group["weight_decay"] == 0 else \
            torch._foreach_mul(params, group["weight_decay"])
        for idx in _groups_by_device_dtype(params):
            # The fused Adam kernel with lr = -1 adds the bias-corrected Adam step
            # m̂ / (√v̂ + eps) to `update` (and advances the moments) in one pass.
            torch._fused_adam_(_pick(update, idx), _pick(grads, idx), _pick(state["exp_avg"], idx),
                               _pick(state["exp_avg_sq"], idx), [], _pick(steps, idx), lr=-1.0, beta1=beta1,
                               beta2=beta2, weight_decay=0.0, eps=group["eps"], amsgrad=False, maximize=False)
        for idx in _groups_by_device_dtype(params):
            ps, us = _pick(params, idx), _pick(update, idx)
            p_norm = torch.stack(torch._foreach_norm(ps))
            u_norm = torch.stack(torch._foreach_norm(us))
            ratio = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, torch.ones_like(p_norm))
            torch._foreach_mul_(us, list(ratio.unbind(0)))
            torch._foreach_add_(ps, us, alpha=-lr)


# The one name -> optimizer table: `luoshu train`, the parameter servers and the data-parallel
# modes all read it.
OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD, "momentum": Momentum, "nesterov": Nesterov, "adam": Adam, "adamw": AdamW, "adagrad": AdaGrad,
    "rmsprop": RMSProp, "lamb": LAMB,
}


def optimizer_name(opt: Optimizer) -> str | None:
    """The table name of `opt`'s class (None for a class outside the table)."""
    return next((name for name, cls in OPTIMIZERS.items() if type(opt) is cls), None)
