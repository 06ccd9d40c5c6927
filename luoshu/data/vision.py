"""Image datasets read from local files: scikit-learn digits, MNIST (IDX), CIFAR-10/100 (binary batches).

Nothing is downloaded: each reader takes the path of files fetched beforehand. Images come
back as uint8 arrays in HWC layout (HW for grayscale), labels as int64.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from luoshu.data._files import read_bytes
from luoshu.data.dataset import ArrayDataset
from luoshu.data.errors import DataError


def load_digits(images: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8×8 scikit-learn digits (shipped with scikit-learn): `(x, y)` with x float32 in
    [0, 1] of shape (N, 64), or (N, 8, 8) with `images=True`, and y int64 in 0..9."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = (data.images if images else data.data).astype(np.float32) / np.float32(16)
    return x, data.target.astype(np.int64)


# IDX type codes (http://yann.lecun.com/exdb/mnist/): all multi-byte values are big-endian.
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (MNIST's format; gzip-compressed files too) into an array in native byte order."""
    raw = read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX header: the file has {len(raw)} bytes, the magic number needs 4")
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[0] or raw[1] or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: bad IDX magic number 0x{magic:08x} at byte 0; expected 0x0000TTDD with type code "
                        f"TT in {{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}} and DD >= 1 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, the file has {len(raw)}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    record_bytes = int(np.prod(dims[1:], dtype=np.int64)) * dtype.itemsize
    expected = header + dims[0] * record_bytes
    if len(raw) < expected:
        record = (len(raw) - header) // record_bytes if record_bytes else 0
        raise DataError(f"{path}: truncated IDX data: the header promises {dims[0]} records of {record_bytes} bytes "
                        f"({expected} bytes in all) but the file ends at byte {len(raw)}, inside record {record} "
                        f"(0-based, starting at byte {header + record * record_bytes})")
    if len(raw) > expected:
        raise DataError(f"{path}: {len(raw) - expected} unexpected bytes after the last IDX record, "
                        f"from byte {expected} (shape {dims} from the header)")
    return np.frombuffer(raw, dtype=dtype, offset=header, count=int(np.prod(dims))).reshape(dims).astype(
        dtype.newbyteorder("="))


def _find(root: Path, names: list[str], subdirs: list[str], what: str) -> Path:
    tried = []
    for sub in subdirs:
        for name in names:
            for candidate in (root / sub / name, root / sub / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
                tried.append(str(candidate))
    raise DataError(f"{what} not found under {root} (luoshu never downloads); looked for: {', '.join(tried)}")


def _check_labels(path, labels: np.ndarray, num_classes: int, what: str = "label") -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{path}: record {bad[0]} has {what} {labels[bad[0]]}, expected 0..{num_classes - 1}")


class MNIST(ArrayDataset):
    """MNIST (or Fashion-MNIST, same format) from the four IDX files under `root` or `root/MNIST/raw`,
    gzip or not. Samples are `(image uint8 28×28, label int64)`."""

    def __init__(self, root: str | os.PathLike, train: bool = True, transform: Callable | None = None,
                 target_transform: Callable | None = None):
        root, split = Path(root), "train" if train else "t10k"
        subdirs = ["", "MNIST/raw", "raw"]
        images_path = _find(root, [f"{split}-images-idx3-ubyte", f"{split}-images.idx3-ubyte"], subdirs,
                            f"MNIST {split} images")
        labels_path = _find(root, [f"{split}-labels-idx1-ubyte", f"{split}-labels.idx1-ubyte"], subdirs,
                            f"MNIST {split} labels")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{images_path}: expected uint8 images of shape (N, H, W); "
                            f"got {images.dtype} {images.shape}")
        if labels.ndim != 1:
            raise DataError(f"{labels_path}: expected labels of shape (N,); got {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"MNIST {split}: {images_path} has {len(images)} images but {labels_path} has "
                            f"{len(labels)} labels")
        labels = labels.astype(np.int64)
        _check_labels(labels_path, labels, 10)
        super().__init__(images, labels, transform=transform, target_transform=target_transform)
        self.images, self.labels = images, labels


_CIFAR_IMAGE_BYTES = 3 * 32 * 32
_CIFAR_LABELS = {"label": (1, 0, 10), "coarse": (2, 0, 20), "fine": (2, 1, 100)}  # label bytes, which, classes


def read_cifar_bin(path: str | os.PathLike, label: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """Reads a CIFAR binary batch: `(images uint8 (N, 32, 32, 3), labels int64)`.

    `label="label"` reads the CIFAR-10 layout (1 label byte + 3,072 pixel bytes per record);
    `"coarse"` or `"fine"` read the CIFAR-100 layout (coarse byte, fine byte, 3,072 pixel bytes).
    """
    if label not in _CIFAR_LABELS:
        raise DataError(f"read_cifar_bin label must be one of {sorted(_CIFAR_LABELS)}; got {label!r}")
    label_bytes, which, classes = _CIFAR_LABELS[label]
    record = label_bytes + _CIFAR_IMAGE_BYTES
    raw = read_bytes(path)
    if len(raw) % record:
        n = len(raw) // record
        raise DataError(f"{path}: truncated CIFAR record {n} (0-based, starting at byte {n * record}): records are "
                        f"{record} bytes ({label_bytes} label + {_CIFAR_IMAGE_BYTES} pixel bytes) and the file has "
                        f"{len(raw)} bytes, {len(raw) % record} left over")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    labels = rows[:, which].astype(np.int64)
    _check_labels(path, labels, classes, f"{label} label" if label_bytes == 2 else "label")
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


class CIFAR10(ArrayDataset):
    """CIFAR-10 from the binary batches (`data_batch_1.bin`..`data_batch_5.bin`, `test_batch.bin`)
    under `root` or `root/cifar-10-batches-bin`. Samples are `(image uint8 32×32×3, label int64)`."""

    _dir, _train, _test, _label = "cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)], \
        ["test_batch.bin"], "label"

    def __init__(self, root: str | os.PathLike, train: bool = True, transform: Callable | None = None,
                 target_transform: Callable | None = None):
        root = Path(root)
        files = [_find(root, [name], ["", self._dir], f"{type(self).__name__} batch {name}")
                 for name in (self._train if train else self._test)]
        parts = [read_cifar_bin(f, self._label) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        super().__init__(images, labels, transform=transform, target_transform=target_transform)
        self.images, self.labels = images, labels


class CIFAR100(CIFAR10):
    """CIFAR-100 from `train.bin` / `test.bin` under `root` or `root/cifar-100-binary`;
    `label` picks the "fine" (100 classes, default) or "coarse" (20 superclasses) label."""

    _dir, _train, _test = "cifar-100-binary", ["train.bin"], ["test.bin"]

    def __init__(self, root: str | os.PathLike, train: bool = True, label: str = "fine",
                 transform: Callable | None = None, target_transform: Callable | None = None):
        if label not in ("fine", "coarse"):
            raise DataError(f"CIFAR100 label must be 'fine' or 'coarse'; got {label!r}")
        self._label = label
        super().__init__(root, train, transform, target_transform)
