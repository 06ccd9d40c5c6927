"""`luoshu.ctr.tools`: HugeCTR's synthetic data generator (`DataGeneratorParams`, `DataGenerator`).

Arguments and defaults are HugeCTR's (`num_files=128`, `eval_num_files=32`,
`num_samples_per_file=40960`, power law `Specific` with `alpha=1.2`; `Long` / `Medium` /
`Short` mean alpha 0.9 / 1.1 / 1.3 over each slot's key range, key 0 the hottest). Unlike
HugeCTR's random labels, labels follow the hidden click model of
`luoshu.data.synthetic_ctr` (one model per `seed`, shared by the training and evaluation
files), so evaluation AUC measures learning. Dense features are written as log(1 + count)
(Raw with `float_label_dense=False`: the integer counts, which the reader turns into
log(1 + x), as HugeCTR does). Slots with `nnz_array[k] > 1` hold that many keys per sample:
the first follows the hidden model, the others are drawn from the same distribution.

Files: Parquet and Norm go to `train/` and `val/` beside the `source` / `eval_source` file
lists (`gen_{i}.parquet` / `gen_{i}.data`), with HugeCTR's `_metadata.json` for Parquet (in
the data folders and beside the lists). Raw writes the single files `source` and
`eval_source`. Norm keys carry slot offsets (unique across slots, as Norm data expects);
Parquet and Raw keys are per slot, offset by the reader's `slot_size_array`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from luoshu.ctr.config import Check_t, CTRError, DataReaderType_t, Distribution_t, PowerLaw_t
from luoshu.ctr.reader import NORM_HEADER_BYTES, write_file_list
from luoshu.data.parquet import write_parquet
from luoshu.data.synthetic import synthetic_ctr

POWER_LAW_ALPHA = {PowerLaw_t.Long: 0.9, PowerLaw_t.Medium: 1.1, PowerLaw_t.Short: 1.3}


@dataclass
class DataGeneratorParams:
    """What `DataGenerator.generate()` writes (HugeCTR's arguments and defaults, plus `seed`)."""

    format: DataReaderType_t = DataReaderType_t.Parquet
    label_dim: int = 1
    dense_dim: int = 13
    num_slot: int = 26
    i64_input_key: bool = False
    source: str = "./file_list.txt"
    eval_source: str = "./file_list_test.txt"
    slot_size_array: Sequence[int] = ()
    nnz_array: Sequence[int] = ()
    check_type: Check_t = Check_t.Sum
    dist_type: Distribution_t = Distribution_t.PowerLaw
    power_law_type: PowerLaw_t = PowerLaw_t.Specific
    alpha: float = 1.2
    num_files: int = 128
    eval_num_files: int = 32
    num_samples_per_file: int = 40960
    num_samples: int = 5242880
    eval_num_samples: int = 1310720
    float_label_dense: bool = False
    seed: int = 0  # luoshu: the hidden click model and the samples
    label_options: dict = field(default_factory=dict)  # luoshu: passed to synthetic_ctr (ctr, logit_scale, ...)

    def __post_init__(self):
        self.format = DataReaderType_t.parse(self.format, "DataGeneratorParams format")
        self.check_type = Check_t.parse(self.check_type, "DataGeneratorParams check_type")
        self.dist_type = Distribution_t.parse(self.dist_type, "DataGeneratorParams dist_type")
        self.power_law_type = PowerLaw_t.parse(self.power_law_type, "DataGeneratorParams power_law_type")
        self.slot_size_array = [int(s) for s in self.slot_size_array]
        if len(self.slot_size_array) != self.num_slot:
            raise CTRError(f"DataGeneratorParams slot_size_array: {len(self.slot_size_array)} entries for "
                           f"num_slot={self.num_slot}")
        if any(s < 1 for s in self.slot_size_array):
            raise CTRError(f"DataGeneratorParams slot_size_array: sizes must be positive, found {self.slot_size_array}")
        self.nnz_array = [int(n) for n in self.nnz_array] or [1] * self.num_slot
        if len(self.nnz_array) != self.num_slot or min(self.nnz_array) < 1:
            raise CTRError(f"DataGeneratorParams nnz_array: expected {self.num_slot} counts >= 1, "
                           f"found {self.nnz_array}")
        if self.format is DataReaderType_t.Raw and max(self.nnz_array) > 1:
            raise CTRError("DataGeneratorParams nnz_array: the Raw format holds one key per slot")
        if self.dist_type is Distribution_t.PowerLaw and self.power_law_type is PowerLaw_t.Specific \
                and not (self.alpha > 0 and self.alpha != 1.0):
            raise CTRError(f"DataGeneratorParams alpha: expected alpha > 0 and != 1, found {self.alpha}")
        for name in ("label_dim", "num_files", "eval_num_files", "num_samples_per_file"):
            if getattr(self, name) < 1:
                raise CTRError(f"DataGeneratorParams {name}: expected a positive integer, found {getattr(self, name)}")

    @property
    def effective_alpha(self) -> float:
        return POWER_LAW_ALPHA.get(self.power_law_type, self.alpha)


class DataGenerator:
    """Writes the synthetic training and evaluation data `DataGeneratorParams` describe."""

    def __init__(self, data_generator_params: DataGeneratorParams):
        if not isinstance(data_generator_params, DataGeneratorParams):
            raise CTRError(f"DataGenerator: expected DataGeneratorParams, found {type(data_generator_params).__name__}")
        self.params = data_generator_params

    def _samples(self, n: int, index: int) -> dict[str, np.ndarray]:
        p = self.params
        dist = "power_law" if p.dist_type is Distribution_t.PowerLaw else "uniform"
        data = synthetic_ctr(n, p.dense_dim, p.slot_size_array, dist=dist, alpha=p.effective_alpha, seed=p.seed,
                             return_probability=p.label_dim > 1, sample_index=index, **p.label_options)
        rng = np.random.default_rng([p.seed, index, 1])
        if p.label_dim > 1:  # further label columns: independent clicks with the same probability
            extra = rng.random((n, p.label_dim - 1)) < data["probability"][:, None]
            data["label"] = np.concatenate([data["label"][:, None], extra.astype(np.float32)], axis=1)
        else:
            data["label"] = data["label"][:, None]
        keys = [data["sparse"][:, s:s + 1] for s in range(p.num_slot)]
        for s, nnz in enumerate(p.nnz_array):
            if nnz > 1:
                more = synthetic_ctr(n * (nnz - 1), 0, [p.slot_size_array[s]], dist=dist, alpha=p.effective_alpha,
                                     seed=p.seed, sample_index=1_000_003 * (index + 1) + s)["sparse"]
                keys[s] = np.concatenate([keys[s], more.reshape(n, nnz - 1)], axis=1)
        data["keys"] = keys
        return data

    def generate(self) -> None:
        """Generates the training then the evaluation data (progress on stderr)."""
        from tqdm import tqdm

        p = self.params
        if p.format is DataReaderType_t.Raw:
            jobs = [(p.source, p.num_samples, 0), (p.eval_source, p.eval_num_samples, 1 << 20)]
            for path, n, base in tqdm(jobs, desc="raw files", unit="file"):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._write_raw(Path(path), n, base)
            return
        for list_path, count, folder, base in ((p.source, p.num_files, "train", 0),
                                               (p.eval_source, p.eval_num_files, "val", 1 << 20)):
            list_path = Path(list_path)
            out_dir = list_path.parent / folder
            out_dir.mkdir(parents=True, exist_ok=True)
            files = []
            ext = "parquet" if p.format is DataReaderType_t.Parquet else "data"
            for i in tqdm(range(count), desc=f"{folder} files", unit="file"):
                path = out_dir / f"gen_{i}.{ext}"
                data = self._samples(p.num_samples_per_file, base + i)
                if p.format is DataReaderType_t.Parquet:
                    self._write_parquet(path, data)
                else:
                    self._write_norm(path, data)
                files.append(path)
            write_file_list(list_path, files)
            if p.format is DataReaderType_t.Parquet:
                self._write_metadata(out_dir, files)
                self._write_metadata(list_path.parent, files, merge=True)

    # --- formats ------------------------------------------------------------------------------
    def _columns(self) -> tuple[list[str], list[str], list[str]]:
        p = self.params
        labels = ["label"] if p.label_dim == 1 else [f"label{j}" for j in range(p.label_dim)]
        return labels, [f"I{j + 1}" for j in range(p.dense_dim)], [f"C{j + 1}" for j in range(p.num_slot)]

    def _write_parquet(self, path: Path, data: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        labels, conts, cats = self._columns()
        cols = {name: data["label"][:, j] for j, name in enumerate(labels)}
        dense = np.log1p(data["dense"]).astype(np.float32)
        cols.update({name: dense[:, j] for j, name in enumerate(conts)})
        if max(self.params.nnz_array) == 1:
            cols.update({name: data["keys"][j][:, 0] for j, name in enumerate(cats)})
            write_parquet(path, cols)
            return
        arrays = {k: pa.array(v) for k, v in cols.items()}
        for j, name in enumerate(cats):
            k = data["keys"][j]
            offsets = np.arange(0, k.size + 1, k.shape[1], dtype=np.int32)
            arrays[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(k.reshape(-1)))
        pq.write_table(pa.table(arrays), path, compression="zstd")

    def _write_metadata(self, folder: Path, files: list[Path], merge: bool = False) -> None:
        labels, conts, cats = self._columns()
        meta_path = folder / "_metadata.json"
        stats = [{"file_name": str(f.resolve()) if merge else f.name, "num_rows": self.params.num_samples_per_file}
                 for f in files]
        if merge and meta_path.is_file():
            try:
                stats = json.loads(meta_path.read_text()).get("file_stats", []) + stats
            except json.JSONDecodeError:
                pass
        names = labels + conts + cats
        meta = {"file_stats": stats,
                "labels": [{"col_name": c, "index": names.index(c)} for c in labels],
                "conts": [{"col_name": c, "index": names.index(c)} for c in conts],
                "cats": [{"col_name": c, "index": names.index(c)} for c in cats]}
        meta_path.write_text(json.dumps(meta, indent=2))

    def _write_norm(self, path: Path, data: dict) -> None:
        p = self.params
        n = len(data["label"])
        key_dtype = "<i8" if p.i64_input_key else "<u4"
        offsets = np.concatenate([[0], np.cumsum(p.slot_size_array)[:-1]]).astype(np.int64)
        fields = [("label", "<f4", (p.label_dim,)), ("dense", "<f4", (p.dense_dim,))]
        for s, nnz in enumerate(p.nnz_array):
            fields += [(f"nnz{s}", "<i4"), (f"keys{s}", key_dtype, (nnz,))]
        body = np.zeros(n, dtype=np.dtype(fields))
        body["label"] = data["label"]
        body["dense"] = np.log1p(data["dense"])
        for s, nnz in enumerate(p.nnz_array):
            body[f"nnz{s}"] = nnz
            body[f"keys{s}"] = (data["keys"][s] + offsets[s]).reshape(n, nnz)
        check = p.check_type is Check_t.Sum
        header = np.array([int(check), n, p.label_dim, p.dense_dim, p.num_slot, 0, 0, 0], dtype="<i8")
        assert header.nbytes == NORM_HEADER_BYTES
        if check:
            raw = body.view(np.uint8).reshape(n, body.dtype.itemsize)
            record = np.zeros(n, dtype=np.dtype([("length", "<i4"), ("body", body.dtype), ("check", "u1")]))
            record["length"] = body.dtype.itemsize
            record["body"] = body
            record["check"] = (raw.sum(axis=1, dtype=np.int64) % 256).astype(np.uint8)
            body = record
        with open(path, "wb") as f:
            f.write(header.tobytes())
            f.write(body.tobytes())

    def _write_raw(self, path: Path, n: int, base: int) -> None:
        p = self.params
        num = "<f4" if p.float_label_dense else "<i4"
        dtype = np.dtype([("label", num, (p.label_dim,)), ("dense", num, (p.dense_dim,)),
                          ("sparse", "<u4", (p.num_slot,))])
        step = max(p.num_samples_per_file, 1)
        with open(path, "wb") as f:
            for i, start in enumerate(range(0, n, step)):
                data = self._samples(min(step, n - start), base + i)
                rec = np.zeros(len(data["label"]), dtype=dtype)
                rec["label"] = data["label"]
                rec["dense"] = data["dense"] if not p.float_label_dense else np.log1p(data["dense"])
                rec["sparse"] = np.concatenate(data["keys"], axis=1)
                f.write(rec.tobytes())
