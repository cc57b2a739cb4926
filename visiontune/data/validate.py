"""Checks run before training: unreadable images (dropped under ``on_bad_image="skip"``) and class lists.

Both return problems as strings (or drop-records) instead of raising, so that the datamodule and
``visiontune check-data`` can list every problem of every split at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .sources import Samples

__all__ = ["drop_bad_images", "find_bad_images", "class_list_problems", "unseen_class_problems"]


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def find_bad_images(
    samples: Samples, role: str, *, max_pixels: int | None, workers: int | None = None, decode: bool = True
) -> tuple[list[int], list[dict[str, Any]], int]:
    """Decode every file item of ``samples`` (arrays are skipped: they are already pixels); ``decode=False``:
    only the cheap :func:`~visiontune.data.images.scan_image` (header, pixel count, end-of-data marker).

    Returns:
        ``(bad_indices, records, checked)``: item indices that failed, one ``{"split", "path", "reason"}``
        per failure in item order, and how many files were checked.
    """
    from .scan import check_images

    files = [(i, it) for i, it in enumerate(samples.items) if isinstance(it, (str, Path))]
    if not files:
        return [], [], 0
    report = check_images([p for _, p in files], max_pixels=max_pixels,
                          workers=_default_workers() if workers is None else workers, decode=decode)
    reasons = dict(report.bad)  # path string -> reason (paths are unique within a source)
    bad_idx, records = [], []
    for i, item in files:
        reason = reasons.get(str(item))
        if reason is not None:
            bad_idx.append(i)
            records.append({"split": role, "path": str(item), "reason": reason})
    return bad_idx, records, len(files)


def drop_bad_images(
    samples: Samples, role: str, *, max_pixels: int | None, workers: int | None = None
) -> tuple[Samples, list[dict[str, Any]], int]:
    """:func:`find_bad_images`, then the samples without them (item ids and labels kept)."""
    bad_idx, records, checked = find_bad_images(samples, role, max_pixels=max_pixels, workers=workers)
    if not bad_idx:
        return samples, records, checked
    keep = np.setdiff1d(np.arange(len(samples)), np.asarray(bad_idx, dtype=np.int64))
    return samples.subset(keep), records, checked


def _examples(samples: Samples, label: int, k: int = 3) -> str:
    idx = np.flatnonzero(samples.labels == label)
    shown = ", ".join(samples.describe(int(i)) for i in idx[:k])
    more = f", ... ({len(idx)} in all)" if len(idx) > k else ""
    return shown + more


def class_list_problems(samples: Samples, class_names: Sequence[str], role: str) -> list[str]:
    """Labels of ``samples`` that are not in the given class list, each with example files."""
    allowed = set(class_names)
    problems = []
    for ci, name in enumerate(samples.class_names):
        if name not in allowed and np.any(samples.labels == ci):
            problems.append(f"{role}: label {name!r} is not in the class list {list(class_names)} "
                            f"({_examples(samples, ci)})")
    return problems


def unseen_class_problems(samples: Samples, train_classes: Sequence[str], role: str) -> list[str]:
    """Classes of a val/test source that the training data does not have, with example files."""
    known = set(train_classes)
    return [
        f"{role}: class {name!r} does not occur in the training data (training classes: {list(train_classes)}; "
        f"{_examples(samples, ci)})"
        for ci, name in enumerate(samples.class_names)
        if name not in known and np.any(samples.labels == ci)
    ]
