"""`luoshu serve` under load on loopback, against a minimal FastAPI + PyTorch eager handler; embedding store tiers.

For DCN (HugeCTR's quick-start shapes with 1000 ids per slot: 13 dense + 26 slots, dim 16, 6 cross
layers, MLP 1024-1024) and a small ResNet-18
(CIFAR stem, width 16, 32x32 images), three HTTP servers run as subprocesses on 127.0.0.1:

  luoshu-batched    luoshu serve PACKAGE (dynamic batching, max batch 64, queue delay --queue-delay-ms)
  luoshu-unbatched  luoshu serve PACKAGE --no-dynamic-batching
  fastapi-torch     the reference: a FastAPI endpoint a PyTorch user would write (uvicorn, one
                    process, a sync handler on FastAPI's thread pool) parsing the same v2 JSON and
                    running the same weights in a torch.nn module under inference_mode

A bounded asyncio + httpx load generator sends a fixed number of one-sample v2 JSON requests at
each concurrency level; every configuration is measured `--repeats` times, interleaved, and the
medians are reported (requests/s, p50 and p99 latency). The replies of each server are checked
against the torch module first. onnxruntime runs the same model in-process (no server) as the
compute-only reference. Every process uses one intra-op thread (a CPU shared with other jobs).

Then the embedding store: a table ten times the host tier (RocksDB below it), power-law ids, hit
rate per tier and ids looked up per second, next to a NumPy gather from an in-memory table.

    .venv/bin/python benchmarks/bench_serving.py [--requests 300] [--concurrency 1 8 32] [--repeats 3]
        [--models dcn resnet18] [--store-rows 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
DCN_CFG = {
    "dense_dim": 13,
    "slot_sizes": [1000] * 26,
    "embedding_dim": 16,
    "mlp_dims": (1024, 1024),
    "num_cross_layers": 6,
}
RESNET_CFG = {"width": 16, "num_classes": 10}


# --- the models, in luoshu (served) and torch.nn (the reference handler) -------------------------------------


def build_torch(model_name: str, weights: dict):
    import torch

    if model_name == "dcn":
        module = TorchDCN(DCN_CFG)
    else:
        sys.path.insert(0, str(HERE))
        from bench_resnet import TorchResNet18

        module = TorchResNet18(num_classes=RESNET_CFG["num_classes"], width=RESNET_CFG["width"])
    state = {k: torch.from_numpy(v) for k, v in weights.items() if not k.startswith("const.")}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith("num_batches_tracked")]:
        raise SystemExit(f"reference {model_name}: missing {missing}, unexpected {unexpected}")
    return module.eval()


def _torch_dcn_class():
    import torch

    class _TorchDCN(torch.nn.Module):
        """luoshu's DCN (v1 cross, one slot table with offsets) in torch.nn."""

        def __init__(self, cfg):
            super().__init__()
            dim = cfg["dense_dim"] + len(cfg["slot_sizes"]) * cfg["embedding_dim"]
            self.layers = cfg["num_cross_layers"]
            self.embedding = torch.nn.Module()
            self.embedding.weight = torch.nn.Parameter(torch.zeros(sum(cfg["slot_sizes"]), cfg["embedding_dim"]))
            offsets = np.concatenate([[0], np.cumsum(cfg["slot_sizes"])[:-1]])
            self.embedding.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
            self.cross = torch.nn.Module()
            for i in range(self.layers):
                self.cross.register_parameter(f"weight{i}", torch.nn.Parameter(torch.zeros(dim)))
                self.cross.register_parameter(f"bias{i}", torch.nn.Parameter(torch.zeros(dim)))
            dims = (dim, *cfg["mlp_dims"])
            deep = []
            for a, b in zip(dims[:-1], dims[1:]):
                deep += [torch.nn.Linear(a, b), torch.nn.ReLU()]
            self.deep = torch.nn.Sequential(*deep)
            self.head = torch.nn.Linear(dim + dims[-1], 1)

        def forward(self, dense, sparse):
            emb = torch.nn.functional.embedding(sparse + self.embedding.offsets, self.embedding.weight)
            x0 = torch.cat([dense, emb.flatten(1)], 1)
            x = x0
            for i in range(self.layers):
                w, b = getattr(self.cross, f"weight{i}"), getattr(self.cross, f"bias{i}")
                x = x0 * (x @ w).unsqueeze(1) + b + x
            return self.head(torch.cat([x, self.deep(x0)], 1)).reshape(-1)

    return _TorchDCN


def TorchDCN(cfg):  # noqa: N802 - a class built lazily so this file imports without torch
    return _torch_dcn_class()(cfg)


def sample(model_name: str, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if model_name == "dcn":
        return {
            "dense": rng.standard_normal((n, 13)).astype(np.float32),
            "sparse": rng.integers(0, 1000, (n, 26)).astype(np.int64),
        }
    return {"x": rng.standard_normal((n, 3, 32, 32)).astype(np.float32)}


def export_packages(root: Path, names: list[str]) -> dict[str, Path]:
    import luoshu as ls
    from luoshu import models
    from luoshu.serving import export

    ls.manual_seed(0)
    out = {}
    for name in names:
        if name == "dcn":
            model = models.build("dcn", **DCN_CFG)
            out[name] = export(root / name, model, tuple(sample(name, 2, 0).values()), name=name)
        else:
            model = models.build("resnet18", **RESNET_CFG)
            out[name] = export(root / name, model, sample(name, 2, 0)["x"], name=name, input_names=["x"])
    return out


# --- the reference server (run in a subprocess) ----------------------------------------------------------------


def reference_server(model_name: str, package: str, port: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI

    from luoshu.serving import load

    torch.set_num_threads(1)
    weights = {k: t.numpy() for k, t in load(package).weights.items()}
    module = build_torch(model_name, weights)
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready():
        return {}

    @app.post("/v2/models/{name}/infer")
    def infer(name: str, body: dict):
        feeds = [
            torch.from_numpy(np.asarray(i["data"], dtype=dtypes[i["datatype"]]).reshape(i["shape"]))
            for i in body["inputs"]
        ]
        with torch.inference_mode():
            out = module(*feeds)
        return {
            "model_name": name,
            "outputs": [
                {"name": "output", "datatype": "FP32", "shape": list(out.shape), "data": out.reshape(-1).tolist()}
            ],
        }

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --- load generation -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body_of(model_name: str, feeds: dict[str, np.ndarray]) -> bytes:
    types = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    output = "output"
    return json.dumps(
        {
            "inputs": [
                {"name": k, "shape": list(v.shape), "datatype": types[v.dtype], "data": v.reshape(-1).tolist()}
                for k, v in feeds.items()
            ],
            "outputs": [{"name": output}],
        }
    ).encode()


async def _load(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    """`concurrency` keep-alive connections, each sending its next request when the last reply is in.

    A few lines of HTTP/1.1 over asyncio streams rather than an HTTP client library: on a 2-core
    machine the load generator's own CPU time must stay small next to the servers'."""
    host_port, path = url.removeprefix("http://").split("/", 1)
    host, port = host_port.split(":")
    latencies: list[float] = []
    next_index = 0

    async def worker():
        nonlocal next_index
        reader, writer = await asyncio.open_connection(host, int(port))
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while next_index < len(bodies):
                body = bodies[next_index]
                next_index += 1
                head = (
                    f"POST /{path} HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                start = time.perf_counter()
                writer.write(head + body)
                status_line = await reader.readline()
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                reply = await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if b" 200 " not in status_line:
                    raise SystemExit(f"{url}: {status_line!r} {reply[:200]!r}")
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return len(bodies) / elapsed, latencies


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(url: str, bodies: list[bytes], concurrency: int, pid: int | None = None) -> dict:
    cpu = cpu_seconds(pid) if pid else 0.0
    rate, latencies = asyncio.run(_load(url, bodies, concurrency))
    cpu = (cpu_seconds(pid) - cpu) if pid else float("nan")
    lat = np.array(latencies) * 1e3
    return {
        "rps": rate,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "cpu_ms": cpu / len(bodies) * 1e3,
    }


def start_servers(model_name: str, package: Path, delay_ms: float) -> dict[str, tuple[subprocess.Popen, int]]:
    servers = {}
    luoshu = [
        sys.executable,
        "-m",
        "luoshu.cli",
        "serve",
        str(package),
        "--grpc-port",
        "-1",
        "--max-batch-size",
        "64",
        "--max-queue-delay-ms",
        str(delay_ms),
    ]
    for label, extra in (("luoshu-batched", []), ("luoshu-unbatched", ["--no-dynamic-batching"])):
        port = free_port()
        servers[label] = (
            subprocess.Popen(luoshu + ["--http-port", str(port)] + extra, env=ENV, stdout=subprocess.DEVNULL),
            port,
        )
    port = free_port()
    servers["fastapi-torch"] = (
        subprocess.Popen(
            [sys.executable, __file__, "--reference-server", model_name, str(package), str(port)], env=ENV
        ),
        port,
    )
    import httpx

    for label, (proc, port) in servers.items():
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{label} did not start")
            time.sleep(0.2)
    return servers


def check_replies(model_name: str, package: Path, servers) -> None:
    import httpx
    import torch

    from luoshu.serving import load

    module = build_torch(model_name, {k: t.numpy() for k, t in load(package).weights.items()})
    feeds = sample(model_name, 1, 123)
    with torch.inference_mode():
        want = module(*(torch.from_numpy(v) for v in feeds.values())).numpy().reshape(-1)
    for label, (_, port) in servers.items():
        r = httpx.post(
            f"http://127.0.0.1:{port}/v2/models/{model_name}/infer",
            content=body_of(model_name, feeds),
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        if r.status_code != 200:
            raise SystemExit(f"{label}: {r.status_code} {r.text[:300]}")
        got = np.array(r.json()["outputs"][0]["data"], np.float32)
        err = float(np.abs(got - want).max())
        if err > 1e-3:
            raise SystemExit(f"{label} answers {got[:4]}, the torch module {want[:4]} (max diff {err})")
        print(f"  {label:17} reply matches the torch module (max abs diff {err:.1e})")


def onnxruntime_reference(model_name: str, package: Path, tmp: Path, n: int) -> str:
    try:
        import onnxruntime as ort

        from luoshu.onnx import export
    except ImportError as exc:
        return f"onnxruntime reference skipped ({exc})"
    path = export(package, tmp / f"{model_name}.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    one, many = sample(model_name, 1, 5), sample(model_name, 64, 5)
    for _ in range(20):
        session.run(None, one)
    start = time.perf_counter()
    for _ in range(n):
        session.run(None, one)
    single = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(max(1, n // 64)):
        session.run(None, many)
    batched = max(1, n // 64) * 64 / (time.perf_counter() - start)
    return f"onnxruntime in-process (no server): {single:8.0f} calls/s at batch 1, {batched:8.0f} samples/s at batch 64"


def bench_model(model_name: str, package: Path, tmp: Path, args) -> None:
    print(
        f"\n== {model_name}: {args.requests} one-sample requests per run, {args.repeats} repeats (medians), "
        f"luoshu queue delay {args.queue_delay_ms} ms"
    )
    servers = start_servers(model_name, package, args.queue_delay_ms)
    try:
        check_replies(model_name, package, servers)
        rng_bodies = [body_of(model_name, sample(model_name, 1, i)) for i in range(args.requests)]
        for _, port in servers.values():  # warm-up
            run_load(f"http://127.0.0.1:{port}/v2/models/{model_name}/infer", rng_bodies[:64], 8)
        results: dict = {}
        for _ in range(args.repeats):
            for c in args.concurrency:
                for label, (proc, port) in servers.items():
                    r = run_load(f"http://127.0.0.1:{port}/v2/models/{model_name}/infer", rng_bodies, c, proc.pid)
                    results.setdefault((label, c), []).append(r)
        print(
            f"  {'server':17} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99/p50':>7} "
            f"{'server CPU ms/req':>17}"
        )
        for c in args.concurrency:
            for label in servers:
                runs = results[(label, c)]
                rps, p50, p99, cpu = (statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p99", "cpu_ms"))
                print(f"  {label:17} {c:4d} {rps:8.0f} {p50:8.2f} {p99:8.2f} {p99 / p50:7.2f} {cpu:17.3f}")
            med = {
                k: {label: statistics.median(r[k] for r in results[(label, c)]) for label in servers}
                for k in ("rps", "cpu_ms")
            }
            print(
                f"  -> luoshu-batched / fastapi-torch at concurrency {c}: "
                f"{med['rps']['luoshu-batched'] / med['rps']['fastapi-torch']:.2f}x requests/s, "
                f"{med['cpu_ms']['fastapi-torch'] / med['cpu_ms']['luoshu-batched']:.2f}x requests per server "
                "CPU-second"
            )
        print("  " + onnxruntime_reference(model_name, package, tmp, args.requests))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def bench_store(rows: int, tmp: Path, batches: int = 100, batch_ids: int = 4096) -> None:
    from luoshu.serving import EmbeddingStore

    dim = 16
    host = rows // 10
    print(
        f"\n== embedding store: {rows} rows x {dim} (RocksDB), host tier {host} rows, hot cache {host // 10}, "
        f"{batches} batches of {batch_ids} power-law ids (zipf a=1.2)"
    )
    table = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    config = {
        "hot_cache": {"capacity": host // 10, "policy": "lfu"},
        "volatile_db": {
            "capacity": host,
            "overflow_policy": "evict_least_used",
            "overflow_resolution_target": 0.8,
            "initial_cache_rate": 0.0,
        },
        "persistent_db": {"type": "rocks_db", "path": str(tmp / "store")},
        "tables": [{"name": "t", "dim": dim}],
    }
    rng = np.random.default_rng(1)
    id_batches = [np.minimum(rng.zipf(1.2, batch_ids) - 1, rows - 1) for _ in range(batches)]
    # ids drawn over a permuted table, so the hot ids are spread over the key space
    perm = rng.permutation(rows)
    id_batches = [perm[b] for b in id_batches]
    with EmbeddingStore(config) as store:
        start = time.perf_counter()
        store.load("t", table)
        load_s = time.perf_counter() - start
        for b in id_batches[:10]:  # warm-up
            store.lookup("t", b)
        before = store.stats()["t"]["tiers"]
        start = time.perf_counter()
        for b in id_batches[10:]:
            out = store.lookup("t", b)
        elapsed = time.perf_counter() - start
        assert np.array_equal(out, table[id_batches[-1]])
        after = store.stats()["t"]["tiers"]
    start = time.perf_counter()
    for b in id_batches[10:]:
        table[b]
    gather = time.perf_counter() - start
    n = sum(len(b) for b in id_batches[10:])
    print(f"  loaded in {load_s:.1f} s; after warm-up:")
    for tier in ("hot_cache", "host", "persistent"):
        looked = after[tier]["lookups"] - before[tier]["lookups"]
        hits = after[tier]["hits"] - before[tier]["hits"]
        print(f"  {tier:10} hit rate {hits / max(looked, 1):6.1%} of the {looked} unique ids reaching it")
    print(
        f"  store: {n / elapsed:10.0f} ids/s ({elapsed / (batches - 10) * 1e3:.2f} ms per batch); "
        f"NumPy gather from an in-memory table: {n / gather:10.0f} ids/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queue-delay-ms", type=float, default=0.0, help="luoshu-batched's --max-queue-delay-ms")
    parser.add_argument("--models", nargs="+", default=["dcn", "resnet18"], choices=["dcn", "resnet18"])
    parser.add_argument("--store-rows", type=int, default=200_000, help="0: skip the embedding store")
    parser.add_argument("--reference-server", nargs=3, metavar=("MODEL", "PACKAGE", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_server:
        name, package, port = args.reference_server
        reference_server(name, package, int(port))
        return
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        packages = export_packages(tmp, args.models)
        for name in args.models:
            bench_model(name, packages[name], tmp, args)
        if args.store_rows:
            bench_store(args.store_rows, tmp)


if __name__ == "__main__":
    main()
