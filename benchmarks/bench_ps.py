"""Parameter-server pull/push throughput (rows/s, MB/s) vs a plain ZeroMQ round trip of the same bytes.

luoshu: one server subprocess, a float32 table; a pull sends the ids and receives the rows
(+ versions), a push sends ids + gradients and the server applies its optimizer.
Reference: a bare ZeroMQ ROUTER subprocess that answers each request with a reply of the
same byte size (no decoding, no table, no optimizer) -- the transport floor.
Medians of several repeats after warm-up; writes benchmarks/results/bench_ps.csv.
Run: .venv/bin/python benchmarks/bench_ps.py [--dim 64] [--batches 1024 16384] [--servers 1]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq
from tqdm import tqdm

from luoshu import ps

ECHO = r"""
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); port = s.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
buf = bytearray(1 << 28)
view = memoryview(buf)
while True:
    ident, size, *payload = s.recv_multipart(copy=False)
    n = int(size.bytes)
    if n < 0:
        break
    s.send_multipart([ident, view[:n]], copy=False)
"""


def _median_time(fn, repeats: int, inner: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def _bench_batch(client, raw, batch: int, args, rng) -> list[dict]:
    ids = rng.integers(0, 1_000_000, batch)
    grads = rng.standard_normal((batch, args.dim)).astype(np.float32)
    client.pull("bench", ids)  # create the rows: the timed loop measures steady state
    nbytes = batch * (args.dim * 4 + 8)  # pull: ids up, rows + versions down; push: ids + rows up
    ids_frame, grads_frame = ids.astype(np.int64).tobytes(), grads.tobytes()

    def raw_pull():
        raw.send_multipart([str(nbytes).encode(), ids_frame], copy=False)
        raw.recv_multipart(copy=False)

    def raw_push():
        raw.send_multipart([b"8", ids_frame, grads_frame], copy=False)
        raw.recv_multipart(copy=False)

    out = []
    cases = [("pull", lambda: client.pull("bench", ids), raw_pull),
             ("push", lambda: client.push("bench", ids, grads).result(120), raw_push)]
    for name, ours, ref in cases:
        for fn in (ours, ref):  # warm-up
            fn()
        t_ours = _median_time(ours, args.repeats, args.inner)
        t_ref = _median_time(ref, args.repeats, args.inner)
        out.append({"op": name, "batch": batch, "dim": args.dim, "servers": args.servers, "luoshu_s": t_ours,
                    "zmq_s": t_ref, "luoshu_rows_per_s": batch / t_ours, "luoshu_MB_per_s": nbytes / t_ours / 1e6,
                    "zmq_MB_per_s": nbytes / t_ref / 1e6, "ratio": t_ours / t_ref})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_ps.csv"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(f"tcp://127.0.0.1:{int(echo.stdout.readline())}")
    rows_out = []
    with ps.start_local_servers(args.servers) as servers, ps.connect(addresses=servers, timeout_s=120) as client:
        client.create_table("bench", args.dim, optimizer=("adagrad", {"lr": 0.01}))
        for batch in tqdm(args.batches, desc="batch sizes", unit="size"):
            rows_out += _bench_batch(client, raw, batch, args, rng)
        client.shutdown_servers()
    raw.send_multipart([b"-1"])
    echo.wait(10)
    raw.close(0)
    ctx.term()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_out[0]))
        writer.writeheader()
        writer.writerows(rows_out)
    print(f"{'op':5} {'batch':>7} {'luoshu ms':>10} {'rows/s':>12} {'MB/s':>8} {'zmq ms':>8} {'zmq MB/s':>9} "
          f"{'luoshu/zmq':>10}")
    for r in rows_out:
        print(f"{r['op']:5} {r['batch']:7d} {r['luoshu_s'] * 1e3:10.3f} {r['luoshu_rows_per_s']:12.0f} "
              f"{r['luoshu_MB_per_s']:8.1f} {r['zmq_s'] * 1e3:8.3f} {r['zmq_MB_per_s']:9.1f} {r['ratio']:10.2f}x")
    print(f"wrote {out}  (timings are noisy: the CPU is shared)")


if __name__ == "__main__":
    main()
