"""The inference server over both transports, checked with Triton's own clients and raw HTTP/gRPC requests."""

from __future__ import annotations

import json
import random
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from luoshu.serving.server import InferenceServer, ServerConfig, ServerError
from tests.serving.conftest import Counting, Faulty

MAX_BATCH = 16
BODY_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def models(loaded):
    return {
        "mlp1": loaded["mlp1"],
        "mlp2": loaded["mlp2"],
        "dcn": loaded["dcn"],
        "counted": Counting(loaded["mlp1"], name="counted", delay_s=0.02),
        "faulty": Faulty(loaded["mlp1"], name="faulty"),
    }


@pytest.fixture(scope="module")
def server(models):
    config = ServerConfig(
        http_port=0, grpc_port=0, max_batch_size=MAX_BATCH, max_queue_delay_ms=20, max_body_bytes=BODY_LIMIT
    )
    s = InferenceServer(list(models.values()), config).start(wait=True, timeout=30)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def triton_http(server):
    client = thttp.InferenceServerClient(f"127.0.0.1:{server.http_port}", concurrency=8)
    yield client
    client.close()


@pytest.fixture(scope="module")
def triton_grpc(server):
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def x_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 6)).astype(np.float32)


def good_json(n: int = 2, seed: int = 0) -> dict:
    x = x_rows(n, seed)
    return {"inputs": [{"name": "x", "shape": [n, 6], "datatype": "FP32", "data": x.tolist()}]}


def assert_good_request(http, models) -> None:
    """A valid request after whatever came before still gets the model's exact answer."""
    r = http.post("/v2/models/mlp/infer", json=good_json(3, seed=7))
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    want = models["mlp2"]({"x": x_rows(3, seed=7)})["logits"]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(out["shape"]), want, rtol=1e-6)


# --- health, metadata, statistics, metrics -----------------------------------------------------------------


def test_health_and_server_metadata(http, triton_http, triton_grpc):
    live, ready = http.get("/v2/health/live"), http.get("/v2/health/ready")
    assert (live.status_code, live.json()) == (200, {"live": True})  # status code and the OpenAPI body
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    meta = http.get("/v2").json()
    assert meta["name"] == "luoshu" and "binary_tensor_data" in meta["extensions"]
    assert triton_http.is_server_live() and triton_http.is_server_ready()
    assert triton_grpc.is_server_live() and triton_grpc.is_server_ready()
    assert triton_grpc.get_server_metadata().name == "luoshu"
    assert triton_http.get_server_metadata()["extensions"] == meta["extensions"]


def test_model_metadata_and_readiness(http, triton_http, triton_grpc, models):
    meta = http.get("/v2/models/mlp").json()
    spec = models["mlp1"].inputs[0]
    assert meta["versions"] == ["1", "2"] and meta["platform"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": list(spec.shape)}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
    assert http.get("/v2/models/mlp/versions/1").json()["inputs"] == meta["inputs"]
    dcn = triton_grpc.get_model_metadata("dcn")
    assert [(t.name, t.datatype, list(t.shape)) for t in dcn.inputs] == [
        (s.name, {"float32": "FP32", "int64": "INT64"}[s.dtype], list(s.shape)) for s in models["dcn"].inputs
    ]
    assert triton_http.get_model_metadata("dcn")["outputs"][0]["shape"] == [-1]
    for client in (triton_http, triton_grpc):
        assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "1")
        assert not client.is_model_ready("mlp", "9") and not client.is_model_ready("nope")
    assert http.get("/v2/models/mlp/versions/2/ready").status_code == 200
    assert http.get("/v2/models/nope/ready").status_code == 400
    config = http.get("/v2/models/mlp/config").json()
    assert config["max_batch_size"] == MAX_BATCH and config["input"][0]["dims"] == [6]
    assert http.get("/v2/models/mlp/versions/1/config").json()["output"][0]["dims"] == [3]
    assert http.get("/v2/models/mlp/versions/9/config").status_code == 404
    stats = http.get("/v2/models/mlp/versions/1/stats").json()["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("mlp", "1")]
    assert http.get("/v2/models/nope/stats").status_code == 404
    assert http.get("/v2/nowhere").json() == {"error": "Not Found"}


def test_statistics_and_metrics(http, triton_http, models):
    for _ in range(3):
        assert http.post("/v2/models/dcn/infer", json=_dcn_json(2)).status_code == 200
    http.post("/v2/models/dcn/infer", json={"inputs": []})
    stats = triton_http.get_inference_statistics("dcn")["model_stats"][0]
    assert stats["name"] == "dcn" and stats["inference_stats"]["success"]["count"] >= 3
    assert stats["inference_stats"]["fail"]["count"] >= 1 and stats["inference_count"] >= 6
    assert stats["execution_count"] >= 1 and stats["batch_stats"]
    assert {s["name"] for s in http.get("/v2/models/stats").json()["model_stats"]} >= {"mlp", "dcn"}
    text = http.get("/metrics").text
    for family in (
        "luoshu_inference_requests_total",
        "luoshu_inference_request_duration_seconds_bucket",
        "luoshu_inference_batch_size_bucket",
        "luoshu_inference_queue_duration_seconds_bucket",
    ):
        assert family in text
    assert 'luoshu_inference_requests_total{model="dcn",protocol="http",status="success",version="1"}' in text


# --- inference ----------------------------------------------------------------------------------------------


def _dcn_feeds(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"dense": rng.random((n, 4), dtype=np.float32), "sparse": rng.integers(0, 50, (n, 6), dtype=np.int64)}


def _dcn_json(n: int, seed: int = 0) -> dict:
    feeds = _dcn_feeds(n, seed)
    return {
        "inputs": [
            {
                "name": k,
                "shape": list(v.shape),
                "datatype": "FP32" if v.dtype == np.float32 else "INT64",
                "data": v.reshape(-1).tolist(),
            }
            for k, v in feeds.items()
        ]
    }


def test_json_inference_matches_the_model(http, models):
    r = http.post("/v2/models/dcn/infer", json={"id": "req-1", **_dcn_json(5, seed=3)})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == "req-1" and doc["model_name"] == "dcn" and doc["model_version"] == "1"
    want = models["dcn"](_dcn_feeds(5, seed=3))["output"]
    np.testing.assert_allclose(doc["outputs"][0]["data"], want, rtol=1e-6)
    assert doc["outputs"][0]["shape"] == [5] and doc["outputs"][0]["datatype"] == "FP32"


def test_versions_select_their_own_weights(http, models):
    x = x_rows(2)
    for version in ("1", "2"):
        r = http.post(f"/v2/models/mlp/versions/{version}/infer", json=good_json(2))
        want = models[f"mlp{version}"]({"x": x})["logits"]
        np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(2, 3), want, rtol=1e-6)
    assert not np.allclose(models["mlp1"]({"x": x})["logits"], models["mlp2"]({"x": x})["logits"])
    newest = http.post("/v2/models/mlp/infer", json=good_json(2)).json()
    assert newest["model_version"] == "2"


@pytest.mark.parametrize("binary_in, binary_out", [(False, False), (True, True), (True, False), (False, True)])
def test_triton_http_client(triton_http, models, binary_in, binary_out):
    feeds = _dcn_feeds(4, seed=5)
    inputs = []
    for name, value in feeds.items():
        inp = thttp.InferInput(name, list(value.shape), "FP32" if value.dtype == np.float32 else "INT64")
        inp.set_data_from_numpy(value, binary_data=binary_in)
        inputs.append(inp)
    outputs = [thttp.InferRequestedOutput("output", binary_data=binary_out)]
    result = triton_http.infer("dcn", inputs, outputs=outputs, request_id="abc")
    np.testing.assert_allclose(result.as_numpy("output"), models["dcn"](feeds)["output"], rtol=1e-6)
    assert result.get_response()["id"] == "abc"


def test_binary_extension_by_hand(http, models):
    """The extension's wire format written out: JSON header, then raw little-endian tensors."""
    x = x_rows(3, seed=2)
    raw = x.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [3, 6], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    r = http.post(
        "/v2/models/mlp/versions/1/infer",
        content=header + raw,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 200, r.text
    json_len = int(r.headers["Inference-Header-Content-Length"])
    doc = json.loads(r.content[:json_len])
    size = doc["outputs"][0]["parameters"]["binary_data_size"]
    got = np.frombuffer(r.content[json_len : json_len + size], "<f4").reshape(doc["outputs"][0]["shape"])
    np.testing.assert_allclose(got, models["mlp1"]({"x": x})["logits"], rtol=1e-6)


def test_triton_clients_see_the_errors(triton_http, triton_grpc):
    for module, client in ((thttp, triton_http), (tgrpc, triton_grpc)):
        inp = module.InferInput("x", [2, 5], "FP32")
        inp.set_data_from_numpy(np.zeros((2, 5), np.float32))
        with pytest.raises(InferenceServerException, match=r"input 'x': expected shape \[-1, 6\]"):
            client.infer("mlp", [inp])
        with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
            client.get_model_metadata("nope")


def test_triton_grpc_client_raw_contents(triton_grpc, models):
    feeds = _dcn_feeds(3, seed=9)
    inputs = []
    for name, value in feeds.items():
        inp = tgrpc.InferInput(name, list(value.shape), "FP32" if value.dtype == np.float32 else "INT64")
        inp.set_data_from_numpy(value)
        inputs.append(inp)
    result = triton_grpc.infer("dcn", inputs, outputs=[tgrpc.InferRequestedOutput("output")], request_id="g1")
    np.testing.assert_allclose(result.as_numpy("output"), models["dcn"](feeds)["output"], rtol=1e-6)
    assert result.get_response().id == "g1"


def _typed_request(model: str, x: np.ndarray, version: str = "") -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    tensor = req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    return req


def test_grpc_typed_contents(grpc_stub, models):
    x = x_rows(4, seed=4)
    reply = grpc_stub.ModelInfer(_typed_request("mlp", x, "1"))
    got = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(list(reply.outputs[0].shape))
    np.testing.assert_allclose(got, models["mlp1"]({"x": x})["logits"], rtol=1e-6)
    assert reply.model_version == "1"
    # INT64 typed contents for the DCN's ids
    feeds = _dcn_feeds(2, seed=1)
    req = service_pb2.ModelInferRequest(model_name="dcn")
    req.inputs.add(name="dense", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(
        feeds["dense"].reshape(-1).tolist()
    )
    req.inputs.add(name="sparse", datatype="INT64", shape=[2, 6]).contents.int64_contents.extend(
        feeds["sparse"].reshape(-1).tolist()
    )
    reply = grpc_stub.ModelInfer(req)
    np.testing.assert_allclose(
        np.frombuffer(reply.raw_output_contents[0], "<f4"), models["dcn"](feeds)["output"], rtol=1e-6
    )


def test_grpc_metadata_and_readiness(grpc_stub):
    assert grpc_stub.ServerLive(service_pb2.ServerLiveRequest()).live
    assert grpc_stub.ServerReady(service_pb2.ServerReadyRequest()).ready
    assert grpc_stub.ModelReady(service_pb2.ModelReadyRequest(name="dcn")).ready
    assert not grpc_stub.ModelReady(service_pb2.ModelReadyRequest(name="dcn", version="7")).ready
    meta = grpc_stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="mlp", version="2"))
    assert meta.name == "mlp" and list(meta.versions) == ["1", "2"] and meta.inputs[0].name == "x"
    with pytest.raises(grpc.RpcError) as err:
        grpc_stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# --- dynamic batching ---------------------------------------------------------------------------------------


def test_dynamic_batching_fewer_calls_same_results(http, models):
    counted = models["counted"]
    counted.calls.clear()
    sizes = [1, 2, 3, 1, 4, 2, 1, 1, 3, 2, 1, 2, 1, 1, 2, 3]
    payloads = [good_json(n, seed=100 + i) for i, n in enumerate(sizes)]
    with ThreadPoolExecutor(len(sizes)) as pool:
        replies = list(pool.map(lambda p: http.post("/v2/models/counted/infer", json=p), payloads))
    for i, (n, r) in enumerate(zip(sizes, replies)):
        assert r.status_code == 200, r.text
        want = models["mlp1"]({"x": x_rows(n, seed=100 + i)})["logits"]  # the unbatched result
        np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(n, 3), want, rtol=1e-5, atol=1e-6)
    assert len(counted.calls) < len(sizes), counted.calls
    assert sum(counted.calls) == sum(sizes) and max(counted.calls) <= MAX_BATCH and max(counted.calls) > 1


def test_a_lone_request_leaves_after_the_delay(models):
    counted = Counting(models["mlp1"], name="lone")
    with InferenceServer([counted], ServerConfig(http_port=None, grpc_port=None, max_queue_delay_ms=5)) as s:
        from luoshu.serving.protocol import InferRequest

        out = s.infer(InferRequest("lone", None, {"x": x_rows(2)}), timeout=10)
    np.testing.assert_allclose(out["logits"], models["mlp1"]({"x": x_rows(2)})["logits"], rtol=1e-6)
    assert counted.calls == [2]


def test_a_failing_kernel_fails_only_its_request(http, server):
    poisoned = good_json(2, seed=1)
    poisoned["inputs"][0]["data"][0][0] = -999.0
    payloads = [good_json(1, seed=i) for i in range(6)] + [poisoned] + [good_json(1, seed=10 + i) for i in range(6)]
    with ThreadPoolExecutor(len(payloads)) as pool:
        replies = list(pool.map(lambda p: http.post("/v2/models/faulty/infer", json=p), payloads))
    assert replies[6].status_code == 500 and "kernel failure" in replies[6].json()["error"]
    assert all(r.status_code == 200 for i, r in enumerate(replies) if i != 6)
    r = http.post("/v2/models/faulty/infer", json=good_json(2, seed=3))
    assert r.status_code == 200


# --- bad requests -------------------------------------------------------------------------------------------


def _x(shape, datatype="FP32", data=None, **extra):
    data = data if data is not None else np.zeros(shape).reshape(-1).tolist()
    return {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data, **extra}]}


BAD_HTTP = [
    # (id, path, body bytes or JSON, headers, status, words the error must name)
    ("malformed-json", "/v2/models/mlp/infer", b'{"inputs": [', {}, 400, ["not valid JSON"]),
    ("not-an-object", "/v2/models/mlp/infer", b"[1, 2]", {}, 400, ["JSON object"]),
    (
        "deeply-nested",
        "/v2/models/mlp/infer",
        b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        {},
        400,
        ["too deeply"],
    ),
    ("unknown-model", "/v2/models/nope/infer", _x([1, 6]), {}, 404, ["nope"]),
    ("unknown-version", "/v2/models/mlp/versions/7/infer", _x([1, 6]), {}, 404, ["version '7'", "['1', '2']"]),
    ("no-inputs", "/v2/models/mlp/infer", {"inputs": []}, {}, 400, ["inputs"]),
    ("unknown-field", "/v2/models/mlp/infer", {**_x([1, 6]), "model": "mlp"}, {}, 400, ["['model']"]),
    # KServe's client names the model in the body too: it must agree with the URL
    ("body-model-differs", "/v2/models/mlp/infer", {**_x([1, 6]), "model_name": "dcn"}, {}, 400, ["'dcn'", "'mlp'"]),
    (
        "body-version-differs",
        "/v2/models/mlp/versions/1/infer",
        {**_x([1, 6]), "model_version": "2"},
        {},
        400,
        ["model_version '2'", "'1'"],
    ),
    (
        "missing-input",
        "/v2/models/dcn/infer",
        {"inputs": [{"name": "dense", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]},
        {},
        400,
        ["missing", "sparse"],
    ),
    (
        "extra-input",
        "/v2/models/mlp/infer",
        {"inputs": [*_x([1, 6])["inputs"], {"name": "y", "shape": [1], "datatype": "FP32", "data": [1]}]},
        {},
        400,
        ["unknown input", "'y'"],
    ),
    ("wrong-dtype", "/v2/models/mlp/infer", _x([1, 6], "INT64", [0] * 6), {}, 400, ["'x'", "FP32", "INT64"]),
    ("wrong-shape", "/v2/models/mlp/infer", _x([1, 5]), {}, 400, ["'x'", "[-1, 6]", "[1, 5]"]),
    ("wrong-rank", "/v2/models/mlp/infer", _x([6]), {}, 400, ["'x'", "[6]"]),
    ("count-mismatch", "/v2/models/mlp/infer", _x([2, 6], data=[0.0] * 7), {}, 400, ["12 elements", "7"]),
    ("ragged", "/v2/models/mlp/infer", _x([2, 6], data=[[0.0] * 6, [0.0] * 5]), {}, 400, ["rectangular"]),
    ("strings-as-floats", "/v2/models/mlp/infer", _x([1, 6], data=["a"] * 6), {}, 400, ["FP32", "strings"]),
    (
        "floats-as-ints",
        "/v2/models/dcn/infer",
        {
            "inputs": [
                {"name": "dense", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4},
                {"name": "sparse", "shape": [1, 6], "datatype": "INT64", "data": [0.5] * 6},
            ]
        },
        {},
        400,
        ["'sparse'", "integers"],
    ),
    ("unknown-datatype", "/v2/models/mlp/infer", _x([1, 6], "FLOAT"), {}, 400, ["'FLOAT'"]),
    ("negative-shape", "/v2/models/mlp/infer", _x([-1, 6], data=[]), {}, 400, ["non-negative"]),
    (
        "batch-above-max",
        "/v2/models/mlp/infer",
        _x([MAX_BATCH + 1, 6]),
        {},
        400,
        [f"batch size {MAX_BATCH + 1}", f"maximum {MAX_BATCH}"],
    ),
    (
        "unknown-output",
        "/v2/models/mlp/infer",
        {**_x([1, 6]), "outputs": [{"name": "probs"}]},
        {},
        400,
        ["'probs'", "logits"],
    ),
    ("body-above-limit", "/v2/models/mlp/infer", b" " * (BODY_LIMIT + 1), {}, 400, ["limit"]),
    (
        "binary-size-past-end",
        "/v2/models/mlp/infer",
        json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 6], "datatype": "FP32", "parameters": {"binary_data_size": 24}}]}
        ).encode()
        + b"\0" * 8,
        "header",
        400,
        ["binary_data_size 24"],
    ),
    (
        "binary-size-wrong",
        "/v2/models/mlp/infer",
        json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 6], "datatype": "FP32", "parameters": {"binary_data_size": 20}}]}
        ).encode()
        + b"\0" * 20,
        "header",
        400,
        ["needs 24 bytes", "found 20"],
    ),
    (
        "header-length-bad",
        "/v2/models/mlp/infer",
        json.dumps(_x([1, 6])).encode(),
        {"Inference-Header-Content-Length": "99999"},
        400,
        ["Inference-Header-Content-Length"],
    ),
    (
        "data-and-binary",
        "/v2/models/mlp/infer",
        json.dumps(_x([1, 6], parameters={"binary_data_size": 24})).encode() + b"\0" * 24,
        "header",
        400,
        ["both 'data'"],
    ),
]


@pytest.mark.parametrize("case", BAD_HTTP, ids=[c[0] for c in BAD_HTTP])
def test_bad_http_request_then_a_good_one(http, models, case):
    _, path, body, headers, status, words = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    if headers == "header":  # the JSON part is everything up to the first binary byte
        json_len = content.index(b"}]}") + 3
        headers = {"Inference-Header-Content-Length": str(json_len)}
    r = http.post(path, content=content, headers={"Content-Type": "application/json", **headers})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    for word in words:
        assert word in error, (word, error)
    assert_good_request(http, models)


def _grpc_bad_cases():
    x = x_rows(1)
    both = _typed_request("mlp", x)
    both.raw_input_contents.append(x.tobytes())
    unknown = _typed_request("nope", x)
    version = _typed_request("mlp", x, "5")
    dtype = service_pb2.ModelInferRequest(model_name="mlp")
    dtype.inputs.add(name="x", datatype="INT64", shape=[1, 6]).contents.int64_contents.extend([1] * 6)
    wrong_field = service_pb2.ModelInferRequest(model_name="mlp")
    wrong_field.inputs.add(name="x", datatype="FP32", shape=[1, 6]).contents.int64_contents.extend([1] * 6)
    missing = service_pb2.ModelInferRequest(model_name="dcn")
    missing.inputs.add(name="dense", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([0] * 4)
    raw_count = service_pb2.ModelInferRequest(model_name="mlp")
    raw_count.inputs.add(name="x", datatype="FP32", shape=[1, 6])
    raw_count.raw_input_contents.extend([x.tobytes(), x.tobytes()])
    raw_size = service_pb2.ModelInferRequest(model_name="mlp")
    raw_size.inputs.add(name="x", datatype="FP32", shape=[1, 6])
    raw_size.raw_input_contents.append(x.tobytes()[:-4])
    big = _typed_request("mlp", x_rows(MAX_BATCH + 1))
    shape = _typed_request("mlp", x_rows(2).reshape(3, 4))
    fp16_typed = service_pb2.ModelInferRequest(model_name="mlp")
    fp16_typed.inputs.add(name="x", datatype="FP16", shape=[1, 6]).contents.fp32_contents.extend([0] * 6)
    C = grpc.StatusCode
    return [
        ("raw-and-typed", both, C.INVALID_ARGUMENT, ["'x'", "raw_input_contents"]),
        ("unknown-model", unknown, C.NOT_FOUND, ["nope"]),
        ("unknown-version", version, C.NOT_FOUND, ["'5'"]),
        ("wrong-dtype", dtype, C.INVALID_ARGUMENT, ["FP32", "INT64"]),
        ("wrong-contents-field", wrong_field, C.INVALID_ARGUMENT, ["fp32_contents", "int64_contents"]),
        ("missing-input", missing, C.INVALID_ARGUMENT, ["sparse"]),
        ("raw-count", raw_count, C.INVALID_ARGUMENT, ["2 buffers", "1 inputs"]),
        ("raw-size", raw_size, C.INVALID_ARGUMENT, ["24 bytes", "found 20"]),
        ("batch-above-max", big, C.INVALID_ARGUMENT, ["maximum"]),
        ("wrong-shape", shape, C.INVALID_ARGUMENT, ["[3, 4]"]),
        ("fp16-typed", fp16_typed, C.INVALID_ARGUMENT, ["raw_input_contents"]),
    ]


@pytest.mark.parametrize("case", _grpc_bad_cases(), ids=lambda c: c[0] if isinstance(c, tuple) else "")
def test_bad_grpc_request_then_a_good_one(grpc_stub, models, case):
    _, request, code, words = case
    with pytest.raises(grpc.RpcError) as err:
        grpc_stub.ModelInfer(request)
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word in err.value.details(), (word, err.value.details())
    x = x_rows(2, seed=8)
    reply = grpc_stub.ModelInfer(_typed_request("mlp", x, "2"))
    got = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(2, 3)
    np.testing.assert_allclose(got, models["mlp2"]({"x": x})["logits"], rtol=1e-6)


def test_grpc_message_above_the_limit(grpc_stub, models):
    req = _typed_request("mlp", x_rows(1))
    req.raw_input_contents.append(b"\0" * (BODY_LIMIT + 10))
    del req.inputs[0].contents.fp32_contents[:]
    req.inputs[0].ClearField("contents")
    with pytest.raises(grpc.RpcError) as err:
        grpc_stub.ModelInfer(req)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_stub.ModelInfer(_typed_request("mlp", x_rows(1))).outputs[0].name == "logits"


def test_fuzzed_requests_never_hurt_the_server(http, grpc_stub, models):
    """A bounded set of random malformed requests: each gets a 4xx (never a 5xx or a hang)."""
    rng = random.Random(1234)
    good = json.dumps(_dcn_json(2)).encode()
    pieces = [b"{", b"}", b"[", b"]", b'"inputs"', b":", b",", b"null", b"1e999", b'"x"', b"-1", b"\xff", b'"FP32"']
    statuses = set()
    for i in range(150):
        kind = i % 3
        if kind == 0:  # cut or flip bytes of a good body
            body = bytearray(good)
            for _ in range(rng.randint(1, 6)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            body = bytes(body[: rng.randint(0, len(body))])
        elif kind == 1:  # random tokens
            body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
        else:  # a structurally plausible request with random values
            doc = _dcn_json(2)
            t = doc["inputs"][rng.randrange(2)]
            key = rng.choice(["shape", "datatype", "data", "name"])
            t[key] = rng.choice([None, -3, "INT8", [2, -1], [[1]], {"a": 1}, "dense", [1e308] * 8, True, []])
            body = json.dumps(doc).encode()
        headers = {"Inference-Header-Content-Length": str(rng.randint(0, 400))} if rng.random() < 0.2 else {}
        r = http.post(
            rng.choice(["/v2/models/dcn/infer", "/v2/models/dcn/versions/1/infer"]), content=body, headers=headers
        )
        statuses.add(r.status_code)
        assert 400 <= r.status_code < 500 or (r.status_code == 200 and "outputs" in r.json()), (body, r.text)
        if r.status_code != 200:
            assert isinstance(r.json()["error"], str)
    for _ in range(40):  # gRPC: random bytes as a serialized request are either refused or decode as protos
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        try:
            grpc_stub.ModelInfer(service_pb2.ModelInferRequest.FromString(raw))
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), exc.details()
        except Exception:  # noqa: BLE001 - bytes that are not a protobuf message never reach the server
            pass
    assert 400 in statuses
    assert_good_request(http, models)


# --- lifecycle ----------------------------------------------------------------------------------------------


def test_not_ready_until_every_model_has_loaded(models):
    release = threading.Event()

    def slow_loader():
        release.wait(10)
        return models["mlp1"]

    s = InferenceServer([models["dcn"], slow_loader], ServerConfig(http_port=0, grpc_port=0)).start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{s.http_port}", timeout=10) as http:
            assert http.get("/v2/health/live").status_code == 200
            assert http.get("/v2/health/ready").status_code == 400
            assert not tgrpc.InferenceServerClient(f"127.0.0.1:{s.grpc_port}").is_server_ready()
            release.set()
            s.wait_ready(10)
            assert http.get("/v2/health/ready").status_code == 200
            assert http.get("/v2/models/mlp/ready").status_code == 200
    finally:
        release.set()
        s.stop()


def test_a_model_that_fails_to_load_keeps_the_server_unready(models):
    def broken():
        raise OSError("no such package")

    s = InferenceServer([models["dcn"], broken], ServerConfig(http_port=0, grpc_port=None)).start()
    try:
        with pytest.raises(ServerError, match="no such package"):
            s.wait_ready(10)
        assert httpx.get(f"http://127.0.0.1:{s.http_port}/v2/health/ready").status_code == 400
    finally:
        s.stop()


def test_shutdown_drains_the_queue(models):
    slow = Counting(models["mlp1"], name="slow", delay_s=0.1)
    s = InferenceServer([slow], ServerConfig(http_port=0, grpc_port=0, dynamic_batching=False)).start(wait=True)
    url = f"http://127.0.0.1:{s.http_port}/v2/models/slow/infer"
    started = threading.Barrier(7)

    def send(i):
        started.wait()
        return httpx.post(url, json=good_json(1, seed=i), timeout=30)

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(send, i) for i in range(6)]
        started.wait()
        batcher = s.entry("slow").batcher
        while len(slow.calls) < 1 or len(slow.calls) + batcher.queued() < 6:  # one running, the rest queued
            threading.Event().wait(0.005)
        s.stop()
        replies = [f.result() for f in futures]
    assert [r.status_code for r in replies] == [200] * 6
    for i, r in enumerate(replies):
        want = models["mlp1"]({"x": x_rows(1, seed=i)})["logits"]
        np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(1, 3), want, rtol=1e-6)
    assert len(slow.calls) == 6
    with pytest.raises(httpx.TransportError):
        httpx.post(url, json=good_json(1), timeout=2)


def test_duplicate_versions_and_bad_config_are_refused(models):
    with pytest.raises(ServerError, match="given twice"):
        s = InferenceServer([models["mlp1"], models["mlp1"]], ServerConfig(http_port=None, grpc_port=None))
        s.start(wait=True, timeout=10)
    with pytest.raises(ServerError, match="max_batch_size"):
        ServerConfig(max_batch_size=0)
    with pytest.raises(ServerError, match="http_port"):
        ServerConfig(http_port=70000)


def test_binds_only_the_given_host(server):
    import socket

    assert server.config.host == "127.0.0.1"
    # an IPPROTO_TCP socket: asyncio then sets TCP_NODELAY on every accepted connection (else each reply
    # with a body waits for a delayed ACK)
    assert server.http_socket.proto == socket.IPPROTO_TCP
    others = [
        a[4][0]
        for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        if not a[4][0].startswith("127.")
    ]
    for address in others[:1]:
        with pytest.raises(OSError):
            socket.create_connection((address, server.http_port), timeout=1).close()


def test_bytes_elements_round_trip():
    from luoshu.serving.protocol import array_from_bytes, array_to_bytes

    values = np.array([b"ab", b"", b"\x00z"], dtype=object)
    wire = array_to_bytes(values)
    assert wire == b"".join(struct.pack("<I", len(v)) + v for v in values)
    assert list(array_from_bytes("s", "BYTES", [3], wire)) == list(values)


def test_several_workers_run_one_model(models):
    """--workers 2: two threads take batches from one queue; every reply is still the model's own answer."""
    counted = Counting(models["dcn"], name="dcn2", delay_s=0.01)
    config = ServerConfig(http_port=0, grpc_port=None, workers=2, max_batch_size=4)
    with InferenceServer([counted], config) as s, httpx.Client(timeout=30) as client:
        url = f"http://127.0.0.1:{s.http_port}/v2/models/dcn2/infer"
        with ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda i: client.post(url, json=_dcn_json(1, seed=200 + i)), range(12)))
    for i, r in enumerate(replies):
        assert r.status_code == 200, r.text
        want = models["dcn"](_dcn_feeds(1, seed=200 + i))["output"]
        np.testing.assert_allclose(r.json()["outputs"][0]["data"], want, rtol=1e-6)
    assert sum(counted.calls) == 12 and max(counted.calls) <= 4
