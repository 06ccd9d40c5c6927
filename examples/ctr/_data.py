"""Shared by the WDL / DeepFM / DLRM examples: a small synthetic Criteo-like Parquet data set."""

from pathlib import Path

from luoshu import ctr as hugectr
from luoshu.ctr.tools import DataGenerator, DataGeneratorParams

# 26 Criteo-like slots from a handful of values to tens of thousands (scaled down for CPU)
SLOTS = [1000, 500, 20000, 8000, 300, 20, 10000, 600, 3, 9000, 5000, 15000, 3000, 25, 8000, 12000, 10, 4000, 2000,
         4, 14000, 15, 15, 10000, 90, 7000]


def generate(folder: str, slots=SLOTS, files: int = 6, per_file: int = 16384) -> tuple[str, str]:
    """Writes `folder`/file_list.txt and file_list_test.txt once (skips if they exist)."""
    source, eval_source = f"{folder}/file_list.txt", f"{folder}/file_list_test.txt"
    if not Path(source).exists() or not Path(eval_source).exists():
        DataGenerator(DataGeneratorParams(
            format=hugectr.DataReaderType_t.Parquet, label_dim=1, dense_dim=13, num_slot=len(slots),
            i64_input_key=False, source=source, eval_source=eval_source, slot_size_array=slots,
            dist_type=hugectr.Distribution_t.PowerLaw, power_law_type=hugectr.PowerLaw_t.Short,
            num_files=files, eval_num_files=1, num_samples_per_file=per_file)).generate()
    return source, eval_source
