"""Decode each image file once: reduced to the size training needs, kept in memory as uint8.

Every epoch used to decode every file again at full size and resize it in the augmentation. For a set that
fits in memory, :class:`DecodedImages` decodes a file once, reduced so that its short side is ``side`` pixels
(JPEGs already in the decoder, by DCT scaling, then an area resize), and keeps the uint8 array; later epochs pay
only the augmentation. ``ImageDataModule(decode_side=..., cache_images=...)`` sets it up for its datasets, and
the training loader reads the same pixels in every epoch, with or without worker processes (the cache is filled
in the main process, with a thread per core, before workers fork). :func:`shared_decoded` shares one such cache
between every dataset of the process over the same files, so fit then test, or ``compare`` running strategy
after strategy and seed after seed, decode each file once in all.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Union

import numpy as np

from .images import DEFAULT_MAX_PIXELS, BadImageError, load_image

__all__ = ["DecodedImages", "reduce_image", "default_decode_side", "cache_budget_bytes", "shared_decoded",
           "trim_shared", "clear_shared"]

#: the short side images are reduced to, as a multiple of the training ``image_size``: a random-resized crop of
#: 60 % of the area, resized to ``image_size``, needs ``image_size / sqrt(0.6)`` = 1.3x; 2x leaves room.
DECODE_SCALE = 2.0


def default_decode_side(image_size: int) -> int:
    """The short side images are decoded to for training at ``image_size`` (``2 * image_size``).

    Example:
        >>> default_decode_side(96)
        192
    """
    return int(math.ceil(DECODE_SCALE * int(image_size)))


def cache_budget_bytes() -> int:
    """How much memory the decoded-image cache of one dataset may take: a quarter of the machine's memory,
    at most 4 GiB (2 GiB where the memory size is unknown)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2 << 30
    return int(min(4 << 30, total // 4))


def reduce_image(image: np.ndarray, side: Optional[int]) -> np.ndarray:
    """``image`` resized (area interpolation) so that its short side is ``side``; unchanged if it is not
    larger, or if ``side`` is ``None``/0.

    Example:
        >>> reduce_image(np.zeros((400, 300, 3), np.uint8), 150).shape
        (200, 150, 3)
        >>> reduce_image(np.zeros((40, 30, 3), np.uint8), 150).shape
        (40, 30, 3)
    """
    if not side:
        return image
    h, w = image.shape[:2]
    short = min(h, w)
    if short <= side:
        return image
    import cv2

    scale = side / short
    size = (max(side, round(w * scale)), max(side, round(h * scale)))  # cv2 takes (width, height)
    return np.ascontiguousarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA))


class DecodedImages:
    """Decoded, reduced uint8 images of a list of files, kept in memory up to a byte budget.

    Args:
        items: file paths (an in-memory array item is returned as it is, never copied or counted).
        side: the short side files are reduced to (``None``/0: full size).
        cache: keep decoded images in memory (``False``: decode, reduced, on every access).
        max_bytes: memory budget of the cache (default :func:`cache_budget_bytes`); images past it are decoded
            on every access.
        max_pixels: decompression-bomb limit, as in :func:`~visiontune.data.images.load_image`.

    Example:
        >>> import numpy as np
        >>> d = DecodedImages([np.zeros((4, 4, 3), np.uint8)], side=2)
        >>> d[0].shape, d.cached_bytes
        ((4, 4, 3), 0)
    """

    def __init__(
        self,
        items: Sequence[Union[str, os.PathLike, np.ndarray]],
        *,
        side: Optional[int],
        cache: bool = True,
        max_bytes: Optional[int] = None,
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.items = items
        self.side = int(side) if side else None
        self.cache = bool(cache)
        self.max_bytes = cache_budget_bytes() if max_bytes is None else int(max_bytes)
        self.max_pixels = max_pixels
        self.cached_bytes = 0
        self._store: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict:  # worker processes started by spawn get a copy (a lock does not pickle)
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def decode(self, i: int) -> np.ndarray:
        """Item ``i`` decoded and reduced, never from the cache (raises :class:`BadImageError` like ``load_image``)."""
        item = self.items[i]
        if isinstance(item, np.ndarray):
            return item
        return reduce_image(load_image(item, max_pixels=self.max_pixels, min_side=self.side), self.side)

    def __getitem__(self, i: int) -> np.ndarray:
        hit = self._store.get(i)
        if hit is not None:
            return hit
        image = self.decode(i)
        if self.cache and not isinstance(self.items[i], np.ndarray):
            self._keep(i, image)
        return image

    def _keep(self, i: int, image: np.ndarray) -> None:
        with self._lock:
            if i not in self._store and self.cached_bytes + image.nbytes <= self.max_bytes:
                image.setflags(write=False)  # shared by every epoch: an augmentation must not write into it
                self._store[i] = image
                self.cached_bytes += image.nbytes

    @property
    def cached(self) -> int:
        """How many images the cache holds."""
        return len(self._store)

    def fill(self, workers: Optional[int] = None) -> int:
        """Decode every file item into the cache now, ``workers`` threads at a time (default: one per core;
        decoding releases the GIL). Unreadable files are left out (the dataset raises for them when read, as
        without a cache); filling stops at the byte budget. Returns how many images the cache holds.
        """
        if not self.cache:
            return 0
        todo = [i for i, item in enumerate(self.items) if not isinstance(item, np.ndarray) and i not in self._store]

        def one(i: int) -> None:
            if self.cached_bytes >= self.max_bytes:
                return
            try:
                self._keep(i, self.decode(i))
            except BadImageError:
                pass

        workers = workers or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
        if workers == 1 or len(todo) < 2:
            for i in todo:
                one(i)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(one, todo))
        return self.cached


_SHARED: "OrderedDict[tuple, DecodedImages]" = OrderedDict()
_SHARED_LOCK = threading.Lock()


def _file_key(item: Union[str, os.PathLike]) -> tuple:
    path = os.fspath(item)
    try:
        st = os.stat(path)
    except OSError:  # reading it raises later, naming the file
        return (path, -1, -1)
    return (path, st.st_size, st.st_mtime_ns)


def shared_decoded(
    items: Sequence[Union[str, os.PathLike, np.ndarray]],
    *,
    side: Optional[int],
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
) -> DecodedImages:
    """A caching :class:`DecodedImages` of ``items``, the same object for every caller in this process that asks
    for the same files (path, size and modification time) at the same ``side`` and ``max_pixels``.

    A second datamodule over the same folder (``trainer.test`` after ``fit``, ``visiontune compare`` running
    strategy after strategy, seed after seed) reuses what the first one decoded; a file that changed on disk
    is a different key, so it is decoded again. :func:`trim_shared` drops the least recently used sets past one
    cache budget. In-memory array items are never cached, so they get a plain instance of their own.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), "a.png")
        >>> Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
        >>> shared_decoded([path], side=4) is shared_decoded([path], side=4)
        True
    """
    if any(isinstance(item, np.ndarray) for item in items):
        return DecodedImages(items, side=side, cache=True, max_pixels=max_pixels)
    key = (int(side) if side else None, max_pixels, tuple(_file_key(item) for item in items))
    with _SHARED_LOCK:
        hit = _SHARED.get(key)
        if hit is not None:
            _SHARED.move_to_end(key)
            return hit
        made = _SHARED[key] = DecodedImages(items, side=side, cache=True, max_pixels=max_pixels)
    return made


def trim_shared(max_bytes: Optional[int] = None) -> int:
    """Forget the least recently used shared sets until those kept hold at most ``max_bytes`` (default
    :func:`cache_budget_bytes`) of decoded pixels; the newest is always kept. A dataset still using a
    forgotten set keeps it. Returns how many sets are kept."""
    budget = cache_budget_bytes() if max_bytes is None else int(max_bytes)
    with _SHARED_LOCK:
        while len(_SHARED) > 1 and sum(d.cached_bytes for d in _SHARED.values()) > budget:
            _SHARED.popitem(last=False)
        return len(_SHARED)


def clear_shared() -> None:
    """Forget every shared set (the next datamodule decodes its files again; datasets in use keep theirs)."""
    with _SHARED_LOCK:
        _SHARED.clear()
