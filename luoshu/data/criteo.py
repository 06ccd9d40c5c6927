"""Criteo click logs: the TSV reader (streaming, in chunks), its writer, and the CTR column layout.

A line holds a 0/1 label, 13 integer features `I1`..`I13` and 26 categorical features
`C1`..`C26` written as hexadecimal hashes, tab-separated; an empty field is a missing value.
In memory a CTR batch is a dict: `"dense"` float32 (N, 13), `"sparse"` int64 (N, 26),
`"label"` float32 (N,).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from luoshu.data._delimited import iter_delimited
from luoshu.data.dataset import IterableDataset, rebatch
from luoshu.data.errors import DataError

NUM_DENSE, NUM_SPARSE = 13, 26
DENSE_COLUMNS = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
SPARSE_COLUMNS = [f"C{i}" for i in range(1, NUM_SPARSE + 1)]
COLUMNS = ["label", *DENSE_COLUMNS, *SPARSE_COLUMNS]

_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_VALUE[_c] = 10 + _i
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _parse_hex(column: pa.ChunkedArray, path, first_line: int, name: str) -> np.ndarray:
    """Hex strings → int64, vectorised over the column's bytes; "" → -1."""
    arr = column.combine_chunks()
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    starts, ends = offsets[:-1].astype(np.int64), offsets[1:].astype(np.int64)
    lengths = ends - starts
    too_long = np.flatnonzero(lengths > 15)
    if too_long.size:
        r = too_long[0]
        raise DataError(f"{path}: line {first_line + r}, column {name!r}: the hex id "
                        f"{bytes(data[starts[r]:ends[r]]).decode(errors='replace')!r} has more than 15 digits")
    values = np.zeros(n, dtype=np.int64)
    bad = np.zeros(n, dtype=bool)
    for k in range(int(lengths.max(initial=0))):  # k-th digit from the right
        has = lengths > k
        digit = _HEX_VALUE[data[np.where(has, ends - 1 - k, 0)]] if data.size else np.zeros(n, np.uint8)
        bad |= has & (digit == 255)
        values |= np.where(has, digit.astype(np.int64), 0) << (4 * k)
    if bad.any():
        r = np.flatnonzero(bad)[0]
        raise DataError(f"{path}: line {first_line + r}, column {name!r}: expected a hex id, found "
                        f"{bytes(data[starts[r]:ends[r]]).decode(errors='replace')!r}")
    values[lengths == 0] = -1
    return values


def _bucketize(sparse: np.ndarray, num_buckets: int | Sequence[int] | None) -> np.ndarray:
    if num_buckets is None:
        return sparse
    buckets = np.broadcast_to(np.asarray(num_buckets, dtype=np.int64), (sparse.shape[1],))
    if np.any(buckets < 2):
        raise DataError(f"num_buckets must be >= 2 (bucket 0 is kept for missing ids); got {num_buckets}")
    return np.where(sparse < 0, 0, 1 + sparse % (buckets - 1))


def iter_criteo(path: str | os.PathLike, chunk_rows: int = 1 << 16, num_buckets: int | Sequence[int] | None = None,
                log_dense: bool = False, dense_missing: float = 0.0) -> Iterator[dict[str, np.ndarray]]:
    """Streams a Criteo TSV file (gzip or not) as CTR batches of up to `chunk_rows` lines.

    Missing integer features become `dense_missing`; `log_dense` applies `log(1 + max(x, 0))`
    (as DLRM's preprocessing). Categorical ids are the parsed hex values with missing = -1, or
    with `num_buckets` (one for all 26 columns, or one per column) ids in [0, B): 0 for
    missing, `1 + value % (B - 1)` otherwise, ready for an embedding table of B rows.
    """
    kinds = ["int"] * (1 + NUM_DENSE) + ["str"] * NUM_SPARSE
    nullable = [False] + [True] * (NUM_DENSE + NUM_SPARSE)
    for first_line, table in iter_delimited(path, COLUMNS, kinds, nullable, "\t", chunk_rows=chunk_rows):
        label = table.column("label").to_numpy()
        bad = np.flatnonzero((label != 0) & (label != 1))
        if bad.size:
            raise DataError(f"{path}: line {first_line + bad[0]}, column 'label': expected 0 or 1, "
                            f"found {label[bad[0]]}")
        dense = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in DENSE_COLUMNS], axis=1)
        dense = np.where(np.isnan(dense), dense_missing, dense).astype(np.float32)  # nulls arrive as NaN
        if log_dense:
            dense = np.log1p(np.maximum(dense, 0))
        sparse = np.stack([_parse_hex(table.column(c), path, first_line, c) for c in SPARSE_COLUMNS], axis=1)
        yield {"dense": dense, "sparse": _bucketize(sparse, num_buckets), "label": label.astype(np.float32)}


def _concat(batches: list[dict[str, np.ndarray]], dense_dim: int = NUM_DENSE, sparse_dim: int = NUM_SPARSE):
    if not batches:
        return {"dense": np.zeros((0, dense_dim), np.float32), "sparse": np.zeros((0, sparse_dim), np.int64),
                "label": np.zeros(0, np.float32)}
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def read_criteo(path: str | os.PathLike, **options) -> dict[str, np.ndarray]:
    """Reads a whole Criteo TSV file; see `iter_criteo` for the options."""
    return _concat(list(iter_criteo(path, **options)))


def _check_ctr(data: dict[str, np.ndarray], what: str, dense_dim: int | None = None, sparse_dim: int | None = None):
    for key in ("dense", "sparse", "label"):
        if key not in data:
            raise DataError(f"{what}: the CTR data has no {key!r} array (keys: {sorted(data)})")
    dense, sparse, label = (np.asarray(data[k]) for k in ("dense", "sparse", "label"))
    n = len(label)
    if dense.ndim != 2 or sparse.ndim != 2 or label.ndim != 1 or len(dense) != n or len(sparse) != n:
        raise DataError(f"{what}: expected dense (N, D), sparse (N, S), label (N,); got {dense.shape}, "
                        f"{sparse.shape}, {label.shape}")
    if dense_dim is not None and (dense.shape[1], sparse.shape[1]) != (dense_dim, sparse_dim):
        raise DataError(f"{what}: the Criteo format has {dense_dim} dense and {sparse_dim} sparse columns; "
                        f"got {dense.shape[1]} and {sparse.shape[1]}")
    return dense, sparse, label


def _hex_strings(values: np.ndarray) -> pa.Array:
    """int64 ids → lower-case hex strings at least 8 digits wide; negative ids → null (missing)."""
    missing = values < 0
    v = np.where(missing, 0, values).astype(np.uint64)
    width = max(8, int(np.ceil(np.log2(float(v.max(initial=0)) + 1) / 4)))
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64) * np.uint64(4)
    digits = _HEX_DIGITS[((v[:, None] >> shifts) & np.uint64(15)).astype(np.int64)]
    strings = np.ascontiguousarray(digits).view(f"S{width}").ravel()
    return pa.array(strings, type=pa.binary(), mask=missing).cast(pa.string())


def write_criteo(path: str | os.PathLike, data: dict[str, np.ndarray], chunk_rows: int = 1 << 16) -> None:
    """Writes CTR data (13 dense, 26 sparse columns) as a Criteo TSV file, gzip-compressed when
    the name ends in ".gz". Dense values are written as integers, NaN as missing; negative
    sparse ids as missing, others as hex."""
    dense, sparse, label = _check_ctr(data, f"write_criteo({path})", NUM_DENSE, NUM_SPARSE)
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(Path(path), "wb") as f:
        for start in range(0, len(label), chunk_rows):
            rows = slice(start, start + chunk_rows)
            columns = [pa.array(label[rows].astype(np.int64))]
            for j in range(NUM_DENSE):
                col = dense[rows, j]
                missing = np.isnan(col)
                columns.append(pa.array(np.where(missing, 0, np.rint(col)).astype(np.int64), mask=missing))
            columns += [_hex_strings(sparse[rows, j]) for j in range(NUM_SPARSE)]
            pacsv.write_csv(pa.table(columns, names=COLUMNS), f, options)


def ctr_to_columns(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CTR batch → named columns (`label`, `I1`.., `C1`..), the layout of CTR Parquet files."""
    dense, sparse, label = _check_ctr(data, "ctr_to_columns")
    columns = {"label": label.astype(np.float32)}
    columns.update({f"I{j + 1}": dense[:, j].astype(np.float32) for j in range(dense.shape[1])})
    columns.update({f"C{j + 1}": sparse[:, j].astype(np.int64) for j in range(sparse.shape[1])})
    return columns


def ctr_from_columns(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Named columns (`label`, `I1`.., `C1`..) → CTR batch; the inverse of `ctr_to_columns`."""
    dense_names = sorted((c for c in columns if c[:1] == "I" and c[1:].isdigit()), key=lambda c: int(c[1:]))
    sparse_names = sorted((c for c in columns if c[:1] == "C" and c[1:].isdigit()), key=lambda c: int(c[1:]))
    if "label" not in columns:
        raise DataError(f"ctr_from_columns: no 'label' column among {sorted(columns)}")
    n = len(columns["label"])

    def stacked(names: list[str], dtype, kind: str, words: str) -> np.ndarray:
        out = np.zeros((n, len(names)), dtype)
        for j, name in enumerate(names):
            value = np.asarray(columns[name])
            if value.dtype.kind not in kind:  # e.g. strings in an id column: name it, do not guess
                raise DataError(f"ctr_from_columns: column {name!r} holds {value.dtype} values such as "
                                f"{value[:1].tolist()}; expected {words}")
            out[:, j] = value
        return out

    return {"dense": stacked(dense_names, np.float32, "biuf", "numbers"),
            "sparse": stacked(sparse_names, np.int64, "iu", "integer ids"),
            "label": stacked(["label"], np.float32, "biuf", "numbers")[:, 0]}


class CriteoDataset(IterableDataset):
    """Streams CTR batches of exactly `batch_size` rows (the last may be short unless
    `drop_last`) from Criteo TSV files, reading `chunk_rows` lines at a time. Use it with
    `DataLoader(dataset, batch_size=None, num_workers=1)` to parse ahead in a thread."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], batch_size: int,
                 drop_last: bool = False, chunk_rows: int = 1 << 16, **options):
        self.paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
        self.batch_size, self.drop_last, self.chunk_rows, self.options = batch_size, drop_last, chunk_rows, options

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        chunks = (c for p in self.paths for c in iter_criteo(p, chunk_rows=self.chunk_rows, **self.options))
        yield from rebatch(chunks, self.batch_size, self.drop_last)

