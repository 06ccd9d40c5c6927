"""Search spaces: parsing a space mapping (YAML/JSON/dict) into parameters, sampling them from an Optuna trial,
and applying sampled values to a (nested) config.

A space maps a parameter name to its range. Dotted names reach into nested mappings of the config
(``model_args.hidden``). Forms::

    lr: {type: float, low: 1.0e-4, high: 0.1, log: true}
    batch_size: {type: int, low: 64, high: 512, step: 64}
    optimizer: [adam, sgd]              # a list: one of these values
    model_args.hidden: {choices: [[64], [128, 64]]}
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from luoshu.core.errors import Error


class TuneError(Error, ValueError):
    """A search space, objective or study that cannot be used (names the parameter or setting at fault)."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "float", "int" or "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, _hashable(self.choices))


def _hashable(choices: tuple) -> list:
    """Optuna's categorical values must be None/bool/int/float/str: lists and mappings go as their repr."""
    return [c if c is None or isinstance(c, bool | int | float | str) else repr(c) for c in choices]


def _number(name: str, key: str, value) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TuneError(f"search space: {name}.{key} must be a number, found {value!r}")
    return value


def parse_space(space: Mapping[str, Any], source: str = "search space") -> list[Param]:
    """The parameters of a space mapping, validated (a bad range names its parameter)."""
    if not isinstance(space, Mapping) or not space:
        raise TuneError(f"{source}: expected a non-empty mapping of parameter -> range, found {space!r}")
    params = []
    for name, spec in space.items():
        name = str(name)
        if isinstance(spec, list | tuple):
            spec = {"choices": list(spec)}
        if not isinstance(spec, Mapping):
            raise TuneError(
                f"{source}: {name} must be a list of choices or a mapping with type/low/high, found {spec!r}"
            )
        unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
        if unknown:
            raise TuneError(
                f"{source}: {name} has unknown keys {sorted(unknown)} (known: type, low, high, log, step, choices)"
            )
        if "choices" in spec:
            choices = tuple(spec["choices"])
            if not choices:
                raise TuneError(f"{source}: {name} has an empty list of choices")
            params.append(Param(name, "categorical", choices=choices))
            continue
        kind = spec.get("type", "float")
        if kind not in ("float", "int"):
            raise TuneError(f"{source}: {name}.type must be 'float' or 'int' (or give choices), found {kind!r}")
        if "low" not in spec or "high" not in spec:
            raise TuneError(f"{source}: {name} needs both low and high")
        low, high = _number(name, "low", spec["low"]), _number(name, "high", spec["high"])
        log = bool(spec.get("log", False))
        step = None if spec.get("step") is None else _number(name, "step", spec["step"])
        if not low < high:
            raise TuneError(f"{source}: {name} needs low < high, found low={low}, high={high}")
        if log and low <= 0:
            raise TuneError(f"{source}: {name} on a log scale needs low > 0, found {low}")
        if log and step is not None:
            raise TuneError(f"{source}: {name} cannot have both log and step")
        params.append(Param(name, kind, low, high, log, step))
    return params


def sample(params: list[Param], trial) -> dict[str, Any]:
    """One value per parameter from the trial (categorical values mapped back from their repr)."""
    values = {}
    for p in params:
        v = p.suggest(trial)
        if p.kind == "categorical":
            v = p.choices[_hashable(p.choices).index(v)]
        values[p.name] = v
    return values


def decode(params: list[Param], stored: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's stored params (as Optuna keeps them) back to the space's values."""
    out = {}
    for p in params:
        if p.name not in stored:
            continue
        v = stored[p.name]
        out[p.name] = p.choices[_hashable(p.choices).index(v)] if p.kind == "categorical" else v
    return out


def apply(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict:
    """A deep copy of config with each dotted name set (nested mappings created as needed)."""
    out = copy.deepcopy(dict(config))
    for name, value in values.items():
        node = out
        parts = name.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise TuneError(f"search space: {name} reaches into {part!r}, which is {child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    return out
