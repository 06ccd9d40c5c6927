"""luoshu.serving.ctr: luoshu.ctr models (compiled, or saved as graph JSON + parameter files) become
inference packages that predict what the training job predicts."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import luoshu as ls
from luoshu import ctr as hugectr
from luoshu import serving
from luoshu.core.errors import CheckpointError
from tests.ctr.conftest import SLOTS
from tests.serving import zoo


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return zoo.hugectr_dcn_files(tmp_path_factory.mktemp("hugectr_dcn"))


def _reference(model, feeds):
    """The training job's own prediction (its host-side key -> row index); keys it would refuse as out
    of range are given as empty, which is what inference does with them."""
    keys = feeds["data1"][:, :, 0]
    return model.predict_batch(feeds["dense"], np.where(keys >= np.asarray(SLOTS), -1, keys))


def test_saved_files_load_as_a_package_that_predicts_as_training(trained, tmp_path):
    model, graph_json, dense, sparse = trained
    path = serving.export_ctr_files(tmp_path / "dcn", graph_json, dense, sparse, name="dcn", version=6)
    loaded = serving.load(path)
    assert [(s.name, s.dtype, s.shape) for s in loaded.inputs] == [("dense", "float32", (-1, 4)),
                                                                   ("data1", "int64", (-1, 8, 1))]
    assert [(s.name, s.shape) for s in loaded.outputs] == [("prediction", (-1, 1))]
    assert loaded.metadata["tables"]["sparse_embedding1"]["slot_sizes"] == SLOTS
    rng = np.random.default_rng(0)
    for batch in (1, 33):
        feeds = zoo.hugectr_inputs(rng, batch)
        np.testing.assert_allclose(loaded(feeds)["prediction"], _reference(model, feeds), rtol=1e-6, atol=1e-6)


def test_a_compiled_model_exports_directly_with_multi_hot_bags(tmp_path):
    model = zoo.hugectr_bag_model()
    path = serving.export_ctr(tmp_path / "bags", model, name="bags")
    loaded = serving.load(path)
    assert loaded.inputs[1].shape == (-1, 3, 3)
    feeds = zoo.hugectr_bag_inputs(np.random.default_rng(1), 5)
    np.testing.assert_allclose(loaded(feeds)["prediction"], model.predict_batch(feeds["dense"], feeds["keys"]),
                               rtol=1e-6, atol=1e-6)


def test_hash_keyed_tables_are_refused_naming_the_table(tmp_path):
    solver = hugectr.CreateSolver(batchsize=16, batchsize_eval=16, lr=0.01)
    model = hugectr.Model(solver, hugectr.DataReaderParams(source=[""]),
                          hugectr.CreateOptimizer(optimizer_type=hugectr.Optimizer_t.SGD))
    model.add(hugectr.Input(label_dim=1, label_name="label", dense_dim=2, dense_name="dense",
                            data_reader_sparse_param_array=[hugectr.DataReaderSparseParam("keys", 1, True, 2)]))
    model.add(hugectr.SparseEmbedding(embedding_type=hugectr.Embedding_t.DistributedSlotSparseEmbeddingHash,
                                      workspace_size_per_gpu_in_mb=1, embedding_vec_size=4, combiner="sum",
                                      sparse_embedding_name="hashed", bottom_name="keys"))
    L = hugectr.Layer_t
    model.add(hugectr.DenseLayer(layer_type=L.Reshape, bottom_names=["hashed"], top_names=["flat"], leading_dim=8))
    model.add(hugectr.DenseLayer(layer_type=L.InnerProduct, bottom_names=["flat"], top_names=["fc"], num_output=1))
    model.add(hugectr.DenseLayer(layer_type=L.BinaryCrossEntropyLoss, bottom_names=["fc", "label"],
                                 top_names=["loss"]))
    model.compile()
    with pytest.raises(ls.Error, match="embedding 'hashed' hands rows to keys through a hash"):
        serving.export_ctr(tmp_path / "x", model)
    assert not (tmp_path / "x").exists()


def test_corrupt_parameter_files_are_refused(trained, tmp_path):
    _, graph_json, dense, sparse = trained

    copy = tmp_path / "sparse.model"
    shutil.copytree(sparse[0], copy)
    f = copy / "weights.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        serving.export_ctr_files(tmp_path / "dcn", graph_json, dense, [copy])
    assert not (tmp_path / "dcn").exists()
