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
ARGS = {"n_layer": 1, "n_head": 4, "n_embd": 32}


def _values(tmp_path, strategies, **extra):
    return {
        "model": "gpt2",
        "dataset": "synthetic-lm",
        "model_args": dict(ARGS),
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


@pytest.mark.dist
@pytest.mark.slow
def test_luoshu_train_hot_switch_with_a_pp2_strategy_matches_one_process(tmp_path):
    """`hot_switch` strings with pp2 (two layers, two stages of tp2) under `luoshu launch -n 4`: the
    losses of the job run in one process (every bucket under dp1,tp1,pp1), to float32 rounding."""
    import yaml

    layers = {"model_args": {"n_layer": 2, "n_head": 4, "n_embd": 32}}
    one = _values(tmp_path / "one", ["dp1,tp1,pp1"] * 3, **layers)
    ls.train.train(TrainConfig.from_dict(one))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_values(tmp_path, ["dp1,tp2,pp2", "dp2,tp2,pp1", "dp4,tp1,pp1"], **layers)))
    proc = launch(4, "luoshu/cli.py", "train", "--config", str(path), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert [[int(r[f"tokens_bucket{i}"]) for i in range(3)] for r in rows] == _expected_tokens(3)
    assert all(int(r["switch_bytes"]) > 0 for r in rows)
    np.testing.assert_allclose(_losses(tmp_path / "run"), _losses(tmp_path / "one" / "run"), rtol=1e-5)


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


# --- checkpoints and --resume ---------------------------------------------------------------------------
def _losses(run_dir) -> list[float]:
    return [float(r["train_loss"]) for r in _rows(run_dir / "metrics.csv")]


def _final_tensors(run_dir) -> dict:
    """The newest checkpoint's parameters and optimizer state, read back through ls.load into a plain model."""
    from luoshu.checkpoint import load_tensors
    from luoshu.train.checkpoints import latest_checkpoint

    path = latest_checkpoint(run_dir / "checkpoints")
    assert path is not None
    model, _ = ls.train.builders.build_model(
        "gpt2", {}, {"n_layer": 1, "n_head": 4, "n_embd": 32}, {"vocab_size": DATA["vocab"], "block_size": 64}
    )
    ls.load(path, model)  # the regular package: a plain one-process model takes it
    out = {n: p.value.clone() for n, p in model.named_parameters()}
    out.update({f"opt.{k}": v for k, v in load_tensors(path / "optimizer.safetensors").items()})
    return out


def _close(a: dict, b: dict, atol: float) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.allclose(a[k].numpy(), b[k].numpy(), rtol=0, atol=atol), k


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    steps = ["dp1,tp1,pp1"] * 3
    whole = tmp_path / "whole"
    ls.train.train(TrainConfig.from_dict({**_values(tmp_path, steps, max_steps=5), "out": str(whole)}))
    part = tmp_path / "part"
    first = {**_values(tmp_path, steps, max_steps=2), "out": str(part)}
    ls.train.train(TrainConfig.from_dict(first))
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-00000002"]
    # resumed under another hot-switching configuration (one bucket): the same training
    other = {**first, "max_steps": 5, "resume": True, "hot_switch": {"buckets": [64, 0], "strategies": ["dp1"]}}
    ls.train.train(TrainConfig.from_dict(other))
    assert [int(r["step"]) for r in _rows(part / "metrics.csv")] == [1, 2, 3, 4, 5]
    assert np.allclose(_losses(part), _losses(whole), rtol=1e-5, atol=0)
    _close(_final_tensors(part), _final_tensors(whole), atol=1e-6)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    steps = ["dp1,tp1,pp1"] * 3
    ls.train.train(TrainConfig.from_dict(_values(tmp_path, steps, max_steps=1)))
    values = _values(tmp_path, steps, max_steps=2, resume=True)
    values["model_args"] = {**values["model_args"], "n_embd": 64}
    with pytest.raises(TrainConfigError, match="trained with model_args"):
        ls.train.train(TrainConfig.from_dict(values))


@pytest.mark.dist
@pytest.mark.slow
def test_resume_on_4_processes_under_other_strategies_equals_one_process(tmp_path):
    import yaml

    ref = tmp_path / "ref"
    ls.train.train(TrainConfig.from_dict({**_values(tmp_path, ["dp1,tp1,pp1"] * 3, max_steps=4), "out": str(ref)}))
    run = tmp_path / "run"
    first = {**_values(tmp_path, ["dp1,tp4,pp1", "dp2,tp2,pp1", "dp4,tp1,pp1"], max_steps=2), "out": str(run)}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(first))
    proc = launch(4, "luoshu/cli.py", "train", "--config", str(tmp_path / "a.yaml"), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = {**first, "max_steps": 4, "resume": True}
    second["hot_switch"] = {"buckets": BUCKETS, "strategies": ["dp2,tp2,pp1", "dp4,tp1,pp1", "dp1,tp4,pp1"]}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(second))
    proc = launch(4, "luoshu/cli.py", "train", "--config", str(tmp_path / "b.yaml"), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.allclose(_losses(run), _losses(ref), rtol=1e-4, atol=0)
    _close(_final_tensors(run), _final_tensors(ref), atol=1e-4)


# --- parallel: auto ----------------------------------------------------------------------------------------
def _auto_values(tmp_path, **extra):
    values = _values(tmp_path, [], parallel="auto", **extra)
    del values["hot_switch"]
    return values


def test_parallel_auto_picks_records_and_trains_a_static_strategy(tmp_path, capsys):
    import json

    metrics = ls.train.train(TrainConfig.from_dict(_auto_values(tmp_path, max_steps=2)))
    record = json.loads((tmp_path / "run" / "parallel.json").read_text())
    assert record["strategy"] == "dp1,tp1,pp1"  # the only strategy over one process
    assert record["recompute"] == ["none"]  # no budget: nothing to recompute
    assert record["predicted_step_s"] > 0 and record["predicted_memory_bytes"] > 0
    assert "--parallel auto: dp1,tp1,pp1" in capsys.readouterr().out
    assert len(_losses(tmp_path / "run")) == 2 and np.isfinite(metrics["train_loss"])


def test_parallel_auto_with_an_infeasible_budget_is_a_clear_error(tmp_path):
    with pytest.raises(
        ls.Error, match=r"no strategy over 1 ranks holds \d+ rows of 64 tokens in 0.01 MiB .* least memory needed is"
    ):
        ls.train.train(TrainConfig.from_dict(_auto_values(tmp_path, memory_budget_mb=0.01)))
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"parallel": "manual"}, "parallel must be 'auto'"),
        ({"memory_budget_mb": -1}, "memory_budget_mb must be a positive number"),
        ({"parallel": None, "memory_budget_mb": 64}, "memory_budget_mb needs parallel 'auto'"),
    ],
)
def test_bad_parallel_settings_are_refused(tmp_path, extra, match):
    with pytest.raises(TrainConfigError, match=match):
        TrainConfig.from_dict({**_auto_values(tmp_path), **extra})


def test_parallel_auto_and_hot_switch_together_are_refused(tmp_path):
    with pytest.raises(TrainConfigError, match="set one of them"):
        TrainConfig.from_dict(_values(tmp_path, ["dp1,tp1,pp1"] * 3, parallel="auto"))


@pytest.mark.dist
@pytest.mark.slow
def test_parallel_auto_under_launch_recomputes_within_the_budget_and_matches_one_process(tmp_path):
    """Two processes, two layers, a budget no candidate holds without recompute: the plan recomputes
    some blocks, its predicted peak is within the budget, and the losses are one process's."""
    import json

    import yaml

    model_args = {**ARGS, "n_layer": 2}

    def job(name: str, **extra) -> dict:
        values = _auto_values(tmp_path, max_steps=2, model_args=model_args, out=str(tmp_path / name), **extra)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(values))
        proc = launch(2, "luoshu/cli.py", "train", "--config", str(tmp_path / f"{name}.yaml"), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / name / "parallel.json").read_text())

    # the candidates' needs as measured on these ranks (the plans' accounting, not timings)
    free = job("free")["candidates"]
    budget_mb = (min(c["memory_without_recompute_bytes"] for c in free)
                 + min(c["least_memory_bytes"] for c in free)) / 2 / 2**20
    job("run", memory_budget_mb=budget_mb)
    record = json.loads((tmp_path / "run" / "parallel.json").read_text())
    assert any(c != "none" for c in record["recompute"]), record
    assert record["predicted_memory_bytes"] <= budget_mb * 2**20
    # a candidate that does not fit needs more (up to the search's rounding of bytes to 1/2048 of the budget)
    assert all(c["fits"] or c["least_memory_bytes"] > 0.99 * budget_mb * 2**20 for c in record["candidates"])
    ref = tmp_path / "ref"
    ls.train.train(TrainConfig.from_dict({**_auto_values(tmp_path, max_steps=2, model_args=model_args),
                                          "out": str(ref)}))
    assert json.loads((ref / "parallel.json").read_text())["recompute"] == ["none", "none"]
    assert np.allclose(_losses(tmp_path / "run"), _losses(ref), rtol=1e-4, atol=0)
