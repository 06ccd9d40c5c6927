"""The registry-driven operator check: every op against torch.autograd, in both modes.

A family's cases live in `tests/ops/cases_<family>.py` as `CASES = [OpCase(...), ...]`.
Each case gives a luoshu call and the equivalent torch expression; the harness feeds
both the same random float64 inputs, compares the outputs, then compares the gradients
for random output cotangents against `torch.autograd.grad` — once eagerly and once
through a define-and-run graph, where it also checks that `infer` predicted the shapes
and dtypes the kernels produced. With `second_order=True` it also compares the
gradient of the gradient.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import luoshu as ls

ATOL = 1e-6
RTOL = 1e-6


@dataclass
class Ints:
    """An integer input: uniform in [low, high)."""

    shape: tuple
    low: int = 0
    high: int = 5
    dtype: str = "int64"


@dataclass
class Positive:
    """A float64 input in [low, high) — for log, sqrt, pow bases."""

    shape: tuple
    low: float = 0.5
    high: float = 2.0


@dataclass
class Const:
    """A fixed array input (for indices, masks, exact values)."""

    value: Any
    grad: bool = False


@dataclass
class OpCase:
    """One check of one operator.

    `fn` takes luoshu tensors, `ref` takes torch tensors; both get the inputs in the
    same order and return a tensor or a tuple of them. A shape tuple means a float64
    N(0, 1) input that gets a gradient. `grad=False` skips the gradient check (ops
    with integer or boolean results). `seed` re-seeds luoshu before each call and is
    passed to `ref` as a torch.Generator (random ops). `tol` overrides 1e-6.
    """

    name: str
    fn: Callable
    ref: Callable
    inputs: list = field(default_factory=list)
    grad: bool = True
    second_order: bool = False
    seed: int | None = None
    tol: float = ATOL
    eager_only: bool = False
    dynamic: bool = False  # graph placeholders get a run-time (None) first dimension

    def __repr__(self) -> str:
        return self.name


def make_inputs(case: OpCase, rng: np.random.Generator):
    arrays, grads = [], []
    for spec in case.inputs:
        if isinstance(spec, tuple):
            arrays.append(rng.standard_normal(spec))
            grads.append(True)
        elif isinstance(spec, Positive):
            arrays.append(rng.uniform(spec.low, spec.high, spec.shape))
            grads.append(True)
        elif isinstance(spec, Ints):
            arrays.append(rng.integers(spec.low, spec.high, spec.shape).astype(spec.dtype))
            grads.append(False)
        elif isinstance(spec, Const):
            arrays.append(np.asarray(spec.value))
            grads.append(spec.grad)
        else:
            raise TypeError(f"bad input spec {spec!r}")
    return arrays, grads


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _torch_reference(case, arrays, grads, rng):
    ts = [torch.tensor(a, requires_grad=g) for a, g in zip(arrays, grads)]
    args = ts if case.seed is None else ts + [torch.Generator().manual_seed(case.seed)]
    outs = _as_tuple(case.ref(*args))
    cotangents = [rng.standard_normal(tuple(o.shape)) if o.is_floating_point() else None for o in outs]
    result = {"outs": [o.detach().numpy() for o in outs], "cot": cotangents}
    if not case.grad:
        return result
    diff = [t for t, g in zip(ts, grads) if g]
    pairs = [(o, torch.tensor(c)) for o, c in zip(outs, cotangents) if c is not None and o.requires_grad]
    gs = torch.autograd.grad([o for o, _ in pairs], diff, [c for _, c in pairs], allow_unused=True,
                             create_graph=case.second_order)
    result["grads"] = [None if g is None else g.detach().numpy() for g in gs]
    if case.second_order:
        weights = [rng.standard_normal(tuple(g.shape)) for g in gs if g is not None]
        total = sum((g * torch.tensor(w)).sum() for g, w in zip([g for g in gs if g is not None], weights))
        gg = (torch.autograd.grad(total, diff, allow_unused=True) if torch.is_tensor(total) and total.requires_grad
              else [None] * len(diff))
        result["weights"] = weights
        result["grads2"] = [None if g is None else g.numpy(force=True) for g in gg]
    return result


def _close(actual, expected, what, tol):
    if expected is None:
        assert actual is None or np.allclose(np.asarray(actual), 0, atol=tol), f"{what}: expected no gradient"
        return
    if actual is None:  # no gradient means zero; torch sometimes materialises the zeros
        assert np.allclose(expected, 0, atol=tol), f"{what}: luoshu gave no gradient, torch a non-zero one"
        return
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != torch {expected.shape}"
    if expected.dtype == bool or np.issubdtype(expected.dtype, np.integer):
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    else:
        np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol, err_msg=what)


def _to_numpy(x):
    if x is None:
        return None
    if isinstance(x, (ls.IndexedSlices, ls.IndexedSlicesValue)):
        return x.to_dense() if isinstance(x, ls.IndexedSlicesValue) else x.to_dense().numpy()
    return x.numpy() if isinstance(x, ls.Tensor) else np.asarray(x)


def run_eager(case, arrays, grads, ref, device="cpu"):
    if case.seed is not None:
        ls.manual_seed(case.seed)
    xs = [ls.tensor(a, requires_grad=g, device=device) for a, g in zip(arrays, grads)]
    outs = _as_tuple(case.fn(*xs))
    for i, (o, e) in enumerate(zip(outs, ref["outs"])):
        _close(o.numpy(), e, f"{case.name} eager output {i}", case.tol)
    if not case.grad:
        return
    diff = [x for x, g in zip(xs, grads) if g]
    ys = [o for o, c in zip(outs, ref["cot"]) if c is not None and o.requires_grad]
    cots = [ls.tensor(c, device=device) for o, c in zip(outs, ref["cot"]) if c is not None and o.requires_grad]
    gs = ls.gradients(ys, diff, cots, create_graph=case.second_order)
    for i, (g, e) in enumerate(zip(gs, ref["grads"])):
        _close(_to_numpy(g), e, f"{case.name} eager gradient of input {i}", case.tol)
    if case.second_order:
        present = [g for g in gs if g is not None]
        total = sum((g * ls.tensor(w, device=device)).sum() for g, w in zip(present, ref["weights"]))
        gg = ls.gradients(total, diff)
        for i, (g, e) in enumerate(zip(gg, ref["grads2"])):
            _close(_to_numpy(g), e, f"{case.name} eager second-order gradient of input {i}", case.tol)


def build_graph(case, arrays, grads, ref, device="cpu"):
    """Records the case (outputs, gradients, second-order gradients) into a new graph."""
    gs = gg = None
    if case.seed is not None:
        ls.manual_seed(case.seed)
    with ls.Graph() as g:
        phs = [ls.placeholder(f"in{i}", ((None,) + a.shape[1:]) if case.dynamic and a.ndim else a.shape,
                              str(a.dtype), device) for i, a in enumerate(arrays)]
        outs = _as_tuple(case.fn(*phs))
        marks = [len(g.ops)]  # where the forward ops end, then the first-order gradient ops
        fetches = list(outs)
        feed = {p: a for p, a in zip(phs, arrays)}
        if case.grad:
            diff = [p for p, gr in zip(phs, grads) if gr]
            pairs = [(o, c) for o, c in zip(outs, ref["cot"]) if c is not None]
            cot_phs = [ls.placeholder(f"cot{i}", c.shape, "float64", device) for i, (_, c) in enumerate(pairs)]
            feed.update({p: c for p, (_, c) in zip(cot_phs, pairs)})
            gs = ls.gradients([o for o, _ in pairs], diff, cot_phs)
            marks.append(len(g.ops))
            fetches += [x for x in gs if x is not None]
            if case.second_order:
                present = [x for x in gs if x is not None]
                w_phs = [ls.placeholder(f"w{i}", w.shape, "float64", device)
                         for i, w in enumerate(ref["weights"])]
                feed.update({p: w for p, w in zip(w_phs, ref["weights"])})
                total = sum((x * w).sum() for x, w in zip(present, w_phs))
                gg = ls.gradients(total, diff)
                fetches += [x for x in gg if x is not None]
    g.case_marks = marks
    return g, outs, fetches, feed, gs, gg


def run_graph(case, arrays, grads, ref, device="cpu"):
    g, outs, fetches, feed, gs, gg = build_graph(case, arrays, grads, ref, device)
    if case.seed is not None:
        ls.manual_seed(case.seed)
    values = g.run(fetches, feed)
    for t, v in zip(fetches, values):  # infer must predict what the kernels produce
        if isinstance(t, ls.Tensor) and v is not None:
            assert len(t.shape) == np.ndim(v) and all(d is None or d == s for d, s in zip(t.shape, np.shape(v))), \
                f"{case.name}: infer said shape {t.shape}, kernel gave {np.shape(v)}"
    for i, e in enumerate(ref["outs"]):
        _close(values[i], e, f"{case.name} graph output {i}", case.tol)
    if case.grad:
        pos = len(outs)
        for i, e in enumerate(ref["grads"]):
            got = None
            if gs[i] is not None:
                got = _to_numpy(values[pos])
                pos += 1
            _close(got, e, f"{case.name} graph gradient of input {i}", case.tol)
        if case.second_order:
            for i, e in enumerate(ref["grads2"]):
                got = None
                if gg[i] is not None:
                    got = _to_numpy(values[pos])
                    pos += 1
                _close(got, e, f"{case.name} graph second-order gradient of input {i}", case.tol)


def _prepare(case):
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    arrays, grads = make_inputs(case, rng)
    return arrays, grads, _torch_reference(case, arrays, grads, rng)


def check(case: OpCase, device: str = "cpu") -> None:
    """Runs one case in both modes on `device` against torch on the CPU."""
    arrays, grads, ref = _prepare(case)
    run_eager(case, arrays, grads, ref, device)
    if not case.eager_only:
        run_graph(case, arrays, grads, ref, device)


def ops_exercised(case: OpCase) -> set[str]:
    """The op names a case's graph (forward, gradients, second order) contains."""
    arrays, grads, ref = _prepare(case)
    g = build_graph(case, arrays, grads, ref)[0]
    return {op.opdef.name for op in g.ops}


def ops_checked(case: OpCase) -> set[str]:
    """The ops a case checks in full, as its own: the ops of its forward graph, whose outputs and (with
    `grad`) gradients are compared with torch, and, in a `second_order` case, the ops of its first-order
    gradient graph (a fused `*_backward` op among them), whose gradients the second-order comparison
    checks. An op met only as a first-order helper has had its output checked, never its gradient."""
    arrays, grads, ref = _prepare(case)
    g = build_graph(case, arrays, grads, ref)[0]
    upto = g.case_marks[1] if case.second_order and len(g.case_marks) > 1 else g.case_marks[0]
    return {op.opdef.name for op in g.ops[:upto]}
