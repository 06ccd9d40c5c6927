"""MovieLens ratings from local files: `u.data` (ML-100K, tab-separated), `ratings.dat`
(ML-1M/10M, `::`-separated) and `ratings.csv` (ML-20M/25M/latest, with a header)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from luoshu.data._delimited import iter_delimited
from luoshu.data.errors import DataError

_NAMES = ["user", "item", "rating", "timestamp"]
_KINDS = ["int", "int", "float", "int"]
_FORMATS = {"tsv": ("\t", None), "dat": ("::", None), "csv": (",", ["userId", "movieId", "rating", "timestamp"])}


def read_movielens(path: str | os.PathLike, format: str | None = None) -> dict[str, np.ndarray]:
    """Reads a MovieLens ratings file into `{"user", "item"}` int64, `"rating"` float32 and
    `"timestamp"` int64 arrays, ids as in the file. `format` ("tsv", "dat" or "csv") is
    guessed from the file name when not given (gzip-compressed files are read too)."""
    if format is None:
        name = Path(path).name.removesuffix(".gz")
        format = "csv" if name.endswith(".csv") else "dat" if name.endswith(".dat") else "tsv"
    if format not in _FORMATS:
        raise DataError(f"read_movielens format must be one of {sorted(_FORMATS)}; got {format!r}")
    delimiter, header = _FORMATS[format]
    parts = [table for _, table in iter_delimited(path, _NAMES, _KINDS, [False] * 4, delimiter, header)]
    if not parts:
        return {"user": np.zeros(0, np.int64), "item": np.zeros(0, np.int64),
                "rating": np.zeros(0, np.float32), "timestamp": np.zeros(0, np.int64)}
    out = {n: np.concatenate([t.column(n).to_numpy() for t in parts]) for n in _NAMES}
    out["rating"] = out["rating"].astype(np.float32)
    return out
