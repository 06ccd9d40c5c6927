"""The hot-switch planner (HotSPa): move a parameter (or accumulated gradient) from its
layout under one parallel strategy to its layout under another, with as little traffic on
the busiest device as the layouts allow.

A layout is a tensor's `DStates` over an ordered list of ranks: every rank holds one box of
the tensor (splits cut it, duplicates repeat it). The planner

1. intersects the source and destination cuts of every dimension into elementary slices;
2. for every slice a destination rank needs and does not already hold, picks a sender
   among the source ranks that hold it: one on the receiver's node if there is any (a node
   is `node_size` consecutive ranks), then the one with the fewest bytes planned so far,
   largest slices first, so that the largest per-rank send volume is as small as it can be
   made (a receiver's volume is fixed by its destination box; links are full duplex);
3. packs every slice between one (sender, receiver) pair into one message.

`plan_hot_switch(..., policy="fcfs")` is the first-come-first-served baseline: the lowest
source rank that holds a slice sends it. `best_order` chooses the order in which a step visits
its strategies so that the switches between them cost least, starting and ending at the
strategy that owns the parameters (exactly, by Held-Karp). `run_switch` executes a plan as
one batch of point-to-point sends and receives (`run_switches`: the plans of many tensors in
one batch, one message per peer); `simulate` executes it in one process for tests and cost
estimates.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from luoshu.core.dstates import DUPLICATE, PARTIAL, DStates
from luoshu.core.errors import Error

Box = tuple[tuple[int, int], ...]  # (start, stop) per dimension


class HotSwitchError(Error, ValueError):
    """A switch that cannot be planned: mismatched shapes or ranks, partial states, bad policy."""


@dataclass(frozen=True)
class Layout:
    """`states` of a tensor over `ranks` (the i-th rank is device index i of the states)."""

    states: DStates
    ranks: tuple[int, ...]

    def __init__(self, states: DStates, ranks: Sequence[int]):
        ranks = tuple(int(r) for r in ranks)
        if len(ranks) != states.device_num or len(set(ranks)) != len(ranks):
            raise HotSwitchError(
                f"a layout over {states.device_num} devices needs as many distinct ranks, found {ranks}"
            )
        if states.get(PARTIAL) > 1:
            raise HotSwitchError(f"states {states.states} hold partial copies; reduce them before a hot switch")
        object.__setattr__(self, "states", states)
        object.__setattr__(self, "ranks", ranks)

    def boxes(self, shape: Sequence[int]) -> dict[int, Box]:
        """The box each rank holds of a tensor of `shape` (equal splits; a split must divide its dim)."""
        for key, count in self.states.states.items():
            if key >= 0:
                if key >= len(shape):
                    raise HotSwitchError(f"states split dimension {key} of a {len(shape)}-d tensor")
                if shape[key] % count:
                    raise HotSwitchError(f"dimension {key} of size {shape[key]} does not split {count} ways")
        out = {}
        for index, rank in enumerate(self.ranks):
            digits, rest = {}, index
            for key in reversed(self.states.order):  # the last key of `order` varies fastest
                count = self.states.states[key]
                digits[key], rest = rest % count, rest // count
            box = []
            for d, size in enumerate(shape):
                count = self.states.get(d)
                step = size // count
                j = digits.get(d, 0)
                box.append((j * step, (j + 1) * step))
            out[rank] = tuple(box)
        return out


@dataclass
class Message:
    """Every slice one sender sends one receiver, packed into one buffer."""

    sender: int
    receiver: int
    slices: list[Box] = field(default_factory=list)
    nbytes: int = 0


@dataclass
class SwitchPlan:
    shape: tuple[int, ...]
    itemsize: int
    source: Layout
    destination: Layout
    messages: list[Message]
    local: dict[int, list[Box]]  # receiver -> slices it already holds (copied locally)
    node_size: int

    def send_bytes(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for m in self.messages:
            out[m.sender] = out.get(m.sender, 0) + m.nbytes
        return out

    @property
    def max_send_bytes(self) -> int:
        return max(self.send_bytes().values(), default=0)

    @property
    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self.messages)

    @property
    def inter_node_bytes(self) -> int:
        return sum(m.nbytes for m in self.messages if m.sender // self.node_size != m.receiver // self.node_size)


def _cuts(boxes: list[Box], dim: int, size: int) -> list[int]:
    points = {0, size}
    for box in boxes:
        points.update(box[dim])
    return sorted(points)


def _cells(box: Box, cuts: list[list[int]]) -> list[Box]:
    """The elementary slices (between consecutive cuts) that tile `box`."""
    ranges = []
    for (start, stop), points in zip(box, cuts):
        inner = [p for p in points if start <= p <= stop]
        ranges.append(list(zip(inner[:-1], inner[1:])))
    return [tuple(c) for c in itertools.product(*ranges)]


def _inside(cell: Box, box: Box) -> bool:
    return all(b0 <= c0 and c1 <= b1 for (c0, c1), (b0, b1) in zip(cell, box))


def _volume(box: Box) -> int:
    return math.prod(stop - start for start, stop in box)


POLICIES = ("balanced", "fcfs")


def _needs(shape, source: Layout, destination: Layout):
    """(receiver, slice, owners) for every slice a destination rank lacks, plus local slices."""
    src, dst = source.boxes(shape), destination.boxes(shape)
    cuts = [_cuts(list(src.values()) + list(dst.values()), d, n) for d, n in enumerate(shape)]
    needs, local = [], {}
    for receiver, box in dst.items():
        for cell in _cells(box, cuts):
            if receiver in src and _inside(cell, src[receiver]):
                local.setdefault(receiver, []).append(cell)
                continue
            owners = sorted(r for r, b in src.items() if _inside(cell, b))
            needs.append((receiver, cell, owners))
    return needs, local


def _check(shape, source: Layout, destination: Layout, node_size: int, policy: str) -> tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    if policy not in POLICIES:
        raise HotSwitchError(f"policy must be one of {POLICIES}, found {policy!r}")
    if not isinstance(node_size, int) or node_size <= 0:
        raise HotSwitchError(f"node_size must be a positive integer, found {node_size!r}")
    if any(n <= 0 for n in shape):
        raise HotSwitchError(f"a tensor to switch needs a positive static shape, found {shape}")
    return shape


def plan_hot_switch(
    shape: Sequence[int],
    itemsize: int,
    source: Layout,
    destination: Layout,
    *,
    node_size: int = 8,
    policy: str = "balanced",
    load: dict[int, int] | None = None,
) -> SwitchPlan:
    """The messages that turn `source` shards of a tensor of `shape` into `destination` shards.

    `load` (rank -> bytes already planned, updated in place) balances the senders over several
    tensors switched together, as one switch of a whole model does."""
    shape = _check(shape, source, destination, node_size, policy)
    needs, local = _needs(shape, source, destination)
    planned: dict[int, int] = load if load is not None else {}
    for r in source.ranks:
        planned.setdefault(r, 0)
    choice: dict[tuple[int, Box], int] = {}
    order = sorted(needs, key=lambda n: (-_volume(n[1]), n[0], n[1])) if policy == "balanced" else needs
    for receiver, cell, owners in order:
        if policy == "fcfs":
            sender = owners[0]
        else:
            near = [r for r in owners if r // node_size == receiver // node_size]
            sender = min(near or owners, key=lambda r: (planned[r], r))
        planned[sender] += _volume(cell) * itemsize
        choice[(receiver, cell)] = sender
    messages: dict[tuple[int, int], Message] = {}
    for receiver, cell, _ in needs:  # slices in a message keep the destination's order
        sender = choice[(receiver, cell)]
        m = messages.setdefault((sender, receiver), Message(sender, receiver))
        m.slices.append(cell)
        m.nbytes += _volume(cell) * itemsize
    return SwitchPlan(
        shape,
        itemsize,
        source,
        destination,
        sorted(messages.values(), key=lambda m: (m.sender, m.receiver)),
        local,
        node_size,
    )


def brute_force_max_send(
    shape: Sequence[int], itemsize: int, source: Layout, destination: Layout, *, node_size: int = 8
) -> int:
    """The smallest largest-per-rank send volume over every choice of senders that keeps a
    same-node sender wherever one exists (exponential: for checking small cases)."""
    shape = _check(shape, source, destination, node_size, "balanced")
    needs, _ = _needs(shape, source, destination)
    options = []
    for receiver, cell, owners in needs:
        near = [r for r in owners if r // node_size == receiver // node_size]
        options.append([(r, _volume(cell) * itemsize) for r in (near or owners)])
    best = None
    for pick in itertools.product(*options):
        load: dict[int, int] = {}
        for r, nbytes in pick:
            load[r] = load.get(r, 0) + nbytes
        worst = max(load.values(), default=0)
        best = worst if best is None else min(best, worst)
    return best or 0


# --- executing a plan ---------------------------------------------------------------------------------
def _local_slice(cell: Box, box: Box) -> tuple[slice, ...]:
    return tuple(slice(c0 - b0, c1 - b0) for (c0, c1), (b0, _) in zip(cell, box))


def simulate(plan: SwitchPlan, shards: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Runs `plan` in one process: `shards` are the source ranks' local arrays; returns the
    destination ranks' local arrays (what `run_switch` produces on each rank)."""
    src, dst = plan.source.boxes(plan.shape), plan.destination.boxes(plan.shape)
    out = {}
    for receiver, box in dst.items():
        like = next(iter(shards.values()))
        out[receiver] = np.empty(tuple(b1 - b0 for b0, b1 in box), dtype=like.dtype)
        for cell in plan.local.get(receiver, []):
            out[receiver][_local_slice(cell, box)] = shards[receiver][_local_slice(cell, src[receiver])]
    for m in plan.messages:
        packed = np.concatenate([shards[m.sender][_local_slice(c, src[m.sender])].reshape(-1) for c in m.slices])
        pos = 0
        for cell in m.slices:  # the receiver unpacks the one buffer in the same order
            n = _volume(cell)
            view = out[m.receiver][_local_slice(cell, dst[m.receiver])]
            view[...] = packed[pos : pos + n].reshape(view.shape)
            pos += n
    return out


def run_switch(
    plan: SwitchPlan, local: torch.Tensor | None, rank: int, dtype: torch.dtype = torch.float32, group=None
) -> torch.Tensor | None:
    """Executes `plan` on this rank: one batch of isend/irecv (one message per peer) plus the
    local copies. `local` is this rank's source shard (None if it holds none); returns its
    destination shard of `dtype` (None if it needs none)."""
    src, dst = plan.source.boxes(plan.shape), plan.destination.boxes(plan.shape)
    out = None
    if rank in dst:
        box = dst[rank]
        out = torch.empty(tuple(b1 - b0 for b0, b1 in box), dtype=dtype)
        for cell in plan.local.get(rank, []):
            out[_local_slice(cell, box)] = local[_local_slice(cell, src[rank])]
    ops, receives = [], []
    for m in plan.messages:
        if m.sender == rank:
            packed = torch.cat([local[_local_slice(c, src[rank])].reshape(-1) for c in m.slices])
            ops.append(dist.P2POp(dist.isend, packed, m.receiver, group))
        elif m.receiver == rank:
            buffer = torch.empty(m.nbytes // plan.itemsize, dtype=out.dtype)
            ops.append(dist.P2POp(dist.irecv, buffer, m.sender, group))
            receives.append((m, buffer))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for m, buffer in receives:
        pos = 0
        for cell in m.slices:
            n = _volume(cell)
            view = out[_local_slice(cell, dst[rank])]
            view.copy_(buffer[pos : pos + n].view(view.shape))
            pos += n
    return out


def run_switches(
    plans: Sequence[SwitchPlan],
    locals_: Sequence[torch.Tensor | None],
    rank: int,
    dtype: torch.dtype = torch.float32,
    group=None,
) -> list[torch.Tensor | None]:
    """Executes several tensors' plans on this rank as one batch of isend/irecv: every slice
    that one sender sends one receiver, over all the tensors, travels in one message.
    Returns this rank's destination shard of each tensor (None where it needs none)."""
    device = next((t.device for t in locals_ if t is not None), torch.device("cpu"))
    outs: list[torch.Tensor | None] = []
    outgoing: dict[int, list[torch.Tensor]] = {}
    incoming: dict[int, list[tuple[int, Message]]] = {}
    for k, (plan, local) in enumerate(zip(plans, locals_)):
        src, dst = plan.source.boxes(plan.shape), plan.destination.boxes(plan.shape)
        out = None
        if rank in dst:
            box = dst[rank]
            out = torch.empty(tuple(b1 - b0 for b0, b1 in box), dtype=dtype, device=device)
            for cell in plan.local.get(rank, []):
                out[_local_slice(cell, box)] = local[_local_slice(cell, src[rank])]
        outs.append(out)
        for m in plan.messages:  # tensors in plan order, slices in message order: both ends agree
            if m.sender == rank:
                outgoing.setdefault(m.receiver, []).extend(
                    local[_local_slice(c, src[rank])].reshape(-1).to(dtype) for c in m.slices
                )
            elif m.receiver == rank:
                incoming.setdefault(m.sender, []).append((k, m))
    ops, buffers = [], []
    for peer in sorted(outgoing):
        ops.append(dist.P2POp(dist.isend, torch.cat(outgoing[peer]), peer, group))
    for peer in sorted(incoming):
        count = sum(m.nbytes // plans[k].itemsize for k, m in incoming[peer])
        buffer = torch.empty(count, dtype=dtype, device=device)
        ops.append(dist.P2POp(dist.irecv, buffer, peer, group))
        buffers.append((peer, buffer))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for peer, buffer in buffers:
        pos = 0
        for k, m in incoming[peer]:
            box = plans[k].destination.boxes(plans[k].shape)[rank]
            for cell in m.slices:
                n = _volume(cell)
                view = outs[k][_local_slice(cell, box)]
                view.copy_(buffer[pos : pos + n].view(view.shape))
                pos += n
    return outs


# --- the order of strategies in a step ------------------------------------------------------------------
def switch_cost(
    shapes: Sequence[Sequence[int]],
    itemsize: int,
    source: Sequence[Layout],
    destination: Sequence[Layout],
    node_size: int = 8,
) -> int:
    """The largest per-rank send volume of switching every tensor (its layouts under two strategies)."""
    load: dict[int, int] = {}
    for shape, s, d in zip(shapes, source, destination):
        for rank, nbytes in plan_hot_switch(shape, itemsize, s, d, node_size=node_size).send_bytes().items():
            load[rank] = load.get(rank, 0) + nbytes
    return max(load.values(), default=0)


def best_order(costs: Sequence[Sequence[float]], owner: int = 0) -> tuple[list[int], float]:
    """The visiting order of strategies (indices into `costs`, costs[i][j] = switching from i to
    j) that starts and ends at `owner` and costs least in total, and among the least the
    lexicographically first path (as trying every order would pick).

    Held-Karp: the cheapest path from `owner` through a set S of the others that ends at j,
    for every S and j (O(2^n n^2) time, O(2^n n) paths kept). Totals add left to right, as a
    path is walked, so the least total is exact wherever sums are (byte counts); with general
    floats it is the least up to rounding."""
    n = len(costs)
    if not 0 <= owner < n:
        raise HotSwitchError(f"owner strategy {owner} is not one of the {n} strategies")
    others = [i for i in range(n) if i != owner]
    m = len(others)
    if m == 0:  # the one order stays at the owner (as trying every order of none says)
        return [owner, owner], 0 + costs[owner][owner]
    # best[S][j]: (cost, path) of the cheapest, then lexicographically first, path that leaves
    # the owner, visits the set S (bits over `others`) and ends at others[j] (a bit of S). Two
    # prefixes of one (S, j) have the same length and end, so ties among them break for good.
    best: list[dict[int, tuple[float, tuple[int, ...]]]] = [{} for _ in range(1 << m)]
    for j, node in enumerate(others):
        best[1 << j][j] = (0 + costs[owner][node], (owner, node))
    for subset in range(1, 1 << m):
        for j, (cost, path) in best[subset].items():
            here = others[j]
            for k in range(m):
                if subset >> k & 1:
                    continue
                entry = (cost + costs[here][others[k]], (*path, others[k]))
                table = best[subset | 1 << k]
                if k not in table or entry < table[k]:
                    table[k] = entry
    full = best[(1 << m) - 1]
    total, path = min((cost + costs[others[j]][owner], (*path, owner)) for j, (cost, path) in full.items())
    return list(path), total


__all__ = [
    "DUPLICATE",
    "HotSwitchError",
    "Layout",
    "Message",
    "POLICIES",
    "SwitchPlan",
    "best_order",
    "brute_force_max_send",
    "plan_hot_switch",
    "run_switch",
    "run_switches",
    "simulate",
    "switch_cost",
]
