"""luoshu.ctr.tools.DataGenerator and the Parquet / Norm / Raw readers."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from luoshu import ctr as hugectr
from luoshu.ctr import reader as readers
from luoshu.ctr.tools import DataGenerator, DataGeneratorParams
from luoshu.data import synthetic_ctr
from tests.ctr.conftest import generate

SLOTS = [7, 40, 300]


def _chunks(source):
    chunks = list(source.chunks(0))
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def test_parquet_files_lists_and_metadata(tmp_path):
    train, test = generate(tmp_path, slots=SLOTS, dense=2, files=2, eval_files=1, per_file=500, seed=5)
    assert train.read_text().splitlines()[0] == "2"
    files = hugectr.read_file_list(train)
    assert [f.name for f in files] == ["gen_0.parquet", "gen_1.parquet"] and files[0].parent.name == "train"
    assert [f.parent.name for f in hugectr.read_file_list(test)] == ["val"]
    meta = json.loads((tmp_path / "train" / "_metadata.json").read_text())
    assert [c["col_name"] for c in meta["cats"]] == ["C1", "C2", "C3"]
    assert [c["col_name"] for c in meta["conts"]] == ["I1", "I2"] and meta["labels"][0]["col_name"] == "label"
    assert [s["num_rows"] for s in meta["file_stats"]] == [500, 500]
    # the files hold synthetic_ctr's samples from one hidden model: file i is sample_index i
    table = pq.read_table(files[1])
    ref = synthetic_ctr(500, 2, SLOTS, dist="power_law", alpha=1.3, seed=5, sample_index=1)
    np.testing.assert_array_equal(table.column("C2").to_numpy(), ref["sparse"][:, 1])
    np.testing.assert_allclose(table.column("I1").to_numpy(), np.log1p(ref["dense"][:, 0]), rtol=1e-6)
    np.testing.assert_array_equal(table.column("label").to_numpy(), ref["label"])


@pytest.mark.parametrize("kind, alpha", [("Long", 0.9), ("Medium", 1.1), ("Short", 1.3)])
def test_power_law_types_mean_hugectr_alphas(tmp_path, kind, alpha):
    params = DataGeneratorParams(format=hugectr.DataReaderType_t.Parquet, label_dim=1, dense_dim=1, num_slot=1,
                                 source=str(tmp_path / "l.txt"), eval_source=str(tmp_path / "t.txt"),
                                 slot_size_array=[50], power_law_type=getattr(hugectr.PowerLaw_t, kind),
                                 num_files=1, eval_num_files=1, num_samples_per_file=20000)
    assert params.effective_alpha == alpha
    DataGenerator(params).generate()
    keys = pq.read_table(tmp_path / "train" / "gen_0.parquet").column("C1").to_numpy()
    expected = np.arange(1, 51, dtype=np.float64) ** -alpha
    expected /= expected.sum()
    observed = np.bincount(keys, minlength=50) / len(keys)
    np.testing.assert_allclose(observed[:5], expected[:5], atol=0.01)


def test_norm_round_trip_with_checksum_and_multi_hot(tmp_path):
    train, _ = generate(tmp_path, fmt=hugectr.DataReaderType_t.Norm, slots=SLOTS, dense=2, files=1, eval_files=1,
                        per_file=300, nnz=[1, 3, 2], seed=2)
    src = readers.open_source(hugectr.DataReaderParams(data_reader_type=hugectr.DataReaderType_t.Norm,
                                                       source=str(train), check_type=hugectr.Check_t.Sum),
                              str(train), "source", 1, 2, 3, False, eval_=False)
    assert (src.layout.label_dim, src.layout.dense_dim, src.layout.num_slots, src.layout.num_rows) == (1, 2, 3, 300)
    data = _chunks(src)
    ref = synthetic_ctr(300, 2, SLOTS, dist="power_law", alpha=1.3, seed=2, sample_index=0)
    offsets = np.concatenate([[0], np.cumsum(SLOTS)[:-1]])
    np.testing.assert_array_equal(data["sparse"][:, :, 0], ref["sparse"] + offsets)  # Norm keys are global
    assert (data["sparse"][:, 1, :3] >= offsets[1]).all() and (data["sparse"][:, 2, 2] == -1).all()
    np.testing.assert_allclose(data["dense"], np.log1p(ref["dense"]), rtol=1e-6)
    np.testing.assert_array_equal(data["label"][:, 0], ref["label"])
    # a flipped byte fails the checksum, naming the sample
    path = hugectr.read_file_list(train)[0]
    raw = bytearray(path.read_bytes())
    raw[readers.NORM_HEADER_BYTES + 4 + 4 + 1] ^= 0xFF  # inside sample 0's dense values
    path.write_bytes(bytes(raw))
    with pytest.raises(hugectr.CTRError, match="sample 0 fails its checksum"):
        _chunks(src)


def test_raw_round_trip_takes_log_of_integer_dense(tmp_path):
    params = DataGeneratorParams(format=hugectr.DataReaderType_t.Raw, label_dim=1, dense_dim=2, num_slot=3,
                                 source=str(tmp_path / "train.bin"), eval_source=str(tmp_path / "test.bin"),
                                 slot_size_array=SLOTS, num_samples=700, eval_num_samples=100,
                                 num_samples_per_file=512, seed=4)
    DataGenerator(params).generate()
    reader = hugectr.DataReaderParams(data_reader_type=hugectr.DataReaderType_t.Raw, source=str(tmp_path / "train.bin"),
                                      num_samples=700)
    data = _chunks(readers.open_source(reader, reader.source[0], "source", 1, 2, 3, False, eval_=False))
    first = synthetic_ctr(512, 2, SLOTS, dist="power_law", alpha=1.2, seed=4, sample_index=0)
    np.testing.assert_array_equal(data["sparse"][:512, :, 0], first["sparse"])
    np.testing.assert_allclose(data["dense"][:512], np.log1p(first["dense"]), rtol=1e-6)
    assert len(data["label"]) == 700
    with pytest.raises(hugectr.CTRError, match="not a multiple"):
        readers.open_source(reader, reader.source[0], "source", 1, 5, 3, False, eval_=False)


def test_norm_data_train_through_the_hash_table(tmp_path):
    """Norm keys are global and no slot_size_array is given: rows come from the hash index."""
    slots = [30, 60, 90, 120]
    train, test = generate(tmp_path, fmt=hugectr.DataReaderType_t.Norm, slots=slots, dense=3, files=1, eval_files=1,
                           per_file=4096, seed=1)
    solver = hugectr.CreateSolver(batchsize=256, batchsize_eval=1024, max_eval_batches=4, lr=0.01)
    reader = hugectr.DataReaderParams(data_reader_type=hugectr.DataReaderType_t.Norm, source=[str(train)],
                                      eval_source=str(test), check_type=hugectr.Check_t.Sum)
    model = hugectr.Model(solver, reader, hugectr.CreateOptimizer(update_type=hugectr.Update_t.Local))
    model.add(hugectr.Input(label_dim=1, label_name="label", dense_dim=3, dense_name="dense",
                            data_reader_sparse_param_array=[hugectr.DataReaderSparseParam("wide", 1, True, 4)]))
    model.add(hugectr.SparseEmbedding(embedding_type=hugectr.Embedding_t.DistributedSlotSparseEmbeddingHash,
                                      max_vocabulary_size_per_gpu=1000, embedding_vec_size=1, combiner="sum",
                                      sparse_embedding_name="w", bottom_name="wide"))
    model.add(hugectr.DenseLayer(layer_type=hugectr.Layer_t.ReduceSum, bottom_names=["w"], top_names=["ws"], axis=1))
    model.add(hugectr.DenseLayer(layer_type=hugectr.Layer_t.Reshape, bottom_names=["ws"], top_names=["wf"]))
    model.add(hugectr.DenseLayer(layer_type=hugectr.Layer_t.InnerProduct, bottom_names=["dense"], top_names=["d"]))
    model.add(hugectr.DenseLayer(layer_type=hugectr.Layer_t.Add, bottom_names=["wf", "d"], top_names=["logit"]))
    model.add(hugectr.DenseLayer(layer_type=hugectr.Layer_t.BinaryCrossEntropyLoss, bottom_names=["logit", "label"],
                                 top_names=["loss"]))
    model.compile()
    model.fit(max_iter=80, display=0, eval_interval=0, snapshot=0, metrics_file=tmp_path / "m.csv", progress=False)
    keys = model.tables[0].key.numpy()
    used = keys[keys >= 0]
    assert len(np.unique(used)) == len(used) <= sum(slots)  # one row per distinct global key
    assert model.evaluate()["AUC"] > 0.65
