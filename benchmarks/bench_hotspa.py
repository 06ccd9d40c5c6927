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

    .venv/bin/python benchmarks/bench_hotspa.py [--batch 512] [--out runs/bench_hotspa.csv]

Both parts are model predictions and plans, not timings of a run: no GPU cluster is needed.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

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
    args = parser.parse_args()
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
