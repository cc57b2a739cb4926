"""What :class:`~visiontune.ImageDataModule` serves: its loaders, and the views a model or a callback asks for.

The datamodule owns every dataset it serves. A model states what it needs, and the datamodule builds it
(:mod:`visiontune.models.protocols`):

* :meth:`DataViews.request_unlabeled_views`: FixMatch's request (:class:`~visiontune.models.protocols.UnlabeledViews`):
  the unlabeled pool as a weak and a strong view of each image (``unlabeled_transforms``, a user's
  ``[weak, strong]`` pair, wins), ``ratio`` × the labeled batch per step, the pool's known labels in the model's
  class order; kept for every later setup of the datamodule;
* :meth:`DataViews.eval_view` / :meth:`DataViews.serve`: a feature cache extracts from the deterministic view of a
  split and hands back the features its loader serves until ``serve(role, None)``.

:class:`DataViews` is mixed into :class:`~visiontune.ImageDataModule` (it uses the datamodule's options,
``resolved`` normalisation and splits).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .dataset import EpochLoader, EpochShuffleSampler, ImageDataset, worker_init
from .sources import DataError, Samples

if TYPE_CHECKING:  # pragma: no cover
    from ..models.protocols import UnlabeledViews

__all__ = ["DataViews", "check_readable", "labels_in_order"]


class DataViews:
    """Loaders and model-requested views of :class:`~visiontune.ImageDataModule` (see the module docs)."""

    _unlabeled_request: Optional["UnlabeledViews"] = None
    _pool: Optional[Samples] = None  # the unlabeled pool of the last setup (None: no pool)
    _pool_views: Any = None  # its views when nobody asked for others (the training augmentation)
    _served: dict[str, Dataset]  # role -> what its loader yields instead of the images (serve)

    # ------------------------------------------------------------------ unlabeled views
    @property
    def semi_supervised(self) -> bool:
        """Whether a model asked for the unlabeled views (the training loader then yields both parts)."""
        return self._unlabeled_request is not None

    def request_unlabeled_views(self, request: "UnlabeledViews") -> Optional[int]:
        """Serve the unlabeled pool as ``request`` asks (weak and strong views, its ``ratio``, its class order),
        now and at every later setup; returns the pool size (``None`` before setup, which then builds them).

        Raises:
            DataError: the data has no unlabeled pool (``data.unlabeled``, or ``"rest"`` with
                ``labels_per_class``), or none of its images can be read.
        """
        self._unlabeled_request = request
        if getattr(self, "train_set", None) is None:
            return None  # not set up yet: setup builds the views
        self._build_unlabeled_set()
        return len(self.unlabeled_set)

    def _build_unlabeled_set(self) -> None:
        """``unlabeled_set`` from the pool of the last setup: the requested views, or the default ones."""
        request, pool = self._unlabeled_request, self._pool
        if pool is not None and request is None:
            views = self.unlabeled_transforms or self._pool_views
        elif request is not None:
            if pool is None:
                raise DataError("model.semi_supervised needs unlabeled images: set data.unlabeled to a folder, a "
                                "CSV, or 'rest' (with data.labels_per_class) for the labeled data left over")
            pool = labels_in_order(pool, list(request.class_names))
            check_readable(pool)
            views = self.unlabeled_transforms
            if not views or len(views) != 2:  # a user's [weak, strong] pair wins
                from .strong import strong_transform, weak_transform

                res = getattr(self, "resolved", None) or {}
                size = int(res.get("image_size") or 224)
                mean, std = tuple(res.get("mean") or (0.5,) * 3), tuple(res.get("std") or (0.5,) * 3)
                hflip = bool(self.hflip)  # data.hflip=false (digits, text) holds for both views
                views = [weak_transform(size, mean, std, hflip=hflip), strong_transform(size, mean, std, hflip=hflip)]
        else:
            self.unlabeled_set = None
            return
        self.unlabeled_set = self.image_dataset(pool, views, with_index=True, share=self.unlabeled_set)
        self.unlabeled_set.reseed(self.seed + 3)

    # ------------------------------------------------------------------ datasets
    def image_dataset(self, samples: Samples, transforms: Any, *, share: Optional[ImageDataset] = None,
                      **kw: Any) -> ImageDataset:
        """An :class:`ImageDataset` of ``samples`` with the datamodule's decoding options: files decoded once,
        reduced to ``decode_side`` (default twice the image size) and, with ``cache_images``, kept in memory
        (filled now, a thread per core; shared with every other dataset of the process over the same files,
        :func:`~visiontune.data.decoded.shared_decoded`). ``share``: a dataset over the same samples whose decoded
        images to reuse.
        """
        if share is not None and share.samples is samples:
            return ImageDataset(samples, transforms, max_pixels=self.max_pixels, images=share.images, **kw)
        side = self.decode_side
        if side is None:
            from .decoded import default_decode_side

            res = getattr(self, "resolved", None) or {}
            side = default_decode_side(int(res.get("image_size") or self.image_size or 224))
        if not self.cache_images:
            return ImageDataset(samples, transforms, max_pixels=self.max_pixels, decode_side=side or None, **kw)
        from .decoded import shared_decoded, trim_shared

        images = shared_decoded(samples.items, side=side or None, max_pixels=self.max_pixels)
        ds = ImageDataset(samples, transforms, max_pixels=self.max_pixels, images=images, **kw)
        images.fill()
        trim_shared()
        return ds

    # ------------------------------------------------------------------ views for a feature cache
    def eval_view_settings(self) -> dict[str, Any]:
        """The deterministic eval transform's settings: ``image_size``, ``mean``, ``std``, ``interpolation``
        (the model's normalisation inside a Trainer)."""
        size, mean, std, interp = self._resolve_normalisation()
        return {"image_size": size, "mean": list(mean), "std": list(std), "interpolation": interp}

    def eval_view(self, role: str) -> Optional[ImageDataset]:
        """The ``role`` split's images (``train``, ``val``, ``test``) under the eval transform (resize, normalise:
        no random augmentation), or ``None`` without that split."""
        from .transforms import eval_transform

        ds = getattr(self, f"{role}_set", None)
        if ds is None or not hasattr(ds, "samples"):
            return None
        s = self.eval_view_settings()
        return self.image_dataset(ds.samples, eval_transform(s["image_size"], s["mean"], s["std"],
                                                             s["interpolation"]), share=ds)

    def serve(self, role: str, dataset: Optional[Dataset]) -> None:
        """From now on the ``role`` loader yields ``dataset`` (same items and labels as the split, e.g. cached
        features) instead of the images; ``None`` serves the images again. ``<role>_set`` stays the images."""
        if dataset is None:
            self._served.pop(role, None)
        else:
            self._served[role] = dataset

    def served(self, role: str) -> Optional[Dataset]:
        """What the ``role`` loader yields: the dataset handed to :meth:`serve`, else ``<role>_set``."""
        return self._served.get(role, getattr(self, f"{role}_set", None))

    # ------------------------------------------------------------------ loaders
    def loader_workers(self) -> int:
        """Loader worker processes: ``num_workers``, or 0 on ≤ 2 cores, else min(8, cores // 2)."""
        if self.num_workers is not None:
            return self.num_workers
        cores = os.cpu_count() or 1
        return 0 if cores <= 2 else min(8, cores // 2)

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool, seed_offset: int = 0) -> DataLoader:
        workers = self.loader_workers()
        generator = torch.Generator().manual_seed(self.seed + seed_offset)
        sampler = None
        if shuffle:  # order = f(seed, epoch): exact resume at epoch ends, a share per process under DDP
            trainer = getattr(self, "trainer", None)
            replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            sampler = EpochShuffleSampler(ds, num_replicas=replicas, rank=rank, seed=self.seed + seed_offset)
        return (EpochLoader if shuffle else DataLoader)(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            worker_init_fn=worker_init if workers else None,
            generator=generator,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _require(self, role: str) -> Dataset:
        ds = self.served(role)
        if ds is None:
            raise DataError(f"no {role} data: set data.{role}" + (" (or data.train for a split)" if role in ("val", "test") else ""))
        return ds

    def train_dataloader(self):
        train = self._require("train")
        labeled = self._loader(train, min(self.batch_size, len(train)), True)
        if self.semi_supervised and self.unlabeled_set is not None:
            ratio = self.unlabeled_ratio or self._unlabeled_request.ratio or 7
            unl = self._loader(self.unlabeled_set, self.batch_size * ratio, True, seed_offset=1)
            return {"labeled": labeled, "unlabeled": unl}
        return labeled

    def val_dataloader(self):
        return self._loader(self._require("val"), self.batch_size, False)

    def test_dataloader(self):
        return self._loader(self._require("test"), self.batch_size, False)

    def predict_dataloader(self):
        return self._loader(self._require("predict"), self.batch_size, False)


def labels_in_order(pool: Samples, names: list[str]) -> Samples:
    """Re-index the pool's known labels onto the class order ``names`` by name (unknown classes -> -1).

    Example:
        >>> pool = Samples([0, 1], np.array([0, 1]), ["a", "b"])
        >>> labels_in_order(pool, ["b", "c", "a"]).labels.tolist()
        [2, 0]
    """
    if not pool.class_names or list(pool.class_names) == names or not names:
        return pool
    index = {n: i for i, n in enumerate(names)}
    lut = np.asarray([index.get(n, -1) for n in pool.class_names], dtype=np.int64)
    labels = np.where(pool.labels >= 0, lut[np.clip(pool.labels, 0, None)], -1)
    return Samples(pool.items, labels, list(names), pool.origin, dict(pool.extra))


def check_readable(pool: Samples, max_failures: int = 20) -> None:
    """Raise a :class:`~visiontune.DataError` when no image of the unlabeled pool can be read.

    Files are tried in order until one loads (usually the first), so a good pool costs one decode.

    Example:
        >>> check_readable(Samples([np.zeros((8, 8, 3), np.uint8)], np.array([-1]), []))
    """
    from .images import BadImageError, load_image

    failures: list[str] = []
    for item in pool.items:
        if isinstance(item, np.ndarray):
            return
        try:
            load_image(item)
            return
        except BadImageError as err:
            failures.append(f"{err.path}: {err.reason}")
    if not failures:
        raise DataError("the unlabeled pool is empty", "data.unlabeled")
    shown = failures[:max_failures] + ([f"... and {len(failures) - max_failures} more"]
                                       if len(failures) > max_failures else [])
    raise DataError([f"none of the {len(failures)} unlabeled images can be read"] + shown, "data.unlabeled")
