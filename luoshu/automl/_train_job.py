"""The bridge from `tune` to a `luoshu train` job: a `Trainer` whose evaluations report to the trial.

`luoshu.train` is the jobs layer, above `luoshu.automl` (DESIGN §1); tuning a training job is the one place
automl needs it, so it is imported here, inside the functions, only when a job is tuned. Nothing in
`luoshu.train` changes: the hook is an override of the public `Trainer.evaluate`, which `fit` calls at every
evaluation step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from luoshu.automl.space import TuneError


def first_metric(config: Mapping[str, Any]) -> str:
    """The metric `luoshu train` reports first for this job's task (accuracy, auc, ...)."""
    from luoshu.train import TASKS, TrainConfig, resolve

    task, _ = resolve(TrainConfig.from_dict(dict(config), "tune"))
    return TASKS[task].metrics[0]


def reporting_trainer(values: Mapping[str, Any], metric: str, report: Callable[[float, int], None],
                      source: str) -> float:
    """Trains the job; `report(metrics[metric], step)` after every evaluation (it raises to prune)."""
    from luoshu.train import TrainConfig, Trainer

    class ReportingTrainer(Trainer):
        def evaluate(self) -> dict[str, float]:
            metrics = super().evaluate()
            if metric not in metrics:
                raise TuneError(f"tune: the job reports {sorted(metrics)}, not the metric {metric!r}")
            report(metrics[metric], self.step)
            return metrics

    metrics = ReportingTrainer(TrainConfig.from_dict(dict(values), source)).fit()
    return float(metrics[metric])
