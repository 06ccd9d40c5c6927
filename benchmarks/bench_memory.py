"""Peak memory of one GPT-2 training step per rank: luoshu's plain, recompute and ZeRO-1/2/3 runs
against PyTorch eager with the same technique, on N processes (Gloo, CPU).

luoshu's rows come from two counts of the same define-and-run step: the plan's own accounting
(`plan.memory()`: parameters + optimizer state + the most gradient, activation and gathered-
parameter bytes alive at once) and torch's profiler memory records of the plan's run (the
largest net allocation after any top-level op of a second step, plus what exists before it:
parameters, optimizer state, the fed batch and the buffers kept across steps — gradient
buckets, ZeRO-1/2's flat gradients; for DDP its buckets, one copy of every gradient).
PyTorch's rows use the profiler count on the same model written
with torch.nn (the same shapes and parameter count, tied LM head), AdamW, one warm-up step:

    plain      DistributedDataParallel                 luoshu DataParallel(g)
    recompute  DDP + torch.utils.checkpoint per block  luoshu recompute=True (every block)
    zero1      DDP + ZeroRedundancyOptimizer           luoshu DataParallel(g, zero=1)
    zero2      FSDP2 fully_shard(reshard_after_forward=False) per block and root   zero=2
    zero3      FSDP2 fully_shard(reshard_after_forward=True) per block and root    zero=3

A reference that does not run here (FSDP2 on CPU/Gloo may not) is printed as n/a with the reason.

Caveat of the profiler count: a buffer whose last reference an asynchronous Gloo collective
drops is freed on Gloo's worker thread, and that free is missing from torch's records, so the
count runs high for asynchronous collectives (luoshu's ZeRO-3 gathers; the process's resident
size stays flat over 200 such steps). The plan's count has no such gap.

    .venv/bin/python benchmarks/bench_memory.py                      # the issue's size (slow)
    .venv/bin/python benchmarks/bench_memory.py --layers 4 --width 256 --length 128 --batch 4 --vocab 4096
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.distributed as torch_dist
from _relaunch import run_per_process_count
from torch.profiler import ProfilerActivity, profile, record_function

import luoshu as ls
from luoshu.compiler.gradient_allreduce import _BUFFERS_OF
from luoshu.models import build

TECHNIQUES = ("plain", "recompute", "zero1", "zero2", "zero3")


# --- profiler count ----------------------------------------------------------------------------
def _profiled(fn) -> int:
    """The largest net allocation after any top-level op of the second of two calls of `fn`,
    over its live bytes as it starts (torch's records, every thread: Gloo's included). Two
    calls in one profile, because the profiler drops the frees of blocks allocated before it
    started: a step that frees a buffer of the previous step would look like it only allocates."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        with record_function(_MARK):
            pass  # an empty marker: the second call's ops stay top-level
        fn()
    events = prof.events()
    mark = next(e for e in events if e.name == _MARK).time_range.start
    live, start, peak = 0, None, 0
    for e in sorted((e for e in events if e.cpu_parent is None and e.name != _MARK),
                    key=lambda e: e.time_range.start):
        if start is None and e.time_range.start >= mark:
            start = peak = live
        live += e.cpu_memory_usage
        if start is not None:
            peak = max(peak, live)
    return peak - start


_MARK = "bench_memory::second_call"


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


# --- luoshu ------------------------------------------------------------------------------------
def luoshu_peaks(technique: str, args, rank: int) -> tuple[int, int]:
    ls.manual_seed(0)
    model = build("gpt2", vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, n_embd=args.width,
                  block_size=args.length, dropout=0.0, recompute=technique == "recompute")
    opt = ls.optim.AdamW(model.parameters(), lr=1e-4)
    with ls.Graph() as g:
        ids = ls.placeholder("ids", (None, args.length), "int64")
        targets = ls.placeholder("targets", (None, args.length), "int64")
        logits = model(ids)
        loss = ls.nn.functional.cross_entropy(logits.reshape((-1, args.vocab)), targets.reshape((-1,)))
        step = opt.minimize(loss)
    zero = {"zero1": 1, "zero2": 2, "zero3": 3}.get(technique, 0)
    dp = ls.parallel.DataParallel(g, zero=zero, unit_size_mb=args.unit_mb) if zero in (2, 3) else \
        ls.parallel.DataParallel(g, zero=zero)
    rng = np.random.default_rng(rank)
    feed = {ids: rng.integers(0, args.vocab, (args.batch, args.length)),
            targets: rng.integers(0, args.vocab, (args.batch, args.length))}
    g.run([loss, step], feed)  # the optimizer state exists from the first step on
    plan = g.plan([loss, step], feed)
    feeds = [torch.from_numpy(np.ascontiguousarray(feed[t])) for t in plan.feed_tensors]
    report = plan.memory(feeds)
    # what exists before the profiled steps: parameters, optimizer state, the batch, and the
    # buffers kept across steps (gradient buckets; ZeRO-1/2's flat gradients)
    buckets = [b.tensor for b in _BUFFERS_OF.get(g, []) if b.tensor is not None]
    kept = dp.sync.persistent_gradient_bytes() if zero in (1, 2) else 0
    before = report.parameters + report.optimizer_state + _storage_bytes(feeds) + _storage_bytes(buckets) + kept
    measured = before + _profiled(lambda: plan.run(feeds))
    return report.peak_bytes, measured


# --- PyTorch -----------------------------------------------------------------------------------
class _Block(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv, self.o_proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.fc, self.c_proj = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(y.transpose(1, 2).reshape(b, n, d))
        return x + self.c_proj(torch.nn.functional.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT2(torch.nn.Module):
    def __init__(self, vocab: int, length: int, width: int, heads: int, layers: int, recompute: bool = False):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(vocab, width), torch.nn.Embedding(length, width)
        self.h = torch.nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(width)
        self.recompute = recompute

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.h:
            if self.recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return torch.nn.functional.linear(self.ln_f(x), self.wte.weight)  # tied head


def torch_peak(technique: str, args, rank: int) -> int:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = TorchGPT2(args.vocab, args.length, args.width, args.heads, args.layers, technique == "recompute")
    if technique in ("zero2", "zero3"):
        from torch.distributed.fsdp import fully_shard

        for block in model.h:
            fully_shard(block, reshard_after_forward=technique == "zero3")
        fully_shard(model, reshard_after_forward=technique == "zero3")
        wrapped = model
    else:
        wrapped = DistributedDataParallel(model)
    if technique == "zero1":
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(rank)
    ids = torch.from_numpy(rng.integers(0, args.vocab, (args.batch, args.length)))
    targets = torch.from_numpy(rng.integers(0, args.vocab, (args.batch, args.length)))

    def step():
        logits = wrapped(ids)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    state = [t for s in opt.optim.state.values() for t in s.values()] if technique == "zero1" else \
        [t.to_local() if hasattr(t, "to_local") else t for s in opt.state.values() for t in s.values()]
    # DDP's buckets (gradient_as_bucket_view off, its default) hold every gradient across steps
    buckets = sum(p.numel() * p.element_size() for p in model.parameters()) if wrapped is not model else 0
    before = _storage_bytes(local) + _storage_bytes(state) + _storage_bytes([ids, targets]) + buckets
    return before + _profiled(step)


# --- the job -----------------------------------------------------------------------------------
def worker(args) -> None:
    torch.set_num_threads(1)
    ls.distributed.init()
    n, rank = ls.distributed.world_size(), ls.distributed.rank()
    rows = []
    for technique in args.techniques:
        planned, measured = luoshu_peaks(technique, args, rank)
        try:
            reference, why = torch_peak(technique, args, rank), ""
        except Exception as exc:  # noqa: BLE001 - a reference that does not run on CPU/Gloo is reported
            reference, why = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
        peaks = torch.tensor([planned, measured, -1 if reference is None else reference], dtype=torch.float64)
        torch_dist.all_reduce(peaks, op=torch_dist.ReduceOp.MAX)  # the largest rank decides
        rows.append((technique, *peaks.tolist(), why))
        torch_dist.barrier()
    if rank == 0:
        mib = 2**20
        print(f"GPT-2 {args.layers} layers, width {args.width}, length {args.length}, batch {args.batch}/rank, "
              f"vocab {args.vocab}, {n} processes (peak MiB per rank, the largest rank)")
        print(f"{'technique':>10} {'luoshu plan':>12} {'luoshu prof':>12} {'pytorch prof':>13} {'plan/pytorch':>13} "
              f"{'prof/pytorch':>13}")
        for technique, planned, measured, reference, why in rows:
            ref = f"{reference / mib:13.1f}" if reference >= 0 else f"{'n/a':>13}"
            ratios = f"{planned / reference:13.2f} {measured / reference:13.2f}" if reference > 0 else ""
            print(f"{technique:>10} {planned / mib:12.1f} {measured / mib:12.1f} {ref} {ratios}  {why}")
    ls.distributed.barrier()
    ls.distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[2])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--unit-mb", type=float, default=4.0)
    parser.add_argument("--techniques", nargs="+", default=list(TECHNIQUES), choices=TECHNIQUES)
    args = parser.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return
    run_per_process_count(__file__, args)


if __name__ == "__main__":
    main()
