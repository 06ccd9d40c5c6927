"""An in-process stand-in for the parameter-server client's table calls (tests only).

Rows start at a fixed function of their id, the server applies plain SGD with the pushed
gradient times `scale`, and every push bumps the version of each row it touches: what
the real server does for an SGD table, without processes or sockets.

`LateFakeClient` answers pushes late and in any order, as a real client's futures complete
when the servers' replies arrive: the server decides (applies or refuses) when the push
reaches it, the reply comes whenever `release` says.
"""

from __future__ import annotations

import threading
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


class RefusedPush(Exception):
    """What a refused push's future raises in `LateFakeClient`."""


class LateFakeClient(FakeClient):
    """Push replies held back: `release(order)` completes them later, in any order.

    `refuse(k)` makes the k-th push (0-based, counting every push) be refused by the server:
    its rows do not change, and its future fails with `RefusedPush` when released.
    """

    def __init__(self, dim: int, lr: float = 0.1):
        super().__init__(dim, lr)
        self.held: list[tuple[int, Future, bool]] = []  # (push number, future, refused)
        self.refused: set[int] = set()
        self._lock = threading.Lock()

    def refuse(self, k: int) -> None:
        self.refused.add(k)

    def push(self, name, ids, grads, scale=1.0):
        k = self.push_calls
        refused = k in self.refused
        if refused:
            self.push_calls += 1
        else:
            super().push(name, ids, grads, scale)
        future = Future()
        with self._lock:
            self.held.append((k, future, refused))
        return future

    def outstanding(self) -> int:
        with self._lock:
            return sum(not f.done() for _, f, _ in self.held)

    def release(self, order: str = "reverse", seed: int = 0, gap_s: float = 0.0) -> None:
        """Completes every held future: "reverse" (newest reply first), "random" (seeded) or "fifo"."""
        with self._lock:  # the futures stay in `held` until completed, so `outstanding` counts them meanwhile
            held = [h for h in self.held if not h[1].done()]
        if order == "reverse":
            held = held[::-1]
        elif order == "random":
            rng = np.random.default_rng(seed)
            held = [held[i] for i in rng.permutation(len(held))]
        for k, future, refused in held:
            if gap_s:
                threading.Event().wait(gap_s)
            if refused:
                future.set_exception(RefusedPush(f"push {k} was refused by the server"))
            else:
                future.set_result(None)

    def release_later(self, delay_s: float, order: str = "reverse", gap_s: float = 0.0) -> threading.Thread:
        def run():
            threading.Event().wait(delay_s)
            self.release(order, gap_s=gap_s)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t
