"""HET cache on synthetic power-law CTR ids: hit rate, rows and bytes moved per step, and step
time, vs cache size and staleness, against the cache-less parameter server (capacity 0).

Two local parameter servers hold one table over the 26 default synthetic slots (300,229
rows, dim 16, server-side SGD). Each step looks up a batch's (batch, 26) ids through the
cache, accumulates a gradient for them and ends the step, as `luoshu.ps.Embedding` does in
training; the next batch is prefetched. Bytes count ids, rows and versions pulled, and ids
and gradient rows pushed. Step times are medians over repeats after warm-up; they are
noisy when other jobs share the CPU; the worker runs one torch thread. Results go to
runs/bench_het_cache.csv.

`--links` runs the same grid over emulated networks besides loopback (`benchmarks/netem.py`):
the benchmark makes three network namespaces joined by veth pairs on a private bridge and
shaped with tc, runs the worker in one and a server in each of the others (their own
addresses in 10.213.0.0/24, reachable only from those namespaces), and removes them
afterwards. It needs root; without it (or without `ip`/`tc`) those links are skipped and
the reason printed. Samples/s is batch / step time of the embedding traffic alone.

    .venv/bin/python benchmarks/bench_het_cache.py [--batch 1024] [--steps 40] [--repeats 3] \
        [--links loopback,10gbit:50us,1gbit:200us]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import pathlib
import select
import statistics
import subprocess
import sys
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


def measure(client, args, batches, configs, progress: bool = True) -> dict:
    """Runs every configuration `args.repeats` times on `client`; returns the runs per configuration."""
    names = itertools.count()
    runs: dict = {c: [] for c in configs}
    run_config(client, "warm-up", batches, 0, 0, "lru", args.warmup)  # servers' first-use costs
    # Repeats go round all configurations in turn, so drifting load spreads over all of them.
    bar = tqdm(total=len(configs) * args.repeats, desc="runs", unit="run", disable=not progress)
    for _ in range(args.repeats):
        for capacity, staleness, policy in configs:
            res = run_config(client, f"t{next(names)}", batches, capacity, staleness, policy, args.warmup)
            runs[(capacity, staleness, policy)].append(res)
            bar.update()
            bar.set_postfix(ms=f"{res['ms_per_step']:.1f}", hit=f"{res['hit_rate']:.2f}")
    bar.close()
    return runs


def _spawn_server(net, host: int, index: int, secret: str) -> tuple[subprocess.Popen, str]:
    """Parameter server `index` of 2 inside namespace `host`, bound to that namespace's address."""
    from luoshu.ps.local import _ENTRY
    from luoshu.ps.server import READY_LINE

    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1",
           "LUOSHU_JOB_SECRET": secret}
    proc = net.run(host, [sys.executable, "-c", _ENTRY, "--index", str(index), "--num-servers", "2",
                          "--host", net.addresses[host]], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                   env=env, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(READY_LINE):
                return proc, line.split()[1]
            if not line:
                break
    proc.kill()
    raise RuntimeError(f"server {index} in namespace {net.names[host]} did not start")


def run_emulated(link: str, args) -> dict:
    """The grid over one emulated link: worker in namespace 0, the two servers in namespaces 1 and 2."""
    import netem

    from luoshu.ps import auth

    secret = auth.new_secret()
    with netem.EmulatedNetwork(3, link) as net:
        servers = []
        try:
            for k in range(2):
                servers.append(_spawn_server(net, k + 1, k, secret))
            cmd = [sys.executable, __file__, "--child", ",".join(a for _, a in servers), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                   "--capacities", args.capacities, "--staleness", args.staleness]
            env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1]),
                   "OMP_NUM_THREADS": "1", "LUOSHU_JOB_SECRET": secret}
            done = subprocess.run([*net.prefix(0), *cmd], env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
            if done.returncode != 0:
                raise RuntimeError(f"the worker under {link} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["link"] = net.describe()
            return result
        finally:
            for proc, _ in servers:
                proc.kill()
                proc.wait()


def _grid(args):
    capacities = [int(c) for c in args.capacities.split(",")]
    stalenesses = [int(s) for s in args.staleness.split(",")]
    return [(0, 0, "lru")] + [(c, s, p) for c, s in itertools.product(capacities, stalenesses) if c
                              for p in ("lru", "lfu")]


def _batches(args):
    total = args.steps + args.warmup
    data = synthetic_ctr(args.batch * total, dist="power_law", alpha=1.2, seed=0)
    offsets = np.concatenate([[0], np.cumsum(DEFAULT_SLOT_SIZES)[:-1]])
    ids = data["sparse"] + offsets
    return [ids[i * args.batch:(i + 1) * args.batch] for i in range(total)]


def _medians(runs: dict) -> list[dict]:
    return [{"capacity": c, "staleness": s, "policy": p, **{k: statistics.median(r[k] for r in rs) for k in rs[0]}}
            for (c, s, p), rs in runs.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # server addresses: run the worker only
    parser.add_argument("--links", default="loopback",
                        help="comma-separated: loopback and/or emulated links RATE:DELAY, e.g. 10gbit:50us,1gbit:200us")
    parser.add_argument("--timeout", type=float, default=900)
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
    batches = _batches(args)
    configs = _grid(args)
    if args.child is not None:  # inside the worker's namespace: measure, print JSON, done
        with ps.connect(addresses=args.child.split(","), timeout_s=120) as client:
            rows = _medians(measure(client, args, batches, configs, progress=False))
        print(json.dumps({"rows": rows}))
        return
    unique_per_step = statistics.mean(len(np.unique(b)) for b in batches)
    by_link: dict = {}
    for link in args.links.split(","):
        if link == "loopback":
            with ps.start_local_servers(2) as servers, ps.connect(addresses=servers) as client:
                by_link["loopback"] = _medians(measure(client, args, batches, configs))
            continue
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        import netem

        ok, why = netem.available()
        if not ok:
            print(f"skipping the emulated link {link}: {why}")
            continue
        result = run_emulated(link, args)
        print(f"link {link}: {result['link']}")
        by_link[link] = result["rows"]
    if not by_link:
        return
    first = next(iter(by_link))
    rows = by_link[first]
    if len(by_link) > 1:
        _print_links(by_link, args.batch)
    print(f"\nlink: {first}")
    _print_table(rows, args, unique_per_step)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    flat = [{"link": link, **r} for link, rs in by_link.items() for r in rs]
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    print(f"wrote {out}")


def _print_links(by_link: dict, batch: int) -> None:
    links = list(by_link)
    print(f"\nsamples/s (batch {batch} / step time) per link")
    print(f"{'capacity':>8} {'s':>3} {'policy':>6} " + " ".join(f"{link:>14}" for link in links))
    for i, r in enumerate(by_link[links[0]]):
        cells = []
        for link in links:
            ms = by_link[link][i]["ms_per_step"]
            cells.append(f"{batch / (ms / 1e3):>14.0f}")
        print(f"{r['capacity']:>8} {r['staleness']:>3} {r['policy']:>6} " + " ".join(cells))


def _print_table(rows: list, args, unique_per_step: float) -> None:
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


if __name__ == "__main__":
    main()
