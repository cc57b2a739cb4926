"""Data: sources (folder / CSV / arrays / built-in), splits, albumentations pipelines, the datamodule.

``ImageDataModule`` (:mod:`~visiontune.data.datamodule`, which imports Lightning) and ``ImageDataset``
(:mod:`~visiontune.data.dataset`) load on first use, so ``visiontune check-data`` (:mod:`~visiontune.data.checks`)
runs without importing Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .sources import BUILTIN_DATASETS, DataError, Samples, read_source, register_dataset

__all__ = ["BUILTIN_DATASETS", "DataError", "ImageDataModule", "ImageDataset", "Samples", "read_source",
           "register_dataset"]


def __getattr__(name: str) -> Any:
    if name == "ImageDataModule":
        from .datamodule import ImageDataModule as value
    elif name == "ImageDataset":
        from .dataset import ImageDataset as value
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from .datamodule import ImageDataModule  # noqa: F401
    from .dataset import ImageDataset  # noqa: F401
