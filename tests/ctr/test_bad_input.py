"""Bad models and data are refused by compile(), before training, naming the layer and the field."""

from __future__ import annotations

import pytest

from luoshu import ctr as hugectr
from tests.ctr.conftest import SLOTS, dcn_model

L = hugectr.Layer_t


def _refused(model, *fragments):
    with pytest.raises(hugectr.CTRError) as info:
        model.compile()
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    with pytest.raises(hugectr.CTRError, match="compile"):  # nothing half-built is left to train
        model.fit(max_iter=1, progress=False)
    return str(info.value)


def test_slot_size_array_length_must_match_the_slots(parquet_data):
    model = dcn_model(*parquet_data)
    model.reader_params.slot_size_array = SLOTS + [5]
    _refused(model, "DataReaderParams slot_size_array", "9 entries", "8 slots")


def test_unknown_layer_type(parquet_data):
    model = dcn_model(*parquet_data)
    model.layers.insert(4, hugectr.DenseLayer(layer_type="Conv3D", bottom_names=["concat1"], top_names=["x"]))
    _refused(model, "layer 4", "unknown layer type 'Conv3D'")


def test_unknown_parameter(parquet_data):
    model = dcn_model(*parquet_data)
    model.layers[4] = hugectr.DenseLayer(layer_type=L.MultiCross, bottom_names=["concat1"], top_names=["multicross1"],
                                         num_layer=2)
    _refused(model, "MultiCross", "unknown parameter(s) ['num_layer']")


def test_bottom_name_no_layer_produces(parquet_data):
    model = dcn_model(*parquet_data)
    model.layers[5] = hugectr.DenseLayer(layer_type=L.InnerProduct, bottom_names=["concat_1"], top_names=["fc1"],
                                         num_output=64)
    _refused(model, "layer 5 (InnerProduct -> fc1)", "bottom_names entry 'concat_1'", "no earlier layer")


def test_embedding_bottom_name_must_be_a_sparse_input(parquet_data):
    model = dcn_model(*parquet_data)
    model.layers[1].bottom_name = "data2"
    _refused(model, "SparseEmbedding 'sparse_embedding1' bottom_name", "'data2'")


@pytest.mark.parametrize("case", ["elementwise", "loss", "reshape"])
def test_shape_mismatch_between_layers(parquet_data, case):
    model = dcn_model(*parquet_data)
    if case == "elementwise":
        model.layers.insert(-1, hugectr.DenseLayer(layer_type=L.ElementwiseMultiply, bottom_names=["relu1", "dense"],
                                                   top_names=["bad"]))
        _refused(model, "ElementwiseMultiply -> bad", "shape mismatch", "relu1 ('batch', 64)", "dense ('batch', 4)")
    elif case == "loss":
        model.layers[-2] = hugectr.DenseLayer(layer_type=L.InnerProduct, bottom_names=["concat2"], top_names=["fc2"],
                                              num_output=2)
        _refused(model, "BinaryCrossEntropyLoss -> loss", "shape mismatch", "fc2 ('batch', 2)")
    else:
        model.layers[2] = hugectr.DenseLayer(layer_type=L.Reshape, bottom_names=["sparse_embedding1"],
                                             top_names=["reshape1"], leading_dim=7)
        _refused(model, "Reshape -> reshape1", "leading_dim: 7")


def test_dense_dim_must_match_the_data(parquet_data):
    model = dcn_model(*parquet_data, dense=5)
    _refused(model, "Input dense_dim: 5", "4 dense features")


def test_missing_or_unreadable_file_list(parquet_data, tmp_path):
    model = dcn_model(tmp_path / "nope.txt", parquet_data[1])
    _refused(model, "source", "nope.txt does not exist")
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("files:\na.parquet\n")
    _refused(dcn_model(garbage, parquet_data[1]), "garbage.txt must start with the number of files")
    short = tmp_path / "short.txt"
    short.write_text("3\n" + parquet_data[0].read_text().splitlines()[1] + "\n")
    _refused(dcn_model(short, parquet_data[1]), "announces 3 file(s) and lists 1")
    dangling = tmp_path / "dangling.txt"
    dangling.write_text("1\n/no/such/file.parquet\n")
    _refused(dcn_model(parquet_data[0], dangling), "eval_source", "/no/such/file.parquet, which does not exist")
    unreadable = tmp_path / "binary.txt"
    unreadable.write_bytes(b"\xff\xfe\x00garbage")
    _refused(dcn_model(unreadable, parquet_data[1]), "binary.txt cannot be read")


def test_last_layer_must_be_a_loss(parquet_data):
    model = dcn_model(*parquet_data)
    model.layers.pop()
    _refused(model, "last layer must be a loss")


def test_bad_api_arguments_fail_at_once():
    with pytest.raises(hugectr.CTRError, match="unknown argument"):
        hugectr.CreateSolver(batch_size=10)
    with pytest.raises(hugectr.CTRError, match="batchsize"):
        hugectr.CreateSolver(batchsize=0)
    with pytest.raises(hugectr.CTRError, match="LazyGlobal needs optimizer_type Adam"):
        hugectr.CreateOptimizer(optimizer_type=hugectr.Optimizer_t.SGD, update_type=hugectr.Update_t.LazyGlobal)
    with pytest.raises(hugectr.CTRError, match="nnz_per_slot"):
        hugectr.DataReaderSparseParam("d", [1, 2], True, 3)
