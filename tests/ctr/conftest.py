"""Shared small data sets and a HugeCTR DCN quick-start model builder for the luoshu.ctr tests."""

from __future__ import annotations

import pytest

from luoshu import ctr as hugectr
from luoshu.ctr.tools import DataGenerator, DataGeneratorParams

SLOTS = [20, 50, 100, 200, 500, 30, 10, 80]
DENSE = 4


def generate(folder, fmt=hugectr.DataReaderType_t.Parquet, slots=SLOTS, dense=DENSE, files=2, eval_files=1,
             per_file=2048, nnz=(), seed=0, **kw):
    params = DataGeneratorParams(format=fmt, label_dim=1, dense_dim=dense, num_slot=len(slots), i64_input_key=False,
                                 source=str(folder / "file_list.txt"), eval_source=str(folder / "file_list_test.txt"),
                                 slot_size_array=slots, nnz_array=list(nnz), dist_type=hugectr.Distribution_t.PowerLaw,
                                 power_law_type=hugectr.PowerLaw_t.Short, num_files=files, eval_num_files=eval_files,
                                 num_samples_per_file=per_file, seed=seed, **kw)
    DataGenerator(params).generate()
    return folder / "file_list.txt", folder / "file_list_test.txt"


@pytest.fixture(scope="session")
def parquet_data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("dcn_parquet"))


def dcn_model(source, eval_source, slots=SLOTS, dense=DENSE, batch=256, update=hugectr.Update_t.Local,
              mixed=False, dropout=0.0, seed=0, **solver_kw):
    """The HugeCTR DCN quick start, shrunk: 8 slots, vec 8, 2 cross layers, MLP 64."""
    solver = hugectr.CreateSolver(max_eval_batches=8, batchsize_eval=1024, batchsize=batch, lr=0.001, vvgpu=[[0]],
                                  repeat_dataset=True, use_mixed_precision=mixed, scaler=1024 if mixed else 1.0,
                                  seed=seed, **solver_kw)
    reader = hugectr.DataReaderParams(data_reader_type=hugectr.DataReaderType_t.Parquet, source=[str(source)],
                                      eval_source=str(eval_source), slot_size_array=slots)
    optimizer = hugectr.CreateOptimizer(optimizer_type=hugectr.Optimizer_t.Adam, update_type=update)
    model = hugectr.Model(solver, reader, optimizer)
    sparse = [hugectr.DataReaderSparseParam("data1", 1, True, len(slots))]
    model.add(hugectr.Input(label_dim=1, label_name="label", dense_dim=dense, dense_name="dense",
                            data_reader_sparse_param_array=sparse))
    model.add(hugectr.SparseEmbedding(embedding_type=hugectr.Embedding_t.DistributedSlotSparseEmbeddingHash,
                                      workspace_size_per_gpu_in_mb=1, embedding_vec_size=8, combiner="sum",
                                      sparse_embedding_name="sparse_embedding1", bottom_name="data1",
                                      optimizer=optimizer))
    L = hugectr.Layer_t
    model.add(hugectr.DenseLayer(layer_type=L.Reshape, bottom_names=["sparse_embedding1"], top_names=["reshape1"],
                                 leading_dim=8 * len(slots)))
    model.add(hugectr.DenseLayer(layer_type=L.Concat, bottom_names=["reshape1", "dense"], top_names=["concat1"]))
    model.add(hugectr.DenseLayer(layer_type=L.MultiCross, bottom_names=["concat1"], top_names=["multicross1"],
                                 num_layers=2))
    model.add(hugectr.DenseLayer(layer_type=L.InnerProduct, bottom_names=["concat1"], top_names=["fc1"],
                                 num_output=64))
    model.add(hugectr.DenseLayer(layer_type=L.ReLU, bottom_names=["fc1"], top_names=["relu1"]))
    model.add(hugectr.DenseLayer(layer_type=L.Dropout, bottom_names=["relu1"], top_names=["dropout1"],
                                 dropout_rate=dropout))
    model.add(hugectr.DenseLayer(layer_type=L.Concat, bottom_names=["dropout1", "multicross1"], top_names=["concat2"]))
    model.add(hugectr.DenseLayer(layer_type=L.InnerProduct, bottom_names=["concat2"], top_names=["fc2"], num_output=1))
    model.add(hugectr.DenseLayer(layer_type=L.BinaryCrossEntropyLoss, bottom_names=["fc2", "label"],
                                 top_names=["loss"]))
    return model
