"""MLP 784-256-256-10 + SGD: luoshu define-and-run vs PyTorch eager, training steps/s.

Both run in this process on the same data; each timing is the median of several
repeats after warm-up. Targets (issue 2): >= 1.25x at batch 16, >= 1.05x at batch 128.

    .venv/bin/python benchmarks/bench_mlp.py [--steps 200] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import luoshu as ls


def luoshu_runner(batch: int, data):
    ls.manual_seed(0)
    model = ls.nn.Sequential(ls.nn.Linear(784, 256), ls.nn.ReLU(), ls.nn.Linear(256, 256), ls.nn.ReLU(),
                             ls.nn.Linear(256, 10))
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 784))
        y = ls.placeholder("y", (None,), "int64")
        loss = ls.nn.functional.cross_entropy(model(x), y)
        train = ls.optim.SGD(model.parameters(), lr=0.01).minimize(loss)

    def step(i):
        xb, yb = data[i % len(data)]
        g.run([loss, train], {x: xb, y: yb})

    return step


def torch_runner(batch: int, data):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tdata = [(torch.from_numpy(xb), torch.from_numpy(yb)) for xb, yb in data]

    def step(i):
        xb, yb = tdata[i % len(tdata)]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        loss.item()  # luoshu returns the loss as NumPy each step; do the same work here

    return step


def measure(step, steps: int, repeats: int) -> float:
    for i in range(20):
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
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 128])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'batch':>6} {'luoshu steps/s':>15} {'torch steps/s':>14} {'ratio':>7}")
    for batch in args.batches:
        data = [(rng.standard_normal((batch, 784)).astype(np.float32), rng.integers(0, 10, batch))
                for _ in range(16)]
        # Interleave the two so drift in machine load hits both alike.
        ours, theirs = [], []
        lstep, tstep = luoshu_runner(batch, data), torch_runner(batch, data)
        for _ in range(3):
            ours.append(measure(lstep, args.steps, max(1, args.repeats // 3)))
            theirs.append(measure(tstep, args.steps, max(1, args.repeats // 3)))
        o, t = statistics.median(ours), statistics.median(theirs)
        print(f"{batch:>6} {o:>15.1f} {t:>14.1f} {o / t:>6.2f}x")


if __name__ == "__main__":
    main()
