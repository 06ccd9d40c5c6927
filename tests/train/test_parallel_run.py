"""luoshu.train.parallel_run: `luoshu train --dp/--tp/--pp ...` under `luoshu launch` against a one-process
run of the same global batch (losses of every step, final parameters), resume across layouts, and the
layout checks of `check_config`.

The zoo's language models train in float32 (no float64 setting in `luoshu train`): a split run sums
the same products in another order (split matmuls, all-reduces), so losses and parameters agree to
about 1e-6 relative after four AdamW steps; metrics.csv prints six significant digits. Hence
rtol 1e-5 on the losses and atol 1e-5 on the parameters (of order 0.02-1).
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from luoshu.train import TrainConfig, TrainConfigError, train
from tests.distributed.launcher import launch
from tests.train.harness import read_rows

STEPS = 4
JOB = {"model": "gpt2", "dataset": "synthetic-lm", "optimizer": "adamw", "lr": 0.01, "batch_size": 8,
       "max_steps": STEPS, "eval_interval": 1, "log_interval": 1, "progress": False,
       "data_args": {"num_docs": 200, "vocab": 64, "seq_len": 16},
       "model_args": {"n_layer": 2, "n_head": 4, "n_embd": 32, "dropout": 0.0}}
FLAGS = ["train", "--model", "gpt2", "--dataset", "synthetic-lm", "--optimizer", "adamw", "--lr", "0.01",
         "--batch-size", "8", "--eval-interval", "1", "--log-interval", "1", "--quiet",
         "--data-arg", "num_docs=200", "--data-arg", "vocab=64", "--data-arg", "seq_len=16",
         "--model-arg", "n_layer=2", "--model-arg", "n_head=4", "--model-arg", "n_embd=32",
         "--model-arg", "dropout=0.0"]


def _one_process(out, **changes) -> list[dict]:
    train(TrainConfig.from_dict({**JOB, "out": str(out), **changes}))
    return read_rows(out / "metrics.csv")


def _launched(n: int, out, *layout: str, steps: int = STEPS, extra: tuple = ()) -> list[dict]:
    proc = launch(n, "luoshu/cli.py", *FLAGS, "--max-steps", str(steps), "--out", str(out), *layout, *extra,
                  timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_rows(out / "metrics.csv")


def _check_rows(got: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for key in ("train_loss", "perplexity", "token_accuracy"):
        np.testing.assert_allclose([float(r[key]) for r in got], [float(r[key]) for r in expected], rtol=1e-5,
                                   err_msg=key)


def _final_weights(job) -> dict:
    return load_file(str(job / "checkpoints" / f"step-{STEPS:08d}" / "weights.safetensors"))


def _check_weights(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        if name.endswith("k_proj.bias"):
            # its gradient is zero in exact arithmetic (softmax ignores a shift shared by all keys), so
            # Adam normalises rounding noise into updates: that noise differs between layouts
            continue
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "job"
    return _one_process(out), _final_weights(out)


@pytest.mark.dist
def test_tp2_equals_one_process(tmp_path, reference):
    rows, weights = reference
    _check_rows(_launched(2, tmp_path / "tp2", "--tp", "2"), rows)
    _check_weights(_final_weights(tmp_path / "tp2"), weights)  # full tensors, written by rank 0


@pytest.mark.dist
@pytest.mark.slow
def test_a_tp2_checkpoint_resumes_in_one_process(tmp_path, reference):
    """A tp=2 job stopped after 2 steps resumes in one process: the same last two steps."""
    rows, weights = reference
    job = tmp_path / "resumed"
    _launched(2, job, "--tp", "2", steps=2)
    resumed = _one_process(job, resume=True)
    _check_rows(resumed, rows)
    _check_weights(_final_weights(job), weights)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", [("--dp", "2"), ("--tp", "2", "--sequence-parallel"),
                                    ("--pp", "2", "--micro-batches", "2"),
                                    ("--pp", "2", "--micro-batches", "2", "--pipeline-schedule", "gpipe")])
def test_two_process_layouts_equal_one_process(tmp_path, reference, layout):
    rows, weights = reference
    _check_rows(_launched(2, tmp_path / "job", *layout), rows)
    _check_weights(_final_weights(tmp_path / "job"), weights)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", [("--dp", "2", "--tp", "2"), ("--tp", "2", "--pp", "2", "--micro-batches", "2")])
def test_four_process_layouts_equal_one_process(tmp_path, reference, layout):
    rows, weights = reference
    _check_rows(_launched(4, tmp_path / "job", *layout), rows)
    _check_weights(_final_weights(tmp_path / "job"), weights)


@pytest.mark.dist
@pytest.mark.slow
def test_a_dp2_tp2_checkpoint_resumes_under_pp2(tmp_path, reference):
    rows, weights = reference
    job = tmp_path / "job"
    _launched(4, job, "--dp", "2", "--tp", "2", steps=2)
    _check_rows(_launched(2, job, "--pp", "2", extra=("--resume",)), rows)
    _check_weights(_final_weights(job), weights)


@pytest.mark.parametrize(
    "changes,world,message",
    [
        ({"tp": 2}, 1, r"dp x tp x pp = 1 x 2 x 1 = 2 must equal the world size of the launch, found 1"),
        ({"dp": 2, "tp": 2}, 2, r"= 4 must equal the world size of the launch, found 2"),
        ({"pp": 2, "micro_batches": 3}, 2, r"batch_size 8 must divide into dp = 1 shares of micro_batches = 3"),
        ({"dp": 2, "batch_size": 9}, 2, r"batch_size 9 must divide into dp = 2"),
        ({"pp": 4, "model_args": {**JOB["model_args"], "n_layer": 2}}, 4, r"pp = 4 stages need at least 4 layers; "
         r"model 'gpt2' has 2"),
        ({"sequence_parallel": True}, 1, r"sequence_parallel needs tensor parallelism"),
        ({"micro_batches": 2, "dp": 2}, 2, r"micro_batches = 2 needs pipeline parallelism"),
        ({"tp": 0}, 1, r"tp must be a positive integer, found 0"),
        ({"pipeline_schedule": "zb"}, 1, r"pipeline_schedule must be '1f1b' or 'gpipe', found 'zb'"),
        ({"model": "dcn", "dataset": "synthetic-ctr", "model_args": {}, "data_args": {}, "dp": 2}, 2,
         r"dp/tp/pp in luoshu train are for the language models .*'dcn' is a ctr model"),
        ({"parallel": "auto", "dp": 2}, 2, r"parallel = 'auto' chooses the layout itself: leave dp, tp, pp.*"
         r"found dp=2, tp=1"),
    ],
)
def test_check_config_refuses_layouts_the_job_cannot_run(monkeypatch, tmp_path, changes, world, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig.from_dict({**JOB, "out": str(tmp_path / "job"), **changes})
    assert not (tmp_path / "job").exists()
