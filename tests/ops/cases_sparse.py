"""Cases for luoshu/ops/sparse.py: spmm, scatter_reduce and segment_softmax against dense torch,
torch.sparse.mm and torch's scatter_reduce."""

import numpy as np
import torch

import luoshu as ls
from tests.ops.harness import Const, OpCase

apply = ls.core.apply

# A bipartite graph of 5 sources and 4 targets: a duplicate edge (1 -> 1), a target with no
# incoming edge (2), edges given out of target order.
SRC = np.array([1, 0, 2, 4, 1, 3, 0, 4, 3])
DST = np.array([1, 0, 0, 0, 1, 3, 3, 3, 1])
N_DST, N_SRC = 4, 5


def _structure(src, dst, n_dst, n_src):
    """The six structure arrays, computed with NumPy (independently of luoshu.gnn)."""
    order = np.argsort(dst, kind="stable")
    row, col = dst[order], src[order]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=n_dst))])
    t_perm = np.argsort(col, kind="stable")
    t_indptr = np.concatenate([[0], np.cumsum(np.bincount(col, minlength=n_src))])
    return [Const(a.astype(np.int64)) for a in (row, col, indptr, t_indptr, row[t_perm], t_perm)]


S = _structure(SRC, DST, N_DST, N_SRC)
ROW, COL = S[0].value, S[1].value
E = len(ROW)
NO_EDGES = _structure(np.zeros(0, np.int64), np.zeros(0, np.int64), 3, 2)


def _dense(w, row, col, n_dst, n_src):
    a = torch.zeros(n_dst, n_src, dtype=w.dtype)
    return a.index_put((torch.as_tensor(row), torch.as_tensor(col)), w, accumulate=True)


def _spmm(*args, transpose=False):
    return apply("spmm", *args, transpose=transpose)


def _ref_spmm(row, col, indptr, t_indptr, t_index, t_perm, w, x, transpose=False):
    a = _dense(w, row, col, N_DST, N_SRC)
    return (a.T if transpose else a) @ x


def _ref_spmm_heads(row, col, indptr, t_indptr, t_index, t_perm, w, x, transpose=False):
    outs = []
    for h in range(w.shape[1]):
        a = _dense(w[:, h], row, col, N_DST, N_SRC)
        outs.append((a.T if transpose else a) @ x[:, h])
    return torch.stack(outs, 1)


def _ref_sddmm(row, col, indptr, t_indptr, t_index, t_perm, a, b):
    return (a[row] * b[col]).sum(-1)


def _ref_sparse_mm(row, col, indptr, t_indptr, t_index, t_perm, w, x):
    coo = torch.sparse_coo_tensor(torch.stack([row, col]), w, (N_DST, N_SRC), check_invariants=True)
    return torch.sparse.mm(coo, x)


def _ref_scatter(src, index, reduce, n):
    shape = (n,) + tuple(src.shape[1:])
    expanded = index.view((-1,) + (1,) * (src.dim() - 1)).expand_as(src)
    if reduce != "amax":
        return torch.zeros(shape, dtype=src.dtype).scatter_reduce(0, expanded, src, reduce, include_self=False)
    # torch shares an amax gradient with the (unused) base value when it ties with the
    # result, so start from -inf and zero the empty rows afterwards
    out = torch.full(shape, -torch.inf, dtype=src.dtype).scatter_reduce(0, expanded, src, "amax", include_self=False)
    return torch.where(torch.isinf(out), torch.zeros((), dtype=src.dtype), out)


def _ref_segment_softmax(src, index, n):
    # dense reference: a (segments, E, ...) masked softmax
    mask = torch.zeros(n, src.shape[0], dtype=torch.bool)
    mask[index, torch.arange(src.shape[0])] = True
    mask = mask.view(mask.shape + (1,) * (src.dim() - 1))
    scores = torch.where(mask, src.unsqueeze(0), torch.tensor(-torch.inf, dtype=src.dtype))
    probs = torch.softmax(scores, dim=1).nan_to_num(0.0)
    return (probs * mask).sum(0)


IDX = Const(ROW)
PTR = S[2]
TIES = Const(
    np.array(
        [[1.0, 2.0], [1.0, -1.0], [0.5, 2.0], [3.0, 3.0], [3.0, 0.0], [-1.0, 5.0], [-1.0, 5.0], [-2.0, 0.0], [0.0, 0.0]]
    ),
    grad=True,
)

CASES = [
    OpCase("spmm", _spmm, _ref_spmm, [*S, (E,), (N_SRC, 3)], second_order=True),
    OpCase(
        "spmm_transpose",
        lambda *a: _spmm(*a, transpose=True),
        lambda *a: _ref_spmm(*a, transpose=True),
        [*S, (E,), (N_DST, 3)],
        second_order=True,
    ),
    OpCase("spmm_wide", _spmm, _ref_spmm, [*S, (E,), (N_SRC, 40)]),  # the reduce-kernel path
    OpCase(
        "spmm_wide_transpose",
        lambda *a: _spmm(*a, transpose=True),
        lambda *a: _ref_spmm(*a, transpose=True),
        [*S, (E,), (N_DST, 33)],
    ),
    OpCase("spmm_heads", _spmm, _ref_spmm_heads, [*S, (E, 2), (N_SRC, 2, 3)], second_order=True),
    OpCase(
        "spmm_heads_transpose",
        lambda *a: _spmm(*a, transpose=True),
        lambda *a: _ref_spmm_heads(*a, transpose=True),
        [*S, (E, 3), (N_DST, 3, 2)],
    ),
    OpCase("sddmm", lambda *a: apply("sddmm", *a), _ref_sddmm, [*S, (N_DST, 3), (N_SRC, 3)], second_order=True),
    OpCase(
        "sddmm_heads", lambda *a: apply("sddmm", *a), _ref_sddmm, [*S, (N_DST, 2, 3), (N_SRC, 2, 3)], second_order=True
    ),
    OpCase(
        "sddmm_no_edges",
        lambda *a: apply("sddmm", *a).sum() + a[6].sum() + a[7].sum(),
        lambda *a: a[6].sum() + a[7].sum(),
        [*NO_EDGES, (3, 2), (2, 2)],
    ),
    OpCase("spmm_torch_sparse_mm", _spmm, _ref_sparse_mm, [*S, (E,), (N_SRC, 2)]),
    OpCase(
        "spmm_public_fn",
        lambda *a: ls.ops.spmm(a[:6], a[6], a[7]) * 2.0,
        lambda *a: _ref_spmm(*a) * 2.0,
        [*S, (E,), (N_SRC, 1)],
    ),
    OpCase(
        "spmm_no_edges",
        lambda *a: _spmm(*a) + a[7].sum(),
        lambda *a: torch.zeros(3, 2, dtype=a[7].dtype) + a[7].sum(),
        [*NO_EDGES, (0,), (2, 2)],
    ),
    *[
        OpCase(
            f"scatter_reduce_{r}",
            lambda s, i, r=r: ls.ops.scatter_reduce(s, i, r, num_segments=N_DST),
            lambda s, i, r=r: _ref_scatter(s, i, {"max": "amax"}.get(r, r), N_DST),
            [(E, 3), IDX],
            second_order=r != "max",
        )
        for r in ("sum", "mean", "max")
    ],
    *[
        OpCase(
            f"scatter_reduce_{r}_indptr",
            lambda s, i, p, r=r: ls.ops.scatter_reduce(s, i, r, indptr=p),
            lambda s, i, p, r=r: _ref_scatter(s, i, {"max": "amax"}.get(r, r), N_DST),
            [(E, 2, 2), IDX, PTR],
            dynamic=True,
        )
        for r in ("sum", "mean", "max")
    ],
    *[
        OpCase(  # wide rows: the scatter kernel behind the indptr form
            f"scatter_reduce_{r}_indptr_wide",
            lambda s, i, p, r=r: ls.ops.scatter_reduce(s, i, r, indptr=p),
            lambda s, i, p, r=r: _ref_scatter(s, i, {"max": "amax"}.get(r, r), N_DST),
            [(E, 40), IDX, PTR],
        )
        for r in ("mean", "max")
    ],
    OpCase(
        "scatter_reduce_max_ties",
        lambda s, i: ls.ops.scatter_reduce(s, i, "max", num_segments=N_DST),
        lambda s, i: _ref_scatter(s, i, "amax", N_DST),
        [TIES, IDX],
    ),
    OpCase(
        "scatter_reduce_1d_unsorted",
        lambda s, i: ls.ops.scatter_reduce(s, i, "sum", num_segments=6),
        lambda s, i: _ref_scatter(s, i, "sum", 6),
        [(E,), Const(SRC)],
        second_order=True,
    ),
    OpCase(
        "segment_softmax",
        lambda s, i: ls.ops.segment_softmax(s, i, num_segments=N_DST),
        lambda s, i: _ref_segment_softmax(s, i, N_DST),
        [(E,), IDX],
        second_order=True,
    ),
    OpCase(
        "segment_softmax_heads_indptr",
        lambda s, i, p: ls.ops.segment_softmax(s * 3.0, i, indptr=p),
        lambda s, i, p: _ref_segment_softmax(s * 3.0, i, N_DST),
        [(E, 4), IDX, PTR],
        second_order=True,
    ),
    OpCase(
        "segment_softmax_large",
        lambda s, i: ls.ops.segment_softmax(s * 400.0, i, num_segments=N_DST),
        lambda s, i: _ref_segment_softmax(s * 400.0, i, N_DST),
        [(E, 2), IDX],
        tol=1e-5,
    ),
    OpCase(
        "target_rows",
        lambda x, p: ls.ops.target_rows(x, p) * 2.0,
        lambda x, p: x[:N_DST] * 2.0,
        [(N_SRC, 3), PTR],
        second_order=True,
        dynamic=True,
    ),
    OpCase(
        "target_rows_backward",
        lambda g, x, p: apply("target_rows_backward", g * g, x, p),
        lambda g, x, p: torch.cat([g * g, torch.zeros(N_SRC - N_DST, 3, dtype=g.dtype)]),
        [(N_DST, 3), (N_SRC, 3), PTR],
        second_order=True,
    ),
    OpCase(
        "gather_edges_scatter",
        lambda x, c, r: ls.ops.scatter_reduce(ls.ops.gather_edges(x, c), r, "sum", num_segments=N_DST),
        lambda x, c, r: _ref_scatter(x[c], r, "sum", N_DST),
        [(N_SRC, 3), Const(COL), IDX],
        second_order=True,
    ),
]
