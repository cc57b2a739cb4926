"""Adding classes to a trained classifier, and keeping the old ones.

* :func:`expand_head` grows an ``nn.Linear`` head by ``num_new`` rows; old rows stay bit-identical,
  so old-class logits are unchanged until training moves them.
* :func:`imprint_weights` initialises the new rows from a few support images ("weight
  imprinting", Qi et al., 2018), and :func:`expand_classes` does the whole thing in place on a timm
  model.
* Retention while fine-tuning on the new classes: :func:`distillation_loss` (Learning without
  Forgetting: match the old model's softened old-class outputs) and :func:`freeze_rows` (zero the
  gradients of the old rows exactly). :func:`split_accuracy` reports old / new / all accuracy.

New classes are appended: class index ``len(old_class_names) + j`` is ``new_class_names[j]``.

Example:
    >>> import timm, torch
    >>> model = timm.create_model("resnet18", num_classes=3, pretrained=False)
    >>> names = expand_classes(model, ["d"], (torch.randn(2, 3, 32, 32), torch.tensor([0, 0])),
    ...                        old_class_names=["a", "b", "c"])
    >>> names, model.get_classifier().out_features
    (['a', 'b', 'c', 'd'], 4)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import ConfigError

__all__ = [
    "ClassExpansionConfig",
    "distillation_loss",
    "expand_classes",
    "expand_head",
    "freeze_rows",
    "imprint_weights",
    "new_accuracy_at",
    "split_accuracy",
]


@dataclass
class ClassExpansionConfig:
    """How to protect old classes while training on new ones.

    Args:
        distill: weight (>= 0) of :func:`distillation_loss` against the pre-expansion model's
            outputs on old classes; 0 turns distillation off.
        temperature: distillation temperature T (> 0); LwF uses 2.
        freeze_old_rows: zero the gradients of the head rows of old classes (:func:`freeze_rows`).
        replay: with FixMatch, add the unlabeled images the frozen old model is confident about
            (``max p >=`` the FixMatch threshold) to the supervised batch, weakly augmented, with the old
            model's class. Without it the labeled batch holds new classes only and old classes are seen
            only strongly augmented, and old test images drift into the new classes (measured on digits,
            0-7 + two new, 100 steps, 3 seeds: old-class accuracy 0.728 without, 0.962 with; base
            0.954). Costs a forward and backward of those images (about half the unlabeled batch on
            digits: 1.16x training time).

    Example:
        >>> ClassExpansionConfig(distill=0.5).temperature
        2.0
        >>> ClassExpansionConfig(temperature=0)
        Traceback (most recent call last):
        ...
        visiontune.errors.ConfigError: ClassExpansionConfig.temperature must be a float > 0; got 0
    """

    distill: float = 1.0
    temperature: float = 2.0
    freeze_old_rows: bool = False
    replay: bool = True

    def __post_init__(self) -> None:
        def real(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not real(self.distill) or self.distill < 0:
            raise ConfigError(f"ClassExpansionConfig.distill must be a float >= 0; got {self.distill!r}")
        if not real(self.temperature) or not self.temperature > 0:
            raise ConfigError(f"ClassExpansionConfig.temperature must be a float > 0; got {self.temperature!r}")
        if not isinstance(self.freeze_old_rows, bool):
            raise ConfigError(f"ClassExpansionConfig.freeze_old_rows must be a bool; got {self.freeze_old_rows!r}")
        if not isinstance(self.replay, bool):
            raise ConfigError(f"ClassExpansionConfig.replay must be a bool; got {self.replay!r}")


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


def expand_classes(
    model: nn.Module,
    new_class_names: Sequence[str],
    support: tuple[Tensor, Tensor] | None = None,
    *,
    old_class_names: Sequence[str],
    batch_size: int = 64,
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
        feats = _support_features(model, images, batch_size)
        weight, bias = imprint_weights(feats, labels, len(new), reference_head=head)
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


def distillation_loss(student_logits_old: Tensor, teacher_logits_old: Tensor, T: float = 2.0) -> Tensor:
    """Learning-without-Forgetting loss on old classes: ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    Averaged over the batch (``batchmean``). The ``T^2`` keeps gradient magnitudes comparable
    across temperatures (Hinton et al.). The teacher is detached. If the student has more columns
    (old + new classes), only its first ``C_old`` are used: new classes are appended.

    Args:
        student_logits_old: ``(N, C_old)`` (or wider) logits of the model being trained.
        teacher_logits_old: ``(N, C_old)`` logits of the frozen pre-expansion model.
        T: temperature > 0.

    Returns:
        A scalar tensor, 0 when the old-class logits are identical.

    Example:
        >>> z = torch.randn(4, 3)
        >>> float(distillation_loss(z, z))
        0.0
    """
    if T <= 0:
        raise ValueError(f"T must be > 0; got {T}")
    c = teacher_logits_old.shape[-1]
    if student_logits_old.shape[0] != teacher_logits_old.shape[0] or student_logits_old.shape[-1] < c:
        raise ValueError(
            f"student logits {tuple(student_logits_old.shape)} must cover the teacher's "
            f"{tuple(teacher_logits_old.shape)} (same batch, at least {c} classes)"
        )
    s = F.log_softmax(student_logits_old[..., :c].float() / T, dim=-1)
    t = F.log_softmax(teacher_logits_old.detach().float() / T, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * (T * T)


def freeze_rows(head: nn.Linear, rows: slice | Sequence[int]) -> list[RemovableHandle]:
    """Zero, exactly, the gradients of the given output rows (weight and bias) of ``head``.

    Implemented with tensor gradient hooks, so other rows keep training. The gradient is zero,
    but an optimizer can still move the rows: weight decay (SGD's coupled or AdamW's decoupled)
    shrinks them, and momentum from before the freeze carries on. Put the head in a
    ``weight_decay=0`` group (or rows stay exactly fixed only with Adam/SGD without decay).

    Args:
        head: the classifier.
        rows: a slice (e.g. ``slice(0, C_old)``) or a list of row indices.

    Returns:
        The hook handles; call ``h.remove()`` on each to unfreeze.

    Example:
        >>> h = nn.Linear(3, 4)
        >>> handles = freeze_rows(h, slice(0, 2))
        >>> h(torch.randn(5, 3)).sum().backward()
        >>> bool((h.weight.grad[:2] == 0).all()), bool((h.weight.grad[2:] != 0).any())
        (True, True)
    """
    if not isinstance(head, nn.Linear):
        raise TypeError(f"freeze_rows needs an nn.Linear; got {type(head).__name__}")
    if isinstance(rows, slice):
        index: Any = rows
    else:
        idx = [int(r) for r in rows]
        bad = [r for r in idx if not -head.out_features <= r < head.out_features]
        if bad:
            raise ValueError(f"rows {bad} are out of range for a head with {head.out_features} outputs")
        index = torch.tensor(idx, dtype=torch.long)

    def zero_rows(grad: Tensor) -> Tensor:
        grad = grad.clone()
        grad[index.to(grad.device) if isinstance(index, Tensor) else index] = 0
        return grad

    handles = [head.weight.register_hook(zero_rows)]
    if head.bias is not None:
        handles.append(head.bias.register_hook(zero_rows))
    return handles


def split_accuracy(preds: Tensor, labels: Tensor, old_classes: int) -> dict[str, float]:
    """Accuracy on old classes (label < ``old_classes``), on new ones, and on all samples.

    Args:
        preds: ``(N,)`` predicted class ids, or ``(N, C)`` logits/probabilities (argmax taken).
        labels: ``(N,)`` true class ids.
        old_classes: number of old classes C_old (old = ids ``0..C_old-1``).

    Returns:
        ``{"acc_old", "acc_new", "acc_all", "n_old", "n_new"}``; an accuracy over no samples is NaN.

    Example:
        >>> split_accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 0, 2, 3]), old_classes=2)
        {'acc_old': 0.5, 'acc_new': 0.5, 'acc_all': 0.5, 'n_old': 2, 'n_new': 2}
    """
    if preds.ndim == 2:
        preds = preds.argmax(dim=-1)
    if preds.shape != labels.shape or preds.ndim != 1:
        raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} must both be (N,)")
    correct = preds.long() == labels.long()
    old = labels < old_classes

    def acc(sel: Tensor) -> float:
        n = int(sel.sum())
        return int(correct[sel].sum()) / n if n else float("nan")

    return {
        "acc_old": acc(old),
        "acc_new": acc(~old),
        "acc_all": acc(torch.ones_like(old)),
        "n_old": int(old.sum()),
        "n_new": int((~old).sum()),
    }


@torch.no_grad()
def new_accuracy_at(logits: Tensor, labels: Tensor, old_classes: int, acc_old: float) -> dict[str, float]:
    """New-class accuracy once the new classes' logits are lowered just enough to keep ``acc_old`` on old ones.

    Comparing two ways of adding classes by their raw new-class accuracy rewards the one that calls more
    images "new": a model that puts every old image into the new classes scores high on them. This
    evaluates both at the same old-class accuracy instead: every new-class logit is shifted by one
    offset ``-offset``, the smallest offset that brings old-class accuracy to at least ``acc_old``
    (negative when the model keeps more than that: the new classes then get the slack). Exact, from
    the margins; on ties the old class wins (``argmax`` takes the first maximum, old classes come first).
    The offset is also what to subtract from the new rows' biases to deploy at that operating point.

    Args:
        logits: ``(N, C)`` with old classes ``0..old_classes-1`` first.
        labels: ``(N,)`` true classes.
        old_classes: number of old classes ``C_old`` (``1 <= C_old < C``).
        acc_old: the old-class accuracy to keep, in ``[0, 1]``; at most the fraction of old samples
            whose best old class is right (the offset cannot fix old-vs-old mistakes).

    Returns:
        ``{"offset", "acc_old", "acc_new"}``: the offset, and the accuracies after applying it.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0, 3.0], [0.0, 2.0, 1.0], [0.0, 1.0, 4.0]])
        >>> new_accuracy_at(logits, torch.tensor([0, 1, 2]), old_classes=2, acc_old=1.0)
        {'offset': 1.0, 'acc_old': 1.0, 'acc_new': 1.0}
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (N, C) and labels (N,); got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if not 1 <= old_classes < logits.shape[1]:
        raise ValueError(f"old_classes must be in [1, {logits.shape[1]}); got {old_classes}")
    if not 0.0 <= float(acc_old) <= 1.0:
        raise ValueError(f"acc_old must be in [0, 1]; got {acc_old}")
    z, labels = logits.float(), labels.long()
    best_old, arg_old = z[:, :old_classes].max(dim=1)
    best_new, arg_new = z[:, old_classes:].max(dim=1)
    margin = best_new - best_old  # predicted new iff margin > offset
    old = labels < old_classes
    n_old, n_new = int(old.sum()), int((~old).sum())
    if n_old == 0 or n_new == 0:
        raise ValueError(f"need samples of both old and new classes; got {n_old} old and {n_new} new")
    fixable = margin[old & (arg_old == labels)].sort().values  # old samples right once the offset is large enough
    need = math.ceil(float(acc_old) * n_old - 1e-9)
    if need > fixable.numel():
        raise ValueError(f"acc_old={acc_old} is out of reach: only {fixable.numel()}/{n_old} old samples have their "
                         "class as the best old class")
    offset = float(fixable[need - 1]) if need > 0 else -math.inf
    kept = old & (arg_old == labels) & (margin <= offset)
    hit_new = ~old & (arg_new + old_classes == labels) & (margin > offset)
    return {"offset": offset, "acc_old": int(kept.sum()) / n_old, "acc_new": int(hit_new.sum()) / n_new}
