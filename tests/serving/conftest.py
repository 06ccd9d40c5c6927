"""Shared pieces of the serving tests: small exported zoo models and protocol-only wrappers around them."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import torch

import luoshu as ls
from luoshu import models
from luoshu.serving import export, load

DCN_SHAPE = {"dense_dim": 4, "slot_sizes": [50] * 6, "embedding_dim": 4, "mlp_dims": (16, 8), "num_cross_layers": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    # 2 shared cores: torch's thread pool spinning on small batches costs 100x in latency (restored
    # after this package's tests, so the rest of a session keeps its threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def packages(tmp_path_factory):
    """Paths of exported packages: mlp versions 1 and 2 (different weights) and a small DCN."""
    root = tmp_path_factory.mktemp("packages")
    out = {}
    for version in (1, 2):
        ls.manual_seed(10 + version)  # different weights per version
        mlp = models.build("mlp", in_features=6, hidden=(8,), num_classes=3)
        out[f"mlp{version}"] = export(
            root / f"mlp-v{version}",
            mlp,
            np.zeros((2, 6), np.float32),
            name="mlp",
            version=version,
            input_names=["x"],
            output_names=["logits"],
        )
    dcn = models.build("dcn", **DCN_SHAPE)
    out["dcn"] = export(root / "dcn", dcn, (np.zeros((2, 4), np.float32), np.zeros((2, 6), np.int64)), name="dcn")
    return out


@pytest.fixture(scope="session")
def loaded(packages):
    return {key: load(path) for key, path in packages.items()}


class Counting:
    """A model wrapper counting kernel calls and the rows of each (protocol only: name, version, specs, call)."""

    def __init__(self, model, name: str | None = None, version: str | None = None, delay_s: float = 0.0):
        self.model, self.delay_s = model, delay_s
        self.name, self.version = name or model.name, version or model.version
        self.inputs, self.outputs = model.inputs, model.outputs
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, feeds):
        with self._lock:
            self.calls.append(len(next(iter(feeds.values()))))
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.model(feeds)


class Faulty(Counting):
    """Raises inside the 'kernel' for any batch containing a row whose first value is -999."""

    def __call__(self, feeds):
        x = next(iter(feeds.values()))
        if np.any(x.reshape(len(x), -1)[:, 0] == -999):
            raise RuntimeError("kernel failure on a poisoned row")
        return super().__call__(feeds)
