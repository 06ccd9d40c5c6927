"""Packed rows vs padding for a long-tail batch: a GPT-2 training step (forward + backward).

A step's batch of variable-length sequences (long-tailed lengths, `--dist`) is bucketed by
descending bounds; each bucket runs either padded (every sequence right-padded to the bucket's
bound, plain causal attention, which is exact for the real tokens) or packed
(`luoshu.data.bucket_batch`: rows of the bound's tokens, reset positions, block-diagonal causal
mask). luoshu runs one define-and-run graph with a run-time length (one plan for every bucket);
the reference is the same model in PyTorch eager on the same rows (SDPA with the same boolean
mask, or is_causal for padding), its weights copied from luoshu's. Both first check that they
give the same loss. Medians of `--repeats` steps after one warm-up, repeats interleaved.

    .venv/bin/python benchmarks/bench_packing.py [--sequences 48] [--max-len 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import luoshu as ls
from luoshu import data, models

F = torch.nn.functional


class TorchGPT2(torch.nn.Module):
    """GPT-2 as luoshu's zoo builds it (separate q/k/v/o projections, tied head), parameter names alike."""

    def __init__(self, c: models.GPTConfig):
        super().__init__()
        self.c = c
        self.wte = torch.nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = torch.nn.Embedding(c.block_size, c.n_embd)
        self.h = torch.nn.ModuleList()
        for _ in range(c.n_layer):
            block = torch.nn.Module()
            block.ln_1, block.ln_2 = (torch.nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps) for _ in range(2))
            block.attn = torch.nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(block.attn, name, torch.nn.Linear(c.n_embd, c.n_embd))
            block.mlp = torch.nn.Module()
            block.mlp.c_fc = torch.nn.Linear(c.n_embd, 4 * c.n_embd)
            block.mlp.c_proj = torch.nn.Linear(4 * c.n_embd, c.n_embd)
            self.h.append(block)
        self.ln_f = torch.nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps)

    def forward(self, ids, positions, mask):
        b, n = ids.shape
        heads = self.c.n_head
        x = self.wte(ids) + self.wpe(positions)
        for blk in self.h:
            y = blk.ln_1(x)
            q, k, v = (
                getattr(blk.attn, p)(y).view(b, n, heads, -1).transpose(1, 2) for p in ("q_proj", "k_proj", "v_proj")
            )
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
            x = x + blk.attn.o_proj(a.transpose(1, 2).reshape(b, n, -1))
            x = x + blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(blk.ln_2(x)), approximate="tanh"))
        return self.ln_f(x) @ self.wte.weight.T


def padded_rows(sequences, indices, width):
    tokens = np.zeros((len(indices), width), np.int64)
    labels = np.full((len(indices), width), -100, np.int64)
    for r, i in enumerate(indices):
        s = sequences[i]
        tokens[r, : len(s)] = s
        labels[r, : len(s) - 1] = s[1:]
    return tokens, labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--bounds", type=int, nargs="+", default=[512, 128, 0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dist", default="long_tail", help="length distribution of synthetic_sequences")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = models.GPTConfig(vocab_size=1000, block_size=args.max_len, n_layer=2, n_head=4, n_embd=64)
    ls.manual_seed(0)
    model = models.GPT2(config)
    ref = TorchGPT2(config)
    ref.load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in model.state_dict().items()})
    sequences = data.synthetic_sequences(
        args.sequences, config.vocab_size, min_len=8, max_len=args.max_len, dist=args.dist, seed=0
    )
    groups = [g for g in data.bucket_batch(sequences, args.bounds) if g.rows.num_rows]

    params = model.parameters()
    with ls.Graph() as graph:
        ph = {n: ls.placeholder(n, (None, None), "int64") for n in ("ids", "pos", "seg", "labels")}
        packed_loss = ls.nn.functional.cross_entropy(
            model(ph["ids"], positions=ph["pos"], segment_ids=ph["seg"]).reshape((-1, config.vocab_size)),
            ph["labels"].reshape((-1,)),
            reduction="sum",
        )
        packed_fetch = [packed_loss, *ls.gradients(packed_loss, params)]
        padded_loss = ls.nn.functional.cross_entropy(
            model(ph["ids"]).reshape((-1, config.vocab_size)), ph["labels"].reshape((-1,)), reduction="sum"
        )
        padded_fetch = [padded_loss, *ls.gradients(padded_loss, params)]

    packed_feeds, padded_feeds, torch_packed, torch_padded = [], [], [], []
    computed = {"packed": 0, "padded": 0}
    for g in groups:
        r = g.rows
        packed_feeds.append(
            {ph["ids"]: r.tokens, ph["pos"]: r.positions, ph["seg"]: r.segment_ids, ph["labels"]: r.labels}
        )
        mask = torch.from_numpy(r.segment_ids[:, :, None] == r.segment_ids[:, None, :])[:, None]
        mask = mask & torch.ones(r.budget, r.budget, dtype=torch.bool).tril()
        torch_packed.append(
            (torch.from_numpy(r.tokens), torch.from_numpy(r.positions), mask, torch.from_numpy(r.labels))
        )
        tokens, labels = padded_rows(sequences, g.indices, g.bound)
        padded_feeds.append({ph["ids"]: tokens, ph["labels"]: labels})
        torch_padded.append((torch.from_numpy(tokens), torch.arange(g.bound), None, torch.from_numpy(labels)))
        computed["packed"] += r.tokens.size
        computed["padded"] += tokens.size

    def luoshu_step(fetch, feeds):
        return sum(float(graph.run(fetch, f)[0]) for f in feeds)

    def torch_step(batches):
        total = 0.0
        for ids, pos, mask, labels in batches:
            ref.zero_grad(set_to_none=True)
            loss = F.cross_entropy(
                ref(ids, pos, mask).reshape(-1, config.vocab_size), labels.reshape(-1), reduction="sum"
            )
            loss.backward()
            total += loss.item()
        return total

    runs = {
        ("packed", "luoshu"): lambda: luoshu_step(packed_fetch, packed_feeds),
        ("packed", "torch"): lambda: torch_step(torch_packed),
        ("padded", "luoshu"): lambda: luoshu_step(padded_fetch, padded_feeds),
        ("padded", "torch"): lambda: torch_step(torch_padded),
    }
    losses = {key: fn() for key, fn in runs.items()}  # warm-up, and the check that all agree
    for key, value in losses.items():
        assert abs(value - losses["packed", "luoshu"]) <= 1e-3 * abs(value), (key, value, losses)
    times = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    med = {key: statistics.median(t) * 1e3 for key, t in times.items()}
    real = sum(len(s) for s in sequences)
    print(
        f"{args.sequences} sequences, {real} tokens (max {max(len(s) for s in sequences)}), buckets "
        f"{args.bounds}: {[(g.bound, len(g.indices), g.tokens) for g in groups]} (bound, sequences, tokens); "
        f"GPT-2 2x64, float32, {args.threads} thread(s), median of {args.repeats}"
    )
    print(f"{'mode':8s} {'tokens computed':>16s} {'luoshu ms':>10s} {'torch ms':>10s} {'luoshu/torch':>13s}")
    for mode in ("packed", "padded"):
        lm, tm = med[mode, "luoshu"], med[mode, "torch"]
        print(f"{mode:8s} {computed[mode]:16d} {lm:10.1f} {tm:10.1f} {lm / tm:13.2f}")
    print(
        f"packing speed-up: luoshu {med['padded', 'luoshu'] / med['packed', 'luoshu']:.2f}x, "
        f"torch {med['padded', 'torch'] / med['packed', 'torch']:.2f}x"
    )


if __name__ == "__main__":
    main()
