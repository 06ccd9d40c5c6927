"""Gradient all-reduce bandwidth: luoshu's bucketed path vs torch.distributed all_reduce of the same bytes.

For each total size, the "gradients" are ~20 float32 tensors of mixed sizes (like a
model's weights and biases). luoshu's path is what `DataParallel(mode="allreduce")`
inserts into a define-and-run graph: `bucket_all_reduce` (flatten + async all-reduce,
mean) per bucket and `bucket_unpack` (wait + split), run as a compiled plan. The
references, in the same processes, take the mean as luoshu does (a pre-division, as DDP's
buckets): one `torch.distributed.all_reduce` of a flat buffer of the same bytes (the
ideal: no flattening, one collective) and one all_reduce per tensor (no bucketing). A
second comparison times gradients that the step itself makes by matmuls: luoshu writes
each into its bucket (gradients as bucket views), the reference computes the same matmuls
with `out=` into one flat buffer, pre-divides it and all-reduces it once. Timings are
medians over interleaved repeats after warm-up; bandwidth is bus bandwidth,
2(n-1)/n * bytes / time (as nccl-tests report it).

    .venv/bin/python benchmarks/bench_allreduce.py [--procs 2 4] [--sizes-mb 1 4 16 64] [--repeats 9]

Without a torchrun environment the script launches itself through `luoshu launch`
once per process count; worker 0 prints the table and appends it to --out (CSV).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from _relaunch import run_per_process_count

import luoshu as ls
from luoshu.compiler.gradient_allreduce import plan_buckets
from luoshu.ops.comm import BucketBuffer


def _shapes(total_bytes: int) -> list[tuple[int, ...]]:
    """~20 tensors whose sizes sum to total_bytes of float32: matrices and their biases."""
    elements = total_bytes // 4
    weights = np.array([1, 3, 2, 5, 1, 8, 2, 4, 1, 3], dtype=np.float64)
    counts = np.floor(weights / weights.sum() * elements * 0.99).astype(int)
    shapes = []
    for c in counts:
        rows = max(1, int(np.sqrt(c)))
        shapes += [(rows, max(1, int(c) // rows)), (rows,)]
    used = sum(int(np.prod(s)) for s in shapes)
    if elements > used:
        shapes.append((elements - used,))
    return shapes


def _median_times(contenders: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Seconds per call of each contender: warm-up, then `repeats` rounds in which every contender
    runs once in turn (the order rotating), so the shared machine's load hits them alike; the
    slowest worker decides (the max over workers of each median)."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            torch_dist.barrier()
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    t = torch.tensor([statistics.median(times[name]) for name in names], dtype=torch.float64)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return dict(zip(names, t.tolist()))


def _mean_all_reduce(tensors: list[torch.Tensor], world: int) -> None:
    """The mean over the workers of each tensor, pre-divided (as luoshu's buckets and DDP's are),
    one all_reduce per tensor."""
    torch._foreach_mul_(tensors, 1.0 / world)
    for t in tensors:
        torch_dist.all_reduce(t)


def _luoshu_path(grads: list[torch.Tensor], bucket_mb: float):
    """The ops the DataParallel pass inserts (persistent bucket buffers included), as one plan."""
    buffers = []
    with ls.Graph() as g:
        leaves = [ls.Tensor.from_value(t) for t in grads]
        outputs = []
        buckets = plan_buckets([t.numel() * 4 for t in grads], ["float32"] * len(grads), int(bucket_mb * 2**20))
        for bucket in buckets:
            buffers.append(BucketBuffer())
            flat = ls.core.apply("bucket_all_reduce", *[leaves[i] for i in bucket], reduce="mean",
                                 buffer=buffers[-1].key)
            pieces = ls.core.apply("bucket_unpack", flat, shapes=tuple(tuple(grads[i].shape) for i in bucket))
            outputs += list(pieces) if isinstance(pieces, tuple) else [pieces]
    # fetching through NumPy would time a copy the training step never makes: run the plan itself
    g.run(outputs)
    plan = next(iter(g._plans.values()))
    return lambda: (plan.run([]), buffers), len(buckets)


def _produced_paths(grads: list[torch.Tensor], bucket_mb: float):
    """Gradients made by matmuls inside the step, as a linear layer's weight gradients are
    (g.T @ x for a batch of 8 rows), then applied by SGD: luoshu's plan writes each one straight
    into its bucket (`bucket_place`, gradients as bucket views); the reference, what a PyTorch
    user would write by hand, computes the same matmuls with `out=` into views of one flat
    buffer, all-reduces it once and applies the same foreach SGD update."""
    rows = 8
    factors = [(torch.randn(rows, s[0]), torch.randn(rows, int(np.prod(s[1:])) if len(s) > 1 else 1)) for s in
               (g.shape for g in grads)]
    total = sum(g.numel() for g in grads)
    flat = torch.empty(total)
    views, pos = [], 0
    for g in grads:
        views.append(flat[pos:pos + g.numel()].view(g.shape[0], -1))
        pos += g.numel()
    world = torch_dist.get_world_size()
    params = [torch.zeros(v.shape) for v in views]

    def reference():  # the step luoshu's plan runs: matmuls, one all-reduce, the SGD update
        for (a, b), view in zip(factors, views):
            torch.mm(a.t(), b, out=view)
        flat.mul_(1.0 / world)
        torch_dist.all_reduce(flat)
        torch._foreach_add_(params, views, alpha=-0.0)

    model_params = [ls.nn.Parameter(torch.zeros(a.shape[1], b.shape[1])) for a, b in factors]
    opt = ls.optim.SGD(model_params, lr=0.0)
    with ls.Graph() as g:
        leaves = [(ls.Tensor.from_value(a), ls.Tensor.from_value(b)) for a, b in factors]
        grads_ = [ls.core.apply("matmul", a, b, trans_a=True) for a, b in leaves]
        update = opt.update_op(g, list(range(len(grads_))), grads_)
    ls.parallel.DataParallel(g, bucket_size_mb=bucket_mb)
    g.run(update)
    plan = next(iter(g._plans.values()))
    placed = sum(step.op.opdef.name == "bucket_place" for step in plan.steps)
    return reference, (lambda: plan.run([])), placed


def worker(args) -> None:
    torch.set_num_threads(1)
    ls.distributed.init()
    n, rank = ls.distributed.world_size(), ls.distributed.rank()
    rows = []
    for size_mb in args.sizes_mb:
        total = int(size_mb * 2**20)
        grads = [torch.randn(s) for s in _shapes(total)]
        nbytes = sum(t.numel() * 4 for t in grads)
        flat = torch.cat([t.reshape(-1) for t in grads])
        run_luoshu, n_buckets = _luoshu_path(grads, args.bucket_mb)
        reference, produced, placed = _produced_paths(grads, args.bucket_mb)
        t = _median_times({"flat": lambda flat=flat: _mean_all_reduce([flat], n), "luoshu": run_luoshu,
                           "each": lambda grads=grads: _mean_all_reduce(grads, n),
                           "reference": reference, "produced": produced}, args.repeats)
        t_flat, t_luoshu, t_each, t_ref, t_produced = (t[k] for k in ("flat", "luoshu", "each", "reference",
                                                                      "produced"))
        bus = 2 * (n - 1) / n * nbytes / 2**30
        rows.append({"procs": n, "size_mb": round(nbytes / 2**20, 2), "tensors": len(grads), "buckets": n_buckets,
                     "torch_flat_gbps": bus / t_flat, "luoshu_bucketed_gbps": bus / t_luoshu,
                     "torch_per_tensor_gbps": bus / t_each, "luoshu_over_torch_flat": t_flat / t_luoshu,
                     "placed": placed, "torch_matmul_out_flat_ms": t_ref * 1e3,
                     "luoshu_bucket_views_ms": t_produced * 1e3, "views_over_torch": t_ref / t_produced})
    if rank == 0:
        header = (f"{'procs':>5} {'MB':>7} {'tensors':>7} {'buckets':>7} {'torch flat GB/s':>16} "
                  f"{'luoshu GB/s':>12} {'per-tensor GB/s':>16} {'luoshu/torch':>12} | {'mm+flat ms':>10} "
                  f"{'views ms':>9} {'views/torch':>11}")
        print(header)
        for r in rows:
            print(f"{r['procs']:>5} {r['size_mb']:>7} {r['tensors']:>7} {r['buckets']:>7} "
                  f"{r['torch_flat_gbps']:>16.3f} {r['luoshu_bucketed_gbps']:>12.3f} "
                  f"{r['torch_per_tensor_gbps']:>16.3f} {r['luoshu_over_torch_flat']:>12.2f} | "
                  f"{r['torch_matmul_out_flat_ms']:>10.2f} {r['luoshu_bucket_views_ms']:>9.2f} "
                  f"{r['views_over_torch']:>11.2f}")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        new = not out.exists()
        with open(out, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
    ls.distributed.barrier()
    ls.distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", default="runs/bench_allreduce.csv")
    args = parser.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return
    run_per_process_count(__file__, args)


if __name__ == "__main__":
    main()
