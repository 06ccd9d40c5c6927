"""GPT-2 training step (forward, backward, AdamW): luoshu plan and luoshu compiled vs PyTorch eager and
torch.compile, steps/s.

The same model (the zoo's GPT-2: separate q/k/v/o projections, tied head; bench_packing's TorchGPT2 for
PyTorch, weights copied from luoshu's, so both first check they give the same loss) on the same batches
of fixed shape. Rows:

  luoshu plan          define-and-run graph, fused AdamW
  luoshu compiled      Graph.compile: the whole step (forward, backward, AdamW) as one Inductor graph
  torch eager          nn.Module + AdamW(fused=True), the best eager configuration
  torch.compile        the module compiled (forward and backward through AOTAutograd) and the optimizer
                       step compiled too (AdamW(foreach=True) inside torch.compile, PyTorch's recipe)

Repeats are interleaved (see _timing.py); medians after warm-up (which includes compiling).

    .venv/bin/python benchmarks/bench_gpt2.py [--layers 2] [--width 128] [--length 64] [--batch 4]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _timing import interleaved
from bench_packing import TorchGPT2

import luoshu as ls
from luoshu import models

F = torch.nn.functional
F_ls = ls.nn.functional


def luoshu_runner(config, data, compiled: bool):
    ls.manual_seed(0)
    model = models.GPT2(config)
    b, n = data[0][0].shape
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (b, n), "int64")
        target = ls.placeholder("target", (b, n), "int64")
        loss = F_ls.cross_entropy(model(ids).reshape((-1, config.vocab_size)), target.reshape((-1,)))
        train = ls.optim.AdamW(model.parameters(), lr=1e-4).minimize(loss)
    if compiled:
        g.compile([loss, train])

    def step(i):
        xb, yb = data[i % len(data)]
        return float(g.run([loss, train], {ids: xb, target: yb})[0])

    return step, model


def torch_runner(config, data, weights, compiled: bool):
    model = TorchGPT2(config)
    model.load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in weights.state_dict().items()})
    positions = torch.arange(data[0][0].shape[1])
    tdata = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in data]
    if compiled:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        forward = torch.compile(model)
        opt_step = torch.compile(opt.step)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        forward, opt_step = model, opt.step

    def step(i):
        xb, yb = tdata[i % len(tdata)]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(xb, positions, None).reshape(-1, config.vocab_size), yb.reshape(-1))
        loss.backward()
        opt_step()
        return loss.item()  # luoshu returns the loss each step; do the same work here

    return step



def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = models.GPTConfig(vocab_size=args.vocab, block_size=args.length, n_layer=args.layers, n_head=args.heads,
                              n_embd=args.width)
    rng = np.random.default_rng(0)
    data = [(rng.integers(0, args.vocab, (args.batch, args.length)), rng.integers(0, args.vocab, (args.batch,
                                                                                                   args.length)))
            for _ in range(4)]
    plan, weights = luoshu_runner(config, data, compiled=False)
    runners = {"luoshu plan": plan, "luoshu compiled": luoshu_runner(config, data, compiled=True)[0],
               "torch eager": torch_runner(config, data, weights, compiled=False),
               "torch.compile": torch_runner(config, data, weights, compiled=True)}
    first = {name: run(0) for name, run in runners.items()}  # the same weights and batch: the same loss
    spread = max(first.values()) - min(first.values())
    print("first losses:", {k: f"{v:.9g}" for k, v in first.items()})
    assert spread < 1e-4, f"the contenders disagree on the first loss: {first}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GPT-2 {args.layers} layers, width "
          f"{args.width}, length {args.length}, batch {args.batch}, vocab {args.vocab}; first losses agree to "
          f"{spread:.1e}; steps/s, median of {args.repeats} interleaved rounds of {args.steps} steps")
    rates = interleaved(runners, args.steps, args.repeats, warmup=5)
    print("  ".join(f"{name} {rate:.1f}" for name, rate in rates.items()))
    for mine in ("luoshu plan", "luoshu compiled"):
        print(f"{mine}: {rates[mine] / rates['torch eager']:.2f}x torch eager, "
              f"{rates[mine] / rates['torch.compile']:.2f}x torch.compile")


if __name__ == "__main__":
    main()
