"""Head rows for new classes from a few support features: weight imprinting and its calibration.

* :func:`imprint_weights`: each new row is the direction of its class's mean (L2-normalised) support
  feature, at the mean norm of the old rows ("weight imprinting", Qi et al., 2018).
* :func:`calibrate_new_rows`: the imprinted rows refitted against the fixed old rows on anchor features of
  the old classes (class-balanced logistic regression, L-BFGS).

Pure torch; :func:`visiontune.models.heads.expand_classes` uses both on a timm model (and re-exports them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["calibrate_new_rows", "imprint_weights"]


@torch.no_grad()
def imprint_weights(
    features: Tensor, labels: Tensor, num_new: int, *, reference_head: nn.Linear
) -> tuple[Tensor, Tensor | None]:
    """Head rows for new classes from support features ("weight imprinting").

    Row j is the direction of class j's mean embedding: the mean of the L2-normalised support
    features of class j, L2-normalised again (Qi et al.; normalising each feature first makes every
    support image count equally, whatever its activation norm). Imprinting assumes a cosine
    classifier; a timm head is a plain ``w . f + b``, whose logit scale grows with ``|w|``. A
    unit-norm row would give new classes logits far smaller (or larger) than the old classes', so
    they could never win (or would always win); rescaling it to the mean norm of the existing rows
    puts new and old logits on the same scale. The new bias is the mean old bias, so new classes
    start with no systematic advantage or handicap.

    Args:
        features: ``(N, D)`` pre-logit features of the support images.
        labels: ``(N,)`` indices into the new classes, in ``[0, num_new)``.
        num_new: number of new classes; each needs at least one support feature.
        reference_head: the existing head (``in_features == D``), for the norm and bias.

    Returns:
        ``(weight (num_new, D), bias (num_new,) or None)`` on the head's device and dtype.

    Example:
        >>> head = nn.Linear(2, 3)
        >>> w, b = imprint_weights(torch.tensor([[3.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1]), 2,
        ...                        reference_head=head)
        >>> torch.allclose(w.norm(dim=1), head.weight.norm(dim=1).mean().expand(2))
        True
    """
    if features.ndim != 2 or features.shape[1] != reference_head.in_features:
        raise ValueError(
            f"features must be (N, {reference_head.in_features}) to match the head; got {tuple(features.shape)}"
        )
    labels = torch.as_tensor(labels).long().to(features.device)
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be ({features.shape[0]},); got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_new):
        raise ValueError(
            f"labels index the new classes and must lie in [0, {num_new}); got min {int(labels.min())}, "
            f"max {int(labels.max())} (subtract the number of old classes from full-list labels)"
        )
    counts = torch.bincount(labels, minlength=num_new)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"new classes {empty} have no support features: imprinting needs at least one each")
    f = F.normalize(features.float(), dim=1)
    sums = torch.zeros(num_new, f.shape[1], device=f.device).index_add_(0, labels, f)
    direction = F.normalize(sums / counts[:, None].float(), dim=1)
    ref_w = reference_head.weight.detach()
    scale = ref_w.float().norm(dim=1).mean().to(f.device)
    weight = (direction * scale).to(device=ref_w.device, dtype=ref_w.dtype)
    bias = None
    if reference_head.bias is not None:
        b = reference_head.bias.detach()
        bias = b.mean().expand(num_new).clone()
    return weight, bias


def calibrate_new_rows(
    features: Tensor, labels: Tensor, anchor_features: Tensor, anchor_labels: Tensor, *,
    old_weight: Tensor, old_bias: Tensor | None, init_weight: Tensor, init_bias: Tensor | None,
    reg: float = 1e-3, max_iter: int = 100,
) -> tuple[Tensor, Tensor | None]:
    """New head rows fitted against the fixed old rows (class-balanced logistic regression, L-BFGS).

    The new rows (and biases) minimise the cross-entropy over *all* classes, old rows fixed, on the
    support features (``labels``: full-list indices of the new classes) and on anchor features of old
    classes (``anchor_labels``: old indices), each class weighted by the inverse of its count, plus
    ``reg * |W_new|^2``. Starts from ``init_weight`` / ``init_bias`` (the imprinted rows).

    Args:
        features: ``(N, D)`` support features; labels ``(N,)`` in ``[num_old, num_old + num_new)``.
        anchor_features: ``(M, D)`` features standing for old classes; anchor_labels ``(M,)`` in ``[0, num_old)``.
        old_weight: ``(num_old, D)`` fixed rows; old_bias: ``(num_old,)`` or None.
        init_weight: ``(num_new, D)`` starting rows; init_bias: ``(num_new,)`` or None (no bias).
        reg: L2 weight on the new rows.
        max_iter: L-BFGS iterations.

    Returns:
        ``(weight, bias)`` of the new rows, in ``init_weight``'s dtype.

    Example:
        >>> w, b = calibrate_new_rows(torch.tensor([[0., 2.]]), torch.tensor([1]), torch.tensor([[2., 0.]]),
        ...                           torch.tensor([0]), old_weight=torch.tensor([[1., 0.]]),
        ...                           old_bias=torch.zeros(1), init_weight=torch.zeros(1, 2), init_bias=torch.zeros(1))
        >>> bool(w[0, 1] > w[0, 0]), bool(torch.tensor([0., 2.]) @ w[0] + b[0] > 0)
        (True, True)
    """
    x = torch.cat([features, anchor_features]).float()
    y = torch.cat([labels, anchor_labels]).long().to(x.device)
    num = old_weight.shape[0] + init_weight.shape[0]
    weights = 1.0 / torch.bincount(y, minlength=num).float().clamp(min=1)[y]
    ow = old_weight.float()
    ob = None if old_bias is None else old_bias.float()
    w = init_weight.detach().float().clone().requires_grad_(True)
    b = None if init_bias is None else init_bias.detach().float().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w] + ([b] if b is not None else []), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        logits = x @ torch.cat([ow, w]).T
        if b is not None:
            logits = logits + torch.cat([ob, b])
        loss = (F.cross_entropy(logits, y, reduction="none") * weights).sum() / weights.sum() + reg * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().to(init_weight.dtype), None if b is None else b.detach().to(init_bias.dtype)
