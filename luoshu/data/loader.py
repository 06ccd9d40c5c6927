"""`DataLoader`: batching, seeded per-epoch shuffling, collation to NumPy, background prefetch threads."""

from __future__ import annotations

import math
import numbers
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from luoshu.data.dataset import Dataset, IterableDataset
from luoshu.data.errors import DataError


def default_collate(batch: list) -> Any:
    """Stacks a list of samples into one NumPy batch, keeping the samples' structure.

    Arrays stack along a new first axis; Python ints become int64, Python floats float32
    (luoshu's default float), bools bool; NumPy scalars keep their dtype; dicts and
    tuples/lists collate field by field; strings and `None` stay as a list.
    """
    if not batch:
        raise DataError("cannot collate an empty batch")
    first = batch[0]
    if isinstance(first, np.ndarray | np.generic):
        shapes = {np.shape(x) for x in batch}
        if len(shapes) != 1:
            raise DataError(f"cannot stack samples of different shapes {sorted(shapes)} into a batch; "
                            "pass a collate_fn that pads them")
        return np.stack(batch)
    if isinstance(first, bool):
        return np.asarray(batch, dtype=np.bool_)
    if isinstance(first, numbers.Integral):
        return np.asarray(batch, dtype=np.int64)
    if isinstance(first, numbers.Real):
        return np.asarray(batch, dtype=np.float32)
    if isinstance(first, str | bytes) or first is None:
        return list(batch)
    if isinstance(first, Mapping):
        keys = first.keys()
        for sample in batch:
            if sample.keys() != keys:
                raise DataError(f"cannot collate dicts with different keys {sorted(keys)} and {sorted(sample.keys())}")
        return {k: default_collate([sample[k] for sample in batch]) for k in keys}
    if isinstance(first, tuple | list):
        if any(len(sample) != len(first) for sample in batch):
            raise DataError(f"cannot collate sequences of different lengths {sorted({len(s) for s in batch})}")
        fields = [default_collate(list(column)) for column in zip(*batch)]
        if hasattr(first, "_fields"):  # namedtuple
            return type(first)(*fields)
        return tuple(fields) if isinstance(first, tuple) else fields
    raise DataError(f"default_collate cannot batch samples of type {type(first).__name__}; pass a collate_fn")


class _Failure:
    """An exception raised in a worker thread, carried to the consumer."""

    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


class DataLoader:
    """Iterates over a dataset in batches.

    - `shuffle`: the order of epoch `e` is a permutation seeded by `(seed, e)`, so every
      epoch differs and a run is reproducible. Each `iter()` starts the next epoch;
      `set_epoch(e)` picks the epoch explicitly (as after resuming from a checkpoint).
    - `batch_size=None`: no batching; each item of the dataset is already a batch (readers
      such as `ParquetDataset` and `CriteoDataset` yield batches themselves).
    - `num_workers > 0`: that many daemon threads load and collate batches in the
      background, at most `prefetch` batches ahead per thread (bounded queues). Batches come
      out in the same order as with `num_workers=0`. An exception in a worker is re-raised in
      the consumer; leaving the loop early stops the threads. An `IterableDataset` is read by
      one background thread. Threads help where loading releases the GIL (file I/O,
      decompression, NumPy, pyarrow). Random transforms that share one generator draw from it
      in thread-scheduling order, so only `num_workers=0` makes them reproducible.
    """

    def __init__(self, dataset: Dataset | IterableDataset, batch_size: int | None = 1, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, collate_fn: Callable[[list], Any] | None = None,
                 num_workers: int = 0, prefetch: int = 2):
        if batch_size is not None and (not isinstance(batch_size, numbers.Integral) or batch_size < 1):
            raise DataError(f"DataLoader batch_size must be a positive int or None; got {batch_size!r}")
        if num_workers < 0 or prefetch < 1:
            raise DataError(f"DataLoader needs num_workers >= 0 and prefetch >= 1; got {num_workers}, {prefetch}")
        self.iterable = isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__")
        if self.iterable and shuffle:
            raise DataError(f"DataLoader cannot shuffle the iterable dataset {type(dataset).__name__}; "
                            "shuffle inside the dataset instead")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.collate_fn = collate_fn if collate_fn is not None else (default_collate if batch_size else None)
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Makes the next iteration epoch `epoch` (its shuffle order depends on it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)  # TypeError for an iterable dataset without a length
        if self.batch_size is None:
            return n
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _index_batches(self, epoch: int) -> list[np.ndarray]:
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        if self.batch_size is None:
            return [np.int64(i) for i in order]
        stop = n - n % self.batch_size if self.drop_last else n
        return [order[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def _load(self, indices) -> Any:
        if self.batch_size is None:
            item = self.dataset[int(indices)]
            return self.collate_fn(item) if self.collate_fn is not None else item
        return self.collate_fn([self.dataset[int(i)] for i in indices])

    def _batches_from_stream(self) -> Iterator[Any]:
        if self.batch_size is None:
            for item in self.dataset:
                yield self.collate_fn(item) if self.collate_fn is not None else item
            return
        pending = []
        for sample in self.dataset:
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield self.collate_fn(pending)
                pending = []
        if pending and not self.drop_last:
            yield self.collate_fn(pending)

    def __iter__(self) -> Iterator[Any]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.iterable:
            stream = self._batches_from_stream()
            return stream if self.num_workers == 0 else _prefetch_stream(stream, self.prefetch * self.num_workers)
        batches = self._index_batches(epoch)
        if self.num_workers == 0:
            return (self._load(b) for b in batches)
        return _prefetch_map(self._load, batches, self.num_workers, self.prefetch)


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Puts `item` unless the consumer has gone; returns False when it has."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _prefetch_map(load: Callable, batches: list, num_workers: int, prefetch: int) -> Iterator[Any]:
    # Worker w loads batches w, w + W, w + 2W, ... into its own bounded queue, so the
    # consumer reads them back in order by visiting the queues round-robin.
    num_workers = min(num_workers, max(len(batches), 1))
    queues = [queue.Queue(maxsize=prefetch) for _ in range(num_workers)]
    stop = threading.Event()

    def work(w: int) -> None:
        for i in range(w, len(batches), num_workers):
            try:
                item = load(batches[i])
            except BaseException as exc:  # noqa: BLE001  (carried to the consumer and re-raised there)
                _put(queues[w], _Failure(exc), stop)
                return
            if not _put(queues[w], item, stop):
                return

    threads = [threading.Thread(target=work, args=(w,), daemon=True, name=f"luoshu-loader-{w}")
               for w in range(num_workers)]
    for t in threads:
        t.start()
    try:
        for i in range(len(batches)):
            item = queues[i % num_workers].get()
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        for t in threads:
            t.join()


def _prefetch_stream(stream: Iterator[Any], capacity: int) -> Iterator[Any]:
    q: queue.Queue = queue.Queue(maxsize=capacity)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in stream:
                if not _put(q, item, stop):
                    return
        except BaseException as exc:  # noqa: BLE001  (carried to the consumer and re-raised there)
            _put(q, _Failure(exc), stop)
            return
        _put(q, _END, stop)

    thread = threading.Thread(target=work, daemon=True, name="luoshu-loader-stream")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
