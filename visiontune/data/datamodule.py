"""``ImageDataModule``: folders, CSVs, arrays or built-in datasets → seeded splits → albumentations → loaders.

The datasets and loader pieces it builds are in :mod:`visiontune.data.dataset` (``ImageDataset`` is importable
from here too); its loaders and the views a model asks for (FixMatch's weak and strong views, a feature cache's
deterministic views) in :mod:`visiontune.data.views`. The datamodule owns all of them: models state what they need
(:mod:`visiontune.models.protocols`), nothing writes into it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning as L
import numpy as np

from ..models.protocols import LabelOrder
from .dataset import ImageDataset
from .images import DEFAULT_MAX_PIXELS
from .sources import (
    DataError,
    DataOptionError,
    Samples,
    align_classes,
    class_folders,
    read_source,
    stratified_split,
    take_per_class,
)
from .transforms import AUGMENTS, eval_transform, train_transform
from .validate import class_list_problems, drop_bad_images, find_bad_images, unseen_class_problems
from .views import DataViews

__all__ = ["ImageDataModule", "ImageDataset"]

SourceArg = Optional[Union[str, Path, Any]]


def _folder_classes(source: Any) -> list[str] | None:
    """Class folder names of a folder source that failed to read (to still check val/test against them)."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return class_folders(Path(source)) or None
    return None


class ImageDataModule(DataViews, L.LightningDataModule):
    """Images for training, validation, test, prediction and an optional unlabeled pool.

    Each of ``train``/``val``/``test``/``unlabeled``/``predict`` takes a folder (``root/<class>/*.jpg``),
    a CSV (``path,label``, paths relative to the CSV), a built-in dataset name (``"digits"``) or, from
    Python, an ``(images, labels)`` tuple of numpy arrays. Class names come from the training data.

    Args:
        train: labeled training data.
        val: validation data; ``None`` splits ``val_split`` of ``train`` off (stratified, seeded).
        test: test data; ``None`` splits ``test_split`` of ``train`` off (0 = no test set).
        unlabeled: unlabeled images (folder/CSV, labels ignored), or ``"rest"`` for the training images
            left over by ``labels_per_class``.
        predict: images to predict (folder, with or without class subfolders, or CSV).
        image_size: square input side; ``None`` = the backbone's pretrained input size.
        batch_size: labeled batch size.
        labels_per_class: keep only k labeled training images per class (seeded; recorded in the run).
        val_split, test_split: fractions of ``train`` used when ``val``/``test`` are not given.
        seed: seeds splits, shuffling and augmentation.
        num_workers: loader workers; ``None`` = 0 on ≤ 2 cores, else min(8, cores // 2).
        crop_scale: min and max area of the random resized crop; ``[1, 1]`` = plain resize.
        hflip: random horizontal flips in training.
        augment: ``"none"`` (default): random resized crop and flip only; ``"trivial"``: also one
            TrivialAugment op per training image (colour, contrast, rotate, shear, ... at a random
            strength). Measured on the held-in photo sets at 15 epochs: no gain (0.746 vs 0.779, 0.617 vs
            0.617), so it is not the default; it may pay off in longer runs.
        mean, std: normalisation; ``None`` = the backbone's (from the model, at setup).
        unlabeled_ratio: unlabeled batch = ratio × batch_size (FixMatch μ); ``None`` = the model's μ, or 7.
        max_pixels: images larger than this many pixels are refused (decompression bombs).
        on_bad_image: ``"error"``: at setup, before any training, every file of every split gets the cheap
            scan (header, pixel count, truncation: :func:`~visiontune.data.images.scan_image`) and one
            ``DataError`` lists every bad file with its reason; a file whose damage only decoding shows stops
            the run with a ``BadImageError`` naming it when it is read (``visiontune check-data`` decodes
            everything up front). ``"skip"``: every file of every split is decoded once at setup,
            unreadable ones are dropped and listed (file, reason) in :attr:`bad_image_report` and in
            ``bad_images.json`` in the run directory.
        classes: the class list, in label order; a training/val/test label outside it is an error naming
            the files. ``None`` = the labels found in the training data, sorted.
        decode_side: image files are decoded reduced to this short side (JPEGs by the decoder's DCT scaling,
            then an area resize; never enlarged); ``None`` = twice ``image_size`` (a random-resized crop
            needs 1.3x), ``0`` = full size. Camera-size JPEGs decode several times faster.
        cache_images: keep the decoded (reduced) images in memory, filled at setup with a thread per core, so
            later epochs only augment; up to a quarter of the machine's memory (at most 4 GiB) per split, the
            rest is decoded on every read. See ``benchmarks/data_path.py`` for what it saves.

    Example:
        >>> dm = ImageDataModule(train="digits", image_size=32, batch_size=16, labels_per_class=5)
        >>> dm.setup("fit")
        >>> len(dm.train_set), dm.class_names[:3]
        (50, ['0', '1', '2'])
    """

    def __init__(
        self,
        train: SourceArg = None,
        val: SourceArg = None,
        test: SourceArg = None,
        unlabeled: SourceArg = None,
        predict: SourceArg = None,
        image_size: Optional[int] = None,
        batch_size: int = 32,
        labels_per_class: Optional[int] = None,
        val_split: float = 0.2,
        test_split: float = 0.0,
        seed: int = 0,
        num_workers: Optional[int] = None,
        crop_scale: tuple[float, float] = (0.6, 1.0),
        hflip: bool = True,
        augment: Literal["none", "trivial"] = "none",
        mean: Optional[tuple[float, float, float]] = None,
        std: Optional[tuple[float, float, float]] = None,
        unlabeled_ratio: Optional[int] = None,
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
        on_bad_image: Literal["error", "skip"] = "error",
        classes: Optional[list[str]] = None,
        decode_side: Optional[int] = None,
        cache_images: bool = True,
    ) -> None:
        super().__init__()
        problems = []
        if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
            problems.append(f"image_size must be a positive integer, got {image_size!r}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            problems.append(f"batch_size must be a positive integer, got {batch_size!r}")
        if labels_per_class is not None and (not isinstance(labels_per_class, int) or labels_per_class < 1):
            problems.append(f"labels_per_class must be an integer >= 1, got {labels_per_class!r}")
        for name, v in (("val_split", val_split), ("test_split", test_split)):
            if not 0 <= v < 1:
                problems.append(f"{name} must be in [0, 1), got {v!r}")
        if not (0 < crop_scale[0] <= crop_scale[1] <= 1):
            problems.append(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}")
        if unlabeled_ratio is not None and unlabeled_ratio < 1:
            problems.append(f"unlabeled_ratio (mu) must be >= 1, got {unlabeled_ratio!r}")
        if augment not in AUGMENTS:
            problems.append(f"augment must be one of {', '.join(map(repr, AUGMENTS))}, got {augment!r}")
        if on_bad_image not in ("error", "skip"):
            problems.append(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        if classes is not None and (isinstance(classes, str) or len(set(map(str, classes))) != len(classes)):
            problems.append(f"classes must be a list of distinct class names, got {classes!r}")
        if decode_side is not None and (not isinstance(decode_side, int) or decode_side < 0):
            problems.append(f"decode_side must be an integer >= 0 (0 = decode at full size), got {decode_side!r}")
        if problems:
            raise DataOptionError(problems, "ImageDataModule")
        self.train, self.val, self.test, self.unlabeled, self.predict = train, val, test, unlabeled, predict
        self.image_size = image_size
        self.batch_size = batch_size
        self.labels_per_class = labels_per_class
        self.val_split, self.test_split = val_split, test_split
        self.seed = seed
        self.num_workers = num_workers
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        self.augment = augment
        self.mean, self.std = mean, std
        self.unlabeled_ratio = unlabeled_ratio
        self.max_pixels = max_pixels
        self.on_bad_image = on_bad_image
        self.decode_side, self.cache_images = decode_side, bool(cache_images)
        self.classes = [str(c) for c in classes] if classes is not None else None
        self._bad_images: dict[str, tuple[list[dict[str, Any]], int]] = {}  # role -> (records, files checked)
        self._scan_files = True  # on_bad_image="error": scan every file at setup (check-data decodes them itself)
        self._train_samples: Samples | None = None
        self.train_set = self.val_set = self.test_set = self.unlabeled_set = self.predict_set = None
        self.split: dict[str, list[str]] = {}
        self.unlabeled_transforms: Sequence[Callable] | None = None  # views of the pool (FixMatch: [weak, strong])
        self._served = {}  # role -> what its loader yields instead of the images (views.DataViews.serve)

    # ------------------------------------------------------------------ classes and normalisation
    @property
    def train_samples(self) -> Samples | None:
        if self._train_samples is None and self.train is not None:
            s = read_source(self.train)
            problems = []
            if self.classes is not None:
                problems = class_list_problems(s, self.classes, "train")
                if not problems:
                    s = align_classes(s, self.classes, "train")
            if not problems:
                s = self._checked(s, "train")
                counts = np.bincount(s.labels, minlength=len(s.class_names))
                problems = [f"train: class {c!r} has no " + ("readable " if self.on_bad_image == "skip" else "")
                            + "images" for c, n in zip(s.class_names, counts) if n == 0]
            if problems:
                raise DataError(problems)
            self._train_samples = s
        return self._train_samples

    def _checked(self, samples: Samples, role: str) -> Samples:
        """Under ``on_bad_image="skip"``: decode every file now, drop and record the unreadable ones.

        Under ``"error"``: the cheap scan of every file (:func:`~visiontune.data.images.scan_image`: header, pixel
        count, end-of-data marker; threads), a :class:`DataError` listing every bad file with its reason. Cost:
        ~0.2 ms a file: 2,000 JPEGs 0.4-0.5 s, and 1.2-2 s more for ``setup("fit")`` on 10,000 (0.5 s without
        the scan), measured on a shared 2-core machine.
        """
        if self.on_bad_image != "skip":
            if not self._scan_files:
                return samples
            _, records, _ = find_bad_images(samples, role, max_pixels=self.max_pixels, decode=False)
            if records:
                raise DataError([f"{role}: unreadable image {r['path']}: {r['reason']}" for r in records])
            return samples
        kept, records, checked = drop_bad_images(samples, role, max_pixels=self.max_pixels)
        self._bad_images[role] = (records, checked)
        if records:
            from lightning.pytorch.utilities import rank_zero_warn

            lines = "\n".join(f"  {r['path']}: {r['reason']}" for r in records[:20])
            more = f"\n  ... and {len(records) - 20} more" if len(records) > 20 else ""
            rank_zero_warn(f"on_bad_image='skip': dropped {len(records)} of {checked} {role} images:\n{lines}{more}")
        return kept

    @property
    def bad_image_report(self) -> dict[str, Any]:
        """What ``on_bad_image="skip"`` dropped: ``{"on_bad_image", "checked", "dropped", "bad": [{split, path,
        reason}, ...]}`` (empty lists under ``"error"``)."""
        bad = [r for records, _ in self._bad_images.values() for r in records]
        checked = sum(n for _, n in self._bad_images.values())
        return {"on_bad_image": self.on_bad_image, "checked": checked, "dropped": len(bad), "bad": bad}

    def _write_bad_image_report(self) -> None:
        trainer = getattr(self, "trainer", None)
        if self.on_bad_image != "skip" or trainer is None:
            return
        folder = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if folder and trainer.is_global_zero:
            from ..io import atomic_write_json

            atomic_write_json(Path(folder) / "bad_images.json", self.bad_image_report)

    @property
    def class_names(self) -> list[str] | None:
        """Class names in label order, from the training data (``None`` without training data)."""
        s = self.train_samples
        return list(s.class_names) if s is not None else None

    def use_data_config(self, config: dict[str, Any]) -> "ImageDataModule":
        """Normalise for a backbone outside a Trainer (mean, std, input size, interpolation, as returned by
        :func:`visiontune.data_config`); inside a Trainer the model's config is used.

        Example:
            >>> from visiontune import create_backbone, data_config
            >>> dm = ImageDataModule(train="digits", image_size=32)
            >>> dm.use_data_config(data_config(create_backbone("tf_efficientnet_lite0")))._resolve_normalisation()[1]
            (0.5, 0.5, 0.5)
        """
        self._data_config = dict(config)
        return self

    def _resolve_normalisation(self) -> tuple[int, tuple, tuple, str]:
        cfg: dict[str, Any] = dict(getattr(self, "_data_config", None) or {})
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if module is not None and hasattr(module, "data_config"):
            cfg = module.data_config
        size = self.image_size or (cfg.get("input_size", (3, 224, 224))[-1])
        mean = tuple(self.mean or cfg.get("mean", (0.485, 0.456, 0.406)))
        std = tuple(self.std or cfg.get("std", (0.229, 0.224, 0.225)))
        return int(size), mean, std, cfg.get("interpolation", "bilinear")

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        size, mean, std, interp = self._resolve_normalisation()
        self.resolved = {"image_size": size, "mean": mean, "std": std}
        evaluate = eval_transform(size, mean, std, interp)
        if stage in (None, "fit", "validate", "test") and self.train is not None:
            self._setup_labeled(size, mean, std, interp, evaluate)
        elif stage in ("validate", "test"):
            names = getattr(getattr(self, "trainer", None), "lightning_module", None)
            names = getattr(names, "class_names", None) or self.classes
            problems: list[str] = []
            found = {role: self._read_eval(role, names, problems) for role in ("val", "test")}
            if problems:
                raise DataError(problems)
            for role, s in found.items():
                if s is not None:
                    setattr(self, f"{role}_set", self.image_dataset(s, evaluate))
                    self.split[role] = [s.describe(i) for i in range(len(s))]
        if stage in (None, "predict") and self.predict is not None:
            s = self._checked(read_source(self.predict, labeled=False), "predict")
            self.predict_set = self.image_dataset(s, evaluate, return_index=True)
        self._write_bad_image_report()

    def _read_eval(self, role: str, names: Sequence[str] | None, problems: list[str]) -> Samples | None:
        """Read val/test data, checked against the training classes; problems are appended, not raised."""
        src = getattr(self, role)
        if src is None:
            return None
        try:
            s = read_source(src)
        except DataError as err:
            problems += [f"{role}: {p}" for p in err.problems]
            return None
        if names:
            found = unseen_class_problems(s, list(names), role)
            if self.classes is not None:
                found = class_list_problems(s, self.classes, role)
            if found:
                problems += found
                return None
            s = align_classes(s, list(names), role)
        try:
            return self._checked(s, role)
        except DataError as err:  # unreadable images (on_bad_image="error")
            problems += err.problems
            return None

    def _model_label_order(self, names: list[str], problems: list[str]) -> list[str]:
        """The class order labels must index: the data's own, or the one the model asks for (a model that
        adds classes to a trained one wants its old classes first, then the data's new ones)."""
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        if not isinstance(module, LabelOrder):
            return list(names)
        try:
            return list(module.label_order(list(names)))
        except DataError as err:
            problems += err.problems
            return list(names)

    def _setup_labeled(self, size: int, mean: tuple, std: tuple, interp: str, evaluate: Callable) -> None:
        # every structural problem of train, val and test is collected and raised together
        problems: list[str] = []
        try:
            full = self.train_samples
        except DataError as err:
            problems += [f"train: {p}" if not p.startswith("train: ") else p for p in err.problems]
            full = None
        names = full.class_names if full is not None else self.classes or _folder_classes(self.train)
        order = self._model_label_order(names, problems) if full is not None else names
        test = self._read_eval("test", order, problems)
        val = self._read_eval("val", order, problems)
        external_pool = None  # a folder/CSV pool: its problems too are listed with the others
        if self.unlabeled is not None and not (isinstance(self.unlabeled, str) and self.unlabeled == "rest"):
            try:
                external_pool = self._checked(read_source(self.unlabeled, labeled=False), "unlabeled")
            except DataError as err:
                problems += [p if p.startswith("unlabeled: ") else f"unlabeled: {p}" for p in err.problems]
        if full is None:
            raise DataError(problems)
        own_labels = full.labels  # splits per class of the data; labels then index the model's order
        if order != names:
            full = align_classes(full, list(order), "train")
        idx = np.arange(len(full))
        if self.test is None and self.test_split > 0:
            keep, take = stratified_split(full.labels, self.test_split, self.seed)
            test, idx = full.subset(take), keep
        if self.val is None and self.val_split > 0:
            frac = self.val_split / (1 - self.test_split) if self.test is None else self.val_split
            keep, take = stratified_split(full.labels[idx], frac, self.seed + 1)
            val, idx = full.subset(idx[take]), idx[keep]
        rest = np.array([], dtype=np.int64)
        if self.labels_per_class is not None:
            try:
                chosen, rest_local = take_per_class(own_labels[idx], self.labels_per_class, self.seed + 2, names)
                idx, rest = idx[chosen], idx[rest_local]
            except DataError as err:
                problems += [f"train: {p}" for p in err.problems]
        if problems:
            raise DataError(problems)
        train = full.subset(idx)
        augment = train_transform(size, mean, std, scale=self.crop_scale, hflip=self.hflip, interpolation=interp,
                                  augment=self.augment)
        self.train_set = self.image_dataset(train, augment)
        self.train_set.reseed(self.seed)
        self.val_set = self.image_dataset(val, evaluate) if val is not None else None
        self.test_set = self.image_dataset(test, evaluate) if test is not None else None
        self.split = {"train": [train.describe(i) for i in range(len(train))]}
        if val is not None:
            self.split["val"] = [val.describe(i) for i in range(len(val))]
        if test is not None:
            self.split["test"] = [test.describe(i) for i in range(len(test))]
        pool = None
        if isinstance(self.unlabeled, str) and self.unlabeled == "rest":
            if self.labels_per_class is None:
                raise DataError("unlabeled='rest' needs labels_per_class (the rest of each class is the pool)")
            pool = full.subset(rest)  # true labels kept: pseudo-label accuracy can be measured
        elif self.unlabeled is not None:
            pool = external_pool
        if pool is not None:
            self.split["unlabeled"] = [pool.describe(i) for i in range(len(pool))]
        self._pool, self._pool_views = pool, [augment]
        self._build_unlabeled_set()  # the views a model asked for (request_unlabeled_views), else [augment]

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"class_names": self.class_names, "split": self.split, "seed": self.seed,
                "labels_per_class": self.labels_per_class}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("class_names")
        if saved is not None and self.class_names is not None and list(saved) != list(self.class_names):
            raise DataError(
                f"checkpoint classes {saved} differ from the data's classes {self.class_names}"
            )

    def num_batches_hint(self) -> int:
        return math.ceil(len(self.train_set) / self.batch_size) if self.train_set is not None else 0
