"""Run directory artifacts: metrics.json, class names, split, confusion matrix PNG, prediction CSVs, report.html.

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

from ..errors import ConfigError
from ..io import atomic_save_figure, atomic_write, atomic_write_json
from ..reports.plots import plot_confusion

__all__ = ["RunReport", "PredictionCSVWriter", "run_dir", "plot_confusion"]


def run_dir(trainer: L.Trainer) -> Path:
    """The run directory of ``trainer``: its logger's ``log_dir`` (or ``default_root_dir``)."""
    path = trainer.log_dir or trainer.default_root_dir
    return Path(path)


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
    the ``labels_per_class`` choice), ``confusion_matrix_<stage>.png`` / ``.csv``, ``predictions_<stage>.csv``
    (every evaluated image: index, path, true, predicted, confidence) and ``report.html``
    (:func:`visiontune.build_report`). During fit it also logs the learning rate (``lr``, the largest of the
    optimizer's groups) to the loggers every ``log_every_n_steps``, for the report's learning curves.

    A failure while building ``report.html`` never loses the run: one warning line, every other file is kept.

    Args:
        verbose: print the final metrics and where the run directory is.
        html: write ``report.html``.
        gallery_cap: at most this many misclassified images in the report.

    Example:
        >>> trainer = L.Trainer(callbacks=[RunReport()])  # doctest: +SKIP
    """

    def __init__(self, verbose: bool = True, html: bool = True, gallery_cap: int = 48) -> None:
        if isinstance(gallery_cap, bool) or not isinstance(gallery_cap, int) or gallery_cap < 0:
            raise ConfigError(f"report.gallery_cap must be an integer >= 0, got {gallery_cap!r}")
        self.verbose = verbose
        self.html = html
        self.gallery_cap = gallery_cap
        self._start = 0.0
        self.report_path: Path | None = None
        self._html_due: tuple[Path, Any] | None = None

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
        if last.get("stage") in ("val", "test") and last.get("predictions") is not None:
            try:
                self._write_predictions(out, module, dm, last["stage"], last["predictions"])
            except Exception as exc:  # never lose the run over the per-image file
                print(f"visiontune: warning: predictions_{last['stage']}.csv not written ({type(exc).__name__}: {exc})")
        if self.html:  # at teardown: after every callback's on_fit_end (the task delta is written by then)
            self._html_due = (out, dm)
        if self.verbose:
            shown = {k: round(v, 4) for k, v in metrics.items()
                     if isinstance(v, float) and k.endswith(("_acc", "_macro_f1", "_loss"))}
            ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or getattr(
                trainer.checkpoint_callback, "last_model_path", "")
            print(f"visiontune {stage}: {shown}")
            if ckpt:
                print(f"visiontune checkpoint: {ckpt}")
            print(f"visiontune run directory: {out}")

    @staticmethod
    def _write_predictions(out: Path, module: L.LightningModule, dm: Any, stage: str, predictions: dict) -> None:
        from ..reports.runfiles import write_predictions

        keys = (getattr(dm, "split", None) or {}).get(stage) if dm is not None else None
        write_predictions(out / f"predictions_{stage}.csv", predictions, list(module.class_names), keys)

    def _write_html(self, trainer: L.Trainer, out: Path, dm: Any) -> None:
        """``report.html``; any failure is one warning line (the run's other files are already written)."""
        try:
            for logger in trainer.loggers:  # metrics.csv complete up to now (CSVLogger flushes in batches)
                logger.save()
            from ..reports.gallery import resolve_item
            from ..reports.html import build_report

            by_path = resolve_item()
            split = "val" if (out / "predictions_val.csv").is_file() else "test"  # the gallery's split
            ds = getattr(dm, f"{split}_set", None) if dm is not None else None

            def load(row: dict) -> Any:  # the run's own images (arrays too), else found by path
                i = int(row["index"])
                if ds is not None and hasattr(ds, "load") and 0 <= i < len(ds) and (
                        not row["path"] or ds.samples.describe(i) == row["path"]):
                    return ds.load(i)
                return by_path(row)

            self.report_path = build_report(out, load=load, gallery_cap=self.gallery_cap)
            if self.verbose:
                print(f"visiontune report: {self.report_path}")
        except Exception as exc:  # the report must never lose the run
            print(f"visiontune: warning: report.html not written ({type(exc).__name__}: {exc})")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # the optimizer has stepped, the scheduler not yet: the LR of the step just taken, logged at that step
        # (global_step - 1), on the steps where Lightning logs the training metrics
        done = trainer.global_step
        if not trainer.loggers or not trainer.optimizers or done < 1 or done % max(1, trainer.log_every_n_steps):
            return
        lr = max(float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups)
        for logger in trainer.loggers:
            logger.log_metrics({"lr": lr}, step=done - 1)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    on_validation_start = on_test_start = on_predict_start = on_fit_start  # type: ignore[assignment]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "fit")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._html_due is not None:
            (out, dm), self._html_due = self._html_due, None
            self._write_html(trainer, out, dm)

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
