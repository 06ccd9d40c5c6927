"""`luoshu train` with a `hot_switch` setting: the job trains through HotSPa and logs per step the
tokens of each bucket's group, the switch bytes and the switch time; bad settings are refused."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import luoshu as ls
from luoshu.train import TrainConfig, TrainConfigError
from tests.distributed.launcher import launch

BUCKETS = [64, 24, 8, 0]
DATA = {"num_docs": 48, "vocab": 64, "min_len": 2, "max_len": 64}


def _values(tmp_path, strategies, **extra):
    return {
        "model": "gpt2",
        "dataset": "synthetic-lm",
        "model_args": {"n_layer": 1, "n_head": 4, "n_embd": 32},
        "data_args": DATA,
        "optimizer": "adamw",
        "lr": 1e-3,
        "batch_size": 16,
        "max_steps": 3,
        "out": str(tmp_path / "run"),
        "progress": False,
        "hot_switch": {"buckets": BUCKETS, "strategies": strategies},
        **extra,
    }


def _expected_tokens(steps: int) -> list[list[int]]:
    """Tokens per bucket of each step's 16 documents, counted here from the corpus itself."""
    docs = ls.data.synthetic_sequences(
        DATA["num_docs"], DATA["vocab"], DATA["min_len"], DATA["max_len"], num_special=1, seed=0
    )
    out = []
    for step in range(steps):
        lengths = np.array([len(d) for d in docs[step * 16 : (step + 1) * 16]])
        out.append([int(lengths[(lengths <= hi) & (lengths > lo)].sum()) for hi, lo in zip(BUCKETS, BUCKETS[1:])])
    return out


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_hot_switch_job_logs_tokens_per_group_and_switches(tmp_path):
    strategies = ["dp1,tp1,pp1"] * 3
    config = TrainConfig.from_dict(_values(tmp_path, strategies))
    metrics = ls.train.train(config)
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [[int(r[f"tokens_bucket{i}"]) for i in range(3)] for r in rows] == _expected_tokens(3)
    assert all(int(r["switch_bytes"]) == 0 for r in rows)  # one process: every layout is the whole tensor
    assert metrics["train_loss"] == pytest.approx(float(rows[-1]["train_loss"]), rel=1e-5)


@pytest.mark.dist
@pytest.mark.slow
def test_luoshu_train_hot_switch_under_launch_on_4_processes(tmp_path):
    import yaml

    strategies = ["dp1,tp4,pp1", "dp2,tp2,pp1", "dp4,tp1,pp1"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_values(tmp_path, strategies)))
    proc = launch(4, "luoshu/cli.py", "train", "--config", str(path), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 3
    got = [[int(r[f"tokens_bucket{i}"]) for i in range(3)] for r in rows]
    assert got == _expected_tokens(3)
    assert all(int(r["switch_bytes"]) > 0 and float(r["switch_s"]) > 0 for r in rows)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


@pytest.mark.parametrize(
    "hot_switch,match",
    [
        ({"buckets": [8, 24, 0], "strategies": ["dp1,tp1,pp1"] * 2}, "strictly descending"),
        ({"buckets": [64, 8, 0], "strategies": ["dp1,tp1,pp1", "dq1"]}, "unknown strategy 'dq1'"),
        ({"buckets": [64, 8, 0], "strategies": ["dp1,tp1,pp1"]}, "2 buckets, which need as many strategies; found 1"),
        ({"buckets": [64, 0]}, "exactly 'buckets' and 'strategies'"),
    ],
)
def test_bad_hot_switch_settings_are_refused(tmp_path, hot_switch, match):
    values = _values(tmp_path, [])
    values["hot_switch"] = hot_switch
    with pytest.raises(TrainConfigError, match=match):
        TrainConfig.from_dict(values)


def test_hot_switch_needs_a_language_model_on_the_document_corpus(tmp_path):
    values = _values(tmp_path, ["dp1,tp1,pp1"] * 3, model="bert")
    with pytest.raises(TrainConfigError, match="hot_switch trains gpt2 or llama"):
        TrainConfig.from_dict(values)
