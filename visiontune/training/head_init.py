"""The classifier head, started from a linear probe (LP-FT) instead of random rows.

A randomly initialised head sends large, noisy gradients into the pretrained features during the first
steps of fine-tuning. Fitting the head first, as a logistic regression on the frozen features of the training
images, then fine-tuning everything ("linear probe, then fine-tune", Kumar et al., ICLR 2022) keeps the
features from being distorted early. One pass of feature extraction and a scikit-learn fit: seconds next to
the fine-tuning. ``TransferClassifier(head_init="probe")`` runs it at the start of ``fit``.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..models.heads import find_head, output_inputs

__all__ = ["probe_head", "MAX_PROBE_IMAGES"]

#: at most this many training images are used for the probe (a stratified-by-order subset beyond it)
MAX_PROBE_IMAGES = 4096


def _features(net: nn.Module, head: Any, dataset: Any, limit: int, batch_size: int):
    """What each output layer reads, ``(N, D)`` per layer, and the labels, over at most ``limit`` images (evenly
    spaced), a batch of images in memory at a time."""
    n = len(dataset)
    idx = np.linspace(0, n - 1, num=limit).round().astype(int) if n > limit else np.arange(n)
    parts: list[list[torch.Tensor]] = [[] for _ in head.output_layers]
    labels: list[int] = []
    for start in range(0, len(idx), batch_size):
        items = [dataset[int(i)] for i in idx[start:start + batch_size]]
        feats, _ = output_inputs(net, head, torch.stack([it[0] for it in items]), batch_size)
        for part, f in zip(parts, feats):
            part.append(f.double().cpu())
        labels += [int(it[-1]) for it in items]
    return [torch.cat(p).numpy() for p in parts], np.asarray(labels)


def _fit_rows(x: np.ndarray, y: np.ndarray, num_classes: int, C: float) -> tuple[np.ndarray, np.ndarray]:
    """``(weight (K, D), bias (K,))`` of a multinomial logistic regression; classes without images get zero
    rows and the lowest bias."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, max_iter=2000).fit(x, y)
    coef, bias = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:  # scikit-learn's binary form: one row for class 1
        coef, bias = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-bias / 2, bias / 2])
    weight = np.zeros((num_classes, x.shape[1]), dtype=np.float64)
    out = np.full(num_classes, float(bias.min()) - 1.0)
    weight[clf.classes_], out[clf.classes_] = coef, bias
    return weight, out


@torch.no_grad()
def probe_head(net: nn.Module, dataset: Any, *, C: float = 1.0, batch_size: int = 64,
               limit: int = MAX_PROBE_IMAGES) -> Optional[str]:
    """Set every output layer of ``net``'s head to a logistic regression on the features it reads.

    Args:
        net: a timm model with a linear head (every output layer an ``nn.Linear``; DeiT's two heads, LeViT's
            BatchNorm + Linear heads are fine).
        dataset: the training images under the evaluation transform, ``(image, label)`` items.
        C: inverse L2 strength of the regression (scikit-learn's default 1.0).
        batch_size: feature-extraction batch size.
        limit: at most this many images (evenly spaced) are used.

    Returns:
        ``None`` when the head was set; else why it was left as it is (a head without ``nn.Linear`` outputs,
        fewer than two classes among the images).

    Example:
        >>> import timm, torch
        >>> net = timm.create_model("resnet18", num_classes=2)
        >>> data = [(torch.randn(3, 32, 32) + 3 * (i % 2), i % 2) for i in range(8)]
        >>> probe_head(net, data) is None
        True
    """
    head = find_head(net, missing_ok=True)
    layers = head.output_layers
    if not layers or not all(isinstance(layer, nn.Linear) for layer in layers):
        return f"the head's output layers {list(head.outputs)} are not all nn.Linear"
    feats, labels = _features(net, head, dataset, limit, batch_size)
    if len(np.unique(labels)) < 2:
        return "the training images hold fewer than two classes"
    for f, layer in zip(feats, layers):
        weight, bias = _fit_rows(f, labels, layer.out_features, C)
        layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype))
    return None
