"""luoshu.ml.histogram's kernels against NumPy references."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from luoshu.ml import _tree_kernels as _k
from luoshu.ml import histogram as histogram_module
from luoshu.ml.histogram import N_BINS, BinMapper, histogram


def _reference(codes, channels, rows):
    d, c_n = codes.shape[1], channels.shape[1]
    out = np.zeros((d, N_BINS, c_n))
    for f in range(d):
        for c in range(c_n):
            np.add.at(out[f, :, c], codes[rows, f], channels[rows, c])
    return out


@pytest.mark.parametrize("c_n", [3, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_histogram_of_scattered_and_contiguous_rows_equals_numpy(c_n, padded, monkeypatch):
    monkeypatch.setattr(histogram_module, "PARALLEL_MIN_ROWS", 64)  # small rows: split across threads anyway
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 13))
    X[rng.random(X.shape) < 0.3] = np.nan
    mapper = BinMapper.fit(X, 40)
    codes = mapper.transform(X, padded=padded)
    assert codes.shape[1] == (16 if padded else 13)
    np.testing.assert_array_equal(codes[:, :13], mapper.transform(X))
    channels = rng.normal(size=(3000, c_n))
    scattered = np.sort(rng.choice(3000, 1100, replace=False))  # more than one gather block
    for rows in (scattered, np.arange(500, 2100), scattered[:0]):
        ref = _reference(codes[:, :13], channels, rows)
        np.testing.assert_allclose(histogram(codes, channels, rows, d=13), ref, rtol=1e-12, atol=1e-12)
        with ThreadPoolExecutor(2) as pool:
            got = np.zeros_like(ref)
            _k.histogram_block(codes, channels, rows, 0, rows.shape[0], got)
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(histogram(codes, channels, rows, pool, d=13), ref, rtol=1e-12, atol=1e-12)


def test_partition_in_blocks_on_threads_equals_numpy(monkeypatch):
    monkeypatch.setattr(histogram_module, "PARALLEL_MIN_ROWS", 64)
    rng = np.random.default_rng(1)
    column = rng.integers(0, 40, 5000).astype(np.uint8)
    column[rng.random(5000) < 0.2] = _k.MISSING_BIN
    rows = np.sort(rng.choice(5000, 3001, replace=False))
    with ThreadPoolExecutor(2) as pool:
        for missing_left in (False, True):
            left, right = histogram_module.partition(column, rows, 17, missing_left, pool)
            values = column[rows]
            goes_left = np.where(values == _k.MISSING_BIN, missing_left, values <= 17)
            np.testing.assert_array_equal(left, rows[goes_left])
            np.testing.assert_array_equal(right, rows[~goes_left])


@pytest.mark.parametrize("c_n", [3, 2])
def test_most_frequent_bin_recovered_from_totals_equals_the_full_histogram(c_n, monkeypatch):
    monkeypatch.setattr(histogram_module, "PARALLEL_MIN_ROWS", 64)
    rng = np.random.default_rng(2)
    X = np.floor(rng.lognormal(0.0, 1.5, size=(4000, 9)))  # ~25% zeros
    X[rng.random(X.shape) < 0.4] = np.nan  # and 40% missing: the most frequent bin
    X[:, 4] = 0.0  # a constant feature: every code in one bin
    codes = BinMapper.fit(X, 30).transform(X, padded=True)
    kept = histogram_module.KeptCodes.of(codes, 9)
    assert kept.most_frequent[0] == _k.MISSING_BIN and kept.most_frequent[4] == 0
    assert 0.4 < kept.density < 0.7
    channels = rng.normal(size=(4000, c_n))
    for rows in (np.arange(4000), np.arange(123, 3210)):
        ref = _reference(codes[:, :9], channels, rows)
        got = histogram(codes, channels, rows, d=9, kept=kept)
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
        with ThreadPoolExecutor(2) as pool:
            np.testing.assert_allclose(histogram(codes, channels, rows, pool, 9, kept), ref, rtol=1e-9, atol=1e-9)
    scattered = np.sort(rng.choice(4000, 999, replace=False))  # not a run: the full codes, exact
    np.testing.assert_allclose(
        histogram(codes, channels, scattered, d=9, kept=kept), _reference(codes[:, :9], channels, scattered), atol=1e-12
    )
