"""MovieLens readers on tiny files in the three real layouts."""

import gzip

import numpy as np
import pytest

from luoshu.data import DataError, read_movielens

ROWS = [(196, 242, 3.0, 881250949), (186, 302, 3.5, 891717742), (22, 377, 1.0, 878887116)]


def _check(out):
    assert out["user"].dtype == np.int64 and out["rating"].dtype == np.float32
    np.testing.assert_array_equal(out["user"], [r[0] for r in ROWS])
    np.testing.assert_array_equal(out["item"], [r[1] for r in ROWS])
    np.testing.assert_array_equal(out["rating"], [r[2] for r in ROWS])
    np.testing.assert_array_equal(out["timestamp"], [r[3] for r in ROWS])


def test_u_data_tab_separated(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("".join(f"{u}\t{i}\t{r:g}\t{t}\n" for u, i, r, t in ROWS))
    _check(read_movielens(path))


def test_ratings_csv_with_header_and_gzip(tmp_path):
    text = "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ROWS)
    (tmp_path / "ratings.csv").write_text(text)
    _check(read_movielens(tmp_path / "ratings.csv"))
    (tmp_path / "ratings.csv.gz").write_bytes(gzip.compress(text.encode()))
    _check(read_movielens(tmp_path / "ratings.csv.gz"))


def test_ratings_dat_double_colon(tmp_path):
    path = tmp_path / "ratings.dat"
    path.write_text("".join(f"{u}::{i}::{r:g}::{t}\r\n" for u, i, r, t in ROWS))
    _check(read_movielens(path))


def test_bad_movielens_files(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("1\t2\t3\t4\n5\t6\t7\n")
    with pytest.raises(DataError, match=r"u.data: line 2: expected 4 columns, found 3"):
        read_movielens(path)
    path.write_text("1\t2\t3\t4\n\n1\t2\tfive\t4\n")
    with pytest.raises(DataError, match=r"u.data: line 3, column 'rating': expected a number, found the value 'five'"):
        read_movielens(path)
    path.write_text("1\t\t3\t4\n")
    with pytest.raises(DataError, match=r"u.data: line 1, column 'item': expected an integer, found an empty value"):
        read_movielens(path)
    csv = tmp_path / "ratings.csv"
    csv.write_text("user,movie,rating,timestamp\n1,2,3,4\n")
    with pytest.raises(DataError, match="ratings.csv: line 1: expected the header 'userId,movieId,rating,timestamp'"):
        read_movielens(csv)
