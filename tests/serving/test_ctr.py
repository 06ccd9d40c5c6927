"""luoshu.serving.ctr: luoshu.ctr models (compiled, or saved as graph JSON + parameter files) become
inference packages that predict what the training job predicts."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

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
    assert [(s.name, s.dtype, s.shape) for s in loaded.inputs] == [
        ("dense", "float32", (-1, 4)),
        ("data1", "int64", (-1, 8, 1)),
    ]
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
    np.testing.assert_allclose(
        loaded(feeds)["prediction"], model.predict_batch(feeds["dense"], feeds["keys"]), rtol=1e-6, atol=1e-6
    )


def test_hash_indexed_tables_carry_their_key_index(tmp_path):
    model, graph_json, dense, sparse = zoo.hugectr_dcn_files(tmp_path, hashed=True)
    table = model.tables[0]
    assert table.slot_sizes is None and 0 < int((table.key.value.numpy() >= 0).sum()) < table.rows
    path = serving.export_ctr_files(tmp_path / "hashed", graph_json, dense, sparse)
    loaded = serving.load(path)
    assert loaded.metadata["tables"]["sparse_embedding1"]["index"] == "hash"
    assert {"const.sparse_embedding1.sorted_keys", "const.sparse_embedding1.sorted_rows"} <= set(loaded.weights)
    rng = np.random.default_rng(2)
    feeds = zoo.hugectr_inputs(rng, 64)
    feeds["data1"][:3] = rng.integers(10**9, 2 * 10**9, feeds["data1"][:3].shape)  # keys the table never saw
    keys = feeds["data1"][:, :, 0]
    assert np.isin(keys, table.key.value.numpy()[table.key.value.numpy() >= 0]).mean() > 0.5  # mostly known keys
    want = model.predict_batch(feeds["dense"], keys)  # the training job's own index (no insert at predict)
    np.testing.assert_allclose(loaded(feeds)["prediction"], want, rtol=1e-6, atol=1e-6)


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
