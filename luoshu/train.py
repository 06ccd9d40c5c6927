"""Training from a config: the dataset and task tables, `TrainConfig`, and the define-and-run `Trainer`
behind `luoshu train`.

A job is a model from the zoo (`luoshu.models.MODELS`), a dataset from `DATASETS` and an optimizer from
`OPTIMIZERS`. The model's task ("image", "sequence", "seq2seq", "lm", "ctr", "rating") picks the inputs,
the loss and the eval metrics (`TASKS`). The trainer records one define-and-run graph (a training branch
and an eval branch that share the parameters), runs it over seeded, prefetched batches with a progress
bar, and writes `metrics.csv`, a TensorBoard event file and checkpoints in the core's package format
under the job directory. A checkpoint holds the model, the optimizer and the training position (step,
epoch, batch, random-generator and scheduler state), so `resume=True` continues at the same step and,
the data order being seeded, reaches the same parameters as a run that was never interrupted.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import difflib
import itertools
import json
import math
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from luoshu.core.errors import CheckpointError, Error

if TYPE_CHECKING:
    from luoshu.core.tensor import Tensor
    from luoshu.nn.module import Module
    from luoshu.optim import Optimizer

# --- errors and config --------------------------------------------------------------------------------


class TrainConfigError(Error, ValueError):
    """A training job that cannot run as configured: an unknown model, dataset, optimizer or key, a
    missing data path, a model that does not fit the dataset's task, a bad value, nothing to resume."""


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class TrainConfig:
    """Everything a training job needs; `luoshu train` fills it from a YAML/JSON file and flags."""

    model: str = "dcn"
    model_args: dict = field(default_factory=dict)  # overrides of the model's config fields
    dataset: str = "synthetic-ctr"
    data_path: str | None = None
    data_args: dict = field(default_factory=dict)  # dataset options (sizes, split, ...)
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer_args: dict = field(default_factory=dict)  # e.g. momentum, betas, eps
    lr_schedule: str = "constant"  # "constant" or "cosine" (to 0 at the last step)
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    precision: str = "fp32"  # "bf16" / "fp16": autocast with fp32 master weights (fp16 adds loss scaling)
    epochs: int = 3
    max_steps: int | None = None  # stops after this many steps (caps `epochs`)
    batch_size: int = 512
    eval_batch_size: int | None = None  # default: 4 x batch_size
    eval_interval: int = 0  # steps between evaluations; 0: at the end of every epoch (and always at the end)
    checkpoint_interval: int | None = None  # steps between checkpoints; default: at every evaluation
    keep_checkpoints: int = 3  # newest checkpoints kept in the checkpoint dir; 0 keeps all
    log_interval: int = 10  # steps between train-loss points in TensorBoard
    device: str = "cpu"
    seed: int = 0
    out: str | None = None  # the job directory; default runs/<model>-<dataset>
    checkpoint_dir: str | None = None  # default <out>/checkpoints
    resume: bool = False
    num_workers: int = 1  # background threads preparing batches
    progress: bool = True

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Builds a config from a mapping, refusing unknown keys (with a suggestion)."""
        if not isinstance(values, Mapping):
            raise TrainConfigError(f"{source}: expected a mapping of settings, found {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TrainConfigError(f"{source}: unknown setting {unknown[0]!r}{_suggest(unknown[0], names)}; "
                                   f"known settings: {', '.join(sorted(names))}")
        for name in ("lr", "weight_decay", "max_grad_norm"):
            # YAML 1.1 reads 3e-4 (no dot) as a string
            if isinstance(values.get(name), str):
                try:
                    values[name] = float(values[name])
                except ValueError:
                    pass  # validate() names the bad value
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        def check(name, ok, expected):
            if not ok:
                raise TrainConfigError(f"{source}: {name} must be {expected}, found {getattr(self, name)!r}")

        def is_int(v, low):
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        for name in ("model", "dataset", "optimizer", "device", "lr_schedule"):
            check(name, isinstance(getattr(self, name), str), "a string")
        for name in ("model_args", "data_args", "optimizer_args"):
            check(name, isinstance(getattr(self, name), dict), "a mapping")
        check("lr", isinstance(self.lr, int | float) and not isinstance(self.lr, bool) and self.lr > 0,
              "a positive number")
        check("weight_decay", isinstance(self.weight_decay, int | float) and self.weight_decay >= 0,
              "a non-negative number")
        check("epochs", is_int(self.epochs, 1), "a positive integer")
        check("max_steps", self.max_steps is None or is_int(self.max_steps, 1), "a positive integer")
        check("batch_size", is_int(self.batch_size, 1), "a positive integer")
        check("eval_batch_size", self.eval_batch_size is None or is_int(self.eval_batch_size, 1),
              "a positive integer")
        check("eval_interval", is_int(self.eval_interval, 0), "a non-negative integer")
        check("checkpoint_interval", self.checkpoint_interval is None or is_int(self.checkpoint_interval, 0),
              "a non-negative integer (0: only at the end)")
        check("keep_checkpoints", is_int(self.keep_checkpoints, 0), "a non-negative integer")
        check("log_interval", is_int(self.log_interval, 1), "a positive integer")
        check("warmup_steps", is_int(self.warmup_steps, 0), "a non-negative integer")
        check("num_workers", is_int(self.num_workers, 0), "a non-negative integer")
        check("seed", is_int(self.seed, 0), "a non-negative integer")
        check("lr_schedule", self.lr_schedule in ("constant", "cosine"), "'constant' or 'cosine'")
        check("precision", self.precision in ("fp32", "bf16", "fp16"), "'fp32', 'bf16' or 'fp16'")
        check("max_grad_norm", self.max_grad_norm is None or (isinstance(self.max_grad_norm, int | float)
                                                             and self.max_grad_norm > 0), "a positive number")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def job_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"{self.model}-{self.dataset}"

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else self.job_dir / "checkpoints"


# `luoshu train` with no config file, model or dataset: DCN (small towers) on 100k generated click logs,
# three epochs; it reaches an eval AUC of about 0.82 in about ten seconds on two cores.
DEFAULT_JOB = {"model": "dcn", "dataset": "synthetic-ctr", "optimizer": "adam", "lr": 1e-3, "epochs": 3,
               "batch_size": 512, "model_args": {"embedding_dim": 8, "mlp_dims": [256, 128], "num_cross_layers": 3},
               "data_args": {"num_samples": 100_000, "eval_samples": 20_000}}


def load_config(path: str | Path) -> dict:
    """Reads a YAML or JSON config file into a dict (YAML's safe loader: no Python objects)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise TrainConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                               f"{exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise TrainConfigError(f"config file {path}: expected a mapping of settings at the top, "
                               f"found {type(values).__name__}")
    return values


# --- models -------------------------------------------------------------------------------------------

def model_table() -> dict[str, tuple[type, type, str]]:
    """The model zoo's registry: name -> (ConfigClass, ModelClass, task)."""
    from luoshu.models import MODELS

    return dict(MODELS)


def _config_fields(config_class: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_class)}


def build_model(name: str, dataset_info: Mapping[str, Any], model_args: Mapping[str, Any],
                min_info: Mapping[str, Any] | None = None) -> tuple[Module, Any]:
    """Builds zoo model `name` with the config fields the dataset decides filled in: `dataset_info`
    fields (classes, channels, slots ...) must match, `min_info` fields (vocabulary, sequence length,
    table sizes) may be larger. The rest comes from `model_args`; returns (model, config)."""
    table = model_table()
    config_class = table[name][0]
    fields = _config_fields(config_class)
    unknown = sorted(set(model_args) - set(fields))
    if unknown:
        raise TrainConfigError(f"model {name!r} has no config field {unknown[0]!r}{_suggest(unknown[0], fields)}; "
                               f"its fields ({config_class.__name__}): {', '.join(fields)}")
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
    from luoshu.models import build

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

def _optimizers() -> dict[str, Callable]:
    from luoshu import optim

    return {"sgd": optim.SGD, "momentum": optim.Momentum, "nesterov": optim.Nesterov, "adam": optim.Adam,
            "adamw": optim.AdamW, "adagrad": optim.AdaGrad, "rmsprop": optim.RMSProp, "lamb": optim.LAMB}


OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "adagrad", "rmsprop", "lamb")


def build_optimizer(config: TrainConfig, params) -> Optimizer:
    table = _optimizers()
    cls = table[config.optimizer]
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay, **config.optimizer_args}
    if config.max_grad_norm is not None:
        kwargs["max_grad_norm"] = config.max_grad_norm
    try:
        return cls(params, **kwargs)
    except TypeError as exc:
        raise TrainConfigError(f"optimizer {config.optimizer!r} ({cls.__name__}): bad arguments "
                               f"{config.optimizer_args}: {exc}") from None


# --- datasets -----------------------------------------------------------------------------------------

@dataclass
class DataSplits:
    """A dataset ready for a task: train and eval arrays (dicts of equal-length NumPy arrays, keyed by
    the task's input names), what the model config must say (`info`, exactly; `min_info`, at least)
    and a per-batch transform `transform(batch, rng, train)` (rng: seeded per batch, so random
    augmentation and masking are reproducible and resume exactly)."""

    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    info: dict[str, Any]  # config fields the data fixes (classes, channels, dense features)
    transform: Callable[[dict, np.random.Generator, bool], dict] | None = None
    min_info: dict[str, Any] = field(default_factory=dict)  # fields the data bounds below (vocabulary, length)
    # Data too large for memory: `train_stream(epoch, batch_size)` yields the training batches of one
    # pass (full batches only; `train` is then empty) and `stream_rows` is the rows per pass, if known.
    train_stream: Callable[[int, int], Iterable[dict]] | None = None
    stream_rows: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    tasks: tuple[str, ...]
    needs_path: bool
    load: Callable[[str | None, dict, str], DataSplits]  # (path, data_args, task) -> splits
    help: str


def _args(data_args: Mapping, dataset: str, defaults: dict) -> dict:
    unknown = sorted(set(data_args) - set(defaults))
    if unknown:
        raise TrainConfigError(f"dataset {dataset!r} has no option {unknown[0]!r}{_suggest(unknown[0], defaults)}; "
                               f"its options: {', '.join(f'{k}={v!r}' for k, v in defaults.items())}")
    return {**defaults, **data_args}


def _split(arrays: dict[str, np.ndarray], eval_fraction: float, seed: int, shuffle: bool = True):
    n = len(next(iter(arrays.values())))
    if not 0 < eval_fraction < 1:
        raise TrainConfigError(f"eval_fraction must be in (0, 1), found {eval_fraction}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    cut = n - max(1, int(round(n * eval_fraction)))
    train, held = order[:cut], order[cut:]
    return {k: v[train] for k, v in arrays.items()}, {k: v[held] for k, v in arrays.items()}


def _image_splits(train_images, train_labels, eval_images, eval_labels, num_classes, mean, std,
                  augment: bool = False) -> DataSplits:
    """uint8/float images (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W), normalised per batch; with
    `augment`, training batches get the usual CIFAR augmentation (random crop with 4 pixels of zero
    padding, horizontal flip)."""
    def nchw(images):
        return images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)

    train_images, eval_images = nchw(train_images), nchw(eval_images)
    channels, size = train_images.shape[1], train_images.shape[2]
    scale = np.float32(255.0) if train_images.dtype == np.uint8 else np.float32(1.0)
    mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)

    def transform(batch, rng, train):
        images = (batch["image"].astype(np.float32) / scale - mean) / std
        if augment and train:
            images = _crop_and_flip(images, rng)
        return {**batch, "image": images}

    info = {"num_classes": num_classes, "in_channels": channels, "image_size": size,
            "in_features": channels * size * train_images.shape[3]}
    return DataSplits({"image": train_images, "label": train_labels}, {"image": eval_images, "label": eval_labels},
                      info, transform)


def _crop_and_flip(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    n, _, h, w = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))  # zero = the mean after normalising
    top, left = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    rows = top[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = left[:, None] + np.arange(w)[None, :]
    flip = rng.random(n) < 0.5
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None, None], np.arange(images.shape[1])[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def _load_digits(path, data_args, task):
    from luoshu.data import load_digits

    a = _args(data_args, "digits", {"eval_fraction": 0.2, "split_seed": 0})
    x, y = load_digits(images=True)
    train, held = _split({"image": x, "label": y}, a["eval_fraction"], a["split_seed"])
    return _image_splits(train["image"], train["label"], held["image"], held["label"], 10, [0.3], [0.4])


def _load_mnist(path, data_args, task):
    from luoshu.data import MNIST

    _args(data_args, "mnist", {})
    train, test = MNIST(path, train=True), MNIST(path, train=False)
    return _image_splits(train.images, train.labels, test.images, test.labels, 10, [0.1307], [0.3081])


def _load_cifar(classes: int):
    def load(path, data_args, task):
        from luoshu.data import CIFAR10, CIFAR100

        if classes == 10:
            a = _args(data_args, "cifar10", {"augment": True})
            train, test = CIFAR10(path, train=True), CIFAR10(path, train=False)
        else:
            a = _args(data_args, "cifar100", {"label": "fine", "augment": True})
            train, test = CIFAR100(path, True, a["label"]), CIFAR100(path, False, a["label"])
        num_classes = 10 if classes == 10 else 100 if a["label"] == "fine" else 20
        return _image_splits(train.images, train.labels, test.images, test.labels, num_classes,
                             [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616], a["augment"])
    return load


def _ctr_arrays(data: dict, log_dense: bool = True) -> dict[str, np.ndarray]:
    """CTR columns for the models: missing dense values 0 and counts log-scaled (as DLRM's preprocessing)."""
    dense = np.nan_to_num(np.asarray(data["dense"], np.float32))
    return {"dense": np.log1p(np.maximum(dense, 0)) if log_dense else dense,
            "sparse": np.asarray(data["sparse"], np.int64), "label": np.asarray(data["label"], np.float32)}


def _ctr_splits(train: dict, held: dict, slot_sizes) -> DataSplits:
    train, held = _ctr_arrays(train), _ctr_arrays(held)
    sparse = np.concatenate([train["sparse"], held["sparse"]])
    sizes = np.asarray(slot_sizes, np.int64)
    if sparse.shape[1] != len(sizes) or (sparse.size and (sparse.min() < 0 or np.any(sparse.max(0) >= sizes))):
        raise TrainConfigError(f"the CTR ids do not fit the slot sizes {sizes.tolist()}: expected "
                               f"{len(sizes)} slots with ids in [0, size), found {sparse.shape[1]} slots with ids in "
                               f"[{sparse.min(initial=0)}, {sparse.max(initial=0)}]")
    return DataSplits(train, held, {"dense_dim": int(train["dense"].shape[1])},
                      min_info={"slot_sizes": sizes.tolist()})


def _tail_split(data: dict, eval_fraction: float) -> tuple[dict, dict]:
    """The last `eval_fraction` of the rows as the eval set: click logs are in time order, so this
    scores the model on later clicks than it trained on, as the usual day-based split does."""
    if not 0 < eval_fraction < 1:
        raise TrainConfigError(f"eval_fraction must be in (0, 1), found {eval_fraction}")
    n = len(data["label"])
    if n < 2:
        raise TrainConfigError(f"the data holds {n} rows; need at least 2 to train and evaluate")
    cut = n - max(1, int(round(n * eval_fraction)))
    return {k: v[:cut] for k, v in data.items()}, {k: v[cut:] for k, v in data.items()}


def _load_synthetic_ctr(path, data_args, task):
    from luoshu.data import synthetic_ctr

    a = _args(data_args, "synthetic-ctr", {"num_samples": 100_000, "eval_samples": 20_000, "dense_dim": 13,
                                           "num_slots": 26, "max_slot_size": 1000, "slot_sizes": None,
                                           "dist": "uniform", "seed": 0})
    slot_sizes = a["slot_sizes"] or [int(v) for v in np.geomspace(4, max(a["max_slot_size"], 4), a["num_slots"])
                                     .round()]
    total = a["num_samples"] + a["eval_samples"]
    data = synthetic_ctr(total, dense_dim=a["dense_dim"], slot_sizes=slot_sizes, dist=a["dist"], seed=a["seed"])
    if a["eval_samples"] < 1 or a["num_samples"] < 1:
        raise TrainConfigError("dataset 'synthetic-ctr': num_samples and eval_samples must be at least 1")
    train = {k: v[:a["num_samples"]] for k, v in data.items()}
    held = {k: v[a["num_samples"]:] for k, v in data.items()}
    return _ctr_splits(train, held, slot_sizes)


def _files(path, pattern: str) -> list[Path]:
    files = sorted(p for p in Path(path).glob(pattern) if p.is_file()) if Path(path).is_dir() else [Path(path)]
    if not files:
        raise TrainConfigError(f"no {pattern} files in {path}")
    return files


def _stream_files(path, a: dict, dataset: str, pattern: str) -> tuple[list[Path], list[Path]]:
    """(train files, eval files) for streaming: `eval_path`, or else the last file of a directory
    (as Criteo's last day is its test set)."""
    files = _files(path, pattern)
    if a["eval_path"] is not None:
        return files, _files(a["eval_path"], pattern)
    if len(files) < 2:
        raise TrainConfigError(f"dataset {dataset!r} with stream=true needs eval data: give --data-arg eval_path=FILE, "
                               f"or a directory of several files (the last one is held out); found {files}")
    return files[:-1], files[-1:]


def _load_criteo(path, data_args, task):
    """Criteo TSV: read into memory and split (the last `eval_fraction` of rows held out), or with
    `stream=true` read in chunks while training (for files larger than memory; needs --max-steps)."""
    from luoshu.data import CriteoDataset, read_criteo

    a = _args(data_args, "criteo", {"num_buckets": 10_000, "eval_fraction": 0.1, "stream": False,
                                    "eval_path": None})
    if not a["stream"]:
        data = read_criteo(path, num_buckets=a["num_buckets"])
        buckets = np.broadcast_to(np.asarray(a["num_buckets"]), (data["sparse"].shape[1],))
        return _ctr_splits(*_tail_split(data, a["eval_fraction"]), buckets)
    train_files, eval_files = _stream_files(path, a, "criteo", "*")
    held = read_criteo(eval_files[0], num_buckets=a["num_buckets"]) if len(eval_files) == 1 else \
        _concat_ctr([read_criteo(f, num_buckets=a["num_buckets"]) for f in eval_files])
    buckets = np.broadcast_to(np.asarray(a["num_buckets"]), (held["sparse"].shape[1],))
    splits = _ctr_splits({k: v[:0] for k, v in held.items()}, held, buckets)

    def stream(epoch: int, batch_size: int):
        # Criteo is in time order: every pass reads the files in order, unshuffled
        return (_ctr_arrays(b) for b in CriteoDataset(train_files, batch_size, drop_last=True,
                                                      num_buckets=a["num_buckets"]))
    splits.train, splits.train_stream = {}, stream
    return splits


def _concat_ctr(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _parquet_slot_sizes(files: list[Path]) -> list[int]:
    """Slot sizes from the row groups' max statistics of columns C1.. (the largest id + 2: one row
    for each id and one for a missing id)."""
    import pyarrow.parquet as pq

    top: dict[str, int] = {}
    for f in files:
        meta = pq.ParquetFile(f).metadata
        names = meta.schema.names
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for j, name in enumerate(names):
                if name[:1] == "C" and name[1:].isdigit():
                    stats = group.column(j).statistics
                    if stats is None or not stats.has_min_max:
                        raise TrainConfigError(f"{f}: column {name} has no statistics; give --data-arg "
                                               "slot_sizes=[...]")
                    top[name] = max(top.get(name, -1), int(stats.max))
    return [top[c] + 2 for c in sorted(top, key=lambda c: int(c[1:]))]


def _load_parquet(path, data_args, task):
    """CTR Parquet (`label`, `I1`.., `C1`..): read into memory and split, or with `stream=true` streamed
    row group by row group, shuffled per epoch (needs eval data: `eval_path` or several files)."""
    from luoshu.data import ParquetDataset, ctr_from_columns

    a = _args(data_args, "parquet", {"eval_fraction": 0.1, "slot_sizes": None, "stream": False, "eval_path": None,
                                     "seed": 0})
    if a["stream"]:
        train_files, eval_files = _stream_files(path, a, "parquet", "*.parquet")
        slot_sizes = list(a["slot_sizes"]) if a["slot_sizes"] is not None else \
            _parquet_slot_sizes(train_files + eval_files)
        missing = np.asarray(slot_sizes) - 1  # a missing id (negative) gets the last row

        def ctr(columns):
            batch = ctr_from_columns(columns)
            return {**batch, "sparse": np.where(batch["sparse"] < 0, missing, batch["sparse"])}

        held = _concat_ctr(list(ParquetDataset(eval_files, batch_size=1 << 16, transform=ctr)))
        splits = _ctr_splits({k: v[:0] for k, v in held.items()}, held, slot_sizes)
        train_rows = ParquetDataset(train_files).num_rows

        def stream(epoch: int, batch_size: int):
            ds = ParquetDataset(train_files, batch_size=batch_size, shuffle=True, seed=a["seed"], drop_last=True,
                                transform=ctr)
            ds.set_epoch(epoch)
            return (_ctr_arrays(b) for b in ds)
        splits.train, splits.train_stream, splits.stream_rows = {}, stream, train_rows
        return splits
    files = _files(path, "*.parquet")
    data = _concat_ctr(list(ParquetDataset(files, batch_size=1 << 16, transform=ctr_from_columns)))
    sparse = data["sparse"]
    if a["slot_sizes"] is None:
        # ids are used as they are; a missing id (negative) gets its own row past the largest id
        top = sparse.max(axis=0, initial=0)
        data["sparse"] = np.where(sparse < 0, top + 1, sparse)
        slot_sizes = (top + 2).tolist()
    else:
        slot_sizes = list(a["slot_sizes"])
    return _ctr_splits(*_tail_split(data, a["eval_fraction"]), slot_sizes)


def _load_movielens(path, data_args, task):
    """Implicit feedback, the NCF protocol: every rating is a positive; each user's latest one is held
    out and ranked against `eval_negatives` items the user never rated; training pairs every positive
    with `num_negatives` unrated items."""
    from luoshu.data import read_movielens

    a = _args(data_args, "movielens", {"num_negatives": 4, "eval_negatives": 99, "seed": 0})
    raw = read_movielens(path)
    if len(raw["user"]) == 0:
        raise TrainConfigError(f"dataset 'movielens': {path} holds no ratings")
    users, user = np.unique(raw["user"], return_inverse=True)
    items, item = np.unique(raw["item"], return_inverse=True)
    num_users, num_items = len(users), len(items)
    if num_items <= a["eval_negatives"]:
        raise TrainConfigError(f"dataset 'movielens': {num_items} items cannot give {a['eval_negatives']} negatives "
                               "per user; lower eval_negatives")
    order = np.lexsort((raw["timestamp"], user))  # by user, then time
    user, item = user[order], item[order]
    last = np.r_[user[1:] != user[:-1], True]  # each user's latest rating
    rated = np.unique(user.astype(np.int64) * num_items + item)
    rng = np.random.default_rng(a["seed"])

    def unrated(u: np.ndarray, k: int) -> np.ndarray:
        """k items per user in u that the user never rated (redrawn until they are)."""
        out = rng.integers(0, num_items, (len(u), k))
        for _ in range(100):
            bad = np.isin(u[:, None] * num_items + out, rated)
            if not bad.any():
                return out
            out[bad] = rng.integers(0, num_items, int(bad.sum()))
        raise TrainConfigError("dataset 'movielens': users rated nearly every item; cannot sample negatives")

    tu, ti = user[~last], item[~last]
    neg = unrated(tu, a["num_negatives"])
    train = {"user": np.concatenate([tu, np.repeat(tu, a["num_negatives"])]).astype(np.int64),
             "item": np.concatenate([ti, neg.reshape(-1)]).astype(np.int64),
             "label": np.concatenate([np.ones(len(tu)), np.zeros(neg.size)]).astype(np.float32)}
    eu, ei = user[last].astype(np.int64), item[last].astype(np.int64)
    candidates = np.concatenate([ei[:, None], unrated(eu, a["eval_negatives"])], axis=1)  # held-out item first
    held = {"user": np.repeat(eu[:, None], candidates.shape[1], axis=1), "item": candidates}
    return DataSplits(train, held, {}, min_info={"num_users": num_users, "num_items": num_items})


def _pad(seqs, length: int, value: int) -> np.ndarray:
    from luoshu.data import pad_sequences

    return pad_sequences(seqs, value, length)[0]


def _load_copy(reverse: bool):
    name = "reverse" if reverse else "copy"

    def load(path, data_args, task):
        from luoshu.data import copy_task

        a = _args(data_args, name, {"num_samples": 4096, "eval_samples": 512, "vocab": 16, "min_len": 2,
                                    "max_len": 12, "seed": 0})
        pairs = copy_task(a["num_samples"] + a["eval_samples"], a["vocab"], a["min_len"], a["max_len"],
                          reverse=reverse, dist="uniform", seed=a["seed"])
        info = {"vocab_size": a["vocab"], "src_vocab_size": a["vocab"], "tgt_vocab_size": a["vocab"]}
        if task == "lm":  # source, separator, answer: score the answer only
            length = 2 * a["max_len"]
            arrays = {"tokens": _pad([p[0] for p in pairs], length, 0), "targets": _pad([p[1] for p in pairs],
                                                                                         length, -100)}
            info.update(_lengths_info(length))
        else:  # seq2seq: the source, and the answer after a start token (1) with an end token (1) after it
            n_src = [len(p[0]) // 2 for p in pairs]  # inputs: source, separator, answer[:-1]
            sources = [p[0][:k] for p, k in zip(pairs, n_src)]
            answers = [p[1][k:] for p, k in zip(pairs, n_src)]
            arrays = {"src": _pad(sources, a["max_len"], 0),
                      "tgt_in": _pad([np.r_[1, ans] for ans in answers], a["max_len"] + 1, 0),
                      "tgt_out": _pad([np.r_[ans, 1] for ans in answers], a["max_len"] + 1, -100)}
            info["max_len"] = a["max_len"] + 1
        n = a["num_samples"]
        return DataSplits({k: v[:n] for k, v in arrays.items()}, {k: v[n:] for k, v in arrays.items()}, {},
                          min_info=info)
    return load


def _load_synthetic_lm(path, data_args, task):
    """A long-tail corpus (Zipf tokens, power-law document lengths) packed into blocks of `seq_len`."""
    from luoshu.data import synthetic_sequences

    a = _args(data_args, "synthetic-lm", {"num_docs": 2000, "vocab": 256, "seq_len": 32, "min_len": 4,
                                          "max_len": 256, "eval_fraction": 0.1, "seed": 0})
    docs = synthetic_sequences(a["num_docs"], a["vocab"], a["min_len"], a["max_len"], num_special=1, seed=a["seed"])
    stream = np.concatenate([np.r_[d, 0] for d in docs]).astype(np.int64)  # 0 ends a document
    block = a["seq_len"] + 1
    n = len(stream) // block
    if n < 2:
        raise TrainConfigError(f"dataset 'synthetic-lm': {len(stream)} tokens make fewer than 2 blocks of {block}")
    blocks = stream[:n * block].reshape(n, block)
    train, held = _split({"tokens": blocks[:, :-1].copy(), "targets": blocks[:, 1:].copy()}, a["eval_fraction"],
                         a["seed"], shuffle=False)
    return DataSplits(train, held, {}, min_info={"vocab_size": a["vocab"], **_lengths_info(a["seq_len"])})


def _lengths_info(length: int) -> dict[str, int]:
    """The zoo's names for a language model's longest sequence."""
    return {"block_size": length, "max_seq_len": length, "max_position_embeddings": length}


def _load_synthetic_text(path, data_args, task):
    """Topic classification: each class draws its tokens from its own Zipf distribution (a random
    permutation of the vocabulary), sequence lengths long-tailed; padding id 0."""
    from luoshu.data import synthetic_sequences

    a = _args(data_args, "synthetic-text", {"num_samples": 4096, "eval_samples": 1024, "num_classes": 4,
                                            "vocab": 64, "min_len": 4, "max_len": 32, "seed": 0})
    n = a["num_samples"] + a["eval_samples"]
    rng = np.random.default_rng(a["seed"])
    labels = rng.integers(0, a["num_classes"], n)
    seqs = synthetic_sequences(n, a["vocab"], a["min_len"], a["max_len"], num_special=1, seed=a["seed"])
    topics = np.stack([1 + rng.permutation(a["vocab"] - 1) for _ in range(a["num_classes"])])  # token 0: padding
    tokens = _pad([topics[c][s - 1] for c, s in zip(labels, seqs)], a["max_len"], 0)
    arrays = {"tokens": tokens, "label": labels.astype(np.int64)}
    m = a["num_samples"]
    return DataSplits({k: v[:m] for k, v in arrays.items()}, {k: v[m:] for k, v in arrays.items()},
                      {"num_classes": a["num_classes"]}, min_info={"vocab_size": a["vocab"]})


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(("image",), False, _load_digits, "scikit-learn's 8x8 digits (shipped, no path)"),
    "mnist": DatasetSpec(("image",), True, _load_mnist, "MNIST IDX files under --data-path"),
    "cifar10": DatasetSpec(("image",), True, _load_cifar(10), "CIFAR-10 binary batches under --data-path"),
    "cifar100": DatasetSpec(("image",), True, _load_cifar(100), "CIFAR-100 binary batches under --data-path"),
    "movielens": DatasetSpec(("rating",), True, _load_movielens, "MovieLens ratings file (u.data, ratings.csv)"),
    "criteo": DatasetSpec(("ctr",), True, _load_criteo, "Criteo TSV file (label, 13 int, 26 hex columns)"),
    "parquet": DatasetSpec(("ctr",), True, _load_parquet, "CTR Parquet file or directory (label, I1.., C1..)"),
    "synthetic-ctr": DatasetSpec(("ctr",), False, _load_synthetic_ctr, "generated click logs with a hidden model"),
    "copy": DatasetSpec(("seq2seq", "lm"), False, _load_copy(False), "copy a random sequence (synthetic)"),
    "reverse": DatasetSpec(("seq2seq", "lm"), False, _load_copy(True), "reverse a random sequence (synthetic)"),
    "synthetic-lm": DatasetSpec(("lm",), False, _load_synthetic_lm, "long-tail token corpus (synthetic)"),
    "synthetic-text": DatasetSpec(("sequence",), False, _load_synthetic_text,
                                  "token sequences labelled by topic (synthetic)"),
}


# --- tasks: inputs, loss and eval metrics ------------------------------------------------------------

class Task:
    """What a kind of model takes and is scored by. `inputs` names the batch arrays the model reads
    (in call order), `target` the label array; `metrics` are the eval columns (the first is reported)."""

    inputs: tuple[str, ...] = ()
    target: str = "label"
    metrics: tuple[str, ...] = ()

    def placeholders(self, arrays: dict[str, np.ndarray], device: str) -> dict:
        import luoshu as ls

        out = {}
        for key in (*self.inputs, self.target):
            a = arrays[key]
            shape = (None, *a.shape[1:])
            dtype = "int64" if np.issubdtype(a.dtype, np.integer) and key != "image" else "float32"
            out[key] = ls.placeholder(key, shape, dtype, device)
        return out

    def forward(self, model: Module, feeds: dict) -> Tensor:
        out = model(*(feeds[k] for k in self.inputs))
        return out[0] if isinstance(out, tuple) else out  # BERT: (mlm_logits, nsp_logits)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        from luoshu.nn import functional as F

        return F.cross_entropy(output, target)

    def evaluate(self, predict: Callable[[dict], np.ndarray], data: dict[str, np.ndarray],
                 batch_size: int) -> dict[str, float]:
        raise NotImplementedError


def _batched(data: dict[str, np.ndarray], batch_size: int):
    n = len(next(iter(data.values())))
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size] for k, v in data.items()}


class ImageTask(Task):
    inputs, metrics = ("image",), ("accuracy", "eval_loss")

    def evaluate(self, predict: Callable[[dict], np.ndarray], data: dict[str, np.ndarray],
                 batch_size: int) -> dict[str, float]:
        from luoshu import metrics

        logits = np.concatenate([predict(b) for b in _batched(data, batch_size)])
        labels = data["label"]
        return {"accuracy": metrics.accuracy(labels, logits),
                "eval_loss": metrics.log_loss(labels, _softmax(logits))}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class SequenceTask(ImageTask):
    inputs = ("tokens",)


class CTRTask(Task):
    inputs, metrics = ("dense", "sparse"), ("auc", "log_loss")

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        from luoshu.nn import functional as F

        return F.binary_cross_entropy_with_logits(output, target)

    def evaluate(self, predict: Callable[[dict], np.ndarray], data: dict[str, np.ndarray],
                 batch_size: int) -> dict[str, float]:
        from luoshu import metrics

        logits = np.concatenate([predict(b) for b in _batched(data, batch_size)]).astype(np.float64)
        prob = 1 / (1 + np.exp(-logits))
        return {"auc": metrics.auc(data["label"], logits), "log_loss": metrics.log_loss(data["label"], prob)}


class RatingTask(CTRTask):
    """Implicit-feedback ranking: the eval data holds (users, candidates) grids, held-out item in column 0."""

    inputs, metrics = ("user", "item"), ("hr@10", "ndcg@10")

    def placeholders(self, arrays: dict[str, np.ndarray], device: str) -> dict:
        import luoshu as ls

        return {"user": ls.placeholder("user", (None,), "int64", device),
                "item": ls.placeholder("item", (None,), "int64", device),
                "label": ls.placeholder("label", (None,), "float32", device)}

    def evaluate(self, predict: Callable[[dict], np.ndarray], data: dict[str, np.ndarray],
                 batch_size: int) -> dict[str, float]:
        from luoshu import metrics

        users, items = data["user"], data["item"]
        rows = max(1, batch_size // items.shape[1])
        scores = np.concatenate([predict({"user": users[s:s + rows].reshape(-1), "item": items[s:s + rows]
                                          .reshape(-1)}).reshape(-1, items.shape[1])
                                 for s in range(0, len(users), rows)])
        held_out = np.zeros(len(scores), np.int64)
        return {"hr@10": metrics.hit_rate_at_k(held_out, scores, 10),
                "ndcg@10": metrics.ndcg_at_k(held_out, scores, 10)}


def _token_metrics(predict, data, batch_size, inputs, target) -> dict[str, float]:
    """Perplexity and token accuracy over the scored (not ignored) target tokens, batch by batch."""
    from luoshu import metrics

    log_ppl, correct, count = 0.0, 0, 0
    for batch in _batched(data, batch_size):
        logits = predict(batch)
        targets = batch[target]
        keep = targets != -100
        n = int(keep.sum())
        if n == 0:
            continue
        log_ppl += math.log(metrics.perplexity(targets, logits, ignore_index=-100)) * n
        correct += int((logits.argmax(-1)[keep] == targets[keep]).sum())
        count += n
    if count == 0:
        raise TrainConfigError("the eval data has no scored tokens")
    return {"perplexity": math.exp(log_ppl / count), "token_accuracy": correct / count}


class LMTask(Task):
    """Next-token prediction; targets of -100 (padding, prompts) are not scored."""

    inputs, target, metrics = ("tokens",), "targets", ("perplexity", "token_accuracy")

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        from luoshu import ops
        from luoshu.nn import functional as F

        vocab = output.shape[-1]
        return F.cross_entropy(ops.reshape(output, (-1, vocab)), ops.reshape(target, (-1,)), ignore_index=-100)

    def evaluate(self, predict: Callable[[dict], np.ndarray], data: dict[str, np.ndarray],
                 batch_size: int) -> dict[str, float]:
        return _token_metrics(predict, data, batch_size, self.inputs, self.target)


class Seq2SeqTask(LMTask):
    inputs, target, metrics = ("src", "tgt_in"), "tgt_out", ("token_accuracy", "perplexity")


TASKS: dict[str, Task] = {"image": ImageTask(), "sequence": SequenceTask(), "ctr": CTRTask(),
                          "rating": RatingTask(), "lm": LMTask(), "seq2seq": Seq2SeqTask()}


# --- batches ------------------------------------------------------------------------------------------

class _EpochBatches:
    """Batch `i` of one epoch (from `start` on), cut from in-memory arrays in a seeded order:
    a map-style dataset of whole batches for `DataLoader(batch_size=None)` to prefetch."""

    def __init__(self, arrays, order: np.ndarray, batch_size: int, start: int, transform, seed: tuple[int, ...]):
        self.arrays, self.order, self.batch_size, self.start = arrays, order, batch_size, start
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return max(0, len(self.order) // self.batch_size - self.start)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        j = self.start + i
        idx = np.sort(self.order[j * self.batch_size:(j + 1) * self.batch_size])
        batch = {k: v[idx] for k, v in self.arrays.items()}
        if self.transform is None:
            return batch
        return self.transform(batch, np.random.default_rng([*self.seed, j]), True)


class _StreamBatches:
    """The batches of one pass over streamed files, from batch `start` on (a resumed run reads and
    drops the ones before it): an iterable dataset for `DataLoader(batch_size=None)` to prefetch."""

    def __init__(self, stream: Callable[[int, int], Iterable[dict]], epoch: int, batch_size: int, start: int):
        self.stream, self.epoch, self.batch_size, self.start = stream, epoch, batch_size, start

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return itertools.islice(iter(self.stream(self.epoch, self.batch_size)), self.start, None)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of epoch `epoch`: a permutation seeded by (seed, epoch), so a resumed run
    sees the same batches as an uninterrupted one."""
    return np.random.default_rng([seed, epoch]).permutation(n)


# --- checkpoints --------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "step-"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (`step-<N>` with a manifest) in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit() \
                and (p / "manifest.json").is_file():
            found.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def _generator_state(device: str) -> str:
    from luoshu.core.random import generator

    return base64.b64encode(generator(device).get_state().numpy().tobytes()).decode()


def _set_generator_state(device: str, state: str) -> None:
    from luoshu.core.random import generator

    raw = np.frombuffer(base64.b64decode(state), dtype=np.uint8).copy()
    generator(device).set_state(torch.from_numpy(raw))


def _is_masked_lm(model_class: type) -> bool:
    from luoshu import models

    bert = getattr(models, "BertForPreTraining", None)
    return bert is not None and issubclass(model_class, bert)


def _masked_lm(mask_id: int) -> Callable:
    """BERT's masked-LM objective over a token batch: 15% of positions are scored; of those, 80% are
    replaced by [MASK] (`mask_id`), 10% by a random token and 10% kept."""
    def transform(batch, rng, train):
        tokens = batch["tokens"]
        chosen = rng.random(tokens.shape) < 0.15
        chosen.reshape(-1)[0] |= not chosen.any()  # a batch with nothing to score would give a NaN loss
        draw = rng.random(tokens.shape)
        inputs = np.where(chosen & (draw < 0.8), mask_id, tokens)
        inputs = np.where(chosen & (draw >= 0.8) & (draw < 0.9), rng.integers(0, mask_id, tokens.shape), inputs)
        return {**batch, "tokens": inputs.astype(np.int64), "targets": np.where(chosen, tokens, -100)}
    return transform


# --- the trainer --------------------------------------------------------------------------------------

def resolve(config: TrainConfig) -> tuple[str, DatasetSpec]:
    """Checks the model, dataset, optimizer, data path and device before anything is built; returns the
    model's task and the dataset's spec."""
    table = model_table()
    if config.model not in table:
        raise TrainConfigError(f"unknown model {config.model!r}{_suggest(config.model, table)}; "
                               f"known models: {', '.join(sorted(table))}")
    if config.dataset not in DATASETS:
        raise TrainConfigError(f"unknown dataset {config.dataset!r}{_suggest(config.dataset, DATASETS)}; "
                               f"known datasets: {', '.join(DATASETS)}")
    if config.optimizer not in OPTIMIZERS:
        raise TrainConfigError(f"unknown optimizer {config.optimizer!r}{_suggest(config.optimizer, OPTIMIZERS)}; "
                               f"known optimizers: {', '.join(OPTIMIZERS)}")
    task = table[config.model][2]
    spec = DATASETS[config.dataset]
    if task not in spec.tasks:
        fitting = sorted(n for n, entry in table.items() if entry[2] in spec.tasks)
        fitting_data = sorted(n for n, s in DATASETS.items() if task in s.tasks)
        raise TrainConfigError(f"model {config.model!r} ({task} task) does not fit dataset "
                               f"{config.dataset!r} ({'/'.join(spec.tasks)} data); models for it: "
                               f"{', '.join(fitting) or 'none'}; datasets for {config.model!r}: "
                               f"{', '.join(fitting_data) or 'none'}")
    fields = _config_fields(table[config.model][0])
    unknown = sorted(set(config.model_args) - set(fields))
    if unknown:
        raise TrainConfigError(f"model {config.model!r} has no config field {unknown[0]!r}"
                               f"{_suggest(unknown[0], fields)}; its fields ({table[config.model][0].__name__}): "
                               f"{', '.join(fields)}")
    if spec.needs_path:
        if not config.data_path:
            raise TrainConfigError(f"dataset {config.dataset!r} reads local files: pass --data-path "
                                   f"(luoshu never downloads)")
        if not Path(config.data_path).exists():
            raise TrainConfigError(f"dataset {config.dataset!r}: data path {config.data_path} does not exist")
    try:
        device = torch.device(config.device)
    except (RuntimeError, TypeError):
        raise TrainConfigError(f"device {config.device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise TrainConfigError(f"device {config.device!r} is not available here "
                               f"({torch.cuda.device_count()} CUDA devices)")
    if device.type not in ("cpu", "cuda"):
        raise TrainConfigError(f"device {config.device!r}: luoshu trains on cpu or cuda")
    return task, spec


class Trainer:
    """Trains one job in define-and-run mode; `fit()` runs it and returns the last eval metrics."""

    def __init__(self, config: TrainConfig):
        import luoshu as ls
        from luoshu import optim
        from luoshu.core.tensor import normalize_device

        config.validate()
        self.config = config
        self.task_name, spec = resolve(config)
        if config.resume and latest_checkpoint(config.checkpoint_path) is None:
            raise TrainConfigError(f"--resume: no checkpoint in {config.checkpoint_path}")
        self.task = TASKS[self.task_name]
        self.device = normalize_device(config.device)
        self.data = spec.load(config.data_path, dict(config.data_args), self.task_name)
        streamed = self.data.train_stream is not None
        n = self.data.stream_rows if streamed else len(next(iter(self.data.train.values())))
        self.steps_per_epoch = None if n is None else n // config.batch_size  # None: a stream of unknown length
        if self.steps_per_epoch == 0:
            raise TrainConfigError(f"dataset {config.dataset!r} has {n} training samples, fewer than one batch of "
                                   f"{config.batch_size}; lower --batch-size")
        if self.steps_per_epoch is None and config.max_steps is None:
            raise TrainConfigError(f"dataset {config.dataset!r} streams files of unknown length: give --max-steps")
        # max_steps, when given, decides the length (running as many epochs as it takes)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.eval_interval = config.eval_interval or self.steps_per_epoch or self.total_steps
        self.checkpoint_interval = self.eval_interval if config.checkpoint_interval is None \
            else config.checkpoint_interval

        if self.task_name == "lm" and _is_masked_lm(model_table()[config.model][1]):
            vocab = self.data.min_info["vocab_size"]
            self.data.min_info["vocab_size"] = vocab + 1  # one more id: [MASK]
            self.data.transform = _masked_lm(vocab)
        ls.manual_seed(config.seed)
        self.model, self.model_config = build_model(config.model, self.data.info, config.model_args,
                                                    self.data.min_info)
        if self.device != "cpu":
            self.model.to(self.device)
        self.optimizer = build_optimizer(config, self.model.parameters())
        self.scheduler = self._scheduler()
        low = {"bf16": "bfloat16", "fp16": "float16"}.get(config.precision)
        self.loss_scaler = optim.LossScaler() if config.precision == "fp16" else None
        with ls.Graph(f"train-{config.model}") as graph, ls.autocast(low or "bfloat16", enabled=low is not None):
            self.feeds = self.task.placeholders(self.data.train or self.data.eval, self.device)
            self.model.train()
            output = self.task.forward(self.model, self.feeds)
            self.loss = self.task.loss(output, self.feeds[self.task.target])
            self.train_op = self.optimizer.minimize(self.loss, loss_scaler=self.loss_scaler)
            self.model.eval()
            self.eval_output = self.task.forward(self.model, self.feeds)
            self.model.train()
        self.graph = graph
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.window = {"loss_sum": 0.0, "steps": 0, "samples": 0, "seconds": 0.0}
        self.last_metrics: dict[str, float] = {}
        self._eval_data: dict[str, np.ndarray] | None = None

    # --- pieces -------------------------------------------------------------------------------------
    def _scheduler(self):
        from luoshu import optim

        c = self.config
        if c.lr_schedule == "cosine":
            if c.warmup_steps >= self.total_steps:
                raise TrainConfigError(f"warmup_steps {c.warmup_steps} must be below the {self.total_steps} "
                                       "training steps")
            return optim.CosineWarmup(self.optimizer, c.warmup_steps, self.total_steps)
        if c.warmup_steps:
            return optim.LinearWarmup(self.optimizer, c.warmup_steps)
        return None

    def _feed(self, batch: dict[str, np.ndarray]) -> dict:
        return {ph: batch[key] for key, ph in self.feeds.items() if key in batch}

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The eval branch's output (logits) on one batch of inputs."""
        feed = {ph: v for ph, v in self._feed(batch).items() if ph.name in self.task.inputs}
        return self.graph.run(self.eval_output, feed)

    def evaluate(self) -> dict[str, float]:
        c = self.config
        if self._eval_data is None:
            self._eval_data = self.data.eval
            if self.data.transform is not None:  # no augmentation; masks (BERT) fixed for every evaluation
                self._eval_data = self.data.transform(self.data.eval, np.random.default_rng([c.seed, 1 << 31]), False)
        return self.task.evaluate(self.predict, self._eval_data, c.eval_batch_size or 4 * c.batch_size)

    def _epoch_batches(self):
        """The training batches of the current epoch from `batch_in_epoch` on, as a dataset for DataLoader."""
        c = self.config
        if self.data.train_stream is not None:
            return _StreamBatches(self.data.train_stream, self.epoch, c.batch_size, self.batch_in_epoch)
        order = epoch_order(c.seed, self.epoch, len(self.data.train[self.task.target]))
        return _EpochBatches(self.data.train, order, c.batch_size, self.batch_in_epoch, self.data.transform,
                             (c.seed, self.epoch))

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # --- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        import luoshu as ls

        c = self.config
        metadata = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                    "config": c.to_dict(), "task": self.task_name, "window": dict(self.window),
                    "metrics": self.last_metrics, "generator": _generator_state(self.device),
                    "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                    "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None}
        path = ls.save(c.checkpoint_path / f"{CHECKPOINT_PREFIX}{self.step:08d}", self.model, self.optimizer,
                       metadata=json.loads(json.dumps(metadata)))
        if c.keep_checkpoints:
            for _, old in list_checkpoints(c.checkpoint_path)[:-c.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restores model, optimizer and training position from a checkpoint written by this trainer."""
        import luoshu as ls
        from luoshu.checkpoint import verify

        path = Path(path)
        saved = verify(path).get("metadata", {})
        for key in ("step", "epoch", "batch_in_epoch", "config", "generator"):
            if key not in saved:
                raise CheckpointError(f"checkpoint {path} has no training position ({key!r} missing from its "
                                      "metadata); was it written by luoshu train?")
        old = saved["config"]
        for key in ("model", "dataset", "model_args", "data_args", "seed", "batch_size"):
            if old.get(key) != getattr(self.config, key):
                raise TrainConfigError(f"cannot resume from {path}: it was trained with {key}={old.get(key)!r}, "
                                       f"this job has {key}={getattr(self.config, key)!r}")
        ls.load(path, self.model, self.optimizer)
        self.step, self.epoch, self.batch_in_epoch = saved["step"], saved["epoch"], saved["batch_in_epoch"]
        self.window = dict(saved.get("window") or self.window)
        self.last_metrics = dict(saved.get("metrics") or {})
        _set_generator_state(self.device, saved["generator"])
        if self.scheduler is not None and saved.get("scheduler") is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        if self.loss_scaler is not None and saved.get("loss_scaler"):
            self.loss_scaler.load_state_dict(saved["loss_scaler"])
        return saved

    # --- the loop -----------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        from tqdm import tqdm

        from luoshu.data import DataLoader

        c = self.config
        job = c.job_dir
        job.mkdir(parents=True, exist_ok=True)
        if c.resume:
            newest = latest_checkpoint(c.checkpoint_path)
            if newest is None:
                raise TrainConfigError(f"--resume: no checkpoint in {c.checkpoint_path}")
            self.load_checkpoint(newest)
        else:
            stale = list_checkpoints(c.checkpoint_path)
            if stale:  # starting over: a later --resume must not pick up the previous run's checkpoints
                print(f"starting over: removing {len(stale)} checkpoint(s) of a previous run from "
                      f"{c.checkpoint_path} (--resume continues a run instead)", file=sys.stderr)
            for _, old in stale:
                shutil.rmtree(old, ignore_errors=True)
            for old in job.glob("events.out.tfevents.*"):
                old.unlink()
        (job / "config.yaml").write_text(_dump_yaml(c.to_dict()))
        log = _MetricsLog(job / "metrics.csv", ("step", "epoch", "train_loss", *self.task.metrics, "samples_per_s",
                                                 "lr"), resume_step=self.step if c.resume else None)
        from tensorboardX import SummaryWriter

        # A resumed run's points replace those the interrupted run logged after its checkpoint (purge_step);
        # the suffix keeps two runs started within one second from sharing (and clobbering) a file name.
        writer = SummaryWriter(logdir=str(job), purge_step=self.step if c.resume else None, flush_secs=10,
                               filename_suffix=f".{uuid.uuid4().hex[:8]}")
        bar = tqdm(total=self.total_steps * c.batch_size, initial=self.step * c.batch_size, unit="sample",
                   unit_scale=True, disable=not c.progress, dynamic_ncols=True,
                   desc=f"{c.model} on {c.dataset}")
        interval_loss, interval_steps = 0.0, 0
        try:
            while self.step < self.total_steps:
                loader = DataLoader(self._epoch_batches(), batch_size=None, num_workers=c.num_workers)
                tick, first = time.perf_counter(), self.batch_in_epoch
                for batch in loader:
                    loss, _ = self.graph.run([self.loss, self.train_op], self._feed(batch))
                    loss = float(loss)
                    if not math.isfinite(loss):
                        raise Error(f"training diverged: the loss is {loss} at step {self.step + 1} (epoch "
                                    f"{self.epoch + 1}); lower the learning rate (now {self._lr():g})")
                    if self.scheduler is not None:
                        self.scheduler.step()
                    self.step += 1
                    self.batch_in_epoch += 1
                    now = time.perf_counter()
                    self.window["loss_sum"] += loss
                    self.window["steps"] += 1
                    self.window["samples"] += c.batch_size
                    self.window["seconds"] += now - tick
                    interval_loss, interval_steps = interval_loss + loss, interval_steps + 1
                    tick = now
                    bar.update(c.batch_size)
                    if self.step % c.log_interval == 0:
                        rate = self.window["samples"] / max(self.window["seconds"], 1e-9)
                        writer.add_scalar("train/loss", interval_loss / interval_steps, self.step)
                        writer.add_scalar("train/samples_per_s", rate, self.step)
                        writer.add_scalar("train/lr", self._lr(), self.step)
                        bar.set_postfix_str(f"epoch {self.epoch + 1} loss {interval_loss / interval_steps:.4f} "
                                            f"{_metric_text(self.last_metrics)}")
                        interval_loss, interval_steps = 0.0, 0
                    end_of_epoch = self.batch_in_epoch == self.steps_per_epoch  # never, for unknown lengths
                    last = self.step == self.total_steps
                    if end_of_epoch:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    if self.step % self.eval_interval == 0 or last:
                        self._evaluate_and_log(log, writer, bar)
                    if last or (self.checkpoint_interval and self.step % self.checkpoint_interval == 0):
                        self.save_checkpoint()
                    if last or end_of_epoch:
                        break
                    tick = time.perf_counter()
                else:  # a stream of unknown length ran out: that was one pass
                    if self.batch_in_epoch == first:
                        raise TrainConfigError(f"dataset {c.dataset!r}: a pass over the training files gave no "
                                               f"full batch of {c.batch_size} rows")
                    if self.steps_per_epoch is None:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        except KeyboardInterrupt:
            bar.close()
            if self.step:
                path = self.save_checkpoint()
                print(f"interrupted at step {self.step}: saved {path}; continue with --resume")
            raise
        finally:
            bar.close()
            writer.close()
        return self.last_metrics

    def _evaluate_and_log(self, log, writer, bar) -> None:
        self.last_metrics = self.evaluate()
        w = self.window
        train_loss = w["loss_sum"] / max(w["steps"], 1)
        rate = w["samples"] / max(w["seconds"], 1e-9)
        epoch = self.epoch if self.steps_per_epoch is None else round(self.step / self.steps_per_epoch, 4)
        log.write({"step": self.step, "epoch": epoch, "train_loss": train_loss,
                   **self.last_metrics, "samples_per_s": rate, "lr": self._lr()})
        for name, value in self.last_metrics.items():
            writer.add_scalar(f"eval/{name}", value, self.step)
        writer.add_scalar("eval/train_loss", train_loss, self.step)
        bar.set_postfix_str(f"epoch {self.epoch} loss {train_loss:.4f} {_metric_text(self.last_metrics)}")
        self.window = {"loss_sum": 0.0, "steps": 0, "samples": 0, "seconds": 0.0}


def _metric_text(values: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in values.items())


def _dump_yaml(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


class _MetricsLog:
    """metrics.csv: one row per evaluation. On resume, rows past the checkpoint's step (written by the
    interrupted run after its last checkpoint) are dropped, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, columns: tuple[str, ...], resume_step: int | None):
        self.path, self.columns = path, columns
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if tuple(reader.fieldnames or ()) == columns:
                    rows = [r for r in reader if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def train(config: TrainConfig) -> dict[str, float]:
    """Runs a training job; returns the last eval metrics."""
    return Trainer(config).fit()
