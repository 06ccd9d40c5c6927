"""HugeCTR's data formats: file lists, Parquet (with `_metadata.json`), Norm and Raw binary files.

A source yields chunks `{"label": (n, label_dim) float32, "dense": (n, dense_dim) float32,
"sparse": (n, slots, hotness) int64}`, keys as stored (no slot offsets), `-1` padding the
slots that hold fewer keys than the widest one. `batches` cuts them into training or
evaluation batches.

Norm files (HugeCTR's layout): a 64-byte header of eight int64 (error_check,
number_of_records, label_dim, dense_dim, slot_num, 3 reserved); then per sample, with
`error_check = 1` an int32 byte count of the sample body, the body (label float32s, dense
float32s, per slot an int32 nnz and its keys as uint32 or int64), and a uint8 checksum (the
sum of the body's bytes modulo 256). Raw files: no header, fixed records of label and dense
(float32, or int32 with dense features turned into log(x + 1)) and one uint32 key per slot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from luoshu.ctr.config import Check_t, CTRError, DataReaderType_t
from luoshu.data.dataset import rebatch
from luoshu.data.errors import DataError
from luoshu.data.parquet import ParquetDataset

NORM_HEADER_BYTES = 64


def read_file_list(path: str | os.PathLike, what: str = "source") -> list[Path]:
    """The data files a HugeCTR file list names: first line their count, then one path per line
    (relative paths are taken from the list's folder when they do not exist from the cwd)."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise CTRError(f"DataReaderParams {what}: file list {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CTRError(f"DataReaderParams {what}: file list {path} cannot be read: {exc}") from None
    if not lines or not lines[0].isdigit():
        raise CTRError(f"DataReaderParams {what}: file list {path} must start with the number of files, "
                       f"found {lines[0][:40] if lines else 'an empty file'!r}")
    count, files = int(lines[0]), lines[1:]
    if count != len(files) or count == 0:
        raise CTRError(f"DataReaderParams {what}: file list {path} announces {count} file(s) and lists "
                       f"{len(files)}")
    out = []
    for f in files:
        p = Path(f)
        if not p.is_absolute() and not p.exists() and (path.parent / p).exists():
            p = path.parent / p
        elif not p.is_absolute() and not p.exists() and (path.parent / p.name).exists():
            p = path.parent / p.name
        if not p.is_file():
            raise CTRError(f"DataReaderParams {what}: {path} lists {f}, which does not exist")
        out.append(p)
    return out


def write_file_list(path: str | os.PathLike, files: list) -> None:
    """Writes a HugeCTR file list (the count, then one path per line)."""
    Path(path).write_text(f"{len(files)}\n" + "".join(f"{f}\n" for f in files))


@dataclass
class Layout:
    """What a source holds: label columns, dense features and slots (with the widest hotness)."""

    label_dim: int
    dense_dim: int
    num_slots: int
    num_rows: int


class _Source:
    layout: Layout

    def chunks(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError


def _pad_lists(columns: list, n: int) -> np.ndarray:
    """(n, slots, hotness) int64 from per-slot columns of ints or of int lists, -1 padded."""
    widths = [1 if c.dtype != object else max((len(v) for v in c), default=1) for c in columns]
    out = np.full((n, len(columns), max(widths, default=1)), -1, dtype=np.int64)
    for s, c in enumerate(columns):
        if c.dtype != object:
            out[:, s, 0] = c
        else:
            for i, v in enumerate(c):
                out[i, s, :len(v)] = v
    return out


class ParquetSource(_Source):
    """Parquet files; columns from the `_metadata.json` beside the file list when there is one
    (HugeCTR / NVTabular: `labels`, `conts`, `cats`), else named `label*`, `I1`.., `C1`.."""

    def __init__(self, files: list[Path], list_path: Path, what: str, shuffle: bool = False, seed: int = 0):
        self.files, self.shuffle, self.seed = files, shuffle, seed
        first = self._schema(files[0])
        meta_path = list_path.parent / "_metadata.json"
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                self.labels = [c["col_name"] for c in meta["labels"]]
                self.conts = [c["col_name"] for c in meta["conts"]]
                self.cats = [c["col_name"] for c in meta["cats"]]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CTRError(f"DataReaderParams {what}: {meta_path} is not a HugeCTR _metadata.json "
                               f"(labels / conts / cats): {exc}") from None
        else:
            def numbered(prefix):
                return sorted((c for c in first if c.startswith(prefix) and c[len(prefix):].isdigit()),
                              key=lambda c: int(c[len(prefix):]))
            self.labels = ["label"] if "label" in first else numbered("label")
            self.conts, self.cats = numbered("I"), numbered("C")
        self.columns = self.labels + self.conts + self.cats
        missing = [c for c in self.columns if c not in first]
        if missing:
            raise CTRError(f"DataReaderParams {what}: {files[0]} has no column(s) {missing}")
        try:
            self.dataset = ParquetDataset(files, columns=self.columns, batch_size=1 << 14, shuffle=shuffle,
                                          seed=seed)
        except DataError as exc:
            raise CTRError(f"DataReaderParams {what}: {exc}") from None
        self.layout = Layout(len(self.labels), len(self.conts), len(self.cats), self.dataset.num_rows)

    @staticmethod
    def _schema(path: Path) -> list[str]:
        try:
            return pq.ParquetFile(path).schema_arrow.names
        except (pa.ArrowException, OSError) as exc:
            raise CTRError(f"DataReaderParams: {path} is not a readable Parquet file: {exc}") from None

    def chunks(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        self.dataset.set_epoch(epoch)
        for cols in self.dataset:
            n = len(cols[self.columns[0]])
            yield {"label": np.stack([cols[c] for c in self.labels], 1).astype(np.float32, copy=False)
                   if self.labels else np.zeros((n, 0), np.float32),
                   "dense": np.stack([cols[c] for c in self.conts], 1).astype(np.float32, copy=False)
                   if self.conts else np.zeros((n, 0), np.float32),
                   "sparse": _pad_lists([cols[c] for c in self.cats], n)}


def _norm_header(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            raw = f.read(NORM_HEADER_BYTES)
    except OSError as exc:
        raise CTRError(f"DataReaderParams: cannot read {path}: {exc}") from None
    if len(raw) < NORM_HEADER_BYTES:
        raise CTRError(f"DataReaderParams: {path} is shorter than a Norm header ({NORM_HEADER_BYTES} bytes)")
    return np.frombuffer(raw, dtype="<i8")


class NormSource(_Source):
    """HugeCTR Norm binary files (see the module docstring)."""

    def __init__(self, files: list[Path], what: str, check_type: Check_t, i64_keys: bool):
        self.files, self.check, self.key_dtype = files, check_type is Check_t.Sum, "<i8" if i64_keys else "<u4"
        headers = [_norm_header(f) for f in files]
        first = headers[0]
        for f, h in zip(files, headers):
            if bool(h[0]) != self.check:
                raise CTRError(f"DataReaderParams {what} check_type: {f} has error_check={int(h[0])}, the reader "
                               f"expects {int(self.check)} (Check_t.{check_type.name})")
            if tuple(h[2:5]) != tuple(first[2:5]):
                raise CTRError(f"DataReaderParams {what}: {f} holds label/dense/slots {tuple(h[2:5])}, "
                               f"{files[0]} holds {tuple(first[2:5])}")
        self.layout = Layout(int(first[2]), int(first[3]), int(first[4]), int(sum(h[1] for h in headers)))

    def chunks(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        for f in self.files:
            yield self._read(f)

    def _read_fixed(self, data: np.ndarray, rows: int) -> dict[str, np.ndarray] | None:
        """The whole file at once when every sample has the first sample's nnz pattern."""
        lay, kd = self.layout, np.dtype(self.key_dtype)
        pos = NORM_HEADER_BYTES + (4 if self.check else 0) + 4 * (lay.label_dim + lay.dense_dim)
        nnzs = []
        for _ in range(lay.num_slots):
            if pos + 4 > len(data):
                return None
            nnz = int(np.frombuffer(data[pos:pos + 4].tobytes(), "<i4")[0])
            if nnz < 0:
                return None
            nnzs.append(nnz)
            pos += 4 + nnz * kd.itemsize
        fields = [("label", "<f4", (lay.label_dim,)), ("dense", "<f4", (lay.dense_dim,))]
        for s, nnz in enumerate(nnzs):
            fields += [(f"nnz{s}", "<i4"), (f"keys{s}", kd, (nnz,))]
        body = np.dtype(fields)
        rec = np.dtype([("length", "<i4"), ("body", body), ("check", "u1")]) if self.check else body
        if len(data) != NORM_HEADER_BYTES + rows * rec.itemsize:
            return None
        records = data[NORM_HEADER_BYTES:].view(rec)
        b = records["body"] if self.check else records
        if any((b[f"nnz{s}"] != nnz).any() for s, nnz in enumerate(nnzs)):
            return None
        if self.check:
            sums = data[NORM_HEADER_BYTES:].reshape(rows, rec.itemsize)[:, 4:4 + body.itemsize].sum(
                axis=1, dtype=np.int64) % 256
            if (records["length"] != body.itemsize).any() or (sums != records["check"]).any():
                return None  # the sample loop names the first bad sample
        width = max(max(nnzs, default=1), 1)
        sparse = np.full((rows, lay.num_slots, width), -1, np.int64)
        for s, nnz in enumerate(nnzs):
            sparse[:, s, :nnz] = b[f"keys{s}"].reshape(rows, nnz)
        return {"label": b["label"].reshape(rows, -1).astype(np.float32),
                "dense": b["dense"].reshape(rows, -1).astype(np.float32), "sparse": sparse}

    def _read(self, path: Path) -> dict[str, np.ndarray]:
        lay, kd = self.layout, np.dtype(self.key_dtype)
        data = np.fromfile(path, dtype=np.uint8)
        rows = int(np.frombuffer(data[:NORM_HEADER_BYTES].tobytes(), "<i8")[1])
        fast = self._read_fixed(data, rows)
        if fast is not None:
            return fast
        label = np.empty((rows, lay.label_dim), np.float32)
        dense = np.empty((rows, lay.dense_dim), np.float32)
        keys: list[list[np.ndarray]] = []
        pos, head = NORM_HEADER_BYTES, 4 * (lay.label_dim + lay.dense_dim)
        try:
            for r in range(rows):
                if self.check:
                    length = int(np.frombuffer(data[pos:pos + 4].tobytes(), "<i4")[0])
                    pos += 4
                    body_start = pos
                floats = np.frombuffer(data[pos:pos + head].tobytes(), "<f4")
                label[r], dense[r] = floats[:lay.label_dim], floats[lay.label_dim:]
                pos += head
                sample = []
                for _ in range(lay.num_slots):
                    nnz = int(np.frombuffer(data[pos:pos + 4].tobytes(), "<i4")[0])
                    pos += 4
                    sample.append(np.frombuffer(data[pos:pos + nnz * kd.itemsize].tobytes(), kd).astype(np.int64))
                    pos += nnz * kd.itemsize
                if self.check:
                    if pos - body_start != length or int(data[body_start:pos].sum()) % 256 != int(data[pos]):
                        raise CTRError(f"DataReaderParams: {path} sample {r} fails its checksum / length check")
                    pos += 1
                keys.append(sample)
        except CTRError:
            raise
        except (IndexError, ValueError):
            raise CTRError(f"DataReaderParams: {path} is truncated or not a Norm file (at sample {len(keys)} of "
                           f"{rows})") from None
        width = max((len(k) for sample in keys for k in sample), default=1)
        sparse = np.full((rows, lay.num_slots, max(width, 1)), -1, np.int64)
        for r, sample in enumerate(keys):
            for s, k in enumerate(sample):
                sparse[r, s, :len(k)] = k
        return {"label": label, "dense": dense, "sparse": sparse}


class RawSource(_Source):
    """One HugeCTR Raw binary file of fixed records: label, dense, one uint32 key per slot."""

    def __init__(self, path: Path, what: str, label_dim: int, dense_dim: int, num_slots: int, num_samples: int,
                 float_label_dense: bool):
        self.path, self.float = path, float_label_dense
        num = "<f4" if float_label_dense else "<i4"
        self.dtype = np.dtype([("label", num, (label_dim,)), ("dense", num, (dense_dim,)),
                               ("sparse", "<u4", (num_slots,))])
        if not path.is_file():
            raise CTRError(f"DataReaderParams {what}: Raw file {path} does not exist")
        size = path.stat().st_size
        if size % self.dtype.itemsize:
            raise CTRError(f"DataReaderParams {what}: {path} holds {size} bytes, not a multiple of the "
                           f"{self.dtype.itemsize}-byte record of label_dim={label_dim}, dense_dim={dense_dim}, "
                           f"{num_slots} slots")
        rows = size // self.dtype.itemsize
        if num_samples and num_samples > rows:
            raise CTRError(f"DataReaderParams {what}: num_samples={num_samples} but {path} holds {rows} records")
        self.layout = Layout(label_dim, dense_dim, num_slots, num_samples or rows)

    def chunks(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        records = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.layout.num_rows,))
        step = 1 << 16
        for start in range(0, self.layout.num_rows, step):
            rec = records[start:start + step]
            dense = rec["dense"].astype(np.float32)
            if not self.float:
                dense = np.log1p(np.maximum(dense, 0))
            yield {"label": rec["label"].astype(np.float32), "dense": dense,
                   "sparse": rec["sparse"].astype(np.int64)[:, :, None]}


def open_source(reader, source: str, what: str, label_dim: int, dense_dim: int, num_slots: int,
                i64_keys: bool, eval_: bool, seed: int = 0) -> _Source:
    """The source `reader` (a DataReaderParams) names for training (`source`) or evaluation."""
    kind = reader.data_reader_type
    if kind in (DataReaderType_t.Raw, DataReaderType_t.RawAsync):
        n = reader.eval_num_samples if eval_ else reader.num_samples
        return RawSource(Path(source), what, label_dim, dense_dim, num_slots, n, reader.float_label_dense)
    files = read_file_list(source, what)
    if kind is DataReaderType_t.Parquet:
        return ParquetSource(files, Path(source), what, shuffle=reader.shuffle and not eval_, seed=seed)
    return NormSource(files, what, reader.check_type, i64_keys)


def _cycle(source: _Source, repeat: bool) -> Iterator[dict[str, np.ndarray]]:
    epoch = 0
    while True:
        yield from source.chunks(epoch)
        epoch += 1
        if not repeat:
            return


def _pad_hotness(chunks: Iterator[dict[str, np.ndarray]], width: int) -> Iterator[dict[str, np.ndarray]]:
    """Chunks padded (or trimmed of pure padding) to `width` keys per slot, so rebatch can join them."""
    for c in chunks:
        s = c["sparse"]
        if s.shape[2] < width:
            s = np.concatenate([s, np.full(s.shape[:2] + (width - s.shape[2],), -1, np.int64)], axis=2)
        elif s.shape[2] > width:
            if (s[:, :, width:] >= 0).any():
                raise CTRError(f"data: a sample holds up to {int((s >= 0).sum(axis=2).max())} keys in one slot, "
                               f"more than the Input's nnz_per_slot allows ({width})")
            s = s[:, :, :width]
        yield {**c, "sparse": s}


def batches(source: _Source, batch_size: int, repeat: bool, hotness: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch_size` rows with `hotness` keys per slot (-1 padded); with `repeat`,
    endless (passes run into each other, as HugeCTR's non-epoch mode), else one pass whose
    last batch may be short."""
    return rebatch(_pad_hotness(_cycle(source, repeat), hotness), batch_size)
