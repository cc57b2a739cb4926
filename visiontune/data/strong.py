"""Weak and strong albumentations pipelines for FixMatch-style semi-supervision.

* **weak** (the paper's "flip-and-shift"): resize, horizontal flip, random translation by up to
  ``translate`` of the side (reflect-pad then random crop), normalise, CHW float tensor.
* **strong** (RandAugment + Cutout): the weak geometry, then ``num_ops`` distinct ops drawn per image
  from :data:`STRONG_OPS` (14 ops, the FixMatch RandAugment list), each with its own random magnitude
  unless one is fixed, then one square Cutout hole, normalise, CHW float tensor.

Inputs are ``HxWx3`` ``uint8`` numpy images; outputs are ``3xSxS`` ``float32`` tensors (via
albumentations' ``ToTensorV2``).

Albumentations pipelines draw from their **own** random generators, not from torch's or numpy's
global ones: seeding ``torch.manual_seed`` does not make them reproducible. Seed them with
:func:`seed_transform` (in a DataLoader ``worker_init_fn``, on the dataset's own copy found via
``torch.utils.data.get_worker_info().dataset``, with a per-worker seed),
otherwise every run, and every worker, draws different augmentations.

Example:
    >>> import numpy as np
    >>> from visiontune.data.strong import strong_transform, seed_transform
    >>> t = strong_transform(32, mean=(0.5,) * 3, std=(0.5,) * 3)
    >>> seed_transform(t, 0)
    >>> x = t(image=np.zeros((40, 48, 3), np.uint8))["image"]
    >>> tuple(x.shape), x.dtype
    ((3, 32, 32), torch.float32)
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before the import: no network check offline

from typing import Callable, Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

__all__ = [
    "MAX_MAGNITUDE",
    "STRONG_OPS",
    "seed_transform",
    "strong_transform",
    "weak_transform",
]

MAX_MAGNITUDE = 10.0
"""RandAugment's magnitude scale: ``magnitude`` runs from 0 (identity) to 10 (strongest)."""

_FILL = 127  # mid-gray for pixels uncovered by affine ops and for Cutout, as in FixMatch


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        h = w = size
    else:
        if len(size) != 2:
            raise ValueError(f"size must be an int or (height, width); got {size!r}")
        h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive; got {size!r}")
    return h, w


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB); got mean={mean!r}, std={std!r}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be > 0; got {std!r}")


def _geometry(h: int, w: int, translate: float, hflip: bool = True) -> list[A.BasicTransform]:
    """Resize, flip (if ``hflip``), translate by reflect-pad + random crop (FixMatch's weak augmentation)."""
    if not 0.0 <= translate < 1.0:
        raise ValueError(f"translate must be in [0, 1) (fraction of the side); got {translate}")
    ops: list[A.BasicTransform] = [A.Resize(h, w)] + ([A.HorizontalFlip(p=0.5)] if hflip else [])
    pad_h, pad_w = round(h * translate), round(w * translate)
    if pad_h or pad_w:
        ops += [
            A.PadIfNeeded(h + 2 * pad_h, w + 2 * pad_w, border_mode=cv2.BORDER_REFLECT_101),
            A.RandomCrop(h, w),
        ]
    return ops


def _finish(mean: Sequence[float], std: Sequence[float]) -> list[A.BasicTransform]:
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]


def weak_transform(
    size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    translate: float = 0.125,
    hflip: bool = True,
) -> A.Compose:
    """The weak (pseudo-labelling) augmentation: flip + translate, normalise, to tensor.

    Args:
        size: output side, or ``(height, width)``; the image is resized to it first.
        mean: per-channel mean in [0, 1] units (timm's ``pretrained_cfg['mean']``).
        std: per-channel std in [0, 1] units.
        translate: largest shift as a fraction of the side (0.125 = FixMatch's 4 px of 32);
            implemented as reflect padding then a random crop. 0 disables it.
        hflip: random horizontal flips (turn off for digits, text, ...).

    Returns:
        An ``A.Compose``; call it as ``t(image=hwc_uint8)["image"]`` to get a ``3xHxW`` float tensor.

    Example:
        >>> import numpy as np
        >>> t = weak_transform(32, (0.5,) * 3, (0.5,) * 3)
        >>> t(image=np.zeros((32, 32, 3), np.uint8))["image"].shape
        torch.Size([3, 32, 32])
    """
    h, w = _pair(size)
    _check_stats(mean, std)
    return A.Compose(_geometry(h, w, translate, hflip) + _finish(mean, std))


# --- RandAugment ops -------------------------------------------------------------------------
# Each factory maps a magnitude to an albumentations transform. ``m`` is either a fraction in
# [0, 1] of the op's strongest setting (fixed magnitude) or None (random per image: the op samples
# uniformly over its whole range, both signs for signed ops, which is FixMatch's RandAugment with
# random magnitude).


def _signed(make: Callable[[tuple[float, float]], A.BasicTransform], top: float, m: float | None):
    """A signed op: random sign, |value| = m * top (or uniform in [-top, top] when m is None)."""
    if m is None:
        return make((-top, top))
    v = m * top
    return A.OneOf([make((-v, -v)), make((v, v))], p=1.0)


def _unsigned(make: Callable[[tuple[float, float]], A.BasicTransform], lo: float, hi: float, m):
    """An unsigned op whose strength goes from ``lo`` (m=0) to ``hi`` (m=1)."""
    if m is None:
        return make((min(lo, hi), max(lo, hi)))
    v = lo + m * (hi - lo)
    return make((v, v))


def _affine(**kw) -> A.Affine:
    return A.Affine(**kw, border_mode=cv2.BORDER_CONSTANT, fill=_FILL, p=1.0)


STRONG_OPS: dict[str, Callable[[float | None], A.BasicTransform]] = {
    "identity": lambda m: A.NoOp(p=1.0),
    "autocontrast": lambda m: A.AutoContrast(p=1.0),
    "equalize": lambda m: A.Equalize(p=1.0),
    "brightness": lambda m: _signed(
        lambda r: A.RandomBrightnessContrast(brightness_limit=r, contrast_limit=(0, 0), p=1.0), 0.5, m
    ),
    "contrast": lambda m: _signed(
        lambda r: A.RandomBrightnessContrast(brightness_limit=(0, 0), contrast_limit=r, p=1.0), 0.5, m
    ),
    "color": lambda m: _signed(
        lambda r: A.ColorJitter(
            brightness=(1, 1), contrast=(1, 1), saturation=(1 + r[0], 1 + r[1]), hue=(0, 0), p=1.0
        ),
        0.9,
        m,
    ),
    "posterize": lambda m: _unsigned(
        lambda r: A.Posterize(num_bits=(round(r[0]), round(r[1])), p=1.0), 8, 4, m
    ),
    "solarize": lambda m: _unsigned(lambda r: A.Solarize(threshold_range=r, p=1.0), 1.0, 0.0, m),
    "sharpness": lambda m: _unsigned(
        lambda r: A.Sharpen(alpha=r, lightness=(1.0, 1.0), p=1.0), 0.0, 0.9, m
    ),
    "rotate": lambda m: _signed(lambda r: _affine(rotate=r), 30.0, m),
    "shear_x": lambda m: _signed(lambda r: _affine(shear={"x": r, "y": (0, 0)}), 17.0, m),
    "shear_y": lambda m: _signed(lambda r: _affine(shear={"x": (0, 0), "y": r}), 17.0, m),
    "translate_x": lambda m: _signed(
        lambda r: _affine(translate_percent={"x": r, "y": (0, 0)}), 0.3, m
    ),
    "translate_y": lambda m: _signed(
        lambda r: _affine(translate_percent={"x": (0, 0), "y": r}), 0.3, m
    ),
}
"""RandAugment op factories (FixMatch's list), keyed by name; each takes a magnitude fraction in
[0, 1] or None (random per image) and returns an albumentations transform applied with p=1."""


def strong_transform(
    size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    num_ops: int = 2,
    magnitude: float | None = None,
    cutout: float = 0.5,
    translate: float = 0.125,
    hflip: bool = True,
) -> A.Compose:
    """The strong (consistency-target) augmentation: weak geometry + RandAugment + Cutout.

    Args:
        size: output side, or ``(height, width)``.
        mean: per-channel mean in [0, 1] units.
        std: per-channel std in [0, 1] units.
        num_ops: distinct ops drawn per image from :data:`STRONG_OPS` (0..14); RandAugment's N.
        magnitude: RandAugment's M on its 0..10 scale, the same for every op; signed ops (rotate,
            shear, translate, brightness, contrast, color) get a random sign. ``None`` (default,
            FixMatch's "RandAugment with random magnitude"): every op draws its own strength
            uniformly over its range, per image.
        cutout: side of the one square Cutout hole as a fraction of the image side, always applied
            (FixMatch: 0.5), filled with gray 127; 0 disables it.
        translate: flip-and-shift translation, as in :func:`weak_transform`.
        hflip: random horizontal flips, as in :func:`weak_transform`.

    Returns:
        An ``A.Compose``; ``t(image=hwc_uint8)["image"]`` is a ``3xHxW`` float32 tensor.

    Example:
        >>> import numpy as np
        >>> t = strong_transform(32, (0.5,) * 3, (0.5,) * 3, num_ops=2, magnitude=9)
        >>> t(image=np.zeros((64, 64, 3), np.uint8))["image"].shape
        torch.Size([3, 32, 32])
    """
    h, w = _pair(size)
    _check_stats(mean, std)
    if not isinstance(num_ops, int) or not 0 <= num_ops <= len(STRONG_OPS):
        raise ValueError(f"num_ops must be an int in [0, {len(STRONG_OPS)}]; got {num_ops!r}")
    if magnitude is not None and not 0.0 <= magnitude <= MAX_MAGNITUDE:
        raise ValueError(f"magnitude must be None or in [0, {MAX_MAGNITUDE:g}]; got {magnitude}")
    if not 0.0 <= cutout <= 1.0:
        raise ValueError(f"cutout must be in [0, 1] (fraction of the side); got {cutout}")
    m = None if magnitude is None else magnitude / MAX_MAGNITUDE
    ops: list[A.BasicTransform] = _geometry(h, w, translate, hflip)
    if num_ops:
        ops.append(A.SomeOf([make(m) for make in STRONG_OPS.values()], n=num_ops, replace=False, p=1.0))
    if cutout > 0:
        ops.append(
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(cutout, cutout),
                hole_width_range=(cutout, cutout),
                fill=_FILL,
                p=1.0,
            )
        )
    return A.Compose(ops + _finish(mean, std))


def seed_transform(transform: A.BaseCompose, seed: int | None) -> None:
    """Seed an albumentations pipeline's own random generators (python and numpy) in place.

    Uses ``Compose.set_random_seed`` (albumentations >= 2.0), which reseeds the pipeline and every
    nested transform, including ``SomeOf``'s op choice. The same seed gives the same sequence of
    augmentations; ``None`` reseeds from OS entropy.

    Args:
        transform: a pipeline from :func:`weak_transform` / :func:`strong_transform` (any Compose).
        seed: integer seed, or None.

    Example:
        >>> import numpy as np
        >>> t = weak_transform(16, (0.5,) * 3, (0.5,) * 3)
        >>> img = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
        >>> seed_transform(t, 1); a = t(image=img)["image"]
        >>> seed_transform(t, 1); b = t(image=img)["image"]
        >>> bool((a == b).all())
        True
    """
    if not hasattr(transform, "set_random_seed"):
        raise TypeError(
            f"seed_transform needs an albumentations Compose with set_random_seed; "
            f"got {type(transform).__name__}"
        )
    transform.set_random_seed(seed)

