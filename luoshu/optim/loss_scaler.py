"""`LossScaler`: dynamic loss scaling for fp16 training, with torch.amp.GradScaler's rules.

The scale grows by `growth_factor` after `growth_interval` steps without an inf/nan
gradient and shrinks by `backoff_factor` on every step that has one, which is skipped.

Eager: `scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update()`.
Define-and-run: `optimizer.minimize(loss, loss_scaler=scaler)`; the scale is a leaf
tensor read at run time, and the update op unscales, skips on overflow and updates
the scale, all inside the one step.
"""

from __future__ import annotations

import torch

from luoshu.core import live
from luoshu.core.errors import CheckpointError, Error
from luoshu.core.op import get_opdef
from luoshu.core.tensor import IndexedSlices, Tensor
from luoshu.distributed import env
from luoshu.optim.optimizer import _groups_by_device_dtype


class LossScaler:
    """Multiplies the loss by a dynamic scale so small fp16 gradients do not flush to zero."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True):
        if not init_scale > 0:
            raise Error(f"LossScaler: init_scale must be positive, found {init_scale}")
        if not growth_factor > 1.0:
            raise Error(f"LossScaler: growth_factor must be > 1, found {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise Error(f"LossScaler: backoff_factor must be in (0, 1), found {backoff_factor}")
        if not isinstance(growth_interval, int) or growth_interval < 1:
            raise Error(f"LossScaler: growth_interval must be a positive integer, found {growth_interval!r}")
        self.enabled = enabled
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self._init_scale = float(init_scale)
        self._init_growth_tracker = 0
        self._scale: torch.Tensor | None = None  # float32, created on the loss's device
        self._growth_tracker: torch.Tensor | None = None  # int32
        self._scale_leaf: Tensor | None = None
        # per optimizer (by id): {"found_inf": tensor, "stage": "unscaled" | "stepped"}
        self._per_optimizer: dict[int, dict] = {}
        # ranks whose overflow checks must agree (`agree_across`); None: this process decides alone
        self.agreement_group: tuple | None = None
        self._key = live.register(self)  # what optimizer_update names in its attributes

    def __repr__(self) -> str:
        return f"LossScaler(scale={self.get_scale()}, enabled={self.enabled})"

    def _lazy_init(self, device) -> None:
        if self._scale is None:
            self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=device)
            self._growth_tracker = torch.full((), self._init_growth_tracker, dtype=torch.int32, device=device)
            self._scale_leaf = Tensor.from_value(self._scale, name="loss_scale", kind="buffer")

    # --- public API -------------------------------------------------------------------
    def scale(self, loss: Tensor) -> Tensor:
        """`loss * scale`; in define-and-run the scale is read when the graph runs."""
        if not self.enabled:
            return loss
        self._lazy_init(loss.device)
        return loss * self._scale_leaf

    def agree_across(self, group=()) -> None:
        """Makes every step's overflow check agree on all ranks of `group` (a DeviceGroup or its
        ranks; default every worker): the found-inf flag is all-reduced over it, so a step one rank
        skips is skipped everywhere and the scales stay equal. A sharded job needs it: its ranks
        hold other gradients (tensor-parallel shards, pipeline stages). A collective each step."""
        self.agreement_group = tuple(getattr(group, "ranks", group) or ())

    def get_scale(self) -> float:
        if not self.enabled:
            return 1.0
        return self._init_scale if self._scale is None else float(self._scale.item())

    def unscale_(self, optimizer) -> None:
        """Divides the optimizer's `.grad`s by the scale and records whether any is inf/nan.

        The unscaled gradients replace `.grad` (eager gradients may be broadcast views or
        shared between parameters, so they are not written in place).
        """
        if not self.enabled:
            return
        state = self._per_optimizer.get(id(optimizer))
        if state is not None:
            raise Error("LossScaler.unscale_() was already called on this optimizer since the last update()"
                        if state["stage"] == "unscaled" else "LossScaler.unscale_() is called after step()")
        params = [p for p in optimizer.parameters() if p.grad is not None]
        tensors = [p.grad.values.value if isinstance(p.grad, IndexedSlices) else p.grad.value for p in params]
        unscaled, found_inf = self._unscaled_copies(tensors)
        for p, value in zip(params, unscaled):
            g = p.grad
            p.grad = (IndexedSlices(g.indices, Tensor.from_value(value), g.dense_shape)
                      if isinstance(g, IndexedSlices) else Tensor.from_value(value))
        self._per_optimizer[id(optimizer)] = {"found_inf": found_inf, "stage": "unscaled"}

    def step(self, optimizer, *args, **kwargs):
        """Unscales (unless `unscale_` did) and runs `optimizer.step()` unless a gradient is inf/nan."""
        if not self.enabled:
            return optimizer.step(*args, **kwargs)
        state = self._per_optimizer.get(id(optimizer))
        if state is not None and state["stage"] == "stepped":
            raise Error("LossScaler.step() was already called on this optimizer since the last update()")
        if state is None:
            self.unscale_(optimizer)
            state = self._per_optimizer[id(optimizer)]
        result = None
        if not float(state["found_inf"].item()):
            result = optimizer.step(*args, **kwargs)
        state["stage"] = "stepped"
        return result

    def update(self, new_scale: float | None = None) -> None:
        """Updates the scale from the inf checks recorded since the last update."""
        if not self.enabled:
            return
        if new_scale is not None:
            if self._scale is None:
                self._init_scale = float(new_scale)
            else:
                self._scale.fill_(float(new_scale))
        else:
            found = [s["found_inf"] for s in self._per_optimizer.values()]
            if not found:
                raise Error("LossScaler.update(): no inf checks were recorded; call step() or unscale_() first")
            total = found[0]
            for f in found[1:]:
                total = total + f.to(total.device)
            self._update_scale(total)
        self._per_optimizer.clear()

    # --- inside the update -------------------------------------------------------------
    def _check_and_unscale(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Unscales `tensors` in place; returns found_inf (float32, 1.0 where any is inf/nan)."""
        device = tensors[0].device if tensors else "cpu"
        self._lazy_init(device)
        found_inf = torch.zeros((), dtype=torch.float32, device=self._scale.device)
        if not tensors:
            return self._agreed(found_inf)
        inv_scale = self._scale.double().reciprocal().float()
        for idx in _groups_by_device_dtype(tensors):
            group = [tensors[i] for i in idx]
            dev = group[0].device
            found = found_inf if dev == found_inf.device else torch.zeros((), dtype=torch.float32, device=dev)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv_scale.to(dev))
            if found is not found_inf:
                found_inf += found.to(found_inf.device)
        return self._agreed(found_inf)

    def _agreed(self, found_inf: torch.Tensor) -> torch.Tensor:
        """found_inf summed over the agreement group (nonzero where any rank found inf/nan)."""
        if self.agreement_group is None or not env.is_distributed():
            return found_inf
        return get_opdef("all_reduce").compute(found_inf, reduce="sum", group=self.agreement_group, async_op=False)

    def _update_scale(self, found_inf: torch.Tensor) -> None:
        torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf.to(self._scale.device),
                                 self.growth_factor, self.backoff_factor, self.growth_interval)

    def _unscaled_copies(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`tensors` divided by the scale, as new tensors, and found_inf."""
        copies: list = [None] * len(tensors)
        if tensors:
            for idx in _groups_by_device_dtype(tensors):
                for i, t in zip(idx, torch._foreach_mul([tensors[i] for i in idx], 1.0)):
                    copies[i] = t
        return copies, self._check_and_unscale(copies)

    def _unscale_and_update(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
        """One fused step of the update op: unscaled copies, whether to skip, new scale."""
        copies, found_inf = self._unscaled_copies(tensors)
        skip = bool(found_inf.item())
        self._update_scale(found_inf)
        return copies, skip

    # --- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable state, with torch GradScaler's keys."""
        if not self.enabled:
            return {}
        tracker = self._init_growth_tracker if self._growth_tracker is None else int(self._growth_tracker.item())
        return {"scale": self.get_scale(), "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": tracker}

    def load_state_dict(self, state: dict) -> None:
        if not self.enabled:
            return
        keys = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
        if not isinstance(state, dict) or set(state) != keys:
            raise CheckpointError(f"LossScaler.load_state_dict: expected keys {sorted(keys)}, found "
                                  f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        scale, tracker = state["scale"], state["_growth_tracker"]
        if not (isinstance(scale, (int, float)) and scale > 0 and isinstance(tracker, int) and tracker >= 0
                and state["growth_factor"] > 1 and 0 < state["backoff_factor"] < 1
                and isinstance(state["growth_interval"], int) and state["growth_interval"] >= 1):
            raise CheckpointError(f"LossScaler.load_state_dict: invalid values {state}")
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = state["growth_interval"]
        if self._scale is None:  # created on first use, on the loss's device
            self._init_scale, self._init_growth_tracker = float(scale), tracker
        else:
            self._scale.fill_(float(scale))
            self._growth_tracker.fill_(tracker)
