"""Histogram tree machinery shared by GBDT and random forests: quantile bins, gradient histograms, leaf-wise trees.

- `BinMapper`: per-feature quantile bin edges (at most 255 bins; bin 255 holds missing
  values). `x <= edges[b]` exactly when `bin(x) <= b`, so a tree learnt on bins
  predicts raw values with the same thresholds.
- `grow_tree`: leaf-wise growth (the leaf with the largest gain splits next) over
  histograms of per-row channels `[g_1 .. g_K, h, count]`. A histogram is one
  `scatter_add_` over the node's rows and all features at once (two channels per
  complex scatter), the larger child's is the parent's minus the smaller one's, and
  the best split of every feature and bin (missing values tried on both sides) comes
  from one cumulative sum — no Python loop over rows, features or bins.
- `Tree`: flat arrays in LightGBM's layout (internal nodes by creation order, a leaf
  `j` referenced as `~j`), predicted for all rows at once, one depth level per step.

`allreduce` lets a data-parallel caller sum histograms across workers: every worker
then sees the global histogram and grows the same tree.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

N_BINS = 256  # slots per feature: up to 255 value bins, the last one for missing values
MISSING_BIN = 255
MAX_BINS = 255


class BinMapper:
    """Quantile bin edges per feature, learnt from (a sample of) the training rows."""

    def __init__(self, edges: list[np.ndarray]):
        self.edges = [np.asarray(e, dtype=np.float64) for e in edges]
        self.n_bins = np.array([len(e) + 1 for e in self.edges], dtype=np.int64)  # value bins per feature

    @classmethod
    def fit(cls, X: np.ndarray, max_bins: int = MAX_BINS) -> BinMapper:
        """Edges from the rows of X (NaN = missing, ignored here). Deterministic: the same rows give the same edges."""
        edges = []
        for f in range(X.shape[1]):
            col = X[:, f]
            col = col[~np.isnan(col)]
            if col.size == 0:
                edges.append(np.empty(0))
                continue
            uniq, counts = np.unique(col, return_counts=True)
            if len(uniq) <= max_bins:
                edges.append((uniq[:-1] + uniq[1:]) / 2)
                continue
            # Quantiles by sample count: cut after the value where each 1/max_bins of the mass ends.
            cum = np.cumsum(counts)
            targets = cum[-1] * np.arange(1, max_bins) / max_bins
            cut = np.unique(np.searchsorted(cum, targets, side="left"))
            cut = cut[cut < len(uniq) - 1]
            edges.append((uniq[cut] + uniq[cut + 1]) / 2)
        return cls(edges)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Bin ids (uint8, n x d); missing values go to `MISSING_BIN`."""
        out = np.empty(X.shape, dtype=np.uint8)
        for f, e in enumerate(self.edges):
            col = X[:, f]
            b = np.searchsorted(e, col, side="left")
            b[np.isnan(col)] = MISSING_BIN
            out[:, f] = b
        return out

    def threshold(self, feature: int, bin_id: int) -> float:
        return float(self.edges[feature][bin_id])


@dataclass
class Tree:
    """One tree in LightGBM's layout. Leaf values are (n_leaves, K)."""

    split_feature: np.ndarray  # (L-1,) int64
    split_bin: np.ndarray  # (L-1,) int64
    threshold: np.ndarray  # (L-1,) float64: go left when x <= threshold
    default_left: np.ndarray  # (L-1,) bool: where missing values go
    left_child: np.ndarray  # (L-1,) int64: internal node index, or ~leaf
    right_child: np.ndarray
    split_gain: np.ndarray
    internal_value: np.ndarray  # (L-1, K)
    internal_weight: np.ndarray  # hessian sums
    internal_count: np.ndarray
    leaf_value: np.ndarray  # (L, K)
    leaf_weight: np.ndarray
    leaf_count: np.ndarray

    @property
    def n_leaves(self) -> int:
        return len(self.leaf_value)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def apply_bins(self, codes: torch.Tensor) -> torch.Tensor:
        """Leaf index of every row of binned data (n x d uint8/int64 codes)."""
        return _apply(self, codes, binned=True)

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """Leaf index of every row of raw data (float64, NaN = missing)."""
        return _apply(self, X, binned=False)


def _apply(tree: Tree, data: torch.Tensor, binned: bool) -> torch.Tensor:
    n = data.shape[0]
    if tree.n_leaves == 1:
        return torch.zeros(n, dtype=torch.int64)
    feat = torch.from_numpy(tree.split_feature)
    left = torch.from_numpy(tree.left_child)
    right = torch.from_numpy(tree.right_child)
    dleft = torch.from_numpy(tree.default_left)
    thr = torch.from_numpy(tree.split_bin if binned else tree.threshold)
    node = torch.zeros(n, dtype=torch.int64)
    rows = torch.arange(n)
    while rows.numel():
        cur = node[rows]
        f = feat[cur]
        x = data[rows, f]
        if binned:
            x = x.long()
            missing = x == MISSING_BIN
            go_left = torch.where(missing, dleft[cur], x <= thr[cur])
        else:
            missing = torch.isnan(x)
            go_left = torch.where(missing, dleft[cur], x <= thr[cur])
        nxt = torch.where(go_left, left[cur], right[cur])
        node[rows] = nxt
        rows = rows[nxt >= 0]
    return ~node


@dataclass
class GrowParams:
    max_leaves: int = 31
    max_depth: int = -1  # -1: unlimited
    min_child_samples: float = 20
    min_child_weight: float = 1e-3
    reg_lambda: float = 0.0
    min_split_gain: float = 0.0
    shrinkage: float = 1.0
    # per-node feature sampling (random forests): how many features each node may split on
    features_per_node: int | None = None
    generator: torch.Generator | None = None
    allreduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    feature_mask: torch.Tensor | None = None  # per-tree feature subset (GBDT colsample_bytree)
    n_bins: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    pool: ThreadPoolExecutor | None = None  # threads for the histograms


PARALLEL_MIN_ROWS = 8192  # below this a node's histogram is not worth splitting across threads


def _histogram_block(codes: torch.Tensor, channels: torch.Tensor, rows) -> torch.Tensor:
    idx = codes[rows] if isinstance(rows, slice) else codes.index_select(0, rows)
    vals = channels[rows] if isinstance(rows, slice) else channels.index_select(0, rows)
    m, d = idx.shape
    n_ch = vals.shape[1]
    out = torch.empty(n_ch, N_BINS, d, dtype=torch.float64)
    for c in range(0, n_ch, 2):
        if c + 1 < n_ch:
            z = torch.complex(vals[:, c], vals[:, c + 1])
            acc = torch.zeros(N_BINS, d, dtype=torch.complex128)
            acc.scatter_add_(0, idx, z[:, None].expand(m, d))
            out[c], out[c + 1] = acc.real, acc.imag
        else:
            acc = torch.zeros(N_BINS, d, dtype=torch.float64)
            acc.scatter_add_(0, idx, vals[:, c, None].expand(m, d))
            out[c] = acc
    return out


def histogram(
    codes: torch.Tensor, channels: torch.Tensor, rows: torch.Tensor | None, pool: ThreadPoolExecutor | None = None
) -> torch.Tensor:
    """Per-feature, per-bin sums of each channel: (C, N_BINS, d) float64.

    `codes` is (n, d) int64, `channels` (n, C) float64; `rows` selects the node's rows
    (None: all). Two channels ride in one complex scatter (real and imaginary parts),
    halving the passes over the index. With a `pool`, blocks of rows are gathered and
    scattered on its threads (torch's own intra-op threads make `scatter_add_` slower,
    not faster) and the block histograms summed in block order.
    """
    m = codes.shape[0] if rows is None else rows.numel()
    workers = pool._max_workers if pool is not None else 1
    if workers == 1 or m < PARALLEL_MIN_ROWS:
        return _histogram_block(codes, channels, slice(None) if rows is None else rows)
    bounds = [m * i // workers for i in range(workers + 1)]
    blocks = [slice(a, b) if rows is None else rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    parts = list(pool.map(lambda blk: _histogram_block(codes, channels, blk), blocks))
    out = parts[0]
    for part in parts[1:]:
        out += part
    return out


@dataclass
class _Leaf:
    rows: torch.Tensor
    hist: torch.Tensor  # (C, N_BINS, d)
    totals: torch.Tensor  # (C,)
    depth: int
    gain: float = -np.inf
    feature: int = -1
    bin: int = -1
    missing_left: bool = False


def _best_splits(leaves: list[_Leaf], p: GrowParams, k: int, valid_bins: torch.Tensor) -> None:
    """Finds each leaf's best (feature, bin, missing side) at once: one batched pass for the given leaves."""
    hist = torch.stack([lf.hist for lf in leaves])  # (B, C, N_BINS, d)
    tot = torch.stack([lf.totals for lf in leaves])  # (B, C)
    n_leaves, _, _, d = hist.shape
    lam = p.reg_lambda
    left_a = hist[:, :, :MISSING_BIN].cumsum(2)  # missing values go right
    miss = hist[:, :, MISSING_BIN]  # (B, C, d)
    has_missing = bool((miss[:, k + 1] > 0).any())
    if has_missing:
        left = torch.stack([left_a, left_a + miss[:, :, None, :]], 1)  # (B, 2, C, 255, d); [:, 1]: missing left
    else:  # no missing values here: "missing left" is the same split, skip its half of the work
        left = left_a[:, None]
    right = tot[:, None, :, None, None] - left
    GL, HL, NL = left[:, :, :k], left[:, :, k], left[:, :, k + 1]
    GR, HR, NR = right[:, :, :k], right[:, :, k], right[:, :, k + 1]
    parent = ((tot[:, :k] ** 2).sum(1) / (tot[:, k] + lam))[:, None, None, None]
    gain = (GL * GL).sum(2) / (HL + lam) + (GR * GR).sum(2) / (HR + lam) - parent  # (B, 2, 255, d)
    ok = (
        (NL >= p.min_child_samples)
        & (NR >= p.min_child_samples)
        & (HL >= p.min_child_weight)
        & (HR >= p.min_child_weight)
        & valid_bins
    )
    # with no missing values in a node both directions are one split: keep "missing right" only
    if has_missing:
        ok[:, 1] &= (miss[:, k + 1] > 0)[:, None, :]
    mask = p.feature_mask
    if p.features_per_node is not None and p.features_per_node < d:
        node_mask = torch.zeros(n_leaves, d, dtype=torch.bool)
        for i in range(n_leaves):
            node_mask[i, torch.randperm(d, generator=p.generator)[: p.features_per_node]] = True
        mask = node_mask if mask is None else mask[None] & node_mask
    if mask is not None:
        ok &= (mask if mask.dim() == 2 else mask[None])[:, None, None, :]
    gain = torch.where(ok, gain, -torch.inf).view(n_leaves, -1)
    best_gain = gain.max(1).values
    # Ties (to rounding) go to the first candidate: sums in another order (threads, workers)
    # differ in the last bits, and must not change the tree.
    near = gain >= (best_gain - 1e-9 * best_gain.abs())[:, None]
    best = near.to(torch.uint8).argmax(1)
    for lf, g, b in zip(leaves, best_gain.tolist(), best.tolist()):
        if not g > max(p.min_split_gain, 1e-12):
            lf.gain = -np.inf
            continue
        direction, rest = divmod(b, MISSING_BIN * d)  # variant 1 exists only when has_missing
        bin_id, f = divmod(rest, d)
        lf.gain, lf.feature, lf.bin, lf.missing_left = g, f, bin_id, bool(direction)


def grow_tree(
    codes: torch.Tensor,
    codes_by_feature: torch.Tensor,
    channels: torch.Tensor,
    rows: torch.Tensor,
    k: int,
    params: GrowParams,
    thresholds: Callable[[int, int], float],
) -> tuple[Tree, list[torch.Tensor]]:
    """Grows one tree on `rows`; returns it and the rows of each leaf.

    `channels` columns: `k` gradient channels, the hessian, the sample count (or weight).
    `codes_by_feature` is the (d, n) transposed copy of `codes`, for the per-split row routing.
    """
    p = params
    reduce = p.allreduce or (lambda t: t)
    hist = reduce(histogram(codes, channels, None if rows.numel() == codes.shape[0] else rows, p.pool))
    totals = hist[:, :, 0].sum(1)  # every row falls in exactly one bin of feature 0
    leaves = [_Leaf(rows, hist, totals, 0)]
    nodes: list[dict] = []
    parent_of_leaf: dict[int, tuple[int, str]] = {}  # leaf -> (internal node, "left"/"right")
    # a threshold must leave at least one value bin on each side
    valid_bins = torch.arange(MISSING_BIN)[:, None] < (p.n_bins - 1)[None, :]
    _best_splits(leaves, p, k, valid_bins)
    lam = p.reg_lambda

    def value_of(tot):
        return (-tot[:k] / (tot[k] + lam) * p.shrinkage).numpy()

    while len(leaves) < p.max_leaves:
        cands = [i for i, lf in enumerate(leaves) if lf.gain > -np.inf and (p.max_depth < 0 or lf.depth < p.max_depth)]
        if not cands:
            break
        j = max(cands, key=lambda i: (leaves[i].gain, -i))
        lf = leaves[j]
        col = codes_by_feature[lf.feature].index_select(0, lf.rows).long()
        go_left = torch.where(col == MISSING_BIN, lf.missing_left, col <= lf.bin)
        left_rows, right_rows = lf.rows[go_left], lf.rows[~go_left]
        # the smaller child gets a fresh histogram (local rows only are known, so compare global counts)
        left_count = reduce(torch.tensor([float(left_rows.numel()), float(right_rows.numel())], dtype=torch.float64))
        small_is_left = bool(left_count[0] <= left_count[1])
        small_rows = left_rows if small_is_left else right_rows
        small = reduce(histogram(codes, channels, small_rows, p.pool))
        large = lf.hist - small
        lh, rh = (small, large) if small_is_left else (large, small)
        node_id = len(nodes)
        nodes.append(
            {
                "feature": lf.feature,
                "bin": lf.bin,
                "threshold": thresholds(lf.feature, lf.bin),
                "default_left": lf.missing_left,
                "gain": lf.gain,
                "value": value_of(lf.totals),
                "weight": float(lf.totals[k]),
                "count": float(lf.totals[k + 1]),
                "left": ~j,
                "right": ~len(leaves),
            }
        )
        if j in parent_of_leaf:
            parent, side = parent_of_leaf[j]
            nodes[parent][side] = node_id
        parent_of_leaf[j] = (node_id, "left")
        parent_of_leaf[len(leaves)] = (node_id, "right")
        depth = lf.depth + 1
        left_leaf = _Leaf(left_rows, lh, lh[:, :, 0].sum(1), depth)
        right_leaf = _Leaf(right_rows, rh, rh[:, :, 0].sum(1), depth)
        leaves[j] = left_leaf
        leaves.append(right_leaf)
        _best_splits([left_leaf, right_leaf], p, k, valid_bins)

    def arr(key, dtype):
        return np.array([nd[key] for nd in nodes], dtype=dtype)

    tree = Tree(
        split_feature=arr("feature", np.int64),
        split_bin=arr("bin", np.int64),
        threshold=arr("threshold", np.float64),
        default_left=arr("default_left", bool),
        left_child=arr("left", np.int64),
        right_child=arr("right", np.int64),
        split_gain=arr("gain", np.float64),
        internal_value=np.array([nd["value"] for nd in nodes], dtype=np.float64).reshape(len(nodes), k),
        internal_weight=arr("weight", np.float64),
        internal_count=arr("count", np.float64),
        leaf_value=np.stack([value_of(lf.totals) for lf in leaves]).astype(np.float64),
        leaf_weight=np.array([float(lf.totals[k]) for lf in leaves]),
        leaf_count=np.array([float(lf.totals[k + 1]) for lf in leaves]),
    )
    return tree, [lf.rows for lf in leaves]


def tree_from_dict(d: dict) -> Tree:
    return Tree(**{k: np.asarray(v) for k, v in d.items()})
