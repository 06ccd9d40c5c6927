"""luoshu.ctr end to end: the DCN quick start learns, JSON round trip, snapshots, files, mixed precision."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from luoshu import ctr as hugectr
from tests.ctr.conftest import DENSE, SLOTS, dcn_model


def _eval_arrays(model):
    """The evaluation data itself, read independently of the model (pyarrow)."""
    import pyarrow.parquet as pq

    files = hugectr.read_file_list(model.reader_params.eval_source)
    tables = [pq.read_table(f) for f in files]
    label = np.concatenate([t.column("label").to_numpy() for t in tables])
    dense = np.stack([np.concatenate([t.column(f"I{j + 1}").to_numpy() for t in tables]) for j in range(DENSE)], 1)
    sparse = np.stack([np.concatenate([t.column(f"C{j + 1}").to_numpy() for t in tables])
                       for j in range(len(SLOTS))], 1)
    return label, dense, sparse


def test_dcn_quick_start_learns_and_logs(parquet_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = dcn_model(*parquet_data)
    model.compile()
    text = model.summary()
    assert "MultiCross" in text and "(None, 68)" in text  # 8 slots x 8 + 4 dense
    history = model.fit(max_iter=120, display=40, eval_interval=60, snapshot=0, snapshot_prefix="dcn",
                        progress=False)
    evals = [h for h in history if h["phase"] == "eval"]
    assert [h["iteration"] for h in evals] == [60, 120]
    # the model's AUC agrees with scikit-learn's on the same predictions, and is clearly above chance
    label, dense, sparse = _eval_arrays(model)
    pred = model.predict()[:, 0]
    assert pred.shape == label.shape
    auc = roc_auc_score(label, pred)
    assert auc > 0.7
    assert evals[-1]["auc"] == pytest.approx(auc, abs=1e-6)
    np.testing.assert_allclose(model.predict_batch(dense, sparse)[:, 0], pred, rtol=1e-5, atol=1e-6)
    with open(tmp_path / "dcn_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["phase"] for r in rows] == ["train", "eval", "train", "train", "eval"]


def test_json_round_trip_gives_identical_model(parquet_data, tmp_path):
    model = dcn_model(*parquet_data, seed=7)
    model.compile()
    for _ in range(5):
        model.train()
    model.graph_to_json(tmp_path / "dcn.json")
    model.save_params_to_files(str(tmp_path / "dcn"), 5)
    again = hugectr.Model.from_json(tmp_path / "dcn.json")
    again.compile()
    # same seed: the same initial parameters before any training
    fresh = dcn_model(*parquet_data, seed=7)
    fresh.compile()
    _, dense, sparse = _eval_arrays(model)
    np.testing.assert_array_equal(again.predict_batch(dense[:64], sparse[:64]),
                                  fresh.predict_batch(dense[:64], sparse[:64]))
    again.load_dense_weights(tmp_path / "dcn_dense_5.model")
    again.load_sparse_weights([tmp_path / "dcn0_sparse_5.model"])
    np.testing.assert_array_equal(again.predict_batch(dense, sparse), model.predict_batch(dense, sparse))
    assert [type(a).__name__ for a in again.layers] == [type(a).__name__ for a in model.layers]


def test_snapshot_then_reload_gives_identical_auc(parquet_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = dcn_model(*parquet_data)
    model.compile()
    model.fit(max_iter=20, display=0, eval_interval=0, snapshot=20, snapshot_prefix="snap", progress=False)
    before = model.evaluate()
    reloaded = dcn_model(*parquet_data, seed=3)
    reloaded.compile()
    assert reloaded.evaluate()["AUC"] != before["AUC"]
    reloaded.load_dense_weights("snap_dense_20.model")
    reloaded.load_sparse_weights({"sparse_embedding1": "snap0_sparse_20.model"})
    reloaded.load_dense_optimizer_states("snap_dense_20.model")
    reloaded.load_sparse_optimizer_states(["snap0_sparse_20.model"])
    assert reloaded.evaluate() == before
    # and training on continues identically from the restored optimizer state
    for m in (model, reloaded):
        m.start_data_reading()
        m.train()
    assert reloaded.evaluate() == model.evaluate()


def test_corrupt_snapshot_is_refused_and_changes_nothing(parquet_data, tmp_path):
    model = dcn_model(*parquet_data)
    model.compile()
    model.save_params_to_files(str(tmp_path / "m"))
    weights = tmp_path / "m0_sparse_0.model" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"xxxxxxxx")
    before = model.evaluate()
    with pytest.raises(hugectr.CTRError.__mro__[1]):  # luoshu.Error
        model.load_sparse_weights([tmp_path / "m0_sparse_0.model"])
    assert model.evaluate() == before


def _rows_fed(model):
    return np.unique(next(v for k, v in model._last_feeds.items() if k.name.startswith("rows_")))


def test_global_update_moves_untouched_rows_and_local_does_not(parquet_data):
    for update in (hugectr.Update_t.Local, hugectr.Update_t.Global):
        model = dcn_model(*parquet_data, update=update)
        model.compile()
        model.train()
        start = model.tables[0].emb_vector.numpy().copy()
        seen = []
        for _ in range(2):
            model.train()
            seen.append(_rows_fed(model))
        end = model.tables[0].emb_vector.numpy()
        untouched = np.setdiff1d(np.arange(start.shape[0] - 1), np.concatenate(seen))
        moved = (start[untouched] != end[untouched]).any(axis=1).mean()
        # Adam's momentum moves rows seen only in the first step under the global update alone
        assert (moved > 0) == (update is hugectr.Update_t.Global), (update, moved)
        assert not end[-1].any()  # the padding row stays zero


def test_mixed_precision_follows_fp32(parquet_data):
    losses = {}
    for mixed in (False, True):
        model = dcn_model(*parquet_data, mixed=mixed)
        model.compile()
        losses[mixed] = []
        for _ in range(30):
            model.train()
            losses[mixed].append(model.get_current_loss())
        if mixed:
            assert "cast" in {op.opdef.name for op in model.graph.ops}  # bf16 matmuls under autocast
            assert model.scaler.get_scale() == 1024
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-2)
    assert np.mean(losses[True][-5:]) < losses[True][0] - 0.05
