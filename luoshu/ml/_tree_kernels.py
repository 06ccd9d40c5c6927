"""Compiled inner loops of the histogram trees: a node's histogram, the row partition of a split, a node's best split.

These loops run once per (row, feature) and per (feature, bin); as torch or NumPy array
expressions each costs several passes and temporaries (a scatter per channel, a cumulative
sum and a gain per candidate), as loops compiled by numba one pass over bytes. The functions
release the GIL (`nogil`), so the tree grower runs blocks of rows on its own threads, and
are cached on disk (`cache`) so only the first import on a machine compiles them.

Layouts: bin codes `(n, d)` uint8, row-major, so a row's codes are one cache line (GBDT
pads rows to a multiple of 8 bytes, so a gather copies them as words); kept codes (a CSR
of `feature * N_BINS + bin` without each feature's most frequent bin);
`codes_by_feature` `(d, n)` uint8 for the partition (one feature, many rows); per-row
channels `(n, C)` float64 `[g_1 .. g_k, h, count]`; a histogram `(d, N_BINS, C)` float64,
so one row's channels land side by side.
"""

from __future__ import annotations

import numba
import numpy as np

N_BINS = 256
MISSING_BIN = 255


GATHER_ROWS = 256  # rows copied into a contiguous block before their histogram pass: ~10 KiB, stays in L1


@numba.njit(nogil=True, cache=True)
def _add_block(codes, channels, first, m, d, out):  # pragma: no cover - compiled
    """Adds channels[first:first+m] into out (d, N_BINS, C), the rows' codes in codes[first:first+m, :d]."""
    c_n = channels.shape[1]
    if c_n == 3:  # GBDT's (g, h, count): the channels in registers
        for i in range(first, first + m):
            g = channels[i, 0]
            h = channels[i, 1]
            w = channels[i, 2]
            for f in range(d):
                b = codes[i, f]
                out[f, b, 0] += g
                out[f, b, 1] += h
                out[f, b, 2] += w
    else:
        for i in range(first, first + m):
            for f in range(d):
                b = codes[i, f]
                for c in range(c_n):
                    out[f, b, c] += channels[i, c]


@numba.njit(nogil=True, cache=True)
def histogram_block(codes, channels, rows, start, stop, out):  # pragma: no cover - compiled
    """Adds channels of rows[start:stop] into out (d, N_BINS, C), which the caller zeroed.

    `codes` may be wider than d = out.shape[0] (padding columns are ignored). A run of
    consecutive rows is read in place; otherwise blocks of GATHER_ROWS rows (their codes and
    channels) are first copied into contiguous scratch, as LightGBM's "ordered gradients":
    the copy loop has no dependency between rows, so the cache misses of scattered rows
    overlap, where the histogram loop behind them would wait for each. Codes whose width is
    a multiple of 8 are copied as 8-byte words. The sums run in row order either way.
    """
    d = out.shape[0]
    if stop <= start:
        return
    if rows[stop - 1] - rows[start] == stop - start - 1:  # rows ascending: a contiguous run
        _add_block(codes, channels, rows[start], stop - start, d, out)
        return
    width = codes.shape[1]
    c_n = channels.shape[1]
    block_codes = np.empty((GATHER_ROWS, width), np.uint8)
    block_channels = np.empty((GATHER_ROWS, c_n))
    words = width % 8 == 0  # codes C-contiguous (the callers' contract)
    codes_w = np.empty((1, 1), np.uint64)
    block_w = np.empty((1, 1), np.uint64)
    if words:
        codes_w = codes.reshape(-1).view(np.uint64).reshape(codes.shape[0], width // 8)
        block_w = block_codes.reshape(-1).view(np.uint64).reshape(GATHER_ROWS, width // 8)
    for s in range(start, stop, GATHER_ROWS):
        m = min(GATHER_ROWS, stop - s)
        for i in range(m):
            r = rows[s + i]
            if words:
                for j in range(width // 8):
                    block_w[i, j] = codes_w[r, j]
            else:
                for j in range(d):
                    block_codes[i, j] = codes[r, j]
            for c in range(c_n):
                block_channels[i, c] = channels[r, c]
        _add_block(block_codes, block_channels, 0, m, d, out)


@numba.njit(nogil=True, cache=True)
def count_kept(codes, most_frequent, start, stop, counts):  # pragma: no cover - compiled
    """counts[r] = how many of row r's codes (r in [start, stop)) are not their feature's most frequent bin."""
    d = most_frequent.shape[0]
    for r in range(start, stop):
        kept = 0
        for f in range(d):
            kept += codes[r, f] != most_frequent[f]
        counts[r] = kept


@numba.njit(nogil=True, cache=True)
def fill_kept(codes, most_frequent, indptr, start, stop, entries):  # pragma: no cover - compiled
    """entries[indptr[r]:indptr[r + 1]] = f * N_BINS + codes[r, f] of row r's kept codes (see count_kept)."""
    d = most_frequent.shape[0]
    for r in range(start, stop):
        j = indptr[r]
        end = indptr[r + 1]
        for f in range(d):
            b = codes[r, f]
            if j < end:  # the last kept code of a row must not write into the next row's slots
                entries[j] = f * N_BINS + b
            # a store either way, the position moves on kept codes only: no branch on a coin flip
            j += b != most_frequent[f]


@numba.njit(nogil=True, cache=True)
def histogram_kept(indptr, entries, channels, start, stop, out, totals):  # pragma: no cover - compiled
    """Adds channels of rows start..stop-1 into out (d * N_BINS, C) at their kept entries, and into totals (C,)."""
    c_n = channels.shape[1]
    if c_n == 3:
        t0 = 0.0
        t1 = 0.0
        t2 = 0.0
        for r in range(start, stop):
            g = channels[r, 0]
            h = channels[r, 1]
            w = channels[r, 2]
            t0 += g
            t1 += h
            t2 += w
            for j in range(indptr[r], indptr[r + 1]):
                e = entries[j]
                out[e, 0] += g
                out[e, 1] += h
                out[e, 2] += w
        totals[0] += t0
        totals[1] += t1
        totals[2] += t2
    else:
        for r in range(start, stop):
            for c in range(c_n):
                totals[c] += channels[r, c]
            for j in range(indptr[r], indptr[r + 1]):
                e = entries[j]
                for c in range(c_n):
                    out[e, c] += channels[r, c]


@numba.njit(nogil=True, cache=True)
def partition(column, rows, bin_id, missing_left):  # pragma: no cover - compiled
    """Splits rows (ascending) by `column[row] <= bin_id` (missing: `missing_left`); both halves stay ascending."""
    m = rows.shape[0]
    left = np.empty(m, np.int64)
    right = np.empty(m, np.int64)
    n_left = 0
    n_right = 0
    for i in range(m):
        r = rows[i]
        b = column[r]
        go_left = missing_left if b == MISSING_BIN else b <= bin_id
        # both stores, one count moves: no branch on a coin flip (mispredicted jumps cost ~15x here)
        left[n_left] = r
        right[n_right] = r
        n_left += go_left
        n_right += 1 - go_left
    return left[:n_left].copy(), right[:n_right].copy()


@numba.njit(nogil=True, cache=True)
def best_split(hist, totals, k, n_bins, feature_ok, lam, min_count, min_weight, gains):  # pragma: no cover
    """The best (gain, feature, bin, missing_left) of one node; gain -inf when no split is allowed.

    A split "bin b" sends value bins <= b left; missing values go right, or left (tried only
    where the node has missing values of that feature). Candidates are ranked in the order
    (missing side, bin, feature); ties to within 1e-9 relative go to the first, so
    histograms summed in another order (threads, workers) give the same tree. `gains`
    (2, N_BINS - 1, d) is scratch.
    """
    d = hist.shape[0]
    parent = 0.0
    for c in range(k):
        parent += totals[c] * totals[c]
    parent /= totals[k] + lam
    gl = np.empty(k)
    best = -np.inf
    for f in range(d):
        for b in range(MISSING_BIN):
            gains[0, b, f] = -np.inf
            gains[1, b, f] = -np.inf
        if not feature_ok[f]:
            continue
        has_missing = hist[f, MISSING_BIN, k + 1] > 0
        for c in range(k):
            gl[c] = 0.0
        hl = 0.0
        nl = 0.0
        for b in range(n_bins[f] - 1):
            for c in range(k):
                gl[c] += hist[f, b, c]
            hl += hist[f, b, k]
            nl += hist[f, b, k + 1]
            for side in range(2 if has_missing else 1):
                hl_s = hl + side * hist[f, MISSING_BIN, k]
                nl_s = nl + side * hist[f, MISSING_BIN, k + 1]
                hr_s = totals[k] - hl_s
                nr_s = totals[k + 1] - nl_s
                if nl_s < min_count or nr_s < min_count or hl_s < min_weight or hr_s < min_weight:
                    continue
                if hl_s + lam <= 0.0 or hr_s + lam <= 0.0:
                    continue
                sl = 0.0
                sr = 0.0
                for c in range(k):
                    left_c = gl[c] + side * hist[f, MISSING_BIN, c]
                    right_c = totals[c] - left_c
                    sl += left_c * left_c
                    sr += right_c * right_c
                gain = sl / (hl_s + lam) + sr / (hr_s + lam) - parent
                gains[side, b, f] = gain
                if gain > best:
                    best = gain
    if best == -np.inf:
        return -np.inf, -1, -1, False
    near = best - 1e-9 * abs(best)
    for side in range(2):
        for b in range(MISSING_BIN):
            for f in range(d):
                if gains[side, b, f] >= near:
                    return best, f, b, side == 1
    return -np.inf, -1, -1, False


@numba.njit(nogil=True, cache=True)
def add_to_rows(out, rows, column, value):  # pragma: no cover - compiled
    """out[rows, column] += value (out 2-D float64)."""
    for i in range(rows.shape[0]):
        out[rows[i], column] += value


@numba.njit(nogil=True, cache=True)
def apply_binned(codes, split_feature, split_bin, default_left, left_child, right_child):  # pragma: no cover
    """Leaf index of every row of (n, d) uint8 codes."""
    n = codes.shape[0]
    out = np.empty(n, np.int64)
    for i in range(n):
        node = 0
        while node >= 0:
            b = codes[i, split_feature[node]]
            go_left = default_left[node] if b == MISSING_BIN else b <= split_bin[node]
            node = left_child[node] if go_left else right_child[node]
        out[i] = ~node
    return out


@numba.njit(nogil=True, cache=True)
def apply_raw(X, split_feature, threshold, default_left, left_child, right_child):  # pragma: no cover
    """Leaf index of every row of (n, d) float64 values (NaN = missing)."""
    n = X.shape[0]
    out = np.empty(n, np.int64)
    for i in range(n):
        node = 0
        while node >= 0:
            x = X[i, split_feature[node]]
            go_left = default_left[node] if np.isnan(x) else x <= threshold[node]
            node = left_child[node] if go_left else right_child[node]
        out[i] = ~node
    return out


@numba.njit(nogil=True, cache=True)
def bin_rows(X, edges, start, stop, out):  # pragma: no cover - compiled
    """out[r, f] = number of edges[f] below X[r, f] (NumPy's searchsorted "left"); NaN -> MISSING_BIN.

    `edges` is (d, N_BINS) padded with +inf, so a binary search of 8 halvings
    finds the count (at most 254 real edges).
    """
    d = X.shape[1]
    for r in range(start, stop):
        for f in range(d):
            x = X[r, f]
            lo = 0
            step = 128
            while step > 0:
                # arithmetic, not a branch: the comparison is a coin flip, a mispredicted jump costs 5x
                lo += step * (edges[f, lo + step - 1] < x)
                step >>= 1
            out[r, f] = MISSING_BIN if np.isnan(x) else lo
