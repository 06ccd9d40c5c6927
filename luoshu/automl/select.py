"""Model selection: `select` searches the estimator families of `luoshu.ml` and the zoo's small MLPs, each
with its own space, under one time budget (one Optuna study whose first choice is the family), and refits the winner.

A family joins when `luoshu.ml` has its class (the tree and factorisation-machine families appear once
those estimators exist) and when the data suit it (multinomial naive Bayes needs non-negative features).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from luoshu.automl.space import Param, TuneError, parse_space, sample


@dataclass(frozen=True)
class Family:
    name: str
    estimator: str  # class name in luoshu.ml
    task: str  # "classification" or "regression"
    space: dict
    fixed: dict | None = None  # constructor arguments that are not searched
    needs_nonnegative: bool = False


_GBDT_SPACE = {
    "learning_rate": {"low": 0.02, "high": 0.3, "log": True},
    "num_leaves": {"type": "int", "low": 4, "high": 63},
    "n_estimators": {"type": "int", "low": 20, "high": 200, "log": True},
}
_MLP_SPACE = {
    "width": {"type": "int", "low": 16, "high": 256, "log": True},
    "n_layers": {"type": "int", "low": 1, "high": 3},
    "learning_rate": {"low": 1e-3, "high": 3e-2, "log": True},
}
_FOREST_SPACE = {
    "n_estimators": {"type": "int", "low": 20, "high": 200, "log": True},
    "max_features": {"low": 0.2, "high": 1.0},
    "min_samples_leaf": {"type": "int", "low": 1, "high": 20},
}

FAMILIES = [
    Family(
        "logistic_regression", "LogisticRegression", "classification", {"C": {"low": 1e-3, "high": 1e2, "log": True}}
    ),
    Family("linear_svc", "LinearSVC", "classification", {"C": {"low": 1e-3, "high": 1e2, "log": True}}),
    Family("gaussian_nb", "GaussianNB", "classification", {"var_smoothing": {"low": 1e-12, "high": 1e-2, "log": True}}),
    Family(
        "multinomial_nb",
        "MultinomialNB",
        "classification",
        {"alpha": {"low": 1e-3, "high": 10.0, "log": True}},
        needs_nonnegative=True,
    ),
    Family(
        "knn",
        "KNeighborsClassifier",
        "classification",
        {"n_neighbors": {"type": "int", "low": 1, "high": 30}, "weights": ["uniform", "distance"]},
    ),
    Family("gbdt", "GBDTClassifier", "classification", _GBDT_SPACE),
    Family("random_forest", "RandomForestClassifier", "classification", _FOREST_SPACE),
    Family("mlp", "MLPClassifier", "classification", _MLP_SPACE),
    Family("linear_regression", "LinearRegression", "regression", {}),
    Family("ridge", "Ridge", "regression", {"alpha": {"low": 1e-4, "high": 1e3, "log": True}}),
    Family("gbdt_regressor", "GBDTRegressor", "regression", _GBDT_SPACE),
    Family("random_forest_regressor", "RandomForestRegressor", "regression", _FOREST_SPACE),
    Family("mlp_regressor", "MLPRegressor", "regression", _MLP_SPACE),
]


def task_of(y) -> str:
    from sklearn.utils.multiclass import type_of_target

    kind = type_of_target(y)
    if kind in ("binary", "multiclass"):
        return "classification"
    if kind == "continuous":
        return "regression"
    raise TuneError(f"select: y must be class labels or a continuous target, found a {kind!r} target")


def _estimators() -> dict[str, type]:
    """Every estimator class of luoshu.ml by name (each submodule imported, so each class registered), and
    the zoo's MLPs (`luoshu.automl.mlp`)."""
    import importlib
    import pkgutil

    import luoshu.ml
    from luoshu.automl.mlp import MLPClassifier, MLPRegressor
    from luoshu.ml.base import REGISTRY

    for module in pkgutil.iter_modules(luoshu.ml.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"luoshu.ml.{module.name}")
    return {**REGISTRY, "MLPClassifier": MLPClassifier, "MLPRegressor": MLPRegressor}


def available(task: str, X, candidates="auto") -> list[tuple[Family, type, list[Param]]]:
    """(family, class, its parameters) for every family of `task` that luoshu.ml provides and X suits."""
    import scipy.sparse as sp

    values = X.data if sp.issparse(X) else np.asarray(X)
    nonnegative = values.size == 0 or values.min() >= 0
    known = {f.name: f for f in FAMILIES}
    if candidates != "auto":
        names = [candidates] if isinstance(candidates, str) else list(candidates)
        for n in names:
            if n not in known:
                raise TuneError(f"select: unknown candidate family {n!r}; families: {', '.join(sorted(known))}")
        chosen = [known[n] for n in names]
    else:
        chosen = [f for f in FAMILIES if f.task == task]
    out = []
    for family in chosen:
        cls = _estimators().get(family.estimator)
        if cls is None or family.task != task or (family.needs_nonnegative and not nonnegative):
            if candidates != "auto":
                raise TuneError(
                    f"select: family {family.name!r} cannot run here (luoshu.ml has "
                    f"{family.estimator}: {cls is not None}; it is for {family.task}, the task is {task})"
                )
            continue
        own = cls().get_params()
        space = {k: v for k, v in family.space.items() if k in own}
        out.append((family, cls, parse_space(space, family.name) if space else []))
    if not out:
        raise TuneError(f"select: no luoshu.ml family fits a {task} task here")
    return out


def select(
    X, y, candidates="auto", metric: str | None = None, time_budget: float = 60.0, cv: int = 3, seed: int | None = 0
) -> tuple[Any, list[dict]]:
    """Searches the families (and each one's hyper-parameters) by mean `cv`-fold `metric` (a scikit-learn
    scorer name; default accuracy / r2) for about `time_budget` seconds. Every family gets at least one trial
    (its default settings) before TPE decides where to spend the rest.

    Returns (the best configuration refitted on all of X, y; the leaderboard: one row per family, best
    first, with its best score, parameters, trials and mean fit seconds).
    """
    import optuna
    from sklearn.base import clone
    from sklearn.metrics import get_scorer
    from sklearn.model_selection import KFold, StratifiedKFold

    from luoshu.ml.base import check_X_y

    if not (isinstance(time_budget, int | float) and time_budget > 0):
        raise TuneError(f"select: time_budget must be positive seconds, found {time_budget!r}")
    task = task_of(np.asarray(y))
    X, y = check_X_y(Selection(), X, y)
    families = available(task, X, candidates)
    metric = metric or ("accuracy" if task == "classification" else "r2")
    try:
        scorer = get_scorer(metric)
    except ValueError as exc:
        raise TuneError(f"select: unknown metric {metric!r}: {exc}") from None
    splitter = (StratifiedKFold if task == "classification" else KFold)(cv, shuffle=True, random_state=0)
    folds = list(splitter.split(X, y))
    by_name = {f.name: (f, cls, params) for f, cls, params in families}
    board: dict[str, dict] = {
        f.name: {
            "family": f.name,
            "estimator": f.estimator,
            "score": -math.inf,
            "params": None,
            "trials": 0,
            "failed": 0,
            "fit_seconds": 0.0,
        }
        for f, _, _ in families
    }

    def objective(trial):
        name = trial.suggest_categorical("family", list(by_name))
        family, cls, params = by_name[name]
        values = sample(
            [Param(f"{name}.{p.name}", p.kind, p.low, p.high, p.log, p.step, p.choices) for p in params], trial
        )
        kwargs = {k.split(".", 1)[1]: v for k, v in values.items()}
        row = board[name]
        row["trials"] += 1
        scores, tick = [], time.perf_counter()
        try:
            for train, test in folds:
                est = cls(**(family.fixed or {}), **kwargs).fit(X[train], y[train])
                scores.append(scorer(est, X[test], y[test]))
        except (ValueError, ArithmeticError, RuntimeError) as exc:  # a setting this data cannot take
            row["failed"] += 1
            raise optuna.TrialPruned(f"{name} {kwargs}: {exc}") from None
        row["fit_seconds"] += (time.perf_counter() - tick) / len(folds)
        score = float(np.mean(scores))
        if score > row["score"]:
            row["score"], row["params"] = score, kwargs
        return score

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    # every family's default settings first (in FAMILIES' order: the quick ones first, so a short budget
    # still sees them), then TPE over the families and their spaces
    start = time.perf_counter()
    for name in by_name:
        family, cls, params = by_name[name]
        defaults = cls().get_params()
        fixed = {f"{name}.{p.name}": _clip(p, defaults[p.name]) for p in params}
        study.enqueue_trial({"family": name, **{k: v for k, v in fixed.items() if v is not None}})
    study.optimize(objective, timeout=max(time_budget - (time.perf_counter() - start), 1e-3))
    rows = sorted((r for r in board.values() if r["params"] is not None), key=lambda r: -r["score"])
    if not rows:
        raise TuneError(f"select: no family could be fitted within {time_budget} s")
    for r in board.values():
        if r["params"] is None:
            rows.append(r)
    for r in rows:
        r["fit_seconds"] = r["fit_seconds"] / max(r["trials"] - r["failed"], 1)
        if r["params"] is None:
            r["score"] = None  # never fitted within the budget
    best = rows[0]
    family, cls, _ = by_name[best["family"]]
    estimator = clone(cls(**(family.fixed or {}), **best["params"])).fit(X, y)
    return estimator, rows


def _clip(p: Param, value):
    """A family's default value, kept inside the searched range (categorical: as is when a choice); None
    when the default is not in the space's terms (e.g. max_features="sqrt" for a fraction): TPE samples it."""
    if p.kind == "categorical":
        return value if value in p.choices else p.choices[0]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = min(max(value, p.low), p.high)
    return int(value) if p.kind == "int" else float(value)


class Selection(BaseEstimator):
    """Stands for `select` in input validation (whose messages name the estimator they validate)."""
