"""Datasets and the DataLoader: batching, drop_last, seeded shuffling, collation, prefetch threads."""

import threading

import numpy as np
import pytest

from luoshu.core.errors import Error
from luoshu.data import (
    ArrayDataset,
    DataError,
    DataLoader,
    Dataset,
    IterableDataset,
    Subset,
    TensorDataset,
    default_collate,
    random_split,
    rebatch,
)


def _dataset(n=10):
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    y = np.arange(n, dtype=np.int64)
    return ArrayDataset(x, y)


def test_array_dataset_samples_and_length():
    ds = _dataset()
    assert len(ds) == 10 and TensorDataset is ArrayDataset
    x, y = ds[4]
    np.testing.assert_array_equal(x, [12, 13, 14])
    assert y == 4
    with pytest.raises(DataError, match=r"share their first dimension.*\(10, 3\), \(9,\)"):
        ArrayDataset(np.zeros((10, 3)), np.zeros(9))


def test_array_dataset_transforms():
    ds = ArrayDataset(np.ones((4, 2)), np.arange(4), transform=lambda x: x * 2, target_transform=lambda y: y + 1)
    x, y = ds[3]
    np.testing.assert_array_equal(x, [2, 2])
    assert y == 4


@pytest.mark.parametrize("drop_last, sizes", [(False, [4, 4, 2]), (True, [4, 4])])
def test_batching_and_drop_last(drop_last, sizes):
    loader = DataLoader(_dataset(), batch_size=4, drop_last=drop_last)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == sizes == [4] * (len(sizes) - 1) + [sizes[-1]]
    assert len(loader) == len(sizes)
    x, y = batches[0]
    assert x.shape == (4, 3) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), np.arange(sum(sizes)))


def test_seeded_shuffle_is_reproducible_and_changes_per_epoch():
    def epochs(seed, n=3):
        loader = DataLoader(_dataset(20), batch_size=5, shuffle=True, seed=seed)
        return [np.concatenate([y for _, y in loader]) for _ in range(n)]

    a, b, c = epochs(0), epochs(0), epochs(1)
    for e in range(3):
        np.testing.assert_array_equal(a[e], b[e])
        assert sorted(a[e].tolist()) == list(range(20))
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], c[0])

    loader = DataLoader(_dataset(20), batch_size=5, shuffle=True, seed=0)
    loader.set_epoch(2)
    np.testing.assert_array_equal(np.concatenate([y for _, y in loader]), a[2])


@pytest.mark.parametrize("num_workers", [1, 3])
def test_prefetch_threads_keep_the_no_thread_order(num_workers):
    ds = _dataset(23)
    plain = list(DataLoader(ds, batch_size=4, shuffle=True, seed=7))
    threaded = list(DataLoader(ds, batch_size=4, shuffle=True, seed=7, num_workers=num_workers, prefetch=1))
    assert len(plain) == len(threaded) == 6
    for (xa, ya), (xb, yb) in zip(plain, threaded):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


class _Failing(Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        if i == 9:
            raise KeyError(f"sample {i} is broken")
        return np.float32(i)


def test_worker_exception_reaches_the_consumer_and_threads_stop():
    before = threading.active_count()
    seen = []
    with pytest.raises(KeyError, match="sample 9 is broken"):
        for batch in DataLoader(_Failing(), batch_size=2, num_workers=2):
            seen.append(batch)
    assert len(seen) == 4  # batches 0..3 arrive, batch 4 holds sample 9
    assert threading.active_count() == before


def test_leaving_early_stops_the_threads():
    before = threading.active_count()
    loader = DataLoader(_dataset(100), batch_size=2, num_workers=4, prefetch=1)
    it = iter(loader)
    next(it)
    it.close()
    assert threading.active_count() == before


class _Stream(IterableDataset):
    def __init__(self, n, fail_at=None):
        self.n, self.fail_at = n, fail_at

    def __iter__(self):
        for i in range(self.n):
            if i == self.fail_at:
                raise RuntimeError("stream broke")
            yield {"x": np.full(2, i, np.float32), "id": i}


def test_iterable_dataset_batches_with_and_without_thread():
    plain = list(DataLoader(_Stream(7), batch_size=3))
    threaded = list(DataLoader(_Stream(7), batch_size=3, num_workers=1))
    assert [len(b["id"]) for b in plain] == [3, 3, 1]
    for a, b in zip(plain, threaded):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["id"], b["id"])
    assert [len(b["id"]) for b in DataLoader(_Stream(7), batch_size=3, drop_last=True)] == [3, 3]
    with pytest.raises(RuntimeError, match="stream broke"):
        list(DataLoader(_Stream(7, fail_at=5), batch_size=2, num_workers=1))
    with pytest.raises(DataError, match="cannot shuffle"):
        DataLoader(_Stream(3), batch_size=2, shuffle=True)


def test_batch_size_none_passes_ready_batches_through():
    chunks = list(DataLoader(_Stream(3), batch_size=None, num_workers=1))
    assert [c["id"] for c in chunks] == [0, 1, 2]


def test_default_collate_structures():
    batch = default_collate([({"a": np.ones(2), "b": 1.5}, 3, True, "s"),
                             ({"a": np.zeros(2), "b": 2.0}, 4, False, "t")])
    d, ints, flags, strings = batch
    np.testing.assert_array_equal(d["a"], [[1, 1], [0, 0]])
    assert d["b"].dtype == np.float32 and ints.dtype == np.int64 and flags.dtype == np.bool_
    assert strings == ["s", "t"]
    assert default_collate([np.float64(1), np.float64(2)]).dtype == np.float64
    with pytest.raises(DataError, match=r"different shapes \[\(2,\), \(3,\)\]") as info:
        default_collate([np.zeros(2), np.zeros(3)])
    assert isinstance(info.value, Error)
    with pytest.raises(DataError, match="cannot batch samples of type object"):
        default_collate([object()])


def test_subset_random_split_and_rebatch():
    ds = _dataset(10)
    parts = random_split(ds, [7, 3], seed=1)
    ids = sorted(int(p[i][1]) for p in parts for i in range(len(p)))
    assert ids == list(range(10)) and [len(p) for p in parts] == [7, 3]
    assert Subset(ds, [5, 2])[1][1] == 2
    with pytest.raises(DataError, match="sum to the dataset length 10"):
        random_split(ds, [5, 4])
    chunks = [{"v": np.arange(a, b)} for a, b in [(0, 3), (3, 4), (4, 11)]]
    assert [b["v"].tolist() for b in rebatch(chunks, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert len(list(rebatch(chunks, 4, drop_last=True))) == 2
