"""ResNet-18 (CIFAR stem) + SGD with momentum: luoshu define-and-run vs PyTorch eager, samples/s.

Both models are built from the same layout (torchvision's BasicBlock, 3x3 stem, no max pool)
with the same weights, run in this process on the same data, and each timing is the median
of several repeats after warm-up, interleaved repeat by repeat so drift in machine load hits both
alike. PyTorch uses its fused SGD (its fastest on CPU). Target (issue 3): >= 1.0x.

    .venv/bin/python benchmarks/bench_resnet.py [--batch 32] [--steps 5] [--repeats 3] [--width 64]
        [--threads N] [--csv results.csv]

On a CPU shared with other jobs, `--threads 1` avoids OpenMP threads spinning against each other;
both sides always run with the same thread count.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import numpy as np
import torch
from tqdm import tqdm

import luoshu as ls
from luoshu import models


class TorchBasicBlock(torch.nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.conv2 = torch.nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(width)
        self.downsample = None
        if stride != 1 or cin != width:
            self.downsample = torch.nn.Sequential(torch.nn.Conv2d(cin, width, 1, stride, bias=False),
                                                  torch.nn.BatchNorm2d(width))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet18(torch.nn.Module):
    """ResNet-18 with the CIFAR stem, written with torch.nn (the reference)."""

    def __init__(self, num_classes=10, width=64):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(width)
        cin = width
        for i in range(4):
            w = width * 2 ** i
            blocks = [TorchBasicBlock(cin, w, 2 if i else 1), TorchBasicBlock(w, w, 1)]
            cin = w
            setattr(self, f"layer{i + 1}", torch.nn.Sequential(*blocks))
        self.fc = torch.nn.Linear(cin, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def luoshu_runner(model, data, lr):
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 3, 32, 32))
        y = ls.placeholder("y", (None,), "int64")
        loss = ls.nn.functional.cross_entropy(model(x), y)
        train = ls.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4).minimize(loss)

    def step(i):
        xb, yb = data[i % len(data)]
        return g.run([loss, train], {x: xb, y: yb})[0]

    return step


def torch_runner(model, data, lr):
    # fused: PyTorch's fastest SGD on CPU (the default there is the per-parameter for-loop)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, fused=True)
    tdata = [(torch.from_numpy(xb), torch.from_numpy(yb)) for xb, yb in data]

    def step(i):
        xb, yb = tdata[i % len(tdata)]
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        return loss.item()  # luoshu returns the loss as NumPy each step; do the same work here

    return step


def measure(step, steps: int, repeats: int, batch: int) -> list[float]:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        rates.append(steps * batch / (time.perf_counter() - start))
    return rates


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--csv", default=None, help="append the result as a row to this CSV file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, args.batch))
            for _ in range(4)]
    ls.manual_seed(0)
    ours = models.resnet18(num_classes=10, width=args.width)
    ref = TorchResNet18(10, args.width)
    ref.load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in ours.state_dict().items()})
    lstep, tstep = luoshu_runner(ours, data, 0.01), torch_runner(ref, data, 0.01)
    first = float(lstep(0)), tstep(0)  # same weights and batch: the first losses agree
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; first loss luoshu {first[0]:.5f} "
          f"torch {first[1]:.5f}")
    for i in range(1, 3):  # warm-up (plan compile, allocator, oneDNN primitive caches)
        lstep(i)
        tstep(i)
    lrates, trates = [], []
    with tqdm(range(args.rounds), desc="rounds (luoshu, torch)", unit="round") as bar:
        for r in bar:
            for _ in range(args.repeats):  # one repeat each in turn, the order alternating by round
                pair = [(lstep, lrates), (tstep, trates)][::1 if r % 2 == 0 else -1]
                for step, rates in pair:
                    rates += measure(step, args.steps, 1, args.batch)
            bar.set_postfix(luoshu=f"{statistics.median(lrates):.1f}/s", torch=f"{statistics.median(trates):.1f}/s")
    o, t = statistics.median(lrates), statistics.median(trates)
    print(f"{'batch':>6} {'luoshu samples/s':>17} {'torch samples/s':>16} {'ratio':>7}")
    print(f"{args.batch:>6} {o:>17.1f} {t:>16.1f} {o / t:>6.2f}x")
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["model", "batch", "width", "threads", "luoshu_samples_per_s", "torch_samples_per_s",
                                 "ratio"])
            writer.writerow(["resnet18-cifar", args.batch, args.width, torch.get_num_threads(), f"{o:.2f}",
                             f"{t:.2f}", f"{o / t:.3f}"])


if __name__ == "__main__":
    main()
