"""Parquet through pyarrow: `ParquetDataset` streams record batches row group by row group, and
`write_parquet` writes dicts of NumPy columns."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from luoshu.data.criteo import ctr_to_columns
from luoshu.data.dataset import IterableDataset, rebatch
from luoshu.data.errors import DataError


def write_parquet(path: str | os.PathLike, columns: dict[str, np.ndarray], row_group_size: int = 1 << 16,
                  compression: str = "zstd") -> None:
    """Writes equal-length 1-D NumPy columns to a Parquet file in row groups of `row_group_size` rows."""
    lengths = {name: len(np.asarray(v)) for name, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"write_parquet({path}): columns differ in length: {lengths}")
    for name, v in columns.items():
        if np.asarray(v).ndim != 1:
            raise DataError(f"write_parquet({path}): column {name!r} must be 1-D; got shape {np.shape(v)}")
    table = pa.table({name: pa.array(np.asarray(v)) for name, v in columns.items()})
    pq.write_table(table, Path(path), row_group_size=row_group_size, compression=compression)


def write_ctr_parquet(path: str | os.PathLike, data: dict[str, np.ndarray], row_group_size: int = 1 << 16) -> None:
    """Writes a CTR batch (`dense`, `sparse`, `label`) as Parquet columns `label`, `I1`.., `C1`..;
    read it back with `ParquetDataset(path, transform=ctr_from_columns)`."""
    write_parquet(path, ctr_to_columns(data), row_group_size)


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None


class ParquetDataset(IterableDataset):
    """Streams dicts of NumPy columns from Parquet files, `batch_size` rows at a time, holding
    one row group in memory (not whole files).

    `columns` selects columns (all by default; every file must have them). Nulls become NaN in
    float columns, or `fill_null` (a scalar or a per-column dict); a null in another column with
    no fill value is an error naming the file, row group and column. `shuffle` permutes the
    order of (file, row group) pieces and the rows within each piece, seeded by `(seed, epoch)`
    with the epoch advancing on each pass (or `set_epoch`). `transform` maps each batch dict
    (e.g. `ctr_from_columns`).
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], columns: Sequence[str] | None = None,
                 batch_size: int = 1024, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                 fill_null: Any = None, transform: Callable[[dict], Any] | None = None):
        self.paths = [Path(paths)] if isinstance(paths, str | os.PathLike) else [Path(p) for p in paths]
        if not self.paths:
            raise DataError("ParquetDataset needs at least one file")
        if batch_size < 1:
            raise DataError(f"ParquetDataset batch_size must be positive; got {batch_size}")
        self.columns = list(columns) if columns is not None else None
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.fill_null, self.transform, self.epoch = fill_null, transform, 0
        self.num_rows = 0
        self._pieces = []  # (file index, row group)
        for i, path in enumerate(self.paths):
            meta = _open(path).metadata
            names = set(meta.schema.names)
            missing = [c for c in (self.columns or []) if c not in names]
            if missing:
                raise DataError(f"{path}: no column(s) {missing}; the file has {sorted(names)}")
            self.num_rows += meta.num_rows
            self._pieces += [(i, g) for g in range(meta.num_row_groups)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """The number of batches one pass yields."""
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _to_numpy(self, batch: pa.RecordBatch, path: Path, group: int) -> dict[str, np.ndarray]:
        out = {}
        for name, column in zip(batch.schema.names, batch.columns):
            if column.null_count:
                fill = self.fill_null.get(name) if isinstance(self.fill_null, dict) else self.fill_null
                if fill is not None:
                    column = column.fill_null(pa.scalar(fill, type=column.type))
                elif not pa.types.is_floating(column.type):
                    raise DataError(f"{path}: row group {group}, column {name!r}: {column.null_count} null value(s) "
                                    f"in a {column.type} column; pass fill_null")
            out[name] = column.to_numpy(zero_copy_only=False)
        return out

    def _chunks(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        pieces = [self._pieces[i] for i in rng.permutation(len(self._pieces))] if rng else self._pieces
        files: dict[int, pq.ParquetFile] = {}
        for file_index, group in pieces:
            path = self.paths[file_index]
            if file_index not in files:
                files[file_index] = _open(path)
            pf = files[file_index]
            try:
                if rng is None:
                    for batch in pf.iter_batches(batch_size=self.batch_size, row_groups=[group], columns=self.columns):
                        yield self._to_numpy(batch, path, group)
                else:
                    table = pf.read_row_group(group, columns=self.columns)
                    table = table.take(pa.array(rng.permutation(table.num_rows)))
                    for batch in table.to_batches(max_chunksize=self.batch_size):
                        yield self._to_numpy(batch, path, group)
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"{path}: cannot read row group {group}: {exc}") from None

    def __iter__(self) -> Iterator[Any]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        for batch in rebatch(self._chunks(epoch), self.batch_size, self.drop_last):
            yield self.transform(batch) if self.transform is not None else batch
