"""One mapping per luoshu operator: how an IR op becomes ONNX nodes.

A mapping is `fn(b, op, ins) -> [output name or None per IR output]`: `b` is the graph builder
(`luoshu.onnx.exporter._Builder`), `op` the IR op (its input and output tensors carry shapes and
dtypes, `op.attrs` its attributes), `ins` the ONNX names of its inputs. An output a mapping
does not produce (the saved statistics of `batch_norm`, the indices of `max_pool2d`) is None;
a graph that reads one is refused naming the op. Only inference semantics are mapped:
training-mode batch norm, random ops and gradients have no mapping.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from luoshu.core import dtypes
from luoshu.core.errors import Error

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


class OnnxExportError(Error):
    """A graph that cannot become ONNX: an op without a mapping, or attributes a mapping cannot express."""


MAPPINGS: dict[str, Callable] = {}


def mapping(*names: str):
    def register(fn):
        for name in names:
            MAPPINGS[name] = fn
        return fn

    return register


def _refuse(op, why: str) -> OnnxExportError:
    shapes = ", ".join(str(t.shape) for t in op.inputs)
    return OnnxExportError(f"op '{op.opdef.name}' (inputs {shapes}, attrs {op.attrs}) cannot be exported: {why}")


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def _static(op, t, axis: int, what: str) -> int:
    d = t.shape[axis]
    if d is None:
        raise _refuse(op, f"{what} needs axis {axis} to be static, found a dynamic dimension")
    return d


def _as(b, name: str, t, dtype: str) -> str:
    """`name` (the value of IR tensor `t`) cast to `dtype` if it is not already."""
    return name if t.dtype == dtype else b.cast(name, dtype)


# --- elementwise ------------------------------------------------------------------------
_UNARY = {
    "abs": "Abs",
    "neg": "Neg",
    "relu": "Relu",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
    "exp": "Exp",
    "log": "Log",
    "sqrt": "Sqrt",
    "sin": "Sin",
    "cos": "Cos",
    "erf": "Erf",
    "sign": "Sign",
    "logical_not": "Not",
}


@mapping(*_UNARY)
def _unary(b, op, ins):
    return [b.node(_UNARY[op.opdef.name], ins)]


@mapping("rsqrt")
def _rsqrt(b, op, ins):
    return [b.node("Reciprocal", [b.node("Sqrt", ins)])]


@mapping("log1p")
def _log1p(b, op, ins):
    return [b.node("Log", [b.node("Add", [ins[0], b.scalar(1, op.inputs[0].dtype)])])]


@mapping("silu")
def _silu(b, op, ins):
    return [b.node("Mul", [ins[0], b.node("Sigmoid", ins)])]


@mapping("gelu")
def _gelu(b, op, ins):
    x, dt = ins[0], op.inputs[0].dtype
    half = b.node("Mul", [x, b.scalar(0.5, dt)])
    if op.attrs["approximate"] == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = b.node("Mul", [b.node("Mul", [x, x]), x])
        inner = b.node("Add", [x, b.node("Mul", [cube, b.scalar(0.044715, dt)])])
        t = b.node("Tanh", [b.node("Mul", [inner, b.scalar(math.sqrt(2.0 / math.pi), dt)])])
    else:  # 0.5 x (1 + erf(x / sqrt 2))
        t = b.node("Erf", [b.node("Mul", [x, b.scalar(1.0 / math.sqrt(2.0), dt)])])
    return [b.node("Mul", [half, b.node("Add", [t, b.scalar(1.0, dt)])])]


@mapping("leaky_relu")
def _leaky_relu(b, op, ins):
    return [b.node("LeakyRelu", ins, alpha=float(op.attrs["negative_slope"]))]


@mapping("elu")
def _elu(b, op, ins):
    return [b.node("Elu", ins, alpha=float(op.attrs["alpha"]))]


@mapping("softplus")
def _softplus(b, op, ins):
    beta, threshold = float(op.attrs["beta"]), float(op.attrs["threshold"])
    x, dt = ins[0], op.inputs[0].dtype
    bx = b.node("Mul", [x, b.scalar(beta, dt)])
    soft = b.node("Div", [b.node("Softplus", [bx]), b.scalar(beta, dt)])
    # torch returns x itself where beta * x > threshold
    return [b.node("Where", [b.node("Greater", [bx, b.scalar(threshold, dt)]), x, soft])]


_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max", "minimum": "Min"}


@mapping(*_BINARY)
def _binary(b, op, ins):
    out = op.outputs[0].dtype
    if op.opdef.name == "div" and dtypes.is_integer(out):
        raise _refuse(op, "integer division has no exact ONNX counterpart here")
    return [b.node(_BINARY[op.opdef.name], [_as(b, n, t, out) for n, t in zip(ins, op.inputs)])]


@mapping("add_n")
def _add_n(b, op, ins):
    out = op.outputs[0].dtype
    return [b.node("Sum", [_as(b, n, t, out) for n, t in zip(ins, op.inputs)])]


_COMPARE = {
    "equal": ("Equal", False),
    "not_equal": ("Equal", True),
    "greater": ("Greater", False),
    "greater_equal": ("GreaterOrEqual", False),
    "less": ("Less", False),
    "less_equal": ("LessOrEqual", False),
}


@mapping(*_COMPARE)
def _compare(b, op, ins):
    kind, negate = _COMPARE[op.opdef.name]
    common = dtypes.promote(*(t.dtype for t in op.inputs))
    out = b.node(kind, [_as(b, n, t, common) for n, t in zip(ins, op.inputs)])
    return [b.node("Not", [out]) if negate else out]


_LOGICAL = {"logical_and": "And", "logical_or": "Or", "logical_xor": "Xor"}


@mapping(*_LOGICAL)
def _logical(b, op, ins):
    return [b.node(_LOGICAL[op.opdef.name], [_as(b, n, t, "bool") for n, t in zip(ins, op.inputs)])]


@mapping("where")
def _where(b, op, ins):
    out = op.outputs[0].dtype
    cond = _as(b, ins[0], op.inputs[0], "bool")
    return [b.node("Where", [cond] + [_as(b, n, t, out) for n, t in zip(ins[1:], op.inputs[1:])])]


@mapping("clamp")
def _clamp(b, op, ins):
    dt = op.inputs[0].dtype
    lo, hi = op.attrs["min"], op.attrs["max"]
    args = [ins[0], "" if lo is None else b.scalar(lo, dt), "" if hi is None else b.scalar(hi, dt)]
    while args[-1] == "":
        args.pop()
    return [b.node("Clip", args)]


@mapping("cast")
def _cast(b, op, ins):
    return [b.cast(ins[0], op.attrs["dtype"])]


# --- linear algebra -------------------------------------------------------------------------
def _swap_last(b, name: str, ndim: int) -> str:
    perm = list(range(ndim))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return b.node("Transpose", [name], perm=perm)


@mapping("linear")
def _linear(b, op, ins):
    x = op.inputs[0]
    if x.ndim == 2 and op.inputs[1].ndim == 2:
        return [b.node("Gemm", ins, transB=1)]
    out = b.node("MatMul", [ins[0], _swap_last(b, ins[1], op.inputs[1].ndim)])
    return [b.node("Add", [out, ins[2]]) if len(ins) > 2 else out]


@mapping("matmul")
def _matmul(b, op, ins):
    a, c = ins
    if op.attrs["trans_a"]:
        a = _swap_last(b, a, op.inputs[0].ndim)
    if op.attrs["trans_b"]:
        c = _swap_last(b, c, op.inputs[1].ndim)
    return [b.node("MatMul", [a, c])]


@mapping("addmm")
def _addmm(b, op, ins):
    return [b.node("Gemm", [ins[1], ins[2], ins[0]], alpha=float(op.attrs["alpha"]), beta=float(op.attrs["beta"]))]


@mapping("einsum")
def _einsum(b, op, ins):
    return [b.node("Einsum", ins, equation=op.attrs["equation"])]


# --- reductions and normalisation -------------------------------------------------------------
def _reduce_axes(op) -> list[int]:
    x = op.inputs[0]
    axis = op.attrs["axis"]
    if axis is None:
        return list(range(x.ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return sorted(_axis(a, x.ndim) for a in axes)


_REDUCE = {
    "sum": "ReduceSum",
    "mean": "ReduceMean",
    "max": "ReduceMax",
    "min": "ReduceMin",
    "prod": "ReduceProd",
    "logsumexp": "ReduceLogSumExp",
}


@mapping(*_REDUCE)
def _reduce(b, op, ins):
    x, out = op.inputs[0], op.outputs[0]
    name = _as(b, ins[0], x, out.dtype)  # integer sums widen to int64, integer means are floats
    axes = _reduce_axes(op)
    if not axes:
        return [b.node("Identity", [name])]
    return [b.reduce(_REDUCE[op.opdef.name], name, axes, bool(op.attrs["keepdims"]))]


@mapping("var", "std")
def _var(b, op, ins):
    x, out = op.inputs[0], op.outputs[0]
    axes = _reduce_axes(op)
    count = 1
    for a in axes:
        count *= _static(op, x, a, "var/std")
    name = _as(b, ins[0], x, out.dtype)
    mean = b.reduce("ReduceMean", name, axes, True)
    diff = b.node("Sub", [name, mean])
    sq = b.reduce("ReduceSum", b.node("Mul", [diff, diff]), axes, bool(op.attrs["keepdims"]))
    var = b.node("Div", [sq, b.scalar(max(count - op.attrs["correction"], 0), out.dtype)])
    return [b.node("Sqrt", [var]) if op.opdef.name == "std" else var]


@mapping("norm")
def _norm(b, op, ins):
    if float(op.attrs["ord"]) != 2.0:
        raise _refuse(op, "only the 2-norm is mapped")
    name = _as(b, ins[0], op.inputs[0], op.outputs[0].dtype)
    return [b.reduce("ReduceL2", name, _reduce_axes(op), bool(op.attrs["keepdims"]))]


@mapping("argmax", "argmin")
def _argmax(b, op, ins):
    axis = op.attrs["axis"]
    kind = "ArgMax" if op.opdef.name == "argmax" else "ArgMin"
    if axis is None:
        flat = b.node("Reshape", [ins[0], b.ints([-1])])
        out = b.node(kind, [flat], axis=0, keepdims=0)
        if op.attrs["keepdims"]:
            out = b.node("Reshape", [out, b.ints([1] * op.inputs[0].ndim)])
        return [out]
    return [b.node(kind, ins, axis=int(axis), keepdims=int(bool(op.attrs["keepdims"])))]


@mapping("softmax", "log_softmax")
def _softmax(b, op, ins):
    kind = "Softmax" if op.opdef.name == "softmax" else "LogSoftmax"
    return [b.node(kind, ins, axis=int(op.attrs["axis"]))]


@mapping("cumsum")
def _cumsum(b, op, ins):
    return [b.node("CumSum", [ins[0], b.ints(int(op.attrs["axis"]))], reverse=int(bool(op.attrs["reverse"])))]


@mapping("layer_norm")
def _layer_norm(b, op, ins):
    x = op.inputs[0]
    shape = tuple(op.attrs["normalized_shape"])
    rest = list(ins[1:])
    w = rest.pop(0) if op.attrs["has_weight"] else b.const(np.ones(shape, dtypes.to_numpy(x.dtype)))
    bias = rest.pop(0) if op.attrs["has_bias"] else b.const(np.zeros(shape, dtypes.to_numpy(x.dtype)))
    y = b.node("LayerNormalization", [ins[0], w, bias], axis=-len(shape), epsilon=float(op.attrs["eps"]))
    return [y, None, None]


@mapping("batch_norm")
def _batch_norm(b, op, ins):
    if op.attrs["training"] or not op.attrs["track_running_stats"]:
        raise _refuse(op, "only inference-mode batch norm (running statistics) is mapped")
    x = op.inputs[0]
    channels = _static(op, x, 1, "batch_norm")
    rest = list(ins[1:])
    if op.attrs["affine"]:
        w, bias = rest[0], rest[1]
        rest = rest[2:]
    else:
        w = b.const(np.ones(channels, dtypes.to_numpy(x.dtype)))
        bias = b.const(np.zeros(channels, dtypes.to_numpy(x.dtype)))
    y = b.node("BatchNormalization", [ins[0], w, bias, rest[0], rest[1]], epsilon=float(op.attrs["eps"]))
    return [y] + [None] * (len(op.outputs) - 1)


@mapping("group_norm")
def _group_norm(b, op, ins):
    x = op.inputs[0]
    groups, channels = int(op.attrs["num_groups"]), _static(op, x, 1, "group_norm")
    rest = [_static(op, x, a, "group_norm") for a in range(2, x.ndim)]
    shaped = b.node("Reshape", [ins[0], b.ints([0, groups, -1])])
    mean = b.reduce("ReduceMean", shaped, [2], True)
    diff = b.node("Sub", [shaped, mean])
    var = b.reduce("ReduceMean", b.node("Mul", [diff, diff]), [2], True)
    eps = b.scalar(float(op.attrs["eps"]), x.dtype)
    normed = b.node("Div", [diff, b.node("Sqrt", [b.node("Add", [var, eps])])])
    y = b.node("Reshape", [normed, b.ints([0, channels] + rest)])
    if op.attrs["affine"]:
        bshape = b.ints([channels] + [1] * len(rest))
        y = b.node(
            "Add", [b.node("Mul", [y, b.node("Reshape", [ins[1], bshape])]), b.node("Reshape", [ins[2], bshape])]
        )
    return [y] + [None] * (len(op.outputs) - 1)


@mapping("scaled_dot_product_attention")
def _attention(b, op, ins):
    q, k, v = op.inputs[:3]
    dt = q.dtype
    head = _static(op, q, q.ndim - 1, "attention")
    scale = op.attrs["scale"] if op.attrs["scale"] is not None else 1.0 / math.sqrt(head)
    scores = b.node("Mul", [b.node("MatMul", [ins[0], _swap_last(b, ins[1], k.ndim)]), b.scalar(scale, dt)])
    if op.attrs["is_causal"]:
        L, S = _static(op, q, q.ndim - 2, "causal attention"), _static(op, k, k.ndim - 2, "causal attention")
        scores = b.node("Where", [b.const(np.tril(np.ones((L, S), bool))), scores, b.scalar(-np.inf, dt)])
    if len(ins) > 3:
        mask = op.inputs[3]
        if mask.dtype == "bool":  # True = attend
            scores = b.node("Where", [ins[3], scores, b.scalar(-np.inf, dt)])
        else:
            scores = b.node("Add", [scores, _as(b, ins[3], mask, dt)])
    return [b.node("MatMul", [b.node("Softmax", [scores], axis=-1), ins[2]])]


# --- convolution and pooling ---------------------------------------------------------------
@mapping("convolution")
def _convolution(b, op, ins):
    a = op.attrs
    if a["transposed"]:
        raise _refuse(op, "transposed convolution is not mapped")
    spatial = op.inputs[0].ndim - 2
    pads = [int(p) for p in a["padding"]]
    pads = pads * spatial if len(pads) == 1 else pads
    stride = [int(s) for s in a["stride"]] * (spatial if len(a["stride"]) == 1 else 1)
    dilation = [int(d) for d in a["dilation"]] * (spatial if len(a["dilation"]) == 1 else 1)
    return [b.node("Conv", ins, strides=stride, pads=pads + pads, dilations=dilation, group=int(a["groups"]))]


@mapping("max_pool2d")
def _max_pool(b, op, ins):
    a = op.attrs
    pads = list(a["padding"])
    y = b.node(
        "MaxPool",
        ins,
        kernel_shape=list(a["kernel_size"]),
        strides=list(a["stride"]),
        pads=pads + pads,
        dilations=list(a["dilation"]),
        ceil_mode=int(bool(a["ceil_mode"])),
    )
    return [y, None]


@mapping("avg_pool2d")
def _avg_pool(b, op, ins):
    a = op.attrs
    if a["divisor_override"] is not None:
        raise _refuse(op, "divisor_override has no ONNX counterpart")
    pads = list(a["padding"])
    return [
        b.node(
            "AveragePool",
            ins,
            kernel_shape=list(a["kernel_size"]),
            strides=list(a["stride"]),
            pads=pads + pads,
            ceil_mode=int(bool(a["ceil_mode"])),
            count_include_pad=int(bool(a["count_include_pad"])),
        )
    ]


@mapping("adaptive_avg_pool2d")
def _adaptive_avg_pool(b, op, ins):
    x = op.inputs[0]
    size = [x.shape[-2 + i] if s is None else s for i, s in enumerate(op.attrs["output_size"])]
    if list(size) == [1, 1]:
        return [b.node("GlobalAveragePool", ins)]
    h, w = _static(op, x, 2, "adaptive pooling"), _static(op, x, 3, "adaptive pooling")
    if h % size[0] or w % size[1]:
        raise _refuse(op, f"adaptive pooling of {h}x{w} to {size[0]}x{size[1]} has uneven windows")
    kernel = [h // size[0], w // size[1]]
    return [b.node("AveragePool", ins, kernel_shape=kernel, strides=kernel)]


# --- shapes -------------------------------------------------------------------------------
@mapping("reshape")
def _reshape(b, op, ins):
    shape = [int(d) for d in op.attrs["shape"]]
    if 0 in shape:
        raise _refuse(op, "a zero-sized target dimension")
    return [b.node("Reshape", [ins[0], b.ints(shape)])]


@mapping("reshape_like")
def _reshape_like(b, op, ins):
    return [b.node("Reshape", [ins[0], b.node("Shape", [ins[1]])])]


@mapping("permute")
def _permute(b, op, ins):
    return [b.node("Transpose", ins, perm=[_axis(int(a), op.inputs[0].ndim) for a in op.attrs["axes"]])]


@mapping("transpose")
def _transpose(b, op, ins):
    n = op.inputs[0].ndim
    perm = list(range(n))
    i, j = _axis(op.attrs["axis0"], n), _axis(op.attrs["axis1"], n)
    perm[i], perm[j] = perm[j], perm[i]
    return [b.node("Transpose", ins, perm=perm)]


@mapping("squeeze")
def _squeeze(b, op, ins):
    x, axis = op.inputs[0], op.attrs["axis"]
    if axis is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    else:
        axes = sorted(_axis(a, x.ndim) for a in ((axis,) if isinstance(axis, int) else axis))
    return [b.node("Squeeze", [ins[0], b.ints(axes)]) if axes else b.node("Identity", ins)]


@mapping("unsqueeze")
def _unsqueeze(b, op, ins):
    return [b.node("Unsqueeze", [ins[0], b.ints([_axis(op.attrs["axis"], op.inputs[0].ndim + 1)])])]


@mapping("concat")
def _concat(b, op, ins):
    out = op.outputs[0].dtype
    return [b.node("Concat", [_as(b, n, t, out) for n, t in zip(ins, op.inputs)], axis=int(op.attrs["axis"]))]


@mapping("stack")
def _stack(b, op, ins):
    axis = _axis(int(op.attrs["axis"]), op.inputs[0].ndim + 1)
    out = op.outputs[0].dtype
    parts = [b.node("Unsqueeze", [_as(b, n, t, out), b.ints([axis])]) for n, t in zip(ins, op.inputs)]
    return [b.node("Concat", parts, axis=axis)]


@mapping("split")
def _split(b, op, ins):
    x = op.inputs[0]
    axis = _axis(int(op.attrs["axis"]), x.ndim)
    if op.attrs["sizes"]:
        sizes = [int(s) for s in op.attrs["sizes"]]
    else:  # torch.tensor_split: the first n % sections pieces are one longer
        n, k = _static(op, x, axis, "split"), int(op.attrs["sections"])
        sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    if len(sizes) == 1:
        return [b.node("Identity", ins)]
    return b.node("Split", [ins[0], b.ints(sizes)], n_out=len(sizes), axis=axis)


@mapping("slice")
def _slice(b, op, ins):
    starts, ends, axes, steps = [], [], [], []
    for axis, (a, e, s) in enumerate(zip(op.attrs["starts"], op.attrs["stops"], op.attrs["steps"])):
        step = 1 if s is None else int(s)
        if a is None and e is None and step == 1:
            continue
        starts.append((0 if step > 0 else INT64_MAX) if a is None else int(a))
        ends.append((INT64_MAX if step > 0 else INT64_MIN) if e is None else int(e))
        axes.append(axis)
        steps.append(step)
    if not axes:
        return [b.node("Identity", ins)]
    return [b.node("Slice", [ins[0], b.ints(starts), b.ints(ends), b.ints(axes), b.ints(steps)])]


@mapping("flip")
def _flip(b, op, ins):
    axes = [_axis(int(a), op.inputs[0].ndim) for a in op.attrs["axes"]]
    if not axes:
        return [b.node("Identity", ins)]
    n = len(axes)
    return [b.node("Slice", [ins[0], b.ints([-1] * n), b.ints([INT64_MIN] * n), b.ints(axes), b.ints([-1] * n)])]


@mapping("broadcast_to")
def _broadcast_to(b, op, ins):
    # Expand broadcasts: a target 1 keeps the input's size, which is what torch's -1 means
    shape = [1 if int(d) == -1 else int(d) for d in op.attrs["shape"]]
    return [b.node("Expand", [ins[0], b.ints(shape)])]


@mapping("broadcast_like")
def _broadcast_like(b, op, ins):
    return [b.node("Expand", [ins[0], b.node("Shape", [ins[1]])])]


@mapping("repeat")
def _repeat(b, op, ins):
    repeats = [int(r) for r in op.attrs["repeats"]]
    name, extra = ins[0], len(repeats) - op.inputs[0].ndim
    if extra > 0:  # torch.repeat prepends size-1 dims
        name = b.node("Unsqueeze", [name, b.ints(list(range(extra)))])
    return [b.node("Tile", [name, b.ints(repeats)])]


@mapping("pad")
def _pad(b, op, ins):
    a, x = op.attrs, op.inputs[0]
    pad = [int(p) for p in a["pad"]]
    begins, ends = [0] * x.ndim, [0] * x.ndim
    for i in range(len(pad) // 2):  # torch's pad lists (left, right) from the last axis backwards
        begins[x.ndim - 1 - i], ends[x.ndim - 1 - i] = pad[2 * i], pad[2 * i + 1]
    mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}.get(a["mode"])
    if mode is None:
        raise _refuse(op, f"pad mode {a['mode']!r} is not mapped")
    args = [ins[0], b.ints(begins + ends)]
    if mode == "constant":
        args.append(b.scalar(a["value"], x.dtype))
    return [b.node("Pad", args, mode=mode)]


@mapping("tril", "triu")
def _trilu(b, op, ins):
    return [b.node("Trilu", [ins[0], b.ints(int(op.attrs["k"]))], upper=int(op.opdef.name == "triu"))]


# --- indexing and embeddings --------------------------------------------------------------
@mapping("embedding")
def _embedding(b, op, ins):
    weight, ids = ins
    return [b.node("Gather", [weight, _as(b, ids, op.inputs[1], "int64")], axis=0)]


@mapping("embedding_bag")
def _embedding_bag(b, op, ins):
    a = op.attrs
    weight_t, ids_t = op.inputs[:2]
    if ids_t.ndim != 2 or a["has_offsets"] or a["has_weights"]:
        raise _refuse(op, "only fixed-width bags ((bags, k) ids without offsets or weights) are mapped")
    if a["mode"] not in ("sum", "mean"):
        raise _refuse(op, f"bag mode {a['mode']!r} is not mapped")
    dt = weight_t.dtype
    ids = _as(b, ins[1], ids_t, "int64")
    rows = b.node("Gather", [ins[0], ids], axis=0)  # (bags, k, dim)
    if a["padding_idx"] is not None:  # the padding id contributes nothing and is not counted
        valid = b.cast(b.node("Not", [b.node("Equal", [ids, b.ints(int(a["padding_idx"]))])]), dt)
    else:
        valid = b.cast(b.node("Equal", [ids, ids]), dt)
    summed = b.reduce("ReduceSum", b.node("Mul", [rows, b.node("Unsqueeze", [valid, b.ints([2])])]), [1], False)
    if a["mode"] == "mean":
        count = b.node("Max", [b.reduce("ReduceSum", valid, [1], True), b.scalar(1.0, dt)])
        summed = b.node("Div", [summed, count])
    return [summed] + [None] * (len(op.outputs) - 1)


@mapping("index_select")
def _index_select(b, op, ins):
    return [b.node("Gather", [ins[0], _as(b, ins[1], op.inputs[1], "int64")], axis=int(op.attrs["axis"]))]


@mapping("gather")
def _gather(b, op, ins):
    return [b.node("GatherElements", [ins[0], _as(b, ins[1], op.inputs[1], "int64")], axis=int(op.attrs["axis"]))]


@mapping("one_hot")
def _one_hot(b, op, ins):
    depth = int(op.attrs["num_classes"])
    if depth < 0:
        raise _refuse(op, "one_hot needs num_classes (torch infers it from the data)")
    out = op.outputs[0].dtype
    hot = b.node("OneHot", [ins[0], b.ints([depth]), b.const(np.array([0, 1], dtypes.to_numpy(out)))], axis=-1)
    return [hot]


@mapping("full_like", "zeros_like", "ones_like")
def _full_like(b, op, ins):
    out = op.outputs[0].dtype
    value = {"zeros_like": 0, "ones_like": 1}.get(op.opdef.name, op.attrs.get("fill_value", 0))
    return [b.node("Expand", [b.scalar(value, out), b.node("Shape", ins)])]


@mapping("zeros", "ones", "full", "eye", "arange")
def _creation(b, op, ins):
    # No inputs and static attributes: the value is a constant of the graph
    value = op.opdef.compute(**op.attrs)
    return [b.const(value.detach().cpu().numpy())]
