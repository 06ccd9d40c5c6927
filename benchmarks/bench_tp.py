"""Tensor-parallel GPT-2 training step: luoshu's states-derived TP vs PyTorch's `parallelize_module`.

Same model (GPT-2 blocks, pre-LN, GELU-tanh MLP, causal attention; float32), same mesh,
Gloo on CPU, in the same processes with repeats interleaved; median step time (forward,
backward, AdamW) after warm-up, and the bytes each rank sends per step.

- luoshu: the zoo's GPT2 under `ls.parallel.parallelize(model, mesh)` (Megatron's layout:
  q/k/v and c_fc column-parallel, o_proj and c_proj row-parallel, vocabulary-parallel
  tied embedding / LM head and loss), define-and-run.
- PyTorch: the same blocks as torch.nn modules under `torch.distributed.tensor.parallel.
  parallelize_module` with `ColwiseParallel` (q/k/v, c_fc) and `RowwiseParallel` (o_proj,
  c_proj) on a 1-D DeviceMesh, the best plan a PyTorch user would write for this model;
  the (untied) embedding and LM head stay replicated, as PyTorch's tutorial leaves them
  without loss_parallel.

Bytes: luoshu's per-rank bytes are counted at run time from the collectives its comm ops
call during one step (ring volumes: all-reduce 2(n-1)/n, all-gather and reduce-scatter
(n-1)/n of the full tensor); Megatron's analytic volume per step is 4 all-reduces of b*s*h per layer (2
forward, 2 backward) plus the vocabulary-parallel embedding's forward all-reduce and the
LM head's input-gradient all-reduce (b*s*h each), plus the loss's two all-reduces of (b*s)
sums and its all-gather of the (b*s) row maxima.

    .venv/bin/python benchmarks/bench_tp.py [--procs 2 4] [--layers 4] [--width 256] [--length 128] [--batch 4]

Without a torchrun environment the script launches itself through `luoshu launch` once
per process count; worker 0 prints the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as torch_dist
from _relaunch import run_per_process_count

import luoshu as ls
from luoshu.models.language import GPT2, GPTConfig

VOCAB = 1024


class TorchBlock(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(width, width) for _ in range(4))
        self.c_fc, self.c_proj = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def forward(self, x):
        b, s, _ = x.shape
        h = self.ln_1(x)
        q, k, v = (p(h).view(b, s, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, s, -1))
        return x + self.c_proj(torch.nn.functional.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT(torch.nn.Module):
    def __init__(self, layers: int, width: int, heads: int, length: int):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(VOCAB, width), torch.nn.Embedding(length, width)
        self.h = torch.nn.ModuleList(TorchBlock(width, heads) for _ in range(layers))
        self.ln_f, self.head = torch.nn.LayerNorm(width), torch.nn.Linear(width, VOCAB, bias=False)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe.weight[: ids.shape[1]]
        for block in self.h:
            x = block(x)
        return self.head(self.ln_f(x))


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch_dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measured_bytes(run) -> float:
    """Bytes this rank sends during `run()`, from the collectives luoshu's comm ops call (ring
    volumes of their full tensors)."""
    from luoshu.ops import comm

    n = torch_dist.get_world_size()
    sent = [0.0]
    originals = (
        torch_dist.all_reduce,
        comm._all_gather_single,
        comm._reduce_scatter_single,
        torch_dist.all_to_all_single,
    )

    def all_reduce(t, *a, **k):
        sent[0] += 2 * (n - 1) / n * t.numel() * t.element_size()
        return originals[0](t, *a, **k)

    def all_gather(out, x, *a, **k):
        sent[0] += (n - 1) / n * out.numel() * out.element_size()
        return originals[1](out, x, *a, **k)

    def reduce_scatter(out, x, *a, **k):
        sent[0] += (n - 1) / n * x.numel() * x.element_size()
        return originals[2](out, x, *a, **k)

    def all_to_all(out, x, *a, **k):
        sent[0] += (n - 1) / n * x.numel() * x.element_size()
        return originals[3](out, x, *a, **k)

    torch_dist.all_reduce, comm._all_gather_single, comm._reduce_scatter_single = all_reduce, all_gather, reduce_scatter
    torch_dist.all_to_all_single = all_to_all
    try:
        run()
    finally:
        (torch_dist.all_reduce, comm._all_gather_single, comm._reduce_scatter_single, torch_dist.all_to_all_single) = (
            originals
        )
    return sent[0]


def worker(args) -> None:
    torch.set_num_threads(1)
    ls.distributed.init()
    n, rank = ls.distributed.world_size(), ls.distributed.rank()
    heads = args.width // 64
    length, batch = args.length, args.batch
    rng = np.random.default_rng(0)
    ids_v = rng.integers(0, VOCAB, (batch, length))
    y_v = np.roll(ids_v, -1, axis=1)

    # luoshu
    ls.manual_seed(0)
    model = GPT2(GPTConfig(vocab_size=VOCAB, block_size=length, n_layer=args.layers, n_head=heads, n_embd=args.width))
    mesh = ls.distributed.DeviceMesh(tp=n)
    ls.parallel.parallelize(model, mesh)
    opt = ls.optim.AdamW(model.parameters(), lr=1e-4)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, length), "int64")
        y = ls.placeholder("y", (None, length), "int64")
        loss = ls.nn.functional.cross_entropy(model(ids).reshape((-1, VOCAB)), y.reshape((-1,)))
        step = opt.minimize(loss)
    feed = {ids: ids_v, y: y_v}
    g.run([loss, step], feed)
    sent = _measured_bytes(lambda: g.run([loss, step], feed))

    # PyTorch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    tmodel = TorchGPT(args.layers, args.width, heads, length)
    tmesh = init_device_mesh("cpu", (n,))
    for block in tmodel.h:
        parallelize_module(
            block,
            tmesh,
            {
                "q_proj": ColwiseParallel(),
                "k_proj": ColwiseParallel(),
                "v_proj": ColwiseParallel(),
                "o_proj": RowwiseParallel(),
                "c_fc": ColwiseParallel(),
                "c_proj": RowwiseParallel(),
            },
        )
    from torch.distributed.tensor import DTensor

    # foreach kernels cannot mix DTensors and plain tensors: one optimizer for each kind
    sharded = [p for p in tmodel.parameters() if isinstance(p, DTensor)]
    plain = [p for p in tmodel.parameters() if not isinstance(p, DTensor)]
    topts = [torch.optim.AdamW(ps, lr=1e-4, foreach=True) for ps in (sharded, plain)]
    tids, ty = torch.from_numpy(ids_v), torch.from_numpy(y_v)

    def torch_step():
        for topt in topts:
            topt.zero_grad(set_to_none=True)
        out = tmodel(tids)
        torch.nn.functional.cross_entropy(out.reshape(-1, VOCAB), ty.reshape(-1)).backward()
        for topt in topts:
            topt.step()

    def luoshu_step():
        g.run([loss, step], feed)

    for _ in range(2):
        torch_step()
        luoshu_step()
    lt, tt = [], []
    for _ in range(args.repeats):  # interleaved
        lt.append(_median(luoshu_step, 1))
        tt.append(_median(torch_step, 1))
    b, s, h, L = batch, length, args.width, args.layers
    ar = 2 * (n - 1) / n * b * s * h * 4
    # the loss: two all-reduces of (b*s) sums and one all-gather of the n (b*s) row maxima
    analytic = (4 * L + 2) * ar + 2 * 2 * (n - 1) / n * b * s * 4 + (n - 1) / n * n * b * s * 4
    if rank == 0:
        t_l, t_t = statistics.median(lt), statistics.median(tt)
        print(
            f"tp={n} layers={L} width={h} length={s} batch={b}: luoshu {t_l * 1e3:.1f} ms/step, "
            f"torch parallelize_module {t_t * 1e3:.1f} ms/step, ratio (torch/luoshu) {t_t / t_l:.2f}; "
            f"luoshu sends {sent / 2**20:.3f} MiB/rank/step, Megatron analytic {analytic / 2**20:.3f} MiB "
            f"(ratio {sent / analytic:.3f})",
            flush=True,
        )
    ls.distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--procs", type=int, nargs="+", default=[2])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return
    run_per_process_count(__file__, args)


if __name__ == "__main__":
    main()
