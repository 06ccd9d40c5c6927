"""Learning-rate schedulers: they write `group["lr"]`, which every update reads.

Because the update (eager `step()` or the define-and-run update op) reads the learning
rate from the parameter group each time it runs, a scheduler also steers a graph that
is already compiled. The torch-named schedulers follow torch.optim.lr_scheduler's
(chainable) formulas step for step; `LinearWarmup` and `CosineWarmup` are closed forms.
"""

from __future__ import annotations

import bisect
import math

from luoshu.core.errors import CheckpointError, Error
from luoshu.optim.optimizer import Optimizer


class LRScheduler:
    """Base class: `step()` advances `last_epoch` and sets each group's lr from `get_lr()`."""

    def __init__(self, optimizer, last_epoch: int = -1):
        if not isinstance(optimizer, Optimizer):
            raise Error(f"{type(self).__name__} needs a luoshu optimizer, found {type(optimizer).__name__}")
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        elif any("initial_lr" not in g for g in optimizer.param_groups):
            raise Error(f"{type(self).__name__}: resuming at last_epoch={last_epoch} needs 'initial_lr' in "
                        "every parameter group")
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = last_epoch
        self._initial = True
        self.step()
        self._initial = False

    def get_lr(self) -> list[float]:
        raise NotImplementedError

    def _current_lrs(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def step(self) -> None:
        self.last_epoch += 1
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = list(lrs)

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict:
        """The scheduler's state as a JSON-serialisable dict (the optimizer is not included)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()
                if k not in ("optimizer", "_initial")}

    def load_state_dict(self, state: dict) -> None:
        expected = set(self.state_dict())
        if not isinstance(state, dict) or set(state) != expected:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"{type(self).__name__}.load_state_dict: expected keys {sorted(expected)}, "
                                  f"found {found}")
        for key in ("base_lrs", "_last_lr"):
            if key in state and len(state[key]) != len(self.optimizer.param_groups):
                raise CheckpointError(f"{type(self).__name__}.load_state_dict: {key} has {len(state[key])} "
                                      f"entries for {len(self.optimizer.param_groups)} parameter groups")
        self.__dict__.update(state)


class StepLR(LRScheduler):
    """Multiplies the lr by `gamma` every `step_size` steps."""

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1):
        if not isinstance(step_size, int) or step_size < 1:
            raise Error(f"StepLR: step_size must be a positive integer, found {step_size!r}")
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._current_lrs()
        return [lr * self.gamma for lr in self._current_lrs()]


class MultiStepLR(LRScheduler):
    """Multiplies the lr by `gamma` at each milestone (a milestone listed twice counts twice)."""

    def __init__(self, optimizer, milestones, gamma: float = 0.1, last_epoch: int = -1):
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        hits = bisect.bisect_right(self.milestones, self.last_epoch) - bisect.bisect_left(self.milestones,
                                                                                           self.last_epoch)
        if not hits:
            return self._current_lrs()
        return [lr * self.gamma ** hits for lr in self._current_lrs()]


class ExponentialLR(LRScheduler):
    """Multiplies the lr by `gamma` every step."""

    def __init__(self, optimizer, gamma: float, last_epoch: int = -1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch == 0:
            return self._current_lrs()
        return [lr * self.gamma for lr in self._current_lrs()]


class CosineAnnealingLR(LRScheduler):
    """Cosine annealing from the base lr to `eta_min` over `T_max` steps (torch's recursion)."""

    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1):  # noqa: N803
        if not isinstance(T_max, int) or T_max < 1:
            raise Error(f"CosineAnnealingLR: T_max must be a positive integer, found {T_max!r}")
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        t, T, eta_min = self.last_epoch, self.T_max, self.eta_min  # noqa: N806
        if self._initial and t == 0:
            return self._current_lrs()
        if self._initial:
            return [eta_min + (base - eta_min) * (1 + math.cos(t * math.pi / T)) / 2 for base in self.base_lrs]
        if (t - 1 - T) % (2 * T) == 0:
            return [lr + (base - eta_min) * (1 - math.cos(math.pi / T)) / 2
                    for lr, base in zip(self._current_lrs(), self.base_lrs)]
        return [(1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T)) * (lr - eta_min) + eta_min
                for lr in self._current_lrs()]


class LinearWarmup(LRScheduler):
    """Ramps the lr linearly from `start_factor`·base to base over `warmup_steps`, then holds it."""

    def __init__(self, optimizer, warmup_steps: int, start_factor: float = 0.0, last_epoch: int = -1):
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise Error(f"LinearWarmup: warmup_steps must be a positive integer, found {warmup_steps!r}")
        if not 0.0 <= start_factor <= 1.0:
            raise Error(f"LinearWarmup: start_factor must be in [0, 1], found {start_factor}")
        self.warmup_steps, self.start_factor = warmup_steps, start_factor
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        frac = min(self.last_epoch, self.warmup_steps) / self.warmup_steps
        factor = self.start_factor + (1.0 - self.start_factor) * frac
        return [base * factor for base in self.base_lrs]


class CosineWarmup(LRScheduler):
    """Linear warmup from 0 to the base lr over `warmup_steps`, then cosine decay to `min_lr`
    at `total_steps`, where it stays (the usual transformer schedule)."""

    def __init__(self, optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0, last_epoch: int = -1):
        if not (isinstance(warmup_steps, int) and isinstance(total_steps, int) and 0 <= warmup_steps < total_steps):
            raise Error(f"CosineWarmup: needs integers 0 <= warmup_steps < total_steps, found {warmup_steps} "
                        f"and {total_steps}")
        self.warmup_steps, self.total_steps, self.min_lr = warmup_steps, total_steps, min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        t = self.last_epoch
        if t < self.warmup_steps:
            return [base * t / self.warmup_steps for base in self.base_lrs]
        progress = min(1.0, (t - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return [self.min_lr + (base - self.min_lr) * cosine for base in self.base_lrs]


class ReduceLROnPlateau:
    """Multiplies the lr by `factor` when a metric stops improving for `patience` steps."""

    def __init__(self, optimizer, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0, min_lr=0.0,
                 eps: float = 1e-8):
        if not 0.0 < factor < 1.0:
            raise Error(f"ReduceLROnPlateau: factor must be in (0, 1), found {factor}")
        if mode not in ("min", "max") or threshold_mode not in ("rel", "abs"):
            raise Error(f"ReduceLROnPlateau: mode must be 'min' or 'max' and threshold_mode 'rel' or 'abs', "
                        f"found {mode!r} and {threshold_mode!r}")
        groups = optimizer.param_groups
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != len(groups):
                raise Error(f"ReduceLROnPlateau: {len(min_lr)} min_lr values for {len(groups)} parameter groups")
            self.min_lrs = [float(m) for m in min_lr]
        else:
            self.min_lrs = [float(min_lr)] * len(groups)
        self.optimizer = optimizer
        self.mode, self.factor, self.patience = mode, factor, patience
        self.threshold, self.threshold_mode = threshold, threshold_mode
        self.cooldown, self.eps = cooldown, eps
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.last_epoch = 0
        self._last_lr = [g["lr"] for g in groups]

    def _is_better(self, current: float) -> bool:
        if self.mode == "min":
            return current < (self.best * (1.0 - self.threshold) if self.threshold_mode == "rel"
                              else self.best - self.threshold)
        return current > (self.best * (1.0 + self.threshold) if self.threshold_mode == "rel"
                          else self.best + self.threshold)

    def step(self, metric) -> None:
        current = float(metric)
        self.last_epoch += 1
        if self._is_better(current):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad steps during cooldown do not count
        if self.num_bad_epochs > self.patience:
            for group, min_lr in zip(self.optimizer.param_groups, self.min_lrs):
                new_lr = max(group["lr"] * self.factor, min_lr)
                if group["lr"] - new_lr > self.eps:
                    group["lr"] = new_lr
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state: dict) -> None:
        expected = set(self.state_dict())
        if not isinstance(state, dict) or set(state) != expected:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"ReduceLROnPlateau.load_state_dict: expected keys {sorted(expected)}, "
                                  f"found {found}")
        if state["mode"] not in ("min", "max") or state["threshold_mode"] not in ("rel", "abs") \
                or len(state["min_lrs"]) != len(self.optimizer.param_groups):
            raise CheckpointError(f"ReduceLROnPlateau.load_state_dict: invalid state {state}")
        self.__dict__.update(state)
