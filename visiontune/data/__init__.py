"""Data: sources (folder / CSV / arrays / built-in), splits, albumentations pipelines, the datamodule."""

from .datamodule import ImageDataModule, ImageDataset
from .sources import BUILTIN_DATASETS, DataError, Samples, read_source, register_dataset

__all__ = ["BUILTIN_DATASETS", "DataError", "ImageDataModule", "ImageDataset", "Samples", "read_source",
           "register_dataset"]
