"""What a job's names build: zoo models (through `luoshu.models.MODELS` / `build`) and optimizers (`OPTIMIZERS`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from luoshu import optim
from luoshu.models import MODELS, build
from luoshu.nn.module import Module
from luoshu.optim import Optimizer
from luoshu.train.errors import TrainConfigError, suggestion

if TYPE_CHECKING:  # config.py imports this module to check a config's names against the tables
    from luoshu.train.config import TrainConfig

# --- models -------------------------------------------------------------------------------------------


def model_table() -> dict[str, tuple[type, type, str]]:
    """The model zoo's registry: name -> (ConfigClass, ModelClass, task)."""
    return dict(MODELS)


def config_fields(config_class: type) -> dict[str, dataclasses.Field]:
    """The fields of a zoo model's config class, by name."""
    return {f.name: f for f in dataclasses.fields(config_class)}


def check_model_args(name: str, model_args: Mapping[str, Any]) -> None:
    """Refuses a `model_args` key that zoo model `name`'s config class has no field for."""
    config_class = MODELS[name][0]
    fields = config_fields(config_class)
    unknown = sorted(set(model_args) - set(fields))
    if unknown:
        raise TrainConfigError(f"model {name!r} has no config field {unknown[0]!r}{suggestion(unknown[0], fields)}; "
                               f"its fields ({config_class.__name__}): {', '.join(fields)}")


def build_model(name: str, dataset_info: Mapping[str, Any], model_args: Mapping[str, Any],
                min_info: Mapping[str, Any] | None = None) -> tuple[Module, Any]:
    """Builds zoo model `name` with the config fields the dataset decides filled in: `dataset_info`
    fields (classes, channels, slots ...) must match, `min_info` fields (vocabulary, sequence length,
    table sizes) may be larger. The rest comes from `model_args`; returns (model, config)."""
    check_model_args(name, model_args)
    fields = config_fields(MODELS[name][0])
    kwargs = {}
    for key, value in dataset_info.items():
        if key not in fields:
            continue
        given = model_args.get(key)
        if given is not None and _normalise(given) != _normalise(value):
            raise TrainConfigError(f"model arg {key}={given!r} does not fit the dataset, which needs {key}={value!r}")
        kwargs[key] = value
    for key, value in (min_info or {}).items():
        if key not in fields:
            continue
        given = model_args.get(key)
        if given is not None and not _at_least(given, value):
            raise TrainConfigError(f"model arg {key}={given!r} is too small for the dataset, which needs "
                                   f"{key} >= {value!r}")
        kwargs[key] = value
    kwargs.update(model_args)
    model = build(name, **kwargs)  # refuses a bad field value with a luoshu.Error
    return model, getattr(model, "config", None)


def _at_least(given, needed) -> bool:
    if isinstance(needed, list | tuple):
        return isinstance(given, list | tuple) and len(given) == len(needed) and all(
            _at_least(g, n) for g, n in zip(given, needed))
    return isinstance(given, int | float) and given >= needed


def _normalise(value):
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    return value


# --- optimizers ---------------------------------------------------------------------------------------

OPTIMIZERS: tuple[str, ...] = tuple(optim.OPTIMIZERS)  # the names a config may give, in the order --help lists


def build_optimizer(config: TrainConfig, params: Iterable) -> Optimizer:
    """The optimizer `config` names over `params`, with its lr, weight decay, clipping and extra arguments."""
    cls = optim.OPTIMIZERS[config.optimizer]
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay, **config.optimizer_args}
    if config.max_grad_norm is not None:
        kwargs["max_grad_norm"] = config.max_grad_norm
    try:
        return cls(params, **kwargs)
    except TypeError as exc:
        raise TrainConfigError(f"optimizer {config.optimizer!r} ({cls.__name__}): bad arguments "
                               f"{config.optimizer_args}: {exc}") from None
