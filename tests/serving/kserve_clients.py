"""KServe's own Python clients against a running server; run by tests/serving/test_kserve_client.py.

    python tests/serving/kserve_clients.py HTTP_PORT GRPC_PORT INPUTS.npz OUT_PREFIX

A separate process because kserve's generated protobuf module and tritonclient's register the
same `inference.*` message names in protobuf's default pool, which refuses a second copy (the
other serving tests import tritonclient). It reads the DCN and MLP inputs from INPUTS.npz, makes
every call, and writes the outputs to OUT_PREFIX.npz and what the calls said to OUT_PREFIX.json.
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import httpx
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput


def request(model: str, feeds: dict, binary: bool, binary_out: bool | None = None, version: str | None = None):
    inputs = []
    for name, value in feeds.items():
        inp = InferInput(name, list(value.shape), "FP32" if value.dtype == np.float32 else "INT64")
        inp.set_data_from_numpy(value, binary_data=binary)
        inputs.append(inp)
    outputs = None if binary_out is None else [RequestedOutput("output", parameters={"binary_data": binary_out})]
    return InferRequest(model, inputs, request_id="k1", request_outputs=outputs, model_version=version)


def described(response) -> dict:
    return {"id": response.id, "model_name": response.model_name, "outputs": [o.name for o in response.outputs]}


async def rest(base: str, data: dict, arrays: dict, said: dict) -> None:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    try:
        said["rest_health"] = [
            await client.is_server_live(base),
            await client.is_server_ready(base),
            await client.is_model_ready(base, "dcn"),
            await client.is_model_ready(base, "nope"),
        ]
        dcn = {"dense": data["dense"], "sparse": data["sparse"]}
        for binary_in in (False, True):
            for binary_out in (False, True):
                key = f"rest_dcn_in{'bin' if binary_in else 'json'}_out{'bin' if binary_out else 'json'}"
                response = await client.infer(base, request("dcn", dcn, binary_in, binary_out), model_name="dcn")
                said[key] = described(response)
                arrays[key] = response.outputs[0].as_numpy()
        errors = []
        for model in ("mlp", "nope"):
            try:
                await client.infer(base, request(model, {"x": data["bad_x"]}, False), model_name=model)
                errors.append([None, "no error"])
            except httpx.HTTPStatusError as e:
                errors.append([e.response.status_code, str(e)])
        said["rest_errors"] = errors
        response = await client.infer(base, request("mlp", {"x": data["x"]}, True), model_name="mlp")
        arrays["rest_mlp_after_errors"] = response.outputs[0].as_numpy()
    finally:
        await client.close()


async def grpc_calls(url: str, data: dict, arrays: dict, said: dict) -> None:
    client = InferenceGRPCClient(url, timeout=30, retries=0)
    try:
        said["grpc_health"] = [
            await client.is_server_live(),
            await client.is_server_ready(),
            await client.is_model_ready("dcn"),
        ]
        dcn = {"dense": data["dense"], "sparse": data["sparse"]}
        for raw in (False, True):  # typed contents, then raw_input_contents
            key = f"grpc_dcn_{'raw' if raw else 'typed'}"
            response = await client.infer(request("dcn", dcn, binary=raw))
            said[key] = described(response)
            arrays[key] = response.outputs[0].as_numpy()
        errors = []
        for model, feeds in (("mlp", {"x": data["bad_x"]}), ("nope", {"x": data["x"]})):
            try:
                await client.infer(request(model, feeds, binary=False))
                errors.append([None, "no error"])
            except grpc.aio.AioRpcError as e:
                errors.append([e.code().name, e.details()])
        said["grpc_errors"] = errors
        response = await client.infer(request("mlp", {"x": data["x"]}, binary=True, version="1"))
        arrays["grpc_mlp_v1_after_errors"] = response.outputs[0].as_numpy()
    finally:
        await client.close()


def main() -> None:
    http_port, grpc_port, inputs, out = sys.argv[1:5]
    data = dict(np.load(inputs))
    arrays: dict = {}
    said: dict = {}
    asyncio.run(rest(f"http://127.0.0.1:{http_port}", data, arrays, said))
    asyncio.run(grpc_calls(f"127.0.0.1:{grpc_port}", data, arrays, said))
    np.savez(f"{out}.npz", **arrays)
    with open(f"{out}.json", "w") as f:
        json.dump(said, f)


if __name__ == "__main__":
    main()
