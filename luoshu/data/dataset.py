"""Datasets: map-style `Dataset` over indices, `ArrayDataset` over NumPy arrays, `IterableDataset` streams."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from luoshu.data.errors import DataError


class Dataset:
    """A map-style dataset: `len(ds)` samples, `ds[i]` for `0 <= i < len(ds)`."""

    def __getitem__(self, index: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define __getitem__")

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define __len__")


class IterableDataset:
    """A stream of samples (or of ready-made batches, for readers that batch themselves)."""

    def __iter__(self) -> Iterator[Any]:
        raise NotImplementedError(f"{type(self).__name__} must define __iter__")


class ArrayDataset(Dataset):
    """Samples `(a[i], b[i], ...)` from NumPy arrays that share their first dimension.

    `transform` applies to the first array's sample (the input), `target_transform` to the
    second's (the target); both are called with the sample only.
    """

    def __init__(self, *arrays: np.ndarray, transform: Callable | None = None,
                 target_transform: Callable | None = None):
        if not arrays:
            raise DataError("ArrayDataset needs at least one array")
        self.arrays = tuple(np.asarray(a) for a in arrays)
        lengths = [len(a) if a.ndim else None for a in self.arrays]
        if None in lengths or len(set(lengths)) != 1:
            shapes = ", ".join(str(a.shape) for a in self.arrays)
            raise DataError(f"ArrayDataset arrays must share their first dimension; got shapes {shapes}")
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, index: int) -> tuple:
        sample = [a[index] for a in self.arrays]
        if self.transform is not None:
            sample[0] = self.transform(sample[0])
        if self.target_transform is not None and len(sample) > 1:
            sample[1] = self.target_transform(sample[1])
        return tuple(sample)


TensorDataset = ArrayDataset  # the PyTorch name; luoshu batches are NumPy arrays


class Subset(Dataset):
    """The samples of `dataset` at `indices`, in that order."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        n = len(dataset)
        if self.indices.size and (self.indices.min() < -n or self.indices.max() >= n):
            raise DataError(f"Subset indices must lie in [0, {n}); got range "
                            f"[{self.indices.min()}, {self.indices.max()}]")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[int(self.indices[index])]


def random_split(dataset: Dataset, lengths: Sequence[int], seed: int = 0) -> list[Subset]:
    """Splits `dataset` into disjoint random subsets of the given lengths (which must sum to its length)."""
    if sum(lengths) != len(dataset) or any(n < 0 for n in lengths):
        raise DataError(f"random_split lengths {list(lengths)} must be non-negative and sum to "
                        f"the dataset length {len(dataset)}")
    order = np.random.default_rng(seed).permutation(len(dataset))
    bounds = np.cumsum([0, *lengths])
    return [Subset(dataset, order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def rebatch(chunks: Iterable[dict[str, np.ndarray]], batch_size: int,
            drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Cuts a stream of dicts of equal-length arrays into batches of exactly `batch_size` rows."""
    pending, count = [], 0
    for chunk in chunks:
        pending.append(chunk)
        count += len(next(iter(chunk.values())))
        if count < batch_size:
            continue
        merged = {k: np.concatenate([c[k] for c in pending]) for k in pending[0]}
        start = 0
        while count - start >= batch_size:
            yield {k: v[start:start + batch_size] for k, v in merged.items()}
            start += batch_size
        pending = [{k: v[start:] for k, v in merged.items()}]
        count -= start
    if count and not drop_last:
        yield {k: np.concatenate([c[k] for c in pending]) for k in pending[0]}
