"""The `luoshu` command: `luoshu train` from config files and flags, help, resume, errors, the default job."""

import csv
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from luoshu import models
from luoshu.cli import COMMANDS, main
from luoshu.train import DATASETS, list_checkpoints

TINY = """\
model: lr
dataset: synthetic-ctr
data_args: {num_samples: 2000, eval_samples: 500, num_slots: 4, max_slot_size: 20}
batch_size: 200
epochs: 2
eval_interval: 5
lr: 0.01
"""


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_help_lists_models_datasets_and_optimizers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in [*models.MODELS, *DATASETS, "lamb", "--model-arg", "--resume", "--checkpoint-dir"]:
        assert name in text, name


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out
    assert set(COMMANDS) >= {"train"}


def test_yaml_config_with_flag_overrides_end_to_end(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(TINY)
    out = tmp_path / "run"
    code = main(["train", "--config", str(config), "--out", str(out), "--epochs", "1",
                 "--data-arg", "seed=4", "--optimizer", "adagrad", "--lr", "0.05"])
    assert code == 0
    captured = capsys.readouterr()
    assert "sample/s" in captured.err and "loss" in captured.err  # the progress bar
    assert "auc" in captured.out and str(out / "metrics.csv") in captured.out
    rows = _rows(out / "metrics.csv")
    assert [r["step"] for r in rows] == ["5", "10"]  # 1 epoch of 2000 // 200 steps, from the flag
    assert all(float(r["lr"]) == 0.05 for r in rows)
    saved = (out / "config.yaml").read_text()
    # the file's data_args merged with the flag's
    assert "optimizer: adagrad" in saved and "seed: 4" in saved and "num_slots: 4" in saved
    assert list(out.glob("events.out.tfevents.*"))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [5, 10]


def test_json_config_and_resume_from_the_command_line(tmp_path):
    import yaml

    values = yaml.safe_load(TINY)
    config = tmp_path / "job.json"
    config.write_text(json.dumps(values))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", "--config", str(config), "--out", str(whole), "--quiet"]) == 0
    assert main(["train", "--config", str(config), "--out", str(cut), "--quiet", "--max-steps", "7"]) == 0
    assert main(["train", "--config", str(config), "--out", str(cut), "--quiet", "--resume"]) == 0
    steps = [s for s, _ in list_checkpoints(cut / "checkpoints")]
    assert steps == [10, 15, 20]  # the three newest are kept
    a = load_file(whole / "checkpoints" / "step-00000020" / "weights.safetensors")
    b = load_file(cut / "checkpoints" / "step-00000020" / "weights.safetensors")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert [r["step"] for r in _rows(cut / "metrics.csv")] == ["5", "7", "10", "15", "20"]


@pytest.mark.parametrize("args,message", [
    (["--model", "resnet"], "model 'resnet' (image task) does not fit dataset 'synthetic-ctr'"),
    (["--model", "bart"], "unknown model 'bart' (did you mean 'bert'?)"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--optimizer", "adadelta"], "unknown optimizer 'adadelta'"),
    (["--dataset", "cifar10", "--model", "resnet18"], "dataset 'cifar10' reads local files: pass --data-path"),
    (["--dataset", "movielens", "--model", "ncf", "--data-path", "/nope/u.data"],
     "data path /nope/u.data does not exist"),
    (["--model-arg", "cross_layers=2"], "model 'dcn' has no config field 'cross_layers'"),
    (["--config", "/nope/job.yaml"], "config file /nope/job.yaml does not exist"),
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--resume"], "--resume: no checkpoint in"),
    (["--model-arg", "mlp_dims=abc"], "model arg mlp_dims='abc' for 'dcn': expected a list of positive integers"),
    (["--model-arg", "mlp_dims=[a,b]"], "model arg mlp_dims=['a', 'b'] for 'dcn': expected a list of positive"),
    (["--model-arg", "embedding_dim=1.5"], "model arg embedding_dim=1.5 for 'dcn': expected a positive integer"),
    (["--model-arg", "num_cross_layers=-1"], "num_cross_layers=-1 for 'dcn': expected a non-negative integer"),
    (["--model-arg", "cross_type=3"], "cross_type=3 for 'dcn': expected a string"),
    (["--model", "mlp", "--dataset", "digits", "--model-arg", "dropout=1.5"], "expected a number in [0, 1)"),
    (["--lr", "-1"], "settings: lr must be a positive number, found -1"),
])
def test_bad_config_exits_with_a_clear_error(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("luoshu train: error: ") and message in err, err
    assert err.count("luoshu train:") == 1, err  # one prefix, not "luoshu train: error: luoshu train: ..."
    assert "Traceback" not in err


def test_out_that_is_a_file_or_cannot_be_written_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    for out, message in ((tmp_path / "file", "a file is in the way"),
                         (tmp_path / "file" / "run", "cannot write there (")):
        assert main(["train", "--out", str(out), "--quiet", "--max-steps", "1"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"luoshu train: error: --out {out}: ") and message in err, err
    assert main(["train", "--out", str(tmp_path / "ok"), "--checkpoint-dir", str(tmp_path / "file"), "--quiet",
                 "--max-steps", "1"]) == 1
    assert "--checkpoint-dir" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "not a directory"


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, capsys, monkeypatch):
    import os
    import signal

    import luoshu as ls

    config = tmp_path / "job.yaml"
    config.write_text(TINY)
    original, calls = ls.Graph.run, {"n": 0}

    def run(self, fetches, feed_dict=None):
        if isinstance(fetches, list) and len(fetches) == 2:
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return original(self, fetches, feed_dict)

    monkeypatch.setattr(ls.Graph, "run", run)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 143
    err = capsys.readouterr().err
    assert "terminated (SIGTERM) at step 2: saved" in err and "luoshu train: terminated (SIGTERM)" in err
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [2]


@pytest.mark.parametrize("text,message", [
    ("model: [dcn\n", "is not valid YAML"),
    ("- model\n", "expected a mapping of settings"),
    ("modle: dcn\n", "unknown setting 'modle' (did you mean 'model'?)"),
])
def test_bad_config_file(tmp_path, capsys, text, message):
    config = tmp_path / "job.yaml"
    config.write_text(text)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 1
    assert message in capsys.readouterr().err


def test_malformed_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model-arg", "hidden"])
    assert exit_info.value.code == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err


def test_default_job_scaled_down_learns(tmp_path):
    """The default job (no config, no model or dataset flag) on a tenth of its data for one epoch."""
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(out), "--epochs", "1", "--batch-size", "128",
                 "--data-arg", "num_samples=10000", "--data-arg", "eval_samples=2000"]) == 0
    rows = _rows(out / "metrics.csv")
    assert len(rows) == 1 and float(rows[0]["auc"]) > 0.65
    assert "model: dcn" in (out / "config.yaml").read_text()


@pytest.mark.slow
def test_default_job(tmp_path, monkeypatch):
    """`make run`: DCN on the synthetic click logs reaches an eval AUC of at least 0.75."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--quiet"]) == 0
    job = tmp_path / "runs" / "dcn-synthetic-ctr"
    rows = _rows(job / "metrics.csv")
    assert len(rows) == 3 and float(rows[-1]["auc"]) >= 0.75, rows
    assert list(job.glob("events.out.tfevents.*")) and list_checkpoints(job / "checkpoints")
