"""Run directory artifacts: metrics.json, class names, split, confusion matrix PNG, prediction CSV.

Every ``fit``/``validate``/``test``/``predict`` run has one run directory (the logger's ``log_dir``);
these callbacks write into it atomically, so an interrupted run never leaves a truncated file.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback

from ..io import atomic_save_figure, atomic_write, atomic_write_json

__all__ = ["RunReport", "PredictionCSVWriter", "run_dir", "plot_confusion"]


def run_dir(trainer: L.Trainer) -> Path:
    """The run directory of ``trainer``: its logger's ``log_dir`` (or ``default_root_dir``)."""
    path = trainer.log_dir or trainer.default_root_dir
    return Path(path)


def plot_confusion(confusion: np.ndarray, class_names: list[str], title: str = ""):
    """A matplotlib figure of a confusion matrix (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


class RunReport(Callback):
    """Write the run's report into its run directory and print where it is.

    Writes ``metrics.json`` (final metrics such as ``val_acc``, ``test_acc``, ``val_macro_f1``, trainable
    parameters, time, peak memory), ``class_names.json``, ``split.json`` (the files of each split, incl.
    the ``labels_per_class`` choice), ``per_class_accuracy.json`` and ``confusion_matrix_<stage>.png``.

    Example:
        >>> trainer = L.Trainer(callbacks=[RunReport()])  # doctest: +SKIP
    """

    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose
        self._start = 0.0

    def _write(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        out = run_dir(trainer)  # trainer.log_dir is a collective under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.json"
        metrics: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        metrics.update({k: _plain(v) for k, v in trainer.callback_metrics.items()})
        if hasattr(module, "parameter_summary") and module.net is not None:
            metrics.update(module.parameter_summary())
        metrics[f"{stage}_seconds"] = round(time.perf_counter() - self._start, 3)
        try:
            import resource

            metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        except ImportError:  # pragma: no cover - Windows
            pass
        if torch.cuda.is_available():
            metrics["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        last = getattr(module, "last_eval", {}) or {}
        if last.get("stage") in ("val", "test"):
            ev = last["stage"]
            metrics[f"{ev}_per_class_acc"] = last["per_class_acc"]
            fig = plot_confusion(last["confusion"], list(module.class_names), f"{ev} confusion matrix")
            atomic_save_figure(fig, out / f"confusion_matrix_{ev}.png")
            import matplotlib.pyplot as plt

            plt.close(fig)
            np.savetxt(buf := io.StringIO(), last["confusion"], fmt="%d", delimiter=",")
            atomic_write(out / f"confusion_matrix_{ev}.csv", buf.getvalue())
        atomic_write_json(path, metrics)
        if getattr(module, "class_names", None):
            atomic_write_json(out / "class_names.json", list(module.class_names))
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and getattr(dm, "split", None):
            atomic_write_json(out / "split.json", dm.split)
        if self.verbose:
            shown = {k: round(v, 4) for k, v in metrics.items()
                     if isinstance(v, float) and k.endswith(("_acc", "_macro_f1", "_loss"))}
            ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or getattr(
                trainer.checkpoint_callback, "last_model_path", "")
            print(f"visiontune {stage}: {shown}")
            if ckpt:
                print(f"visiontune checkpoint: {ckpt}")
            print(f"visiontune run directory: {out}")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    on_validation_start = on_test_start = on_predict_start = on_fit_start  # type: ignore[assignment]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "fit")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, "validate")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "test")


class PredictionCSVWriter(BasePredictionWriter):
    """Write ``path,label,score`` for every predicted image to a CSV (atomically).

    Args:
        output: CSV path; ``None`` = ``predictions.csv`` in the run directory.
    """

    def __init__(self, output: Optional[str] = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output
        self.written: Path | None = None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:  # type: ignore[override]
        dm = trainer.datamodule
        samples = dm.predict_set.samples
        names = list(pl_module.class_names)
        rows = []
        for batch in predictions:
            for i, lab, score in zip(batch["index"].tolist(), batch["label"].tolist(), batch["score"].tolist()):
                rows.append((samples.describe(i), names[lab], f"{score:.6f}"))
        if trainer.world_size > 1:  # gather rows from every process
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        out = Path(self.output) if self.output else run_dir(trainer) / "predictions.csv"  # collective (DDP)
        if not trainer.is_global_zero:
            return
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["path", "label", "score"])
        writer.writerows(sorted(set(rows)))
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, buf.getvalue())
        self.written = out
        print(f"visiontune predictions: {out} ({len(rows)} images)")
