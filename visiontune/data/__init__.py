"""Data: sources (folder / CSV / arrays / built-in), splits, albumentations pipelines, the datamodule.

``ImageDataModule`` / ``ImageDataset`` (:mod:`~visiontune.data.datamodule`, which imports Lightning) load on
first use, so ``visiontune check-data`` (:mod:`~visiontune.data.checks`) runs without importing Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .sources import BUILTIN_DATASETS, DataError, Samples, read_source, register_dataset

__all__ = ["BUILTIN_DATASETS", "DataError", "ImageDataModule", "ImageDataset", "Samples", "read_source",
           "register_dataset"]


def __getattr__(name: str) -> Any:
    if name in ("ImageDataModule", "ImageDataset"):
        from . import datamodule

        value = getattr(datamodule, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .datamodule import ImageDataModule, ImageDataset  # noqa: F401
