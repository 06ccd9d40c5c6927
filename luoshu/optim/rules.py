"""`UpdateRule`: one optimizer's update rule applied to tensors the caller owns — the
parameter servers apply `luoshu.optim`'s own rules to the rows they hold through it.

A rule is built from a name of `OPTIMIZERS` and its hyperparameters, exactly as the
optimizer class takes them, so a server-side update equals the worker-side lazy sparse
update of the same optimizer. `apply` runs the optimizer's regularisation and rule on one
tensor with one step counter. `apply_row_steps` is the variant for tables whose rows count
their own steps (Adam, AdamW, AdaGrad: each row's bias correction or learning-rate decay
uses the number of updates that row has had), which the optimizer classes have no need for.
"""

from __future__ import annotations

import numpy as np
import torch

from luoshu.core.errors import Error
from luoshu.core.tensor import tensor as _make_tensor
from luoshu.optim.optimizers import OPTIMIZERS

ROW_STEP_RULES = frozenset({"adam", "adamw", "adagrad"})
STEPLESS_RULES = frozenset({"sgd", "momentum", "nesterov", "rmsprop"})  # row steps change nothing for them


class UpdateRule:
    """The update rule of optimizer `name` with hyperparameters `hyper` (an `Error` for an
    unknown name or bad hyperparameters)."""

    def __init__(self, name: str, hyper: dict, row_steps: bool = False):
        name = str(name).lower()
        if name not in OPTIMIZERS:
            raise Error(f"unknown optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}")
        if row_steps and name not in ROW_STEP_RULES | STEPLESS_RULES:
            raise Error(f"per-row steps are supported for {sorted(ROW_STEP_RULES)}, not {name!r}")
        if row_steps and hyper.get("amsgrad"):
            raise Error("per-row steps do not support amsgrad")
        if "max_grad_norm" in hyper:
            raise Error("max_grad_norm (global clipping) needs every gradient at once; an update rule sees one tensor")
        try:
            # A one-element stand-in parameter: the optimizer validates and fills the hyperparameters.
            self._opt = OPTIMIZERS[name]([_make_tensor(np.zeros(1, dtype=np.float32))], **hyper)
        except TypeError as exc:
            raise Error(f"bad hyperparameters for {name!r}: {exc}") from None
        self.name = name
        self.row_steps = row_steps and name in ROW_STEP_RULES
        self.group = self._opt.param_groups[0]
        self.state_names: list[str] = self._opt._state_names(self.group)
        self.counts_steps: bool = self._opt._counts_steps

    def initial_state(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A fresh state tensor `name` for a parameter like `like`."""
        return self._opt._initial_state(self.group, name, like)

    def apply(self, param: torch.Tensor, grad: torch.Tensor, state: dict, step: torch.Tensor, fresh: bool,
              row_steps: torch.Tensor | None = None) -> None:
        """Updates `param` and `state` (contiguous, owned) in place; `step` is already
        incremented; `row_steps` (per row, already incremented) when built with `row_steps`."""
        if self.row_steps:
            self._apply_row_steps(param, grad, state, row_steps)
            return
        grads = self._opt._regularize(self.group, [param], [grad])
        self._opt._rule(self.group, [param], grads, {n: [state[n]] for n in self.state_names}, [step], [fresh],
                        self.group["lr"])

    def _apply_row_steps(self, param, grad, state, t) -> None:
        group = self.group
        lr = group["lr"]
        t = t.to(param.dtype).unsqueeze(1)
        if self.name == "adagrad":
            grad = self._opt._regularize(group, [param], [grad])[0]
            state["sum"].addcmul_(grad, grad)
            clr = lr / (1.0 + (t - 1.0) * group["lr_decay"])
            param.sub_(clr * grad / (state["sum"].sqrt() + group["eps"]))
            return
        beta1, beta2 = group["betas"]
        if self._opt.decoupled_weight_decay:
            param.mul_(1.0 - lr * group["weight_decay"])
        else:
            grad = self._opt._regularize(group, [param], [grad])[0]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(grad, 1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bc1 = 1.0 - beta1 ** t
        bc2_sqrt = (1.0 - beta2 ** t).sqrt()
        param.sub_((lr / bc1) * m / (v.sqrt() / bc2_sqrt + group["eps"]))
