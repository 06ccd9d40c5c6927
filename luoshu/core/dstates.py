"""Distributed states of a tensor (Hetu 2 / HotSPa): how it is split, duplicated or partial.

The IR carries these on every tensor (`Tensor.ds`, one per parallel strategy) so that
operators can state how they transform them; the deduction pass and the comm-op
insertion live in the compiler and `luoshu.distributed`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from luoshu.core.errors import Error

DUPLICATE = -1
PARTIAL = -2


@dataclass(frozen=True)
class DeviceGroup:
    """The ranks a tensor lives on, in order."""

    ranks: tuple[int, ...]

    def __init__(self, ranks):
        ranks = tuple(int(r) for r in ranks)
        if not ranks or len(set(ranks)) != len(ranks):
            raise Error(f"DeviceGroup needs distinct ranks, found {ranks}")
        object.__setattr__(self, "ranks", ranks)

    def __len__(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class DStates:
    """`states` maps a dimension to its split count, -1 to duplicates and -2 to partials.

    `order` says how the device index decomposes over those keys (major to minor).
    Example: 4 devices, {0: 2, -1: 2}: rows split in two, each half on two devices.
    """

    device_num: int
    states: dict = field(default_factory=dict)
    order: tuple = ()

    def __post_init__(self):
        states = {int(k): int(v) for k, v in self.states.items() if int(v) > 1}
        order = tuple(self.order) if self.order else tuple(sorted(states))
        if math.prod(states.values()) != self.device_num:
            raise Error(
                f"DStates over {self.device_num} devices: the split, duplicate and partial "
                f"counts {states} must multiply to {self.device_num}"
            )
        if set(order) != set(states):
            raise Error(f"DStates order {order} must list exactly the keys of {states}")
        object.__setattr__(self, "states", states)
        object.__setattr__(self, "order", order)

    @classmethod
    def duplicate(cls, device_num: int) -> DStates:
        return cls(device_num, {DUPLICATE: device_num})

    def is_pure_duplicate(self) -> bool:
        return all(k == DUPLICATE for k in self.states)

    def get(self, key: int) -> int:
        return self.states.get(key, 1)
