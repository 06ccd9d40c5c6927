"""Image transforms on NumPy arrays: `Compose`, `ToTensor`, `Normalize`, resizing and seeded random crops/flips.

Spatial transforms take images in the layout given by `layout`: "HWC" (the default, what
the readers return and what torchvision's PIL transforms see before `ToTensor`) or "CHW"
(after `ToTensor`); 2-D arrays are always "HW". Random transforms draw from a NumPy
`Generator` they own (`rng=` a seed or a generator at construction) or one passed to the
call, which takes precedence: `t(image, rng=generator)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from luoshu.data.errors import DataError


def _size2(size: int | Sequence[int], what: str) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    if h < 1 or w < 1:
        raise DataError(f"{what} size must be positive; got {size!r}")
    return int(h), int(w)


def _spatial_axes(image: np.ndarray, layout: str, what: str) -> tuple[int, int]:
    if image.ndim == 2:
        return 0, 1
    if image.ndim != 3:
        raise DataError(f"{what} takes an HW, HWC or CHW image; got shape {image.shape}")
    if layout == "HWC":
        return 0, 1
    if layout == "CHW":
        return 1, 2
    raise DataError(f"{what} layout must be 'HWC' or 'CHW'; got {layout!r}")


def _generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


class Transform:
    """A callable on one sample; `rng` is ignored by deterministic transforms."""

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Compose(Transform):
    """Applies transforms in order, passing a call's `rng` on to each."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, rng=None):
        for t in self.transforms:
            image = t(image, rng=rng) if isinstance(t, Transform) else t(image)
        return image


class ToTensor(Transform):
    """HWC (or HW) image → CHW float32; uint8 values scale to [0, 1] (as torchvision's ToTensor)."""

    def __call__(self, image, rng=None):
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise DataError(f"ToTensor takes an HW or HWC image; got shape {image.shape}")
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))
        if image.dtype == np.uint8:
            return chw.astype(np.float32) / np.float32(255)
        return chw.astype(np.float32, copy=False)


class Normalize(Transform):
    """(x - mean[c]) / std[c] per channel of a CHW float image."""

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]):
        self.mean = np.atleast_1d(np.asarray(mean, dtype=np.float32))
        self.std = np.atleast_1d(np.asarray(std, dtype=np.float32))
        if np.any(self.std == 0):
            raise DataError(f"Normalize std must be non-zero; got {self.std.tolist()}")

    def __call__(self, image, rng=None):
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3:
            raise DataError(f"Normalize takes a CHW image; got shape {image.shape}")
        c = image.shape[0]
        for name, v in (("mean", self.mean), ("std", self.std)):
            if v.size not in (1, c):
                raise DataError(f"Normalize {name} has {v.size} values for an image with {c} channels")
        return (image - self.mean.reshape(-1, 1, 1)) / self.std.reshape(-1, 1, 1)


def resize(image: np.ndarray, size: int | Sequence[int], layout: str = "HWC",
           interpolation: str = "bilinear") -> np.ndarray:
    """Resizes the spatial axes to `size` (h, w): bilinear with half-pixel centres (as
    PyTorch's `interpolate(align_corners=False)`) or nearest; integer images are rounded back."""
    out_h, out_w = _size2(size, "resize")
    ya, xa = _spatial_axes(image, layout, "resize")
    in_h, in_w = image.shape[ya], image.shape[xa]
    if interpolation == "nearest":
        rows = np.minimum((np.arange(out_h) * (in_h / out_h)).astype(np.int64), in_h - 1)
        cols = np.minimum((np.arange(out_w) * (in_w / out_w)).astype(np.int64), in_w - 1)
        return np.take(np.take(image, rows, axis=ya), cols, axis=xa)
    if interpolation != "bilinear":
        raise DataError(f"resize interpolation must be 'bilinear' or 'nearest'; got {interpolation!r}")

    def coords(n_out, n_in):
        src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo).astype(np.float32)

    y0, y1, wy = coords(out_h, in_h)
    x0, x1, wx = coords(out_w, in_w)
    shape_y = [1] * image.ndim
    shape_y[ya] = -1
    shape_x = [1] * image.ndim
    shape_x[xa] = -1
    wy, wx = wy.reshape(shape_y), wx.reshape(shape_x)
    f = image.astype(np.float32)
    top = np.take(f, y0, axis=ya)
    bottom = np.take(f, y1, axis=ya)
    rows = top + (bottom - top) * wy
    left = np.take(rows, x0, axis=xa)
    right = np.take(rows, x1, axis=xa)
    out = left + (right - left) * wx
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(image.dtype)
    return out.astype(image.dtype, copy=False)


def _crop(image: np.ndarray, top: int, left: int, h: int, w: int, ya: int, xa: int) -> np.ndarray:
    index = [slice(None)] * image.ndim
    index[ya] = slice(top, top + h)
    index[xa] = slice(left, left + w)
    return image[tuple(index)]


class Resize(Transform):
    """Resizes to `size` (int: square, or (h, w))."""

    def __init__(self, size: int | Sequence[int], interpolation: str = "bilinear", layout: str = "HWC"):
        self.size, self.interpolation, self.layout = size, interpolation, layout

    def __call__(self, image, rng=None):
        return resize(np.asarray(image), self.size, self.layout, self.interpolation)


class CenterCrop(Transform):
    """Crops the central `size` region."""

    def __init__(self, size: int | Sequence[int], layout: str = "HWC"):
        self.size, self.layout = _size2(size, "CenterCrop"), layout

    def __call__(self, image, rng=None):
        image = np.asarray(image)
        ya, xa = _spatial_axes(image, self.layout, "CenterCrop")
        (h, w), (H, W) = self.size, (image.shape[ya], image.shape[xa])
        if h > H or w > W:
            raise DataError(f"CenterCrop size {(h, w)} is larger than the image {(H, W)}")
        return _crop(image, (H - h) // 2, (W - w) // 2, h, w, ya, xa)


class RandomHorizontalFlip(Transform):
    """Mirrors the image left-right with probability `p`."""

    def __init__(self, p: float = 0.5, layout: str = "HWC", rng: np.random.Generator | int | None = None):
        if not 0 <= p <= 1:
            raise DataError(f"RandomHorizontalFlip p must lie in [0, 1]; got {p}")
        self.p, self.layout, self._rng = p, layout, _generator(rng)

    def __call__(self, image, rng=None):
        image = np.asarray(image)
        _, xa = _spatial_axes(image, self.layout, "RandomHorizontalFlip")
        if (rng if rng is not None else self._rng).random() < self.p:
            return np.flip(image, axis=xa).copy()
        return image


class RandomCrop(Transform):
    """Pads each border by `padding` (with `fill`), then crops a random `size` region."""

    def __init__(self, size: int | Sequence[int], padding: int = 0, fill: float = 0, layout: str = "HWC",
                 rng: np.random.Generator | int | None = None):
        if padding < 0:
            raise DataError(f"RandomCrop padding must be non-negative; got {padding}")
        self.size, self.padding, self.fill, self.layout = _size2(size, "RandomCrop"), padding, fill, layout
        self._rng = _generator(rng)

    def __call__(self, image, rng=None):
        image = np.asarray(image)
        ya, xa = _spatial_axes(image, self.layout, "RandomCrop")
        if self.padding:
            pad = [(0, 0)] * image.ndim
            pad[ya] = pad[xa] = (self.padding, self.padding)
            image = np.pad(image, pad, constant_values=self.fill)
        (h, w), (H, W) = self.size, (image.shape[ya], image.shape[xa])
        if h > H or w > W:
            raise DataError(f"RandomCrop size {(h, w)} is larger than the padded image {(H, W)}")
        g = rng if rng is not None else self._rng
        top, left = int(g.integers(0, H - h + 1)), int(g.integers(0, W - w + 1))
        return _crop(image, top, left, h, w, ya, xa)


class RandomResizedCrop(Transform):
    """Crops a random region of `scale` × the image area and aspect ratio in `ratio`
    (log-uniform), then resizes it to `size` — torchvision's algorithm: ten tries, then a
    centre crop clamped to the ratio range."""

    def __init__(self, size: int | Sequence[int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bilinear",
                 layout: str = "HWC", rng: np.random.Generator | int | None = None):
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise DataError(f"RandomResizedCrop needs 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]; "
                            f"got scale={scale}, ratio={ratio}")
        self.size, self.scale, self.ratio = _size2(size, "RandomResizedCrop"), tuple(scale), tuple(ratio)
        self.interpolation, self.layout, self._rng = interpolation, layout, _generator(rng)

    def region(self, height: int, width: int, rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the region to crop from a `height` × `width` image."""
        g = rng if rng is not None else self._rng
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * g.uniform(*self.scale)
            aspect = math.exp(g.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(g.integers(0, height - h + 1)), int(g.integers(0, width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image, rng=None):
        image = np.asarray(image)
        ya, xa = _spatial_axes(image, self.layout, "RandomResizedCrop")
        top, left, h, w = self.region(image.shape[ya], image.shape[xa], rng)
        return resize(_crop(image, top, left, h, w, ya, xa), self.size, self.layout, self.interpolation)
