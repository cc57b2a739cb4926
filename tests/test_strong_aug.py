"""Weak / strong albumentations pipelines: shapes, dtypes, normalisation, seeding, options."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from visiontune.data.strong import STRONG_OPS, seed_transform, strong_transform, weak_transform

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.5)


def _img(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _run(t: A.Compose, img: np.ndarray, seed: int, n: int = 4) -> torch.Tensor:
    seed_transform(t, seed)
    return torch.stack([t(image=img)["image"] for _ in range(n)])


@pytest.mark.parametrize("make", [weak_transform, strong_transform])
def test_output_shape_dtype_and_size_tuple(make):
    img = _img()
    out = make(32, MEAN, STD)(image=img)["image"]
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3, 32, 32)
    out = make((24, 40), MEAN, STD)(image=img)["image"]
    assert out.shape == (3, 24, 40)


@pytest.mark.parametrize("make", [weak_transform, strong_transform])
def test_same_seed_same_output_different_seed_different(make):
    t = make(32, MEAN, STD)
    img = _img()
    a, b, c = _run(t, img, 7), _run(t, img, 7), _run(t, img, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1]) or not torch.equal(a[1], a[2])  # draws vary within a run


def test_weak_normalises_per_channel_with_mean_std():
    t = weak_transform(16, MEAN, STD, translate=0.0)
    img = np.zeros((16, 16, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 0, 51
    out = t(image=img)["image"]  # constant image: flip changes nothing
    expected = torch.tensor([(1.0 - 0.5) / 0.25, (0.0 - 0.4) / 0.2, (0.2 - 0.3) / 0.5])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(out, expected[:, None, None].expand(3, 16, 16), atol=1e-5)


def test_weak_is_only_flip_and_translate():
    # translate=0: each output is the resized image or its mirror
    img = _img(16, 16)
    t = weak_transform(16, (0.0,) * 3, (1.0,) * 3, translate=0.0)
    seed_transform(t, 0)
    base = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    seen = set()
    for _ in range(12):
        out = t(image=img)["image"]
        if torch.allclose(out, base, atol=1e-6):
            seen.add("id")
        elif torch.allclose(out, base.flip(-1), atol=1e-6):
            seen.add("flip")
        else:
            raise AssertionError("weak transform did something besides a flip")
    assert seen == {"id", "flip"}


def test_strong_changes_content_that_weak_keeps():
    # rows vary, columns do not: a horizontal flip is the identity, so weak (no shift) == input
    ramp = np.linspace(20, 230, 32).astype(np.uint8)
    img = np.repeat(ramp[:, None, None], 32, axis=1).repeat(3, axis=2).copy()
    img[..., 1] //= 2
    base = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    weak = _run(weak_transform(32, (0.0,) * 3, (1.0,) * 3, translate=0.0), img, 0, n=8)
    assert torch.allclose(weak, base.expand_as(weak), atol=1e-6)
    t = strong_transform(32, (0.0,) * 3, (1.0,) * 3, magnitude=9, cutout=0.0, translate=0.0)
    strong = _run(t, img, 0, n=8)
    changed = ((strong - base).abs().mean(dim=(1, 2, 3)) > 0.02).sum().item()
    assert changed >= 6  # two ops at magnitude 9: only identity-like pairs leave it (nearly) as is


def test_cutout_fills_a_gray_square_and_zero_disables_it():
    img = np.zeros((32, 32, 3), np.uint8)  # black image: the hole is the only gray
    t = strong_transform(32, (0.0,) * 3, (1.0,) * 3, num_ops=0, cutout=0.5, translate=0.0)
    seed_transform(t, 0)
    out = t(image=img)["image"]
    gray = (out - 127 / 255).abs().amax(0) < 1e-6
    assert gray.sum().item() == 16 * 16  # side 0.5 * 32, placed inside the image
    rows, cols = gray.any(1).nonzero(), gray.any(0).nonzero()
    assert gray.sum().item() == len(rows) * len(cols)  # one rectangle
    off = strong_transform(32, (0.0,) * 3, (1.0,) * 3, num_ops=0, cutout=0.0, translate=0.0)
    assert torch.equal(off(image=img)["image"], torch.zeros(3, 32, 32))


def test_every_op_runs_with_random_fixed_and_extreme_magnitudes():
    img = _img(24, 24)
    assert len(STRONG_OPS) >= 12
    for name, make in STRONG_OPS.items():
        for m in (None, 0.0, 0.5, 1.0):
            out = A.Compose([make(m)])(image=img)["image"]
            assert out.shape == img.shape and out.dtype == np.uint8, (name, m)
    # magnitude 0 leaves the geometric and colour ops as identities
    for name in ("rotate", "shear_x", "translate_y", "brightness", "contrast", "color", "posterize", "sharpness"):
        out = A.Compose([STRONG_OPS[name](0.0)])(image=img)["image"]
        assert np.array_equal(out, img), name


def test_options_are_validated():
    with pytest.raises(ValueError, match="num_ops"):
        strong_transform(32, MEAN, STD, num_ops=99)
    with pytest.raises(ValueError, match="magnitude"):
        strong_transform(32, MEAN, STD, magnitude=11)
    with pytest.raises(ValueError, match="cutout"):
        strong_transform(32, MEAN, STD, cutout=1.5)
    with pytest.raises(ValueError, match="translate"):
        weak_transform(32, MEAN, STD, translate=-0.1)
    with pytest.raises(ValueError, match="std"):
        weak_transform(32, MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(TypeError, match="set_random_seed"):
        seed_transform(object(), 0)  # type: ignore[arg-type]
