"""What a run directory holds, read for its report, and the per-image prediction files written into it.

``predictions_<split>.csv`` (``split`` = ``val`` or ``test``): one row per evaluated image, in dataset order,
columns ``index,path,true,pred,confidence`` (``index``: the image's position in the split, ``path``: its stable id,
a file path or ``origin[index]`` such as ``digits[17]``; ``true`` / ``pred``: class names; ``confidence``: the
softmax probability of ``pred``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import UserError
from ..io import atomic_write

__all__ = ["PREDICTION_COLUMNS", "ReportError", "RunFiles", "read_run", "write_predictions"]

PREDICTION_COLUMNS = ("index", "path", "true", "pred", "confidence")


class ReportError(UserError, ValueError):
    """A run directory a report cannot be built from (missing, or without ``metrics.json``); names the path."""


@dataclass
class RunFiles:
    """The files of one run directory that its report shows (missing ones are empty / ``None``).

    Attributes:
        run_dir: the run directory.
        metrics: ``metrics.json``.
        class_names: ``class_names.json`` (else ``0..C-1`` from the confusion matrix).
        split: ``split.json`` (split name -> item ids).
        curves: ``metrics.csv`` rows (Lightning's CSVLogger), values as floats (NaN where a row has none).
        config: ``config.yaml`` text, or ``None``.
        confusion: split -> confusion matrix (``confusion_matrix_<split>.csv``; rows true, columns predicted).
        confusion_png: split -> ``confusion_matrix_<split>.png`` bytes.
        predictions: split -> ``predictions_<split>.csv`` rows (dicts of :data:`PREDICTION_COLUMNS`).
        delta_bytes: size of ``delta.safetensors`` (in the run directory or its ``checkpoints/``), if saved.
    """

    run_dir: Path
    metrics: dict[str, Any]
    class_names: list[str] = field(default_factory=list)
    split: dict[str, list[str]] = field(default_factory=dict)
    curves: list[dict[str, float]] = field(default_factory=list)
    config: Optional[str] = None
    confusion: dict[str, np.ndarray] = field(default_factory=dict)
    confusion_png: dict[str, bytes] = field(default_factory=dict)
    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    delta_bytes: Optional[int] = None

    @property
    def splits(self) -> list[str]:
        """The evaluated splits, ``val`` before ``test``."""
        return [s for s in ("val", "test") if s in self.confusion or s in self.predictions
                or f"{s}_acc" in self.metrics]


def _json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: not readable JSON ({exc})") from None


def _float(text: str) -> float:
    try:
        return float(text) if text != "" else math.nan
    except ValueError:
        return math.nan


def _curves(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        return [{k: _float(v or "") for k, v in row.items() if k} for row in csv.DictReader(fh)]


def _predictions(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not set(PREDICTION_COLUMNS) <= set(rows[0]):
        raise ReportError(f"{path}: expected columns {','.join(PREDICTION_COLUMNS)}, found {','.join(rows[0])}")
    return [{"index": int(r["index"]), "path": r["path"], "true": r["true"], "pred": r["pred"],
             "confidence": float(r["confidence"])} for r in rows]


def read_run(run_dir: Union[str, Path]) -> RunFiles:
    """Read the report's files of ``run_dir``.

    Raises:
        ReportError: ``run_dir`` is not a directory, has no ``metrics.json``, or a file in it is unreadable.

    Example:
        >>> run = read_run("runs/visiontune/version_0")  # doctest: +SKIP
        >>> run.metrics["val_acc"], run.splits  # doctest: +SKIP
        (0.93, ['val'])
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ReportError(f"run directory not found: {root}")
    if not (root / "metrics.json").is_file():
        raise ReportError(f"{root} has no metrics.json: not a visiontune run directory (or the run has not ended)")
    run = RunFiles(root, _json(root / "metrics.json", {}))
    run.split = _json(root / "split.json", {})
    run.curves = _curves(root / "metrics.csv")
    if (root / "config.yaml").is_file():
        run.config = (root / "config.yaml").read_text(encoding="utf-8", errors="replace")
    for s in ("val", "test"):
        if (root / f"confusion_matrix_{s}.csv").is_file():
            run.confusion[s] = np.atleast_2d(np.loadtxt(root / f"confusion_matrix_{s}.csv", delimiter=",",
                                                        dtype=np.int64, ndmin=2))
        if (root / f"confusion_matrix_{s}.png").is_file():
            run.confusion_png[s] = (root / f"confusion_matrix_{s}.png").read_bytes()
        if (root / f"predictions_{s}.csv").is_file():
            run.predictions[s] = _predictions(root / f"predictions_{s}.csv")
    names = _json(root / "class_names.json", None)
    if names is None and run.confusion:
        names = [str(i) for i in range(len(next(iter(run.confusion.values()))))]
    run.class_names = [str(n) for n in names or []]
    for delta in (root / "delta.safetensors", root / "checkpoints" / "delta.safetensors"):
        if delta.is_file():
            run.delta_bytes = delta.stat().st_size
            break
    return run


def write_predictions(path: Union[str, Path], predictions: Mapping[str, np.ndarray], class_names: Sequence[str],
                      keys: Optional[Sequence[str]] = None) -> Path:
    """Write ``predictions_<split>.csv`` atomically (see the module docs).

    Args:
        path: the CSV path.
        predictions: ``{"index", "true", "pred", "confidence"}`` arrays (``TransferClassifier.last_eval``).
        class_names: names in label order.
        keys: the split's item ids by index (``Samples.describe``); ``None`` or an unknown index: empty path.

    Example:
        >>> p = {"index": np.array([0, 1]), "true": np.array([0, 1]), "pred": np.array([0, 0]),
        ...      "confidence": np.array([0.9, 0.6])}
        >>> write_predictions("run/predictions_val.csv", p, ["cat", "dog"], ["a.jpg", "b.jpg"])  # doctest: +SKIP
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PREDICTION_COLUMNS)
    order = np.argsort(predictions["index"], kind="stable")
    for j in order:
        i, t, p = int(predictions["index"][j]), int(predictions["true"][j]), int(predictions["pred"][j])
        key = keys[i] if keys is not None and 0 <= i < len(keys) else ""
        writer.writerow([i, key, class_names[t], class_names[p], f"{float(predictions['confidence'][j]):.6f}"])
    return atomic_write(path, buf.getvalue())
