"""Image transforms: shapes, values against hand computation and torch, determinism under a seed."""

import numpy as np
import pytest
import torch

from luoshu.data import DataError
from luoshu.data.transforms import (
    CenterCrop,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensor,
    resize,
)


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)


def test_to_tensor_hwc_uint8_to_chw_unit_float(image):
    out = ToTensor()(image)
    assert out.shape == (3, 6, 8) and out.dtype == np.float32
    assert out[2, 1, 5] == pytest.approx(image[1, 5, 2] / 255.0)
    np.testing.assert_allclose(out, image.transpose(2, 0, 1) / 255.0, rtol=1e-6)
    gray = ToTensor()(np.array([[0, 255]], dtype=np.uint8))
    np.testing.assert_array_equal(gray, [[[0.0, 1.0]]])
    np.testing.assert_array_equal(ToTensor()(np.full((2, 2, 1), 3.0)), np.full((1, 2, 2), 3.0, np.float32))


def test_normalize_per_channel_by_hand():
    x = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    out = Normalize(mean=[1, 2, 3], std=[2, 4, 0.5])(x)
    assert out[0, 1, 1] == pytest.approx((3 - 1) / 2)
    assert out[1, 0, 0] == pytest.approx((4 - 2) / 4)
    assert out[2, 0, 1] == pytest.approx((9 - 3) / 0.5)
    with pytest.raises(DataError, match="2 values for an image with 3 channels"):
        Normalize([0, 0], [1, 1])(x)
    with pytest.raises(DataError, match="non-zero"):
        Normalize(0, 0)


def test_horizontal_flip_and_seed_determinism(image):
    np.testing.assert_array_equal(RandomHorizontalFlip(p=1.0)(image), image[:, ::-1])
    np.testing.assert_array_equal(RandomHorizontalFlip(p=0.0)(image), image)
    chw = image.transpose(2, 0, 1)
    np.testing.assert_array_equal(RandomHorizontalFlip(p=1.0, layout="CHW")(chw), chw[:, :, ::-1])
    a, b = RandomHorizontalFlip(rng=3), RandomHorizontalFlip(rng=3)
    flips_a = [np.array_equal(a(image), image) for _ in range(20)]
    assert flips_a == [np.array_equal(b(image), image) for _ in range(20)]
    assert 0 < sum(flips_a) < 20


def test_random_crop_with_padding(image):
    crop = RandomCrop(6, padding=2, rng=0)
    outs = [crop(image) for _ in range(30)]
    assert all(o.shape == (6, 6, 3) for o in outs)
    again = RandomCrop(6, padding=2, rng=0)
    assert all(np.array_equal(o, again(image)) for o in outs)
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    for o in outs:  # every crop is a window of the zero-padded image
        assert any(np.array_equal(o, padded[t:t + 6, s:s + 6]) for t in range(5) for s in range(7))
    g1, g2 = np.random.default_rng(9), np.random.default_rng(9)
    np.testing.assert_array_equal(RandomCrop(4)(image, rng=g1), RandomCrop(4)(image, rng=g2))
    with pytest.raises(DataError, match=r"larger than the padded image \(6, 8\)"):
        RandomCrop(7)(image)


@pytest.mark.parametrize("out_size", [(3, 5), (9, 13)])
def test_bilinear_resize_matches_torch(out_size):
    x = np.random.default_rng(1).random((2, 6, 8)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=out_size, mode="bilinear",
                                          align_corners=False, antialias=False)[0].numpy()
    np.testing.assert_allclose(resize(x, out_size, layout="CHW"), ref, atol=1e-5)
    hwc = resize(x.transpose(1, 2, 0), out_size, layout="HWC")
    np.testing.assert_allclose(hwc.transpose(2, 0, 1), ref, atol=1e-5)
    ref_nearest = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=out_size, mode="nearest")[0].numpy()
    np.testing.assert_array_equal(resize(x, out_size, layout="CHW", interpolation="nearest"), ref_nearest)


def test_random_resized_crop_shapes_regions_and_determinism(image):
    t = RandomResizedCrop(4, scale=(0.3, 1.0), rng=5)
    outs = [t(image) for _ in range(10)]
    assert all(o.shape == (4, 4, 3) and o.dtype == np.uint8 for o in outs)
    t2 = RandomResizedCrop(4, scale=(0.3, 1.0), rng=5)
    assert all(np.array_equal(o, t2(image)) for o in outs)
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left, h, w = RandomResizedCrop(4, scale=(0.2, 0.6), rng=rng).region(60, 80)
        assert 0 <= top <= 60 - h and 0 <= left <= 80 - w
        assert 0.2 * 4800 * 0.7 <= h * w <= 0.6 * 4800 * 1.3  # rounding of h and w
    # no region fits (scale 1 with a ratio range excluding the image's): the clamped centre crop
    assert RandomResizedCrop(4, scale=(1, 1), ratio=(1, 1), rng=0).region(10, 20) == (0, 5, 10, 10)


def test_compose_resize_center_crop_pipeline(image):
    pipeline = Compose([RandomCrop(6, padding=1), RandomHorizontalFlip(), ToTensor(),
                        Normalize([0.5] * 3, [0.25] * 3)])
    a = pipeline(image, rng=np.random.default_rng(4))
    b = pipeline(image, rng=np.random.default_rng(4))
    assert a.shape == (3, 6, 6) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert Resize((3, 4))(image).shape == (3, 4, 3)
    np.testing.assert_array_equal(CenterCrop((2, 4))(image), image[2:4, 2:6])
    with pytest.raises(DataError, match="HW, HWC or CHW image; got shape"):
        CenterCrop(2)(np.zeros((1, 2, 3, 4)))
