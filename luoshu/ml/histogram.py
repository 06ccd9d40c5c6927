"""Histogram tree machinery shared by GBDT and random forests: quantile bins, gradient histograms, leaf-wise trees.

- `BinMapper`: per-feature quantile bin edges (at most 255 bins; bin 255 holds missing
  values). `x <= edges[b]` exactly when `bin(x) <= b`, so a tree learnt on bins
  predicts raw values with the same thresholds. Codes are uint8, row-major.
- `grow_tree`: leaf-wise growth (the leaf with the largest gain splits next) over
  histograms of per-row channels `[g_1 .. g_K, h, count]`. The inner loops (a node's
  histogram, the row partition of a split, the best split over every feature and bin
  with missing values tried on both sides, tree application) are compiled
  (`luoshu.ml._tree_kernels`); only the smaller child of a split gets a fresh histogram,
  the larger one's is the parent's minus it. A node's scattered rows are gathered in
  blocks before their histogram pass (LightGBM's ordered gradients); a root (a run of
  consecutive rows) can skip each feature's most frequent bin (`KeptCodes`) and recover it
  from the totals. With a thread pool, a histogram's rows and a split's row partition are
  split in blocks over the calling thread and the pool's (`run_blocks`), and the two
  children's split searches run side by side.
- `Tree`: flat arrays in LightGBM's layout (internal nodes by creation order, a leaf
  `j` referenced as `~j`).

`allreduce` lets a data-parallel caller sum histograms across workers: every worker
then sees the global histogram and grows the same tree.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from luoshu.ml import _tree_kernels as _k

N_BINS = 256  # slots per feature: up to 255 value bins, the last one for missing values
MISSING_BIN = 255
MAX_BINS = 255
PARALLEL_MIN_ROWS = 4096  # below this a node's histogram (or binning) is not worth splitting across threads


def run_blocks(pool: ThreadPoolExecutor | None, task: Callable[[int], object], n_tasks: int) -> list:
    """[task(0), ..., task(n_tasks - 1)]: task 0 on the calling thread, the others on `pool`.

    The caller works instead of waiting, so a 2-block split costs one hand-off, not two.
    """
    if pool is None or n_tasks == 1:
        return [task(i) for i in range(n_tasks)]
    futures = [pool.submit(task, i) for i in range(1, n_tasks)]
    first = task(0)
    return [first] + [f.result() for f in futures]


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

    def transform(self, X: np.ndarray, pool: ThreadPoolExecutor | None = None, padded: bool = False) -> np.ndarray:
        """Bin ids (uint8, n x d); missing values go to `MISSING_BIN`. With a `pool`, blocks of rows on its threads.

        `padded`: rows get zero columns up to a multiple of 8 (n x 8*ceil(d/8)), so the
        histogram kernel copies a row as 8-byte words; `grow_tree` takes such codes.
        """
        X = np.ascontiguousarray(X, dtype=np.float64)
        n, d = X.shape
        edges = np.full((d, N_BINS), np.inf)
        for f, e in enumerate(self.edges):
            edges[f, : len(e)] = e
        out = np.zeros((n, -(-d // 8) * 8), dtype=np.uint8) if padded else np.empty((n, d), dtype=np.uint8)
        workers = pool._max_workers if pool is not None and n >= PARALLEL_MIN_ROWS else 1
        bounds = [n * i // workers for i in range(workers + 1)]
        if workers == 1:
            _k.bin_rows(X, edges, 0, n, out)
        else:
            run_blocks(pool, lambda i: _k.bin_rows(X, edges, bounds[i], bounds[i + 1], out), workers)
        return out

    def threshold(self, feature: int, bin_id: int) -> float:
        return float(self.edges[feature][bin_id])


class KeptCodes:
    """Each row's codes without its features' most frequent bins, as LightGBM skips them.

    CSR over rows: row r's entries `entries[indptr[r]:indptr[r + 1]]` are
    `feature * N_BINS + bin`. A histogram over them leaves each feature's most frequent bin
    empty; `recover` refills it from the rows' totals (every row is in exactly one bin of
    every feature). Used for runs of consecutive rows (a tree's root); on CTR-like data
    (~40% of codes in their feature's most frequent bin) the root pass does that much less.
    """

    def __init__(self, most_frequent: np.ndarray, indptr: np.ndarray, entries: np.ndarray):
        self.most_frequent, self.indptr, self.entries = most_frequent, indptr, entries
        self.d = most_frequent.shape[0]

    @classmethod
    def of(
        cls, codes: np.ndarray, d: int, pool: ThreadPoolExecutor | None = None, max_density: float = 1.0
    ) -> KeptCodes | None:
        """The kept codes of the first d columns of codes; None when more than `max_density` of them would be kept."""
        n = codes.shape[0]
        most_frequent = most_frequent_bins(codes, d)
        counts = np.empty(n, dtype=np.int64)
        workers = pool._max_workers if pool is not None and n >= PARALLEL_MIN_ROWS else 1
        bounds = [n * i // workers for i in range(workers + 1)]
        run_blocks(pool, lambda i: _k.count_kept(codes, most_frequent, bounds[i], bounds[i + 1], counts), workers)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        if indptr[-1] > max_density * n * d:
            return None
        entries = np.empty(int(indptr[-1]), dtype=np.uint16 if d * N_BINS <= 1 << 16 else np.uint32)
        run_blocks(
            pool, lambda i: _k.fill_kept(codes, most_frequent, indptr, bounds[i], bounds[i + 1], entries), workers
        )
        return cls(most_frequent, indptr, entries)

    @property
    def density(self) -> float:
        """The fraction of codes kept."""
        n = self.indptr.shape[0] - 1
        return float(self.indptr[-1]) / max(1, n * self.d)

    def recover(self, hist: np.ndarray, totals: np.ndarray) -> np.ndarray:
        """Fills each feature's most frequent bin of `hist` (d, N_BINS, C) with totals minus its other bins."""
        features = np.arange(self.d)
        hist[features, self.most_frequent] = 0.0
        hist[features, self.most_frequent] = totals[None, :] - hist.sum(1)
        return hist


def most_frequent_bins(codes: np.ndarray, d: int) -> np.ndarray:
    """Each feature's most frequent bin among the first d columns of codes (ties: the lowest bin)."""
    return np.array([np.bincount(codes[:, f], minlength=N_BINS).argmax() for f in range(d)], dtype=np.int64)


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


def _apply(tree: Tree, data, binned: bool) -> torch.Tensor:
    data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    n = data.shape[0]
    if tree.n_leaves == 1:
        return torch.zeros(n, dtype=torch.int64)
    feat = np.ascontiguousarray(tree.split_feature, dtype=np.int64)
    left = np.ascontiguousarray(tree.left_child, dtype=np.int64)
    right = np.ascontiguousarray(tree.right_child, dtype=np.int64)
    dleft = np.ascontiguousarray(tree.default_left, dtype=np.bool_)
    if binned:
        codes = np.ascontiguousarray(data, dtype=np.uint8)
        thr = np.ascontiguousarray(tree.split_bin, dtype=np.int64)
        leaf = _k.apply_binned(codes, feat, thr, dleft, left, right)
    else:
        X = np.ascontiguousarray(data, dtype=np.float64)
        leaf = _k.apply_raw(X, feat, np.ascontiguousarray(tree.threshold, dtype=np.float64), dleft, left, right)
    return torch.from_numpy(leaf)


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
    kept: KeptCodes | None = None  # the codes without most frequent bins, for the root histogram


def histogram(
    codes: np.ndarray,
    channels: np.ndarray,
    rows: np.ndarray,
    pool: ThreadPoolExecutor | None = None,
    d: int | None = None,
    kept: KeptCodes | None = None,
) -> np.ndarray:
    """Per-feature, per-bin sums of each channel over `rows`: (d, N_BINS, C) float64.

    `codes` is (n, >= d) uint8 C-contiguous (`d` defaults to its width; wider: padding
    columns), `channels` (n, C) float64, `rows` int64 ascending. With a `pool`, blocks of
    rows go to its threads (the compiled loop releases the GIL) and the block histograms
    are summed in block order. With `kept` (the same codes as `KeptCodes`), a run of
    consecutive rows skips each feature's most frequent bin and recovers it.
    """
    m = rows.shape[0]
    d = codes.shape[1] if d is None else d
    c_n = channels.shape[1]
    workers = pool._max_workers if pool is not None and m >= PARALLEL_MIN_ROWS else 1
    bounds = [m * i // workers for i in range(workers + 1)]
    # a run of consecutive rows (a root) goes through the kept codes, when there are some
    run = kept is not None and m > 0 and rows[-1] - rows[0] == m - 1
    first = int(rows[0]) if run else 0

    def block(i: int) -> tuple[np.ndarray, np.ndarray]:
        part = np.zeros((d, N_BINS, c_n))
        totals = np.zeros(c_n)
        if run:
            flat = part.reshape(d * N_BINS, c_n)
            _k.histogram_kept(
                kept.indptr, kept.entries, channels, first + bounds[i], first + bounds[i + 1], flat, totals
            )
        else:
            _k.histogram_block(codes, channels, rows, bounds[i], bounds[i + 1], part)
        return part, totals

    parts = run_blocks(pool, block, workers)
    out, totals = parts[0]
    for part, part_totals in parts[1:]:
        out += part
        totals += part_totals
    return kept.recover(out, totals) if run else out


def partition(
    column: np.ndarray, rows: np.ndarray, bin_id: int, missing_left: bool, pool: ThreadPoolExecutor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The rows (ascending) going left and right of a split on `column`; blocks of rows on the pool's threads."""
    m = rows.shape[0]
    workers = pool._max_workers if pool is not None and m >= PARALLEL_MIN_ROWS else 1
    if workers == 1:
        return _k.partition(column, rows, bin_id, missing_left)
    bounds = [m * i // workers for i in range(workers + 1)]

    def block(i: int) -> tuple[np.ndarray, np.ndarray]:
        return _k.partition(column, rows[bounds[i] : bounds[i + 1]], bin_id, missing_left)

    parts = run_blocks(pool, block, workers)
    return np.concatenate([left for left, _ in parts]), np.concatenate([right for _, right in parts])


@dataclass
class _Leaf:
    rows: np.ndarray  # int64, ascending
    hist: np.ndarray  # (d, N_BINS, C)
    totals: np.ndarray  # (C,)
    depth: int
    gain: float = -np.inf
    feature: int = -1
    bin: int = -1
    missing_left: bool = False


def _best_splits(leaves: list[_Leaf], p: GrowParams, k: int, n_bins: np.ndarray, scratch: list[np.ndarray]) -> None:
    """Finds each leaf's best (feature, bin, missing side); the leaves on the pool's threads when there is one."""
    d = n_bins.shape[0]
    tree_mask = np.ones(d, dtype=np.bool_) if p.feature_mask is None else p.feature_mask.numpy().astype(np.bool_)
    masks = []
    for _ in leaves:  # drawn in leaf order, whatever runs them
        mask = tree_mask
        if p.features_per_node is not None and p.features_per_node < d:
            node_mask = np.zeros(d, dtype=np.bool_)
            node_mask[torch.randperm(d, generator=p.generator)[: p.features_per_node].numpy()] = True
            mask = tree_mask & node_mask
        masks.append(mask)
    args = (k, n_bins)
    limits = (float(p.reg_lambda), float(p.min_child_samples), float(p.min_child_weight))

    def one(i: int):
        return _k.best_split(leaves[i].hist, leaves[i].totals, *args, masks[i], *limits, scratch[i])

    results = run_blocks(p.pool, one, len(leaves))
    for lf, (g, f, b, missing_left) in zip(leaves, results):
        if not g > max(p.min_split_gain, 1e-12):
            lf.gain = -np.inf
            continue
        lf.gain, lf.feature, lf.bin, lf.missing_left = float(g), int(f), int(b), bool(missing_left)


def _as_numpy(t, dtype) -> np.ndarray:
    a = t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return np.ascontiguousarray(a, dtype=dtype)


def grow_tree(
    codes,
    codes_by_feature,
    channels,
    rows,
    k: int,
    params: GrowParams,
    thresholds: Callable[[int, int], float],
) -> tuple[Tree, list[torch.Tensor]]:
    """Grows one tree on `rows`; returns it and the rows of each leaf.

    `codes` (n, d) (or wider: `BinMapper.transform(..., padded=True)`) and
    `codes_by_feature` ((d, n), for the per-split row routing) are uint8 bin codes;
    `channels` columns: `k` gradient channels, the hessian, the sample count (or weight).
    NumPy arrays or tensors.
    """
    p = params
    codes = _as_numpy(codes, np.uint8)
    codes_by_feature = _as_numpy(codes_by_feature, np.uint8)
    channels = _as_numpy(channels, np.float64)
    rows = _as_numpy(rows, np.int64)
    n_bins = _as_numpy(p.n_bins, np.int64)

    def reduce(a: np.ndarray) -> np.ndarray:
        if p.allreduce is None:
            return a
        return p.allreduce(torch.from_numpy(a)).numpy()

    d = codes_by_feature.shape[0]
    hist = reduce(histogram(codes, channels, rows, p.pool, d, p.kept))
    totals = hist[0].sum(0)  # every row falls in exactly one bin of feature 0
    leaves = [_Leaf(rows, hist, totals, 0)]
    nodes: list[dict] = []
    parent_of_leaf: dict[int, tuple[int, str]] = {}  # leaf -> (internal node, "left"/"right")
    scratch = [np.empty((2, MISSING_BIN, d)) for _ in range(2)]
    _best_splits(leaves, p, k, n_bins, scratch)
    lam = p.reg_lambda

    def value_of(tot):
        return -tot[:k] / (tot[k] + lam) * p.shrinkage

    while len(leaves) < p.max_leaves:
        cands = [i for i, lf in enumerate(leaves) if lf.gain > -np.inf and (p.max_depth < 0 or lf.depth < p.max_depth)]
        if not cands:
            break
        j = max(cands, key=lambda i: (leaves[i].gain, -i))
        lf = leaves[j]
        left_rows, right_rows = partition(codes_by_feature[lf.feature], lf.rows, lf.bin, lf.missing_left, p.pool)
        # the smaller child gets a fresh histogram (local rows only are known, so compare global counts)
        left_count = reduce(np.array([float(left_rows.shape[0]), float(right_rows.shape[0])]))
        small_is_left = bool(left_count[0] <= left_count[1])
        small_rows = left_rows if small_is_left else right_rows
        small = reduce(histogram(codes, channels, small_rows, p.pool, d, p.kept))
        large = np.subtract(lf.hist, small, out=lf.hist)  # the parent's histogram is not needed again
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
        left_leaf = _Leaf(left_rows, lh, lh[0].sum(0), depth)
        right_leaf = _Leaf(right_rows, rh, rh[0].sum(0), depth)
        leaves[j] = left_leaf
        leaves.append(right_leaf)
        _best_splits([left_leaf, right_leaf], p, k, n_bins, scratch)

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
    return tree, [torch.from_numpy(lf.rows) for lf in leaves]


def tree_from_dict(d: dict) -> Tree:
    return Tree(**{k: np.asarray(v) for k, v in d.items()})
