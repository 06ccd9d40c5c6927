"""What a job's names build: zoo models (through `luoshu.models.MODELS` / `build`), optimizers (`OPTIMIZERS`) and
their learning-rate schedules."""

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
    """Refuses a `model_args` key that zoo model `name`'s config class has no field for, and a value
    that does not have the field's type (from its annotation) or is out of range for it."""
    config_class = MODELS[name][0]
    fields = config_fields(config_class)
    unknown = sorted(set(model_args) - set(fields))
    if unknown:
        raise TrainConfigError(f"model {name!r} has no config field {unknown[0]!r}{suggestion(unknown[0], fields)}; "
                               f"its fields ({config_class.__name__}): {', '.join(fields)}")
    for key, value in model_args.items():
        expected = _field_expectation(key, str(fields[key].type), fields[key].default)
        if expected is not None and not expected[0](value):
            raise TrainConfigError(f"model arg {key}={value!r} for {name!r}: expected {expected[1]}, found "
                                   f"{type(value).__name__} {value!r}")


def _is_int(v, low: int | None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v  # not NaN


def _field_expectation(key: str, annotation: str, default=None):
    """(check, words) for a model config field from its annotation, or None for types not checked here.

    Counts and sizes are integers, never negative (sizes positive, unless the field's own default is 0,
    which then means "none"); widths in a tuple are positive; an id field (`padding_idx`, `pad_id`) may
    be any integer; `dropout` is a fraction in [0, 1)."""
    optional = annotation.replace(" ", "").endswith("|None")
    base = annotation.replace(" ", "").removesuffix("|None")
    check = words = None
    if base == "bool":
        check, words = (lambda v: isinstance(v, bool)), "true or false"
    elif base == "int":
        low = None if "pad" in key else (1 if key.endswith(("_dim", "_size", "heads", "head", "classes", "width"))
                                         or key in ("hidden", "depth", "dim", "embd", "n_embd") else 0)
        if low == 1 and default == 0:
            low = 0
        check = lambda v: _is_int(v, low)  # noqa: E731
        words = "an integer" if low is None else ("a positive integer" if low == 1 else "a non-negative integer")
    elif base == "float":
        if "dropout" in key:
            check, words = (lambda v: _is_number(v) and 0 <= v < 1), "a number in [0, 1)"
        elif key.endswith(("eps", "theta", "range")):
            check, words = (lambda v: _is_number(v) and v > 0), "a positive number"
        else:
            check, words = _is_number, "a number"
    elif base == "str":
        check, words = (lambda v: isinstance(v, str)), "a string"
    elif base in ("tuple[int,...]", "list[int]"):
        check = lambda v: isinstance(v, list | tuple) and all(_is_int(x, 1) for x in v)  # noqa: E731
        words = "a list of positive integers, e.g. [256, 128]"
    if check is None:
        return None
    if optional:
        return (lambda v: v is None or check(v)), f"{words} or null"
    return check, words


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


def build_scheduler(config: TrainConfig, optimizer: Optimizer, total_steps: int):
    """The learning-rate schedule `config` names over `total_steps` (None: a constant rate), stepped
    once per training step by every job (the plain trainer and the hot-switching one alike)."""
    if config.lr_schedule == "cosine":
        if config.warmup_steps >= total_steps:
            raise TrainConfigError(f"warmup_steps {config.warmup_steps} must be below the {total_steps} training steps")
        return optim.CosineWarmup(optimizer, config.warmup_steps, total_steps)
    if config.warmup_steps:
        return optim.LinearWarmup(optimizer, config.warmup_steps)
    return None
