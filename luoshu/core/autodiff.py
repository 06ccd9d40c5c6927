"""Reverse-mode automatic differentiation over the IR: gradients are graph ops.

The same walk serves both modes: in define-and-run it records gradient ops into the
graph; in eager mode they compute at once (and record history only with
`create_graph=True`, which is what makes higher-order gradients work).
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from luoshu.core import context, dtypes
from luoshu.core import op as op_module
from luoshu.core.errors import GradientError, GraphError
from luoshu.core.op import apply, as_tensor, topological_ops
from luoshu.core.tensor import IndexedSlices, Tensor


def accumulate(existing, grad):
    """Sums two gradients, keeping IndexedSlices sparse when both are."""
    if existing is None:
        return grad
    if grad is None:
        return existing
    return sum_gradients([existing, grad])


def sum_gradients(contributions: list):
    """One gradient from its contributions, in arrival order: the dense ones in one n-ary `add_n`
    (so the states pass sees them all at once: it adds the partial ones locally and all-reduces
    their sum once), the sparse ones concatenated (IndexedSlices stay sparse), then the sparse
    rows added into the dense sum."""
    dense = [g for g in contributions if not isinstance(g, IndexedSlices)]
    sparse = [g for g in contributions if isinstance(g, IndexedSlices)]
    total = None
    if dense:
        total = dense[0] if len(dense) == 1 else apply("add_n", *dense)
    if sparse:
        rows = sparse[0]
        if len(sparse) > 1:
            rows = IndexedSlices(apply("concat", *(s.indices for s in sparse), axis=0),
                                 apply("concat", *(s.values for s in sparse), axis=0),
                                 sparse[0].dense_shape)
        total = rows if total is None else apply("index_add", total, rows.indices, rows.values, axis=0)
    return total


def _densify(grad):
    return grad.to_dense() if isinstance(grad, IndexedSlices) else grad


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def gradients(ys, xs, grad_ys=None, create_graph: bool = False, on_ready=None):
    """d(sum of ys · grad_ys)/d(xs), one entry per x (None where x does not affect ys).

    `grad_ys` defaults to ones. In define-and-run the result is a list of graph tensors
    (fetch them with `graph.run`); in eager mode it is computed at once. `on_ready(i, grad)`,
    if given, is called as soon as the gradient of `xs[i]` is final, while the rest of the
    backward pass still runs (data parallelism starts its all-reduce there).
    """
    ys, xs = _as_list(ys), _as_list(xs)
    grad_ys = [None] * len(ys) if grad_ys is None else _as_list(grad_ys)
    if len(grad_ys) != len(ys):
        raise GradientError(f"gradients: {len(ys)} ys but {len(grad_ys)} grad_ys")
    for t in ys + xs:
        if not isinstance(t, Tensor):
            raise GradientError(f"gradients takes tensors, found {type(t).__name__}")
    graph = next((t.graph for t in ys if t.graph is not None), None)
    if graph is not None and context.current_graph() is not graph:
        scope = graph
    elif graph is None and context.current_graph() is not None:
        raise GraphError("gradients of eager tensors cannot be built inside a define-and-run graph")
    else:
        scope = contextlib.nullcontext()
    grad_mode = context.enable_grad() if create_graph or graph is not None else context.no_grad()
    with scope, grad_mode, context.autocast_scope(None):
        grads = _backprop(ys, xs, grad_ys, graph, on_ready)
        if graph is None and op_module.eager_to_states is not None:  # eager TP: each in its x's states
            grads = [op_module.eager_to_states(g, x) for g, x in zip(grads, xs)]
        return grads


def _key(t: Tensor):
    """A tensor's identity for the walk: (op, output index), stable even if an eager
    op rebuilds a dropped output tensor."""
    producer = t.producer
    return id(t) if producer is None else (id(producer[0]), producer[1])


def _backprop(ys, xs, grad_ys, graph, on_ready=None):
    order = topological_ops(ys, graph)
    x_ids = {_key(x) for x in xs}
    # Only ops on a path from some x to some y take part.
    reaches = set(x_ids)
    relevant = []
    for op in order:
        # Non-differentiable ops (integer results, *_like constants) pass no gradient.
        if op.opdef.differentiable and any(_key(t) in reaches for t in op.inputs):
            relevant.append(op)
            reaches.update((id(op), i) for i in range(len(op._outputs)))

    # A tensor's gradient contributions wait in a list until its producer's gradient rule (or the
    # caller) reads them, then are summed at once (`sum_gradients`).
    grads: dict = {}

    def final(key, pop: bool):
        parts = grads.pop(key, None) if pop else grads.get(key)
        if not isinstance(parts, list):
            return parts
        total = sum_gradients(parts)
        if not pop:
            grads[key] = total
        return total

    for y, gy in zip(ys, grad_ys):
        if _key(y) not in reaches:
            continue
        seed = _ones_like(y) if gy is None else _seed(y, gy)
        grads.setdefault(_key(y), []).append(seed)

    ready_after = _ready_positions(relevant, xs) if on_ready is not None else {}
    for pos, op in enumerate(reversed(relevant)):
        for i in ready_after.pop(pos - 1, ()):
            on_ready(i, final(_key(xs[i]), pop=False))
        keys = [(id(op), i) for i in range(len(op._outputs))]
        outs = [final(k, pop=k not in x_ids) for k in keys]
        if all(g is None for g in outs):
            continue
        if graph is not None:
            for primal, g in zip(op._outputs, outs):
                if isinstance(g, Tensor) and g.graph is graph:
                    graph.gradient_of.setdefault(id(g), (g, []))[1].append(primal)
        elif op_module.eager_to_states is not None:  # eager tensor parallelism: the same record, weakly
            for primal, g in zip(op._outputs, outs):
                if isinstance(g, Tensor):
                    _record_eager_gradient(g, primal)
        outs = [_densify(g) for g in outs]
        op.needs_grad = tuple(_key(t) in reaches for t in op.inputs)
        in_grads = op.opdef.gradient(op, outs)
        if len(in_grads) != len(op.inputs):
            raise GradientError(f"op '{op.opdef.name}': gradient rule returned {len(in_grads)} "
                                f"gradients for {len(op.inputs)} inputs")
        for t, g in zip(op.inputs, in_grads):
            if g is None or _key(t) not in reaches:
                continue
            if isinstance(g, Tensor) and g.dtype != t.dtype and dtypes.is_floating(t.dtype):
                g = apply("cast", g, dtype=t.dtype)
            grads.setdefault(_key(t), []).append(g)
    for pos in sorted(ready_after):
        for i in ready_after[pos]:
            on_ready(i, final(_key(xs[i]), pop=False))
    return [final(_key(x), pop=False) for x in xs]


# id(eager gradient tensor) -> (weakref to it, weakrefs to the tensors it is the gradient of): the
# eager counterpart of `Graph.gradient_of`, kept while the gradient lives (keyed by identity, as
# Tensor's == is an op)
EAGER_GRADIENT_OF: dict[int, tuple] = {}


def _record_eager_gradient(g: Tensor, primal: Tensor) -> None:
    entry = EAGER_GRADIENT_OF.get(id(g))
    if entry is None or entry[0]() is not g:
        key = id(g)
        entry = EAGER_GRADIENT_OF[key] = (weakref.ref(g, lambda _: EAGER_GRADIENT_OF.pop(key, None)), [])
    entry[1].append(weakref.ref(primal))


def eager_gradient_of(t: Tensor) -> list[Tensor]:
    """The live tensors eager tensor `t` is the gradient of (recorded under eager tensor parallelism)."""
    entry = EAGER_GRADIENT_OF.get(id(t))
    if entry is None or entry[0]() is not t:
        return []
    return [p for p in (ref() for ref in entry[1]) if p is not None]


def _ready_positions(relevant, xs) -> dict[int, list[int]]:
    """For `on_ready`: the position in the backward walk after which each x's gradient is final."""
    last: dict = {}
    for pos, op in enumerate(reversed(relevant)):
        for t in op.inputs:
            last[_key(t)] = pos
    ready: dict[int, list[int]] = {}
    for i, x in enumerate(xs):
        ready.setdefault(last.get(_key(x), -1), []).append(i)
    return ready


def _ones_like(y: Tensor):
    if y.shape == ():  # a scalar loss: the seed is a constant, no op to run each step
        return Tensor.from_value(torch.ones((), dtype=dtypes.to_torch(y.dtype), device=y.device))
    return apply("ones_like", y)


def _seed(y: Tensor, gy):
    if not isinstance(gy, Tensor):
        gy = as_tensor(gy, [y])
    if gy.dtype != y.dtype:
        gy = apply("cast", gy, dtype=y.dtype)
    return gy


def backward(y: Tensor, gradient=None, create_graph: bool = False) -> None:
    """Eager `y.backward()`: accumulates into `.grad` of the leaves that require grad."""
    if y._value is None:
        raise GraphError(f"backward() is for eager tensors; {y!r} is symbolic: use "
                         "luoshu.gradients(loss, xs) or optimizer.minimize(loss) in define-and-run")
    if not y.requires_grad:
        raise GradientError("backward(): the tensor does not require grad (no input of it does)")
    if gradient is None and y._value.numel() != 1:
        raise GradientError(f"backward() without a gradient needs a scalar, found shape {y.shape}")
    leaves, seen = [], set()
    if y.producer is None:
        leaves.append(y)
    for op in topological_ops([y]):
        for t in op.inputs:
            if t.producer is None and t.requires_grad and id(t) not in seen:
                seen.add(id(t))
                leaves.append(t)
    grads = gradients([y], leaves, [gradient], create_graph=create_graph)
    with context.no_grad() if not create_graph else contextlib.nullcontext():
        for leaf, g in zip(leaves, grads):
            if g is not None:
                leaf.grad = accumulate(leaf.grad, g)
