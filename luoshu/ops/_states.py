"""The vocabulary of distributed-states rules: layouts, candidates, and the rule helpers ops share.

An operator's `deduce_states(input_ds, _io=None, **attrs)` returns its outputs' states
when its inputs' states suit it. When they do not, it raises `NeedStates` with the
layouts it can run in (`Candidate`: the states it wants of each input, and what its
outputs then are); the compiler's states pass picks the cheapest candidate by the
communication it costs and inserts the comm ops (PyTorch DTensor's sharding strategies
work the same way). `_io` carries the global input and output shapes (`OpIO`).

Rules here cover one-key layouts over a group of n devices: pure duplicate, pure
partial, or one dimension split n ways (DTensor's Replicate / Partial / Shard(d) on a
1-D mesh), which is what a tensor-parallel group needs.
"""

from __future__ import annotations

from typing import NamedTuple

from luoshu.core.dstates import DUPLICATE, PARTIAL, DStates
from luoshu.core.errors import OpError


class OpIO(NamedTuple):
    """The global shapes of an op's inputs and outputs (None for a dimension known at run time)."""

    inputs: tuple
    outputs: tuple


class Candidate(NamedTuple):
    """A layout an op runs in: wanted states per input (None: any) and the outputs' states."""

    inputs: tuple
    outputs: tuple


class NeedStates(OpError):
    """The inputs' states suit no layout of the op; `candidates` are the layouts it can run in."""

    def __init__(self, op: str, candidates: list[Candidate], found):
        self.candidates = candidates
        super().__init__(
            f"op '{op}' has no layout for input states {[_show(d) for d in found]}; it can run with "
            f"{[[_show(d) for d in c.inputs] for c in candidates[:6]]}"
        )


def _show(ds) -> str:
    if ds is None:
        return "-"
    if ds is WHOLE:
        return "whole"
    k = key(ds)
    return {DUPLICATE: "dup", PARTIAL: "partial"}.get(k, f"split({k})")


class _Whole:
    """A wanted state for inputs read only for their shape (`like` of sum_to, reshape_like...):
    anything not split (duplicate or partial) has the full local shape."""

    def __repr__(self) -> str:
        return "WHOLE"


WHOLE = _Whole()


def dup(n: int) -> DStates:
    return DStates(n, {DUPLICATE: n})


def partial(n: int) -> DStates:
    return DStates(n, {PARTIAL: n})


def split(n: int, dim: int) -> DStates:
    return DStates(n, {dim: n})


def key(ds: DStates | None) -> int:
    """The one key of a one-key layout: DUPLICATE, PARTIAL or the split dimension."""
    if ds is None or not ds.states:
        return DUPLICATE
    if len(ds.states) != 1:
        raise OpError(
            f"states {ds.states} mix several keys; the rules take one duplicate, partial or split key "
            "over a tensor-parallel group"
        )
    return next(iter(ds.states))


def is_partial(ds) -> bool:
    return ds is not None and key(ds) == PARTIAL


def split_dim(ds) -> int | None:
    k = key(ds)
    return k if k >= 0 else None


def group_size(input_ds) -> int | None:
    for ds in input_ds:
        if ds is not None:
            return ds.device_num
    return None


def same(a, b) -> bool:
    """Equal layouts (None counts as duplicate; WHOLE matches duplicate and partial)."""
    if a is WHOLE or b is WHOLE:
        other = b if a is WHOLE else a
        return other is WHOLE or key(other) in (DUPLICATE, PARTIAL)
    return key(a) == key(b) and (a is None or b is None or a.device_num == b.device_num)


def choose(op: str, candidates: list[Candidate], input_ds) -> list:
    """The outputs of the first candidate the inputs match exactly; else NeedStates."""
    for c in candidates:
        if all(w is None or same(w, d) for w, d in zip(c.inputs, input_ds)):
            return list(c.outputs)
    raise NeedStates(op, candidates, input_ds)


def divisible(size, n: int) -> bool:
    return size is not None and size % n == 0


# --- shared rules -----------------------------------------------------------------------
def elementwise(op: str, input_ds, io: OpIO, linear="none", outputs: int = 1) -> list:
    """Broadcasting elementwise ops. `linear`: "all" (add/sub: partial when every input is
    partial), a tuple of input indices (mul: any one partial, the others duplicate), "none"."""
    n = group_size(input_ds)
    if n is None or n == 1:
        return [input_ds[0] if input_ds else None] * outputs
    out = io.outputs[0]
    cands = [Candidate(tuple(dup(n) for _ in input_ds), (dup(n),) * outputs)]
    found_splits = {split_dim(d) + len(out) - len(s) for d, s in zip(input_ds, io.inputs) if split_dim(d) is not None}
    for d, size in enumerate(out):
        if not (divisible(size, n) or (size is None and d in found_splits)):
            continue
        wanted = []
        for s in io.inputs:
            di = d - (len(out) - len(s))
            wanted.append(dup(n) if di < 0 or s[di] == 1 else split(n, di))
        cands.append(Candidate(tuple(wanted), (split(n, d),) * outputs))
    if linear == "all":
        cands.append(Candidate(tuple(partial(n) for _ in input_ds), (partial(n),) * outputs))
    elif linear != "none":
        for i in linear:
            if i < len(input_ds):
                cands.append(
                    Candidate(
                        tuple(partial(n) if j == i else dup(n) for j in range(len(input_ds))), (partial(n),) * outputs
                    )
                )
    return choose(op, cands, input_ds)


def mapped(op: str, input_ds, ndim: int, dim_map, linear: bool = True, outputs: int = 1, extra: int = 0) -> list:
    """One tensor input whose split dim d becomes output dim `dim_map(d)` (None: not expressible);
    partial passes through when `linear`. `extra` inputs (shape-only or index inputs) stay duplicate."""
    x = input_ds[0]
    n = group_size(input_ds)
    if n is None or n == 1:
        return [x] * outputs
    rest = (dup(n),) * extra
    cands = [Candidate((dup(n),) + rest, (dup(n),) * outputs)]
    if linear:
        cands.append(Candidate((partial(n),) + rest, (partial(n),) * outputs))
    for d in range(ndim):
        o = dim_map(d)
        if o is not None:
            cands.append(Candidate((split(n, d),) + rest, (split(n, o),) * outputs))
    return choose(op, cands, list(input_ds[: 1 + extra]) + [None] * (1 + extra - len(input_ds)))


def reshape_dim(in_shape, out_shape, d: int, n: int) -> int | None:
    """Where a split of input dim `d` (n ways) lands after a reshape, or None when the split
    does not stay one contiguous block of one output dim."""
    groups = _reshape_groups(tuple(in_shape), tuple(out_shape))
    if groups is None or in_shape[d] is not None and in_shape[d] % n:
        return None
    for ins, outs in groups:
        if d not in ins:
            continue
        major_in = next((i for i in ins if in_shape[i] != 1), None)
        major_out = next((o for o in outs if out_shape[o] != 1), None)
        if major_in != d or major_out is None:
            return None
        size = out_shape[major_out]
        if size is None:
            return major_out if in_shape[d] is None and len(ins) == len(outs) == 1 else None
        return major_out if size % n == 0 else None
    return None


def _reshape_groups(a: tuple, b: tuple):
    """`_pair_dims`, first pairing leading unknown dims with each other, then (for reshapes that
    merge an unknown batch dim with others, e.g. (B, T, E) -> (-1, E)) not."""
    return _pair_dims(a, b, True) or _pair_dims(a, b, False)


def _pair_dims(a: tuple, b: tuple, unknown_head: bool):
    """Pairs (input dims, output dims) of equal products, in order; None when they cannot be
    matched. Equal leading and trailing dims pair one to one; what remains in the middle
    pairs by products, or, when it holds a size known only at run time, as one group."""
    head = []
    while (
        len(head) < min(len(a), len(b)) and a[len(head)] == b[len(head)] and (unknown_head or a[len(head)] is not None)
    ):
        head.append(len(head))
    tail = []
    while len(tail) < min(len(a), len(b)) - len(head) and a[len(a) - 1 - len(tail)] == b[len(b) - 1 - len(tail)]:
        tail.append(len(tail))
    groups = [([i], [i]) for i in head]
    mid_a = list(range(len(head), len(a) - len(tail)))
    mid_b = list(range(len(head), len(b) - len(tail)))
    if mid_a or mid_b:
        if not mid_a or not mid_b:
            if any(a[i] != 1 for i in mid_a) or any(b[j] != 1 for j in mid_b):
                return None
            if groups:
                groups[-1][0].extend(mid_a)
                groups[-1][1].extend(mid_b)
        elif any(a[i] is None for i in mid_a) or any(b[j] is None for j in mid_b):
            groups.append((mid_a, mid_b))
        else:
            groups += _product_groups(a, b, mid_a, mid_b)
            if groups and groups[-1] is None:
                return None
    groups += [([len(a) - 1 - k], [len(b) - 1 - k]) for k in reversed(tail)]
    return groups


def _product_groups(a, b, mid_a, mid_b) -> list:
    groups, i, j = [], 0, 0
    while i < len(mid_a) and j < len(mid_b):
        ins, outs, pa, pb = [mid_a[i]], [mid_b[j]], a[mid_a[i]], b[mid_b[j]]
        while pa != pb:
            if pa < pb:
                i += 1
                if i >= len(mid_a):
                    return [None]
                ins.append(mid_a[i])
                pa *= a[mid_a[i]]
            else:
                j += 1
                if j >= len(mid_b):
                    return [None]
                outs.append(mid_b[j])
                pb *= b[mid_b[j]]
        groups.append((ins, outs))
        i, j = i + 1, j + 1
    if i < len(mid_a) or j < len(mid_b):
        return [None]
    return groups


def local_size(size, ds, dim: int):
    """The local extent of global dim `dim` under `ds`."""
    if size is None or size == -1 or split_dim(ds) != dim:
        return size
    return size // ds.device_num
