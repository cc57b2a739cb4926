"""Albumentations pipelines: eval (resize + normalise) and train (random resized crop, flip, TrivialAugment).

Weak/strong pipelines for semi-supervised training live in :mod:`visiontune.data.strong`.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import

from collections.abc import Sequence  # noqa: E402

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

__all__ = ["AUGMENTS", "eval_transform", "train_transform", "seed_transform"]

AUGMENTS = ("none", "trivial")
"""``augment`` choices of :func:`train_transform`: ``"trivial"`` adds one TrivialAugment op per image."""

_INTERP = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST,
           "area": cv2.INTER_AREA}


def _interp(name: str) -> int:
    return _INTERP.get(name, cv2.INTER_LINEAR)


def eval_transform(
    size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bilinear"
) -> A.Compose:
    """Resize to ``size``×``size`` and normalise with the backbone's mean/std; returns CHW float tensors.

    Example:
        >>> import numpy as np
        >>> t = eval_transform(32, (0.5,) * 3, (0.5,) * 3)
        >>> t(image=np.zeros((8, 8, 3), np.uint8))["image"].shape
        torch.Size([3, 32, 32])
    """
    return A.Compose([
        A.Resize(size, size, interpolation=_interp(interpolation)),
        A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
        ToTensorV2(),
    ])


def train_transform(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    scale: tuple[float, float] = (0.6, 1.0),
    hflip: bool = True,
    interpolation: str = "bilinear",
    augment: str = "none",
) -> A.Compose:
    """Random resized crop (``scale`` of the area), optional horizontal flip, optional TrivialAugment, normalise.

    Args:
        size: output side in pixels.
        mean, std: normalisation (the backbone's).
        scale: crop area range; ``(1.0, 1.0)`` disables cropping (a plain resize).
        hflip: random horizontal flip (turn off for text, digits, ...).
        interpolation: resize filter.
        augment: ``"trivial"``: TrivialAugment (Müller & Hutter 2021): one op per image, drawn uniformly
            from the RandAugment list (:data:`visiontune.data.strong.STRONG_OPS`: colour, contrast,
            posterize, rotate, shear, ...), at a magnitude drawn uniformly over its whole range;
            ``"none"``: crop and flip only.

    Example:
        >>> import numpy as np
        >>> t = train_transform(32, (0.5,) * 3, (0.5,) * 3, augment="trivial")
        >>> t(image=np.zeros((40, 48, 3), np.uint8))["image"].shape
        torch.Size([3, 32, 32])
    """
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    ops: list = []
    if tuple(scale) == (1.0, 1.0):
        ops.append(A.Resize(size, size, interpolation=_interp(interpolation)))
    else:
        ops.append(A.RandomResizedCrop(size=(size, size), scale=tuple(scale), interpolation=_interp(interpolation)))
    if hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    if augment == "trivial":
        from .strong import STRONG_OPS

        ops.append(A.OneOf([make(None) for make in STRONG_OPS.values()], p=1.0))
    ops += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(ops)


def seed_transform(transform: object, seed: int) -> None:
    """Seed an albumentations pipeline's own RNG (it does not follow numpy/torch seeds)."""
    setter = getattr(transform, "set_random_seed", None)
    if setter is not None:
        setter(int(seed) % (2**32))
