"""GPT-2 trained with pipeline (and data) parallelism; run under `luoshu launch` by the tests.

    luoshu launch -n N tests/parallel/pp_train.py --dp D --tp T --pp P --micro-batches M --schedule 1f1b --out PREFIX

Rank r writes the losses (last stage), its stage's parameters, the peak number of
micro-batches (and bytes) of activations its stage kept alive and the bytes of optimizer
state it holds to PREFIX.rank<r>.npz. `--recompute` marks every layer with `ls.nn.recompute`;
`--zero S` shards each stage over its DP group (ZeRO stage S); `--steps` batches are trained;
`--bucket-size-mb` bounds the DP all-reduce buckets. It also counts, per step, the all-reduces
over its DP group (torch's own collective calls) and writes its stage's dense gradient sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import numpy as np
import torch

import luoshu as ls
from luoshu.models.language import GPT2, GPTConfig, Llama, LlamaConfig

VOCAB, LENGTH, BATCH, STEPS = 128, 16, 8, 3


def config(layers: int) -> GPTConfig:
    return GPTConfig(vocab_size=VOCAB, block_size=LENGTH, n_layer=layers, n_head=4, n_embd=64)


def build(model: str, layers: int):
    """GPT-2 (tied embedding: dense gradients) or LLaMA (untied: the table's gradient is sparse rows)."""
    if model == "llama":
        return Llama(
            LlamaConfig(
                vocab_size=VOCAB, dim=64, n_layers=layers, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=LENGTH
            )
        ).to(dtype="float64")
    return GPT2(config(layers)).to(dtype="float64")


def batches(seed: int = 5, steps: int = STEPS):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        ids = rng.integers(0, VOCAB, (BATCH, LENGTH))
        yield ids, np.roll(ids, -1, axis=1)


def loss_fn(logits, y):
    return ls.nn.functional.cross_entropy(logits.reshape((-1, VOCAB)), y.reshape((-1,)))


def state_bytes(optimizers) -> int:
    """The bytes of optimizer state (moments; not the step counts) the optimizers hold."""
    return sum(t.numel() * t.element_size() for o in optimizers for st in o.state.values()
               for k, t in st.items() if k != "step")


def reference(layers: int, model_name: str = "gpt2", clip: float | None = None, steps: int = STEPS):
    """One process, the whole batch at once: (losses, parameters); `clip`: global-norm clipping."""
    ls.manual_seed(11)
    model = build(model_name, layers)
    opt = ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=clip)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, LENGTH), "int64")
        y = ls.placeholder("y", (None, LENGTH), "int64")
        loss = loss_fn(model(ids), y)
        step = opt.minimize(loss)
    losses = [float(g.run([loss, step], {ids: i, y: t})[0]) for i, t in batches(steps=steps)]
    return np.array(losses), {n: p.numpy() for n, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--stages", default=None)
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--bucket-size-mb", type=float, default=None)
    parser.add_argument("--unit-size-mb", type=float, default=None)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()
    mesh = ls.distributed.DeviceMesh(dp=args.dp, tp=args.tp, pp=args.pp)
    ls.manual_seed(11)
    model = build(args.model, args.layers)
    if args.tp > 1:
        ls.parallel.parallelize(model, mesh)
    if args.recompute:  # every layer's insides recomputed in its stage's backward
        for layer in model.h if hasattr(model, "h") else model.layers:
            ls.nn.recompute(layer)
    opt = ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=args.clip)
    stages = args.stages.split(",") if args.stages else None
    pipe = ls.parallel.pipeline(model, mesh, stages=stages, micro_batches=args.micro_batches, schedule=args.schedule,
                                zero=args.zero,
                                **({"bucket_size_mb": args.bucket_size_mb} if args.bucket_size_mb else {}),
                                **({"unit_size_mb": args.unit_size_mb} if args.unit_size_mb else {}))
    pipe.compile([("ids", (None, LENGTH), "int64")], [("y", (None, LENGTH), "int64")], loss_fn, opt)
    losses, peak, peak_bytes = [], 0, 0
    scatters: list = []  # ZeRO: the reduce-scatters each step started
    if args.zero:
        scatter = pipe.zero.scatter

        def counted(*a, **k):
            scatters[-1] += 1
            return scatter(*a, **k)

        pipe.zero.scatter = counted
    reduces: list = []  # the all-reduces over this rank's DP group each step issued
    dp_group, all_reduce = mesh.process_group("dp"), torch.distributed.all_reduce

    def counted_all_reduce(tensor, *a, group=None, **k):
        if dp_group is not None and group is dp_group:
            reduces[-1] += 1
        return all_reduce(tensor, *a, group=group, **k)

    torch.distributed.all_reduce = counted_all_reduce
    need_inputs, need_labels = pipe.feeds_of()
    memory = {}
    for ids, y in batches(steps=args.steps):
        # a rank passes only what its stage reads
        scatters.append(0)
        reduces.append(0)
        feeds = ([ids] if need_inputs else None, [y] if need_labels else None)
        if args.memory and not memory:  # the first step with the plans' memory accounted
            memory = pipe.memory(*feeds)
            losses.append(memory.pop("loss"))
        else:
            losses.append(pipe.step(*feeds))
        peak, peak_bytes = max(peak, pipe.ledger.peak), max(peak_bytes, pipe.ledger.peak_bytes)
    torch.distributed.all_reduce = all_reduce
    names = {id(p): n for n, p in model.named_parameters()}
    whole = pipe.zero.gathered_parameters() if args.zero else contextlib.nullcontext()  # ZeRO-3's shards
    with whole:
        full = ls.parallel.gather_parameters(model, mesh)  # whole values of TP-split ones (collective)
        local_numel = sum(p.value.numel() for p in pipe.params)  # this rank's blocks of its stage's parameters
        shared = {pos for pos, _ in pipe._shared}  # parameters other stages use too (GPT-2's tied table)
        # the bytes of each dense gradient of the stage, in parameter order: a sparse table's rows are
        # gathered (0), unless other stages share the table (then its rows are summed into a dense one)
        dense_bytes = [p.value.numel() * p.value.element_size() if not sparse or k in shared else 0
                       for k, (p, sparse) in enumerate(zip(pipe.params, pipe._sparse))]
    params = {names[id(p)]: full[names[id(p)]].numpy() for p in pipe.params}
    feeds = pipe.feeds  # the placeholders this rank's stage plans read
    forward_ops = [step.op for step in pipe.runner.forward_plan.steps]
    sends = [op.attrs["peer"] for op in forward_ops if op.opdef.name == "send"]
    recvs = [op.attrs["peer"] for op in forward_ops if op.opdef.name == "recv"]
    np.savez(
        f"{args.out}.rank{ls.distributed.rank()}.npz",
        losses=np.array([x if x is not None else np.nan for x in losses]),
        peak=peak,
        peak_bytes=peak_bytes,
        state_bytes=state_bytes(pipe.optimizers()),
        scatters=np.array(scatters, dtype=np.int64),
        reduces=np.array(reduces, dtype=np.int64),
        dense_bytes=np.array(dense_bytes, dtype=np.int64),
        buckets=len(pipe.zero.groups) if args.zero else 0,
        local_numel=local_numel,
        memory=json.dumps(memory),
        stage=pipe.stage,
        rank=ls.distributed.rank(),
        feeds=json.dumps(sorted(feeds)),
        sends=np.array(sends, dtype=np.int64),
        recvs=np.array(recvs, dtype=np.int64),
        **params,
    )
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
