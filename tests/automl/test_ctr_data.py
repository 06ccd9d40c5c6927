"""AutoFeatures in luoshu.ctr data preparation: a generated CTR table -> engineered features and crossed slots in
luoshu.ctr's Parquet format -> read back by pyarrow, and a luoshu.ctr model trained on it."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from luoshu import ctr
from luoshu.automl import AutoFeatures, write_ctr_data
from luoshu.ml.base import DataError, NotFittedError


def ctr_table(n: int, seed: int = 0):
    """2 count columns, 4 categorical fields (strings); the click depends on the cross of columns 2 and 3."""
    rng = np.random.default_rng(seed)
    counts = np.floor(rng.lognormal(1.0, 1.0, size=(n, 2)))
    cats = rng.integers(0, 8, size=(n, 4))
    logit = 2.0 * ((cats[:, 0] + cats[:, 1]) % 2 == 0) - 1.0 + 0.3 * np.log1p(counts[:, 0]) - 0.3
    p = 1 / (1 + np.exp(-logit))
    y = (rng.random(n) < p).astype(int)
    X = np.column_stack([counts, np.char.add("c", cats.astype(str))]).astype(object)
    X[:, :2] = counts
    return X, y, p


def _read(source: str):
    files = ctr.read_file_list(source)
    tables = [pq.read_table(f) for f in files]

    def col(name):
        return np.concatenate([t.column(name).to_numpy() for t in tables])

    names = tables[0].column_names
    dense = np.stack([col(c) for c in names if c.startswith("I")], 1)
    sparse = np.stack([col(c) for c in names if c.startswith("C")], 1)
    return col("label"), dense, sparse


def _dnn(info, eval_info):
    solver = ctr.CreateSolver(
        max_eval_batches=4, batchsize_eval=1000, batchsize=256, lr=0.01, vvgpu=[[0]], repeat_dataset=True, seed=0
    )
    reader = ctr.DataReaderParams(
        data_reader_type=ctr.DataReaderType_t.Parquet,
        source=[info.source],
        eval_source=eval_info.source,
        slot_size_array=info.slot_size_array,
    )
    optimizer = ctr.CreateOptimizer(optimizer_type=ctr.Optimizer_t.Adam)
    model = ctr.Model(solver, reader, optimizer)
    sparse = [ctr.DataReaderSparseParam("data1", 1, True, info.num_slots)]
    model.add(
        ctr.Input(
            label_dim=1,
            label_name="label",
            dense_dim=info.dense_dim,
            dense_name="dense",
            data_reader_sparse_param_array=sparse,
        )
    )
    model.add(
        ctr.SparseEmbedding(
            embedding_type=ctr.Embedding_t.DistributedSlotSparseEmbeddingHash,
            workspace_size_per_gpu_in_mb=1,
            embedding_vec_size=4,
            combiner="sum",
            sparse_embedding_name="emb",
            bottom_name="data1",
            optimizer=optimizer,
        )
    )
    L = ctr.Layer_t
    model.add(
        ctr.DenseLayer(layer_type=L.Reshape, bottom_names=["emb"], top_names=["flat"], leading_dim=4 * info.num_slots)
    )
    model.add(ctr.DenseLayer(layer_type=L.Concat, bottom_names=["flat", "dense"], top_names=["x"]))
    model.add(ctr.DenseLayer(layer_type=L.InnerProduct, bottom_names=["x"], top_names=["fc1"], num_output=16))
    model.add(ctr.DenseLayer(layer_type=L.ReLU, bottom_names=["fc1"], top_names=["h"]))
    model.add(ctr.DenseLayer(layer_type=L.InnerProduct, bottom_names=["h"], top_names=["fc2"], num_output=1))
    model.add(ctr.DenseLayer(layer_type=L.BinaryCrossEntropyLoss, bottom_names=["fc2", "label"], top_names=["loss"]))
    return model


def test_auto_features_prepare_a_ctr_data_set_a_ctr_model_learns_from(tmp_path, monkeypatch):
    X, y, _ = ctr_table(5000)
    Xe, ye, pe = ctr_table(2000, seed=1)
    features = AutoFeatures(max_crosses=2, random_state=0)
    train = write_ctr_data(features, X, y, tmp_path / "train", fit=True, num_files=2)
    ev = write_ctr_data(features, Xe, ye, tmp_path / "eval")
    # the greedy search found the cross the clicks depend on; it is a slot of its own
    assert "x2*x3" in features.slot_names_
    assert train.num_slots == len(features.slot_names_) == 4 + len(features.crosses_)
    assert train.slot_size_array == [len(features.categories_[s]) + 1 for s in features.slot_names_]
    assert train.slot_size_array[:4] == [9, 9, 9, 9]  # 8 categories + the unseen key 0
    # what the files hold, read by pyarrow: the transformer's own outputs, as float32 / int64
    label, dense, sparse = _read(ev.source)
    np.testing.assert_array_equal(label, ye.astype(np.float32))
    np.testing.assert_array_equal(dense, features.transform(Xe).astype(np.float32))
    np.testing.assert_array_equal(sparse, features.slot_keys(Xe))
    cross = features.slot_names_.index("x2*x3")
    a, b = Xe[:, 2].astype(str), Xe[:, 3].astype(str)
    same = (a[:, None] == a[None, :200]) & (b[:, None] == b[None, :200])  # equal keys <=> equal pairs
    np.testing.assert_array_equal(sparse[:, cross, None] == sparse[None, :200, cross], same)
    # training rows carry out-of-fold target encodings (fit_transform), not the full-data ones
    _, dense_train, _ = _read(train.source)
    assert not np.allclose(dense_train, features.transform(X).astype(np.float32))
    # a luoshu.ctr model reads the data set and learns the crossed clicks
    monkeypatch.chdir(tmp_path)
    model = _dnn(train, ev)
    model.compile()
    model.fit(max_iter=150, display=0, eval_interval=150, snapshot=0, progress=False)
    pred = model.predict()[:, 0]
    assert roc_auc_score(ye, pred) > roc_auc_score(ye, pe) - 0.03  # near the generating model's AUC


def test_write_ctr_data_refuses_bad_input(tmp_path):
    X, y, _ = ctr_table(300)
    with pytest.raises(NotFittedError):
        write_ctr_data(AutoFeatures(), X, y, tmp_path / "a")
    with pytest.raises(DataError, match="binary"):
        write_ctr_data(AutoFeatures(max_crosses=0), X, np.arange(300) % 3, tmp_path / "b", fit=True)
    features = AutoFeatures(max_crosses=0).fit(X, y)
    with pytest.raises(DataError, match="expecting 6 features"):
        write_ctr_data(features, X[:, :5], y, tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing written
