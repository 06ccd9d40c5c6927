"""An in-process stand-in for the parameter-server client's table calls (tests only).

Rows start at a fixed function of their id, the server applies plain SGD with the pushed
gradient times `scale`, and every push bumps the version of each row it touches: what
the real server does for an SGD table, without processes or sockets.
"""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np


def initial_rows(ids: np.ndarray, dim: int) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    return (np.sin(ids[:, None] * 0.37 + np.arange(dim)[None, :] * 1.3) * 0.1).astype(np.float32)


def _done(value) -> Future:
    f = Future()
    f.set_result(value)
    return f


class FakeClient:
    def __init__(self, dim: int, lr: float = 0.1):
        self.dim, self.lr = dim, lr
        self.rows: dict[int, np.ndarray] = {}
        self.versions: dict[int, int] = {}
        self.pulled_rows = 0
        self.pushed_rows = 0
        self.push_calls = 0

    def create_table(self, name, dim, *, optimizer=("sgd", {"lr": 0.1}), sync_workers=None, **_):
        assert dim == self.dim and optimizer[0] == "sgd"
        self.lr = optimizer[1]["lr"]
        self.config = {"name": name, "dim": dim, "sync_workers": sync_workers}
        return dict(self.config)

    def table_config(self, name):
        return dict(self.config)

    def _row(self, i: int) -> np.ndarray:
        if i not in self.rows:
            self.rows[i] = initial_rows(np.array([i]), self.dim)[0]
            self.versions[i] = 0
        return self.rows[i]

    def pull(self, name, ids):
        ids = np.asarray(ids, np.int64)
        self.pulled_rows += len(ids)
        rows = np.stack([self._row(int(i)).copy() for i in ids]) if len(ids) else np.zeros((0, self.dim), np.float32)
        return rows, np.array([self.versions[int(i)] for i in ids], np.int64)

    def pull_async(self, name, ids):
        return _done(self.pull(name, ids))

    def push(self, name, ids, grads, scale=1.0):
        ids = np.asarray(ids, np.int64)
        self.push_calls += 1
        self.pushed_rows += len(ids)
        for i, g in zip(ids.tolist(), np.asarray(grads)):
            self._row(i)
            self.rows[i] = self.rows[i] - self.lr * scale * g
            self.versions[i] += 1
        return _done(None)

    def server_version(self, ids) -> np.ndarray:
        return np.array([self.versions.get(int(i), 0) for i in ids], np.int64)
