"""Hyper-parameter search over `luoshu train` jobs: `TrainJob`, the job side of `luoshu.automl.tune`.

automl (a domain package) sits below the jobs layer (DESIGN §1), so it never imports `luoshu.train`;
a `TrainJob` brings the job to it instead, through automl's job protocol (`base_config`, `direction`,
`run_trial`). Each trial trains the job with the sampled settings in its own directory; the hook that
feeds the pruner is an override of the public `Trainer.evaluate`, which `fit` calls at every evaluation
step — nothing else in the trainer changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from luoshu.automl import TuneError, TuneResult, apply_values, direction_of, tune
from luoshu.train.config import TrainConfig, check_config
from luoshu.train.tasks import TASKS
from luoshu.train.trainer import Trainer


class TrainJob:
    """A `luoshu train` job (a `TrainConfig` or a config mapping) as an objective of `luoshu.automl.tune`.

    metric: the eval metric to optimise (default: the task's first, e.g. accuracy or auc; lower-is-better
    names such as *loss*/perplexity are minimised). Trials write under `out` (trial-NNNN directories).
    """

    def __init__(
        self, config: TrainConfig | Mapping[str, Any], metric: str | None = None, out: str | Path = "runs/tune"
    ):
        values = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
        base = TrainConfig.from_dict(values, "tune job")  # refuse a bad job before any trial
        task, _ = check_config(base)
        self.base_config = values
        self.metric = metric or TASKS[task].metrics[0]
        if self.metric not in TASKS[task].metrics:
            raise TuneError(f"tune: a {task} job reports {list(TASKS[task].metrics)}, not {self.metric!r}")
        self.direction = direction_of(self.metric)
        self.out = Path(out)

    def run_trial(self, params: Mapping[str, Any], report: Callable[[float, int], None], number: int) -> float:
        """Trains the job with `params` applied; `report(metric, step)` after every evaluation (it raises
        Optuna's TrialPruned to stop the trial)."""
        values = apply_values(self.base_config, params)
        values.update(out=str(self.out / f"trial-{number:04d}"), progress=False, resume=False)
        values.pop("checkpoint_dir", None)
        metric = self.metric

        class ReportingTrainer(Trainer):
            def evaluate(self) -> dict[str, float]:
                metrics = super().evaluate()
                report(metrics[metric], self.step)
                return metrics

        return float(ReportingTrainer(TrainConfig.from_dict(values, f"trial {number}")).fit()[metric])


def tune_job(
    config: TrainConfig | Mapping[str, Any],
    space: Mapping[str, Any],
    n_trials: int | None = 20,
    timeout: float | None = None,
    storage=None,
    *,
    metric: str | None = None,
    out: str | Path = "runs/tune",
    **kwargs,
) -> TuneResult:
    """`luoshu.automl.tune(TrainJob(config, metric, out), space, ...)`, writing results to `out`."""
    return tune(TrainJob(config, metric, out), space, n_trials, timeout, storage, out=out, **kwargs)
