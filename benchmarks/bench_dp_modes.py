"""Data-parallel training throughput (samples/s) of Wide&Deep and DCN on 1, 2 and 4 worker
processes in the allreduce, ps and hybrid modes of `luoshu.parallel.DataParallel`.

Each configuration is one `luoshu launch -n N [--servers 1]` job on this machine. Workers
train a define-and-run graph on their own shard of the synthetic power-law CTR data
(26 slots, 300,229 embedding rows of dim 16, MLP 256-128, batch 256 per worker, Adam);
ps and hybrid read the tables with staleness 0 and no cache (exact synchronous training),
"hybrid+het" with a 50,000-row LFU cache and staleness 4. After warm-up, worker 0 times
`--repeats` windows of `--steps` steps; the median window gives the global samples/s
(N * batch * steps / seconds). Every worker process runs one torch thread. On a small
shared machine more processes than cores oversubscribe it, and the figures are noisy when
other jobs run. Results go to runs/bench_dp_modes.csv.

`--links` adds emulated networks next to loopback (`benchmarks/netem.py`): for a job of N
workers the benchmark makes N network namespaces on a private bridge, shaped with tc, and
runs each worker (and, in the ps modes, one server) as its own "node" of a multi-node
`luoshu launch --nnodes N` inside its namespace, with its own address in 10.213.0.0/24; the
gradient all-reduce and the parameter-server traffic both cross the shaped links. (So the
ps modes have one server per node there, N in all, against one on loopback.) Everything is
removed afterwards; without root, `ip` or `tc` those links are skipped with the reason.

    .venv/bin/python benchmarks/bench_dp_modes.py [--models wdl,dcn] [--workers 1,2,4] \
        [--modes allreduce,ps,hybrid,hybrid+het] [--links loopback,10gbit:50us,1gbit:200us]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import numpy as np
    import torch

    import luoshu as ls
    from luoshu import models, ps
    from luoshu.data.synthetic import DEFAULT_SLOT_SIZES, synthetic_ctr

    torch.set_num_threads(1)
    ls.distributed.init()
    rank, n = ls.distributed.rank(), ls.distributed.world_size()
    batch, steps = args.batch, args.warmup + args.repeats * args.steps
    data = synthetic_ctr(batch * steps, dist="power_law", alpha=1.2, seed=100 + rank)
    dense = np.log1p(data["dense"])
    ls.manual_seed(0)
    cfg = models.CTRConfig(dense_dim=13, slot_sizes=list(DEFAULT_SLOT_SIZES), embedding_dim=16,
                           mlp_dims=(256, 128), num_cross_layers=3)
    model = models.DCN(cfg) if args.model == "dcn" else models.WideAndDeep(cfg)
    opt = ls.optim.Adam(model.parameters(), lr=1e-3)
    mode, het = args.mode.split("+")[0], args.mode.endswith("+het")
    options = {}
    if mode != "allreduce":
        options = dict(staleness=4, cache_capacity=50_000, cache_policy="lfu") if het else {}
    dp = ls.parallel.DataParallel(model, opt, mode=mode, **options)
    with ls.Graph() as g:
        d = ls.placeholder("dense", (None, 13))
        s = ls.placeholder("sparse", (None, 26), "int64")
        y = ls.placeholder("label", (None,))
        loss = ls.nn.functional.binary_cross_entropy_with_logits(model(d, s), y)
        train = dp.minimize(loss)
    windows, t0 = [], None
    for step in range(steps):
        if step >= args.warmup and (step - args.warmup) % args.steps == 0:
            if t0 is not None:
                windows.append(time.perf_counter() - t0)
            ls.distributed.barrier()
            t0 = time.perf_counter()
        sl = slice(step * batch, (step + 1) * batch)
        if mode != "allreduce" and step + 1 < steps:
            ps.prefetch(model, data["sparse"][(step + 1) * batch:(step + 2) * batch])
        g.run([loss, train], {d: dense[sl], s: data["sparse"][sl], y: data["label"][sl]})
    ls.distributed.barrier()
    windows.append(time.perf_counter() - t0)
    if rank == 0:
        result = {"samples_per_s": n * batch * args.steps / statistics.median(windows),
                  "windows_s": windows}
        if mode != "allreduce":
            result["hit_rate"] = statistics.mean(v["hit_rate"] for v in dp.sync.stats().values())
        pathlib.Path(args.out).write_text(json.dumps(result))
    if mode != "allreduce":
        ls.distributed.barrier()  # every worker is done with the servers: worker 0 stops them
        if rank == 0:
            dp.sync.client.shutdown_servers(force=True)
        dp.sync.client.close()
    ls.distributed.shutdown()


def launch(model: str, mode: str, workers: int, args, out: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    servers = [] if mode == "allreduce" else ["--servers", "1"]
    cmd = [sys.executable, "-m", "luoshu.distributed.launch", "-n", str(workers), *servers, __file__, "--worker",
           "--model", model, "--mode", mode, "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--out", out]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every process it started
        proc.communicate()
        raise RuntimeError(f"{model} {mode} on {workers} workers did not finish in {args.timeout} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{model} {mode} on {workers} workers failed:\n{err[-3000:]}")
    return json.loads(pathlib.Path(out).read_text())


def launch_emulated(net, model: str, mode: str, workers: int, args, out: str) -> dict:
    """One job as `workers` nodes, node k (one worker, + one server in the ps modes) in namespace k."""
    import random

    from luoshu.ps import auth

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "LUOSHU_JOB_SECRET": auth.new_secret()}
    endpoint = f"{net.addresses[0]}:{random.randint(20000, 40000)}"  # inside the namespaces: nothing else listens
    servers = [] if mode == "allreduce" else ["--servers", "1"]
    procs = []
    for k in range(workers):
        cmd = [sys.executable, "-m", "luoshu.distributed.launch", "-n", "1", *servers, "--nnodes", str(workers),
               "--node-rank", str(k), "--rdzv-endpoint", endpoint, "--rdzv-id", "bench",
               # torch cannot tell that 10.213.0.1 is node 0's own address inside a namespace: say so
               "--rdzv-conf", f"is_host={int(k == 0)}", "--ps-host",
               net.addresses[k], __file__, "--worker", "--model", model, "--mode", mode, "--batch",
               str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats",
               str(args.repeats), "--out", out]
        # Gloo and the agent must use the namespace address: the host name resolves to the real host there.
        node_env = {**env, "GLOO_SOCKET_IFNAME": net.interface(k), "PET_LOCAL_ADDR": net.addresses[k]}
        procs.append(net.run(k, cmd, cwd=ROOT, env=node_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True))
    errors = []
    deadline = time.monotonic() + args.timeout
    for k, proc in enumerate(procs):
        try:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            errors.append(f"node {k} did not finish in {args.timeout} s")
            continue
        if proc.returncode != 0:
            errors.append(f"node {k} failed:\n{err[-2000:]}")
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    if errors:
        raise RuntimeError(f"{model} {mode} on {workers} workers over {net.link}: " + "\n".join(errors))
    return json.loads(pathlib.Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="wdl")
    parser.add_argument("--mode", default="allreduce")
    parser.add_argument("--out", default="")
    parser.add_argument("--models", default="wdl,dcn")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--modes", default="allreduce,ps,hybrid,hybrid+het")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--csv", default="runs/bench_dp_modes.csv")
    parser.add_argument("--links", default="loopback",
                        help="comma-separated: loopback and/or emulated links RATE:DELAY, e.g. 10gbit:50us,1gbit:200us")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from tqdm import tqdm

    configs = [(m, w, mode) for m in args.models.split(",") for w in map(int, args.workers.split(","))
               for mode in args.modes.split(",")]
    rows = []
    links = args.links.split(",")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import netem

    for link in links:
        if link != "loopback":
            ok, why = netem.available()
            if not ok:
                print(f"skipping the emulated link {link}: {why}")
                continue
        nets: dict = {}
        try:
            with tempfile.TemporaryDirectory() as tmp:
                for k, (model, workers, mode) in enumerate(tqdm(configs, desc=f"jobs ({link})", unit="job")):
                    out = os.path.join(tmp, f"{k}.json")
                    try:
                        if link == "loopback":
                            res = launch(model, mode, workers, args, out)
                        else:
                            if workers not in nets:
                                nets[workers] = netem.EmulatedNetwork(workers, link)
                            res = launch_emulated(nets[workers], model, mode, workers, args, out)
                    except RuntimeError as exc:  # report it, go on with the others
                        print(f"\n{exc}", file=sys.stderr)
                        continue
                    described = link if link == "loopback" else nets[workers].describe()
                    rows.append({"link": link, "shaping": described, "model": model, "workers": workers,
                                 "mode": mode, "samples_per_s": res["samples_per_s"],
                                 "hit_rate": res.get("hit_rate", "")})
        finally:
            for net in nets.values():
                net.close()
    if not rows:
        return
    for link in dict.fromkeys(r["link"] for r in rows):
        shaping = next(r["shaping"] for r in rows if r["link"] == link)
        print(f"\nlink {link}: {shaping}")
        _print_rows([r for r in rows if r["link"] == link])
    out = pathlib.Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


def _print_rows(rows: list) -> None:
    by = {(r["model"], r["workers"], r["mode"]): r["samples_per_s"] for r in rows}
    print(f"\n{'model':>5} {'workers':>7} {'mode':>11} {'samples/s':>10} {'vs allreduce':>12} {'vs 1 worker':>11}")
    for r in rows:
        ref = by.get((r["model"], r["workers"], "allreduce"))
        one = by.get((r["model"], 1, r["mode"]))
        print(f"{r['model']:>5} {r['workers']:>7} {r['mode']:>11} {r['samples_per_s']:>10.0f} "
              f"{(r['samples_per_s'] / ref) if ref else float('nan'):>12.2f} "
              f"{(r['samples_per_s'] / one) if one else float('nan'):>11.2f}")


if __name__ == "__main__":
    main()
