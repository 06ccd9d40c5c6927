"""The deployment files name the image, ports, probe paths and flags the server and the launcher actually use.

Expected values come from the server's constants and from luoshu's own argument parsers, not from
literals repeated here.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from luoshu import __version__
from luoshu.cli import build_parser
from luoshu.serving import server as S

ROOT = Path(__file__).resolve().parents[2]


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy" / name).read_text()) if d]


def _by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_image_tag_is_the_package_version():
    assert S.IMAGE.split(":")[1] == __version__


def test_serve_deployment_and_service():
    docs = _docs("serve.yaml")
    deployment, service = _by_kind(docs, "Deployment"), _by_kind(docs, "Service")
    assert deployment["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1"
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["image"] == S.IMAGE
    args = build_parser(["serve"]).parse_args(container["command"][1:] + container["args"])
    assert args.command == "serve" and args.packages
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.http_port, "grpc": args.grpc_port}
    assert (args.http_port, args.grpc_port) == (S.DEFAULT_HTTP_PORT, S.DEFAULT_GRPC_PORT)
    assert args.host == "0.0.0.0"  # inside a pod the Service must reach it
    assert container["livenessProbe"]["httpGet"] == {"path": S.LIVE_PATH, "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": S.READY_PATH, "port": "http"}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == S.METRICS_PATH
    assert int(annotations["prometheus.io/port"]) == args.http_port
    # the grace period covers the server's drain
    assert pod["spec"]["terminationGracePeriodSeconds"] > S.ServerConfig().drain_timeout_s
    assert {(p["name"], p["targetPort"], p["port"]) for p in service["spec"]["ports"]} == {
        ("http", "http", args.http_port),
        ("grpc", "grpc", args.grpc_port),
    }


def test_dockerfile_matches_the_server():
    text = (ROOT / "Dockerfile").read_text()
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    assert exposed == {S.DEFAULT_HTTP_PORT, S.DEFAULT_GRPC_PORT}
    entry = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    cmd = yaml.safe_load(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert entry[0] == "luoshu"
    args = build_parser(entry[1:]).parse_args(entry[1:] + cmd)
    assert (args.http_port, args.grpc_port, args.host) == (S.DEFAULT_HTTP_PORT, S.DEFAULT_GRPC_PORT, "0.0.0.0")
    assert S.READY_PATH in text and "torch==2.13.0" in text
    assert S.IMAGE in text  # the build command in its header


def _operator_env(job: dict) -> dict:
    """The PET_* variables the training operator sets in each pod of an elastic PyTorchJob."""
    elastic = job["spec"]["elasticPolicy"]
    return {
        "PET_NPROC_PER_NODE": str(job["spec"]["nprocPerNode"]),
        "PET_NNODES": f"{elastic['minReplicas']}:{elastic['maxReplicas']}",
        "PET_RDZV_BACKEND": elastic["rdzvBackend"],
        "PET_RDZV_ENDPOINT": f"luoshu-train-dcn-master-0:{elastic['rdzvPort']}",
        "PET_MAX_RESTARTS": str(elastic["maxRestarts"]),
        "HOSTNAME": "pod-0",
    }


def test_pytorchjob_runs_luoshu_train_under_the_launcher(monkeypatch):
    job = _by_kind(_docs("train-pytorchjob.yaml"), "PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    elastic = job["spec"]["elasticPolicy"]
    assert elastic["rdzvBackend"] == "c10d" and 1 <= elastic["minReplicas"] <= elastic["maxReplicas"]
    assert int(job["spec"]["nprocPerNode"]) >= 1
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and set(replicas) <= {"Master", "Worker"}
    env = _operator_env(job)
    for role, spec in replicas.items():
        containers = spec["template"]["spec"]["containers"]
        assert [c["name"] for c in containers].count("pytorch") == 1, role
        (container,) = [c for c in containers if c["name"] == "pytorch"]
        assert container["image"] == S.IMAGE
        assert container["command"] == ["/bin/sh", "-c"]
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        words = shlex.split(os.path.expandvars(container["args"][0]))
        assert words[:2] == ["exec", "luoshu"]
        launch = build_parser(words[2:]).parse_args(words[2:])
        assert launch.command == "launch"
        assert launch.nproc_per_node == int(job["spec"]["nprocPerNode"])
        assert launch.nnodes == env["PET_NNODES"] and launch.rdzv_backend == "c10d"
        assert launch.rdzv_endpoint == env["PET_RDZV_ENDPOINT"] and launch.max_restarts == elastic["maxRestarts"]
        # the launched script is the `luoshu` console script, running `luoshu train` with flags it accepts
        assert Path(launch.script).name == "luoshu" and launch.script_args[0] == "train"
        train = build_parser(launch.script_args).parse_args(launch.script_args)
        assert train.command == "train" and train.model == "dcn"


@pytest.mark.parametrize("name", ["serve.yaml", "train-pytorchjob.yaml"])
def test_manifests_parse(name):
    assert all("apiVersion" in d and "kind" in d and "metadata" in d for d in _docs(name))


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_dockerfile_installs_what_the_server_runs():
    """What the image's `pip install .` needs is in its build context, and what it installs
    runs the server: the entrypoint is the package's console script, the base image's Python
    meets requires-python, the health check asks the server's own port and path, and every
    third-party module luoshu.serving imports comes with the runtime dependencies (the image
    installs no extra)."""
    import ast
    import fnmatch
    import importlib
    import sys
    from importlib import metadata
    from importlib.metadata import packages_distributions

    specifiers = pytest.importorskip("packaging.specifiers")
    requirements = pytest.importorskip("packaging.requirements")
    text = (ROOT / "Dockerfile").read_text()
    project = _pyproject()
    entry = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    module, _, func = project["scripts"][entry[0]].partition(":")
    assert callable(getattr(importlib.import_module(module), func))
    (python,) = re.findall(r"^FROM python:(\d+\.\d+)", text, re.M)
    assert specifiers.SpecifierSet(project["requires-python"]).contains(f"{python}.0")
    assert f"http://127.0.0.1:{S.DEFAULT_HTTP_PORT}{S.READY_PATH}" in text
    # the build context: COPY'd sources hold pyproject, the readme and the package, and
    # .dockerignore drops none of the package's files (the checked-in gRPC stubs included)
    copied = {w.rstrip("/") for line in re.findall(r"^COPY (.+)$", text, re.M) for w in line.split()[:-1]}
    assert {"pyproject.toml", project["readme"], "luoshu"} <= copied
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip()]
    package_files = [p.relative_to(ROOT).as_posix() for p in (ROOT / "luoshu").rglob("*") if p.is_file()]
    assert "luoshu/serving/proto/grpc_predict_v2_pb2.py" in package_files
    for path in package_files:
        if "__pycache__" in path:
            continue
        assert not any(fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") for pat in ignored), path
    # the runtime dependencies and what they require in turn (fastapi brings starlette)
    runtime, todo = set(), [requirements.Requirement(r) for r in project["dependencies"]]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in runtime or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        runtime.add(name)
        todo += [requirements.Requirement(r) for r in (metadata.requires(name) or [])]
    dists = packages_distributions()
    for source in (ROOT / "luoshu" / "serving").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top == "luoshu" or top in sys.stdlib_module_names:
                    continue
                owners = {d.lower().replace("_", "-") for d in dists.get(top, [])}
                assert owners & runtime, f"{source.name} imports {top} ({owners}), not a runtime dependency"
