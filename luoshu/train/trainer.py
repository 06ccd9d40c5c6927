"""The `Trainer` behind `luoshu train`: one define-and-run graph, the training loop, evaluation, checkpoints
with the training position, and the job's `metrics.csv` and TensorBoard events."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import yaml
from tensorboardX import SummaryWriter
from tqdm import tqdm

from luoshu.amp import autocast
from luoshu.checkpoint import load, save, verify
from luoshu.core import Graph, manual_seed
from luoshu.core.errors import CheckpointError, Error
from luoshu.core.tensor import normalize_device
from luoshu.data import DataError, DataLoader
from luoshu.gnn.job import train_node_job
from luoshu.optim import LossScaler
from luoshu.parallel import DataParallel
from luoshu.train.batches import EpochBatches, StreamBatches, epoch_order
from luoshu.train.builders import build_model, build_optimizer, build_scheduler, model_table
from luoshu.train.checkpoints import (
    PreviousRun,
    checkpoint_dir,
    generator_state,
    latest_checkpoint,
    list_checkpoints,
    set_generator_state,
)
from luoshu.train.config import TrainConfig, check_config
from luoshu.train.errors import Terminated, TrainConfigError
from luoshu.train.hot_switch import train_hot_switch
from luoshu.train.parallel_run import ParallelRun
from luoshu.train.tasks import TASKS, is_masked_lm, masked_lm


class Trainer:
    """Trains one job in define-and-run mode; `fit()` runs it and returns the last eval metrics."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.task_name, spec = check_config(config)
        # dp x tp x pp under luoshu launch (check_config matched it to the world size)
        self.parallel = ParallelRun(config) if config.dp * config.tp * config.pp > 1 else None
        self.writes = self.parallel is None or self.parallel.writes  # only rank 0 writes the job directory
        if self.writes and PreviousRun(config.job_dir, config.checkpoint_path).recover():
            print(f"{config.job_dir}: restored the results of the run before an attempt that stopped before its "
                  "first checkpoint", file=sys.stderr)
        if self.parallel is not None:  # rank 0 has put the job directory in order
            self.parallel.barrier()
        if config.resume and latest_checkpoint(config.checkpoint_path) is None:
            raise TrainConfigError(f"--resume: no checkpoint in {config.checkpoint_path}")
        _check_writable(config.job_dir, "--out")  # before the data load, which may take long
        _check_writable(config.checkpoint_path, "--checkpoint-dir")
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

        if self.task_name == "lm" and is_masked_lm(model_table()[config.model][1]):
            vocab = self.data.min_info["vocab_size"]
            self.data.min_info["vocab_size"] = vocab + 1  # one more id: [MASK]
            self.data.transform = masked_lm(vocab)
        manual_seed(config.seed)
        self.model, self.model_config = build_model(config.model, self.data.info, config.model_args,
                                                    self.data.min_info)
        if self.device != "cpu":
            self.model.to(self.device)
        if self.parallel is not None:
            self.parallel.prepare(self.model)  # before the optimizer, which holds this rank's blocks
        self.optimizer = build_optimizer(config, self.model.parameters())
        self.scheduler = build_scheduler(config, self.optimizer, self.total_steps)
        low = {"bf16": "bfloat16", "fp16": "float16"}.get(config.precision)
        self.loss_scaler = LossScaler() if config.precision == "fp16" else None
        if self.loss_scaler is not None and self.parallel is not None:
            self.loss_scaler.agree_across(())  # every rank skips the same steps (its gradients are its own shards)
        with Graph(f"train-{config.model}") as graph, autocast(low or "bfloat16", enabled=low is not None):
            self.feeds = self.task.placeholders(self.data.train or self.data.eval, self.device)
            self.model.train()
            output = self.task.forward(self.model, self.feeds)
            self.loss = self.task.loss(output, self.feeds[self.task.target])
            # a pipeline trains through its stage plans; this graph then only evaluates
            self.train_op = None if config.pp > 1 else self.optimizer.minimize(self.loss, loss_scaler=self.loss_scaler)
            self.model.eval()
            self.eval_output = self.task.forward(self.model, self.feeds)
            self.model.train()
        self.graph = graph
        if config.pp > 1:  # the stages' graphs are recorded here: under the same autocast
            with autocast(low or "bfloat16", enabled=low is not None):
                self.parallel.build_pipeline(self.model, self.optimizer, self.task, self.data.train or self.data.eval)
        # ZeRO: the shards' state is checkpointed as the plain optimizer's (consolidated_state_dict);
        # a pipeline shards its stages itself (build_pipeline), its checkpoints through the layout hook
        self.dp = DataParallel(graph, zero=config.zero) if config.zero and config.pp == 1 else None
        if config.compile:
            graph.compile([self.loss, self.train_op])
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.window = {"loss_sum": 0.0, "steps": 0, "samples": 0, "seconds": 0.0}
        self.memory_report = None  # the first step's, with --profile-memory
        self.last_metrics: dict[str, float] = {}
        self._eval_data: dict[str, np.ndarray] | None = None

    # --- pieces -------------------------------------------------------------------------------------
    def _profile_step(self, feed: dict, bar) -> float:
        """Runs one training step through the plan's memory accounting (the same kernels in the
        same order as `run`); prints the report and writes it to memory.json. Returns the loss."""
        report = self.graph.memory([self.loss, self.train_op], feed)
        self.memory_report = report
        bar.write(f"memory of one training step of {self.config.model}:\n{report}")
        (self.config.job_dir / "memory.json").write_text(json.dumps(
            {**report.as_dict(), "timeline": report.timeline}, indent=1))
        return report.outputs[0]

    def _profile_pipeline_step(self, batch: dict, bar) -> float:
        """A pipeline job's first step through its stage plans' memory accounting (`Pipeline.memory`,
        every rank): rank 0 prints each rank's bytes and writes them to memory.json. Returns the loss."""
        loss, ranks = self.parallel.pipeline_memory(batch, self.task)
        self.memory_report = ranks
        if self.writes:
            keys = [k for k in ranks[0] if k not in ("rank", "stage", "dp", "tp")]
            lines = [f"rank {r['rank']} (stage {r['stage']}, dp {r['dp']}, tp {r['tp']}): "
                     + ", ".join(f"{k.replace('_', ' ')} {r[k] / 2**20:.3f} MiB" for k in keys) for r in ranks]
            bar.write(f"memory of one training step of {self.config.model} (zero = {self.config.zero}):\n"
                      + "\n".join(lines))
            (self.config.job_dir / "memory.json").write_text(json.dumps({"zero": self.config.zero, "ranks": ranks},
                                                                        indent=1))
        return loss

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
        # pipeline ranks hold only their stage's trained values (ZeRO-3: only their shards of them)
        with self.parallel.whole_model() if self.parallel is not None else contextlib.nullcontext():
            return self.task.evaluate(self.predict, self._eval_data, c.eval_batch_size or 4 * c.batch_size)

    def _epoch_batches(self):
        """The training batches of the current epoch from `batch_in_epoch` on, as a dataset for DataLoader."""
        c = self.config
        if self.data.train_stream is not None:
            return StreamBatches(self.data.train_stream, self.epoch, c.batch_size, self.batch_in_epoch)
        order = epoch_order(c.seed, self.epoch, len(self.data.train[self.task.target]))
        return EpochBatches(self.data.train, order, c.batch_size, self.batch_in_epoch, self.data.transform,
                            (c.seed, self.epoch))

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # --- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Writes `step-<N>`; the first one a run writes replaces the previous run's results."""
        c = self.config
        metadata = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                    "steps_per_epoch": self.steps_per_epoch, "config": c.to_dict(), "task": self.task_name,
                    "window": dict(self.window),
                    "metrics": self.last_metrics, "generator": generator_state(self.device),
                    "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                    "loss_scaler": self.loss_scaler.state_dict() if self.loss_scaler is not None else None}
        path = checkpoint_dir(c.checkpoint_path, self.step)
        if self.parallel is not None:  # full tensors, written by rank 0 (a collective)
            self.parallel.save(path, self.model, self.optimizer, json.loads(json.dumps(metadata)))
            if not self.writes:
                return path
        else:
            with self._whole_state() as optimizer:
                path = save(path, self.model, optimizer, metadata=json.loads(json.dumps(metadata)))
        if c.keep_checkpoints:
            for _, old in list_checkpoints(c.checkpoint_path)[:-c.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        previous = getattr(self, "_previous", None)
        if previous is not None and previous.pending:
            previous.discard()
        return path

    @contextlib.contextmanager
    def _whole_state(self):
        """The optimizer to checkpoint, with the model's parameters whole: with ZeRO, a plain
        optimizer holding the consolidated state of the shards (a ZeRO checkpoint is a plain one)."""
        if self.dp is None:
            yield self.optimizer
            return
        with self.dp.sync.gathered_parameters():
            plain = build_optimizer(self.config, self.model.parameters())
            plain.load_state_dict(self.dp.sync.consolidated_state_dict())
            yield plain

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restores model, optimizer and training position from a checkpoint written by this trainer."""
        path = Path(path)
        saved = verify(path).get("metadata", {})
        for key in ("step", "epoch", "batch_in_epoch", "config", "generator"):
            if key not in saved:
                raise CheckpointError(f"checkpoint {path} has no training position ({key!r} missing from its "
                                      "metadata); was it written by luoshu train?")
        old = saved["config"]
        for key in ("model", "dataset", "model_args", "data_args", "seed", "batch_size"):  # not the layout
            if old.get(key) != getattr(self.config, key):
                raise TrainConfigError(f"cannot resume from {path}: it was trained with {key}={old.get(key)!r}, "
                                       f"this job has {key}={getattr(self.config, key)!r}")
        with self._whole_state() as optimizer:
            try:
                load(path, self.model, optimizer)
            except CheckpointError as exc:  # verified before anything changed: another model's shapes
                raise CheckpointError(f"cannot resume from {path}: {exc}") from None
            state = optimizer.state_dict()
        if self.dp is not None:
            self.dp.sync.load_state_dict(state)
        self.step, self.epoch, self.batch_in_epoch = saved["step"], saved["epoch"], saved["batch_in_epoch"]
        if self.steps_per_epoch is not None and saved.get("steps_per_epoch") != self.steps_per_epoch:
            # the writer's epochs had another length (a hot-switching job's batches are whole documents):
            # the position in this job's epochs is the step's, as this job's own checkpoint would hold it
            self.epoch, self.batch_in_epoch = divmod(self.step, self.steps_per_epoch)
        self.window = dict(saved.get("window") or self.window)
        self.last_metrics = dict(saved.get("metrics") or {})
        set_generator_state(self.device, saved["generator"])
        if self.scheduler is not None and saved.get("scheduler") is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        if self.loss_scaler is not None and saved.get("loss_scaler"):
            self.loss_scaler.load_state_dict(saved["loss_scaler"])
        return saved

    # --- the loop -----------------------------------------------------------------------------------
    def _resume_point(self) -> Path:
        """The newest checkpoint that verifies; a corrupt newer one is named and passed over."""
        c = self.config
        found = list_checkpoints(c.checkpoint_path)
        if not found:
            raise TrainConfigError(f"--resume: no checkpoint in {c.checkpoint_path}")
        bad = []
        for _, path in reversed(found):
            try:
                verify(path)
            except CheckpointError as exc:
                bad.append(f"{path.name} ({exc})")
                continue
            if bad:
                print(f"--resume: the newest checkpoint(s) cannot be used: {'; '.join(bad)}; resuming from "
                      f"{path}, the newest good one", file=sys.stderr)
            return path
        raise CheckpointError(f"--resume: no checkpoint in {c.checkpoint_path} can be used: {'; '.join(bad)}")

    def fit(self) -> dict[str, float]:
        c = self.config
        job = c.job_dir
        _make_dir(job, "--out")
        previous = PreviousRun(job, c.checkpoint_path)
        if c.resume:
            self.load_checkpoint(self._resume_point())
        elif not self.writes:
            previous = _NoPreviousRun()
        else:
            moved = previous.set_aside()
            if moved:  # a later --resume must not pick up the previous run's checkpoints
                print(f"starting over: the previous run's {moved} wait in {previous.job_aside.name}/ and are "
                      "replaced once this run saves its first checkpoint (--resume continues a run instead)",
                      file=sys.stderr)
        self._previous = previous
        if self.parallel is not None:  # rank 0 has set the previous run aside before anyone writes
            self.parallel.barrier()
        try:
            with _StopRequests() as stop:
                return self._loop(stop)
        except BaseException:
            if previous.pending:
                previous.restore()
                print(f"this run stopped before its first checkpoint: the previous run's results in {job} are "
                      "back as they were", file=sys.stderr)
            raise

    def _loop(self, stop: _StopRequests) -> dict[str, float]:
        c = self.config
        job = c.job_dir
        if self.writes:
            (job / "config.yaml").write_text(_dump_yaml(c.to_dict()))
            columns = ("step", "epoch", "train_loss", *self.task.metrics, "samples_per_s", "lr")
            log = _MetricsLog(job / "metrics.csv", columns, resume_step=self.step if c.resume else None)
            # A resumed run's points replace those the interrupted run logged after its checkpoint (purge_step);
            # the suffix keeps two runs started within one second from sharing (and clobbering) a file name.
            writer = SummaryWriter(logdir=str(job), purge_step=self.step if c.resume else None, flush_secs=10,
                                   filename_suffix=f".{uuid.uuid4().hex[:8]}")
        else:  # ranks other than 0 of a parallel job write nothing
            log, writer = _Discard(), _Discard()
        bar = tqdm(total=self.total_steps * c.batch_size, initial=self.step * c.batch_size, unit="sample",
                   unit_scale=True, disable=not c.progress or not self.writes, dynamic_ncols=True,
                   desc=f"{c.model} on {c.dataset}")
        interval_loss, interval_steps = 0.0, 0
        saved_at = None
        try:
            while self.step < self.total_steps:
                loader = DataLoader(self._epoch_batches(), batch_size=None, num_workers=c.num_workers)
                tick, first = time.perf_counter(), self.batch_in_epoch
                for batch in loader:
                    if self.parallel is not None and c.pp > 1 and c.profile_memory and self.memory_report is None:
                        loss = self._profile_pipeline_step(batch, bar)
                    elif self.parallel is not None and c.pp > 1:
                        loss = self.parallel.pipeline_step(batch, self.task)
                    elif self.parallel is not None:
                        loss, _ = self.graph.run([self.loss, self.train_op], self._feed(self.parallel.share(batch)))
                        loss = self.parallel.mean_loss(float(loss))
                    elif c.profile_memory and self.memory_report is None:
                        loss = self._profile_step(self._feed(batch), bar)
                    else:
                        loss, _ = self.graph.run([self.loss, self.train_op], self._feed(batch))
                    loss = float(loss)
                    if not math.isfinite(loss):
                        raise self._non_finite_loss(loss, batch)
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
                        saved_at = self.step
                    if stop.signum is not None:  # SIGTERM / Ctrl-C, honoured between steps
                        raise stop.interrupt()
                    if last or end_of_epoch:
                        break
                    tick = time.perf_counter()
                else:  # a stream of unknown length ran out: that was one pass
                    if self.batch_in_epoch == first:
                        raise TrainConfigError(f"dataset {c.dataset!r}: a pass over the training files gave no "
                                               f"full batch of {c.batch_size} rows")
                    if self.steps_per_epoch is None:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        except KeyboardInterrupt as exc:
            bar.close()
            if self.step:
                path = self.save_checkpoint() if saved_at != self.step else checkpoint_dir(c.checkpoint_path,
                                                                                         self.step)
                how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
                print(f"{how} at step {self.step}: saved {path}; continue with --resume", file=sys.stderr)
            raise
        finally:
            bar.close()
            writer.close()
        return self.last_metrics

    def _non_finite_loss(self, loss: float, batch: dict[str, np.ndarray]) -> Error:
        """Bad data (a NaN or infinity in the batch) or divergence: which one, in words."""
        where = f"step {self.step + 1} (epoch {self.epoch + 1}, batch {self.batch_in_epoch + 1})"
        bad = {}
        for key, value in batch.items():
            value = np.asarray(value)
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                bad[key] = int((~np.isfinite(value)).sum())
        if bad:
            found = ", ".join(f"{n} in {key!r}" for key, n in bad.items())
            return DataError(f"dataset {self.config.dataset!r}: the batch of {where} holds NaN or infinite values "
                             f"({found}); the loss is {loss}. Clean the data (this is not divergence)")
        return Error(f"training diverged: the loss is {loss} at {where}; lower the learning rate (now "
                     f"{self._lr():g})")

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


class _Discard:
    """What a rank other than 0 writes to: nothing (the metrics log and TensorBoard writer of rank 0)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _NoPreviousRun:
    """A rank other than 0 leaves the previous run's results to rank 0."""

    pending = False


class _StopRequests:
    """SIGTERM (what Kubernetes and schedulers send) and Ctrl-C during `fit`: the current step finishes,
    a checkpoint is saved and the run stops, so a checkpoint never holds a half-applied update. A second
    signal stops at once. Handlers are installed only in the main thread (Python's rule) and restored after."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: stop now
            raise self.interrupt()
        self.signum = signum

    def interrupt(self) -> KeyboardInterrupt:
        return Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()


def _check_writable(path: Path, flag: str) -> None:
    """Refuses (TrainConfigError) a directory path that is a file, lies under a file, or under a folder
    this process may not write to; writes nothing, so a refused job leaves no trace."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe == path and not path.is_dir():
        raise TrainConfigError(f"{flag} {path}: a file is in the way; expected a directory (or no such path)")
    if not probe.is_dir():
        raise TrainConfigError(f"{flag} {path}: cannot write there ({probe} is a file, not a directory)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise TrainConfigError(f"{flag} {path}: cannot write there ({probe} is not writable)")


def _make_dir(path: Path, flag: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a read-only file system, which os.access does not see for root
        raise TrainConfigError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None


def _metric_text(values: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in values.items())


def _dump_yaml(values: dict) -> str:
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
    """Runs a training job; returns the last eval metrics. Node classification on a graph (the
    gcn / graphsage / gat models) runs through `luoshu.gnn.job`, full-graph or sampled."""
    task, _ = check_config(config)
    if task == "node":
        return train_node_job(config, log=print if config.progress else None)
    if config.hot_switch is not None or config.parallel is not None:
        return train_hot_switch(config)
    return Trainer(config).fit()
