"""Sparse-graph operators: sparse x dense matmul, scatter-reduce over edges, segment softmax.

A graph reaches these ops as plain integer tensors, its *structure*, with the edges in
CSR order (sorted by target node):

- `row` (E,): the target node of each edge; `col` (E,): its source node;
- `indptr` (n_dst + 1,): CSR offsets of each target's incoming edges;
- `t_indptr` (n_src + 1,), `t_index` (E,), `t_perm` (E,): the CSC view (edges sorted by
  source): offsets per source, the target of each edge in that order, and the CSR edge id
  it holds.

Keeping both views as inputs lets the gradient of `A @ x` (`A.T @ g`) run the same CSR
kernel without sorting the edges again on every backward pass. The node counts come from
the lengths of `indptr` and `t_indptr`, so sampled blocks of any size flow through one
define-and-run graph.
"""

from __future__ import annotations

import warnings

import torch

from luoshu.core import dtypes
from luoshu.core.dstates import PARTIAL
from luoshu.core.errors import DTypeError, Error
from luoshu.core.op import OpDef, apply, register
from luoshu.core.tensor import TensorMeta
from luoshu.ops._util import wants

REDUCTIONS = ("sum", "mean", "max")

# torch warns that its CSR tensors are "beta"; the kernels used here (CSR @ dense) are
# the stable core of that support.
_BETA_WARNING = "Sparse CSR tensor support is in beta state"
_TORCH_REDUCE = {"sum": "sum", "mean": "mean", "max": "amax"}


def _length(t):
    return t.shape[0] if t.shape else None


def _nodes(indptr):
    n = _length(indptr)
    return None if n is None else n - 1


def _check_ints(opdef, inputs, names, tensors):
    for name, t in zip(names, tensors):
        if not dtypes.is_integer(t.dtype):
            raise DTypeError(f"{opdef.name}: {name} must be integers, found {t.dtype}")
        if len(t.shape) != 1:
            raise opdef.shape_error(inputs, f"{name} must be 1-d, found rank {len(t.shape)}")


def _check_equal(opdef, inputs, what, a, b):
    if a is not None and b is not None and a != b:
        raise opdef.shape_error(inputs, f"{what}: {a} != {b}")


def _feature_states(opdef, ds, allow_partial: bool):
    """States rule shared by the family: node/edge rows stay whole on every device; the
    feature dimensions may be split (and partial where the op is linear in the input)."""
    if ds is None:
        return None
    for key in ds.states:
        if key == 0 or (key == PARTIAL and not allow_partial):
            raise Error(
                f"op '{opdef.name}' cannot take input states {ds.states}: the node/edge dimension 0 "
                f"must not be split{'' if allow_partial else ' and the input must not be partial'}"
            )
    return ds


def _require_duplicate(opdef, input_ds, positions):
    for i in positions:
        ds = input_ds[i]
        if ds is not None and not ds.is_pure_duplicate():
            raise Error(
                f"op '{opdef.name}' needs input {i} (graph structure or edge weights) duplicated, "
                f"found states {ds.states}"
            )


# --- sparse x dense --------------------------------------------------------------------
def _csr_mm(row, col, indptr, t_indptr, t_index, t_perm, weight, x, transpose):
    n_dst, n_src = indptr.shape[0] - 1, t_indptr.shape[0] - 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BETA_WARNING)
        if transpose:
            matrix = torch.sparse_csr_tensor(t_indptr, t_index, weight[t_perm], (n_src, n_dst), check_invariants=False)
        else:
            matrix = torch.sparse_csr_tensor(indptr, col, weight, (n_dst, n_src), check_invariants=False)
    x = x.contiguous()
    if x.device.type == "cpu" and x.shape[1] >= (32 if torch.get_num_threads() > 1 else 128):
        # torch's row-parallel reduce kernel beats MKL's CSR product on wide rows given threads
        # (and loses on narrow ones, such as one attention head's features); on one thread MKL
        # stays ahead up to 64 columns (100k nodes / 1M edges: 118 vs 190 ms at 32 columns,
        # 115-203 vs 157-285 ms at 64, behind only at 128)
        return torch.sparse.mm(matrix, x, "sum")
    return matrix @ x


@register
class Spmm(OpDef):
    """`A @ x` (or `A.T @ x`) where `A[row[e], col[e]] = weight[e]`, an (n_dst, n_src) matrix.

    Inputs: the six structure tensors, `weight` (E,) and `x` (n, F), or one matrix per
    attention head: `weight` (E, H) and `x` (n, H, F). Runs torch's CSR
    kernel (MKL on CPU, cuSPARSE on GPU) on the CSR view, or on the CSC view for the
    transpose.
    """

    name = "spmm"
    attrs = {"transpose": False}
    autocast = "fp32"

    def infer(self, inputs, transpose):
        row, col, indptr, t_indptr, t_index, t_perm, weight, x = inputs
        _check_ints(
            self,
            inputs,
            ("row", "col", "indptr", "t_indptr", "t_index", "t_perm"),
            (row, col, indptr, t_indptr, t_index, t_perm),
        )
        if len(weight.shape) not in (1, 2) or not dtypes.is_floating(weight.dtype):
            raise self.shape_error(
                inputs,
                f"weight must be a float tensor (edges,) or (edges, heads), found "
                f"{weight.dtype} of rank {len(weight.shape)}",
            )
        if len(x.shape) != len(weight.shape) + 1:
            raise self.shape_error(
                inputs,
                f"x must be (nodes, features) for weight (edges,) or (nodes, heads, "
                f"features) for weight (edges, heads), found rank {len(x.shape)}",
            )
        if len(weight.shape) == 2:
            _check_equal(self, inputs, "weight and x must have the same number of heads", weight.shape[1], x.shape[1])
        if weight.dtype != x.dtype:
            raise DTypeError(f"{self.name}: weight and x must have one dtype, found {weight.dtype} and {x.dtype}")
        edges = _length(row)
        for name, t in (("col", col), ("t_index", t_index), ("t_perm", t_perm), ("weight", weight)):
            _check_equal(self, inputs, f"{name} must have one entry per edge", _length(t), edges)
        n_dst, n_src = _nodes(indptr), _nodes(t_indptr)
        if transpose:
            n_dst, n_src = n_src, n_dst
        _check_equal(
            self, inputs, f"x must have one row per {'target' if transpose else 'source'} node", x.shape[0], n_src
        )
        return TensorMeta((n_dst,) + tuple(x.shape[1:]), x.dtype)

    @staticmethod
    def compute(row, col, indptr, t_indptr, t_index, t_perm, weight, x, transpose):
        n_dst, n_src = indptr.shape[0] - 1, t_indptr.shape[0] - 1
        rows = n_src if transpose else n_dst
        if weight.shape[0] == 0:  # no edges: nothing reaches any node
            return x.new_zeros((rows,) + tuple(x.shape[1:]))
        if weight.dim() == 2:  # one matrix per head (attention): (n, heads, features)
            # heads-major copies: each head's product reads contiguous rows
            heads_x, heads_w = x.transpose(0, 1).contiguous(), weight.t().contiguous()
            return torch.stack(
                [
                    _csr_mm(row, col, indptr, t_indptr, t_index, t_perm, heads_w[h], heads_x[h], transpose)
                    for h in range(weight.shape[1])
                ],
                dim=1,
            )
        return _csr_mm(row, col, indptr, t_indptr, t_index, t_perm, weight, x, transpose)

    def gradient(self, op, grads):
        (g,) = grads
        *structure, weight, x = op.inputs
        transpose = op.attrs["transpose"]
        gx = gw = None
        if wants(op, 7):
            gx = apply("spmm", *structure, weight, g, transpose=not transpose)
        if wants(op, 6):
            # d out[i] / d A[i, j] = x[j]: the dot product of g[i] and x[j] on every edge
            gw = apply("sddmm", *structure, x, g) if transpose else apply("sddmm", *structure, g, x)
        return [None] * 6 + [gw, gx]

    def deduce_states(self, input_ds, transpose):
        _require_duplicate(self, input_ds, range(7))
        return [_feature_states(self, input_ds[7], allow_partial=True)]


def _sampled_dot(indptr, col, a, b):
    if col.shape[0] == 0:
        return a.new_zeros((0,))
    pattern = torch.sparse_csr_tensor(
        indptr, col, a.new_zeros(col.shape[0]), (a.shape[0], b.shape[0]), check_invariants=False
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BETA_WARNING)
        return torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0).values()


@register
class Sddmm(OpDef):
    """Sampled dense-dense product: `out[e] = a[row[e]] . b[col[e]]` on every edge (E,), or per
    head, (E, H) from `a` (n_dst, H, F) and `b` (n_src, H, F). The edge-weight gradient of
    `spmm` and the attention scores of graph layers; torch's CSR sampled_addmm kernel."""

    name = "sddmm"
    autocast = "fp32"

    def infer(self, inputs):
        row, col, indptr, t_indptr, t_index, t_perm, a, b = inputs
        _check_ints(
            self,
            inputs,
            ("row", "col", "indptr", "t_indptr", "t_index", "t_perm"),
            (row, col, indptr, t_indptr, t_index, t_perm),
        )
        if len(a.shape) not in (2, 3) or len(b.shape) != len(a.shape):
            raise self.shape_error(inputs, "a and b must both be (nodes, features) or (nodes, heads, features)")
        if a.dtype != b.dtype or not dtypes.is_floating(a.dtype):
            raise DTypeError(f"{self.name}: a and b must share one float dtype, found {a.dtype} and {b.dtype}")
        for i in range(1, len(a.shape)):
            _check_equal(self, inputs, f"a and b must agree on dimension {i}", a.shape[i], b.shape[i])
        _check_equal(self, inputs, "a must have one row per target node", a.shape[0], _nodes(indptr))
        _check_equal(self, inputs, "b must have one row per source node", b.shape[0], _nodes(t_indptr))
        return TensorMeta((_length(row),) + tuple(a.shape[1:-1]), a.dtype)

    @staticmethod
    def compute(row, col, indptr, t_indptr, t_index, t_perm, a, b):
        if a.dim() == 3:
            return torch.stack([_sampled_dot(indptr, col, a[:, h], b[:, h]) for h in range(a.shape[1])], dim=1)
        return _sampled_dot(indptr, col, a, b)

    def gradient(self, op, grads):
        (g,) = grads
        *structure, a, b = op.inputs
        ga = apply("spmm", *structure, g, b) if wants(op, 6) else None
        gb = apply("spmm", *structure, g, a, transpose=True) if wants(op, 7) else None
        return [None] * 6 + [ga, gb]

    def deduce_states(self, input_ds):
        _require_duplicate(self, input_ds, range(6))
        a, b = input_ds[6], input_ds[7]
        if (a is not None and not a.is_pure_duplicate()) or (b is not None and not b.is_pure_duplicate()):
            raise Error(
                f"op '{self.name}' needs a and b duplicated (a split feature dimension would leave "
                f"partial dot products), found {a and a.states} and {b and b.states}"
            )
        return [a or b]


# --- scatter-reduce over edges ------------------------------------------------------------
def _segment_count(opdef, inputs, num_segments):
    """The output row count: len(indptr) - 1 when the size input is given, else the attr."""
    if len(inputs) == 3:
        return _nodes(inputs[2])
    if num_segments is None or num_segments < 0:
        raise opdef.shape_error(inputs, f"give num_segments (>= 0) or an indptr input, found {num_segments}")
    return int(num_segments)


def _check_scatter(opdef, inputs):
    if len(inputs) not in (2, 3):
        raise opdef.shape_error(inputs, f"takes (src, index) or (src, index, indptr), found {len(inputs)} inputs")
    src, index = inputs[0], inputs[1]
    names = ("index", "indptr")[: len(inputs) - 1]
    _check_ints(opdef, inputs, names, inputs[1:])
    if len(src.shape) < 1:
        raise opdef.shape_error(inputs, "src must have an edge dimension")
    if not dtypes.is_floating(src.dtype):
        raise DTypeError(f"{opdef.name}: src must be floating point, found {src.dtype}")
    _check_equal(opdef, inputs, "index must have one entry per row of src", _length(index), _length(src))


def _reduce(src, index, size, num_segments, reduce):
    """With an `indptr` the rows of src come in CSR order, and torch's segment kernel (which
    reads each segment's run) beats the scatter kernel up to about 32 values per row."""
    if not size:
        return _scatter(src, index, num_segments, reduce)
    indptr = size[0]
    if indptr.shape[0] and int(indptr[-1]) != src.shape[0]:
        raise Error(
            f"an indptr ending at {int(indptr[-1])} does not cover the {src.shape[0]} rows of src; "
            f"with indptr the rows must come in CSR order"
        )
    width = src[0].numel() if src.shape[0] else 0
    if width > 32 or src.device.type != "cpu":
        return _scatter(src, index, indptr.shape[0] - 1, reduce)
    out = torch.segment_reduce(src, reduce, offsets=indptr, axis=0, unsafe=True)
    if reduce != "sum":  # empty segments come out -inf (max) or nan (mean); PyG defines them as 0
        empty = (indptr[1:] == indptr[:-1]).view((-1,) + (1,) * (src.dim() - 1))
        out = out.masked_fill(empty, 0.0)
    return out


def _scatter(src, index, rows, reduce):
    out = src.new_zeros((rows,) + tuple(src.shape[1:]))
    expanded = index.view((-1,) + (1,) * (src.dim() - 1)).expand_as(src)
    # include_self=False over zeros: rows that receive nothing stay 0, as PyG defines them
    return out.scatter_reduce_(0, expanded, src, _TORCH_REDUCE[reduce], include_self=False)


@register
class ScatterReduce(OpDef):
    """`out[i] = reduce(src[e] for e with index[e] == i)`, reduce in sum / mean / max; rows
    that receive nothing are 0. Output rows: `len(indptr) - 1` when the optional third input
    (a CSR `indptr`) is given, else the `num_segments` attribute. With `indptr`, the rows of
    `src` come in CSR order (`index` holds the segment ids `indptr` implies), as the per-edge
    values of a graph do.
    """

    name = "scatter_reduce"
    attrs = {"reduce": "sum", "num_segments": None}
    autocast = "fp32"

    def infer(self, inputs, reduce, num_segments):
        if reduce not in REDUCTIONS:
            raise Error(f"{self.name}: reduce must be one of {REDUCTIONS}, found {reduce!r}")
        _check_scatter(self, inputs)
        rows = _segment_count(self, inputs, num_segments)
        return TensorMeta((rows,) + tuple(inputs[0].shape[1:]), inputs[0].dtype)

    @staticmethod
    def compute(src, index, *size, reduce, num_segments):
        return _reduce(src, index, size, num_segments, reduce)

    def gradient(self, op, grads):
        (g,) = grads
        src, index, *size = op.inputs
        reduce, num = op.attrs["reduce"], op.attrs["num_segments"]
        if not wants(op, 0):
            return [None] * len(op.inputs)
        if reduce == "sum":
            gsrc = apply("index_select", g, index)
        elif reduce == "mean":
            ones = apply("ones_like", src)
            count = apply("scatter_reduce", ones, index, *size, reduce="sum", num_segments=num)
            gsrc = apply("index_select", g / apply("maximum", count, 1.0), index)
        else:  # max: split evenly between ties, as luoshu's (and torch's) amax does
            out = op.outputs[0]
            hit = apply("cast", apply("equal", src, apply("index_select", out, index)), dtype=g.dtype)
            ties = apply("scatter_reduce", hit, index, *size, reduce="sum", num_segments=num)
            gsrc = hit * apply("index_select", g / apply("maximum", ties, 1.0), index)
        return [gsrc] + [None] * (len(op.inputs) - 1)

    def deduce_states(self, input_ds, reduce, num_segments):
        _require_duplicate(self, input_ds, range(1, len(input_ds)))
        return [_feature_states(self, input_ds[0], allow_partial=reduce in ("sum", "mean"))]


@register
class SegmentSoftmax(OpDef):
    """Softmax of `src` over the entries sharing an `index` (each node's incoming edges),
    per trailing column (attention heads). Sizes as for `scatter_reduce`."""

    name = "segment_softmax"
    attrs = {"num_segments": None}
    autocast = "fp32"

    def infer(self, inputs, num_segments):
        _check_scatter(self, inputs)
        _segment_count(self, inputs, num_segments)
        return TensorMeta(inputs[0].shape, inputs[0].dtype)

    @staticmethod
    def compute(src, index, *size, num_segments):
        # shift by each segment's max so exp never overflows
        shifted = src - _reduce(src, index, size, num_segments, "max").index_select(0, index)
        e = shifted.exp()
        return e / _reduce(e, index, size, num_segments, "sum").index_select(0, index)

    def gradient(self, op, grads):
        (g,) = grads
        src, index, *size = op.inputs
        y = op.outputs[0]
        dot = apply("scatter_reduce", g * y, index, *size, reduce="sum", num_segments=op.attrs["num_segments"])
        return [y * (g - apply("index_select", dot, index))] + [None] * (len(op.inputs) - 1)

    def deduce_states(self, input_ds, num_segments):
        _require_duplicate(self, input_ds, range(1, len(input_ds)))
        return [_feature_states(self, input_ds[0], allow_partial=False)]


# --- target rows of a block ---------------------------------------------------------------
@register
class TargetRows(OpDef):
    """The first `len(indptr) - 1` rows of `x`: a sampled block's targets, which lead its
    sources (known only at run time inside a define-and-run graph)."""

    name = "target_rows"

    def infer(self, inputs):
        x, indptr = inputs
        _check_ints(self, inputs, ("indptr",), (indptr,))
        if len(x.shape) < 1:
            raise self.shape_error(inputs, "x must have a node dimension")
        n = _nodes(indptr)
        if n is not None and x.shape[0] is not None and n > x.shape[0]:
            raise self.shape_error(inputs, f"{n} target rows asked of x with {x.shape[0]} rows")
        return TensorMeta((n,) + tuple(x.shape[1:]), x.dtype)

    @staticmethod
    def compute(x, indptr):
        n = indptr.shape[0] - 1
        if n > x.shape[0]:
            raise Error(f"target_rows: {n} target rows asked of x with {x.shape[0]} rows")
        return x[:n]

    def gradient(self, op, grads):
        x, indptr = op.inputs
        return [apply("target_rows_backward", grads[0], x, indptr), None]

    def deduce_states(self, input_ds):
        _require_duplicate(self, input_ds, (1,))
        return [_feature_states(self, input_ds[0], allow_partial=True)]


@register
class TargetRowsBackward(OpDef):
    """`g` (the target rows' gradient) padded with zero rows to the shape of `x`."""

    name = "target_rows_backward"

    def infer(self, inputs):
        g, x, indptr = inputs
        return TensorMeta(x.shape, g.dtype)

    @staticmethod
    def compute(g, x, indptr):
        out = g.new_zeros(x.shape)
        out[: g.shape[0]] = g
        return out

    def gradient(self, op, grads):
        return [apply("target_rows", grads[0], op.inputs[2]), None, None]

    def deduce_states(self, input_ds):
        _require_duplicate(self, input_ds, (2,))
        return [_feature_states(self, input_ds[0], allow_partial=True)]


# --- public functions -------------------------------------------------------------------
def spmm(structure, weight, x, transpose: bool = False):
    """`A @ x` (or `A.T @ x`) for the sparse matrix of a graph: `structure` is the six index
    tensors of `SparseGraph.structure()` (or the graph itself), `weight` one value per edge."""
    if hasattr(structure, "structure"):
        structure = structure.structure(x.device if hasattr(x, "device") else None)
    return apply("spmm", *structure, weight, x, transpose=transpose)


def sddmm(structure, a, b):
    """`a[target] . b[source]` on every edge of a graph (`structure` as for `spmm`)."""
    if hasattr(structure, "structure"):
        structure = structure.structure(a.device if hasattr(a, "device") else None)
    return apply("sddmm", *structure, a, b)


def scatter_reduce(src, index, reduce: str = "sum", num_segments: int | None = None, indptr=None):
    """Reduces the rows of `src` into `num_segments` rows (or `len(indptr) - 1`) by `index`."""
    if indptr is None:
        return apply("scatter_reduce", src, index, reduce=reduce, num_segments=num_segments)
    return apply("scatter_reduce", src, index, indptr, reduce=reduce)


def segment_softmax(src, index, num_segments: int | None = None, indptr=None):
    """Softmax over the rows of `src` that share an `index` (e.g. each node's incoming edges)."""
    if indptr is None:
        return apply("segment_softmax", src, index, num_segments=num_segments)
    return apply("segment_softmax", src, index, indptr)


def target_rows(x, indptr):
    """The first `len(indptr) - 1` rows of `x` (a block's target nodes)."""
    return apply("target_rows", x, indptr)


def gather_edges(x, index):
    """The rows of `x` at each edge's endpoint (`index_select`; its gradient is an `index_add`)."""
    return apply("index_select", x, index, axis=0)


__all__ = ["gather_edges", "scatter_reduce", "sddmm", "segment_softmax", "spmm", "target_rows"]
