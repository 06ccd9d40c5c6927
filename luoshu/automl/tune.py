"""Hyper-parameter optimisation on Optuna: `tune` for a Python objective, a `luoshu train` job or a
scikit-learn-compatible (`luoshu.ml`) estimator; study storage; results (best config, trials CSV, plots).

Sampler: TPE. Pruner: median (default) or Hyperband, fed by intermediate reports — the eval metrics of a
training job at each of its evaluation steps, or the running mean over cross-validation folds of an estimator.

Storage: None keeps the study in memory. A file path (e.g. ``study.log``) is Optuna's journal file storage,
which any number of processes (on one machine or on a shared file system) append to safely, so several
`luoshu tune` processes given the same path work on one study. An RDB URL (``sqlite:///study.db``,
``postgresql://...``) goes to Optuna's RDB storage; SQLite locks the whole database file per write, so
parallel writers see "database is locked" errors and retries — use the journal file (or a server database)
for parallel workers, SQLite only for one process.
"""

from __future__ import annotations

import csv
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from luoshu.automl.space import Param, TuneError, apply, decode, parse_space, sample

# eval metrics where lower is better; anything else (accuracy, auc, r2, hr@10 ...) is maximised
_LOWER_IS_BETTER = ("loss", "rmse", "mse", "mae", "perplexity", "error")


def direction_of(metric: str) -> str:
    return "minimize" if any(word in metric.lower() for word in _LOWER_IS_BETTER) else "maximize"


def _storage(storage):
    """None (in memory), an Optuna storage object, an RDB URL, or a journal file path."""
    if storage is None or not isinstance(storage, str | Path):
        return storage
    text = str(storage)
    if "://" in text:
        return text  # an RDB URL; optuna.storages.RDBStorage reads it
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(text).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(text))


def _pruner(pruner):
    import optuna

    if pruner is None or pruner == "none":
        return optuna.pruners.NopPruner()
    if pruner == "median":
        # the first 3 trials run to the end, so there is a median to compare with
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner
    raise TuneError(f"tune: pruner must be 'median', 'hyperband', 'none' or an Optuna pruner, found {pruner!r}")


class Reporter:
    """Handed to an objective: `report(value, step)` records an intermediate value and raises Optuna's
    `TrialPruned` when the pruner stops this trial."""

    def __init__(self, trial):
        self.trial = trial
        self.steps = 0

    def __call__(self, value: float, step: int | None = None) -> None:
        import optuna

        step = self.steps if step is None else int(step)
        self.steps += 1
        value = float(value)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"intermediate value {value} at step {step}")
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} with {value:g}")

    report = __call__


# --- the three kinds of objective -------------------------------------------------------------------------


def _function_objective(fn: Callable) -> Callable:
    """fn(params) or fn(params, report) -> value."""
    try:
        takes_report = len(inspect.signature(fn).parameters) >= 2
    except (TypeError, ValueError):
        takes_report = False
    return (
        (lambda params, report, number: fn(params, report))
        if takes_report
        else (lambda params, report, number: fn(params))
    )


def _estimator_objective(estimator, X, y, cv: int, scoring) -> Callable:
    """Mean cross-validated score of the estimator with the trial's parameters; each fold is a step."""
    import numpy as np
    from sklearn.base import clone, is_classifier
    from sklearn.metrics import check_scoring
    from sklearn.model_selection import KFold, StratifiedKFold

    if X is None or y is None:
        raise TuneError("tune: an estimator objective needs X and y")
    splitter = (StratifiedKFold if is_classifier(estimator) else KFold)(cv, shuffle=True, random_state=0)
    folds = list(splitter.split(X, y))
    scorer = check_scoring(estimator, scoring=scoring)

    def run(params, report, number):
        scores = []
        for train, test in folds:
            est = clone(estimator).set_params(**params)
            est.fit(X[train], y[train])
            scores.append(scorer(est, X[test], y[test]))
            report(float(np.mean(scores)))
        return float(np.mean(scores))

    return run


# --- results ---------------------------------------------------------------------------------------------


@dataclass
class TuneResult:
    """What a study found: the best trial's values and params (and, for a training job, its full config),
    counts of trials by state, and the files written (when `out` was given)."""

    study: Any
    params: list[Param]
    best_params: dict
    best_value: float
    best_config: dict | None = None
    counts: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    def write(self, out: str | Path) -> dict[str, Path]:
        """best.yaml (a ready `luoshu train` config for a job, else the best parameters), trials.csv, and
        plots as HTML: optimisation history, parameter importances, parallel coordinates."""
        import yaml

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        best = dict(self.best_config) if self.best_config is not None else dict(self.best_params)
        if self.best_config is not None:
            best["out"] = None  # the job's default directory, not the tuning trial's
            best["progress"] = True
        files["best"] = out / "best.yaml"
        files["best"].write_text(yaml.safe_dump(best, sort_keys=False))
        files["trials"] = out / "trials.csv"
        write_trials_csv(self.study, self.params, files["trials"])
        files.update(write_plots(self.study, out))
        self.files = files
        return files


def write_trials_csv(study, params: list[Param], path: Path) -> None:
    """One row per trial: number, state, value, each parameter, steps reported, start, duration."""
    names = [p.name for p in params]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", "value", *names, "steps_reported", "datetime_start", "duration_s"])
        for t in study.get_trials(deepcopy=False):
            values = decode(params, t.params)
            duration = (
                (t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start
                else ""
            )
            w.writerow(
                [
                    t.number,
                    t.state.name,
                    "" if t.value is None else t.value,
                    *[values.get(n, "") for n in names],
                    len(t.intermediate_values),
                    t.datetime_start.isoformat() if t.datetime_start else "",
                    duration,
                ]
            )


def write_plots(study, out: Path) -> dict[str, Path]:
    """Optuna's plotly figures as standalone HTML files; a plot the study cannot have yet (e.g. importances
    with fewer than two finished trials) is skipped."""
    import optuna

    files = {}
    plots = {
        "history": optuna.visualization.plot_optimization_history,
        "importances": optuna.visualization.plot_param_importances,
        "parallel_coordinate": optuna.visualization.plot_parallel_coordinate,
    }
    for name, plot in plots.items():
        try:
            figure = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError):  # too few finished trials for this plot
            continue
        files[name] = out / f"{name}.html"
        figure.write_html(str(files[name]), include_plotlyjs="cdn")
    return files


# --- tune ------------------------------------------------------------------------------------------------


def tune(
    objective_or_config,
    space: Mapping[str, Any],
    n_trials: int | None = 20,
    timeout: float | None = None,
    storage=None,
    *,
    X=None,
    y=None,
    cv: int = 3,
    scoring=None,
    direction: str | None = None,
    study_name: str = "luoshu",
    pruner="median",
    seed: int | None = None,
    out: str | Path | None = None,
) -> TuneResult:
    """Searches `space` with TPE for the best value of the objective.

    objective_or_config:
      - a function `f(params)` or `f(params, report)` returning the value (`report(value, step)` gives
        intermediate values for pruning), `direction` default "minimize";
      - a job: an object with `base_config` (a mapping), `direction` and `run_trial(params, report, number)`,
        such as `luoshu.train.tune.TrainJob(config)` for a `luoshu train` job (each trial trains it with the
        sampled settings, dotted names reaching model_args/data_args/..., reporting its eval metric at every
        evaluation); the best config (base_config with the best values) is written as best.yaml;
      - an estimator (`luoshu.ml` or any scikit-learn-compatible one): the mean `cv`-fold score on X, y
        (`scoring`: a scikit-learn scorer name, default the estimator's `score`), maximised.

    n_trials / timeout: trials this call runs / seconds it may take (Optuna's meaning: with a shared
    `storage`, every process runs its own n_trials on the one study). Returns a `TuneResult`; with `out`
    given, also writes best.yaml, trials.csv and the plots there.
    """
    import optuna

    params = parse_space(space)
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise TuneError(f"tune: n_trials must be a positive integer or None, found {n_trials!r}")
    if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
        raise TuneError(f"tune: timeout must be positive seconds or None, found {timeout!r}")
    if n_trials is None and timeout is None:
        raise TuneError("tune: give n_trials or timeout (or both), or the search never ends")
    base_config = None
    if hasattr(objective_or_config, "run_trial") and hasattr(objective_or_config, "base_config"):
        base_config = dict(objective_or_config.base_config)
        run = objective_or_config.run_trial
        direction = direction or getattr(objective_or_config, "direction", "maximize")
    elif isinstance(objective_or_config, Mapping) or type(objective_or_config).__name__ == "TrainConfig":
        raise TuneError(
            "tune: a luoshu train config is tuned as a job: tune(luoshu.train.tune.TrainJob(config), "
            "space, ...) (or luoshu.train.tune.tune_job(config, space, ...))"
        )
    elif hasattr(objective_or_config, "fit") and hasattr(objective_or_config, "get_params"):
        known = objective_or_config.get_params()
        for p in params:
            if p.name not in known:
                raise TuneError(
                    f"tune: {type(objective_or_config).__name__} has no parameter {p.name!r} "
                    f"(its parameters: {', '.join(sorted(known))})"
                )
        run = _estimator_objective(objective_or_config, X, y, cv, scoring)
        direction = direction or "maximize"
    elif callable(objective_or_config):
        run = _function_objective(objective_or_config)
        direction = direction or "minimize"
    else:
        raise TuneError(
            f"tune: expected an objective function, a luoshu train config or an estimator, found "
            f"{type(objective_or_config).__name__}"
        )
    if direction not in ("minimize", "maximize"):
        raise TuneError(f"tune: direction must be 'minimize' or 'maximize', found {direction!r}")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=_storage(storage),
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=_pruner(pruner),
        study_name=study_name,
        direction=direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != direction:
        raise TuneError(
            f"tune: the stored study {study_name!r} maximises/minimises the other way "
            f"({study.direction.name.lower()}, asked {direction})"
        )

    def objective(trial):
        values = sample(params, trial)
        value = run(values, Reporter(trial), trial.number)
        value = float(value)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"objective value {value}")
        return value

    study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=())
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    counts = {s: states.count(s) for s in sorted(set(states))}
    if not counts.get("COMPLETE"):
        raise TuneError(
            f"tune: no trial of study {study_name!r} completed ({counts}); widen the space, run more "
            "trials or relax the pruner"
        )
    best = study.best_trial
    best_params = decode(params, best.params)
    result = TuneResult(
        study,
        params,
        best_params,
        float(best.value),
        apply(base_config, best_params) if base_config is not None else None,
        counts,
    )
    if out is not None:
        result.write(out)
    return result
