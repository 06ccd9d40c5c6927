"""GPT-2 / LLaMA trained under a DeviceMesh with tensor (and sequence, and data) parallelism;
run under `luoshu launch` by the tests.

    luoshu launch -n N tests/parallel/tp_train.py --model gpt2 --dp D --tp T [--sp] --out PREFIX

Every rank draws the same global batches and feeds its DP share (`mesh.batch_slice`); rank r
writes the losses and the full parameters (all-gathered over its TP group) to
PREFIX.rank<r>.npz. `train(...)` without a mesh is the one-process reference.
"""

from __future__ import annotations

import argparse
import os
import signal

import numpy as np
import torch

import luoshu as ls
from luoshu.models.language import GPT2, GPTConfig, Llama, LlamaConfig

VOCAB, LENGTH, BATCH, STEPS = 128, 16, 8, 3


def build(model: str):
    if model == "gpt2":
        return GPT2(GPTConfig(vocab_size=VOCAB, block_size=LENGTH, n_layer=2, n_head=4, n_embd=64))
    return Llama(
        LlamaConfig(vocab_size=VOCAB, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=LENGTH)
    )


def batches(seed: int = 3, steps: int = STEPS):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        ids = rng.integers(0, VOCAB, (BATCH, LENGTH))
        yield ids, np.roll(ids, -1, axis=1)


def train(
    model_name: str,
    mesh=None,
    sequence_parallel: bool = False,
    clip: float | None = None,
    optimizer: str = "adamw",
    die_at: int | None = None,
):
    """(losses, {name: full parameter}) after STEPS optimizer steps (gradients clipped to norm `clip`)."""
    ls.manual_seed(11)
    model = build(model_name).to(dtype="float64")
    tp = ls.parallel.parallelize(model, mesh, sequence_parallel=sequence_parallel) if mesh is not None else None
    if optimizer == "adamw":
        opt = ls.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=clip)
    else:
        opt = ls.optim.OPTIMIZERS[optimizer](model.parameters(), lr=1e-2, max_grad_norm=clip)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, LENGTH), "int64")
        y = ls.placeholder("y", (None, LENGTH), "int64")
        logits = model(ids)
        loss = ls.nn.functional.cross_entropy(logits.reshape((-1, VOCAB)), y.reshape((-1,)))
        step = opt.minimize(loss)
    rows = mesh.batch_slice(BATCH) if mesh is not None else slice(None)
    losses = []
    for i, (ids_v, y_v) in enumerate(batches()):
        if die_at == i and mesh is not None and mesh.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a rank dying mid-job: its peers wait in a collective
        value, _ = g.run([loss, step], {ids: ids_v[rows], y: y_v[rows]})
        losses.append(float(value))
    if tp is not None:
        params = ls.parallel.gather_parameters(model, mesh)
    else:
        params = {n: p.value.clone() for n, p in model.named_parameters()}
    return np.array(losses), {n: v.numpy() for n, v in params.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--die-at", type=int, default=None, help="rank 1 is killed before this step")
    parser.add_argument("--optimizers", default="adamw", help="comma-separated; one result file each")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ls.distributed.init()
    mesh = ls.distributed.DeviceMesh(dp=args.dp, tp=args.tp)
    for name in args.optimizers.split(","):
        losses, params = train(args.model, mesh, args.sp, args.clip, name, args.die_at)
        suffix = "" if name == "adamw" else f".{name}"
        np.savez(f"{args.out}{suffix}.rank{ls.distributed.rank()}.npz", losses=losses, **params)
    ls.distributed.shutdown()


if __name__ == "__main__":
    main()
