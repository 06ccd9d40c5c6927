"""The training batches of one epoch, in a seeded order: cut from in-memory arrays or read from a stream."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import numpy as np


class EpochBatches:
    """Batch `i` of one epoch (from `start` on), cut from in-memory arrays in a seeded order:
    a map-style dataset of whole batches for `DataLoader(batch_size=None)` to prefetch."""

    def __init__(self, arrays, order: np.ndarray, batch_size: int, start: int, transform, seed: tuple[int, ...]):
        self.arrays, self.order, self.batch_size, self.start = arrays, order, batch_size, start
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return max(0, len(self.order) // self.batch_size - self.start)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        j = self.start + i
        idx = np.sort(self.order[j * self.batch_size:(j + 1) * self.batch_size])
        batch = {k: v[idx] for k, v in self.arrays.items()}
        if self.transform is None:
            return batch
        return self.transform(batch, np.random.default_rng([*self.seed, j]), True)


class StreamBatches:
    """The batches of one pass over streamed files, from batch `start` on (a resumed run reads and
    drops the ones before it): an iterable dataset for `DataLoader(batch_size=None)` to prefetch."""

    def __init__(self, stream: Callable[[int, int], Iterable[dict]], epoch: int, batch_size: int, start: int):
        self.stream, self.epoch, self.batch_size, self.start = stream, epoch, batch_size, start

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return itertools.islice(iter(self.stream(self.epoch, self.batch_size)), self.start, None)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of epoch `epoch`: a permutation seeded by (seed, epoch), so a resumed run
    sees the same batches as an uninterrupted one."""
    return np.random.default_rng([seed, epoch]).permutation(n)

