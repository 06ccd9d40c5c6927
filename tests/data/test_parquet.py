"""Parquet: streaming row groups in exact batches, column selection, shuffling, nulls, CTR round trip."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from luoshu.data import DataError, ParquetDataset, ctr_from_columns, synthetic_ctr, write_ctr_parquet, write_parquet


def _files(tmp_path):
    paths = []
    for i, n in enumerate([25, 12]):
        start = 100 * i
        path = tmp_path / f"part-{i}.parquet"
        write_parquet(path, {"id": np.arange(start, start + n), "x": np.arange(n, dtype=np.float32) / 2,
                             "tag": np.full(n, i, np.int8)}, row_group_size=10)
        paths.append(path)
    return paths


def test_streams_row_groups_in_exact_batches(tmp_path):
    paths = _files(tmp_path)
    assert pq.ParquetFile(paths[0]).metadata.num_row_groups == 3
    ds = ParquetDataset(paths, columns=["id", "x"], batch_size=8)
    batches = list(ds)
    assert [len(b["id"]) for b in batches] == [8, 8, 8, 8, 5] and len(ds) == 5
    assert set(batches[0]) == {"id", "x"} and batches[0]["x"].dtype == np.float32
    ids = np.concatenate([b["id"] for b in batches])
    np.testing.assert_array_equal(ids, np.r_[np.arange(25), np.arange(100, 112)])
    assert len(ParquetDataset(paths, batch_size=8, drop_last=True)) == len(list(
        ParquetDataset(paths, batch_size=8, drop_last=True))) == 4


def test_shuffle_is_seeded_per_epoch(tmp_path):
    paths = _files(tmp_path)

    def epoch_ids(ds):
        return np.concatenate([b["id"] for b in ds])

    a, b = ParquetDataset(paths, batch_size=8, shuffle=True, seed=1), ParquetDataset(paths, batch_size=8,
                                                                                      shuffle=True, seed=1)
    first, second = epoch_ids(a), epoch_ids(a)
    np.testing.assert_array_equal(first, epoch_ids(b))
    assert not np.array_equal(first, second)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(25)) + list(range(100, 112))


def test_nulls_missing_columns_and_bad_files(tmp_path):
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"f": pa.array([1.0, None]), "i": pa.array([1, None], pa.int64())}), path)
    with pytest.raises(DataError, match=r"nulls.parquet: row group 0, column 'i': 1 null value\(s\)"):
        list(ParquetDataset(path))
    out = next(iter(ParquetDataset(path, fill_null={"i": -1})))
    np.testing.assert_array_equal(out["i"], [1, -1])
    assert np.isnan(out["f"][1])
    with pytest.raises(DataError, match=r"nulls.parquet: no column\(s\) \['g'\]"):
        ParquetDataset(path, columns=["g"])
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet: not a readable Parquet file"):
        ParquetDataset(junk)


def test_ctr_parquet_round_trip(tmp_path):
    data = synthetic_ctr(100, dense_dim=3, slot_sizes=[7, 1000], dist="power_law", seed=2, missing_rate=0.2)
    path = tmp_path / "ctr.parquet"
    write_ctr_parquet(path, data, row_group_size=30)
    batches = list(ParquetDataset(path, batch_size=40, transform=ctr_from_columns))
    assert [len(b["label"]) for b in batches] == [40, 40, 20]
    for key in ("dense", "sparse", "label"):
        np.testing.assert_array_equal(np.concatenate([b[key] for b in batches]), data[key])
