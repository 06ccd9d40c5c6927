"""Node-classification jobs (what `luoshu train --model graphsage --dataset sbm` runs)."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest

from luoshu.gnn.job import NodeJobError, train_node_job


def _config(tmp_path, **kw):
    values = {
        "model": "graphsage",
        "model_args": {},
        "dataset": "sbm",
        "data_path": None,
        "data_args": {"num_nodes": 2000},
        "optimizer": "adam",
        "optimizer_args": {},
        "lr": 0.02,
        "weight_decay": 0.0,
        "epochs": 3,
        "batch_size": 256,
        "seed": 0,
        "num_workers": 1,
        "job_dir": tmp_path / "job",
    }
    values.update(kw)
    return SimpleNamespace(**values)


def test_full_graph_and_sampled_jobs_report_mask_accuracies(tmp_path):
    full = train_node_job(_config(tmp_path, epochs=10))
    assert set(full) == {"loss", "train_accuracy", "val_accuracy", "test_accuracy"}
    assert full["test_accuracy"] >= 0.75
    with open(tmp_path / "job" / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 10
    assert list((tmp_path / "job").glob("events.out.tfevents.*"))
    assert (tmp_path / "job" / "checkpoints" / "epoch-10" / "manifest.json").is_file()
    sampled = train_node_job(_config(tmp_path, epochs=3, data_args={"num_nodes": 2000, "fanouts": [10, 5]}))
    assert sampled["test_accuracy"] >= 0.7


def test_bad_jobs_are_refused(tmp_path):
    with pytest.raises(NodeJobError, match="dataset must be one of"):
        train_node_job(_config(tmp_path, dataset="criteo"))
    with pytest.raises(NodeJobError, match="has no option 'nodes_count'"):
        train_node_job(_config(tmp_path, data_args={"nodes_count": 5}))
    with pytest.raises(NodeJobError, match="gcn trains on the full graph"):
        train_node_job(_config(tmp_path, model="gcn", data_args={"fanouts": [5, 5]}))
    with pytest.raises(NodeJobError, match="needs --data-path"):
        train_node_job(_config(tmp_path, dataset="ogb", data_args={}))
    with pytest.raises(NodeJobError, match="no config field 'width'"):
        train_node_job(_config(tmp_path, model_args={"width": 3}))


def test_luoshu_train_runs_graphsage_on_sbm(tmp_path):
    from luoshu.train import TrainConfig, TrainConfigError, train

    config = TrainConfig(
        model="graphsage",
        dataset="sbm",
        lr=0.02,
        epochs=2,
        batch_size=256,
        progress=False,
        data_args={"num_nodes": 1500, "fanouts": [5, 5]},
        out=str(tmp_path / "cli"),
    )
    metrics = train(config)
    assert metrics["test_accuracy"] > 0.5
    with pytest.raises(TrainConfigError, match="does not fit dataset 'sbm'"):
        TrainConfig.from_dict({"model": "dcn", "dataset": "sbm"})
    with pytest.raises(TrainConfigError, match="pass --data-path"):
        TrainConfig.from_dict({"model": "gcn", "dataset": "ogb"})
