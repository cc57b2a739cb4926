"""The gallery of misclassified images: thumbnails as data URIs, with the true and predicted label and the
confidence of the prediction.

An image is found from its row of ``predictions_<split>.csv``: a file path is read from disk, ``name[i]`` is item
``i`` of the built-in dataset ``name`` (``digits[17]``); a run's own loader (the datamodule's dataset) can be given
instead. An image that cannot be found is shown as a caption without a picture.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .page import data_uri, esc

__all__ = ["ImageLoader", "gallery_html", "misclassified", "resolve_item", "thumbnail_png"]

ImageLoader = Callable[[Mapping[str, Any]], Optional[np.ndarray]]
_BUILTIN_KEY = re.compile(r"^([A-Za-z0-9_\-]+)\[(\d+)\]$")


def misclassified(rows: Sequence[Mapping[str, Any]], cap: int) -> list[Mapping[str, Any]]:
    """The wrong predictions, most confident first (ties: dataset order), at most ``cap``.

    Example:
        >>> rows = [{"index": 0, "true": "a", "pred": "b", "confidence": 0.6},
        ...         {"index": 1, "true": "b", "pred": "b", "confidence": 0.9},
        ...         {"index": 2, "true": "b", "pred": "a", "confidence": 0.8}]
        >>> [r["index"] for r in misclassified(rows, 5)]
        [2, 0]
    """
    wrong = [r for r in rows if r["true"] != r["pred"]]
    wrong.sort(key=lambda r: (-float(r["confidence"]), int(r["index"])))
    return wrong[:max(0, int(cap))]


def resolve_item(cache: Optional[dict[str, Any]] = None) -> ImageLoader:
    """A loader that finds a prediction row's image from its ``path`` (see the module docs); ``cache`` keeps
    built-in datasets loaded across calls."""
    datasets: dict[str, Any] = {} if cache is None else cache

    def load(row: Mapping[str, Any]) -> Optional[np.ndarray]:
        key = str(row.get("path") or "")
        found = _BUILTIN_KEY.match(key)
        if found and not Path(key).is_file():
            from ..data.sources import BUILTIN_DATASETS

            name, i = found.group(1), int(found.group(2))
            if name not in BUILTIN_DATASETS:
                return None
            if name not in datasets:
                datasets[name] = BUILTIN_DATASETS[name]()
            items = datasets[name].items
            return np.asarray(items[i]) if i < len(items) else None
        if not key or not Path(key).is_file():
            return None
        from ..data.images import load_image

        try:
            return load_image(key)
        except Exception:  # an unreadable file: no thumbnail, the row is still listed
            return None

    return load


def thumbnail_png(image: np.ndarray, size: int = 96) -> bytes:
    """``image`` (H×W×3 uint8) scaled so that its longer side is ``size`` px (small images grow with nearest
    neighbours, so pixels stay sharp), as PNG bytes.

    Example:
        >>> len(thumbnail_png(np.zeros((8, 8, 3), np.uint8), 32)) > 0
        True
    """
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    im = Image.fromarray(arr)
    h, w = arr.shape[:2]
    scale = size / max(h, w, 1)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    im = im.resize(new, Image.NEAREST if scale >= 1 else Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def gallery_html(rows: Sequence[Mapping[str, Any]], load: ImageLoader, *, cap: int = 48, size: int = 96) -> str:
    """``<figure>`` thumbnails of the misclassified rows (:func:`misclassified`), each with its true and
    predicted class, confidence and item id."""
    figures = []
    for r in misclassified(rows, cap):
        try:
            image = load(r)
        except Exception:  # never lose the report over one image
            image = None
        label = f"true {r['true']}, predicted {r['pred']} ({float(r['confidence']):.2f})"
        pic = (f'<img class="thumb" alt="{esc(label)}" src="{data_uri(thumbnail_png(image, size))}">'
               if image is not None else '<div class="muted">(image not found)</div>')
        figures.append(
            f'<figure class="miss" data-index="{int(r["index"])}" data-true="{esc(r["true"])}" '
            f'data-pred="{esc(r["pred"])}">{pic}<figcaption><span class="t">{esc(r["true"])}</span> &rarr; '
            f'<span class="p">{esc(r["pred"])}</span> {float(r["confidence"]):.2f}<br>'
            f'<span class="muted">{esc(Path(str(r["path"])).name or r["path"])}</span></figcaption></figure>')
    return f'<div class="gallery" id="gallery">{"".join(figures)}</div>'
