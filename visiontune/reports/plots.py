"""The report's figures (matplotlib, Agg backend) as PNG bytes: confusion matrix and learning curves.

PNGs are written without a creation time or software version, so the same run gives the same bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

__all__ = ["figure_png", "learning_curves", "plot_confusion", "pyplot"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes (no metadata: reproducible), and close it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    finally:
        pyplot().close(fig)
    return buf.getvalue()


def plot_confusion(confusion: np.ndarray, class_names: list[str], title: str = "") -> Any:
    """A matplotlib figure of a confusion matrix (rows: true class, columns: predicted).

    Example:
        >>> fig = plot_confusion(np.array([[3, 1], [0, 4]]), ["cat", "dog"], "val")
        >>> len(figure_png(fig)) > 0
        True
    """
    plt = pyplot()
    n = len(class_names)
    side = min(12, 2 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        peak = confusion.max() if confusion.size else 0
        for i in range(n):
            for j in range(n):
                v = int(confusion[i, j])
                if v:
                    ax.text(j, i, v, ha="center", va="center", fontsize=8,
                            color="white" if v > peak / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _series(rows: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(rows):
        y = r.get(key, math.nan)
        if y is not None and not math.isnan(y):
            step = r.get("step", math.nan)
            xs.append(step if step is not None and not math.isnan(step) else float(i))
            ys.append(y)
    return xs, ys


# (panel title, metrics.csv columns drawn in it): a column that is not in the file is left out
PANELS = (
    ("loss", ("train_loss", "train_loss_step", "val_loss", "test_loss")),
    ("accuracy", ("train_acc", "train_acc_step", "val_acc", "test_acc")),
    ("learning rate", ()),  # every "lr" / "lr-*" column
)


def learning_curves(rows: Sequence[Mapping[str, float]]) -> Optional[bytes]:
    """Loss, accuracy and learning rate against the step, from ``metrics.csv`` rows (one panel each); ``None``
    when the rows hold none of them.

    Example:
        >>> rows = [{"step": 0.0, "train_loss": 2.0, "lr": 0.1}, {"step": 1.0, "train_loss": 1.5, "lr": 0.05}]
        >>> learning_curves(rows)[:4]
        b'\\x89PNG'
    """
    columns = sorted({k for r in rows for k in r})
    lr_cols = [c for c in columns if c == "lr" or c.startswith("lr-")]
    panels = [(title, [c for c in (cols or lr_cols) if c in columns and _series(rows, c)[0]])
              for title, cols in PANELS]
    panels = [(t, cs) for t, cs in panels if cs]
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels), 3.0), squeeze=False)
    for ax, (title, cols) in zip(axes[0], panels):
        for c in cols:
            xs, ys = _series(rows, c)
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.4, label=c)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.legend(fontsize=7)
    # fixed margins: tight_layout measured at about half of this figure's cost
    fig.subplots_adjust(left=0.07 if len(panels) > 2 else 0.1, right=0.985, bottom=0.16, top=0.88, wspace=0.3)
    return figure_png(fig)
