"""Reverse-mode automatic differentiation over the IR: gradients are graph ops.

The same walk serves both modes: in define-and-run it records gradient ops into the
graph; in eager mode they compute at once (and record history only with
`create_graph=True`, which is what makes higher-order gradients work).
"""

from __future__ import annotations

import contextlib

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
    if isinstance(existing, IndexedSlices) and isinstance(grad, IndexedSlices):
        return IndexedSlices(apply("concat", existing.indices, grad.indices, axis=0),
                             apply("concat", existing.values, grad.values, axis=0),
                             existing.dense_shape)
    if isinstance(grad, IndexedSlices):
        existing, grad = grad, existing
    if isinstance(existing, IndexedSlices):
        return apply("index_add", grad, existing.indices, existing.values, axis=0)
    return apply("add", existing, grad)


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

    grads: dict[int, object] = {}
    for y, gy in zip(ys, grad_ys):
        if _key(y) not in reaches:
            continue
        seed = _ones_like(y) if gy is None else _seed(y, gy)
        grads[_key(y)] = accumulate(grads.get(_key(y)), seed)

    ready_after = _ready_positions(relevant, xs) if on_ready is not None else {}
    for pos, op in enumerate(reversed(relevant)):
        for i in ready_after.pop(pos - 1, ()):
            on_ready(i, grads.get(_key(xs[i])))
        keys = [(id(op), i) for i in range(len(op._outputs))]
        outs = [(grads.get(k) if k in x_ids else grads.pop(k, None)) for k in keys]
        if all(g is None for g in outs):
            continue
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
            grads[_key(t)] = accumulate(grads.get(_key(t)), g)
    for pos in sorted(ready_after):
        for i in ready_after[pos]:
            on_ready(i, grads.get(_key(xs[i])))
    return [grads.get(_key(x)) for x in xs]


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
