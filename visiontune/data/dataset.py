"""``ImageDataset`` (samples + albumentations pipelines, augmentation seeded per item and epoch) and the
loader pieces that keep a run's batches a function of its seed and epoch: :class:`EpochShuffleSampler`,
:class:`EpochLoader`, :func:`worker_init`. :class:`~visiontune.data.datamodule.ImageDataModule` builds them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .decoded import DecodedImages
from .images import DEFAULT_MAX_PIXELS
from .sources import Samples
from .transforms import seed_transform

__all__ = ["EpochLoader", "EpochShuffleSampler", "ImageDataset", "worker_init"]


class ImageDataset(Dataset):
    """Samples + transform(s). Returns ``(image, label)``; with several transforms, ``(view1, view2, ..., label)``.

    Args:
        samples: items and labels.
        transforms: one albumentations pipeline, or a sequence giving one view each.
        return_index: return the item index instead of the label (prediction).
        with_index: also return the item index after the label (``-1`` = unknown), e.g. the unlabeled pool:
            ``(weak, strong, label, index)``; FlexMatch tracks pool samples by index.
        max_pixels: decompression-bomb limit for files.
        decode_side: files are decoded reduced to this short side (JPEGs by the decoder's DCT scaling, then an
            area resize; ``None``: full size), see :mod:`visiontune.data.decoded`.
        cache_images: keep the decoded images in memory (up to a byte budget), so later epochs do not decode.
        images: share the decoded images of another dataset over the same samples (an evaluation view of the
            training set); ``decode_side`` and ``cache_images`` are then that dataset's.
    """

    def __init__(
        self,
        samples: Samples,
        transforms: Callable | Sequence[Callable],
        *,
        return_index: bool = False,
        with_index: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        decode_side: int | None = None,
        cache_images: bool = False,
        images: DecodedImages | None = None,
    ) -> None:
        self.samples = samples
        if images is not None and not _same_items(images.items, samples.items):
            raise ValueError("images= must decode the same samples.items as this dataset")
        self.images = images or DecodedImages(samples.items, side=decode_side, cache=cache_images,
                                              max_pixels=max_pixels)
        self.multi = isinstance(transforms, (list, tuple))
        self.transforms = list(transforms) if self.multi else [transforms]
        self.return_index = return_index
        self.with_index = with_index
        self.max_pixels = max_pixels
        self.seed: int | None = None
        # the epoch lives in shared memory: worker processes (persistent or not) see set_epoch at once
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def reseed(self, seed: int) -> None:
        """Make augmentation a function of ``(seed, epoch, index, view)`` only.

        Every item's pipelines are reseeded from those four numbers before it is transformed, so the
        augmentations of a run do not depend on the number of workers, on which worker loads an item,
        on the process (DDP), or on where a resumed run restarted: only on the seed and the epoch.
        """
        self.seed = int(seed)
        for k, t in enumerate(self.transforms):
            seed_transform(t, seed * 7919 + k)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def load(self, i: int) -> np.ndarray:
        """Item ``i`` as an ``HxWx3`` uint8 array (decoded, reduced to ``decode_side``, from the cache if held)."""
        return self.images[i]

    def __getitem__(self, i: int):
        image = self.load(i)
        if self.seed is not None:
            epoch = int(self._epoch)
            for k, t in enumerate(self.transforms):
                seed_transform(t, _item_seed(self.seed, epoch, i, k))
        views = [t(image=image)["image"] for t in self.transforms]
        target = i if self.return_index else int(self.samples.labels[i])
        out = (*views, target) if self.multi else (views[0], target)
        return (*out, i) if self.with_index else out


def _same_items(a: Sequence, b: Sequence) -> bool:
    """The same list, or equal file items in the same order (arrays must be the very same objects)."""
    if a is b:
        return True
    return len(a) == len(b) and all(
        x is y or (not isinstance(x, np.ndarray) and not isinstance(y, np.ndarray) and str(x) == str(y))
        for x, y in zip(a, b))


def _item_seed(seed: int, epoch: int, index: int, view: int) -> int:
    return int(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, index, view]).generate_state(1)[0])


def worker_init(worker_id: int) -> None:
    """A DataLoader's ``worker_init_fn``: seed numpy/random per worker; unseeded datasets also get per-worker
    pipeline seeds."""
    info = torch.utils.data.get_worker_info()
    seed = info.seed % (2**32)
    np.random.seed(seed)
    import random

    random.seed(seed)
    ds = info.dataset
    if getattr(ds, "seed", None) is None and hasattr(ds, "transforms"):
        # no per-item seeds: at least keep forked workers from repeating each other's augmentations
        for k, t in enumerate(ds.transforms):
            seed_transform(t, seed * 7919 + k)


class _LazyIterator:
    """Creates the real DataLoader iterator at the first ``next()``, not at ``iter()``."""

    def __init__(self, start: Callable[[], Any]) -> None:
        self._start, self._it = start, None

    def __iter__(self) -> "_LazyIterator":
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = self._start()
        return next(self._it)


class EpochLoader(DataLoader):
    """A DataLoader whose workers start drawing indices at the first batch request, not at ``iter()``.

    Why: on resume, Lightning creates the training iterator before it restores the loop state (to
    count batches) and does not call ``iter()`` again for the first resumed epoch. With worker
    processes, ``iter()`` immediately prefetches index batches from the sampler, i.e. epoch 0's order,
    although the epoch about to run is a later one. Deferring to the first ``next()`` lets
    ``sampler.set_epoch`` (called by Lightning at every epoch start) take effect first.
    """

    def __iter__(self):  # type: ignore[override]
        return _LazyIterator(super().__iter__)


class EpochShuffleSampler(DistributedSampler):
    """Shuffles with ``seed + epoch`` (not a running generator), and tells the dataset the epoch.

    The order of epoch ``e`` is a function of the seed and ``e`` only, so a run resumed from a checkpoint at
    the end of epoch ``e - 1`` sees exactly the batches an uninterrupted run sees. It is a
    ``DistributedSampler``: with ``num_replicas > 1`` each process gets its share, and Lightning keeps it
    instead of injecting its own. Lightning calls :meth:`set_epoch` before every training epoch.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        return super().__iter__()
