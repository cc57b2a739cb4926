"""Contact sheets: a PNG grid of thumbnails, one per candidate new class, to look at before labelling.

Example:
    >>> import numpy as np
    >>> sheet = contact_sheet([np.zeros((40, 20, 3), np.uint8)] * 3, columns=2, thumb=32)
    >>> sheet.size
    (70, 70)
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["contact_sheet", "save_contact_sheet"]

_PAD = 2
_BACKGROUND = (255, 255, 255)


def contact_sheet(images: Sequence[np.ndarray], *, columns: int = 8, thumb: int = 96, title: str = "") -> Image.Image:
    """A grid of ``thumb`` x ``thumb`` thumbnails (aspect kept, centred), ``columns`` per row, with an optional
    title line above.

    Args:
        images: ``HxWx3`` uint8 RGB arrays.
        columns: thumbnails per row (fewer when there are fewer images).
        thumb: the side of a thumbnail's cell, in pixels.
        title: text drawn above the grid (PIL's default font).

    Example:
        >>> import numpy as np
        >>> contact_sheet([np.zeros((8, 8, 3), np.uint8)], title="cluster 0").size
        (100, 116)
    """
    cols = max(1, min(columns, len(images)))
    rows = max(1, -(-len(images) // cols))
    top = 16 if title else 0
    sheet = Image.new("RGB", (cols * (thumb + _PAD) + _PAD, top + rows * (thumb + _PAD) + _PAD), _BACKGROUND)
    for i, arr in enumerate(images):
        im = Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("RGB")
        im.thumbnail((thumb, thumb), Image.Resampling.BILINEAR)
        r, c = divmod(i, cols)
        x = _PAD + c * (thumb + _PAD) + (thumb - im.width) // 2
        y = top + _PAD + r * (thumb + _PAD) + (thumb - im.height) // 2
        sheet.paste(im, (x, y))
    if title:
        ImageDraw.Draw(sheet).text((_PAD, 2), title, fill=(0, 0, 0))
    return sheet


def save_contact_sheet(images: Sequence[np.ndarray], path: str | os.PathLike, **kwargs) -> Path:
    """:func:`contact_sheet` written to ``path`` as a PNG, atomically (:func:`visiontune.io.atomic_write`).

    Example:
        >>> save_contact_sheet(thumbs, "suggest_cluster0.png", title="cluster 0: 12 images")  # doctest: +SKIP
    """
    from ..io import atomic_write

    buf = io.BytesIO()
    contact_sheet(images, **kwargs).save(buf, format="PNG")
    return atomic_write(path, buf.getvalue())
