"""A trained CTR model served with its table in the embedding store predicts what the training model predicted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as thttp

import luoshu as ls
from luoshu import models
from luoshu.nn import functional as F
from luoshu.serving import export, load
from luoshu.serving.embedding_store import EmbeddingStore
from luoshu.serving.server import InferenceServer, ServerConfig
from luoshu.serving.store_model import StoreBackedModel
from tests.serving.conftest import DCN_SHAPE, free_port

ROWS = sum(DCN_SHAPE["slot_sizes"])  # 300 rows in the one slot table


def _samples(n: int, seed: int):
    rng = np.random.default_rng(seed)
    dense = rng.random((n, 4), dtype=np.float32)
    sparse = rng.integers(0, 50, (n, 6), dtype=np.int64)
    label = (dense[:, 0] + (sparse[:, 0] % 2) > 1).astype(np.float32)
    return dense, sparse, label


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DCN after a few Adam steps, its predictions on held-out samples, and its exported package."""
    ls.manual_seed(3)
    model = models.build("dcn", **DCN_SHAPE)
    opt = ls.optim.Adam(model.parameters(), lr=0.05)
    for step in range(8):
        dense, sparse, label = _samples(64, seed=step)
        loss = F.binary_cross_entropy_with_logits(model(ls.tensor(dense), ls.tensor(sparse)), ls.tensor(label))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    dense, sparse, _ = _samples(40, seed=99)
    with ls.no_grad():
        predicted = model(ls.tensor(dense), ls.tensor(sparse)).numpy()
    path = export(tmp_path_factory.mktemp("ctr") / "dcn", model, (dense[:2], sparse[:2]), name="ctr")
    return {"path": path, "dense": dense, "sparse": sparse, "predicted": predicted}


def _store_config(path, read_only=False) -> dict:
    # the host tier holds a sixth of the table: most rows come up from RocksDB
    return {
        "hot_cache": {"capacity": 20, "policy": "lfu"},
        "volatile_db": {"capacity": 50, "overflow_policy": "evict_least_used", "initial_cache_rate": 0.5},
        "persistent_db": {"type": "rocks_db", "path": str(path), "read_only": read_only},
        "tables": [{"name": "embedding.weight", "dim": DCN_SHAPE["embedding_dim"]}],
    }


def test_served_from_the_store_predicts_what_training_predicted(trained, tmp_path):
    store = EmbeddingStore.from_package(trained["path"], _store_config(tmp_path / "db"))
    served = StoreBackedModel(load(trained["path"]), store, {"embedding.weight": "embedding.weight"})
    served.release_tables()  # the model's own copy is never read
    config = ServerConfig(http_port=0, grpc_port=None, max_batch_size=16, max_queue_delay_ms=5)
    with InferenceServer([served], config, stores=[store]) as server:
        client = thttp.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        got = []
        for start in range(0, 40, 8):  # several batches so the tiers evict and refill
            inputs = [thttp.InferInput("dense", [8, 4], "FP32"), thttp.InferInput("sparse", [8, 6], "INT64")]
            inputs[0].set_data_from_numpy(trained["dense"][start : start + 8])
            inputs[1].set_data_from_numpy(trained["sparse"][start : start + 8])
            got.append(client.infer("ctr", inputs).as_numpy("output"))
        client.close()
        np.testing.assert_allclose(np.concatenate(got), trained["predicted"], rtol=1e-6, atol=1e-6)
        metrics = httpx.get(f"http://127.0.0.1:{server.http_port}/metrics").text
    assert 'luoshu_embedding_hit_rate{table="embedding.weight",tier="persistent"}' in metrics
    assert 'luoshu_embedding_lookups_total{table="embedding.weight",tier="hot_cache"}' in metrics
    assert 'luoshu_embedding_lookup_duration_seconds_count{table="embedding.weight"} 5.0' in metrics
    tiers = store.stats()["embedding.weight"]["tiers"]
    assert tiers["persistent"]["hits"] > 0 and tiers["hot_cache"]["hits"] > 0
    store.close()


def test_streamed_updates_change_the_predictions(trained, tmp_path):
    """Rows a trainer streams in are what the model uses after the refresh (checked against the package
    model with the same rows written into its own table)."""
    reference = load(trained["path"])
    with EmbeddingStore.from_package(trained["path"], _store_config(tmp_path / "db")) as store:
        served = StoreBackedModel(load(trained["path"]), store)
        feeds = {"dense": trained["dense"][:8], "sparse": trained["sparse"][:8]}
        ids = np.unique(trained["sparse"][:8] + np.arange(6) * 50)  # the global rows these samples read
        fresh = np.random.default_rng(0).standard_normal((len(ids), 4)).astype(np.float32)
        store.update("embedding.weight", ids, fresh)
        np.testing.assert_allclose(served(feeds)["output"], trained["predicted"][:8], rtol=1e-6, atol=1e-6)
        store.refresh()
        reference.weights["embedding.weight"].value[ids] = ls.tensor(fresh).value
        want = reference(feeds)["output"]
        assert not np.allclose(want, trained["predicted"][:8])
        np.testing.assert_allclose(served(feeds)["output"], want, rtol=1e-6, atol=1e-6)


def test_luoshu_serve_command_with_an_embedding_store(trained, tmp_path):
    """`luoshu serve PACKAGE --embedding-store CONFIG` in a subprocess; SIGTERM stops it cleanly."""
    config = tmp_path / "store.json"
    config.write_text(json.dumps(_store_config(tmp_path / "db")))
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "luoshu.cli",
        "serve",
        str(trained["path"]),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--embedding-store",
        str(config),
        "--max-queue-delay-ms",
        "2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.1)
        body = {
            "inputs": [
                {"name": "dense", "shape": [4, 4], "datatype": "FP32", "data": trained["dense"][:4].tolist()},
                {"name": "sparse", "shape": [4, 6], "datatype": "INT64", "data": trained["sparse"][:4].tolist()},
            ]
        }
        r = httpx.post(f"http://127.0.0.1:{http_port}/v2/models/ctr/infer", json=body, timeout=10)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["outputs"][0]["data"], trained["predicted"][:4], rtol=1e-6, atol=1e-6)
        assert "luoshu_embedding_hit_rate" in httpx.get(f"http://127.0.0.1:{http_port}/metrics").text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        out = proc.stdout.read()
        assert "luoshu serve: ready" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _table_weights(model) -> dict[str, int]:
    """The weights an embedding lookup reads, with their row widths."""
    out = {}
    for op in model.ops:
        if op.opdef.name in ("embedding", "embedding_bag"):
            for name, t in model.weights.items():
                if t is op.inputs[0]:
                    out[name] = int(t.shape[1])
    return out


def _store_for(path, model, tmp_path, host: int = 6) -> EmbeddingStore:
    tables = [{"name": name, "dim": dim} for name, dim in _table_weights(model).items()]
    config = {
        "hot_cache": {"capacity": 3},
        "volatile_db": {"capacity": host, "initial_cache_rate": 0.5},
        "persistent_db": {"path": str(tmp_path / "db")},
        "tables": tables,
    }
    return EmbeddingStore.from_package(path, config)


@pytest.mark.parametrize("name", ["wdl", "deepfm", "dcn_v2", "dlrm", "lr", "ncf"])
def test_every_zoo_ctr_model_serves_from_the_store(name, tmp_path):
    from tests.serving import zoo

    model = zoo.make(name)
    feeds = zoo.inputs(name, 9)
    path = export(tmp_path / name, model, feeds, name=name)
    package = load(path)
    with _store_for(path, package, tmp_path) as store:
        served = StoreBackedModel(load(path), store)
        want = package(feeds)
        for key, value in served(feeds).items():
            np.testing.assert_allclose(value, want[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["bags", "files", "hashed"])
def test_luoshu_ctr_packages_serve_from_the_store(kind, tmp_path, monkeypatch):
    """HugeCTR-style packages: multi-hot embedding bags (padding rows renumbered per batch), slot
    offsets, and hash-indexed tables' key search, all in the graph before the store's lookup."""
    from luoshu import serving
    from tests.serving import zoo

    monkeypatch.chdir(tmp_path)  # luoshu.ctr's training writes its metrics file into the working directory
    rng = np.random.default_rng(4)
    if kind == "bags":
        model = zoo.hugectr_bag_model()
        path = serving.export_ctr(tmp_path / "pkg", model, name="bags")
        feeds = zoo.hugectr_bag_inputs(rng, 7)
    else:
        model, graph_json, dense, sparse = zoo.hugectr_dcn_files(tmp_path / "train", hashed=kind == "hashed")
        path = serving.export_ctr_files(tmp_path / "pkg", graph_json, dense, sparse, name="dcn")
        feeds = zoo.hugectr_inputs(rng, 7)
    package = load(path)
    assert _table_weights(package)
    with _store_for(path, package, tmp_path, host=10) as store:
        served = StoreBackedModel(load(path), store)
        np.testing.assert_allclose(served(feeds)["prediction"], package(feeds)["prediction"], rtol=1e-6, atol=1e-6)
