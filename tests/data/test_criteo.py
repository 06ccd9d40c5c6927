"""Criteo TSV: reading a hand-written file, the writer's round trip, streaming, and bad lines."""

import gzip

import numpy as np
import pytest

from luoshu.data import CriteoDataset, DataError, DataLoader, iter_criteo, read_criteo, synthetic_ctr, write_criteo

LINES = [
    ["1", "5", "", "-1"] + ["0"] * 10 + ["68fd1e64", "", "ABCDEF01"] + ["0"] * 23,
    ["0", ""] + ["2"] * 12 + ["1", "ff"] + [""] * 24,
]


def _write(path, lines):
    path.write_text("".join("\t".join(f) + "\n" for f in lines))


def test_read_handwritten_lines(tmp_path):
    path = tmp_path / "day_0.tsv"
    _write(path, LINES)
    out = read_criteo(path)
    assert out["dense"].shape == (2, 13) and out["dense"].dtype == np.float32
    assert out["sparse"].shape == (2, 26) and out["sparse"].dtype == np.int64
    np.testing.assert_array_equal(out["label"], [1, 0])
    np.testing.assert_array_equal(out["dense"][0, :3], [5, 0, -1])  # missing → 0
    np.testing.assert_array_equal(out["dense"][1], [0] + [2] * 12)
    np.testing.assert_array_equal(out["sparse"][0, :4], [0x68FD1E64, -1, 0xABCDEF01, 0])
    np.testing.assert_array_equal(out["sparse"][1, :3], [1, 0xFF, -1])

    logged = read_criteo(path, log_dense=True, dense_missing=0)
    np.testing.assert_allclose(logged["dense"][0, :3], [np.log(6), 0, 0], rtol=1e-6)
    hashed = read_criteo(path, num_buckets=1000)["sparse"]
    np.testing.assert_array_equal(hashed[0, :3], [1 + 0x68FD1E64 % 999, 0, 1 + 0xABCDEF01 % 999])
    assert hashed.min() >= 0 and hashed.max() < 1000


def test_write_read_round_trip_gzip_and_chunks(tmp_path):
    data = synthetic_ctr(257, seed=3, missing_rate=0.1, slot_sizes=[2**40] + [50] * 25)
    path = tmp_path / "train.tsv.gz"
    write_criteo(path, data, chunk_rows=100)
    with gzip.open(path, "rt") as f:
        first = f.readline().rstrip("\n").split("\t")
    assert len(first) == 40
    chunks = list(iter_criteo(path, chunk_rows=64))
    assert [len(c["label"]) for c in chunks] == [64, 64, 64, 64, 1]
    back = read_criteo(path, dense_missing=np.nan)
    np.testing.assert_array_equal(back["label"], data["label"])
    np.testing.assert_array_equal(back["sparse"], data["sparse"])
    np.testing.assert_array_equal(np.isnan(back["dense"]), np.isnan(data["dense"]))
    np.testing.assert_array_equal(np.nan_to_num(back["dense"]), np.nan_to_num(data["dense"]))


def test_criteo_dataset_exact_batches_through_a_loader_thread(tmp_path):
    data = synthetic_ctr(50, seed=1)
    paths = [tmp_path / "a.tsv", tmp_path / "b.tsv"]
    write_criteo(paths[0], {k: v[:30] for k, v in data.items()})
    write_criteo(paths[1], {k: v[30:] for k, v in data.items()})
    loader = DataLoader(CriteoDataset(paths, batch_size=16, chunk_rows=7), batch_size=None, num_workers=1)
    batches = list(loader)
    assert [len(b["label"]) for b in batches] == [16, 16, 16, 2]
    np.testing.assert_array_equal(np.concatenate([b["sparse"] for b in batches]), data["sparse"])


@pytest.mark.parametrize("line, message", [
    (["1", "2"], r"bad.tsv: line 2: expected 40 columns, found 2"),
    (["1", "x"] + ["1"] * 12 + ["a"] * 26, r"bad.tsv: line 2, column 'I1': expected an integer, found the value 'x'"),
    (["2"] + ["1"] * 13 + ["a"] * 26, r"bad.tsv: line 2, column 'label': expected 0 or 1, found 2"),
    ([""] + ["1"] * 13 + ["a"] * 26, r"bad.tsv: line 2, column 'label': expected an integer, found an empty value"),
    (["1"] * 14 + ["a"] * 5 + ["zz12"] + ["a"] * 20, r"bad.tsv: line 2, column 'C6': expected a hex id, found 'zz12'"),
])
def test_bad_lines_name_file_line_and_column(tmp_path, line, message):
    path = tmp_path / "bad.tsv"
    _write(path, [LINES[0], line, LINES[1]])
    with pytest.raises(DataError, match=message):
        read_criteo(path)


def test_bad_line_in_a_later_chunk(tmp_path):
    path = tmp_path / "bad.tsv"
    _write(path, [LINES[0]] * 5 + [["1", "2", "3"]])
    with pytest.raises(DataError, match="line 6: expected 40 columns, found 3"):
        read_criteo(path, chunk_rows=2)
