"""MLP 784-256-256-10 + SGD: luoshu define-and-run vs PyTorch eager, training steps/s.

All run in this process on the same data, repeats interleaved (see _timing.py), medians after
warm-up. PyTorch rows: SGD with the default for-loop, foreach and fused implementations (on CPU
the default is the for-loop; a user tuning the step picks foreach or fused). With --compile two
more rows: "luoshu compiled" (`Graph.compile`: forward, backward and the SGD update as one
TorchInductor graph) and "torch.compile" (the model compiled, forward and backward, and the
optimizer step compiled too: foreach SGD inside torch.compile, PyTorch's recipe). The ratios are
luoshu (plan, and compiled) against the best eager PyTorch row and against torch.compile.

    .venv/bin/python benchmarks/bench_mlp.py [--steps 200] [--repeats 5] [--compile]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _timing import interleaved

import luoshu as ls


def luoshu_runner(batch: int, data, compiled: bool = False):
    ls.manual_seed(0)
    model = ls.nn.Sequential(ls.nn.Linear(784, 256), ls.nn.ReLU(), ls.nn.Linear(256, 256), ls.nn.ReLU(),
                             ls.nn.Linear(256, 10))
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 784))
        y = ls.placeholder("y", (None,), "int64")
        loss = ls.nn.functional.cross_entropy(model(x), y)
        train = ls.optim.SGD(model.parameters(), lr=0.01).minimize(loss)
    if compiled:
        g.compile([loss, train])

    def step(i):
        xb, yb = data[i % len(data)]
        g.run([loss, train], {x: xb, y: yb})

    return step


def torch_runner(batch: int, data, sgd: dict, compile: bool = False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, **sgd)
    forward = torch.compile(model) if compile else model
    opt_step = torch.compile(opt.step) if compile else opt.step
    tdata = [(torch.from_numpy(xb), torch.from_numpy(yb)) for xb, yb in data]

    def step(i):
        xb, yb = tdata[i % len(tdata)]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(forward(xb), yb)
        loss.backward()
        opt_step()
        loss.item()  # luoshu returns the loss as NumPy each step; do the same work here

    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--compile", action="store_true", help="add the luoshu compiled and torch.compile rows")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, steps/s, median of {args.repeats} "
          f"interleaved rounds of {args.steps} steps")
    for batch in args.batches:
        data = [(rng.standard_normal((batch, 784)).astype(np.float32), rng.integers(0, 10, batch))
                for _ in range(16)]
        refs = {"torch SGD (for-loop)": torch_runner(batch, data, {"foreach": False}),
                "torch SGD foreach": torch_runner(batch, data, {"foreach": True}),
                "torch SGD fused": torch_runner(batch, data, {"fused": True})}
        mine = {"luoshu": luoshu_runner(batch, data)}
        if args.compile:
            mine["luoshu compiled"] = luoshu_runner(batch, data, compiled=True)
            refs["torch.compile"] = torch_runner(batch, data, {"foreach": True}, compile=True)
        rates = interleaved({**mine, **refs}, args.steps, args.repeats, warmup=20)
        eager = [name for name in refs if name != "torch.compile"]
        best = max(eager, key=rates.get)
        row = "  ".join(f"{name} {rate:.1f}" for name, rate in rates.items())
        ratios = "  ".join(f"{name} / best torch eager ({best}) {rates[name] / rates[best]:.2f}x"
                           + (f", / torch.compile {rates[name] / rates['torch.compile']:.2f}x"
                              if "torch.compile" in rates else "")
                           for name in mine)
        print(f"batch {batch:>4}: {row}  |  {ratios}")


if __name__ == "__main__":
    main()
