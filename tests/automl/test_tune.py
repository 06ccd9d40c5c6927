"""automl.tune: finds the optimum of cheap objectives, prunes bad trials, tunes luoshu.ml estimators by CV and
`luoshu train` jobs through their evaluations, shares one study between processes (journal file), writes
its results, and refuses bad spaces; `luoshu tune` on the command line."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.datasets import load_iris

import luoshu
from luoshu import automl
from luoshu.ml import KNeighborsClassifier
from luoshu.train.tune import TrainJob, tune_job

ROOT = Path(__file__).resolve().parents[2]


def test_finds_the_optimum_of_a_quadratic():
    space = {"x": {"low": -10, "high": 10}, "y": {"low": -10, "high": 10}, "kind": ["a", "b", "c"]}
    result = automl.tune(
        lambda p: (p["x"] - 2) ** 2 + (p["y"] + 1) ** 2 + (0 if p["kind"] == "b" else 5), space, n_trials=80, seed=0
    )
    assert abs(result.best_params["x"] - 2) < 0.5 and abs(result.best_params["y"] + 1) < 0.5
    assert result.best_params["kind"] == "b" and result.best_value < 0.5
    assert result.counts == {"COMPLETE": 80}


def test_integer_log_and_maximize():
    result = automl.tune(
        lambda p: -abs(np.log10(p["lr"]) + 3) - abs(p["n"] - 7),
        {"lr": {"low": 1e-6, "high": 1.0, "log": True}, "n": {"type": "int", "low": 1, "high": 20}},
        n_trials=60,
        direction="maximize",
        seed=1,
    )
    assert result.best_params["n"] == 7 and 3e-4 < result.best_params["lr"] < 3e-3


def test_median_pruning_stops_bad_trials():
    seen = {}

    def objective(p, report):
        steps = 0
        for step in range(10):
            steps += 1
            seen[p["x"]] = steps
            report((p["x"] - 2) ** 2 + 1.0 / (step + 1), step)
        return (p["x"] - 2) ** 2

    result = automl.tune(objective, {"x": {"low": -10, "high": 10}}, n_trials=40, seed=0)
    trials = result.study.trials
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(pruned) >= 10 and result.counts["PRUNED"] == len(pruned)
    # a pruned trial stopped early, and it was a bad one: worse than the median finished trial
    assert all(len(t.intermediate_values) < 10 for t in pruned)
    median = np.median([t.value for t in complete])
    assert all((t.params["x"] - 2) ** 2 > min(median, 1.0) for t in pruned)
    assert abs(result.best_params["x"] - 2) < 0.5


def test_hyperband_prunes_too():
    def objective(p, report):
        for step in range(27):
            report(abs(p["x"]) + 1.0 / (step + 1), step)
        return abs(p["x"])

    result = automl.tune(objective, {"x": {"low": -5, "high": 5}}, n_trials=30, pruner="hyperband", seed=0)
    assert result.counts.get("PRUNED", 0) >= 5


def test_tunes_an_estimator_by_cross_validation():
    X, y = load_iris(return_X_y=True)
    space = {"n_neighbors": {"type": "int", "low": 1, "high": 40}, "weights": ["uniform", "distance"]}
    result = automl.tune(KNeighborsClassifier(), space, n_trials=15, X=X, y=y, cv=3, seed=0)
    assert result.best_value > 0.95
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    # the reported value is the 3-fold CV accuracy of the best parameters
    ref = cross_val_score(
        KNeighborsClassifier(**result.best_params), X, y, cv=StratifiedKFold(3, shuffle=True, random_state=0)
    ).mean()
    np.testing.assert_allclose(result.best_value, ref)
    with pytest.raises(luoshu.Error, match="no parameter"):
        automl.tune(KNeighborsClassifier(), {"k": [1, 2]}, n_trials=1, X=X, y=y)


JOB = {
    "model": "mlp",
    "dataset": "digits",
    "epochs": 2,
    "batch_size": 128,
    "model_args": {"hidden": [16]},
    "optimizer": "adam",
}


def test_tunes_a_training_job_reporting_each_evaluation(tmp_path):
    space = {"lr": {"low": 1e-5, "high": 0.05, "log": True}, "model_args.hidden": [[16], [32]]}
    result = automl.tune(TrainJob(JOB, out=tmp_path), space, n_trials=4, seed=0, out=tmp_path)
    # every trial trained and reported its accuracy at each of its 2 evaluations (one per epoch)
    for t in result.study.trials:
        assert t.state.name in ("COMPLETE", "PRUNED")
        if t.state.name == "COMPLETE":
            assert sorted(t.intermediate_values) == [11, 22]  # steps: 1437 training rows // 128 per epoch
            rows = list(csv.DictReader(open(tmp_path / f"trial-{t.number:04d}" / "metrics.csv")))
            assert float(rows[-1]["accuracy"]) == pytest.approx(t.value, abs=1e-5)
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert (
        best["lr"] == result.best_params["lr"]
        and best["model_args"]["hidden"] == result.best_params["model_args.hidden"]
    )
    from luoshu.train import TrainConfig

    TrainConfig.from_dict(best)  # a ready luoshu train config
    trials = list(csv.DictReader(open(tmp_path / "trials.csv")))
    assert len(trials) == 4 and {"number", "state", "value", "lr", "model_args.hidden"} <= set(trials[0])
    for plot in ("history", "importances", "parallel_coordinate"):
        assert (tmp_path / f"{plot}.html").stat().st_size > 1000


def test_a_diverging_training_trial_is_pruned_by_the_trainer_hook(tmp_path):
    calls = []
    # median pruner, 3 startup trials: the 4th trial (a learning rate far too small) is cut at its first eval
    space = {"lr": [0.01, 0.01, 0.01, 1e-7]}
    result = tune_job({**JOB, "epochs": 3}, space, n_trials=8, seed=0, out=tmp_path)
    for t in result.study.trials:
        calls.append((t.params["lr"], t.state.name, len(t.intermediate_values)))
    bad = [c for c in calls if c[0] == 1e-7 and c[1] == "PRUNED"]
    good = [c for c in calls if c[0] == 0.01]
    assert bad and all(c[2] < 3 for c in bad)
    assert good and all(c[1] == "COMPLETE" for c in good)


WORKER = textwrap.dedent("""
    import pathlib, sys, time
    from luoshu import automl
    storage, trials, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    # start together (after the slow imports), so the two really write the journal at the same time
    here = pathlib.Path(storage).parent
    (here / f"ready-{seed}").touch()
    deadline = time.time() + 60
    while len(list(here.glob("ready-*"))) < 2 and time.time() < deadline:
        time.sleep(0.01)
    def objective(p):
        time.sleep(0.05)
        return (p["x"] - 1) ** 2
    automl.tune(objective, {"x": {"low": -3, "high": 3}}, n_trials=trials, storage=storage, study_name="shared",
                seed=seed)
""")


def test_two_processes_share_one_study_without_lost_or_duplicated_trials(tmp_path):
    storage = str(tmp_path / "study.log")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), storage, "12", str(seed)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="shared", storage=JournalStorage(JournalFileBackend(storage)))
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(24))  # 12 + 12: none lost, none twice
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({t._trial_id for t in trials}) == 24


def test_sqlite_storage_for_one_process(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    automl.tune(lambda p: p["x"] ** 2, {"x": {"low": -1, "high": 1}}, n_trials=3, storage=url, seed=0)
    again = automl.tune(lambda p: p["x"] ** 2, {"x": {"low": -1, "high": 1}}, n_trials=2, storage=url, seed=1)
    assert len(again.study.trials) == 5  # the second call continued the stored study


@pytest.mark.parametrize(
    "space, message",
    [
        ({}, "non-empty"),
        ({"x": {"low": 1, "high": 0}}, "low < high"),
        ({"x": {"low": 0, "high": 1, "log": True}}, "log scale"),
        ({"x": {"low": 0}}, "both low and high"),
        ({"x": {"type": "str", "low": 0, "high": 1}}, "type"),
        ({"x": {"low": 0, "high": 1, "size": 3}}, "unknown keys"),
        ({"x": []}, "empty list"),
        ({"x": 3}, "list of choices"),
    ],
)
def test_bad_spaces_are_refused(space, message):
    with pytest.raises(automl.TuneError, match=message):
        automl.tune(lambda p: 0.0, space, n_trials=1)


def test_bad_settings_are_refused():
    with pytest.raises(luoshu.Error, match="n_trials"):
        automl.tune(lambda p: 0.0, {"x": [1]}, n_trials=0)
    with pytest.raises(luoshu.Error, match="pruner"):
        automl.tune(lambda p: 0.0, {"x": [1]}, n_trials=1, pruner="sometimes")
    with pytest.raises(luoshu.Error, match="unknown setting"):
        TrainJob({**JOB, "learning_rate": 0.1})
    with pytest.raises(luoshu.Error, match="reports"):
        TrainJob(JOB, metric="auc")  # an image job reports accuracy and eval_loss
    with pytest.raises(luoshu.Error, match="TrainJob"):
        automl.tune(JOB, {"lr": [0.1]}, n_trials=1)  # a bare config: automl sits below the jobs layer
    with pytest.raises(luoshu.Error, match="no trial"):
        automl.tune(lambda p: float("nan"), {"x": [1]}, n_trials=2)


def test_luoshu_tune_command(tmp_path):
    from luoshu import cli

    (tmp_path / "job.yaml").write_text(yaml.safe_dump({**JOB, "epochs": 1}))
    (tmp_path / "space.yaml").write_text("lr: {low: 1.0e-4, high: 0.05, log: true}\n")
    out = tmp_path / "out"
    code = cli.main(
        [
            "tune",
            str(tmp_path / "job.yaml"),
            "--space",
            str(tmp_path / "space.yaml"),
            "--trials",
            "2",
            "--storage",
            str(tmp_path / "study.log"),
            "--out",
            str(out),
            "--seed",
            "0",
        ]
    )
    assert code == 0
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"] == "mlp" and 1e-4 <= best["lr"] <= 0.05
    assert len(list(csv.DictReader(open(out / "trials.csv")))) == 2
    assert (
        cli.main(["tune", str(tmp_path / "job.yaml"), "--space", str(tmp_path / "job.yaml"), "--trials", "1"]) == 1
    )  # a job file is no space: refused with a message, exit status 1
