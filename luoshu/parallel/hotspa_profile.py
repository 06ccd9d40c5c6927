"""Profiling inputs of HotSPa's strategy search: this machine's per-layer time and activation memory.

`profile(model, lengths, batches)` runs one transformer block of a zoo language model (GPT-2 or
LLaMA) forward and backward at each (batch, sequence length) on the machine at hand, in the
model's dtype, and records the median time and the block's activation bytes at the plan's peak
(`Graph.memory`). Least squares then fit what the cost model assumes (`luoshu.parallel.hotspa`):

- time = (24·b·s·h² + 4·b·s²·h)·3 / F + c: F, the effective FLOP/s a layer reaches here, replaces
  the cluster's `flops · mfu`, c the fixed cost of a layer's kernels (measured, not modelled);
- activations = k · s·b·h·(34 + 5·a·s/h): k scales the model's bytes to this dtype and these
  kernels (the formula is for fp16 on GPUs).

With several processes, `profile` also times an all-reduce between them for the bandwidth.
`cluster(profile, ...)` turns the fit into a `ClusterSpec`; `choose_strategies` (HotSPa's
`strategies="auto"`) picks each bucket's strategy with `hotspa.simulate` over the runnable
(pp=1) strategies; `predict_steps` predicts the step time of each static strategy and of hot
switching for one batch (the benchmark prints it beside the measured times).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as torch_dist

from luoshu.core.autodiff import gradients
from luoshu.core.graph import Graph
from luoshu.distributed import env
from luoshu.nn.module import Module
from luoshu.parallel import hotspa as H


@dataclass
class Profile:
    """Measured per-layer points and the fitted cost-model constants of this machine."""

    spec: H.ModelSpec
    points: list[dict] = field(default_factory=list)  # {"batch", "length", "seconds", "activation_bytes"}
    flops: float = 0.0  # effective FLOP/s of a layer's forward + backward
    layer_overhead_s: float = 0.0
    activation_scale: float = 1.0
    bandwidth: float | None = None  # bytes/s of a ring all-reduce between the processes (None: one process)

    def layer_seconds(self, b: int, s: int) -> float:
        return 3.0 * H.layer_flops(self.spec, b, s) / self.flops + self.layer_overhead_s


def _block(model: Module):
    for name in ("h", "layers"):
        blocks = getattr(model, name, None)
        if blocks is not None and len(blocks):
            return blocks[0]
    raise H.HotSPaError(f"profile: {type(model).__name__} has no transformer blocks (h or layers)")


def _time_block(block: Module, dtype: str, b: int, s: int, h: int, repeats: int) -> tuple[float, int]:
    with Graph(name="profile") as g:
        x = g.placeholder("x", (None, None, h), dtype)
        y = block(x)
        loss = (y * y).sum()
        grads = gradients(loss, block.parameters() + [x])
    value = np.random.default_rng(0).standard_normal((b, s, h)).astype(np.float64 if dtype == "float64" else np.float32)
    fetches = [loss, *[gr for gr in grads if gr is not None]]
    report = g.memory(fetches, {x: value})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        g.run(fetches, {x: value})
        times.append(time.perf_counter() - start)
    return statistics.median(times), int(report.peak_activations)


def _bandwidth(nbytes: int = 8 * 2**20, repeats: int = 3) -> float | None:
    if not env.is_distributed() or env.world_size() < 2:
        return None
    n = env.world_size()
    buffer = torch.zeros(nbytes // 4, dtype=torch.float32)
    torch_dist.all_reduce(buffer)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch_dist.all_reduce(buffer)
        times.append(time.perf_counter() - start)
    # the ring's volume per rank, 2(n-1)/n of the buffer, over the slowest rank's time
    seconds = torch.tensor([statistics.median(times)], dtype=torch.float64)
    torch_dist.all_reduce(seconds, op=torch_dist.ReduceOp.MAX)
    return 2.0 * (n - 1) / n * nbytes / float(seconds[0])


def profile(
    model: Module, lengths: Sequence[int] = (16, 64, 256), batches: Sequence[int] = (1, 2), repeats: int = 3
) -> Profile:
    """Times one block of `model` at every (batch, length), fits the cost model's constants."""
    spec = H.model_spec(model)
    if spec is None:
        raise H.HotSPaError(f"profile: {type(model).__name__} is not a zoo language model with a GPT-2 or LLaMA config")
    block = _block(model)
    dtype = block.parameters()[0].dtype
    points = []
    for b in batches:
        for s in lengths:
            seconds, act = _time_block(block, dtype, int(b), int(s), spec.hidden, repeats)
            points.append({"batch": int(b), "length": int(s), "seconds": seconds, "activation_bytes": act})
    if env.is_distributed():  # one profile on every rank (they choose strategies from it): the mean
        seconds_t = torch.tensor([p["seconds"] for p in points], dtype=torch.float64)
        torch_dist.all_reduce(seconds_t)
        for p, v in zip(points, (seconds_t / env.world_size()).tolist()):
            p["seconds"] = v
    flops = np.array([3.0 * H.layer_flops(spec, p["batch"], p["length"]) for p in points])
    seconds = np.array([p["seconds"] for p in points])
    # relative errors (rows over their time): the small points, where the overhead shows, count as much
    weights = 1.0 / seconds
    (per_flop, overhead), *_ = np.linalg.lstsq(
        np.stack([flops, np.ones_like(flops)], 1) * weights[:, None], seconds * weights, rcond=None
    )
    if per_flop <= 0:  # kernels too small to see the FLOPs: all in the overhead
        per_flop, overhead = float(seconds.mean() / flops.mean()), 0.0
    model_bytes = np.array([H.layer_activation_bytes(spec, p["batch"], p["length"], 1, False, "none") for p in points])
    measured = np.array([p["activation_bytes"] for p in points], dtype=np.float64)
    scale = float(measured @ model_bytes / (model_bytes @ model_bytes))
    return Profile(spec, points, 1.0 / float(per_flop), max(float(overhead), 0.0), scale, _bandwidth())


def cluster(
    prof: Profile,
    devices: int,
    memory: float = float("inf"),
    bandwidth: float | None = None,
    devices_per_node: int | None = None,
) -> H.ClusterSpec:
    """The cost model's cluster for `devices` of this machine: profiled FLOP/s, measured (or given)
    bandwidth; activation bytes in the cost model's units, so `memory` is scaled alike."""
    bw = bandwidth or prof.bandwidth or 1e9
    per_node = devices_per_node or devices
    return H.ClusterSpec(
        per_node,
        max(1, devices // per_node),
        prof.flops,
        bw,
        bw,
        memory / prof.activation_scale,
        mfu=1.0,
        layer_overhead=prof.layer_overhead_s,
    )


def runnable(world: int, spec: H.ModelSpec) -> list[H.Strategy]:
    """The strategies HotSPa runs over `world` ranks: pp=1, tp dividing the heads."""
    return [
        H.Strategy(world // tp, tp, 1) for tp in (1, 2, 4, 8, 16, 32, 64) if world % tp == 0 and spec.heads % tp == 0
    ]


def choose_strategies(
    prof: Profile, world: int, bounds: Sequence[int], lengths: Sequence[int], memory: float = float("inf")
) -> list[str]:
    """One strategy string per bucket (HotSPa's `strategies="auto"`): the combination the profiled
    cost model predicts fastest for a batch with these `lengths`, every bucket within `memory`."""
    spec = prof.spec
    result = H.simulate(spec, cluster(prof, world, memory), lengths, bounds, options=runnable(world, spec))
    return [str(st) for st in result["chosen"]]


def choose_static(
    prof: Profile, world: int, lengths: Sequence[int], memory: float = float("inf")
) -> tuple[H.Strategy, H.Prediction, list[H.Prediction]]:
    """The static strategy (`luoshu train --parallel auto`) of a job over `world` ranks whose
    batches hold sequences of these `lengths`: the runnable strategy the profiled cost model
    predicts fastest among those that hold the longest sequence in `memory` bytes per device.
    Returns (strategy, its prediction, every candidate's prediction); a `HotSPaError` naming
    each candidate's need when none fits."""
    spec = prof.spec
    cl = cluster(prof, world, memory)
    options = runnable(world, spec)
    tokens = max(int(n) for n in lengths)
    table = [H.predict(spec, cl, st, lengths, tokens) for st in options]
    fitting = [(p, st) for p, st in zip(table, options) if p.fits]
    # predictions are in the cost model's units; memory back in this machine's bytes
    scale = prof.activation_scale
    for p in table:
        p.memory_bytes *= scale
    if not fitting:
        needs = ", ".join(f"{p.strategy} {p.memory_bytes / 2**20:.2f} MiB" for p in table)
        raise H.HotSPaError(
            f"--parallel auto: no strategy over {world} ranks holds sequences of {tokens} tokens in "
            f"{memory / 2**20:.2f} MiB per device per the profiled cost model; they need {needs}"
        )
    best, st = min(fitting, key=lambda o: o[0].time_s)
    return st, best, table


def predict_steps(
    prof: Profile, model: Module, sequences: Sequence, strategies: Sequence[str], bounds: Sequence[int]
) -> dict[str, float]:
    """Predicted step seconds of "static <s>" (every sequence packed to the longest bound) for each
    strategy and of "hot switching" (bucket i under strategies[i]) for one batch."""
    spec = prof.spec
    world = H.parse_strategy(strategies[0]).dp * H.parse_strategy(strategies[0]).tp
    cl = cluster(prof, world)
    lengths = [len(s) for s in sequences]
    out = {}
    for s in strategies:
        out[f"static {s}"] = H.predict(spec, cl, H.parse_strategy(s), lengths, int(bounds[0])).time_s
    hot = H.simulate(spec, cl, lengths, bounds, strategies=list(strategies), options=runnable(world, spec))
    out["hot switching"] = hot["hot_switch"].time_s
    return out


__all__ = ["Profile", "choose_static", "choose_strategies", "cluster", "predict_steps", "profile", "runnable"]
