"""`luoshu train` with a `hot_switch` setting: the job trains through HotSPa and logs per step the
tokens of each bucket's group, the switch bytes and the switch time; bad settings are refused."""

from __future__ import annotations

import csv
import shutil

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


def _two_layer_job_matches_one_process(tmp_path, strategies):
    """A two-layer `hot_switch` job over `strategies` under `luoshu launch -n 4`: each bucket's
    tokens, and the losses of the same job in one process to float32 rounding; its metrics rows."""
    import yaml

    layers = {"model_args": {"n_layer": 2, "n_head": 4, "n_embd": 32}}
    ls.train.train(TrainConfig.from_dict(_values(tmp_path / "one", ["dp1,tp1,pp1"] * 3, **layers)))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_values(tmp_path, strategies, **layers)))
    proc = launch(4, "luoshu/cli.py", "train", "--config", str(path), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert [[int(r[f"tokens_bucket{i}"]) for i in range(3)] for r in rows] == _expected_tokens(3)
    np.testing.assert_allclose(_losses(tmp_path / "run"), _losses(tmp_path / "one" / "run"), rtol=1e-5)
    return rows


@pytest.mark.dist
@pytest.mark.slow
def test_luoshu_train_hot_switch_with_a_pp2_strategy_matches_one_process(tmp_path):
    """`hot_switch` strings with pp2 (two layers, two stages of tp2) under `luoshu launch -n 4`: the
    losses of the job run in one process (every bucket under dp1,tp1,pp1), to float32 rounding."""
    rows = _two_layer_job_matches_one_process(tmp_path, ["dp1,tp2,pp2", "dp2,tp2,pp1", "dp4,tp1,pp1"])
    assert all(int(r["switch_bytes"]) > 0 for r in rows)


@pytest.mark.dist
@pytest.mark.slow
def test_luoshu_train_hot_switch_with_per_block_tp_strategies_matches_one_process(tmp_path):
    """Per-block strings ("tp[4,2]": block 0 under tp4, block 1 under dp2·tp2; "tp[1,4],sp[0,1]")
    among the buckets' strategies under `luoshu launch -n 4`: the one-process losses, and the
    checkpoint gathered from the owner's per-parameter layouts."""
    _two_layer_job_matches_one_process(tmp_path, ["tp[4,2]", "dp2,tp2,pp1", "tp[1,4],sp[0,1]"])


def test_a_layer_wise_plan_with_per_block_tp_runs_as_a_per_block_strategy():
    from luoshu.parallel.hotspa import Strategy, parse_strategy
    from luoshu.parallel.mixed_tp import plan_text

    st = Strategy(2, 2, 1, sp=True)
    assert plan_text(st, ["none", "full"]) == "dp2,tp2,pp1,sp"  # the plan's own text; recompute marked apart
    assert plan_text(st, ["none", "full"], (2, 2), (True, True)) == "dp2,tp2,pp1,sp"
    text = plan_text(st, ["none", "full"], (4, 1))
    assert text == "tp[4,1],sp[1,0],rc[none,full]" and parse_strategy(text).layer_tp == (4, 1)
    assert plan_text(parse_strategy("tp[4,2]"), ["full", "none"]) == "tp[4,2],rc[full,none]"
    assert plan_text(None, ["none", "full"], (4, 1), (True, False)) == "tp[4,1],sp[1,0],rc[none,full]"


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


@pytest.mark.dist
@pytest.mark.slow
def test_luoshu_train_hot_switch_with_a_per_block_pipeline_strategy_matches_one_process(tmp_path):
    """'pp2,tp[2,1]' (block 0 under tp2 on ranks 0-1, block 1 under dp2 on ranks 2-3) hot-switched with
    uniform strategies in a `luoshu train` job under `luoshu launch -n 4`: one process's losses."""
    rows = _two_layer_job_matches_one_process(tmp_path, ["pp2,tp[2,1]", "dp2,tp2,pp1", "dp4,tp1,pp1"])
    assert all(int(r["switch_bytes"]) > 0 for r in rows)


def test_a_searched_plan_runs_as_the_strategy_and_split_it_names():
    """`--parallel auto`'s hand-over (`plan_strategy`): a per-block plan in two stages runs as
    'pp2,tp[..]' at the searched split; a uniform pipeline plan at its split; a pp = 1 plan alone."""
    from luoshu.parallel import hotspa as H
    from luoshu.parallel import layerwise as LW
    from luoshu.train.hot_switch import plan_strategy

    model, _ = ls.train.builders.build_model("gpt2", {}, {"n_layer": 3, "n_head": 4, "n_embd": 32},
                                             {"vocab_size": 64, "block_size": 64})
    mixed = LW.LayerPlan(None, ["none", "full", "none"], [0, 2], 1.0, 1.0, {}, (2, 1, 2), (False,) * 3, 2)
    assert plan_strategy(model, mixed) == ("pp2,tp[2,1,2],rc[none,full,none]", ["h.0", "h.2"])
    uniform = LW.LayerPlan(H.Strategy(1, 2, 2), ["none"] * 3, [0, 1], 1.0, 1.0)
    assert plan_strategy(model, uniform) == ("dp1,tp2,pp2", ["h.0", "h.1"])
    flat = LW.LayerPlan(None, ["none"] * 3, [0], 1.0, 1.0, {}, (4, 2, 2), (False,) * 3)
    assert plan_strategy(model, flat) == ("tp[4,2,2]", None)


@pytest.mark.dist
@pytest.mark.slow
def test_parallel_auto_runs_a_per_block_pipeline_plan_as_one_process_does(tmp_path):
    """Under `luoshu launch -n 4`, a `parallel: auto` job whose search returns the per-block pipeline
    plan pp2, tp [2, 1], block 1 fully recomputed (tests/train/auto_plan_job.py): it records the plan,
    HotSPa runs 'pp2,tp[2,1],rc[none,full]' at the split [0, 1], and the losses are one process's."""
    import json

    import yaml

    layers = {"model_args": {"n_layer": 2, "n_head": 4, "n_embd": 32}}
    ls.train.train(TrainConfig.from_dict(_auto_values(tmp_path / "one", max_steps=3, **layers)))
    values = _auto_values(tmp_path, max_steps=3, **layers)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(values))
    proc = launch(4, "tests/train/auto_plan_job.py", str(tmp_path / "job.yaml"), "--pp", "2", "--tp", "2,1",
                  "--stages", "0,1", "--recompute", "none,full", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "parallel.json").read_text())
    assert record["strategy"] == "pp2,tp[2,1]" and record["pp"] == 2 and record["stages"] == [0, 1]
    assert "--parallel auto: pp2,tp[2,1] over 4 ranks" in proc.stdout
    np.testing.assert_allclose(_losses(tmp_path / "run"), _losses(tmp_path / "one" / "run"), rtol=1e-5)


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
    # pipeline plans are searched (a pipeline owner holds only its stage's states): at this budget
    # dp1·pp2 holds its stages where no pp=1 uniform strategy does (it was the plan run here when written)
    fits = {c["strategy"]: c["fits"] for c in record["candidates"]}
    assert fits["dp1,tp1,pp2"] and not fits["dp2,tp1,pp1"] and not fits["dp1,tp2,pp1"], record
    assert record["predicted_memory_bytes"] <= budget_mb * 2**20
    # a candidate that does not fit needs more (up to the search's rounding of bytes to 1/2048 of the budget)
    assert all(c["fits"] or c["least_memory_bytes"] > 0.99 * budget_mb * 2**20 for c in record["candidates"])
    ref = tmp_path / "ref"
    ls.train.train(TrainConfig.from_dict({**_auto_values(tmp_path, max_steps=2, model_args=model_args),
                                          "out": str(ref)}))
    assert json.loads((ref / "parallel.json").read_text())["recompute"] == ["none", "none"]
    assert np.allclose(_losses(tmp_path / "run"), _losses(ref), rtol=1e-4, atol=0)


# --- one checkpoint format: a plain job resumes a hot-switching one's and the converse ---------------------
CROSS_DATA = {"num_docs": 96, "vocab": 64, "min_len": 2, "max_len": 64, "seq_len": 64}  # positions: 64 either way
# no biases: the key projection's has a zero gradient in exact arithmetic (softmax ignores a constant per
# query), so float32 rounding noise, normalised by AdamW, is all it would train on
CROSS_MODEL = {"n_layer": 1, "n_head": 4, "n_embd": 32, "bias": False}
CROSS_HOT = {"hot_switch": {"buckets": [64, 16, 0], "strategies": ["dp1,tp1,pp1"] * 2}}


def _cross_values(out, max_steps: int, hot: bool, **extra):
    """Four sequences per step (a plain epoch: 4 blocks of 64 tokens; a hot-switching one: 24 documents),
    a warm-up the resumed job must continue, a step crossing the plain job's first epoch."""
    values = {
        "model": "gpt2", "dataset": "synthetic-lm", "model_args": CROSS_MODEL,
        "data_args": CROSS_DATA, "optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 4,
        "batch_size": 4, "eval_interval": 1, "max_steps": max_steps, "out": str(out), "progress": False,
        **(CROSS_HOT if hot else {}), **extra,
    }
    return TrainConfig.from_dict(values)


def _reference_from(path, config, steps: range, hot: bool):
    """(losses, parameters) of `steps` run eagerly from the checkpoint at `path`, one process, as the
    resuming job must run them: the plain job's loss (mean over a block batch of its epoch's seeded
    order) or the hot-switching one's (every document of the batch alone, its targets' summed cross
    entropy over the batch's targets), AdamW and a linear warm-up stepped from the start."""
    from luoshu.train.builders import build_model, build_optimizer
    from luoshu.train.datasets import DATASETS

    data = DATASETS["synthetic-lm"].load(None, dict(CROSS_DATA), "lm")
    model, _ = build_model("gpt2", data.info, config.model_args, data.min_info)
    opt = build_optimizer(config, model.parameters())
    ls.load(path, model, opt)
    warmup = ls.optim.LinearWarmup(opt, config.warmup_steps)
    for _ in range(steps.start):
        warmup.step()
    docs = ls.data.synthetic_sequences(96, 64, 2, 64, num_special=1, seed=0)
    n_blocks = len(data.train["tokens"])
    per_epoch = n_blocks // 4
    losses = []
    for step in steps:
        model.zero_grad()
        if hot:
            batch = docs[(step % (96 // 4)) * 4 : (step % (96 // 4) + 1) * 4]
            total = sum(len(d) - 1 for d in batch)
            value = 0.0
            for d in batch:
                logits = model(ls.tensor(d[None]))
                target = ls.tensor(np.concatenate([d[1:], [-100]]))
                loss = ls.nn.functional.cross_entropy(logits.reshape((-1, 64)), target, reduction="sum") / total
                loss.backward()
                value += loss.item()
        else:
            epoch, j = divmod(step, per_epoch)
            order = np.random.default_rng([config.seed, epoch]).permutation(n_blocks)
            idx = np.sort(order[j * 4 : (j + 1) * 4])
            logits = model(ls.tensor(data.train["tokens"][idx]))
            target = ls.tensor(data.train["targets"][idx].reshape(-1))
            loss = ls.nn.functional.cross_entropy(logits.reshape((-1, 64)), target)
            loss.backward()
            value = loss.item()
        opt.step()
        warmup.step()
        losses.append(value)
    return losses, {n: p.value.clone() for n, p in model.named_parameters()}


def _newest(run_dir):
    from luoshu.train.checkpoints import latest_checkpoint

    return latest_checkpoint(run_dir / "checkpoints")


def _cross_tensors(path) -> dict:
    model, _ = ls.train.builders.build_model("gpt2", {}, CROSS_MODEL, {"vocab_size": 64, "block_size": 64})
    ls.load(path, model)
    return {n: p.value.clone() for n, p in model.named_parameters()}


def test_a_plain_job_resumes_a_hot_switching_checkpoint_as_its_own(tmp_path):
    """Three hot-switching steps, then a plain job resumes them for three more: its step, epoch, batch and
    warm-up are what its own checkpoint of step 3 holds, and it trains on as one process from that
    checkpoint's parameters and AdamW moments does (its epoch ends after step 4)."""
    run = tmp_path / "run"
    ls.train.train(_cross_values(run, 3, hot=True))
    hot_ckpt = shutil.copytree(_newest(run), tmp_path / "hot-step-3")  # the resumed job keeps only its newest
    plain_own = tmp_path / "own"
    ls.train.train(_cross_values(plain_own, 3, hot=False))
    resumed = ls.train.Trainer(_cross_values(run, 6, hot=False, resume=True))
    resumed.load_checkpoint(hot_ckpt)
    own = ls.train.Trainer(_cross_values(plain_own, 6, hot=False, resume=True))
    own.load_checkpoint(_newest(plain_own))
    assert resumed.steps_per_epoch == 4
    position = (resumed.step, resumed.epoch, resumed.batch_in_epoch)
    assert position == (own.step, own.epoch, own.batch_in_epoch) == (3, 0, 3)
    assert resumed.scheduler.state_dict() == own.scheduler.state_dict()
    assert resumed.optimizer.param_groups[0]["lr"] == own.optimizer.param_groups[0]["lr"]
    ls.train.train(_cross_values(run, 6, hot=False, resume=True))
    config = _cross_values(run, 6, hot=False)
    ref_losses, ref_params = _reference_from(hot_ckpt, config, range(3, 6), hot=False)
    rows = _rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [4, 5, 6]  # the plain log starts at the resumed step
    np.testing.assert_allclose([float(r["train_loss"]) for r in rows], ref_losses, rtol=1e-5, atol=0)
    _close(_cross_tensors(_newest(run)), ref_params, atol=1e-5)


def test_a_hot_switching_job_resumes_a_plain_checkpoint(tmp_path):
    run = tmp_path / "run"
    ls.train.train(_cross_values(run, 3, hot=False))
    plain_ckpt = shutil.copytree(_newest(run), tmp_path / "plain-step-3")
    ls.train.train(_cross_values(run, 6, hot=True, resume=True))
    config = _cross_values(run, 6, hot=True)
    ref_losses, ref_params = _reference_from(plain_ckpt, config, range(3, 6), hot=True)
    rows = [r for r in _rows(run / "metrics.csv") if int(r["step"]) > 3]
    assert [int(r["step"]) for r in rows] == [4, 5, 6]
    np.testing.assert_allclose([float(r["train_loss"]) for r in rows], ref_losses, rtol=1e-5, atol=0)
    _close(_cross_tensors(_newest(run)), ref_params, atol=1e-5)


def _files(run) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("first_hot", [True, False])
def test_resuming_the_other_jobs_checkpoint_of_another_model_changes_nothing(tmp_path, first_hot):
    run = tmp_path / "run"
    ls.train.train(_cross_values(run, 2, hot=first_hot))
    before = _files(run)
    wider = _cross_values(run, 4, hot=not first_hot, resume=True, model_args={**CROSS_MODEL, "n_embd": 64})
    with pytest.raises(TrainConfigError, match="trained with model_args"):
        ls.train.train(wider)
    assert _files(run) == before
    # the same settings, but the hot-switching job's positions end at its first bucket bound (32), the
    # plain job's at seq_len (64): the shapes differ, named before anything changes
    short = tmp_path / "short"
    data = {**CROSS_DATA, "max_len": 32}
    hot = {"hot_switch": {"buckets": [32, 16, 0], "strategies": ["dp1,tp1,pp1"] * 2}}
    ls.train.train(_cross_values(short, 2, hot=first_hot, data_args=data, **(hot if first_hot else {})))
    before = _files(short)
    resume = _cross_values(short, 4, hot=False, resume=True, data_args=data, **({} if first_hot else hot))
    with pytest.raises(ls.Error, match=r"cannot resume from .*step-00000002: .*'wpe.weight' expects shape"):
        ls.train.train(resume)
    assert _files(short) == before
