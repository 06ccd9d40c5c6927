"""HotSPa: what the cost model predicts for the paper's setting, and the hot-switch planner
against first-come-first-served.

1. Simulator: LLaMA-7B on 8 and 32 A800-80GB GPUs (8 per node), a global batch of 512
   sequences with CommonCrawl-like lengths up to 16K and GitHub-like lengths up to 32K
   (`luoshu.data.corpus_lengths`): the predicted step time of the best static (dp, tp, pp)
   strategy that fits in memory against hot switching over length buckets (each bucket the
   fastest strategy that holds it), next to the paper's "up to 2.99x".
2. Planner: the largest per-device send volume and the inter-node bytes of switching the
   weights of one LLaMA-7B layer between strategies, balanced planner vs first-come-first-
   served, on 2 nodes of 8.

3. Runtime (`--runtime`, 4 processes, Gloo on CPU, float32): a long-tailed batch of GPT-2
   sequences trained through each static strategy (tp4, dp2-tp2, dp4: every sequence packed
   into rows of the longest bound, one layout, no switching) and through hot switching (the
   buckets under tp4, dp2-tp2, dp4, parameters and gradients switched inside the step), in the
   same processes with repeats interleaved (`_timing.interleaved`); median step time, and the
   share of the hot-switching step spent in switches. With `--profile`, the cost model fed by
   this machine's profile (`hotspa_profile`) predicts the same steps, and their order is
   printed beside the measured one. The cost model predicts busy seconds (CPU time, module
   docstring of `hotspa_profile`); each step's ranks' busy seconds are combined as it combines
   them (busy_ms), next to the wall clock (step_ms), which also holds the machine's other load;
   busy_over_predicted is their ratio. A second table says where a rank's busy seconds go (its
   plans, the gradients' all-reduce, switches, the update, packing, the rest), beside the cost
   model's parts with `--profile`. The processes keep freed memory (`keep_freed_memory`;
   `--keep-memory 0`: glibc's defaults, under which the plans' page faults cost up to half their
   CPU seconds, unevenly from run to run).

    .venv/bin/python benchmarks/bench_hotspa.py [--batch 512] [--out runs/bench_hotspa.csv]
    .venv/bin/python benchmarks/bench_hotspa.py --runtime [--layers 2] [--width 64] [--seqs 32] [--max-len 512]
        [--mixed 'tp[4,1];tp[4,2]'] [--pipelines 'dp2,tp1,pp2;dp1,tp2,pp2'] [--profile [--profile-repeats 7]]
        [--keep-memory 0]

`--pipelines`: static pipeline strategies (HotSPa's runtime: pp stages, pp micro-batches a replica)
as more rows (default dp2·pp2 and dp1·tp2·pp2; '' for none), interleaved with the others.
`--mixed`: per-block strategies (`luoshu.parallel.mixed_tp`, block l under tp[l] over 4 / tp[l]
replicas) as more static rows, interleaved with the others.

Parts 1 and 2 are model predictions and plans, not timings of a run: no GPU cluster is needed.
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
from _relaunch import run_per_process_count
from _timing import interleaved

from luoshu.data import corpus_lengths
from luoshu.parallel import hotspa as H
from luoshu.parallel.hot_switch import plan_hot_switch

PAPER_SPEEDUP = 2.99


def simulator_rows(batch: int) -> list[dict]:
    rows = []
    for corpus, max_len, bounds in [("commoncrawl", 16384, [16384, 8192, 4096, 0]),
                                    ("github", 32768, [32768, 16384, 4096, 0])]:
        lengths = corpus_lengths(batch, corpus, max_len=max_len, seed=0)
        for nodes in (1, 4):
            cluster = H.ClusterSpec(gpus_per_node=8, nodes=nodes, **H.A800)
            result = H.simulate(H.LLAMA_7B, cluster, lengths, bounds)
            best, hot = result["best_static"], result["hot_switch"]
            rows.append({"corpus": corpus, "max_len": max_len, "gpus": cluster.world,
                         "best_static": best.strategy if best else "none fits",
                         "static_s": round(best.time_s, 3) if best else float("nan"),
                         "hot_switch": hot.strategy.removeprefix("hot:"), "hot_s": round(hot.time_s, 3),
                         "switch_s": round(sum(b["switch_s"] for b in hot.parts["buckets"]), 3),
                         "predicted_speedup": round(result["speedup"], 3), "paper_up_to": PAPER_SPEEDUP})
    return rows


def planner_rows() -> list[dict]:
    cluster = H.ClusterSpec(gpus_per_node=8, nodes=2, **H.A800)
    pairs = [("dp2,tp8,pp1", "dp16,tp1,pp1"), ("dp4,tp4,pp1", "dp2,tp8,pp1"), ("dp8,tp2,pp1", "dp2,tp8,pp1"),
             ("dp16,tp1,pp1", "dp2,tp8,pp1"), ("dp4,tp4,pp1", "dp8,tp2,pp1")]
    h, f = H.LLAMA_7B.hidden, H.LLAMA_7B.ffn_dim
    rows = []
    for src_text, dst_text in pairs:
        src, dst = H.parse_strategy(src_text), H.parse_strategy(dst_text)
        (s_col, s_row), (d_col, d_row) = H.weight_layouts(src, cluster.world), H.weight_layouts(dst, cluster.world)
        totals = {}
        for policy in ("balanced", "fcfs"):
            load, inter = {}, 0
            for shape, a, b in [((3 * h, h), s_col, d_col), ((h, h), s_row, d_row), ((2 * f, h), s_col, d_col),
                                ((h, f), s_row, d_row)]:
                plan = plan_hot_switch(shape, 2, a, b, node_size=cluster.gpus_per_node, policy=policy)
                for rank, nbytes in plan.send_bytes().items():
                    load[rank] = load.get(rank, 0) + nbytes
                inter += plan.inter_node_bytes
            totals[policy] = (max(load.values(), default=0), inter)
        (bal_max, bal_inter), (fcfs_max, fcfs_inter) = totals["balanced"], totals["fcfs"]
        rows.append({"switch": f"{src_text} -> {dst_text}", "balanced_max_send_mb": round(bal_max / 2**20, 1),
                     "fcfs_max_send_mb": round(fcfs_max / 2**20, 1),
                     "fcfs_over_balanced": round(fcfs_max / bal_max, 2) if bal_max else float("nan"),
                     "balanced_inter_node_mb": round(bal_inter / 2**20, 1),
                     "fcfs_inter_node_mb": round(fcfs_inter / 2**20, 1)})
    return rows


RUNTIME_STRATEGIES = ["dp1,tp4,pp1", "dp2,tp2,pp1", "dp4,tp1,pp1"]


def runtime_batches(args, count: int) -> list[list[np.ndarray]]:
    """Long-tailed batches (most sequences short, a thin tail to max_len), the longest always present."""
    from luoshu.data import synthetic_sequences

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        seqs = synthetic_sequences(args.seqs - 1, args.vocab, min_len=4, max_len=args.max_len, seed=i)
        out.append([*seqs, rng.integers(0, args.vocab, args.max_len)])
    return out


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Has glibc keep freed memory in the process (no trimming, no mmap below 32 MiB, its largest
    threshold) rather than hand it back to the kernel, so that the next plan run's tensors do not
    page-fault fresh zeroed pages in again. By default glibc mmaps (and on free unmaps) blocks
    over a threshold that moves with the process's history: a run of this benchmark's plans then
    spent up to half of its CPU seconds in the kernel's page faults (5 rows of 512 tokens, tp1,
    one process, load 6: 287 ms with 57k faults, 129 ms with none), more or less from run to run
    and unlike the profile's runs, whatever the cost model said. False where there is no glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) and bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20))


def runtime_worker(args) -> None:
    import luoshu as ls
    from luoshu.models.language import GPT2, GPTConfig
    from luoshu.parallel import hotspa_runtime

    torch.set_num_threads(1)
    kept = keep_freed_memory() if args.keep_memory else False
    ls.distributed.init()
    rank = ls.distributed.rank()
    bounds = [args.max_len, args.max_len // 4, args.max_len // 16, 0]
    batches = runtime_batches(args, 4)

    def build():
        ls.manual_seed(0)
        return GPT2(GPTConfig(vocab_size=args.vocab, block_size=args.max_len, n_layer=args.layers, n_head=4,
                              n_embd=args.width))

    # A memory budget per device (the cost model's bytes) that only tp4 meets at the longest length, as
    # on GPUs where long sequences need tensor parallelism: between tp4's and dp2-tp2's need.
    from luoshu.parallel.hotspa_runtime import model_spec

    spec, cluster = model_spec(build()), H.ClusterSpec(4, 1, 1.0, 1.0, 1.0, memory=float("inf"))
    need = {s: H.predict(spec, cluster, H.parse_strategy(s), [args.max_len] * H.parse_strategy(s).dp).memory_bytes
            for s in RUNTIME_STRATEGIES}
    budget = (need["dp1,tp4,pp1"] + need["dp2,tp2,pp1"]) / 2
    mixed = [s for s in args.mixed.split(";") if s]
    pipelines = [s for s in args.pipelines.split(";") if s]
    need.update({s: H.predict(spec, cluster, H.parse_strategy(s), [args.max_len] * H.parse_strategy(s).dp).memory_bytes
                 for s in pipelines})
    for s in mixed:  # per-block: its most demanding block's need throughout (the cost model is per strategy)
        need[s] = max(need[f"dp{4 // t},tp{t},pp1"] for t in H.parse_strategy(s).layer_tp)
    contenders, jobs, seconds = {}, {}, {}
    parts: dict[str, list[dict]] = {}  # per step, this rank's busy seconds in each part of HotSPa.step
    current = {"parts": {}}
    for module_attr in ("bucket_batch",):  # packing: a module function of the runtime
        _timed_part(hotspa_runtime, module_attr, "pack", current)
    statics = [*RUNTIME_STRATEGIES, *pipelines, *mixed]
    for name, strategies, bnds in [*((f"static {s}", [s], [args.max_len, 0]) for s in statics),
                                   ("hot switching", RUNTIME_STRATEGIES, bounds)]:
        model = build()
        hot = ls.parallel.HotSPa(model, strategies, bnds, memory_budget=budget if len(strategies) > 1 else None)
        opt = ls.optim.AdamW(model.parameters(), lr=1e-4)
        for attr, part in (("_local_grads", "run"), ("_pipeline_grads", "run"), ("_dp_sum", "dp_sum"),
                           ("_switch", "switch")):
            _timed_part(hot, attr, part, current)
        _timed_part(opt, "apply_gradients", "update", current)
        jobs[name] = (hot, opt)
        seconds[name], parts[name] = [], []

        def step(i, name=name):
            hot, opt = jobs[name]
            current["parts"] = {}
            busy = time.process_time()
            report = hot.step(batches[i % len(batches)], opt)
            seconds[name].append((report.step_seconds, report.switch_seconds, report.switch_bytes,
                                  time.process_time() - busy))
            parts[name].append(current["parts"])

        contenders[name] = step
    rates = interleaved(contenders, args.steps, args.repeats, warmup=1)
    # every rank's busy seconds (CPU time) of each step, past the warm-up: the cost model's step is the
    # slowest rank's or all ranks' over the cores they share, whichever is longer (`hotspa.predict`)
    world = ls.distributed.world_size()
    busy_steps = {}
    for name, timed in seconds.items():
        per_rank = torch.zeros((len(timed) - 1, world), dtype=torch.float64)
        per_rank[:, rank] = torch.tensor([t[3] for t in timed[1:]], dtype=torch.float64)
        torch.distributed.all_reduce(per_rank)
        busy_steps[name] = per_rank
    # each part's median busy seconds per step past the warm-up, the mean over ranks
    part_ms = {}
    for name, steps in parts.items():
        mine = [statistics.median(p.get(k, 0.0) for p in steps[1:]) for k in PARTS]
        mine.append(statistics.median(t[3] for t in seconds[name][1:]) - sum(mine))  # the rest of the step
        value = torch.tensor(mine, dtype=torch.float64)
        torch.distributed.all_reduce(value)
        part_ms[name] = [round(v * 1e3 / world, 1) for v in value.tolist()]
    if args.profile:
        from luoshu.parallel import hotspa_profile

        # at the bucket bounds (the rows' lengths) and around the rows a replica runs
        # (`--profile-repeats` rounds: a shared machine's load moves a median of 3 by ~20 %)
        profile = hotspa_profile.profile(build(), lengths=sorted(bounds[:-1]), batches=(1, 2, 3, 5),
                                         repeats=args.profile_repeats)
    if rank != 0:
        ls.distributed.shutdown()
        return
    tokens = sum(len(s) for s in batches[0])
    cores = profile.cores if args.profile else 1.0
    rows = []
    for name in contenders:
        timed = seconds[name][1:]  # past the warm-up step
        step_s = 1.0 / rates[name]
        share = statistics.median(sw / st for st, sw, _, _ in timed) if timed else 0.0
        fits = name == "hot switching" or need[name.removeprefix("static ")] <= budget
        per_rank = busy_steps[name]
        busy_s = float(torch.maximum(per_rank.max(1).values, per_rank.sum(1) / cores).median())
        rows.append({"strategy": name, "fits_budget": fits, "step_ms": round(step_s * 1e3, 1),
                     "busy_ms": round(busy_s * 1e3, 1),
                     "tokens_per_s": round(tokens / step_s),
                     "switch_share": round(share, 3), "switch_mib": round(timed[0][2] / 2**20, 2) if timed else 0})
    statics = [r for r in rows if r["strategy"].startswith("static")]
    best = min(statics, key=lambda r: r["step_ms"])
    best_fit = min((r for r in statics if r["fits_budget"]), key=lambda r: r["step_ms"])
    hot_row = rows[-1]
    for r in rows:
        r["vs_best_static"] = round(best["step_ms"] / r["step_ms"], 3)
        r["vs_best_fitting"] = round(best_fit["step_ms"] / r["step_ms"], 3)
    print(f"Runtime (4 processes, GPT-2 {args.layers} layers width {args.width}, {args.seqs} sequences up to "
          f"{args.max_len}, {tokens} tokens per step, bounds {bounds}; load average "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()) + f"; freed memory kept (--keep-memory): {kept}):")
    print("step_ms: wall clock (rank 0, interleaved medians); busy_ms: the ranks' CPU seconds per step, the slowest "
          f"rank's or all of them over {cores:g} cores, whichever is longer (what the cost model predicts)")
    if args.profile:
        predicted = hotspa_profile.predict_steps(profile, build(), batches[0], RUNTIME_STRATEGIES, bounds)
        predicted_parts = hotspa_profile.predict_step_parts(profile, build(), batches[0], RUNTIME_STRATEGIES, bounds)
        for s in pipelines:  # static rows alone (not in the hot switching's strategies)
            predicted[f"static {s}"] = hotspa_profile.predict_static(profile, batches[0], [s], args.max_len)[s]
            predicted_parts[f"static {s}"] = hotspa_profile.predict_step_parts(
                profile, build(), batches[0], [s], [args.max_len, 0])[f"static {s}"]
        rows = [r for r in rows if r["strategy"] in predicted]  # no per-block strategy in the cost model
        for r in rows:
            r["predicted_ms"] = round(predicted[r["strategy"]] * 1e3, 1)
            r["busy_over_predicted"] = round(r["busy_ms"] / r["predicted_ms"], 2)
            r["wall_over_predicted"] = round(r["step_ms"] / r["predicted_ms"], 2)
        orders = {key: [r["strategy"] for r in sorted(rows, key=lambda r: r[key])]
                  for key in ("busy_ms", "step_ms", "predicted_ms")}
        print(f"measured order (busy): {orders['busy_ms']}\nmeasured order (wall): {orders['step_ms']}\n"
              f"predicted order:       {orders['predicted_ms']}")
        print(f"profile: {profile.flops / 1e9:.2f} GFLOP/s, layer overhead {profile.layer_overhead_s * 1e3:.2f} ms, "
              f"run overhead {profile.run_overhead_s * 1e3:.2f} ms, collective latency "
              + ", ".join(f"n={n} {a * 1e3:.2f} ms" for n, a in profile.latency)
              + f", {profile.layer_collectives} collectives per layer and {profile.run_collectives} per run (tp), "
              f"update {profile.update_seconds * 1e9:.2f} ns per parameter, switch overhead "
              f"{profile.switch_overhead_s * 1e3:.2f} ms + {profile.switch_message_s * 1e3:.2f} ms per message, "
              "pipeline stage overhead per micro-batch "
              + ", ".join(f"tp={n} {o * 1e3:.2f} ms" for n, o in profile.stage_overhead_s))
    _print(rows)
    print("\nwhere a rank's busy ms of a step go (medians, mean over ranks): run = its plans (forward, loss, "
          "backward), dp_sum = the gradients' all-reduce, switch = hot switches, update = the optimizer, "
          "pack = bucketing and packing, rest = the step's other work (loss and touched-row all-reduces, copies)")
    table = [{"strategy": name, **dict(zip([*PARTS, "rest"], values))} for name, values in part_ms.items()]
    if args.profile:
        for r in table:
            pred = predicted_parts.get(r["strategy"], {})
            r.update({f"predicted_{k}": round(v * 1e3, 1) for k, v in pred.items()})
    _print(table)
    print(f"memory budget {budget / 2**20:.2f} MiB per device (cost model): static needs at {args.max_len} tokens "
          + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in need.items()))
    print(f"hot switching: {hot_row['vs_best_static']}x the fastest static strategy ({best['strategy']}), "
          f"{hot_row['vs_best_fitting']}x the fastest that fits the budget ({best_fit['strategy']}); "
          f"{hot_row['switch_share'] * 100:.1f}% of its step in switches")
    ls.distributed.shutdown()


PARTS = ("run", "dp_sum", "switch", "update", "pack")


def _timed_part(obj, attr: str, part: str, current: dict) -> None:
    """Wraps obj.attr so that its busy seconds (CPU time) add to current["parts"][part]."""
    inner = getattr(obj, attr)

    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            current["parts"][part] = current["parts"].get(part, 0.0) + time.process_time() - start

    setattr(obj, attr, timed)


def _print(rows: list[dict]) -> None:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(str(r[k]).rjust(w) for k, w in zip(keys, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--out", default="runs/bench_hotspa.csv")
    # 0/1 flags (given bare they mean 1) so that the relaunch forwards them as values
    parser.add_argument("--runtime", type=int, nargs="?", const=1, default=0, help="the 4-process runtime part")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--mixed", default="",
                        help="';'-separated per-block strategies (e.g. 'tp[4,1]') run as static rows beside the others")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipelines", default="dp2,tp1,pp2;dp1,tp2,pp2",
                        help="pipeline strategies (';'-separated) run as more static rows, interleaved with the others")
    parser.add_argument("--profile-repeats", type=int, default=7, help="rounds of each profiled point")
    parser.add_argument("--keep-memory", type=int, nargs="?", const=1, default=1,
                        help="1 (default): glibc keeps freed memory (`keep_freed_memory`); 0: its defaults")
    parser.add_argument("--profile", type=int, nargs="?", const=1, default=0,
                        help="predict the runtime steps from this machine's profile")
    args = parser.parse_args()
    if args.runtime:
        if "RANK" in os.environ:
            runtime_worker(args)
        else:
            args.procs = [4]
            run_per_process_count(__file__, args)
        return
    sim, plans = simulator_rows(args.batch), planner_rows()
    print("Simulator (LLaMA-7B, A800-80GB, predicted step times):")
    _print(sim)
    print("\nPlanner (one LLaMA-7B layer's weights, 2 nodes x 8 GPUs):")
    _print(plans)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        for rows in (sim, plans):
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
