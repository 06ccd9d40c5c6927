"""Image readers on tiny files written here in the real formats: IDX (MNIST), CIFAR binary batches."""

import gzip
import struct

import numpy as np
import pytest

from luoshu.core.errors import Error
from luoshu.data import CIFAR10, CIFAR100, MNIST, DataError, load_digits, read_cifar_bin, read_idx


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_load_digits_matches_sklearn():
    from sklearn.datasets import load_digits as reference

    x, y = load_digits()
    ref = reference()
    assert x.shape == (1797, 64) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(x, ref.data / 16, rtol=1e-6)
    np.testing.assert_array_equal(y, ref.target)
    assert load_digits(images=True)[0].shape == (1797, 8, 8)


@pytest.mark.parametrize("dtype, code", [("u1", 0x08), ("i1", 0x09), ("i2", 0x0B), ("i4", 0x0C), ("f4", 0x0D),
                                         ("f8", 0x0E)])
def test_read_idx_every_type(tmp_path, dtype, code):
    a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if dtype != "u1" else np.arange(24, dtype="u1").reshape(
        2, 3, 4)
    path = tmp_path / "a.idx"
    path.write_bytes(_idx_bytes(a, code))
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, a)


def test_read_idx_gzip(tmp_path):
    a = np.arange(10, dtype=np.uint8)
    path = tmp_path / "labels.idx1-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(a, 0x08)))
    np.testing.assert_array_equal(read_idx(path), a)


def test_read_idx_bad_files(tmp_path):
    good = _idx_bytes(np.zeros((3, 2, 2), np.uint8), 0x08)
    bad_magic = tmp_path / "magic.idx"
    bad_magic.write_bytes(b"\x00\x01" + good[2:])
    with pytest.raises(DataError, match=r"magic.idx: bad IDX magic number 0x00010803 at byte 0") as info:
        read_idx(bad_magic)
    assert isinstance(info.value, Error) and isinstance(info.value, ValueError)
    unknown_type = tmp_path / "type.idx"
    unknown_type.write_bytes(b"\x00\x00\x07\x03" + good[4:])
    with pytest.raises(DataError, match="type.idx: bad IDX magic number 0x00000703"):
        read_idx(unknown_type)
    truncated = tmp_path / "short.idx"
    truncated.write_bytes(good[:-5])  # header 16 bytes + 3 records of 4 bytes; cut inside record 1
    with pytest.raises(DataError, match=r"short.idx: truncated IDX data.*ends at byte 23, inside record 1 "
                                        r"\(0-based, starting at byte 20\)"):
        read_idx(truncated)
    header_cut = tmp_path / "header.idx"
    header_cut.write_bytes(good[:10])
    with pytest.raises(DataError, match="header.idx: truncated IDX header: 3 dimensions need 16 bytes"):
        read_idx(header_cut)
    extra = tmp_path / "extra.idx"
    extra.write_bytes(good + b"\x00\x00")
    with pytest.raises(DataError, match="extra.idx: 2 unexpected bytes after the last IDX record, from byte 28"):
        read_idx(extra)
    broken_gz = tmp_path / "broken.idx.gz"
    broken_gz.write_bytes(gzip.compress(good)[:-12])
    with pytest.raises(DataError, match="broken.idx.gz: corrupt or truncated gzip"):
        read_idx(broken_gz)
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "missing.idx")


def _write_mnist(root, split, n, gz=False, label_max=9):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, label_max + 1, n).astype(np.uint8)
    labels[0] = label_max
    suffix = ".gz" if gz else ""
    for name, data in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
        raw = _idx_bytes(data, 0x08)
        (root / (name + suffix)).write_bytes(gzip.compress(raw) if gz else raw)
    return images, labels


def test_mnist_dataset(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = _write_mnist(raw, "train", 5)
    test_images, _ = _write_mnist(raw, "t10k", 3, gz=True)
    train = MNIST(tmp_path, train=True)
    assert len(train) == 5
    x, y = train[2]
    np.testing.assert_array_equal(x, images[2])
    assert y == labels[2] and train.labels.dtype == np.int64
    np.testing.assert_array_equal(MNIST(tmp_path, train=False).images, test_images)
    with pytest.raises(DataError, match="MNIST train images not found under .*never downloads"):
        MNIST(tmp_path / "elsewhere")


def test_mnist_bad_labels_and_mismatched_counts(tmp_path):
    _write_mnist(tmp_path, "train", 4, label_max=12)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: record 0 has label 12, expected 0..9"):
        MNIST(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, np.uint8), 0x08))
    with pytest.raises(DataError, match="has 4 images but .* has 3 labels"):
        MNIST(tmp_path)


def _cifar_records(n, label_bytes, rng):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (n, label_bytes), dtype=np.uint8)
    rows = np.concatenate([labels, images.transpose(0, 3, 1, 2).reshape(n, -1)], axis=1)
    return images, labels, rows.tobytes()


def test_read_cifar10_and_100(tmp_path):
    rng = np.random.default_rng(0)
    images, labels, raw = _cifar_records(4, 1, rng)
    (tmp_path / "b.bin").write_bytes(raw)
    x, y = read_cifar_bin(tmp_path / "b.bin")
    assert x.shape == (4, 32, 32, 3) and y.dtype == np.int64
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels[:, 0])
    images, labels, raw = _cifar_records(3, 2, rng)
    (tmp_path / "c.bin").write_bytes(raw)
    x, coarse = read_cifar_bin(tmp_path / "c.bin", label="coarse")
    _, fine = read_cifar_bin(tmp_path / "c.bin", label="fine")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(coarse, labels[:, 0])
    np.testing.assert_array_equal(fine, labels[:, 1])


def test_cifar_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    _, _, raw = _cifar_records(3, 1, rng)
    (tmp_path / "cut.bin").write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"cut.bin: truncated CIFAR record 2 \(0-based, starting at byte 6146\)"):
        read_cifar_bin(tmp_path / "cut.bin")
    bad = bytearray(raw)
    bad[3073] = 10  # the label byte of record 1
    (tmp_path / "label.bin").write_bytes(bytes(bad))
    with pytest.raises(DataError, match="label.bin: record 1 has label 10, expected 0..9"):
        read_cifar_bin(tmp_path / "label.bin")


def test_cifar_datasets(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    parts = []
    for i in range(1, 6):
        images, labels, raw = _cifar_records(2, 1, rng)
        (folder / f"data_batch_{i}.bin").write_bytes(raw)
        parts.append(labels[:, 0])
    _, _, raw = _cifar_records(3, 1, rng)
    (folder / "test_batch.bin").write_bytes(raw)
    train = CIFAR10(tmp_path)
    assert len(train) == 10 and len(CIFAR10(tmp_path, train=False)) == 3
    np.testing.assert_array_equal(train.labels, np.concatenate(parts))
    assert train[9][0].shape == (32, 32, 3)
    _, labels, raw = _cifar_records(4, 2, rng)
    (tmp_path / "train.bin").write_bytes(raw)
    np.testing.assert_array_equal(CIFAR100(tmp_path, label="coarse").labels, labels[:, 0])
    with pytest.raises(DataError, match="CIFAR100 batch test.bin not found"):
        CIFAR100(tmp_path, train=False)
