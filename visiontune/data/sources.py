"""Where images come from: a folder, a CSV, numpy arrays, or a built-in offline dataset.

Every source becomes a :class:`Samples`: a list of items (a file path or an HxWx3 uint8 array), an
integer label per item (-1 when unknown), and the class names. Problems are collected and raised
together, before any training, naming the files and rows.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..errors import ConfigError, UserError
from .images import IMAGE_EXTENSIONS, is_hidden
from .scan import find_images

__all__ = [
    "BUILTIN_DATASETS",
    "DataError",
    "DataOptionError",
    "Samples",
    "Source",
    "read_source",
    "register_dataset",
    "stratified_split",
    "take_per_class",
]

Source = Union[str, Path, tuple, "Samples", None]


class DataError(UserError, ValueError):
    """A dataset problem found before training. Lists every problem at once."""

    def __init__(self, problems: Sequence[str] | str, where: str = "") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        head = f"{where}: " if where else ""
        if len(self.problems) == 1:
            super().__init__(head + self.problems[0])
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems[:50])
            more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
            super().__init__(f"{head}{len(self.problems)} problems:\n{lines}{more}")


class DataOptionError(DataError, ConfigError):
    """Bad :class:`~visiontune.ImageDataModule` options (``image_size=0``, ...): a ``DataError`` listing them all,
    and a ``ConfigError`` (the ``visiontune`` command reports an invalid configuration)."""


@dataclass
class Samples:
    """Items, integer labels (-1 = unlabeled) and class names of one data source."""

    items: list[Any]
    labels: np.ndarray
    class_names: list[str]
    origin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)  # stable id per item: its path, or origin[index]

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [str(it) if isinstance(it, (str, Path)) else f"{self.origin}[{i}]"
                         for i, it in enumerate(self.items)]

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int] | np.ndarray, origin: str | None = None) -> "Samples":
        idx = np.asarray(indices, dtype=np.int64)
        return Samples([self.items[i] for i in idx], self.labels[idx].copy(), list(self.class_names),
                       origin or self.origin, dict(self.extra), [self.keys[i] for i in idx])

    def describe(self, i: int) -> str:
        """The item's stable id (file path, or ``origin[index]`` in the original source)."""
        return self.keys[i]


# ---------------------------------------------------------------------------------------------
# Built-in offline datasets
BUILTIN_DATASETS: dict[str, Callable[[], Samples]] = {}


def register_dataset(name: str) -> Callable[[Callable[[], Samples]], Callable[[], Samples]]:
    """Register a built-in dataset loader under ``name`` (usable as ``train="name"``)."""

    def deco(fn: Callable[[], Samples]) -> Callable[[], Samples]:
        BUILTIN_DATASETS[name] = fn
        return fn

    return deco


@register_dataset("digits")
def digits() -> Samples:
    """scikit-learn's 1,797 handwritten digits (8×8, 10 classes), upsampled to 32×32 RGB uint8."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    items = [
        np.repeat(np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC))[..., None], 3, axis=2)
        for im in images
    ]
    return Samples(items, d.target.astype(np.int64), [str(i) for i in range(10)], "digits")


# ---------------------------------------------------------------------------------------------
def class_folders(root: Path) -> list[str]:
    """The class folder names of ``root/<class>/``, sorted; hidden ones (:func:`~.images.is_hidden`) skipped."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not is_hidden(p.name))


def read_folder(root: Path, *, labeled: bool = True) -> Samples:
    """``root/<class>/<images>`` (hidden folders such as ``.git`` are ignored). Unlabeled: any layout."""
    if not root.is_dir():
        raise DataError(f"folder not found: {root}")
    if not labeled:
        files = find_images(root)
        if not files:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
        return Samples(list(files), np.full(len(files), -1, dtype=np.int64), [], str(root))
    classes = class_folders(root)
    if not classes:
        raise DataError(f"{root} has no class folders: expected {root}/<class>/<images>")
    items: list[Path] = []
    labels: list[int] = []
    problems = []
    for ci, name in enumerate(classes):
        files = find_images(root / name)
        if not files:
            problems.append(f"class folder {root / name} has no images")
        items += files
        labels += [ci] * len(files)
    if problems:
        raise DataError(problems, str(root))
    return Samples(items, np.asarray(labels, dtype=np.int64), classes, str(root))


def read_csv(path: Path, *, labeled: bool = True) -> Samples:
    """A CSV with a header ``path,label`` (paths relative to the CSV's folder; label optional if unlabeled)."""
    if not path.is_file():
        raise DataError(f"CSV file not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "path" not in fields or (labeled and "label" not in fields):
            need = "path,label" if labeled else "path"
            raise DataError(f"{path}: header must contain columns {need!r}, found {fields}")
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    items, names, problems = [], [], []
    for line, row in enumerate(rows, start=2):
        p = Path(row["path"])
        p = p if p.is_absolute() else path.parent / p
        if not row["path"]:
            problems.append(f"{path}:{line}: empty path")
            continue
        if not p.is_file():
            problems.append(f"{path}:{line}: file not found: {p}")
            continue
        if labeled and not row.get("label"):
            problems.append(f"{path}:{line}: empty label")
            continue
        items.append(p)
        names.append(row.get("label", ""))
    if problems:
        raise DataError(problems, str(path))
    if not items:
        raise DataError(f"{path} lists no images")
    if not labeled:
        return Samples(items, np.full(len(items), -1, dtype=np.int64), [], str(path))
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return Samples(items, np.asarray([index[n] for n in names], dtype=np.int64), classes, str(path))


def read_arrays(images: Any, labels: Any = None, class_names: Sequence[str] | None = None) -> Samples:
    """Numpy images (N×H×W or N×H×W×C, uint8 or float in [0, 1]) and optional integer labels."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = np.repeat(arr[..., None], 3, axis=3)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise DataError(f"arrays must be N×H×W or N×H×W×{{1,3}}, got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=3)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if labels is None:
        return Samples(list(arr), np.full(len(arr), -1, dtype=np.int64), list(class_names or []), "arrays")
    lab = np.asarray(labels).astype(np.int64)
    if lab.shape != (len(arr),):
        raise DataError(f"labels must have shape ({len(arr)},), got {lab.shape}")
    n = int(lab.max()) + 1 if len(lab) else 0
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(lab) and (lab.min() < 0 or lab.max() >= len(names)):
        raise DataError(f"labels must be in [0, {len(names)}), found {lab.min()}..{lab.max()}")
    return Samples(list(arr), lab, names, "arrays")


def read_source(source: Source, *, labeled: bool = True) -> Samples:
    """Read any supported source: folder, CSV path, built-in name, ``(images, labels)`` tuple, Samples."""
    if isinstance(source, Samples):
        return source
    if isinstance(source, tuple):
        return read_arrays(*source)
    if isinstance(source, (str, Path)):
        s = str(source)
        if s in BUILTIN_DATASETS:
            samples = BUILTIN_DATASETS[s]()
            if not labeled:
                samples = Samples(samples.items, np.full(len(samples), -1, dtype=np.int64), [], s)
            return samples
        path = Path(s).expanduser()
        if path.suffix.lower() == ".csv":
            return read_csv(path, labeled=labeled)
        if path.is_dir():
            return read_folder(path, labeled=labeled)
        raise DataError(
            f"{s!r} is not a folder, a .csv file, or a built-in dataset ({', '.join(sorted(BUILTIN_DATASETS))})"
        )
    raise DataError(f"unsupported data source of type {type(source).__name__}: {source!r}")


def align_classes(samples: Samples, class_names: list[str], role: str) -> Samples:
    """Re-index ``samples`` onto ``class_names``; classes unseen in training are an error."""
    unseen = [c for c in samples.class_names if c not in class_names]
    if unseen:
        raise DataError(f"{role} data {samples.origin} has classes not in the training classes: {unseen}")
    index = np.asarray([class_names.index(c) for c in samples.class_names], dtype=np.int64)
    labels = index[samples.labels] if len(samples.labels) else samples.labels
    return Samples(samples.items, labels, list(class_names), samples.origin, samples.extra, samples.keys)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: returns (kept, split-off) index arrays, ``fraction`` of each class split off."""
    rng = np.random.default_rng(seed)
    keep, take = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n = int(round(len(idx) * fraction))
        n = min(max(n, 1 if fraction > 0 and len(idx) > 1 else 0), len(idx) - 1)
        take.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(take))


def take_per_class(
    labels: np.ndarray, k: int, seed: int, class_names: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded choice of ``k`` items per class: returns (chosen, rest). Too-small classes are an error."""
    rng = np.random.default_rng(seed)
    chosen, rest, problems = [], [], []
    for c in range(int(labels.max()) + 1 if len(labels) else 0):
        idx = np.flatnonzero(labels == c)
        name = class_names[c] if class_names else str(c)
        if len(idx) < k:
            problems.append(f"class {name!r} has {len(idx)} training images, fewer than labels_per_class={k}")
            continue
        idx = idx[rng.permutation(len(idx))]
        chosen.append(idx[:k])
        rest.append(idx[k:])
    if problems:
        raise DataError(problems)
    return np.sort(np.concatenate(chosen)), np.sort(np.concatenate(rest))
