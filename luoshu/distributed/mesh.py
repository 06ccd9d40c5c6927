"""`DeviceMesh`: the job's worker ranks arranged over named parallel axes (pp, dp, tp).

Rank order follows Megatron-LM: the tensor-parallel axis varies fastest, then data
parallel, then pipeline, so the ranks of one TP group are adjacent (on one node, where
the frequent TP collectives want the fastest links):

    rank = pp_index * (dp * tp) + dp_index * tp + tp_index

With dp=2, tp=2: TP groups (0, 1) and (2, 3), DP groups (0, 2) and (1, 3). The process
group of each axis is created once (on first use) and cached by `luoshu.distributed`.
"""

from __future__ import annotations

import math

from luoshu.core.dstates import DeviceGroup
from luoshu.distributed import env
from luoshu.distributed.env import DistError

AXES = ("pp", "dp", "tp")  # major to minor


class DeviceMesh:
    """The worker ranks as a (pp, dp, tp) grid; `group(axis)` is this rank's group along an axis."""

    def __init__(self, dp: int = 1, tp: int = 1, pp: int = 1, world_size: int | None = None, rank: int | None = None):
        sizes = {"pp": pp, "dp": dp, "tp": tp}
        for name, size in sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise DistError(f"DeviceMesh: {name} must be a positive int, found {size!r}")
        if world_size is None:
            env.init()
            world_size = env.world_size()
        self.rank = env.rank() if rank is None else int(rank)
        product = math.prod(sizes.values())
        if product != world_size:
            raise DistError(
                f"DeviceMesh(dp={dp}, tp={tp}, pp={pp}): dp * tp * pp = {product} must equal the world "
                f"size {world_size}"
            )
        if not 0 <= self.rank < world_size:
            raise DistError(f"DeviceMesh: rank {self.rank} is outside the world of {world_size}")
        self.sizes = sizes
        self.world_size = world_size
        self._groups: dict[str, DeviceGroup] = {}

    @property
    def dp(self) -> int:
        return self.sizes["dp"]

    @property
    def tp(self) -> int:
        return self.sizes["tp"]

    @property
    def pp(self) -> int:
        return self.sizes["pp"]

    def __repr__(self) -> str:
        return f"DeviceMesh(dp={self.dp}, tp={self.tp}, pp={self.pp}, rank={self.rank})"

    def _axis(self, axis: str) -> str:
        if axis not in self.sizes:
            raise DistError(f"DeviceMesh: unknown axis {axis!r}; the axes are {AXES}")
        return axis

    def coordinate(self, rank: int | None = None) -> dict[str, int]:
        """{"pp": i, "dp": j, "tp": k} of `rank` (default: this rank)."""
        rank = self.rank if rank is None else rank
        tp_index = rank % self.tp
        dp_index = (rank // self.tp) % self.dp
        return {"pp": rank // (self.tp * self.dp), "dp": dp_index, "tp": tp_index}

    def rank_of(self, pp: int = 0, dp: int = 0, tp: int = 0) -> int:
        return pp * self.dp * self.tp + dp * self.tp + tp

    def index(self, axis: str) -> int:
        """This rank's position along `axis`."""
        return self.coordinate()[self._axis(axis)]

    def group(self, axis: str, rank: int | None = None) -> DeviceGroup:
        """The ranks that share every coordinate with `rank` but `axis`, in axis order."""
        axis = self._axis(axis)
        if rank is None and axis in self._groups:
            return self._groups[axis]
        coord = self.coordinate(rank)
        ranks = [self.rank_of(**{**coord, axis: i}) for i in range(self.sizes[axis])]
        group = DeviceGroup(ranks)
        if rank is None:
            self._groups[axis] = group
        return group

    def groups(self, axis: str) -> list[DeviceGroup]:
        """Every group along `axis` (e.g. all TP groups), ordered by their first rank."""
        seen, out = set(), []
        for r in range(self.world_size):
            g = self.group(axis, r)
            if g.ranks not in seen:
                seen.add(g.ranks)
                out.append(g)
        return out

    def process_group(self, axis: str):
        """The torch process group of this rank's `axis` group (created once, cached; None in one process)."""
        if not env.is_distributed():
            return None
        return env.process_group(self.group(axis))

    def batch_slice(self, global_batch: int) -> slice:
        """The rows of a global batch this rank feeds: its DP share (TP and PP peers feed the same rows)."""
        if global_batch % self.dp:
            raise DistError(f"DeviceMesh: the global batch of {global_batch} rows does not split over dp={self.dp}")
        share = global_batch // self.dp
        start = self.index("dp") * share
        return slice(start, start + share)
