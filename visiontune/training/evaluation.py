"""Evaluation of a :class:`~visiontune.TransferClassifier`: accuracy, macro-F1 and the confusion matrix for the
val and test stages (torchmetrics, synced under DDP), the per-class summary of an epoch, and the Lightning
validation / test / predict steps that use them (:class:`EvaluationSteps`). Each eval epoch also keeps every image's
prediction (dataset index, true and predicted label, confidence: no second pass over the data), which
:class:`~visiontune.RunReport` writes to ``predictions_<stage>.csv``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

__all__ = ["EvaluationSteps", "epoch_metrics", "loader_order", "make_metrics"]


def make_metrics(num_classes: int) -> nn.ModuleDict:
    """Accuracy, macro-F1 and confusion matrix for the val and test stages (synced under DDP).

    Example:
        >>> sorted(make_metrics(3)["val"])
        ['acc', 'confusion', 'macro_f1']
    """
    return nn.ModuleDict({
        stage: nn.ModuleDict({
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            "confusion": MulticlassConfusionMatrix(num_classes),
        })
        for stage in ("val", "test")
    })


def epoch_metrics(
    metrics: nn.ModuleDict, class_names: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, dict[str, Optional[float]]]:
    """Compute one stage's metrics (:func:`make_metrics` ``[stage]``) and reset them.

    Returns:
        ``(accuracy, macro_f1, confusion (C, C) numpy array, {class name: accuracy, None without support})``.

    Example:
        >>> ms = make_metrics(2)["val"]
        >>> for m in ms.values():
        ...     m.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
        >>> acc, f1, confusion, per_class = epoch_metrics(ms, ["cat", "dog"])
        >>> round(float(acc), 3), per_class
        (0.667, {'cat': 0.5, 'dog': 1.0})
    """
    confusion = metrics["confusion"].compute().cpu().numpy()
    acc = metrics["acc"].compute()
    f1 = metrics["macro_f1"].compute()
    for m in metrics.values():
        m.reset()
    support = confusion.sum(1)
    per_class = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)
    per_class_acc: dict[str, Any] = {n: (None if np.isnan(a) else float(a)) for n, a in zip(class_names, per_class)}
    return acc, f1, confusion, per_class_acc


def loader_order(loader: Any) -> Optional[list[int]]:
    """The dataset indices an evaluation loader yields, in order (its sampler's order), or ``None`` when that
    order is not fixed (a random sampler) or not known.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> loader_order(DataLoader(list(range(5)), batch_size=2))
        [0, 1, 2, 3, 4]
    """
    from torch.utils.data import DistributedSampler, SequentialSampler

    if isinstance(loader, (list, tuple)):
        loader = loader[0] if len(loader) == 1 else None
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, SequentialSampler) or (isinstance(sampler, DistributedSampler) and not sampler.shuffle):
        return [int(i) for i in sampler]
    return None


def _gather_rows(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every process's rows (under DDP), each dataset index once (a distributed sampler pads with repeats)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, rows)
    merged = {k: np.concatenate([p[k] for p in parts]) for k in rows}
    _, first = np.unique(merged["index"], return_index=True)
    return {k: v[first] for k, v in merged.items()}


class EvaluationSteps:
    """The evaluation half of :class:`~visiontune.TransferClassifier`, a mixin listed before
    ``LightningModule``: the validation and test steps log ``{stage}_loss`` and update :attr:`metrics`
    (:func:`make_metrics`); each epoch end logs ``{stage}_acc`` and ``{stage}_macro_f1``, keeps
    :attr:`last_eval` (stage, confusion matrix, per-class accuracy, and ``predictions``: per image its dataset
    ``index``, ``true`` and ``pred`` label and ``confidence``, numpy arrays in dataset order) and calls
    :meth:`after_eval_epoch`; the predict step returns ``{"index", "label", "score"}`` per batch.

    The host provides ``metrics``, ``class_names``, ``loss(logits, y)`` and Lightning's ``log``.
    """

    metrics: nn.ModuleDict
    class_names: Optional[list[str]]
    last_eval: dict[str, Any]

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", self.loss(logits, y), batch_size=len(y), sync_dist=True)
        confidence, preds = logits.detach().softmax(1).max(1)
        for m in self.metrics[stage].values():
            m.update(preds, y)
        # kept on the device until the epoch ends: no host sync per batch
        rows = getattr(self, "_eval_rows", None)
        if rows is None:
            rows = self._eval_rows = []
        rows.append((preds, y.detach(), confidence))

    def _epoch_predictions(self, stage: str) -> dict[str, np.ndarray]:
        """This epoch's per-image predictions (see :attr:`last_eval`); dataset indices from the loader's order
        (``-1`` when the loader's order is not fixed)."""
        rows = getattr(self, "_eval_rows", None) or []
        self._eval_rows: list[tuple[torch.Tensor, ...]] = []  # this epoch's (pred, true, confidence) per batch
        columns = [torch.cat(col).cpu().numpy() for col in zip(*rows)] if rows else [np.zeros(0)] * 3
        pred, true, conf = columns
        trainer = getattr(self, "_trainer", None)
        loader = getattr(trainer, f"{stage}_dataloaders", None) if trainer is not None else None
        order = loader_order(loader)
        index = (np.asarray(order[:len(pred)], dtype=np.int64) if order is not None and len(order) >= len(pred)
                 else np.full(len(pred), -1, dtype=np.int64))
        out = {"index": index, "true": true.astype(np.int64), "pred": pred.astype(np.int64),
               "confidence": conf.astype(np.float32)}
        return _gather_rows(out) if order is not None else out

    def on_validation_epoch_start(self) -> None:
        self._eval_rows = []

    def on_test_epoch_start(self) -> None:
        self._eval_rows = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        acc, f1, confusion, per_class_acc = epoch_metrics(self.metrics[stage], self.class_names)
        self.log(f"{stage}_acc", acc, prog_bar=True)
        self.log(f"{stage}_macro_f1", f1)
        self.last_eval = {"stage": stage, "confusion": confusion, "per_class_acc": per_class_acc,
                          "predictions": self._epoch_predictions(stage)}
        self.after_eval_epoch(stage, confusion)

    def after_eval_epoch(self, stage: str, confusion: np.ndarray) -> None:
        """Called at the end of every val / test epoch with its confusion matrix, after the metrics are logged
        (:attr:`last_eval` set); does nothing here."""

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, index = batch
        probs = self(x).softmax(1)
        score, label = probs.max(1)
        return {"index": index, "label": label, "score": score}
