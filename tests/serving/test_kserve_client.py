"""KServe's own Python clients (`kserve.InferenceRESTClient` with the v2 protocol and
`kserve.InferenceGRPCClient`) against luoshu's server, unchanged: health and readiness,
JSON and binary-extension tensors over HTTP, typed and raw contents over gRPC, and the
protocol's errors as the clients raise them, each followed by a good request.

The clients run in a child process (tests/serving/kserve_clients.py): kserve's protobuf
module and tritonclient's, which the other serving tests import, cannot share a process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from luoshu.serving.server import InferenceServer, ServerConfig

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("kserve") is None, reason="kserve is not installed")


@pytest.fixture(scope="module")
def run(loaded, tmp_path_factory):
    """Starts a server on 127.0.0.1, runs every kserve call against it in a child process,
    and returns (inputs, the models, the outputs, what the calls said)."""
    models = {"mlp1": loaded["mlp1"], "mlp2": loaded["mlp2"], "dcn": loaded["dcn"]}
    config = ServerConfig(http_port=0, grpc_port=0, max_batch_size=16, max_queue_delay_ms=5)
    server = InferenceServer(list(models.values()), config).start(wait=True, timeout=30)
    rng = np.random.default_rng(4)
    data = {
        "dense": rng.standard_normal((5, 4)).astype(np.float32),
        "sparse": rng.integers(0, 50, (5, 6)).astype(np.int64),
        "x": rng.standard_normal((3, 6)).astype(np.float32),
        "bad_x": np.zeros((2, 5), np.float32),
    }
    root = tmp_path_factory.mktemp("kserve")
    np.savez(root / "inputs.npz", **data)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tests/serving/kserve_clients.py"), str(server.http_port),
             str(server.grpc_port), str(root / "inputs.npz"), str(root / "out")],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    arrays = dict(np.load(root / "out.npz"))
    return data, models, arrays, json.loads((root / "out.json").read_text())


def test_health_and_readiness(run):
    _, _, _, said = run
    assert said["rest_health"] == [True, True, True, False]
    assert said["grpc_health"] == [True, True, True]


@pytest.mark.parametrize(
    "key",
    [
        "rest_dcn_injson_outjson",
        "rest_dcn_injson_outbin",
        "rest_dcn_inbin_outjson",
        "rest_dcn_inbin_outbin",
        "grpc_dcn_typed",
        "grpc_dcn_raw",
    ],
)
def test_inference_equals_the_model(run, key):
    data, models, arrays, said = run
    want = models["dcn"]({"dense": data["dense"], "sparse": data["sparse"]})["output"]
    np.testing.assert_allclose(arrays[key], want, rtol=1e-6)
    assert said[key] == {"id": "k1", "model_name": "dcn", "outputs": ["output"]}


def test_errors_then_a_good_request(run):
    data, models, arrays, said = run
    (shape_code, shape_msg), (model_code, model_msg) = said["rest_errors"]
    assert (shape_code, model_code) == (400, 404)
    assert "input 'x': expected shape [-1, 6]" in shape_msg and "unknown model 'nope'" in model_msg
    (shape_code, shape_msg), (model_code, model_msg) = said["grpc_errors"]
    assert (shape_code, model_code) == ("INVALID_ARGUMENT", "NOT_FOUND")
    assert "expected shape [-1, 6]" in shape_msg and "unknown model 'nope'" in model_msg
    # the latest version by default, and the one asked for
    np.testing.assert_allclose(arrays["rest_mlp_after_errors"], models["mlp2"]({"x": data["x"]})["logits"], rtol=1e-6)
    np.testing.assert_allclose(
        arrays["grpc_mlp_v1_after_errors"], models["mlp1"]({"x": data["x"]})["logits"], rtol=1e-6
    )
