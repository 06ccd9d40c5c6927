"""`luoshu train` with parallelism hot switching (HotSPa): the `hot_switch` setting and its job loop.

    hot_switch: {buckets: [64, 32, 16, 0], strategies: ["dp1,tp4,pp1", "dp2,tp2,pp1", "dp4,tp1,pp1"]}

as HotSPa's scripts take it: descending bucket bounds ending with 0 and one strategy string per
bucket. The job (under `luoshu launch -n <ranks>`) trains a zoo language model (gpt2, llama) on
the documents of the `synthetic-lm` corpus, `batch_size` whole documents per step (no blocks:
each document keeps its length and lands in its bucket), through `luoshu.parallel.HotSPa`.
Rank 0 writes `metrics.csv`: per step the loss, the tokens each bucket's group ran
(`tokens_bucket<i>`, bucket i under strategy i), the bytes
the switches moved, the seconds rank 0 spent in them and the step time.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping

from luoshu.core import manual_seed
from luoshu.core.errors import Error
from luoshu.data.packing import _check_bounds
from luoshu.data.synthetic import synthetic_sequences
from luoshu.distributed import env
from luoshu.parallel.hotspa import parse_strategy
from luoshu.parallel.hotspa_runtime import HotSPa
from luoshu.train.builders import build_model, build_optimizer
from luoshu.train.errors import TrainConfigError

MODELS = ("gpt2", "llama")
CORPUS = {"num_docs": 2000, "vocab": 256, "min_len": 4, "max_len": 256, "seed": 0}


def check_hot_switch(config, source: str = "config") -> tuple[list[int], list[str]]:
    """(bucket bounds, strategy strings) of `config.hot_switch`, or a `TrainConfigError` naming what is wrong."""
    hs = config.hot_switch
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
            f"{source}: hot_switch trains {' or '.join(MODELS)} on 'synthetic-lm'; found model "
            f"{config.model!r} on {config.dataset!r}"
        )
    if config.precision != "fp32":
        raise TrainConfigError(f"{source}: hot_switch runs in fp32; found precision {config.precision!r}")
    unknown = sorted(set(config.data_args) - set(CORPUS) - {"seq_len", "eval_fraction"})
    if unknown:
        raise TrainConfigError(
            f"{source}: hot_switch: unknown data_args {unknown} for the documents of "
            f"'synthetic-lm'; known: {sorted(CORPUS)}"
        )
    return bounds, strategies


def train_hot_switch(config) -> dict[str, float]:
    """Runs the job; returns {"train_loss": the last step's loss}."""
    bounds, strategies = check_hot_switch(config)
    corpus = {**CORPUS, **{k: v for k, v in config.data_args.items() if k in CORPUS}}
    if corpus["max_len"] > bounds[0]:
        raise TrainConfigError(
            f"hot_switch: documents up to {corpus['max_len']} tokens (data_args max_len) do not "
            f"fit the first bucket bound {bounds[0]}"
        )
    env.init()
    docs = synthetic_sequences(
        corpus["num_docs"], corpus["vocab"], corpus["min_len"], corpus["max_len"], num_special=1, seed=corpus["seed"]
    )
    manual_seed(config.seed)
    lengths = {"block_size": bounds[0], "max_seq_len": bounds[0]}
    model, _ = build_model(config.model, {}, config.model_args, {"vocab_size": corpus["vocab"], **lengths})
    hot = HotSPa(model, strategies, bounds)
    optimizer = build_optimizer(config, model.parameters())
    steps_per_epoch = len(docs) // config.batch_size
    if steps_per_epoch == 0:
        raise TrainConfigError(f"hot_switch: {len(docs)} documents make no batch of {config.batch_size}")
    total = config.max_steps or config.epochs * steps_per_epoch
    job = config.job_dir
    writer = None
    if env.rank() == 0:
        job.mkdir(parents=True, exist_ok=True)
        f = open(job / "metrics.csv", "w", newline="")
        columns = [
            "step",
            "train_loss",
            *[f"tokens_bucket{i}" for i in range(len(strategies))],
            "switch_bytes",
            "switch_s",
            "step_s",
        ]
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
    loss = float("nan")
    try:
        for step in range(total):
            start = (step % steps_per_epoch) * config.batch_size
            tick = time.perf_counter()
            report = hot.step(docs[start : start + config.batch_size], optimizer)
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
                if config.progress:
                    print(
                        f"step {step + 1}/{total} loss {loss:.4f} tokens {report.tokens} switch "
                        f"{report.switch_bytes} B in {report.switch_seconds * 1e3:.1f} ms",
                        flush=True,
                    )
    finally:
        if writer is not None:
            f.close()
    return {"train_loss": loss}


__all__ = ["check_hot_switch", "train_hot_switch"]
