"""Scanning folders of images: :func:`find_images` lists the image files under a folder (the naming rules
are :func:`~visiontune.data.images.is_image_file` and :func:`~visiontune.data.images.is_hidden`) and
:func:`check_images` reads many of them, in threads, into an :class:`ImageReport` of which files fail and why
(each file with :func:`~visiontune.data.images.load_image` or the cheap
:func:`~visiontune.data.images.scan_image`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .images import DEFAULT_MAX_PIXELS, BadImageError, is_hidden, is_image_file, load_image, scan_image

__all__ = ["ImageReport", "check_images", "find_images"]


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """All files under ``root`` (recursively) with an image extension, sorted; hidden entries
    (:func:`is_hidden`, also inside hidden folders) skipped.

    Args:
        root: a folder.

    Example:
        >>> report = check_images(find_images("data/train"))  # doctest: +SKIP
    """
    base = Path(root)
    if not base.is_dir():
        raise NotADirectoryError(f"not a folder: {str(base)!r}")
    found = [
        p
        for p in base.rglob("*")
        if is_image_file(p)
        and not any(is_hidden(part) for part in p.relative_to(base).parts)
        and p.is_file()
    ]
    return sorted(found)


@dataclasses.dataclass
class ImageReport:
    """Result of :func:`check_images`.

    Attributes:
        ok: number of images that loaded.
        bad: ``(path, reason)`` for every image that did not, in input order.

    Example:
        >>> ImageReport(ok=2, bad=[("x.jpg", "empty file")]).total
        3
    """

    ok: int = 0
    bad: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        """Number of images checked."""
        return self.ok + len(self.bad)

    def to_text(self) -> str:
        """Human-readable summary: a count line, then one ``path: reason`` line per bad image.

        Example:
            >>> print(ImageReport(ok=1, bad=[("x.jpg", "empty file")]).to_text())
            checked 2 images: 1 ok, 1 bad
              x.jpg: empty file
        """
        lines = [f"checked {self.total} images: {self.ok} ok, {len(self.bad)} bad"]
        lines += [f"  {path}: {reason}" for path, reason in self.bad]
        return "\n".join(lines)

    def to_json(self) -> str:
        """JSON object ``{"total", "ok", "bad": [{"path", "reason"}, ...]}``.

        Example:
            >>> ImageReport(ok=1).to_json()
            '{"total": 1, "ok": 1, "bad": []}'
        """
        return json.dumps(
            {
                "total": self.total,
                "ok": self.ok,
                "bad": [{"path": path, "reason": reason} for path, reason in self.bad],
            }
        )


def _check_one(path: Path, max_pixels: int | None, decode: bool = True) -> tuple[str, str] | None:
    try:
        if decode:
            load_image(path, max_pixels=max_pixels)
        else:
            scan_image(path, max_pixels=max_pixels)
    except BadImageError as err:
        return (err.path, err.reason)
    return None


def check_images(
    paths: Iterable[str | os.PathLike[str]],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int = 0,
    decode: bool = True,
) -> ImageReport:
    """Try to load every image with :func:`load_image` and report which ones fail and why.

    Args:
        paths: image files (e.g. from :func:`find_images`).
        max_pixels: as in :func:`load_image`.
        workers: ``0`` checks in this thread; ``n > 0`` uses ``n`` threads (PIL decodes without the GIL).
        decode: ``True`` decodes every file (:func:`load_image`: finds everything training would fail on);
            ``False`` runs the cheap :func:`scan_image` instead (header, pixel count, end-of-data marker; what
            ``ImageDataModule(on_bad_image="error")`` runs at setup). Measured on a shared 2-core machine with
            2 threads: 2,000 generated JPEGs (64x64 or 500x375) scan in 0.4-0.5 s, about 0.2 ms a file
            (10,000: 1.6-2.5 s); decoding the 2,000 500x375 ones takes 2.3-4.5 s.

    Returns:
        An :class:`ImageReport`; ``bad`` keeps the input order.

    Example:
        >>> report = check_images(find_images("data/train"), workers=4)  # doctest: +SKIP
        >>> print(report.to_text())  # doctest: +SKIP
        checked 1203 images: 1201 ok, 2 bad
          data/train/robin/017.jpg: truncated image data (OSError: image file is truncated)
          data/train/wren/notes.jpg: not an image (unrecognised or unsupported format)
    """
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    items = [Path(p) for p in paths]
    if workers == 0:
        results = [_check_one(p, max_pixels, decode) for p in items]
    else:
        # chunks of files, not one task per file: a task costs about as much as scanning a small file
        size = max(1, min(64, len(items) // (workers * 4)))
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = pool.map(lambda chunk: [_check_one(p, max_pixels, decode) for p in chunk], chunks)
            results = [r for part in parts for r in part]
    bad = [r for r in results if r is not None]
    return ImageReport(ok=len(results) - len(bad), bad=bad)
