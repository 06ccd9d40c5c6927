"""HugeCTR's DCN quick start, step 1: generate a synthetic Parquet data set (reduced size for CPU).

    python examples/ctr/dcn_generate.py            # writes ./dcn_parquet/

The same script as HugeCTR's `dcn_parquet_generate.py` with `import hugectr` replaced by
`from luoshu import ctr as hugectr`; only the file counts are smaller (HugeCTR: 128 training
files of 40960 samples). Labels follow a hidden click model, so the AUC means something.
"""
# doc-test: args


from luoshu import ctr as hugectr
from luoshu.ctr.tools import DataGenerator, DataGeneratorParams

data_generator_params = DataGeneratorParams(
    format=hugectr.DataReaderType_t.Parquet,
    label_dim=1,
    dense_dim=13,
    num_slot=26,
    i64_input_key=False,
    source="./dcn_parquet/file_list.txt",
    eval_source="./dcn_parquet/file_list_test.txt",
    slot_size_array=[39884, 39043, 17289, 7420, 20263, 3, 7120, 1543, 39884, 39043, 17289, 7420,
                     20263, 3, 7120, 1543, 63, 63, 39884, 39043, 17289, 7420, 20263, 3, 7120,
                     1543],
    dist_type=hugectr.Distribution_t.PowerLaw,
    power_law_type=hugectr.PowerLaw_t.Short,
    num_files=8,  # reduced from HugeCTR's 128
    eval_num_files=1,  # reduced from 32
    num_samples_per_file=16384,  # reduced from 40960
)
data_generator = DataGenerator(data_generator_params)
data_generator.generate()
