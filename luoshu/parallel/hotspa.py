"""HotSPa's cost model, simulator and strategy search.

`simulate(model, cluster, lengths, ...)` predicts the step time and the peak memory per device
of every static (dp, tp, pp) strategy that covers the cluster, and of hot switching (each
length bucket under its own strategy, parameters and gradients switched between them inside
the step), for a batch of sequences with the given lengths. `search_layers` is the
Galvatron-style dynamic program that picks, layer by layer, a (tp, sequence parallel,
recompute) choice under a per-device memory budget; it is exact for the cost model (the tests
compare it with brute force), and an infeasible budget raises `HotSPaError` rather than
returning a strategy that does not fit.

The cost model (per transformer layer, mixed precision with fp32 Adam states, as Megatron-LM
accounts for them):

- compute: forward 24·b·s·h² + 4·b·s²·h FLOPs (Narayanan et al. 2021), backward twice that,
  full recompute one forward more; divided by tp, at the cluster's FLOP/s times `mfu`;
- activations: s·b·h·(34 + 5·a·s/h) bytes without tensor parallelism; with tp t:
  s·b·h·(10 + 24/t + 5·a·s/(h·t)); with sequence parallelism s·b·h·(34 + 5·a·s/h)/t;
  selective recompute (or fused flash attention, the default) drops the 5·a·s/h term, full
  recompute keeps 2·s·b·h (the layer input) (Korthikanti et al. 2022);
- model states: 16 bytes per parameter (fp16 weight and gradient, fp32 master weight and two
  Adam moments), divided by tp·pp;
- communication, ring collectives at the bandwidth of the group's links (intra-node when the
  group fits a node): tensor parallelism 4 all-reduces of b·s·h fp16 values per layer and
  micro-batch (with sequence parallelism the same bytes as all-gathers and reduce-scatters),
  pipeline activations and gradients point-to-point at each stage boundary, one data-parallel
  all-reduce of the gradients per step, and the pipeline bubble (pp-1)/(m+pp-1);
- hot switching: the planner's real plan (`luoshu.parallel.hot_switch`) for every weight of a
  layer, its largest per-device send volume at the slowest link it crosses, twice per switch
  (parameters there, accumulated gradients back).

What a profile of the machine at hand measures (`hotspa_profile`) enters through the cluster's
latency terms, zero for the paper's cluster: every collective costs its group's latency α on
top of its bytes over β (Gloo on CPU pays ~ms per call, more than its bytes), a TP plan issues
`layer_collectives` of them per layer and `run_collectives` per run of the plan (vocab-parallel
embedding and loss), each run costs `run_overhead` beyond its layers, and the optimizer update
`update_seconds` per parameter a device holds. Where the devices are processes sharing `cores`
CPU cores, a step takes the longer of its slowest device's busy seconds and all devices' busy
seconds over the cores (the profile's times are busy seconds: what a device takes with a core
of its own). `predict(..., micro_batches=k)` models HotSPa's
runtime rather than the simulator's GPU pipeline: a replica's packed rows run as k plans (1 for
pp = 1, the pipeline's micro-batches otherwise), attention over whole rows where the model has
no fused variable-length kernel, the LM head's FLOPs counted, and each micro-batch of a pipeline
costs every stage `stage_overhead` more (profiled from a real pipeline: a stage's two plans per
micro-batch, its sends and receives, the embedding and the head on the end stages,
`pipeline_stage_time`); and its hot step
(`simulate(..., runtime=True)`): each bucket's gradients all-reduced over its strategy's
data-parallel group, the parameters switched from the owner along `hot_switch.best_order`'s path
(one way) and each visited strategy's gradients back to the owner (`runtime_switches_time`, each
switch `switch_overhead`, `switch_message_overhead` per message and its largest rank's bytes; a
pipeline strategy's layers on their stage's ranks, `runtime_layouts`), the
loss and the update once; the search over per-bucket choices is then exact over the set of
strategies a step visits (`best_per_bucket_tour`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from luoshu.core.dstates import DUPLICATE, DStates
from luoshu.core.errors import Error
from luoshu.data.packing import bucketize
from luoshu.parallel.hot_switch import Layout, best_order, plan_hot_switch


class HotSPaError(Error, ValueError):
    """A strategy that does not fit the cluster or the memory, or bad simulator input."""


@dataclass(frozen=True)
class ModelSpec:
    layers: int
    hidden: int
    heads: int
    vocab: int
    ffn: int | None = None  # default: LLaMA's 8/3·hidden rounded to 256 (SwiGLU, three matrices)
    flash_attention: bool = True  # fused attention keeps no s×s scores (drops the 5·a·s/h term)

    @property
    def ffn_dim(self) -> int:
        return self.ffn or 256 * math.ceil(8 * self.hidden / 3 / 256)

    @property
    def layer_params(self) -> int:
        return 4 * self.hidden * self.hidden + 3 * self.hidden * self.ffn_dim + 2 * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden


LLAMA_7B = ModelSpec(layers=32, hidden=4096, heads=32, vocab=32000, ffn=11008)


@dataclass(frozen=True)
class ClusterSpec:
    gpus_per_node: int
    nodes: int
    flops: float  # peak dense fp16/bf16 FLOP/s of one device
    intra_bw: float  # bytes/s per device within a node
    inter_bw: float  # bytes/s per device between nodes
    memory: float  # bytes per device
    mfu: float = 0.5  # fraction of peak the kernels reach
    layer_overhead: float = 0.0  # seconds per layer and micro-batch beyond the FLOPs (kernel launches; profiled)
    # profiled latency terms (module docstring): ((group size, seconds per collective), ...) ascending
    latency: tuple = ()
    layer_collectives: int = 4
    run_collectives: int = 0
    run_overhead: float = 0.0  # seconds per run of a plan beyond its layers
    update_seconds: float = 0.0  # optimizer seconds per parameter element a device holds
    group_bandwidth: tuple = ()  # ((group size, bytes/s), ...): profiled β of a group's collectives
    value_bytes: float = 2.0  # bytes of one activation value (fp16 on the paper's cluster)
    attention_seconds: float = 0.0  # per score element (b·heads·s²) of unfused attention, beyond its FLOPs
    # ((tp, ((rows, row length, seconds), ...)), ...): profiled runs of the whole model's plan under
    # tp (its repeated work and collectives in them); `run_time` interpolates them where given
    tp_runs: tuple = ()
    # devices that run at full speed at once (a CPU machine's cores shared by one process per
    # device; None: each device its own): a step takes at least its devices' busy seconds over them
    cores: float | None = None
    # busy seconds of one of HotSPa's runtime switches of every parameter beyond its bytes over the
    # bandwidth: its per-tensor slicing and copies, and per message a rank sends or receives (one per
    # peer and direction) its packing and point-to-point call (profiled)
    switch_overhead: float = 0.0
    switch_message_overhead: float = 0.0
    # ((tp, seconds), ...): what a pipeline stage of HotSPa's runtime takes per micro-batch beyond its
    # layers' share of the profiled plan (`run_time`) and its point-to-point messages: its two plans
    # (forward, backward) launched per micro-batch, its sends' and receives' calls, the first
    # stage's embedding and the last stage's head and loss (not spread over the stages); profiled
    # from a real pp = 2 pipeline under each tp (`hotspa_profile`), charged per micro-batch on every
    # stage of a pp > 1 strategy (`pipeline_stage_time`)
    stage_overhead: tuple = ()

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


# A800-80GB: 312 TFLOP/s bf16, NVLink 400 GB/s, 200 Gb/s InfiniBand per GPU (the paper's cluster).
A800 = dict(flops=312e12, intra_bw=200e9, inter_bw=25e9, memory=80 * 2**30)


RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Strategy:
    """A static (dp, tp, pp) strategy; or, where `layer_tp` is given, a per-layer one: block l
    under tensor parallelism `layer_tp[l]` over dp = (world / pp) / layer_tp[l] replicas inside its
    pipeline stage's world / pp ranks, with `layer_sp[l]` and `layer_recompute[l]`
    (`hotspa_runtime`'s mixed-tp runtime; dp, tp, sp and recompute are then 1, 1, False, "none":
    the per-layer fields say it all; `pp` the stages, 1 without a pipeline)."""

    dp: int
    tp: int
    pp: int
    sp: bool = False
    recompute: str = "none"  # "none", "selective" (attention only), "full" (whole layers)
    layer_tp: tuple = ()
    layer_sp: tuple = ()
    layer_recompute: tuple = ()

    def __post_init__(self):
        if self.recompute not in RECOMPUTE:
            raise HotSPaError(f"Strategy: recompute must be one of {RECOMPUTE}, found {self.recompute!r}")
        if not self.layer_tp:
            if self.layer_sp or self.layer_recompute:
                raise HotSPaError("Strategy: layer_sp / layer_recompute need layer_tp (one tp per layer)")
            return
        n = len(self.layer_tp)
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in self.layer_tp):
            raise HotSPaError(f"Strategy: layer_tp must be positive ints, found {self.layer_tp}")
        if (self.dp, self.tp, self.sp, self.recompute) != (1, 1, False, "none") or self.pp < 1:
            raise HotSPaError(
                f"Strategy: a per-layer strategy (layer_tp {self.layer_tp}) takes dp=tp=1, pp>=1, sp=False, "
                f"recompute='none' (dp is (world/pp)/tp per layer), found dp{self.dp},tp{self.tp},"
                f"pp{self.pp},sp={self.sp},recompute={self.recompute!r}"
            )
        if self.pp > n:
            raise HotSPaError(f"Strategy: {n} layers in layer_tp {self.layer_tp} cannot fill pp={self.pp} stages")
        layer_sp = tuple(bool(v) for v in self.layer_sp) or (False,) * n
        layer_rc = tuple(self.layer_recompute) or ("none",) * n
        if len(layer_sp) != n or len(layer_rc) != n:
            raise HotSPaError(
                f"Strategy: {n} layers in layer_tp {self.layer_tp} need as many layer_sp and layer_recompute, "
                f"found {len(layer_sp)} and {len(layer_rc)}"
            )
        bad = [i for i, (t, s) in enumerate(zip(self.layer_tp, layer_sp)) if s and t == 1]
        if bad:
            raise HotSPaError(f"Strategy: layers {bad} have sequence parallelism but tp 1 (sp splits over tp)")
        wrong = [r for r in layer_rc if r not in RECOMPUTE]
        if wrong:
            raise HotSPaError(f"Strategy: layer_recompute must be of {RECOMPUTE}, found {wrong[0]!r}")
        object.__setattr__(self, "layer_tp", tuple(self.layer_tp))
        object.__setattr__(self, "layer_sp", layer_sp)
        object.__setattr__(self, "layer_recompute", layer_rc)

    @property
    def mixed(self) -> bool:
        """Whether the layers have their own tp (and sp, recompute): `layer_tp` given."""
        return bool(self.layer_tp)

    def __str__(self) -> str:
        if self.mixed:
            text = (f"pp{self.pp}," if self.pp > 1 else "") + "tp[" + ",".join(map(str, self.layer_tp)) + "]"
            if any(self.layer_sp):
                text += ",sp[" + ",".join(str(int(s)) for s in self.layer_sp) + "]"
            if any(r != "none" for r in self.layer_recompute):
                text += ",rc[" + ",".join(self.layer_recompute) + "]"
            return text
        extra = (",sp" if self.sp else "") + ("" if self.recompute == "none" else f",rc={self.recompute}")
        return f"dp{self.dp},tp{self.tp},pp{self.pp}{extra}"


def _split_parts(text: str) -> list[str]:
    """The comma-separated parts of a strategy string, a bracketed list one part."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _bracketed(text: str, part: str, name: str) -> list[str]:
    inner = part[len(name):]
    if not (inner.startswith("[") and inner.endswith("]")) or len(inner) < 3:
        raise HotSPaError(f"strategy {text!r}: part {part!r}: expected {name}[a,b,...] with one entry per block")
    return inner[1:-1].split(",")


def parse_strategy(text: str) -> Strategy:
    """'dp2,tp2,pp2' (any order; a missing axis is 1; a part 'sp': sequence parallelism over
    the tp axis; 'rc=selective' or 'rc=full': activation recompute of the attention or of whole
    layers) -> Strategy; `parse_strategy(str(s)) == s`.

    A per-block (mixed) strategy: 'tp[4,2,1,2]' (block l under tp[l], dp = world / tp[l]),
    optionally 'sp[0,1,0,0]' (sequence parallelism per block; a plain 'sp': every block with
    tp > 1) and 'rc[none,full,none,none]' (recompute per block; 'rc=full': every block), and a
    pipeline 'pp2' (each stage world / pp ranks, block l under tp[l] over (world / pp) / tp[l]
    replicas of its stage); no dp part (dp follows from each block's tp)."""
    sizes = {"dp": 1, "tp": 1, "pp": 1}
    sp, recompute = False, "none"
    layer_tp = layer_sp = layer_rc = None
    given = set()
    for part in _split_parts(str(text).replace(" ", "")):
        if part == "sp":
            sp = True
            continue
        if part.startswith("sp["):
            entries = _bracketed(text, part, "sp")
            if any(e not in ("0", "1") for e in entries):
                raise HotSPaError(f"strategy {text!r}: part {part!r}: sp entries must be 0 or 1")
            layer_sp = tuple(e == "1" for e in entries)
            continue
        if part.startswith("rc["):
            layer_rc = tuple(_bracketed(text, part, "rc"))
            continue
        if part.startswith("tp["):
            entries = _bracketed(text, part, "tp")
            if any(not e.isdigit() or int(e) < 1 for e in entries):
                raise HotSPaError(f"strategy {text!r}: part {part!r}: tp entries must be integers >= 1")
            layer_tp = tuple(int(e) for e in entries)
            continue
        if part.startswith("rc="):
            if part[3:] not in RECOMPUTE:
                raise HotSPaError(f"strategy {text!r}: part {part!r}: recompute must be rc= one of {RECOMPUTE}")
            recompute = part[3:]
            continue
        name, digits = part[:2], part[2:]
        if name not in sizes or not digits.isdigit() or int(digits) < 1:
            raise HotSPaError(
                f"unknown strategy {text!r}: part {part!r} is none of dpN, tpN, ppN (N >= 1), sp, "
                "rc=selective, rc=full, tp[..], sp[..], rc[..]; expected parts like dp2,tp4,pp1 or tp[4,2,1,2]"
            )
        sizes[name] = int(digits)
        given.add(name)
    if layer_tp is None:
        if layer_sp is not None or layer_rc is not None:
            raise HotSPaError(f"strategy {text!r}: per-block sp[..] / rc[..] need a per-block tp[..]")
        if sp and sizes["tp"] == 1:
            raise HotSPaError(f"strategy {text!r}: sequence parallelism (sp) splits over tp, which is 1")
        return Strategy(**sizes, sp=sp, recompute=recompute)
    if given - {"pp"}:
        raise HotSPaError(
            f"strategy {text!r}: a per-block tp[..] takes no {'/'.join(sorted(given - {'pp'}))} part (dp is "
            "(world / pp) / tp per block)"
        )
    n = len(layer_tp)
    if sp:
        layer_sp = layer_sp or tuple(t > 1 for t in layer_tp)
    if recompute != "none":
        layer_rc = layer_rc or (recompute,) * n
    for name, values in (("sp", layer_sp), ("rc", layer_rc)):
        if values is not None and len(values) != n:
            raise HotSPaError(f"strategy {text!r}: tp[..] names {n} blocks but {name}[..] {len(values)}")
    return Strategy(1, 1, sizes["pp"], layer_tp=layer_tp, layer_sp=layer_sp or (), layer_recompute=layer_rc or ())


def mixed_strategy(layer_tp, layer_sp=None, layer_recompute=None, pp: int = 1) -> Strategy:
    """The per-block strategy of a plan: one tp (and sp flag, recompute choice) per block, over `pp`
    pipeline stages."""
    return Strategy(1, 1, int(pp), layer_tp=tuple(layer_tp), layer_sp=tuple(layer_sp or ()),
                    layer_recompute=tuple(layer_recompute or ()))


def model_spec(model) -> ModelSpec | None:
    """The cost model's description of a zoo language model (GPT-2 or LLaMA config), or None."""
    c = getattr(model, "config", None)
    if c is None:
        return None
    if hasattr(c, "n_embd"):  # GPT-2: two MLP matrices of 4h, as the cost model's three of ~8h/3 (a multiple of 8)
        return ModelSpec(
            c.n_layer, c.n_embd, c.n_head, c.vocab_size, ffn=8 * max(1, round(c.n_embd / 3)), flash_attention=False
        )
    if hasattr(c, "dim") and hasattr(c, "n_layers"):
        return ModelSpec(c.n_layers, c.dim, c.n_heads, c.vocab_size, ffn=c.hidden_dim, flash_attention=False)
    return None


# --- one layer ---------------------------------------------------------------------------------------
def layer_flops(model: ModelSpec, b: int, s: int) -> float:
    """Forward FLOPs of one layer for b sequences of length s."""
    h = model.hidden
    return 24.0 * b * s * h * h + 4.0 * b * s * s * h


def packed_flops(model: ModelSpec, lengths: Sequence[int]) -> float:
    """Forward FLOPs of one layer for sequences packed into one micro-batch with a
    block-diagonal mask: the dense part over every token, attention within each sequence."""
    h = model.hidden
    tokens = float(sum(lengths))
    return 24.0 * tokens * h * h + 4.0 * h * float(sum(n * n for n in lengths))


def layer_activation_bytes(model: ModelSpec, b: int, s: int, tp: int, sp: bool, recompute: str) -> float:
    h, a = model.hidden, model.heads
    attention = 0.0 if model.flash_attention else 5.0 * a * s / h
    if recompute == "full":
        return 2.0 * s * b * h / (tp if sp else 1)
    if recompute == "selective":
        attention = 0.0
    if sp:
        return s * b * h * (34.0 + attention) / tp
    return s * b * h * (10.0 + 24.0 / tp + attention / tp)


def _ring(nbytes: float, n: int, bw: float) -> float:
    return 0.0 if n <= 1 else 2.0 * (n - 1) / n * nbytes / bw


def _by_group(table: tuple, n: int) -> float:
    """The profiled value of the largest profiled group no larger than n (else the smallest's)."""
    known = [v for size, v in table if size <= n] or [table[0][1]]
    return float(known[-1])


def collective_latency(cluster: ClusterSpec, n: int) -> float:
    """α of one collective over a group of n devices (0 for one device or an unprofiled cluster)."""
    if n <= 1 or not cluster.latency:
        return 0.0
    return _by_group(cluster.latency, n)


def collective_time(cluster: ClusterSpec, nbytes: float, n: int) -> float:
    """α + the ring volume of `nbytes` over β of a group of n (the profiled β where there is one,
    else the links' bandwidth)."""
    if n <= 1:
        return 0.0
    bw = _by_group(cluster.group_bandwidth, n) if cluster.group_bandwidth else _group_bw(cluster, n)
    return collective_latency(cluster, n) + _ring(nbytes, n, bw)


def _group_bw(cluster: ClusterSpec, span: int) -> float:
    return cluster.intra_bw if span <= cluster.gpus_per_node else cluster.inter_bw


def layer_time(model: ModelSpec, cluster: ClusterSpec, b: int, s: int, tp: int, sp: bool, recompute: str,
               lengths: Sequence[int] | None = None) -> float:
    """Forward + backward (+ recompute) time of one layer and micro-batch (b sequences of
    length s, or `lengths` packed), tensor-parallel communication included."""
    passes = 3.0 + (1.0 if recompute == "full" else 0.0)
    forward = packed_flops(model, lengths) if lengths is not None else layer_flops(model, b, s)
    tokens = float(sum(lengths)) if lengths is not None else float(b * s)
    flops = forward * passes
    if recompute == "selective":
        flops += 4.0 * model.hidden * (float(sum(n * n for n in lengths)) if lengths is not None else b * s * s)
    compute = flops / tp / (cluster.flops * cluster.mfu) + cluster.layer_overhead
    comm = 4 * _ring(2.0 * tokens * model.hidden, tp, _group_bw(cluster, tp))
    if tp > 1:
        comm += cluster.layer_collectives * collective_latency(cluster, tp)
    return compute + comm


def _interpolated_run(points: Sequence[tuple], rows: int, row_len: int) -> float:
    """Seconds of one plan run over `rows` rows of `row_len` tokens from profiled (rows, row length,
    seconds) points: piecewise linear in the rows at each profiled length, linear
    in the square of the length between profiled lengths (the scores grow so), extended past the
    ends by the nearest two."""
    by_length: dict[int, list[tuple[int, float]]] = {}
    for b, s, t in points:
        by_length.setdefault(int(s), []).append((int(b), float(t)))
    lengths = sorted(by_length)

    def at(s: int) -> float:
        pts = sorted(by_length[s])
        if len(pts) == 1:
            return pts[0][1] * rows / pts[0][0]
        j = next((i for i, (b, _) in enumerate(pts) if b >= rows), len(pts) - 1)
        (b0, t0), (b1, t1) = pts[max(j, 1) - 1], pts[max(j, 1)]
        per_row = max((t1 - t0) / (b1 - b0), 0.0)
        return max(t0 + per_row * (rows - b0), 0.0)

    if len(lengths) == 1:
        return at(lengths[0]) * row_len / lengths[0]
    hi = next((i for i, s in enumerate(lengths) if s >= row_len), len(lengths) - 1)
    hi = max(hi, 1)
    s0, s1 = lengths[hi - 1], lengths[hi]
    t0, t1 = at(s0), at(s1)
    w = (row_len**2 - s0**2) / (s1**2 - s0**2)
    return max(t0 + w * (t1 - t0), 0.0)


def run_time(model: ModelSpec, cluster: ClusterSpec, rows: Sequence[Sequence[int]], row_len: int, layers: int,
             tp: int, sp: bool, recompute: str, last: bool = True) -> float:
    """One run of the runtime's plan over packed `rows` (each a list of sequence lengths in a row of
    `row_len` tokens) through `layers` layers: the layers as one batch (their overhead and
    collectives once), attention over whole rows unless the model has fused attention; the
    plan's own overhead and, on the last stage, the LM head. Where the cluster has profiled runs
    of the plan under this tp (`ClusterSpec.tp_runs`), its layers' share of those; a recompute or
    sequence-parallel variant, that times the formula's ratio of the variant to the plain plan
    (so a variant never looks cheaper than the plan it changes for being priced another way)."""
    if not any(row for row in rows):
        return 0.0
    measured = [points for n, points in cluster.tp_runs if n == tp]
    if not measured:
        return _formula_run(model, cluster, rows, row_len, layers, tp, sp, recompute, last)
    base = _interpolated_run(measured[0], len(rows), row_len) * layers / model.layers
    if not sp and recompute == "none":
        return base
    plain = _formula_run(model, cluster, rows, row_len, layers, tp, False, "none", last)
    variant = _formula_run(model, cluster, rows, row_len, layers, tp, sp, recompute, last)
    return base * variant / plain if plain > 0 else base


def _formula_run(model: ModelSpec, cluster: ClusterSpec, rows: Sequence[Sequence[int]], row_len: int, layers: int,
                 tp: int, sp: bool, recompute: str, last: bool) -> float:
    """`run_time` from the cost model's formulas alone (FLOPs, overheads, collectives, the head)."""
    flat = [n for row in rows for n in row]
    rate = cluster.flops * cluster.mfu
    passes = 3.0 + (1.0 if recompute == "full" else 0.0)
    tokens = float(len(rows) * row_len)  # the rows' padding runs through the kernels too
    h = model.hidden
    if model.flash_attention:
        squares = float(sum(n * n for n in flat))
    else:  # the masked scores of every row, not of each sequence alone
        squares = float(len(rows) * row_len * row_len)
    flops = (24.0 * tokens * h * h + 4.0 * h * squares) * passes
    if recompute == "selective":
        flops += 4.0 * h * squares
    scores = 0.0 if model.flash_attention else cluster.attention_seconds * model.heads * squares
    layer = (flops / rate + scores) / tp + cluster.layer_overhead
    activation = tokens * h * cluster.value_bytes
    total = layers * (layer + cluster.layer_collectives * collective_time(cluster, activation, tp))
    total += cluster.run_overhead + cluster.run_collectives * collective_time(cluster, activation, tp)
    if last:
        total += 6.0 * tokens * h * model.vocab / tp / rate
    return total


# --- a whole strategy ------------------------------------------------------------------------------------
@dataclass
class Prediction:
    strategy: str
    time_s: float
    memory_bytes: float
    fits: bool
    parts: dict = field(default_factory=dict)


def _check_strategy(st: Strategy, model: ModelSpec, cluster: ClusterSpec) -> None:
    if st.dp * st.tp * st.pp != cluster.world:
        raise HotSPaError(f"strategy {st} covers {st.dp * st.tp * st.pp} devices, the cluster has {cluster.world}")
    if model.layers < st.pp:
        raise HotSPaError(f"strategy {st}: {model.layers} layers cannot fill {st.pp} pipeline stages")
    if model.heads % st.tp:
        raise HotSPaError(f"strategy {st}: {model.heads} heads do not split over tp={st.tp}")


def predict(model: ModelSpec, cluster: ClusterSpec, st: Strategy, lengths: Sequence[int],
            micro_batch_tokens: int | None = None, micro_batches: int | None = None) -> Prediction:
    """Step time and peak memory of `lengths` under one strategy: each data-parallel replica
    packs its sequences into micro-batches of up to `micro_batch_tokens` (default: the longest
    sequence, the size a static strategy must hold), runs them through its pipeline (1F1B) and
    the gradients are all-reduced once per step. `micro_batches=k`: HotSPa's runtime instead
    (module docstring): the replica's packed rows run as min(k, rows) plans (`run_time`)."""
    _check_strategy(st, model, cluster)
    lengths = [int(n) for n in lengths]
    if not lengths:
        return Prediction(str(st), 0.0, 0.0, True)
    tokens_per_micro = micro_batch_tokens or max(lengths)
    per_replica = [lengths[i::st.dp] for i in range(st.dp)]
    if micro_batches is not None:  # the runtime packs the whole batch, then deals the rows to the replicas
        packed = _micro_batches(lengths, tokens_per_micro)
        per_replica = [[n for row in packed[i::st.dp] for n in row] for i in range(st.dp)]
        rows_of = [packed[i::st.dp] for i in range(st.dp)]
    layers_per_stage = math.ceil(model.layers / st.pp)
    worst = peak_act = busy = 0.0
    for r, seqs in enumerate(per_replica):
        micro = _micro_batches(seqs, tokens_per_micro) if micro_batches is None else rows_of[r]
        if micro_batches is None:
            t_stage = sum(layers_per_stage * layer_time(model, cluster, 1, 0, st.tp, st.sp, st.recompute, mb)
                          for mb in micro)
            p2p = _p2p_time(model, cluster, st, micro)
        else:  # the rows in k plans, each stage's per-micro-batch overhead on them
            t_stage, p2p, micro = pipeline_stage_time(model, cluster, st, micro, tokens_per_micro, micro_batches)
        m = max(len(micro), 1)
        # 1F1B: (m + pp - 1) slots of the slowest stage's per-micro-batch time
        worst = max(worst, (t_stage + p2p) * (m + st.pp - 1) / m)
        busy += st.tp * st.pp * (t_stage + p2p)  # the replica's devices, each as busy as the slowest stage
        # the first stage keeps up to pp micro-batches in flight: at worst the largest
        largest = sorted((sum(mb) for mb in micro), reverse=True)[:st.pp]
        peak_act = max(peak_act, sum(layers_per_stage * layer_activation_bytes(model, 1, t, st.tp, st.sp,
                                                                               st.recompute) for t in largest))
    states = 16.0 * model.params / (st.tp * st.pp)
    grad_bytes = 2.0 * model.params / (st.tp * st.pp)
    grad_sync = _ring(grad_bytes, st.dp, _group_bw(cluster, cluster.world if st.dp > 1 else 1))
    step_sync = 0.0
    if micro_batches is not None:
        # the runtime's one flat all-reduce of its gradients, after each strategy's runs (a hot step
        # pays it per bucket) ...
        grad_sync = 0.0
        if st.dp > 1:
            grad_sync = collective_time(cluster, cluster.value_bytes * model.params / (st.tp * st.pp), st.dp)
        # ... and, once per step, its loss and a table's touched rows, summed over the world
        step_sync = 2 * collective_time(cluster, 4.0 * model.vocab, cluster.world)
    dp_sync = grad_sync + step_sync
    update = cluster.update_seconds * model.params / (st.tp * st.pp)
    memory = states + peak_act
    cores = cluster.cores or float("inf")  # the devices' busy seconds over the cores they share
    run_busy = busy
    if micro_batches is None:  # the simulator's hot step syncs the accumulated gradients once, at the owner
        runs = max(worst, busy / cores)
    else:
        runs = max(worst + grad_sync, (busy + cluster.world * grad_sync) / cores)
    busy += cluster.world * (dp_sync + update)
    step = max(worst + dp_sync + update, busy / cores)
    return Prediction(str(st), step, memory, memory <= cluster.memory,
                      {"pipeline": worst, "dp_sync": dp_sync, "grad_sync": grad_sync, "step_sync": step_sync,
                       "update": update, "states": states, "activations": peak_act, "busy": busy,
                       "run_busy": run_busy, "once_per_step": step - runs})


def stage_overhead(cluster: ClusterSpec, tp: int) -> float:
    """The profiled seconds per micro-batch of a pipeline stage of tp ranks beyond its plans' layers and
    messages (`ClusterSpec.stage_overhead`; that of the largest profiled tp no larger, else the
    smallest's; 0 where none was profiled)."""
    return _by_group(cluster.stage_overhead, tp) if cluster.stage_overhead else 0.0


def pipeline_stage_time(model: ModelSpec, cluster: ClusterSpec, st: Strategy, rows: Sequence[Sequence[int]],
                        row_len: int, micro_batches: int) -> tuple[float, float, list[list[int]]]:
    """(seconds of a replica's slowest stage over its micro-batches, of their point-to-point messages,
    the micro-batches' sequence lengths) as HotSPa's runtime runs `rows` (packed rows of `row_len`
    tokens, each a list of sequence lengths) under `st`: min(micro_batches, rows) plans of every
    k-th row, each through a stage's layers (`run_time`); with pp > 1, every micro-batch as many
    rows (the runtime pads them with rows that have no targets, `HotSPa._pipeline_grads`), each
    micro-batch's stage overhead (`stage_overhead`) on every stage, and per boundary its
    activations forward and their gradients back, each a message."""
    k = max(1, min(int(micro_batches), len(rows)))
    groups = [list(rows[j::k]) for j in range(k)]
    if st.pp > 1:  # the runtime pads the rows to a multiple of the micro-batches (rows without targets)
        size = math.ceil(len(rows) / k)
        groups = [g + [[]] * (size - len(g)) for g in groups]
    layers_per_stage = math.ceil(model.layers / st.pp)
    t_stage = sum(run_time(model, cluster, g, row_len, layers_per_stage, st.tp, st.sp, st.recompute) for g in groups)
    micro = [[n for row in g for n in row] for g in groups]
    if st.pp > 1:
        t_stage += len(groups) * stage_overhead(cluster, st.tp)
    return t_stage, _p2p_time(model, cluster, st, micro), micro


def _p2p_time(model: ModelSpec, cluster: ClusterSpec, st: Strategy, micro: Sequence[Sequence[int]]) -> float:
    """A stage's point-to-point messages over the micro-batches (sequence lengths each): per boundary
    its activations forward and their gradients back, each a message (none where pp = 1)."""
    if st.pp <= 1:
        return 0.0
    return sum(2 * (2.0 * sum(mb) * model.hidden / _group_bw(cluster, st.tp * st.pp)
                    + collective_latency(cluster, 2)) for mb in micro)


def _micro_batches(seqs: list[int], tokens: int) -> list[list[int]]:
    """First-fit-decreasing packing of sequences into micro-batches of at most `tokens`."""
    bins: list[list[int]] = []
    room: list[int] = []
    for n in sorted(seqs, reverse=True):
        i = next((k for k, r in enumerate(room) if r >= n), None)
        if i is None:
            bins.append([n])
            room.append(max(tokens - n, 0))
        else:
            bins[i].append(n)
            room[i] -= n
    return bins


def static_strategies(cluster: ClusterSpec, model: ModelSpec) -> list[Strategy]:
    out = []
    for tp in (1, 2, 4, 8, 16):
        for pp in (1, 2, 4, 8, 16):
            if cluster.world % (tp * pp) or tp > cluster.gpus_per_node or model.heads % tp or pp > model.layers:
                continue
            out.append(Strategy(cluster.world // (tp * pp), tp, pp, sp=tp > 1))
    return out


def weight_layouts(st: Strategy, world: int) -> tuple[Layout, Layout]:
    """Layouts of a column- and a row-parallel weight of one layer's first stage under `st`
    (tp adjacent, dp outer; the stage's ranks the first tp·dp of the first stage)."""
    ranks = [d * st.tp * st.pp + t for d in range(st.dp) for t in range(st.tp)]
    def layout(dim: int) -> Layout:
        states, order = {}, []
        if st.dp > 1:
            states[DUPLICATE] = st.dp
            order.append(DUPLICATE)
        if st.tp > 1:
            states[dim] = st.tp
            order.append(dim)
        return Layout(DStates(st.dp * st.tp, states, tuple(order)), ranks)
    return layout(0), layout(1)


@functools.lru_cache(maxsize=4096)  # a pure function of frozen specs; a search asks it once per combination
def switch_time(model: ModelSpec, cluster: ClusterSpec, src: Strategy, dst: Strategy) -> float:
    """Time of one switch of parameters (and, back, of gradients) from `src` to `dst`, from
    the planner's plan of one layer's weights, times the layers a device holds."""
    if src == dst:
        return 0.0
    h, f = model.hidden, model.ffn_dim
    seconds = 0.0
    for (s_col, s_row), (d_col, d_row) in [(weight_layouts(src, cluster.world), weight_layouts(dst, cluster.world))]:
        for shape, s_layout, d_layout, count in [((3 * h, h), s_col, d_col, 1), ((h, h), s_row, d_row, 1),
                                                 ((2 * f, h), s_col, d_col, 1), ((h, f), s_row, d_row, 1)]:
            plan = plan_hot_switch(shape, 2, s_layout, d_layout, node_size=cluster.gpus_per_node)
            bw = cluster.inter_bw if plan.inter_node_bytes else cluster.intra_bw
            seconds += count * plan.max_send_bytes / bw
    layers_held = math.ceil(model.layers / min(src.pp, dst.pp))
    return 2.0 * seconds * layers_held


def layer_stages(model: ModelSpec, pp: int) -> list[int]:
    """The pipeline stage of each layer under `pp` stages as the cost model splits them: contiguous,
    ceil(layers / pp) a stage (`predict`'s layers per stage), the last stage what is left."""
    per = math.ceil(model.layers / pp)
    return [min(layer // per, pp - 1) for layer in range(model.layers)]


def runtime_layouts(st: Strategy, stages: Sequence[int]) -> tuple[Layout, Layout]:
    """Layouts of a column- and a row-parallel weight under `st` as HotSPa's runtime holds it
    (`hotspa_runtime._world_layout`): on the ranks of the pipeline `stages` that read it (ranks
    pp-major, then dp, tp-minor), split over each TP group, duplicated over dp and those stages."""
    ranks = [s * st.dp * st.tp + d * st.tp + t for s in stages for d in range(st.dp) for t in range(st.tp)]

    def layout(dim: int) -> Layout:
        states, order = {}, []
        if len(stages) * st.dp > 1:
            states[DUPLICATE] = len(stages) * st.dp
            order.append(DUPLICATE)
        if st.tp > 1:
            states[dim] = st.tp
            order.append(dim)
        return Layout(DStates(len(ranks), states, tuple(order)), ranks)

    return layout(0), layout(1)


@functools.lru_cache(maxsize=4096)
def runtime_switch_plan(model: ModelSpec, cluster: ClusterSpec, src: Strategy, dst: Strategy) -> tuple[int, int]:
    """(the largest bytes one rank sends, the most messages one rank sends and receives) when
    HotSPa's runtime switches every parameter (or its gradient) one way, `src` layouts to `dst`
    (`runtime_layouts`; a pipeline strategy's layer on its stage's ranks, `layer_stages`): the
    planner's plans of one layer's weights for each pair of (src, dst) stages times the layers of
    that pair, and of the token and position tables (split as a column-parallel weight; on the
    first and the last stage of a pipeline, which read them), the senders balanced over one
    layer's weights and over the tables, one message per peer and direction (one `run_switches`
    batch), values of `cluster.value_bytes`."""
    if src == dst:
        return 0, 0
    h, f, item = model.hidden, model.ffn_dim, int(cluster.value_bytes)
    node = cluster.gpus_per_node
    pairs: set[tuple[int, int]] = set()
    sent: dict[int, int] = {}
    layer_pairs: dict[tuple[int, int], int] = {}
    for a, b in zip(layer_stages(model, src.pp), layer_stages(model, dst.pp)):
        layer_pairs[(a, b)] = layer_pairs.get((a, b), 0) + 1
    for (a, b), count in layer_pairs.items():
        (s_col, s_row), (d_col, d_row) = runtime_layouts(src, [a]), runtime_layouts(dst, [b])
        layer: dict[int, int] = {}
        for shape, x, y in [((3 * h, h), s_col, d_col), ((h, h), s_row, d_row), ((2 * f, h), s_col, d_col),
                            ((h, f), s_row, d_row)]:
            plan = plan_hot_switch(shape, item, x, y, node_size=node, load=layer)
            pairs.update((m.sender, m.receiver) for m in plan.messages)
        for r, nbytes in layer.items():
            sent[r] = sent.get(r, 0) + count * nbytes
    tables: dict[int, int] = {}
    ends = [sorted({0, st.pp - 1}) for st in (src, dst)]
    plan = plan_hot_switch((2 * model.vocab, h), item, runtime_layouts(src, ends[0])[0],
                           runtime_layouts(dst, ends[1])[0], node_size=node, load=tables)
    pairs.update((m.sender, m.receiver) for m in plan.messages)
    for r, nbytes in tables.items():
        sent[r] = sent.get(r, 0) + nbytes
    messages: dict[int, int] = {}
    for a, b in pairs:
        messages[a] = messages.get(a, 0) + 1
        messages[b] = messages.get(b, 0) + 1
    return max(sent.values(), default=0), max(messages.values(), default=0)


def runtime_switch_bytes(model: ModelSpec, cluster: ClusterSpec, src: Strategy, dst: Strategy) -> int:
    """The largest bytes one rank sends in a runtime switch (`runtime_switch_plan`)."""
    return runtime_switch_plan(model, cluster, src, dst)[0]


def runtime_switch_time(model: ModelSpec, cluster: ClusterSpec, src: Strategy, dst: Strategy) -> float:
    """Busy seconds of one of HotSPa's runtime switches of every parameter (or gradient) from `src`
    to `dst`, one way: the profiled per-switch overhead, its per-message overhead times the most
    messages a rank has, and the largest rank's bytes at the link's bandwidth (0 for src == dst:
    the runtime then switches nothing)."""
    if src == dst:
        return 0.0
    nbytes, messages = runtime_switch_plan(model, cluster, src, dst)
    bw = cluster.intra_bw if cluster.nodes == 1 else cluster.inter_bw
    return cluster.switch_overhead + messages * cluster.switch_message_overhead + nbytes / bw


def runtime_switches_time(model: ModelSpec, cluster: ClusterSpec, owner: Strategy,
                          visited: Sequence[Strategy]) -> float:
    """Busy seconds of a runtime hot step's switches over the strategies `visited` (any order,
    repeats ignored) with the parameters at `owner`: as `HotSPa.step` runs them, the parameters go
    from the owner through every other visited strategy in `hot_switch.best_order`'s order (no way
    back: the owner keeps its shards) and each such strategy's gradients go back to the owner."""
    others = sorted({st for st in visited if st != owner}, key=str)
    if not others:
        return 0.0
    nodes = [owner, *others]
    costs = [[0.0 if b == 0 or a == b else runtime_switch_time(model, cluster, nodes[a], nodes[b])
              for b in range(len(nodes))] for a in range(len(nodes))]
    _, there = best_order(costs, 0)
    back = sum(runtime_switch_time(model, cluster, st, owner) for st in others)
    return there + back


def all_gather_time(cluster: ClusterSpec, nbytes: float, n: int) -> float:
    """α + the ring all-gather of `nbytes` (the gathered tensor's) over a group of n: half the
    volume of `collective_time`'s all-reduce."""
    if n <= 1:
        return 0.0
    bw = _by_group(cluster.group_bandwidth, n) if cluster.group_bandwidth else _group_bw(cluster, n)
    return collective_latency(cluster, n) + (n - 1) / n * nbytes / bw


def row_layout(dp: int, tp: int, first: int = 0) -> Layout:
    """A (rows, ...) activation under dp replicas of tp ranks each on ranks first.. (rank = first +
    replica·tp + member, tp inner as everywhere; `first` the first rank of a pipeline stage's
    group): rows split in dp contiguous blocks, each duplicated over its replica's TP group."""
    states, order = {}, []
    if dp > 1:
        states[0] = dp
        order.append(0)
    if tp > 1:
        states[DUPLICATE] = tp
        order.append(DUPLICATE)
    return Layout(DStates(dp * tp, states, tuple(order)), range(first, first + dp * tp))


@functools.lru_cache(maxsize=1024)  # pure; a search asks every pair of tp degrees per candidate
def _rebatch_plan(rows: int, row_len: int, width: int, dtype_bytes: int, src_tp: int, dst_tp: int, world: int,
                  node_size: int):
    for tp in (src_tp, dst_tp):
        if tp < 1 or world % tp:
            raise HotSPaError(f"rebatch: tp {tp} does not divide the world of {world} ranks")
    src_dp, dst_dp = world // src_tp, world // dst_tp
    step = math.lcm(src_dp, dst_dp)  # the runtime pads the rows to a multiple of every segment's dp
    padded = step * math.ceil(max(int(rows), 1) / step)
    return plan_hot_switch((padded, int(row_len), int(width)), int(dtype_bytes), row_layout(src_dp, src_tp),
                           row_layout(dst_dp, dst_tp), node_size=int(node_size))


def rebatch_bytes(rows: int, row_len: int, width: int, dtype_bytes: int, src_tp: int, dst_tp: int, world: int,
                  node_size: int = 8) -> int:
    """The largest bytes one rank sends when the hot-switch planner moves a (rows, row_len, width)
    activation from the row layout of tp `src_tp` (dp = world / src_tp replicas, `row_layout`) to
    that of `dst_tp` (rows padded to a multiple of both dp; a rank copies what it holds itself)."""
    return _rebatch_plan(rows, row_len, width, dtype_bytes, src_tp, dst_tp, world, node_size).max_send_bytes


def _rebatch_time(cluster: ClusterSpec, tensor: tuple, src_tp: int, dst_tp: int) -> float:
    plan = _rebatch_plan(*tensor, src_tp, dst_tp, cluster.world, cluster.gpus_per_node)
    if plan.max_send_bytes == 0:
        return 0.0
    bw = cluster.inter_bw if plan.inter_node_bytes else cluster.intra_bw
    return collective_latency(cluster, 2) + plan.max_send_bytes / bw  # one batch of point-to-point messages


def transition_time(model: ModelSpec, cluster: ClusterSpec, rows: int, row_len: int, src: tuple, dst: tuple) -> float:
    """Seconds between consecutive layers under (tp, sp) `src` then `dst` over the cluster's ranks for
    a step of `rows` rows of `row_len` tokens: the boundary activation (rows·row_len·hidden values)
    re-batched from src's row layout to dst's forward and its gradient back (`rebatch_bytes`' plans),
    plus the all-gather a sequence-parallel side needs (src's activation forward, dst's gradient
    backward: boundaries cross whole per TP group). 0 for equal (tp, sp)."""
    (src_tp, src_sp), (dst_tp, dst_sp) = (int(src[0]), bool(src[1])), (int(dst[0]), bool(dst[1]))
    if (src_tp, src_sp) == (dst_tp, dst_sp):
        return 0.0
    args = (int(rows), int(row_len), model.hidden, int(cluster.value_bytes))
    world = cluster.world

    def replica_bytes(tp: int) -> float:
        return math.ceil(rows / (world // tp)) * row_len * model.hidden * cluster.value_bytes

    seconds = _rebatch_time(cluster, args, src_tp, dst_tp) + _rebatch_time(cluster, args, dst_tp, src_tp)
    if src_sp:
        seconds += all_gather_time(cluster, replica_bytes(src_tp), src_tp)
    if dst_sp:
        seconds += all_gather_time(cluster, replica_bytes(dst_tp), dst_tp)
    return seconds


def _runs(st: Strategy, runtime: bool) -> int | None:
    """`predict`'s micro_batches for HotSPa's runtime (one plan per replica, a pipeline's pp), else None."""
    return st.pp if runtime else None


def _hot_step(model, cluster, chosen, buckets, bound_of, micro_batch_tokens, check=False, runtime=False):
    """(step time, peak memory, per-bucket parts) of running bucket i under chosen[i], starting
    and ending at the owner (the strategy with the least model-state memory per device).

    The simulator's step (`runtime` False) visits the buckets in order, each switch priced both
    ways (`switch_time`: parameters there, gradients back), the last one back to the owner, and
    syncs the accumulated gradients once there. HotSPa's runtime's (`runtime` True) sums each
    bucket's gradients over its strategy's data-parallel group after its runs, switches as
    `runtime_switches_time` says (parameters along `best_order`'s path, each strategy's gradients
    back to the owner) and syncs the loss and updates once, at the owner. A bucket's parts
    ("parts": per rank, the mean over ranks) say what its time is made of."""
    parts, memory, total = [], 0.0, 0.0
    owner = min(chosen, key=lambda st: 16.0 * model.params / (st.tp * st.pp))
    previous = owner
    for st, seqs, bound in zip(chosen, buckets, bound_of):
        if not seqs:
            continue
        p = predict(model, cluster, st, seqs, micro_batch_tokens or bound, _runs(st, runtime))
        if check and not p.fits:
            raise HotSPaError(f"bucket up to length {max(seqs, default=0)}: strategy {st} needs "
                              f"{p.memory_bytes / 2**30:.1f} GiB per device, more than {cluster.memory / 2**30:.0f}")
        switch = 0.0 if runtime else switch_time(model, cluster, previous, st)
        total += p.time_s - p.parts.get("once_per_step", 0.0) + switch
        memory = max(memory, p.memory_bytes)
        sync = p.parts["grad_sync"] if runtime else 0.0
        parts.append({"strategy": str(st), "sequences": len(seqs), "tokens": sum(seqs), "time_s": p.time_s,
                      "switch_s": switch, "parts": {"run": p.parts["run_busy"] / cluster.world, "dp_sum": sync,
                                                    "switch": switch, "update": 0.0}})
        previous = st
    if runtime:
        visited = [st for st, seqs in zip(chosen, buckets) if seqs]
        switches = runtime_switches_time(model, cluster, owner, visited)
        total += switches
        if parts:  # the step's switches, not one bucket's: shown with the first bucket (the owner's path starts)
            parts[0]["switch_s"] = parts[0]["parts"]["switch"] = switches
    else:
        total += switch_time(model, cluster, previous, owner)
    # one gradient sync (the simulator's; the runtime's loss and touched rows) and one update, at the owner
    once = predict(model, cluster, owner, [1], None, _runs(owner, runtime))
    total += once.parts.get("once_per_step", 0.0)
    if parts:
        parts[-1]["parts"]["dp_sum"] += once.parts["step_sync"] if runtime else once.parts["dp_sync"]
        parts[-1]["parts"]["update"] += once.parts["update"]
    return total, memory, parts


def _owner_keeping(seconds_b: Sequence[float], frugality: Sequence[float], o: int, seen: bool) -> list[int]:
    """The candidates of finite time a bucket can take while o stays the owner (the first chosen
    candidate of least frugality): none of fewer bytes than o's, and none of o's bytes but o
    before o has occurred."""
    return [c for c, t in enumerate(seconds_b) if math.isfinite(t) and not (
        frugality[c] < frugality[o] or (not seen and frugality[c] == frugality[o] and c != o))]


def best_per_bucket(seconds: Sequence[Sequence[float]], switch, once: Sequence[float], frugality: Sequence[float],
                    visited: Sequence[bool]) -> tuple[list[int], float]:
    """The choice per bucket (indices into the candidates) of least hot-switching step time, as
    `_hot_step` adds it up: each visited bucket b under candidate c costs seconds[b][c] plus the
    switch from the candidate of the previous visited bucket (the owner's before the first),
    the last switches back to the owner, and the owner adds once[owner]; the owner is the first
    chosen candidate (over every bucket, visited or not) of the least frugality (model-state
    bytes per device). `switch(a, c)` is the cost between candidates a and c.

    Exact and polynomial, O(C · B · C²) for B buckets of C candidates rather than C^B: fixing the
    owner o, a choice has owner o iff every bucket before o's first occurrence takes a candidate
    of more bytes than o's and every one after a candidate of no fewer; the cost is then a path
    o -> c_1 -> ... -> c_B -> o over the visited buckets, so a dynamic program over (bucket,
    previous visited candidate, whether o has occurred yet) gives the least valid cost for o,
    and the least over o is the brute force's minimum."""
    n_buckets = len(seconds)
    if n_buckets == 0:
        return [], 0.0
    k = len(once)
    inf = float("inf")
    best_total, best_pick = inf, None
    for o in range(k):
        if not math.isfinite(once[o]):
            continue
        # cost[(prev, seen)] = least cost so far; back[b][(prev, seen)] = (previous state, candidate)
        cost = {(o, False): 0.0}
        back = []
        for b in range(n_buckets):
            new, arg = {}, {}
            for (prev, seen), base in cost.items():
                for c in _owner_keeping(seconds[b], frugality, o, seen):
                    now_seen = seen or c == o
                    if visited[b]:
                        total, at = base + switch(prev, c) + seconds[b][c], c
                    else:
                        total, at = base, prev
                    key = (at, now_seen)
                    if total < new.get(key, inf):
                        new[key], arg[key] = total, ((prev, seen), c)
            cost = new
            back.append(arg)
        for (prev, seen), base in cost.items():
            if not seen:
                continue
            total = base + switch(prev, o) + once[o]
            if total < best_total:
                pick, key = [], (prev, seen)
                for arg in reversed(back):
                    key, c = arg[key]
                    pick.append(c)
                best_total, best_pick = total, pick[::-1]
    if best_pick is None:
        raise HotSPaError("best_per_bucket: no bucket has a candidate of finite time")
    return best_pick, best_total


def best_per_bucket_tour(seconds: Sequence[Sequence[float]], tour, once: Sequence[float],
                         frugality: Sequence[float], visited: Sequence[bool]) -> tuple[list[int], float]:
    """`best_per_bucket` for a step whose switches depend on the set of strategies it visits, not
    on the buckets' order (HotSPa's runtime, `runtime_switches_time`): each visited bucket b under
    candidate c costs seconds[b][c]; the step adds tour(o, U) for the owner o and the frozenset U
    of candidates the visited buckets take, and once[o]; the owner as in `best_per_bucket`.

    Exact: for each owner o, a dynamic program over (bucket, U so far, whether o has occurred)
    keeps the least sum of seconds; the tour is added once U is complete. The visited buckets
    take at most B candidates, so the sets are few (at most sum_j C(C, j), j <= B)."""
    n_buckets = len(seconds)
    if n_buckets == 0:
        return [], 0.0
    k = len(once)
    inf = float("inf")
    best_total, best_pick = inf, None
    for o in range(k):
        if not math.isfinite(once[o]):
            continue
        cost: dict[tuple[frozenset, bool], tuple[float, list[int]]] = {(frozenset(), False): (0.0, [])}
        for b in range(n_buckets):
            new: dict[tuple[frozenset, bool], tuple[float, list[int]]] = {}
            for (used, seen), (base, pick) in cost.items():
                for c in _owner_keeping(seconds[b], frugality, o, seen):
                    key = (used | {c} if visited[b] else used, seen or c == o)
                    total = base + (seconds[b][c] if visited[b] else 0.0)
                    if total < new.get(key, (inf,))[0]:
                        new[key] = (total, [*pick, c])
            cost = new
        for (used, seen), (base, pick) in cost.items():
            if not seen:
                continue
            total = base + tour(o, used) + once[o]
            if total < best_total:
                best_total, best_pick = total, pick
    if best_pick is None:
        raise HotSPaError("best_per_bucket_tour: no bucket has a candidate of finite time")
    return best_pick, best_total


def brute_force_buckets_tour(seconds, tour, once, frugality, visited) -> tuple[list[int], float]:
    """`best_per_bucket_tour` by trying every combination (tests)."""
    best = None
    for pick in itertools.product(range(len(once)), repeat=len(seconds)):
        if any(not math.isfinite(seconds[b][c]) for b, c in enumerate(pick)):
            continue
        owner = min(pick, key=lambda c: frugality[c])
        used = frozenset(c for b, c in enumerate(pick) if visited[b])
        total = sum(seconds[b][c] for b, c in enumerate(pick) if visited[b]) + tour(owner, used) + once[owner]
        if best is None or total < best[1]:
            best = (list(pick), total)
    if best is None:
        raise HotSPaError("brute_force_buckets_tour: nothing to choose")
    return best


def brute_force_buckets(seconds, switch, once, frugality, visited) -> tuple[list[int], float]:
    """`best_per_bucket` by trying every combination (tests)."""
    best = None
    for pick in itertools.product(range(len(once)), repeat=len(seconds)):
        if any(not math.isfinite(seconds[b][c]) for b, c in enumerate(pick)):
            continue
        owner = min(pick, key=lambda c: frugality[c])
        total, prev = 0.0, owner
        for b, c in enumerate(pick):
            if visited[b]:
                total += switch(prev, c) + seconds[b][c]
                prev = c
        total += switch(prev, owner) + once[owner]
        if best is None or total < best[1]:
            best = (list(pick), total)
    if best is None:
        raise HotSPaError("brute_force_buckets: nothing to choose")
    return best


def _best_combination(model, cluster, options, buckets, bound_of, micro_batch_tokens, runtime) -> list[Strategy]:
    """The combination of per-bucket `options` of least `_hot_step` time (`best_per_bucket` over
    the candidates' predicted times, switch times and model-state bytes)."""
    candidates = list(dict.fromkeys(st for top in options for st in top))
    index = {st: c for c, st in enumerate(candidates)}
    inf = float("inf")
    seconds = []
    for top, seqs, bound in zip(options, buckets, bound_of):
        row = [inf] * len(candidates)
        for st in top:
            if seqs:
                p = predict(model, cluster, st, seqs, micro_batch_tokens or bound, _runs(st, runtime))
                row[index[st]] = p.time_s - p.parts.get("once_per_step", 0.0)
            else:
                row[index[st]] = 0.0
        seconds.append(row)
    once = [predict(model, cluster, st, [1], None, _runs(st, runtime)).parts.get("once_per_step", 0.0)
            for st in candidates]
    frugality = [16.0 * model.params / (st.tp * st.pp) for st in candidates]
    visited = [bool(seqs) for seqs in buckets]
    if runtime:
        def tour(o: int, used: frozenset) -> float:
            return runtime_switches_time(model, cluster, candidates[o], [candidates[c] for c in sorted(used)])

        pick, _ = best_per_bucket_tour(seconds, tour, once, frugality, visited)
    else:
        pick, _ = best_per_bucket(seconds, lambda a, c: switch_time(model, cluster, candidates[a], candidates[c]),
                                  once, frugality, visited)
    return [candidates[c] for c in pick]


def simulate(model: ModelSpec, cluster: ClusterSpec, lengths: Sequence[int], bounds: Sequence[int],
             strategies: Sequence[Strategy | str] | None = None, micro_batch_tokens: int | None = None,
             candidates: int = 3, options: Sequence[Strategy] | None = None, runtime: bool = False) -> dict:
    """Every static strategy (`options`, default `static_strategies`) and hot switching over
    `bounds` (one strategy per bucket; default: the fastest combination of options that fits).
    `runtime`: predict as HotSPa's runtime runs each strategy (`predict(..., micro_batches=pp)`).
    Returns {"static": [Prediction...], "best_static": Prediction | None, "hot_switch":
    Prediction, "chosen": [Strategy per bucket], "speedup": float}."""
    static_list = list(options) if options is not None else static_strategies(cluster, model)
    statics = [predict(model, cluster, st, lengths, micro_batch_tokens or int(bounds[0]), _runs(st, runtime))
               for st in static_list]
    fitting = [(p, st) for p, st in zip(statics, static_list) if p.fits]
    best_static, best_static_strategy = min(fitting, key=lambda o: o[0].time_s) if fitting else (None, None)
    buckets = bucketize(lengths, bounds)
    bound_of = [int(b) for b in bounds[:-1]]
    if strategies is None:
        # Per bucket, the `candidates` fastest strategies that hold it; then every combination,
        # switch costs included (the fastest per bucket alone can lose to the switches).
        options = []
        for seqs, bound in zip(buckets, bound_of):
            ranked = sorted(((predict(model, cluster, st, seqs, micro_batch_tokens or bound, _runs(st, runtime)), st)
                             for st in static_list), key=lambda o: o[0].time_s)
            ranked = [st for p, st in ranked if p.fits]
            if not ranked:
                raise HotSPaError(f"no strategy holds a bucket of lengths up to {max(seqs, default=0)} in "
                                  f"{cluster.memory / 2**30:.0f} GiB per device")
            top = ranked[:candidates] if seqs else ranked[:1]
            if best_static_strategy is not None and best_static_strategy not in top:
                top.append(best_static_strategy)  # one strategy throughout is always a candidate
            options.append(top)
        chosen = _best_combination(model, cluster, options, buckets, bound_of, micro_batch_tokens, runtime)
    else:
        chosen = [parse_strategy(s) if isinstance(s, str) else s for s in strategies]
        if len(chosen) != len(buckets):
            raise HotSPaError(f"{len(buckets)} buckets need as many strategies, found {len(chosen)}")
    total, memory, parts = _hot_step(model, cluster, chosen, buckets, bound_of, micro_batch_tokens, check=True,
                                     runtime=runtime)
    hot = Prediction("hot:" + "|".join(str(s) for s in chosen), total, memory, True, {"buckets": parts})
    speedup = best_static.time_s / total if best_static is not None and total > 0 else float("nan")
    return {"static": statics, "best_static": best_static, "hot_switch": hot, "chosen": chosen, "speedup": speedup}


# --- layer-wise search (Galvatron) -----------------------------------------------------------------------
def layer_tables(times: Sequence[Sequence[float]], memories: Sequence[Sequence[int]], budget: int,
                 transition: Sequence[Sequence[float]] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The dynamic program of `search_layers`, every prefix kept: (best, back) where best[l][c, m] is
    the least time of layers 0..l with layer l under option c and exactly m memory units in all
    (inf where none), back[l - 1][c, m] the (option, units) of layer l - 1 on that path. An option
    whose time is inf, and a transition that is inf, are never taken."""
    layers = len(times)
    k = len(times[0])
    if any(len(t) != k for t in times) or any(len(m) != k for m in memories) or len(memories) != layers:
        raise HotSPaError("search_layers: every layer needs one time and one memory per option")
    if transition is None:
        transition = [[0.0] * k for _ in range(k)]
    inf = float("inf")
    best = np.full((k, budget + 1), inf)
    for c in range(k):
        if 0 <= memories[0][c] <= budget:
            best[c, memories[0][c]] = times[0][c]
    bests, backs = [best], []
    trans = np.asarray(transition, dtype=float)
    for layer in range(1, layers):
        new = np.full((k, budget + 1), inf)
        arg = np.full((k, budget + 1, 2), -1, dtype=np.int64)
        for c in range(k):
            need = memories[layer][c]
            if need > budget or not math.isfinite(times[layer][c]):
                continue
            preds = np.nonzero(np.isfinite(trans[:, c]))[0]  # an inf transition is never taken
            if preds.size == 0:
                continue
            cand = best[preds, :budget + 1 - need] + trans[preds, c][:, None] + times[layer][c]
            pick = np.argmin(cand, axis=0)  # the lowest option among equals, as a scan in order keeps
            value = cand[pick, np.arange(cand.shape[1])]
            reached = np.isfinite(value)
            new[c, need:][reached] = value[reached]
            arg[c, need:][reached] = np.stack([preds[pick[reached]], np.nonzero(reached)[0]], axis=1)
        backs.append(arg)
        best = new
        bests.append(best)
    return bests, backs


def layer_path(backs: Sequence[np.ndarray], last: int, c: int, m: int) -> list[int]:
    """The options of layers 0..last on the path of `layer_tables` that ends at (c, m) on layer `last`."""
    path = [int(c)]
    for arg in reversed(backs[:last]):
        c, m = arg[c, m]
        path.append(int(c))
    return path[::-1]


def search_layers(times: Sequence[Sequence[float]], memories: Sequence[Sequence[int]], budget: int,
                  transition: Sequence[Sequence[float]] | None = None) -> tuple[list[int], float]:
    """The choice per layer (indices into each layer's options) of least total time whose
    memory sums to at most `budget`; `transition[i][j]` is the cost between consecutive layers
    choosing options i then j (resharding activations). Memories are integers (e.g. MiB),
    which makes the dynamic program exact. Raises HotSPaError when nothing fits."""
    layers = len(times)
    if layers == 0:
        return [], 0.0
    bests, backs = layer_tables(times, memories, budget, transition)
    c, m = np.unravel_index(np.argmin(bests[-1]), bests[-1].shape)
    total = float(bests[-1][c, m])
    if not math.isfinite(total):
        raise HotSPaError(f"no choice of options fits {layers} layers in a memory budget of {budget}; the least "
                          f"they need is {sum(min(m) for m in memories)}")
    return layer_path(backs, layers - 1, c, m), total


def brute_force_layers(times, memories, budget, transition=None) -> tuple[list[int], float]:
    k = len(times[0])
    transition = transition or [[0.0] * k for _ in range(k)]
    best = None
    for pick in itertools.product(range(k), repeat=len(times)):
        if sum(memories[i][c] for i, c in enumerate(pick)) > budget:
            continue
        t = sum(times[i][c] for i, c in enumerate(pick)) + sum(transition[a][b] for a, b in zip(pick, pick[1:]))
        if best is None or t < best[1]:
            best = (list(pick), t)
    if best is None:
        raise HotSPaError("nothing fits")
    return best


__all__ = ["A800", "LLAMA_7B", "RECOMPUTE", "ClusterSpec", "HotSPaError", "ModelSpec", "Prediction", "Strategy",
           "all_gather_time", "best_per_bucket", "best_per_bucket_tour", "brute_force_buckets",
           "brute_force_buckets_tour", "layer_stages", "runtime_layouts", "runtime_switch_bytes", "runtime_switch_plan",
           "runtime_switch_time",
           "runtime_switches_time",
           "bucketize", "rebatch_bytes", "row_layout",
           "transition_time",
           "brute_force_layers", "collective_latency", "collective_time", "layer_activation_bytes", "layer_flops",
           "layer_path", "layer_tables", "layer_time", "mixed_strategy", "parse_strategy", "predict", "run_time",
           "search_layers", "simulate", "static_strategies", "switch_time"]
