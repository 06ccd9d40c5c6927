"""`luoshu train` with parallelism hot switching (HotSPa): the `hot_switch` setting and its job loop.

    hot_switch: {buckets: [64, 32, 16, 0], strategies: ["dp1,tp4,pp1", "dp2,tp2,pp1", "dp4,tp1,pp1"]}

as HotSPa's scripts take it: descending bucket bounds ending with 0 and one strategy string per
bucket. The job (under `luoshu launch -n <ranks>`) trains a zoo language model (gpt2, llama) on
the documents of the `synthetic-lm` corpus, `batch_size` whole documents per step (no blocks:
each document keeps its length and lands in its bucket), through `luoshu.parallel.HotSPa`.
Rank 0 writes `metrics.csv`: per step the loss, the tokens each bucket's group ran
(`tokens_bucket<i>`, bucket i under strategy i), the bytes
the switches moved, the seconds rank 0 spent in them and the step time.

`parallel: auto` (`luoshu train --parallel auto`, with `--memory-budget-mb`) trains the same job
under one static plan that the layer-wise search picks (`luoshu.parallel.layerwise`): this
machine's per-layer profile (`hotspa_profile.profile`) and per-option activation bytes
(`layerwise.measure_layers`) feed the cost model, and `layerwise.search_plan` takes the fastest
(dp, tp, pp and its split, sequence parallel) over the launched ranks with a recompute choice per block (none,
selective, full) whose peak per device holds the epoch's batch of most packed rows in the budget
(an infeasible budget: a `HotSPaError` naming the least memory needed). The plan (per-layer
choices, predicted step time and memory) is printed and written to `parallel.json`; the chosen
blocks are marked for recompute (overriding the model's `recompute` setting) and the job runs as
a one-bucket HotSPa, i.e. `ls.parallel.parallelize` under that mesh (a pp > 1 plan: its pipeline, at the
searched split, owns the parameters, each stage holding its own; a per-block plan as the per-block
strategy `tp[..]`, in pipeline stages `pp2,tp[..]` at the searched split: `plan_strategy`).

Checkpoints: at every `checkpoint_interval` steps (default: every epoch; 0: only at the end)
and at the end, the full parameters and optimizer state, gathered from the owner strategy's
layout, are written by rank 0 as the regular checkpoint package (`ls.save`, `step-<N>`), so
`ls.load` reads one into a plain model; `--resume` continues from the newest one under the
same or another hot-switching configuration (or `parallel: auto`), sharding it anew.

A plain job (no `hot_switch`) resumes such a checkpoint and this job a plain one's: the metadata
holds the trainer's fields (step, epoch and batch in epoch, the epoch's length in steps, the
random generator, the learning-rate schedule's state), the tensors are the same package. The data
position is the step: this job's batches are `batch_size` whole documents in corpus order, the plain
job's shuffled blocks of `seq_len` tokens, and each finds its epoch and batch from the step when
the checkpoint's epochs had another length. The models must agree in shape: a plain job's take
positions up to data_args `seq_len`, this job's up to the first bucket bound (set them equal).
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch.distributed as torch_dist

from luoshu.checkpoint import load, load_tensors, save_full, verify
from luoshu.core import manual_seed
from luoshu.core.errors import CheckpointError, Error
from luoshu.data.packing import _check_bounds, bucket_batch
from luoshu.data.synthetic import synthetic_sequences
from luoshu.distributed import env
from luoshu.parallel import hotspa_profile, layerwise, mixed_tp
from luoshu.parallel.hotspa import parse_strategy
from luoshu.parallel.hotspa_runtime import HotSPa
from luoshu.parallel.pipeline import _layers
from luoshu.train.builders import build_model, build_optimizer, build_scheduler
from luoshu.train.checkpoints import (
    checkpoint_dir,
    generator_state,
    latest_checkpoint,
    list_checkpoints,
    set_generator_state,
)
from luoshu.train.errors import TrainConfigError

MODELS = ("gpt2", "llama")
CORPUS = {"num_docs": 2000, "vocab": 256, "min_len": 4, "max_len": 256, "seed": 0}


def check_hot_switch(config, source: str = "config") -> tuple[list[int] | None, list[str] | None]:
    """(bucket bounds, strategy strings) of `config.hot_switch` ((None, None) for `parallel: auto`,
    whose strategy the search picks at run time), or a `TrainConfigError` naming what is wrong."""
    hs = config.hot_switch
    bounds = strategies = None
    budget = config.memory_budget_mb
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0):
        raise TrainConfigError(f"{source}: memory_budget_mb must be a positive number of MiB, found {budget!r}")
    if config.parallel is not None:
        if config.parallel != "auto":
            raise TrainConfigError(f"{source}: parallel must be 'auto', found {config.parallel!r}")
        if hs is not None:
            raise TrainConfigError(
                f"{source}: parallel 'auto' picks one static strategy; hot_switch gives one per bucket: set one of them"
            )
    elif hs is None:
        raise TrainConfigError(f"{source}: memory_budget_mb needs parallel 'auto' or a hot_switch setting")
    else:
        if not isinstance(hs, Mapping) or set(hs) != {"buckets", "strategies"}:
            raise TrainConfigError(
                f"{source}: hot_switch must be a mapping with exactly 'buckets' and 'strategies', found {hs!r}"
            )
        try:
            bounds = _check_bounds(hs["buckets"])
            strategies = [str(s) for s in hs["strategies"]]
            for s in strategies:
                parse_strategy(s)
        except (Error, TypeError) as exc:
            raise TrainConfigError(f"{source}: hot_switch: {exc}") from None
        if len(strategies) != len(bounds) - 1:
            raise TrainConfigError(
                f"{source}: hot_switch: buckets {bounds} make {len(bounds) - 1} buckets, which need "
                f"as many strategies; found {len(strategies)}"
            )
    if config.model not in MODELS or config.dataset != "synthetic-lm":
        raise TrainConfigError(
            f"{source}: {'hot_switch' if hs is not None else 'parallel auto'} trains {' or '.join(MODELS)} on "
            f"'synthetic-lm'; found model "
            f"{config.model!r} on {config.dataset!r}"
        )
    if config.precision != "fp32":
        raise TrainConfigError(
            f"{source}: hot_switch / parallel auto run in fp32; found precision {config.precision!r}"
        )
    unknown = sorted(set(config.data_args) - set(CORPUS) - {"seq_len", "eval_fraction"})
    if unknown:
        raise TrainConfigError(
            f"{source}: hot_switch: unknown data_args {unknown} for the documents of "
            f"'synthetic-lm'; known: {sorted(CORPUS)}"
        )
    return bounds, strategies


def _barrier() -> None:
    if env.is_distributed():
        torch_dist.barrier()


def save_checkpoint(path: Path, hot: HotSPa, model, optimizer, metadata: dict) -> Path | None:
    """Writes the regular checkpoint package at `path` from rank 0: every parameter and optimizer
    state tensor gathered from the owner strategy's shards (a collective: every rank calls it).
    Returns the path on rank 0, None elsewhere."""
    full = [hot.gather(k, p._value) for k, p in enumerate(hot.params)]
    full_state = hot.full_optimizer_state(optimizer)
    written = None
    if env.rank() == 0:
        # the writer reads the module's and the optimizer's tensors: the full ones stand in for the
        # shards while it writes, then the shards come back. `save_full`, not `ls.save`: the values
        # are whole already, and `ls.save`'s layout hook would gather the TP-annotated parameters
        # again as a collective that only this rank joins
        shards = [p._value for p in hot.params]
        shard_state = list(optimizer._state)
        try:
            for p, v in zip(hot.params, full):
                p._value = v
            optimizer._state[:] = full_state
            written = save_full(path, model, optimizer, metadata=json.loads(json.dumps(metadata)))
        finally:
            for p, v in zip(hot.params, shards):
                p._value = v
            optimizer._state[:] = shard_state
    _barrier()
    return written


def _resume_point(config) -> tuple[Path, dict]:
    """The newest checkpoint and its metadata, checked against this job."""
    path = latest_checkpoint(config.checkpoint_path)
    if path is None:
        raise TrainConfigError(f"--resume: no checkpoint in {config.checkpoint_path}")
    saved = verify(path).get("metadata", {})
    for key in ("step", "config", "generator"):
        if key not in saved:
            raise CheckpointError(f"checkpoint {path} has no training position ({key!r} missing from its metadata); "
                                  "was it written by luoshu train?")
    for key in ("model", "dataset", "model_args", "data_args", "seed", "batch_size"):
        if saved["config"].get(key) != getattr(config, key):
            raise TrainConfigError(
                f"cannot resume from {path}: it was trained with {key}={saved['config'].get(key)!r}, "
                f"this job has {key}={getattr(config, key)!r}"
            )
    return path, saved


def load_optimizer(path: Path, hot: HotSPa, optimizer) -> None:
    """The full optimizer state of the checkpoint package at `path`, sharded into `hot`'s owner's
    layout on this rank (a pipeline owner's stage: the state of the parameters it holds only)."""
    meta = json.loads((path / "optimizer.json").read_text())
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"checkpoint {path} holds {meta.get('class')} state, not {type(optimizer).__name__}")
    tensors = load_tensors(path / "optimizer.safetensors")
    k_of = {optimizer._index[id(p)]: k for k, p in enumerate(hot.params)}
    sharded = {}
    for key, value in tensors.items():
        _, i, _ = key.split(".", 2)
        shard = hot.shard(k_of[int(i)], value)
        if shard is not None:  # a pipeline owner's stage keeps the state of the parameters it holds
            sharded[key] = shard
    held = {str(i) for i, k in k_of.items() if hot.holds(k)}
    state_meta = {**meta["meta"], "state": {i: e for i, e in meta["meta"]["state"].items() if i in held}}
    optimizer.load_state_dict({"tensors": sharded, "meta": state_meta})


def _worst_batch(config, docs, row_len: int) -> tuple[list[int], int]:
    """(lengths, rows) of the epoch's batch that packs into the most rows of `row_len` tokens (the
    activation memory a budget must hold grows with them)."""
    batches = [docs[i : i + config.batch_size] for i in range(0, len(docs) - config.batch_size + 1, config.batch_size)]
    rows = [bucket_batch(b, [row_len, 0])[0].rows.num_rows for b in batches]
    return [len(d) for d in batches[max(range(len(batches)), key=rows.__getitem__)]], max(rows)


def _choose_static(config, model, docs, row_len: int) -> layerwise.LayerPlan:
    """`parallel: auto`: the layer-wise search's plan (strategy, each block's recompute), printed
    and written to parallel.json."""
    budget = float("inf") if config.memory_budget_mb is None else float(config.memory_budget_mb) * 2**20
    prof = hotspa_profile.profile(model)
    lengths, rows = _worst_batch(config, docs, row_len)
    # pp > 1 candidates too: a pipeline plan trains as a one-strategy HotSPa whose pipeline owns the
    # parameters, each stage holding only its own (the states the plan's memory counts)
    plan, table = layerwise.search_plan(prof, model, env.world_size(), rows, row_len, lengths, budget,
                                        pipeline=True, mixed_tp=True)
    candidates = []
    for st, p, needs in table:
        fits = isinstance(p, layerwise.LayerPlan)
        name = ("mixed tp" + (f" pp{needs['pp']}" if needs.get("pp", 1) > 1 else "") if st is None
                else f"dp{st.dp},tp{st.tp},pp{st.pp}" + (",sp" if st.sp else ""))
        candidates.append(
            {
                **(p.as_dict() if fits else {"strategy": name}),
                "fits": fits,
                "least_memory_bytes": needs["least_bytes"],
                "memory_without_recompute_bytes": needs["free_bytes"],
            }
        )
    if env.rank() == 0:
        print(
            f"--parallel auto: {plan.text} over {env.world_size()} ranks, recompute per layer {plan.recompute}, "
            f"predicted {plan.time_s * 1e3:.2f} ms per step and {plan.memory_bytes / 2**20:.2f} MiB per device "
            f"(candidates: "
            + ", ".join(
                f"{c['strategy']} {c['predicted_step_s'] * 1e3:.2f} ms {c['predicted_memory_bytes'] / 2**20:.2f} MiB"
                if c["fits"]
                else f"{c['strategy']} needs {c['least_memory_bytes'] / 2**20:.2f} MiB"
                for c in candidates
            )
            + ")",
            flush=True,
        )
        config.job_dir.mkdir(parents=True, exist_ok=True)
        record = {
            **plan.as_dict(),
            "memory_budget_bytes": None if config.memory_budget_mb is None else budget,
            "batch_rows": rows,
            "candidates": candidates,
            "profile": {
                "flops": prof.flops,
                "layer_overhead_s": prof.layer_overhead_s,
                "activation_scale": prof.activation_scale,
                "bandwidth": prof.bandwidth,
            },
        }
        (config.job_dir / "parallel.json").write_text(json.dumps(record, indent=1))
    return plan


def plan_strategy(model, plan: layerwise.LayerPlan) -> tuple[str, list[str] | None]:
    """(the HotSPa strategy string, each stage's first module name or None) that runs the layer-wise
    search's `plan`: a plan with one tp (and sp) per block as a per-block strategy (`mixed_tp`), in
    its pipeline stages ("pp2,tp[..]") where it has them; a pipeline plan at the split it chose."""
    text = mixed_tp.plan_text(plan.strategy, plan.recompute, plan.tp, plan.sp, plan.pp)
    if plan.pp == 1:
        return text, None
    prefix, _ = _layers(model)
    return text, [f"{prefix}.{i}" for i in plan.stages]


def train_hot_switch(config) -> dict[str, float]:
    """Runs the job (`hot_switch` or `parallel: auto`); returns {"train_loss": the last step's loss}."""
    bounds, strategies = check_hot_switch(config)
    corpus = {**CORPUS, **{k: v for k, v in config.data_args.items() if k in CORPUS}}
    if bounds is None:
        bounds = [corpus["max_len"], 0]  # one bucket: every document under the one searched strategy
    if corpus["max_len"] > bounds[0]:
        raise TrainConfigError(
            f"hot_switch: documents up to {corpus['max_len']} tokens (data_args max_len) do not "
            f"fit the first bucket bound {bounds[0]}"
        )
    env.init()
    docs = synthetic_sequences(
        corpus["num_docs"], corpus["vocab"], corpus["min_len"], corpus["max_len"], num_special=1, seed=corpus["seed"]
    )
    steps_per_epoch = len(docs) // config.batch_size
    if steps_per_epoch == 0:
        raise TrainConfigError(f"hot_switch: {len(docs)} documents make no batch of {config.batch_size}")
    total = config.max_steps or config.epochs * steps_per_epoch
    resume = _resume_point(config) if config.resume else None
    manual_seed(config.seed)
    lengths = {"block_size": bounds[0], "max_seq_len": bounds[0]}
    model, _ = build_model(config.model, {}, config.model_args, {"vocab_size": corpus["vocab"], **lengths})
    if resume is not None:  # the full values, before HotSPa shards them
        try:
            load(resume[0], model)
        except CheckpointError as exc:  # verified before anything changed: another model's shapes
            raise CheckpointError(f"cannot resume from {resume[0]}: {exc}") from None
    recompute, stages = None, {}
    if strategies is None:
        plan = _choose_static(config, model, docs, bounds[0])
        layerwise.apply_plan(model, plan.recompute)  # before HotSPa traces the model
        text, split = plan_strategy(model, plan)
        strategies, recompute = [text], plan.recompute
        if split is not None:
            stages = {0: split}
    budget = None if config.memory_budget_mb is None else float(config.memory_budget_mb) * 2**20
    # uniform pipeline strategies: the split the cost model balances (the last stage also runs the head);
    # a per-block one in stages ("pp2,tp[..]") without a searched split: HotSPa's, by parameter count
    for i, s in enumerate(strategies):
        st = parse_strategy(s)
        if st.pp > 1 and not st.mixed and i not in stages:
            stages[i] = layerwise.pipeline_stages(model, st, bounds[i])
    hot = HotSPa(
        model, strategies, bounds, memory_budget=budget if config.hot_switch is not None else None, stages=stages
    )
    optimizer = build_optimizer(config, model.parameters())
    scheduler = build_scheduler(config, optimizer, total)
    first = 0
    if resume is not None:  # the position is the step: this job's batches are the documents from it on
        load_optimizer(resume[0], hot, optimizer)
        saved = resume[1]
        first = int(saved["step"])
        set_generator_state("cpu", saved["generator"])
        if scheduler is not None and saved.get("scheduler") is not None:
            scheduler.load_state_dict(saved["scheduler"])
    interval = steps_per_epoch if config.checkpoint_interval is None else config.checkpoint_interval
    job = config.job_dir
    writer = None
    if env.rank() == 0:
        job.mkdir(parents=True, exist_ok=True)
        columns = [
            "step",
            "train_loss",
            *[f"tokens_bucket{i}" for i in range(len(strategies))],
            "switch_bytes",
            "switch_s",
            "step_s",
        ]
        kept = []
        if resume is not None and (job / "metrics.csv").is_file():  # the rows up to the checkpoint stay
            with open(job / "metrics.csv", newline="") as old:
                kept = [r for r in csv.DictReader(old) if int(r["step"]) <= first]
        f = open(job / "metrics.csv", "w", newline="")
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for r in kept:
            writer.writerow({k: r.get(k, "") for k in columns})
    loss = float("nan")
    try:
        for step in range(first, total):
            start = (step % steps_per_epoch) * config.batch_size
            tick = time.perf_counter()
            report = hot.step(docs[start : start + config.batch_size], optimizer)
            if scheduler is not None:
                scheduler.step()
            loss = report.loss
            if writer is not None:
                row = {
                    "step": step + 1,
                    "train_loss": f"{loss:.6g}",
                    "switch_bytes": report.switch_bytes,
                    "switch_s": f"{report.switch_seconds:.6g}",
                    "step_s": f"{time.perf_counter() - tick:.6g}",
                }
                for i in range(len(strategies)):
                    row[f"tokens_bucket{i}"] = report.tokens.get(i, 0)
                writer.writerow(row)
                f.flush()
                if config.progress:
                    print(
                        f"step {step + 1}/{total} loss {loss:.4f} tokens {report.tokens} switch "
                        f"{report.switch_bytes} B in {report.switch_seconds * 1e3:.1f} ms",
                        flush=True,
                    )
            done = step + 1
            if done == total or (interval and done % interval == 0):
                metadata = {  # the plain trainer's fields (either job resumes the other's checkpoint)
                    "step": done,
                    "epoch": done // steps_per_epoch,
                    "batch_in_epoch": done % steps_per_epoch,
                    "steps_per_epoch": steps_per_epoch,
                    "config": config.to_dict(),
                    "task": "lm",
                    "generator": generator_state("cpu"),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "loss_scaler": None,
                    "strategies": list(strategies),
                    "recompute": recompute,
                    "bounds": list(bounds),
                    "train_loss": loss,
                }
                save_checkpoint(checkpoint_dir(config.checkpoint_path, done), hot, model, optimizer, metadata)
                if env.rank() == 0 and config.keep_checkpoints:
                    for _, old in list_checkpoints(config.checkpoint_path)[: -config.keep_checkpoints]:
                        shutil.rmtree(old, ignore_errors=True)
    finally:
        if writer is not None:
            f.close()
    return {"train_loss": loss}


__all__ = ["check_hot_switch", "load_optimizer", "plan_strategy", "save_checkpoint", "train_hot_switch"]
