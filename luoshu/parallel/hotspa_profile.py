"""Profiling inputs of HotSPa's strategy search: this machine's per-layer time and activation memory.

`profile(model, lengths, batches)` runs one transformer block of a zoo language model (GPT-2 or
LLaMA) forward and backward at each (batch, sequence length) on the machine at hand, in the
model's dtype, and records the median time and the block's activation bytes at the plan's peak
(`Graph.memory`). Least squares then fit what the cost model assumes (`luoshu.parallel.hotspa`):

- time = (24·b·s·h² + 4·b·s²·h)·3 / F + c: F, the effective FLOP/s a layer reaches here, replaces
  the cluster's `flops · mfu`, c the fixed cost of a layer's kernels (measured, not modelled);
- activations = k · s·b·h·(34 + 5·a·s/h): k scales the model's bytes to this dtype and these
  kernels (the formula is for fp16 on GPUs).

Every time is a process's busy seconds (`_clock`): its CPU time, its collectives' threads
included, where its kernels run on one thread (the launcher's default), else the wall clock.
A CPU machine runs a job's processes on shared cores, and shares them with whatever else it
runs; a process's CPU seconds are what it would take on a core of its own, whatever the load,
where its wall time under a load that comes and goes is not (a point timed in a busy second
came out twice one timed in a quiet one, and that ranked dp2·tp2 against dp4 by chance). The
cores enter once, in the cost model: `Profile.cores` processes run at full speed at once, and a
step takes at least its processes' busy seconds summed over them (`ClusterSpec.cores`).

With several processes, `profile` also times an all-reduce between them for the bandwidth, and
it measures what the cost model's latency terms need (`ClusterSpec.latency` ...):

- every process profiles at once (a barrier before each point), as a job's steps run;
- α per group size: tiny all-reduces in every group of n consecutive ranks at once (TP groups;
  the slowest rank's median);
- the collectives a TP plan issues per layer and per run, counted in the localised graph of the
  model itself (one and two layers, tp=2);
- the plan's own overhead per run beyond its layers (the whole model at the smallest point, less
  its layers and head), and the optimizer update's seconds per parameter (AdamW over tensors
  shaped as the model's);
- the busy seconds of a hot switch of every parameter beyond its bytes (`hot_switch.run_switches`
  of the model's tensors both ways between duplicated and split over the world: per switch, and
  per message a rank sends or receives): HotSPa's runtime switches parameters and gradients so,
  several times a step;
- a pipeline's stage time per micro-batch beyond its layers' share of the profiled plan and its
  messages (`_pipeline_calls`, `_stage_overheads`): a fresh copy of the model run as HotSPa's
  runtime runs a pp = 2 strategy (each micro-batch a forward and a backward stage plan, sends
  and receives between the stages, the embedding on the first and the head and loss on the last)
  under each tp, timed at the profile's points round by round with the tp plans (`_plan_runs`);
  the excess over the cost model's stage, per micro-batch, is what `hotspa.pipeline_stage_time`
  charges every stage per micro-batch.
`cluster(profile, ...)` turns the fit into a `ClusterSpec`; `choose_strategies` (HotSPa's
`strategies="auto"`) picks each bucket's strategy with `hotspa.simulate(..., runtime=True)` (the
runtime's hot step as it runs) over the strategies HotSPa runs, pipelines included, with each
recompute option and sequence parallelism (`variants`); `predict_steps` predicts the step time of
each static strategy and of hot switching for one batch (the benchmark prints it beside the
measured times).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as torch_dist

from luoshu.compiler import states
from luoshu.core import context
from luoshu.core.autodiff import gradients
from luoshu.core.dstates import DUPLICATE, DStates
from luoshu.core.graph import Graph
from luoshu.core.op import topological_ops
from luoshu.core.tensor import IndexedSlices
from luoshu.data.packing import bucket_batch, bucketize
from luoshu.distributed import env
from luoshu.distributed.mesh import DeviceMesh
from luoshu.nn import functional as F
from luoshu.nn.module import Module, Parameter
from luoshu.optim import AdamW
from luoshu.parallel import hot_switch as hs
from luoshu.parallel import hotspa as H
from luoshu.parallel.tensor_parallel import parallelize


@dataclass
class Profile:
    """Measured per-layer points and the fitted cost-model constants of this machine."""

    spec: H.ModelSpec
    points: list[dict] = field(default_factory=list)  # {"batch", "length", "seconds", "activation_bytes"}
    flops: float = 0.0  # effective FLOP/s of a layer's forward + backward
    layer_overhead_s: float = 0.0
    activation_scale: float = 1.0
    bandwidth: float | None = None  # bytes/s of a ring all-reduce between the processes (None: one process)
    latency: tuple = ()  # ((group size, seconds per collective), ...)
    group_bandwidth: tuple = ()  # ((group size, bytes/s of an all-reduce's ring volume), ...)
    value_bytes: int = 4  # bytes of one activation value (the model's dtype)
    attention_seconds: float = 0.0  # per score element (b·heads·s²) of unfused attention, beyond its FLOPs
    layer_collectives: int = 4
    run_collectives: int = 0
    run_overhead_s: float = 0.0
    update_seconds: float = 0.0  # per parameter element
    tp_runs: tuple = ()  # ((tp, ((rows, row length, seconds), ...)), ...): the whole model's plan, timed
    cores: float | None = None  # processes that run at full speed at once (`_cores`)
    switch_overhead_s: float = 0.0  # busy seconds of a hot switch of every parameter beyond its bytes
    switch_message_s: float = 0.0  # and per message a rank sends or receives in it
    clock: str = "cpu"  # what the seconds are (`_clock`): "cpu" (busy CPU seconds) or "wall"
    # ((tp, ((rows, row length, micro-batches, seconds), ...)), ...): a real pp = 2 pipeline's run, timed
    pipeline_runs: tuple = ()
    # ((tp, seconds), ...): per micro-batch and stage, a pipeline's time beyond the cost model's stage
    stage_overhead_s: tuple = ()

    def layer_seconds(self, b: int, s: int) -> float:
        scores = self.attention_seconds * b * self.spec.heads * s * s
        return 3.0 * H.layer_flops(self.spec, b, s) / self.flops + scores + self.layer_overhead_s


def _block(model: Module):
    for name in ("h", "layers"):
        blocks = getattr(model, name, None)
        if blocks is not None and len(blocks):
            return blocks[0]
    raise H.HotSPaError(f"profile: {type(model).__name__} has no transformer blocks (h or layers)")


def _cpu_clock() -> bool:
    """Whether a process's busy seconds are its CPU time: where its kernels run on one thread
    (`luoshu launch` sets OMP_NUM_THREADS=1), CPU seconds are the time on a core of its own;
    kernels on several threads would count each thread's, so those are timed by the wall clock."""
    return torch.get_num_threads() == 1


def _clock() -> float:
    """This process's busy seconds so far (module docstring): CPU time (every thread of the
    process, the collectives' included) under `_cpu_clock`, else the wall clock."""
    return time.process_time() if _cpu_clock() else time.perf_counter()


def _cores() -> float:
    """How many of this job's processes run at full speed at once: the cores this process may
    use over the threads each process's kernels take."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(cores / torch.get_num_threads(), 1.0)


def _together() -> None:
    """Every process starts the next measurement at once (they share the cores as a job does)."""
    if env.is_distributed():
        torch_dist.barrier()


def _timed_runs(g: Graph, fetches: list, feeds: dict, repeats: int) -> float:
    """The median busy seconds (`_clock`) of `repeats` runs (compiled and warm first)."""
    return _round_robin([(g, fetches, feeds)], repeats)[0]


def _round_robin(runs: Sequence[tuple], repeats: int) -> list[float]:
    """Each (graph, fetches, feeds)'s median busy seconds (`_clock`) over `repeats` runs (compiled
    and warm first), the repeats going round all of them: a run follows another's as a step's plan
    follows other work (not its own warm buffers), and a busy moment of the machine (which slows
    CPU seconds too, if less than wall seconds) falls on every point and plan alike rather than on
    all the repeats of one, so what the strategies are compared by was timed at the same moments."""
    return _round_robin_calls([lambda g=g, f=f, d=d: g.run(f, d) for g, f, d in runs], repeats)


def _round_robin_calls(calls: Sequence, repeats: int) -> list[float]:
    """`_round_robin` of functions of no arguments (each run once warm first)."""
    for call in calls:
        call()
    _together()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, t in zip(calls, times):
            start = _clock()
            call()
            t.append(_clock() - start)
    return [statistics.median(t) for t in times]


def _time_block(block: Module, dtype: str, b: int, s: int, h: int, repeats: int) -> tuple[float, int]:
    with Graph(name="profile") as g:
        x = g.placeholder("x", (None, None, h), dtype)
        y = block(x)
        loss = (y * y).sum()
        grads = gradients(loss, block.parameters() + [x])
    value = np.random.default_rng(0).standard_normal((b, s, h)).astype(np.float64 if dtype == "float64" else np.float32)
    fetches = [loss, *[gr for gr in grads if gr is not None]]
    report = g.memory(fetches, {x: value})
    return _timed_runs(g, fetches, {x: value}, repeats), int(report.peak_activations)


def _lm_graph(model: Module):
    """(graph, fetches, ids, labels) of the model's summed next-token loss and its parameters'
    gradients, as HotSPa's plans fetch them (each in its parameter's states)."""
    with Graph(name="profile-model") as g:
        ids = g.placeholder("ids", (None, None), "int64")
        labels = g.placeholder("labels", (None, None), "int64")
        positions = g.placeholder("positions", (None, None), "int64")
        segments = g.placeholder("segment_ids", (None, None), "int64")
        logits = model(ids, positions=positions, segment_ids=segments)  # packed rows, as HotSPa feeds them
        vocab = logits.shape[-1]
        loss = F.cross_entropy(logits.reshape((-1, vocab)), labels.reshape((-1,)), reduction="sum")
        grads = gradients(loss, model.parameters())
    fetches = [loss]
    for gr in grads:
        if gr is not None:
            fetches += [gr.indices, gr.values] if isinstance(gr, IndexedSlices) else [gr]
    return g, fetches, (ids, labels, positions, segments), grads


def _lm_feeds(phs: tuple, vocab: int, b: int, s: int, rng) -> dict:
    """b packed rows of s tokens, each one sequence (positions from 0, segment 1)."""
    ids, labels, positions, segments = phs
    tokens = rng.integers(0, vocab, (b, s))
    return {
        ids: tokens,
        labels: tokens,
        positions: np.broadcast_to(np.arange(s), (b, s)).copy(),
        segments: np.ones((b, s), np.int64),
    }


def _time_model(model: Module, s: int, repeats: int) -> float:
    g, fetches, phs, _ = _lm_graph(model)
    feeds = _lm_feeds(phs, H.model_spec(model).vocab, 1, s, np.random.default_rng(0))
    return _timed_runs(g, fetches, feeds, repeats)


def _model_lengths(model: Module, lengths: Sequence[int]) -> list[int]:
    """The profile's lengths that the whole model takes (its positions end at its block size)."""
    c = model.config
    most = int(getattr(c, "block_size", None) or getattr(c, "max_seq_len", None) or max(lengths))
    return sorted({min(int(s), most) for s in lengths})


def _plan_runs(model: Module, lengths: Sequence[int], batches: Sequence[int], repeats: int) -> tuple[tuple, tuple]:
    """(`_tp_runs`, the `_pipeline_calls` points with their seconds) timed in one round robin: a
    pipeline's excess over the tp plans it is priced from (`_stage_overheads`) is a difference of
    the two, so a load that comes and goes falls on both alike."""
    points, calls = _pipeline_calls(model, lengths, batches)
    tp, seconds = _tp_runs(model, lengths, batches, repeats, calls)
    piped = iter(seconds)
    return tp, tuple((n, tuple((*pt, next(piped)) for pt in pts)) for n, pts in points)


def _tp_runs(model: Module, lengths: Sequence[int], batches: Sequence[int], repeats: int,
             extra: Sequence = ()) -> tuple[tuple, list[float]]:
    """((n, ((rows, row length, seconds), ...)), ...): one run of the whole model's plan (forward,
    loss, backward, as HotSPa's plans) under tensor parallelism over n ranks at each point, timed on
    a fresh copy of its architecture with every TP group of the job running at once (the mean over
    ranks), for each n that divides the world and the heads. What a TP plan costs beyond its split
    FLOPs (work each member repeats, its collectives, its kernels' overhead) is in it. Returns
    (these runs, the busy seconds of each of the `extra` calls, the mean over ranks), the calls
    timed round by round with the plans."""
    spec = H.model_spec(model)
    world = env.world_size() if env.is_distributed() else 1
    rng = np.random.default_rng(0)
    at = [(int(b), int(s_len)) for b in batches for s_len in _model_lengths(model, lengths)]
    sizes, runs = [], []
    try:
        for n in range(1, world + 1):
            if world % n or spec.heads % n:
                continue
            copy = type(model)(model.config)
            if n > 1:
                tpar = parallelize(copy, DeviceMesh(dp=world // n, tp=n, world_size=world, rank=env.rank()),
                                   broadcast=False)
            states.set_default(None)
            g, fetches, phs, grads = _lm_graph(copy)
            if n > 1:
                wanted = {
                    id(gr): p.ds[0]
                    for p, gr in zip(copy.parameters(), grads)
                    if gr is not None and not isinstance(gr, IndexedSlices)
                }
                states.attach(g, dataclasses.replace(tpar.strategy, dp_group=(), fetch_states=wanted))
            sizes.append(n)
            runs += [(g, fetches, _lm_feeds(phs, spec.vocab, b, s_len, rng)) for b, s_len in at]
        calls = [lambda g=g, f=f, d=d: g.run(f, d) for g, f, d in runs] + list(extra)
        seconds = _mean_over_ranks(_round_robin_calls(calls, repeats))  # every n's plans timed round by round
    finally:
        states.set_default(None)
    per_n = len(at)
    tp = tuple(
        (n, tuple((b, s_len, t) for (b, s_len), t in zip(at, seconds[j * per_n : (j + 1) * per_n])))
        for j, n in enumerate(sizes)
    )
    return tp, seconds[len(runs):]


def _pipeline_calls(model: Module, lengths: Sequence[int], batches: Sequence[int]) -> tuple[tuple, list]:
    """(((tp, ((rows, row length, micro-batches), ...)), ...), one function per point that runs it):
    one replica's pipeline run (`HotSPa._pipeline_grads`: every micro-batch's forward and backward
    stage plans, the sends and receives between them, the gradients gathered) of a fresh copy of
    the model under HotSPa's runtime with pp = 2 stages of tp ranks, for each tp that divides half
    the world and the heads, at each point (rows per replica of one sequence of the row's length
    each), every replica of the job running at once (`_plan_runs` times them). None where the
    world is odd or a single process, or the blocks do not split in two."""
    from luoshu.parallel.hotspa_runtime import HotSPa  # the runtime imports this module

    spec = H.model_spec(model)
    world = env.world_size() if env.is_distributed() else 1
    if world < 2 or world % 2 or spec.layers % 2:
        return (), []
    rng = np.random.default_rng(0)
    at = [(int(b), int(s_len)) for b in batches for s_len in _model_lengths(model, lengths)]
    longest = max(s_len for _, s_len in at)

    def run(hot, rows, scale):
        touched = {k: torch.zeros(p.shape[0], dtype=torch.int32)
                   for k, (p, g) in enumerate(zip(hot.params, hot._grads))
                   if isinstance(g, IndexedSlices) and k not in hot._dense_rows}
        with context.no_grad():
            hot._pipeline_grads(0, rows, scale, touched)

    points, calls = [], []
    for tp in (t for t in range(1, world // 2 + 1) if world // 2 % t == 0 and spec.heads % t == 0):
        dp = world // (2 * tp)
        hot = HotSPa(type(model)(model.config), [f"dp{dp},tp{tp},pp2"], [longest, 0], broadcast=False)
        if 0 not in hot._pipelines:  # a model the pipeline cannot take: nothing to time
            continue
        replica = hot.meshes[0].index("dp")
        for b, s_len in at:
            seqs = [rng.integers(0, spec.vocab, s_len) for _ in range(dp * b)]
            rows = bucket_batch(seqs, [longest, 0], row_tokens=s_len)[0].rows
            mine = np.arange(rows.num_rows)[replica::dp]
            rows = dataclasses.replace(rows, tokens=rows.tokens[mine], positions=rows.positions[mine],
                                       segment_ids=rows.segment_ids[mine], labels=rows.labels[mine])
            scale = 1.0 / max(int((rows.labels >= 0).sum()), 1)
            calls.append(lambda hot=hot, rows=rows, scale=scale: run(hot, rows, scale))
        points.append((tp, tuple((b, s_len, min(2, b)) for b, s_len in at)))
    return tuple(points), calls


def _stage_overheads(prof: Profile, points: tuple, world: int) -> tuple:
    """((tp, seconds), ...): per micro-batch and pipeline stage, what a profiled pp = 2 pipeline run
    (`_plan_runs`) took beyond the cost model's stage (its layers' share of the profiled plan,
    `hotspa.run_time`, and its messages; `hotspa.pipeline_stage_time` with no stage overhead): the
    mean over the points of each one's excess over its micro-batches (at least 0), over `world` ranks."""
    cl = dataclasses.replace(cluster(prof, world), stage_overhead=())
    out = []
    for tp, pts in points:
        st = H.Strategy(world // (2 * tp), tp, 2)
        excess = []
        for b, s_len, m, seconds in pts:
            t_stage, p2p, _ = H.pipeline_stage_time(prof.spec, cl, st, [[s_len]] * b, s_len, m)
            excess.append((seconds - t_stage - p2p) / m)
        out.append((tp, max(float(np.mean(excess)), 0.0)))
    return tuple(out)


_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def _layers_field(config) -> str:
    return "n_layer" if hasattr(config, "n_layer") else "n_layers"


def _count_collectives(model: Module, layers: int, tp: int = 2) -> int:
    """Collectives in the localised tp graph of a fresh copy of `model`'s architecture with `layers` layers."""
    config = dataclasses.replace(model.config, **{_layers_field(model.config): layers})
    copy = type(model)(config)
    tpar = parallelize(copy, DeviceMesh(tp=tp, world_size=tp, rank=0), broadcast=False)
    states.set_default(None)
    try:
        g, fetches, _, grads = _lm_graph(copy)
        wanted = {
            id(gr): p.ds[0]
            for p, gr in zip(copy.parameters(), grads)
            if gr is not None and not isinstance(gr, IndexedSlices)
        }
        strategy = dataclasses.replace(tpar.strategy, dp_group=(), fetch_states=wanted)
        local = states.localize_graph(topological_ops(fetches, g), [], strategy)
    finally:
        states.set_default(None)
    return sum(op.opdef.name in _COLLECTIVES for op in local.graph.ops)


def _collective_counts(model: Module) -> tuple[int, int]:
    """(collectives per layer, per run outside the layers) of the model's tp plans (tp=2)."""
    spec = H.model_spec(model)
    if spec.heads % 2:
        return 4, 0
    one, two = _count_collectives(model, 1), _count_collectives(model, 2)
    return two - one, max(one - (two - one), 0)


def _busy(work: torch.Tensor, calls: int, group=None, nbytes: int = 4) -> float:
    """Seconds of `calls` rounds of a small matmul, each followed by an all-reduce of `nbytes` in
    `group` (none when None), on every rank at once; the slowest rank's."""
    value = torch.zeros(max(nbytes // 4, 1), dtype=torch.float32)
    _together()
    start = _clock()
    for _ in range(calls):
        torch.mm(work, work)
        if group is not None:
            torch_dist.all_reduce(value, group=group)
    slowest = torch.tensor([_clock() - start], dtype=torch.float64)
    torch_dist.all_reduce(slowest, op=torch_dist.ReduceOp.MAX)
    return float(slowest[0])


SWEEP_BYTES = (4, 256 * 2**10, 1 * 2**20)


def _collective_costs(calls: int = 12, repeats: int = 3) -> tuple[tuple, tuple]:
    """(((n, α), ...), ((n, β), ...)) for each group size n that divides the world: what one
    all-reduce adds to processes that compute between collectives, as a plan's do (groups of n
    consecutive ranks, all at once): rounds of work plus an all-reduce of each size in
    `SWEEP_BYTES`, less the work alone, per call (the median of `repeats`), fitted as
    α + 2(n-1)/n · bytes / β, in busy seconds (`_clock`): what a collective costs its processes
    (Gloo's copies, sums and socket calls), not the wait for a peer that a loaded machine has not
    scheduled yet (that wait comes and goes with the load; the cores bound models the sharing)."""
    if not env.is_distributed() or env.world_size() < 2:
        return (), ()
    world, rank = env.world_size(), env.rank()
    work = torch.randn(96, 96)
    alphas, betas = [], []
    for n in range(2, world + 1):
        if world % n:
            continue
        first = rank // n * n
        group = env.process_group(tuple(range(first, first + n)))
        _busy(work, 2, group, SWEEP_BYTES[-1])  # warm
        seconds = []
        for nbytes in SWEEP_BYTES:
            deltas = [(_busy(work, calls, group, nbytes) - _busy(work, calls)) / calls for _ in range(repeats)]
            seconds.append(max(statistics.median(deltas), 0.0))
        volume = np.array([2.0 * (n - 1) / n * b for b in SWEEP_BYTES])
        (alpha, per_byte), *_ = np.linalg.lstsq(np.stack([np.ones_like(volume), volume], 1), np.array(seconds),
                                                rcond=None)
        alpha, per_byte = max(float(alpha), 0.0), max(float(per_byte), 1e-12)
        alphas.append((n, alpha))
        betas.append((n, 1.0 / per_byte))
    return tuple(alphas), tuple(betas)


def _update_seconds(model: Module, repeats: int = 5) -> float:
    """AdamW's seconds per parameter element: one update of tensors shaped as the model's (its
    per-tensor cost spread over their elements)."""
    shapes = [tuple(p.shape) for p in model.parameters()]
    dtype = model.parameters()[0]._value.dtype
    params = [Parameter(torch.zeros(shape, dtype=dtype)) for shape in shapes]
    opt = AdamW(params, lr=1e-3)
    grads = [(k, torch.ones(shape, dtype=dtype)) for k, shape in enumerate(shapes)]
    opt.apply_gradients(grads)
    _together()
    times = []
    for _ in range(repeats):
        start = _clock()
        opt.apply_gradients(grads)
        times.append(_clock() - start)
    return statistics.median(times) / sum(p.numel() for p in params)


def _switch_overhead(model: Module, bandwidth: float | None, repeats: int = 5) -> tuple[float, float]:
    """(busy seconds of one hot switch of every parameter of `model` beyond its bytes over
    `bandwidth`, and per message a rank sends or receives) as HotSPa's runtime switches them
    (`hot_switch.run_switches`): timed both ways between every parameter duplicated on every rank
    and split over them on its first dimension where that divides (tp = world against dp = world),
    the median of `repeats` each, the mean over ranks. One way is local copies only (the per-switch
    overhead); the other sends to and receives from every peer: beyond the first and its bytes,
    what its 2 (world - 1) messages per rank cost."""
    if not env.is_distributed() or env.world_size() < 2:
        return 0.0, 0.0
    world, rank = env.world_size(), env.rank()
    ranks = range(world)
    dup = hs.Layout(DStates(world, {DUPLICATE: world}), ranks)
    split = hs.Layout(DStates(world, {0: world}), ranks)
    shapes = [tuple(p.shape) for p in model.parameters()]
    dtype = model.parameters()[0]._value.dtype
    itemsize = model.parameters()[0]._value.element_size()
    targets = [split if shape[0] % world == 0 else dup for shape in shapes]
    there = [hs.plan_hot_switch(sh, itemsize, dup, t) for sh, t in zip(shapes, targets)]
    back = [hs.plan_hot_switch(sh, itemsize, t, dup) for sh, t in zip(shapes, targets)]
    full = [torch.zeros(sh, dtype=dtype) for sh in shapes]
    seconds, sent = [], []
    for plans, values in ((there, full), (back, None)):
        if values is None:  # this rank's shards of the split ones
            values = hs.run_switches(there, full, rank, dtype)
        hs.run_switches(plans, values, rank, dtype)  # warm
        _together()
        times = []
        for _ in range(repeats):
            start = _clock()
            hs.run_switches(plans, values, rank, dtype)
            times.append(_clock() - start)
        seconds.append(statistics.median(times))
        load: dict[int, int] = {}
        for plan in plans:
            for r, nbytes in plan.send_bytes().items():
                load[r] = load.get(r, 0) + nbytes
        sent.append(max(load.values(), default=0))
    local, messages = _mean_over_ranks(seconds)
    per_message = (messages - local - sent[1] / (bandwidth or float("inf"))) / (2 * (world - 1))
    return max(local, 0.0), max(per_message, 0.0)


def _bandwidth(nbytes: int = 8 * 2**20, repeats: int = 3) -> float | None:
    if not env.is_distributed() or env.world_size() < 2:
        return None
    n = env.world_size()
    buffer = torch.zeros(nbytes // 4, dtype=torch.float32)
    torch_dist.all_reduce(buffer)  # warm-up
    times = []
    for _ in range(repeats):
        start = _clock()
        torch_dist.all_reduce(buffer)
        times.append(_clock() - start)
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
    scores = np.array([float(p["batch"] * spec.heads * p["length"] ** 2) for p in points])
    # relative errors (rows over their time): the small points, where the overhead shows, count as much
    weights = 1.0 / seconds
    per_score = 0.0
    if not spec.flash_attention:  # unfused attention: its softmax and mask over the scores cost beyond FLOPs
        (per_flop, per_score, overhead), *_ = np.linalg.lstsq(
            np.stack([flops, scores, np.ones_like(flops)], 1) * weights[:, None], seconds * weights, rcond=None
        )
    if spec.flash_attention or per_score < 0 or per_flop <= 0:
        per_score = 0.0
        (per_flop, overhead), *_ = np.linalg.lstsq(
            np.stack([flops, np.ones_like(flops)], 1) * weights[:, None], seconds * weights, rcond=None
        )
    if per_flop <= 0:  # kernels too small to see the FLOPs: all in the overhead
        per_flop, overhead = float(seconds.mean() / flops.mean()), 0.0
    model_bytes = np.array([H.layer_activation_bytes(spec, p["batch"], p["length"], 1, False, "none") for p in points])
    measured = np.array([p["activation_bytes"] for p in points], dtype=np.float64)
    scale = float(measured @ model_bytes / (model_bytes @ model_bytes))
    flops_rate, overhead = 1.0 / float(per_flop), max(float(overhead), 0.0)
    # the whole model at the smallest point: what its plan costs beyond its layers and head
    s0 = _model_lengths(model, lengths)[0]
    whole = _mean_over_ranks(_time_model(model, s0, repeats))
    head = 6.0 * s0 * spec.hidden * spec.vocab / flops_rate
    layer_s = 3.0 * H.layer_flops(spec, 1, s0) / flops_rate + float(per_score) * spec.heads * s0 * s0 + overhead
    run_overhead = max(whole - spec.layers * layer_s - head, 0.0)
    per_layer, per_run = _collective_counts(model)
    alphas, betas = _collective_costs()
    bandwidth = _bandwidth()
    switch = _switch_overhead(model, bandwidth)
    tp_runs, pipeline_runs = _plan_runs(model, lengths, batches, repeats)
    prof = Profile(
        spec,
        points,
        flops_rate,
        overhead,
        scale,
        bandwidth,
        latency=alphas,
        group_bandwidth=betas,
        value_bytes=int(block.parameters()[0]._value.element_size()),
        attention_seconds=float(per_score),
        layer_collectives=per_layer,
        run_collectives=per_run,
        run_overhead_s=run_overhead,
        update_seconds=_mean_over_ranks(_update_seconds(model)),
        tp_runs=tp_runs,
        cores=_cores(),
        clock="cpu" if _cpu_clock() else "wall",
        switch_overhead_s=switch[0],
        switch_message_s=switch[1],
        pipeline_runs=pipeline_runs,
    )
    prof.stage_overhead_s = _stage_overheads(prof, prof.pipeline_runs, env.world_size() if env.is_distributed() else 1)
    return prof


def _mean_over_ranks(value):
    """The mean over ranks of a float (or of each of a list's)."""
    if not env.is_distributed():
        return value
    t = torch.tensor(value if isinstance(value, list) else [value], dtype=torch.float64)
    torch_dist.all_reduce(t)
    mean = (t / env.world_size()).tolist()
    return mean if isinstance(value, list) else mean[0]


def cluster(
    prof: Profile,
    devices: int,
    memory: float = float("inf"),
    bandwidth: float | None = None,
    devices_per_node: int | None = None,
) -> H.ClusterSpec:
    """The cost model's cluster for `devices` of this machine: profiled FLOP/s, measured (or given)
    bandwidth, the cores the devices (processes) share; activation bytes in the cost model's units,
    so `memory` is scaled alike."""
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
        latency=prof.latency,
        layer_collectives=prof.layer_collectives,
        run_collectives=prof.run_collectives,
        run_overhead=prof.run_overhead_s,
        update_seconds=prof.update_seconds,
        group_bandwidth=prof.group_bandwidth,
        value_bytes=prof.value_bytes,
        attention_seconds=prof.attention_seconds,
        tp_runs=prof.tp_runs,
        cores=prof.cores,
        switch_overhead=prof.switch_overhead_s,
        switch_message_overhead=prof.switch_message_s,
        stage_overhead=prof.stage_overhead_s,
    )


def runnable(world: int, spec: H.ModelSpec, pipeline: bool = False) -> list[H.Strategy]:
    """The (dp, tp, pp) strategies HotSPa runs over `world` ranks: tp dividing the heads; pp = 1,
    or with `pipeline` also every pp > 1 dividing the blocks (and world / tp), a strategy of
    `pp` stages of dp·tp ranks each (`hotspa_runtime`'s pipeline strategies)."""
    out = []
    for tp in (t for t in (1, 2, 4, 8, 16, 32, 64) if world % t == 0 and spec.heads % t == 0):
        for pp in (p for p in range(1, world // tp + 1) if world // tp % p == 0) if pipeline else (1,):
            if pp == 1 or spec.layers % pp == 0:
                out.append(H.Strategy(world // (tp * pp), tp, pp))
    return out


def variants(world: int, spec: H.ModelSpec) -> list[H.Strategy]:
    """HotSPa's per-bucket candidates (`strategies="auto"`): every runnable strategy, pipelines
    included (`runnable(..., pipeline=True)`), with each activation recompute option ("none",
    "selective", "full"), and with sequence parallelism where tp > 1 (what HotSPa's runtime runs:
    one recorded graph per recompute setting, a pipeline's stages traced so marked)."""
    return [
        dataclasses.replace(st, sp=sp, recompute=rc)
        for st in runnable(world, spec, pipeline=True)
        for sp in ((False, True) if st.tp > 1 else (False,))
        for rc in H.RECOMPUTE
    ]


def choose_strategies(
    prof: Profile, world: int, bounds: Sequence[int], lengths: Sequence[int], memory: float = float("inf")
) -> list[str]:
    """One strategy string per bucket (HotSPa's `strategies="auto"`): the combination of `variants`
    (pipeline strategies included) whose hot step, as HotSPa's runtime runs it
    (`hotspa.simulate(..., runtime=True)`: each strategy's plans and micro-batches, its
    data-parallel gradient sum, the switches from the owner and the gradients back, recompute's
    extra forward, its and sequence parallelism's activations), the profiled cost model predicts
    fastest for a batch with these `lengths`, every bucket within `memory` bytes per device. Every
    fitting candidate of every bucket enters the search of the combinations
    (`hotspa.best_per_bucket_tour`, exact), so the choice is the cost model's optimum over what the
    runtime runs. A bucket no candidate holds: a `HotSPaError` naming it and the least memory a
    candidate needs."""
    spec = prof.spec
    options = variants(world, spec)
    cl = cluster(prof, world, memory)
    for seqs, bound, upper in zip(bucketize(lengths, bounds), bounds[1:], bounds):
        need = [H.predict(spec, cl, st, seqs, int(upper), st.pp) for st in options] if seqs else []
        if need and not any(p.fits for p in need):
            least = min(need, key=lambda p: p.memory_bytes)
            raise H.HotSPaError(
                f"HotSPa auto: no strategy over {world} ranks holds bucket ({bound}, {upper}] (sequences up to "
                f"{max(seqs)} tokens) in {memory / 2**20:.2f} MiB per device per the profiled cost model; the "
                f"least it needs is {least.memory_bytes * prof.activation_scale / 2**20:.2f} MiB ({least.strategy})"
            )
    result = H.simulate(spec, cl, lengths, bounds, options=options, candidates=len(options), runtime=True)
    return [str(st) for st in result["chosen"]]


def choose_static(
    prof: Profile, world: int, lengths: Sequence[int], memory: float = float("inf")
) -> tuple[H.Strategy, H.Prediction, list[H.Prediction]]:
    """The static strategy of a job over `world` ranks whose batches hold sequences of these
    `lengths`, one (dp, tp, pp) for every layer and no recompute (`luoshu train --parallel auto`
    runs the layer-wise search instead, `layerwise.search_plan`): of the runnable strategies,
    pipelines included (a one-strategy HotSPa runs a pipeline as its owner), the one the profiled
    cost model predicts fastest as the runtime runs it (rows of the longest sequence, a pipeline's
    micro-batches) among those that hold them in `memory` bytes per device. Returns (strategy,
    its prediction, every candidate's prediction); a `HotSPaError` naming each candidate's need
    when none fits."""
    spec = prof.spec
    cl = cluster(prof, world, memory)
    options = runnable(world, spec, pipeline=True)
    tokens = max(int(n) for n in lengths)
    table = [H.predict(spec, cl, st, lengths, tokens, st.pp) for st in options]
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
    first = H.parse_strategy(strategies[0])
    world = first.dp * first.tp * first.pp
    cl = cluster(prof, world)
    lengths = [len(s) for s in sequences]
    out = {f"static {s}": t for s, t in predict_static(prof, sequences, strategies, int(bounds[0])).items()}
    hot = H.simulate(
        spec, cl, lengths, bounds, strategies=list(strategies), options=runnable(world, spec, pipeline=True),
        runtime=True
    )
    out["hot switching"] = hot["hot_switch"].time_s
    return out


def predict_step_parts(
    prof: Profile, model: Module, sequences: Sequence, strategies: Sequence[str], bounds: Sequence[int]
) -> dict[str, dict[str, float]]:
    """What `predict_steps` adds up, per rank (the mean over ranks, in busy seconds) and for the
    same rows: "run" (the plans), "dp_sum" (gradient and step all-reduces), "switch" (hot
    switches), "update" (the optimizer); the benchmark prints them beside the measured parts."""
    spec = prof.spec
    first = H.parse_strategy(strategies[0])
    world = first.dp * first.tp * first.pp
    cl = cluster(prof, world)
    lengths = [len(s) for s in sequences]

    def parts(p: H.Prediction) -> dict[str, float]:
        sync, update = p.parts["dp_sync"], p.parts["update"]
        run = p.parts["busy"] / world - sync - update
        return {"run": run, "dp_sum": sync, "switch": 0.0, "update": update}

    out = {}
    for text in strategies:
        st = H.parse_strategy(text)
        out[f"static {text}"] = parts(H.predict(spec, cl, st, lengths, int(bounds[0]), micro_batches=st.pp))
    hot = H.simulate(spec, cl, lengths, bounds, strategies=list(strategies),
                     options=runnable(world, spec, pipeline=True), runtime=True)
    total = {"run": 0.0, "dp_sum": 0.0, "switch": 0.0, "update": 0.0}
    for bucket in hot["hot_switch"].parts["buckets"]:
        for k, v in bucket["parts"].items():
            total[k] += v
    out["hot switching"] = total
    return out


def predict_static(prof: Profile, sequences: Sequence, strategies: Sequence[str], bound: int) -> dict[str, float]:
    """Predicted step seconds of each strategy run alone over one batch, every sequence packed into
    rows of `bound` tokens, as HotSPa's runtime runs it (one plan per replica, a pipeline's
    micro-batches), on the profiled cluster of the strategies' devices."""
    out = {}
    for text in strategies:
        st = H.parse_strategy(text)
        cl = cluster(prof, st.dp * st.tp * st.pp)
        out[text] = H.predict(prof.spec, cl, st, [len(s) for s in sequences], int(bound), micro_batches=st.pp).time_s
    return out


__all__ = [
    "Profile",
    "choose_static",
    "choose_strategies",
    "cluster",
    "predict_static",
    "predict_step_parts",
    "predict_steps",
    "profile",
    "runnable",
    "variants",
]
