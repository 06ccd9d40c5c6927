"""The settings of a training job: `TrainConfig`, the one check every config passes (`check_config`),
config files and the default job."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml

from luoshu.train.builders import OPTIMIZERS, check_model_args, model_table
from luoshu.train.datasets import DATASETS, DatasetSpec
from luoshu.train.errors import TrainConfigError, suggestion

__all__ = ["DEFAULT_JOB", "TrainConfig", "TrainConfigError", "check_config", "load_config"]


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
    profile_memory: bool = False  # account the first step's memory; printed and written to memory.json
    compile: bool = False  # run each training step as one TorchInductor-compiled graph (luoshu.compiler.inductor)
    # parallelism under `luoshu launch` (language models): dp x tp x pp must be the world size
    dp: int = 1
    tp: int = 1
    pp: int = 1
    micro_batches: int = 1
    pipeline_schedule: str = "1f1b"  # "1f1b" or "gpipe"
    sequence_parallel: bool = False
    zero: int = 0  # ZeRO stage over the data-parallel workers: 0 off, 1 optimizer state, 2 + gradients, 3 + parameters
    hot_switch: dict | None = None  # HotSPa: {buckets: [...descending..., 0], strategies: ["dp1,tp4,pp1", ...]}
    parallel: str | None = None  # "auto": the strategy search picks the job's (dp, tp) (luoshu.train.hot_switch)
    memory_budget_mb: float | None = None  # with parallel "auto": per-device memory the strategy must fit in
    # the settings (as `check_config` last passed them), so an unchanged config is not checked twice
    _passed_check: ClassVar[str | None] = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Builds a config from a mapping, refusing unknown keys (with a suggestion) and, through
        `check_config`, any setting the job cannot run with."""
        if not isinstance(values, Mapping):
            raise TrainConfigError(f"{source}: expected a mapping of settings, found {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TrainConfigError(f"{source}: unknown setting {unknown[0]!r}{suggestion(unknown[0], names)}; "
                                   f"known settings: {', '.join(sorted(names))}")
        for name in ("lr", "weight_decay", "max_grad_norm"):
            # YAML 1.1 reads 3e-4 (no dot) as a string
            if isinstance(values.get(name), str):
                try:
                    values[name] = float(values[name])
                except ValueError:
                    pass  # check_config names the bad value
        config = cls(**values)
        check_config(config, source)
        return config

    def validate(self, source: str = "config") -> None:
        """Raises a `TrainConfigError` naming the first setting the job cannot run with (`check_config`)."""
        check_config(self, source)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def job_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"{self.model}-{self.dataset}"

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else self.job_dir / "checkpoints"


def check_config(config: TrainConfig, source: str = "config") -> tuple[str, DatasetSpec]:
    """The one check of a job's settings, before anything is built or written: each value's type and
    range, then the names against the tables (model, dataset, optimizer, the model's config fields),
    the model's task against the dataset's, the data path and the device. Returns the model's task and
    the dataset's spec.

    `TrainConfig.from_dict` checks a config as it is built and the `Trainer` checks one built in Python;
    a config not changed since it passed is not checked again, so each config passes here once."""
    settings = repr(dataclasses.astuple(config))  # repr tells 1 from 1.0 and True, which == does not
    if config._passed_check != settings:
        _check_values(config, source)
        _check_job(config)
        config._passed_check = settings
    return model_table()[config.model][2], DATASETS[config.dataset]


def _check_values(config: TrainConfig, source: str) -> None:
    """Each setting's type and range."""
    def check(name, ok, expected):
        if not ok:
            raise TrainConfigError(f"{source}: {name} must be {expected}, found {getattr(config, name)!r}")

    def is_int(v, low):
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    c = config
    for name in ("model", "dataset", "optimizer", "device", "lr_schedule"):
        check(name, isinstance(getattr(c, name), str), "a string")
    for name in ("model_args", "data_args", "optimizer_args"):
        check(name, isinstance(getattr(c, name), dict), "a mapping")
    check("lr", isinstance(c.lr, int | float) and not isinstance(c.lr, bool) and c.lr > 0, "a positive number")
    check("weight_decay", isinstance(c.weight_decay, int | float) and c.weight_decay >= 0, "a non-negative number")
    check("epochs", is_int(c.epochs, 1), "a positive integer")
    check("max_steps", c.max_steps is None or is_int(c.max_steps, 1), "a positive integer")
    check("batch_size", is_int(c.batch_size, 1), "a positive integer")
    check("eval_batch_size", c.eval_batch_size is None or is_int(c.eval_batch_size, 1), "a positive integer")
    check("eval_interval", is_int(c.eval_interval, 0), "a non-negative integer")
    check("checkpoint_interval", c.checkpoint_interval is None or is_int(c.checkpoint_interval, 0),
          "a non-negative integer (0: only at the end)")
    check("keep_checkpoints", is_int(c.keep_checkpoints, 0), "a non-negative integer")
    check("log_interval", is_int(c.log_interval, 1), "a positive integer")
    check("warmup_steps", is_int(c.warmup_steps, 0), "a non-negative integer")
    check("num_workers", is_int(c.num_workers, 0), "a non-negative integer")
    check("seed", is_int(c.seed, 0), "a non-negative integer")
    check("lr_schedule", c.lr_schedule in ("constant", "cosine"), "'constant' or 'cosine'")
    check("precision", c.precision in ("fp32", "bf16", "fp16"), "'fp32', 'bf16' or 'fp16'")
    check("profile_memory", isinstance(c.profile_memory, bool), "true or false")
    check("compile", isinstance(c.compile, bool), "true or false")
    for name in ("dp", "tp", "pp", "micro_batches"):
        check(name, is_int(getattr(c, name), 1), "a positive integer")
    check("pipeline_schedule", c.pipeline_schedule in ("1f1b", "gpipe"), "'1f1b' or 'gpipe'")
    check("sequence_parallel", isinstance(c.sequence_parallel, bool), "true or false")
    check("zero", c.zero in (0, 1, 2, 3) and not isinstance(c.zero, bool), "0, 1, 2 or 3")
    check("zero", not c.zero or c.hot_switch is None, "0 in a hot_switch job (it lays out its own strategies)")
    check("max_grad_norm", c.max_grad_norm is None or (isinstance(c.max_grad_norm, int | float)
                                                       and c.max_grad_norm > 0), "a positive number")
    if c.hot_switch is not None or c.parallel is not None or c.memory_budget_mb is not None:
        from luoshu.train.hot_switch import check_hot_switch  # (it imports the builders this module does)

        check_hot_switch(c, source)


def _check_job(config: TrainConfig) -> None:
    """The names against the tables, the model's task against the dataset's, the data path, the device."""
    table = model_table()
    if config.model not in table:
        raise TrainConfigError(f"unknown model {config.model!r}{suggestion(config.model, table)}; "
                               f"known models: {', '.join(sorted(table))}")
    if config.dataset not in DATASETS:
        raise TrainConfigError(f"unknown dataset {config.dataset!r}{suggestion(config.dataset, DATASETS)}; "
                               f"known datasets: {', '.join(DATASETS)}")
    if config.optimizer not in OPTIMIZERS:
        raise TrainConfigError(f"unknown optimizer {config.optimizer!r}{suggestion(config.optimizer, OPTIMIZERS)}; "
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
    check_model_args(config.model, config.model_args)
    _check_parallel(config, task)
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


def _layer_count(config: TrainConfig) -> int | None:
    """The number of repeated layers (what pipeline stages cut) of a zoo model's config, or None."""
    config_class = model_table()[config.model][0]
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for name in ("n_layer", "n_layers", "num_layers", "num_hidden_layers", "depth"):
        if name in fields:
            value = config.model_args.get(name, fields[name].default)
            return value if isinstance(value, int) else None
    return None


def _check_parallel(config: TrainConfig, task: str) -> None:
    """dp x tp x pp against the world size of the launch, the model, the batch and the micro-batches."""
    import os

    c = config
    product = c.dp * c.tp * c.pp
    if c.hot_switch is not None or c.parallel is not None:  # its strategies (or the search) lay out the ranks
        if product > 1 or c.micro_batches > 1 or c.sequence_parallel:
            which = "hot_switch names its own strategies" if c.hot_switch is not None else \
                f"parallel = {c.parallel!r} chooses the layout itself"
            raise TrainConfigError(f"{which}: leave dp, tp, pp, micro_batches and sequence_parallel at their "
                                   f"defaults (found dp={c.dp}, tp={c.tp}, pp={c.pp}, micro_batches={c.micro_batches}, "
                                   f"sequence_parallel={c.sequence_parallel})")
        return
    if c.zero and product == 1:  # ZeRO's own data parallelism (DataParallel(graph, zero=...)) lays out the ranks
        if c.micro_batches > 1 or c.sequence_parallel:
            raise TrainConfigError(f"zero = {c.zero} without dp/tp: leave micro_batches and sequence_parallel at "
                                   "their defaults")
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if product != world:
        raise TrainConfigError(f"dp x tp x pp = {c.dp} x {c.tp} x {c.pp} = {product} must equal the world size of "
                               f"the launch, found {world} (run under `luoshu launch -n {product}`)")
    if product == 1:
        if c.sequence_parallel:
            raise TrainConfigError("sequence_parallel needs tensor parallelism: set tp > 1")
        return
    if task != "lm":
        lms = sorted(n for n, entry in model_table().items() if entry[2] == "lm")
        raise TrainConfigError(f"dp/tp/pp in luoshu train are for the language models ({', '.join(lms)}); model "
                               f"{c.model!r} is a {task} model")
    if c.sequence_parallel and c.tp == 1:
        raise TrainConfigError("sequence_parallel needs tensor parallelism: set tp > 1")
    if c.batch_size % (c.dp * c.micro_batches):
        raise TrainConfigError(f"batch_size {c.batch_size} must divide into dp = {c.dp} shares of micro_batches = "
                               f"{c.micro_batches} micro-batches each (a multiple of {c.dp * c.micro_batches})")
    if c.micro_batches > 1 and c.pp == 1:
        raise TrainConfigError(f"micro_batches = {c.micro_batches} needs pipeline parallelism: set pp > 1")
    layers = _layer_count(c)
    if c.pp > 1 and layers is not None and layers < c.pp:
        raise TrainConfigError(f"pp = {c.pp} stages need at least {c.pp} layers; model {c.model!r} has {layers}")
    if c.precision == "fp16" and c.pp > 1:
        raise TrainConfigError(f"precision 'fp16' with pp = {c.pp}: the pipeline's update has no loss scaling; use "
                               "precision 'bf16' (or fp32) with pipeline stages")


# `luoshu train` with no config file, model or dataset: DCN (small towers) on 100k generated click logs,
# three epochs; it reaches an eval AUC of about 0.82 in about ten seconds on two cores.
DEFAULT_JOB = {"model": "dcn", "dataset": "synthetic-ctr", "optimizer": "adam", "lr": 1e-3, "epochs": 3,
               "batch_size": 512, "model_args": {"embedding_dim": 8, "mlp_dims": [256, 128], "num_cross_layers": 3},
               "data_args": {"num_samples": 100_000, "eval_samples": 20_000}}


def load_config(path: str | Path) -> dict:
    """Reads a YAML or JSON config file into a dict (YAML's safe loader: no Python objects)."""
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
