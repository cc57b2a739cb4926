"""Adding classes to a trained classifier, and keeping the old ones.

* :func:`expand_head` grows an ``nn.Linear`` head by ``num_new`` rows; old rows stay bit-identical,
  so old-class logits are unchanged until training moves them.
* :func:`imprint_weights` initialises the new rows from a few support images ("weight
  imprinting", Qi et al., 2018), and :func:`expand_classes` does the whole thing in place on a timm
  model. These three live in :mod:`visiontune.models.heads` (head surgery) and are re-exported here.
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
from typing import Any, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import ConfigError
from ..models.heads import expand_classes, expand_head, imprint_weights  # noqa: F401  (re-exported)

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
            (``max p >= anchor_threshold``) to the supervised batch, weakly augmented, with the old
            model's class. Without it the labeled batch holds new classes only and old classes are seen
            only strongly augmented, and old test images drift into the new classes (measured on digits,
            0-7 + two new, 100 steps, 3 seeds: old-class accuracy 0.728 without, 0.962 with; base
            0.954). Costs a forward and backward of those images (about half the unlabeled batch on
            digits: 1.16x training time).
        label_pool: with FixMatch, label pool images once at the start; those labels are certain
            pseudo-labels and, with ``replay``, labeled examples. ``"new"`` (default; ``True`` means it): only the images
            that look new (:func:`visiontune.objectives.pool_labels.label_new_in_pool`: the grown head says
            whether an image is new, prototypes in the pretrained backbone's features which new class).
            ``"all"``: every pool image, old or new (:func:`visiontune.objectives.pool_labels.label_whole_pool`:
            soft k-means in the pretrained features steered by the old model); it learns the new classes
            far better and costs old-class accuracy (real photos, 8 old + 4 new classes, 5 labels each,
            3 seeds: see README "new classes on real photos"). ``False``: no labelling.
        anchor_threshold: confidence of the frozen old model (``max p``) for an unlabeled image to keep
            its old class (replay, anchoring) and to calibrate the new head rows. Not FixMatch's
            threshold: a model trained with label smoothing 0.1 is rarely 0.95 sure (measured on real
            photos: 10 of 220 pool images at 0.95, 138 at 0.8 of which 112 truly old).

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
    label_pool: Union[bool, str] = "new"
    anchor_threshold: float = 0.8

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
        if not (real(self.anchor_threshold) and 0 < self.anchor_threshold < 1):
            raise ConfigError(f"ClassExpansionConfig.anchor_threshold must be in (0, 1); got {self.anchor_threshold!r}")
        if not (isinstance(self.label_pool, bool) or self.label_pool in ("new", "all")):
            raise ConfigError("ClassExpansionConfig.label_pool must be 'new' (or true), 'all' or false; "
                              f"got {self.label_pool!r}")
        if self.label_pool is True:
            self.label_pool = "new"


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
