"""Dynamic batching (Triton's semantics): requests queue per model and run together, then split back.

A batch is formed from the front of the queue, as large as possible without passing
`max_batch_size` rows; when it cannot be filled, the batcher waits at most `max_delay_s`
after the oldest request's arrival for more. A lone request therefore leaves after the
delay, a batch never exceeds the maximum, and requests keep their order. `workers` threads
take batches from one queue (Triton's model instances). A batch whose run raises is re-run
one request at a time, so only the request that fails gets the error. `close()` refuses new
requests and lets the workers finish everything already queued (graceful shutdown drains).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from luoshu.serving.protocol import ModelError, UnavailableError

Arrays = dict[str, np.ndarray]


@dataclass
class BatchRecord:
    """What one run of the model did, for metrics: requests and rows in it, seconds spent."""

    requests: int
    rows: int
    compute_s: float
    queue_s: list[float] = field(default_factory=list)  # per request: arrival to the start of its run
    failed: bool = False


@dataclass
class _Pending:
    inputs: Arrays
    rows: int
    future: Future
    arrived: float


class DynamicBatcher:
    """Runs `run(inputs) -> outputs` on batches of queued requests along dimension 0.

    `batched=False` runs every request alone (a model without a dynamic batch dimension, or
    dynamic batching switched off); `on_batch(record)` is called after every run.
    """

    def __init__(
        self,
        name: str,
        run: Callable[[Arrays], Arrays],
        *,
        max_batch_size: int,
        max_delay_s: float,
        workers: int = 1,
        batched: bool = True,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ):
        self.name, self._run = name, run
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_delay_s = max(0.0, float(max_delay_s))
        self.batched = bool(batched)
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._closing = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"batcher-{name}-{i}", daemon=True)
            for i in range(max(1, int(workers)))
        ]
        for t in self._threads:
            t.start()

    def submit(self, inputs: Arrays, rows: int) -> Future:
        """Queues one validated request of `rows` rows; its future gets the outputs or a RequestError."""
        future: Future = Future()
        with self._cond:
            if self._closing:
                raise UnavailableError(f"model {self.name!r} is shutting down")
            self._queue.append(_Pending(inputs, rows, future, time.perf_counter()))
            self._queued_rows += rows
            self._cond.notify()
        return future

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float | None = None) -> None:
        """Refuses new requests, runs the queued ones, and joins the workers."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # --- workers ------------------------------------------------------------------------------------------
    def _take(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            if self.batched:
                deadline = self._queue[0].arrived + self.max_delay_s
                while self._queued_rows < self.max_batch_size and not self._closing:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0 or not self._queue:
                        break
                    self._cond.wait(remaining)
                if not self._queue:  # another worker took them while this one waited
                    return []
            batch, rows = [self._queue.popleft()], 0
            rows = batch[0].rows
            while self.batched and self._queue and rows + self._queue[0].rows <= self.max_batch_size:
                item = self._queue.popleft()
                batch.append(item)
                rows += item.rows
            self._queued_rows -= rows
            if self._queue:
                self._cond.notify()  # the rest may form a batch for another worker
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self._execute(batch)

    def _execute(self, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        queue_s = [start - p.arrived for p in batch]
        if len(batch) == 1:
            self._run_one(batch[0], queue_s)
            return
        rows = [p.rows for p in batch]
        try:
            inputs = {name: np.concatenate([p.inputs[name] for p in batch], axis=0) for name in batch[0].inputs}
            outputs = self._run(inputs)
            total = sum(rows)
            for name, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != total:
                    raise ModelError(
                        f"model {self.name!r}: output {name!r} has shape {list(value.shape)}, "
                        f"expected {total} rows (one per input row)"
                    )
        except Exception:  # noqa: BLE001 - one bad request must not fail the others: run each alone
            self._record(len(batch), sum(rows), time.perf_counter() - start, queue_s, failed=True)
            for p in batch:
                self._run_one(p, [0.0])
            return
        self._record(len(batch), sum(rows), time.perf_counter() - start, queue_s)
        bounds = np.cumsum(rows)[:-1]
        pieces = {name: np.split(value, bounds, axis=0) for name, value in outputs.items()}
        for i, p in enumerate(batch):
            p.future.set_result({name: parts[i] for name, parts in pieces.items()})

    def _run_one(self, pending: _Pending, queue_s: list[float]) -> None:
        start = time.perf_counter()
        try:
            outputs = self._run(pending.inputs)
        except Exception as exc:  # noqa: BLE001 - the model's failure goes to this request only
            self._record(1, pending.rows, time.perf_counter() - start, queue_s, failed=True)
            error = (
                exc
                if isinstance(exc, ModelError)
                else ModelError(f"model {self.name!r} failed on this request: {type(exc).__name__}: {exc}")
            )
            pending.future.set_exception(error)
            return
        self._record(1, pending.rows, time.perf_counter() - start, queue_s)
        pending.future.set_result(outputs)

    def _record(self, requests: int, rows: int, compute_s: float, queue_s: list[float], failed: bool = False) -> None:
        if self._on_batch is not None:
            try:
                self._on_batch(BatchRecord(requests, rows, compute_s, queue_s, failed))
            except Exception:  # noqa: BLE001 - metrics must never take a worker down
                pass
