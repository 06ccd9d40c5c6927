"""HET cache on synthetic power-law CTR ids: hit rate, rows and bytes moved per step, and step
time, vs cache size and staleness, against the cache-less parameter server (capacity 0).

Two local parameter servers hold one table over the 26 default synthetic slots (300,229
rows, dim 16, server-side SGD). Each step looks up a batch's (batch, 26) ids through the
cache, accumulates a gradient for them and ends the step, as `luoshu.ps.Embedding` does in
training; the next batch is prefetched. Bytes count ids, rows and versions pulled, and ids
and gradient rows pushed. Step times are medians over repeats after warm-up; they are
noisy when other jobs share the CPU; the worker runs one torch thread. Results go to
runs/bench_het_cache.csv.

    .venv/bin/python benchmarks/bench_het_cache.py [--batch 1024] [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import pathlib
import statistics
import time

import numpy as np
import torch
from tqdm import tqdm

from luoshu import ps
from luoshu.data.synthetic import DEFAULT_SLOT_SIZES, synthetic_ctr
from luoshu.ps.cache import HETCache

DIM = 16


def run_config(client, table: str, batches, capacity: int, staleness: int, policy: str, warmup: int) -> dict:
    client.create_table(table, DIM, num_rows=sum(DEFAULT_SLOT_SIZES), id_policy="refuse",
                        optimizer=("sgd", {"lr": 0.01}))
    cache = HETCache(client, table, DIM, capacity, policy, staleness)
    rng = np.random.default_rng(0)
    grads = rng.standard_normal((batches[0].size, DIM)).astype(np.float32) * 1e-3
    times = []
    for step, ids in enumerate(batches):
        if step == warmup:
            cache.reset_stats()
        t0 = time.perf_counter()
        cache.lookup(ids)
        cache.accumulate(ids, grads[:ids.size])
        # Every step prefetches one batch (the last wraps around), so each measured step pays for one.
        cache.end_step(batches[(step + 1) % len(batches)])
        times.append(time.perf_counter() - t0)
    cache.flush(refresh=False)
    s = cache.stats
    steps = len(batches) - warmup
    return {"hit_rate": s.hit_rate, "rows_pulled_per_step": s.rows_pulled / steps,
            "rows_pushed_per_step": s.rows_pushed / steps,
            "bytes_per_step": (s.bytes_pulled + s.bytes_pushed) / steps,
            "ms_per_step": 1e3 * statistics.median(times[warmup:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--capacities", default="0,2000,10000,50000")
    parser.add_argument("--staleness", default="0,1,4,16")
    parser.add_argument("--out", default="runs/bench_het_cache.csv")
    args = parser.parse_args()
    # One thread: torch's threaded index_add stalls badly when other jobs share the cores.
    torch.set_num_threads(1)

    total = args.steps + args.warmup
    data = synthetic_ctr(args.batch * total, dist="power_law", alpha=1.2, seed=0)
    offsets = np.concatenate([[0], np.cumsum(DEFAULT_SLOT_SIZES)[:-1]])
    ids = data["sparse"] + offsets
    batches = [ids[i * args.batch:(i + 1) * args.batch] for i in range(total)]
    unique_per_step = statistics.mean(len(np.unique(b)) for b in batches)

    capacities = [int(c) for c in args.capacities.split(",")]
    stalenesses = [int(s) for s in args.staleness.split(",")]
    configs = [(0, 0, "lru")] + [(c, s, p) for c, s in itertools.product(capacities, stalenesses) if c
                                 for p in ("lru", "lfu")]
    names = itertools.count()
    runs: dict = {c: [] for c in configs}
    with ps.start_local_servers(2) as servers:
        client = ps.connect(addresses=servers)
        try:
            run_config(client, "warm-up", batches, 0, 0, "lru", args.warmup)  # servers' first-use costs
            # Repeats go round all configurations in turn, so drifting load spreads over all of them.
            bar = tqdm(total=len(configs) * args.repeats, desc="runs", unit="run")
            for _ in range(args.repeats):
                for capacity, staleness, policy in configs:
                    res = run_config(client, f"t{next(names)}", batches, capacity, staleness, policy, args.warmup)
                    runs[(capacity, staleness, policy)].append(res)
                    bar.update()
                    bar.set_postfix(ms=f"{res['ms_per_step']:.1f}", hit=f"{res['hit_rate']:.2f}")
            bar.close()
        finally:
            client.close()
    rows = [{"capacity": c, "staleness": s, "policy": p, **{k: statistics.median(r[k] for r in rs) for k in rs[0]}}
            for (c, s, p), rs in runs.items()]

    base = rows[0]
    print(f"\nbatch {args.batch} x 26 slots, {unique_per_step:.0f} unique ids per step, dim {DIM}; "
          f"cache-less PS: {base['bytes_per_step'] / 1e3:.0f} kB and {base['ms_per_step']:.1f} ms per step")
    print(f"{'capacity':>8} {'s':>3} {'policy':>6} {'hit rate':>8} {'pulled/step':>11} {'pushed/step':>11} "
          f"{'kB/step':>8} {'bytes vs PS':>11} {'ms/step':>8} {'time vs PS':>10}")
    for r in rows:
        print(f"{r['capacity']:>8} {r['staleness']:>3} {r['policy']:>6} {r['hit_rate']:>8.3f} "
              f"{r['rows_pulled_per_step']:>11.0f} {r['rows_pushed_per_step']:>11.0f} "
              f"{r['bytes_per_step'] / 1e3:>8.1f} {r['bytes_per_step'] / base['bytes_per_step']:>11.3f} "
              f"{r['ms_per_step']:>8.1f} {r['ms_per_step'] / base['ms_per_step']:>10.2f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
