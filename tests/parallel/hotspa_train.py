"""GPT-2 / LLaMA trained with HotSPa hot switching over long-tailed batches; run under
`luoshu launch -n 4` by the tests.

    luoshu launch -n 4 tests/parallel/hotspa_train.py --models gpt2,llama --out PREFIX

Every rank draws the same batches; rank r writes, per model, the losses and the full parameters
(gathered from the owner's shards) to PREFIX.<model>.rank<r>.npz. `reference(model)` is the
one-process reference: each sequence alone, eagerly, losses summed over the batch's targets.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import luoshu as ls
from luoshu.models.language import GPT2, GPTConfig, Llama, LlamaConfig

VOCAB, MAX_LEN, STEPS, BATCH = 64, 32, 5, 14
BOUNDS = [32, 12, 6, 0]
STRATEGIES = ["dp1,tp4,pp1", "dp2,tp2,pp1", "dp4,tp1,pp1"]


def build(name: str, layers: int = 2, heads: int = 4):
    ls.manual_seed(7)
    if name == "gpt2":
        model = GPT2(GPTConfig(vocab_size=VOCAB, block_size=MAX_LEN, n_layer=layers, n_head=heads, n_embd=32))
    else:
        model = Llama(
            LlamaConfig(
                vocab_size=VOCAB, dim=32, n_layers=layers, n_heads=heads, n_kv_heads=heads, hidden_dim=64,
                max_seq_len=MAX_LEN,
            )
        )
    return model.to(dtype="float64")


def batches(seed: int = 5, longest: int = MAX_LEN):
    """Long-tailed batches: most sequences short, a few up to `longest` (every bucket non-empty
    when that is MAX_LEN)."""
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        seqs = ls.data.synthetic_sequences(
            BATCH - 2, VOCAB, min_len=2, max_len=longest, seed=int(rng.integers(1 << 30))
        )
        yield [*seqs, rng.integers(0, VOCAB, longest), rng.integers(0, VOCAB, min(9, longest))]


CLIP = {"gpt2": None, "llama": 0.3}  # LLaMA's gradients are clipped to a global norm they exceed


def optimizer(model, clip=None):
    return ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=clip)


def reference(name: str, clip: bool = True, longest: int = MAX_LEN, layers: int = 2, with_optimizer: bool = False,
              heads: int = 4):
    """(losses, {name: parameter}) of one process on the same batches: the mean next-token loss
    over every target of the batch, each sequence run alone (no packing, no parallelism); with
    `with_optimizer`, also the optimizer."""
    model = build(name, layers, heads)
    opt = optimizer(model, CLIP[name] if clip else None)
    losses = []
    for seqs in batches(longest=longest):
        total = sum(len(s) - 1 for s in seqs)
        model.zero_grad()
        value = 0.0
        for s in seqs:
            if len(s) < 2:
                continue
            # the whole sequence in, as a one-process job feeds it; its last token has no target
            logits = model(ls.tensor(s[None]))
            target = np.concatenate([s[1:], [-100]])
            loss = ls.nn.functional.cross_entropy(logits.reshape((-1, VOCAB)), ls.tensor(target), reduction="sum")
            loss = loss * (1.0 / total)
            loss.backward()
            value += loss.item()
        opt.step()
        losses.append(value)
    params = {n: p.value.clone().numpy() for n, p in model.named_parameters()}
    return (np.array(losses), params, opt) if with_optimizer else (np.array(losses), params)


def train(name: str, strategies=STRATEGIES, bounds=BOUNDS, longest: int = MAX_LEN, layers: int = 2,
          owner: int | None = None, checkpoint: str | None = None, heads: int = 4, budget: float | None = None,
          steps: int = STEPS, resume: str | None = None, stages: list[int] | None = None):
    """HotSPa's training on the batches; `checkpoint`: then the job's checkpoint package written
    there (`luoshu.train.hot_switch.save_checkpoint`, gathered from the owner's shards).
    `strategies="auto"`: HotSPa's own choice for the first batch's lengths under `budget` bytes.
    `steps`: stop after that many batches; `resume`: a checkpoint package of this training to go on
    from (as `luoshu train --resume` does: the full values into the model before HotSPa shards them,
    the optimizer state into the owner's shards), from the batch after its step. `stages`: the first
    block of each pipeline stage of strategy 0 (HotSPa's `stages`)."""
    from luoshu.parallel.pipeline import _layers
    from luoshu.train.hot_switch import load_optimizer, save_checkpoint

    model = build(name, layers, heads)
    first = 0
    if resume is not None:
        first = int(ls.load(resume, model)["step"])
    auto = {"memory_budget": budget, "auto_lengths": [len(s) for s in next(batches(longest=longest))]}
    split = None if stages is None else {0: [f"{_layers(model)[0]}.{i}" for i in stages]}
    hot = ls.parallel.HotSPa(model, strategies, bounds, owner=owner, stages=split,
                             **(auto if strategies == "auto" else {}))
    opt = optimizer(model, CLIP[name])
    if resume is not None:
        load_optimizer(Path(resume), hot, opt)
    losses, reports = [], []
    for step, seqs in enumerate(batches(longest=longest)):
        if step < first:
            continue
        if step >= steps:
            break
        report = hot.step(seqs, opt)
        losses.append(report.loss)
        reports.append(report)
    params = {n: v.numpy() for n, v in hot.full_parameters().items()}
    if checkpoint is not None:
        save_checkpoint(Path(checkpoint), hot, model, opt, {"step": min(steps, STEPS)})
    return np.array(losses), params, reports, hot


def _collectives(hot, i: int, name: str) -> int:
    """How many `name` collectives strategy i's localised graph holds (sequence parallelism
    turns the TP all-reduces into reduce-scatters and all-gathers)."""
    from luoshu.compiler import states
    from luoshu.core.op import topological_ops

    program = hot._programs[i]
    local = states.localize_graph(topological_ops(program.fetches, program.graph), [], hot._strategies[i])
    return sum(op.opdef.name == name for op in local.graph.ops)


def _segment_counts(hot, i: int) -> np.ndarray:
    """Per segment of mixed strategy i: (reduce-scatters in this rank's segment plans, recompute
    regions of the traced graph (the blocks marked), values its forward saves for the backward;
    -1 for a segment of another pipeline stage); an empty array for another strategy."""
    if i not in hot._mixed:
        return np.zeros((0, 3), np.int64)
    rows = []
    regions = len(hot._mixed[i].graph.recompute_regions)
    for program in hot._mixed[i].programs:
        if program is None:  # another pipeline stage's segment
            rows.append((-1, regions, -1))
            continue
        ops = program.forward.ops + program.backward.ops
        rows.append((sum(op.opdef.name == "reduce_scatter" for op in ops), regions, len(program.saved)))
    return np.array(rows, np.int64)


def _stage_counts(hot, i: int) -> tuple[int, int, int]:
    """(reduce-scatters in this rank's stage graphs, values each micro-batch's forward saves for
    the backward, recompute regions traced) of pipeline strategy i; zeros for a pp = 1 one."""
    if i not in hot._pipelines:
        return 0, 0, 0
    pipe = hot._pipelines[i]
    ops = pipe.program.forward.ops + pipe.program.backward.ops
    scatters = sum(op.opdef.name == "reduce_scatter" for op in ops)
    return scatters, len(pipe.program.saved), len(pipe.graph.recompute_regions)


def activation_peaks(hot, sequences) -> list[int]:
    """The most activation bytes alive at once in each pp = 1 strategy's plan, on `sequences`
    packed into one bucket (the plan's memory accounting; one run, no update)."""
    from luoshu.compiler import states
    from luoshu.data.packing import bucket_batch

    rows = bucket_batch(sequences, [MAX_LEN, 0])[0].rows
    peaks = []
    for i, program in enumerate(hot._programs):
        if program is None:  # a pipeline or per-block strategy
            continue
        states.select(program.graph, hot._strategies[i], ("hotspa", i))
        ids, positions, segments, labels, scale = program.feeds
        feed = {ids: rows.tokens, positions: rows.positions, segments: rows.segment_ids, labels: rows.labels,
                scale: np.asarray(1.0)}
        peaks.append(program.graph.memory(program.fetches, feed).peak_activations)
    return peaks


def _held(hot) -> np.ndarray:
    """Per parameter, whether this rank holds a shard of it in the owner's layout."""
    return np.array([hot.holds(k) for k in range(len(hot.params))])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategies", default=";".join(STRATEGIES), help="';'-separated strategy strings")
    parser.add_argument("--bounds", default=",".join(map(str, BOUNDS)), help="bucket bounds, one more than strategies")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks of each model")
    parser.add_argument("--owner", type=int, default=None, help="the owner strategy (default: HotSPa's choice)")
    parser.add_argument("--checkpoint", default=None, help="write each model's checkpoint to CHECKPOINT.<model>")
    parser.add_argument("--stages", default=None, help="strategy 0's pipeline stages' first blocks, e.g. 0,3")
    parser.add_argument("--heads", type=int, default=4, help="attention heads of each model")
    parser.add_argument("--budget", type=float, default=None, help="memory_budget (bytes) of --strategies auto")
    parser.add_argument("--steps", type=int, default=STEPS, help="stop after this many batches")
    parser.add_argument("--resume", default=None, help="go on from each model's checkpoint RESUME.<model>")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()
    for name in args.models.split(","):
        bounds = [int(b) for b in args.bounds.split(",")]
        checkpoint = None if args.checkpoint is None else f"{args.checkpoint}.{name}"
        stages = None if args.stages is None else [int(b) for b in args.stages.split(",")]
        strategies = "auto" if args.strategies == "auto" else args.strategies.split(";")
        resume = None if args.resume is None else f"{args.resume}.{name}"
        losses, params, reports, hot = train(name, strategies, bounds, layers=args.layers, owner=args.owner,
                                             checkpoint=checkpoint, heads=args.heads, budget=args.budget,
                                             steps=args.steps, resume=resume, stages=stages)
        mixed = sorted(hot._mixed)
        extra = {
            "owner": np.array(hot.owner),
            "strategies": np.array([f"dp{m.dp},tp{m.tp},pp{m.pp}" for m in hot.meshes]),
            "recompute": np.array(hot.recompute),
            "order": np.array(reports[0].order),
            "switch_bytes": np.array([r.switch_bytes for r in reports]),
            "tokens": np.array([[r.tokens.get(i, 0) for i in range(len(hot.meshes))] for r in reports]),
            "reduce_scatter": np.array(
                [0 if hot._programs[i] is None else _collectives(hot, i, "reduce_scatter")
                 for i in range(len(hot.meshes))]
            ),
            "stage_counts": np.array([_stage_counts(hot, i) for i in range(len(hot.meshes))]),
            "micro_batches": np.array([max(r.micro_batches.values(), default=0) for r in reports]),
            "held": _held(hot),
            # parameter elements this rank holds in the owner's layout
            "held_numel": np.array(sum(p._value.numel() for p in hot.params)),
            "rebatch": np.array([(r.rebatch_bytes, r.rebatch_messages) for r in reports]),
            "step_seconds": np.array([r.step_seconds for r in reports]),
            # per mixed strategy's boundary (tag order): (bytes, messages) of the last step's re-batch forward
            "traffic": np.array([v for i in mixed for _, v in sorted(hot._mixed[i].traffic().items())]),
            "segment_counts": np.concatenate([_segment_counts(hot, i) for i in mixed] or [np.zeros((0, 3))]),
        }
        np.savez(f"{args.out}.{name}.rank{ls.distributed.rank()}.npz", losses=losses, **extra, **params)
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
