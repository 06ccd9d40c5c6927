"""DCN with the HugeCTR quick-start shapes: luoshu define-and-run vs PyTorch eager, samples/s.

13 dense features, 26 slots (the quick start's slot sizes), embedding dim 16, 6 cross
layers, MLP 1024-1024, batch 1024, Adam. PyTorch uses one dense nn.Embedding table and
torch.optim.Adam, which sweeps the whole table every step; luoshu's embedding gradient
is an IndexedSlices and its Adam updates only the touched rows. Neither uses dropout.

    .venv/bin/python benchmarks/bench_dcn.py [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import luoshu as ls
from luoshu import models

SLOTS = [39884, 39043, 17289, 7420, 20263, 3, 7120, 1543, 39884, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 63,
         39884, 39043, 17289, 7420, 20263, 3, 7120, 1543]
CFG = models.CTRConfig(dense_dim=13, slot_sizes=SLOTS, embedding_dim=16, mlp_dims=(1024, 1024), num_cross_layers=6)


def batches(n, batch, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, 13)).astype(np.float32),
             np.stack([rng.integers(0, s, batch) for s in SLOTS], 1),
             rng.integers(0, 2, batch).astype(np.float32)) for _ in range(n)]


def luoshu_step(data):
    ls.manual_seed(0)
    model = models.DCN(CFG)
    with ls.Graph() as g:
        d = ls.placeholder("dense", (None, 13))
        s = ls.placeholder("sparse", (None, 26), "int64")
        y = ls.placeholder("label", (None,))
        loss = ls.nn.functional.binary_cross_entropy_with_logits(model(d, s), y)
        train = ls.optim.Adam(model.parameters(), lr=1e-3).minimize(loss)

    def step(i):
        dense, sparse, label = data[i % len(data)]
        g.run([loss, train], {d: dense, s: sparse, y: label})

    return step


class TorchDCN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(sum(SLOTS), 16)
        self.register_buffer("offsets", torch.tensor(np.concatenate([[0], np.cumsum(SLOTS)[:-1]])))
        dim = 13 + 26 * 16
        self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(dim) / dim**0.5) for _ in range(6)])
        self.b = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(dim)) for _ in range(6)])
        self.deep = torch.nn.Sequential(torch.nn.Linear(dim, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                        torch.nn.ReLU())
        self.head = torch.nn.Linear(dim + 1024, 1)

    def forward(self, dense, sparse):
        x0 = x = torch.cat([dense, self.embedding(sparse + self.offsets).flatten(1)], 1)
        for w, b in zip(self.w, self.b):
            x = x0 * (x @ w).unsqueeze(1) + b + x
        return self.head(torch.cat([x, self.deep(x0)], 1)).squeeze(1)


def torch_step(data):
    torch.manual_seed(0)
    model = TorchDCN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tdata = [tuple(torch.from_numpy(a) for a in b) for b in data]

    def step(i):
        dense, sparse, label = tdata[i % len(tdata)]
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), label)
        loss.backward()
        opt.step()
        loss.item()

    return step


def measure(step, steps, repeats):
    for i in range(3):
        step(i)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        rates.append(steps / (time.perf_counter() - start))
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()
    data = batches(8, args.batch)
    ours = measure(luoshu_step(data), args.steps, args.repeats) * args.batch
    theirs = measure(torch_step(data), args.steps, args.repeats) * args.batch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"luoshu DCN     {ours:>10,.0f} samples/s")
    print(f"PyTorch eager  {theirs:>10,.0f} samples/s (dense nn.Embedding + torch.optim.Adam)")
    print(f"ratio          {ours / theirs:>10.2f}x")


if __name__ == "__main__":
    main()
