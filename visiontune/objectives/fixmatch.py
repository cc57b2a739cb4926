"""FixMatch inside :class:`~visiontune.TransferClassifier`: the Lightning side of :mod:`visiontune.objectives.semisup`.

``TransferClassifier(semi_supervised=FixMatchConfig(...))`` (YAML: ``model.semi_supervised:
{threshold: 0.95, mu: 7}``) trains with any strategy on a labeled batch plus an unlabeled batch of
``mu`` times its size, seen twice (weak and strong augmentations). This module holds what the model
needs for that and nothing else:

* :class:`FixMatchState` — asks the datamodule for the pool's weak/strong views (``mu``, sample indices and
  true labels of the pool: the datamodule builds them), runs the training step, keeps the EMA teacher, distribution alignment and
  FlexMatch thresholds, and saves/restores them in checkpoints (plain tensors and numbers, so
  checkpoints load with ``torch.load(weights_only=True)``).
* :func:`training_step` — the step shared by FixMatch and class expansion (LwF distillation, see
  :mod:`visiontune.objectives.expansion`).

One step, for a labeled batch ``(x, y)`` and an unlabeled batch ``(x_w, x_s, true_label, index)``::

    weak   = predict_weak(teacher or student, x_w)         # no graph: only detached targets
    ll, ls = forward_train(student, x, x_s, cfg.bn)         # one forward of cat(x, x_s) by default
    loss   = CE(ll, y) + lambda_u * masked_CE(ls, pseudo_labels(weak))

BatchNorm. The weak branch runs in the student's *current* mode, i.e. under the model's ``bn`` policy:
with ``bn="eval"`` (recommended with few labels) every BN layer uses its pretrained running statistics
in all three branches, so the weak and strong views are normalised identically and nothing drifts.
With trainable BN statistics, the weak batch is normalised with its own batch statistics (as in the
paper's train-mode forward) and feeds the running statistics too (the paper's running statistics see
labeled, weak and strong images; the weak views are also the ones closest to clean test images), and
labeled + strong go through one concatenated forward (``FixMatchConfig.bn = "concat"``: shared batch
statistics, as in the paper). With an EMA teacher the weak branch runs on the teacher in eval mode
(its averaged running statistics), which needs no BN decision at all.

Example:
    >>> from visiontune import TransferClassifier, ImageDataModule, FixMatchConfig
    >>> model = TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="full", bn="eval",
    ...                            semi_supervised=FixMatchConfig(threshold=0.9, mu=2))  # doctest: +SKIP
    >>> data = ImageDataModule(train="digits", image_size=32, labels_per_class=5, unlabeled="rest",
    ...                        hflip=False)  # doctest: +SKIP
    >>> L.Trainer(max_epochs=5).fit(model, data)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .semisup import FixMatchConfig, fixmatch_loss, forward_train, predict_weak
from .semisup_state import DistributionAlignment, FlexMatchThresholds
from .weighting import AdaptiveState, FreeMatchThresholds, SoftMatchWeights, adaptive_loss

if TYPE_CHECKING:  # pragma: no cover
    from .expansion import ClassExpansion
    from ..models.protocols import ClassifierModel  # the hosting TransferClassifier (visiontune.training.module imports this module)

__all__ = ["FixMatchState", "as_fixmatch_config", "ema_decay", "training_step"]

# the EMA teacher is a WeightEMA (warm-up, one update per optimizer step); ema_decay re-exported (old path)
from ..training.ema import WeightEMA, ema_decay  # noqa: E402


def as_fixmatch_config(value: Union[FixMatchConfig, Mapping[str, Any], None]) -> Optional[FixMatchConfig]:
    """A :class:`FixMatchConfig` from itself, a plain dict (hparams, YAML) or ``None``.

    Unknown keys are an error naming them (a typo must not silently fall back to a default).

    Example:
        >>> as_fixmatch_config({"threshold": 0.9, "mu": 2}).mu
        2
        >>> as_fixmatch_config({"treshold": 0.9})
        Traceback (most recent call last):
        ...
        visiontune.errors.ConfigError: model.semi_supervised: unknown option(s) ['treshold']; known: threshold, mu, lambda_u, temperature, hard_labels, warmup_steps, ema, distribution_alignment, class_thresholds, bn, algorithm, state_momentum, fairness_weight
    """
    from ..training.options import coerce_config

    return coerce_config(value, FixMatchConfig, "model.semi_supervised")


def _hard(targets: Tensor) -> Tensor:
    return targets.argmax(-1) if targets.ndim == 2 else targets


class FixMatchState:
    """What a :class:`~visiontune.TransferClassifier` needs to train with FixMatch.

    Deliberately not an ``nn.Module``: the EMA teacher's parameters must not reach the optimizer or the
    model's ``state_dict`` (they go to the checkpoint's ``"visiontune_fixmatch"`` entry instead), and the
    helpers are built lazily, once the classes (and, with expansion, the grown head) and the unlabeled
    pool are known. State restored from a checkpoint is applied when they are built; per-class state
    (alignment, FreeMatch / SoftMatch) saved with fewer classes than the model now has is grown
    (:func:`~visiontune.objectives.semisup_state.grown_distribution`). ``algorithm: freematch | softmatch``
    adds the ``weighting`` entry (:mod:`visiontune.objectives.weighting`); FixMatch checkpoints are unchanged.

    Args:
        cfg: the FixMatch options.

    Example:
        >>> state = FixMatchState(FixMatchConfig(mu=1, ema=0.99))
        >>> sorted(state.state_dict())
        ['config', 'da', 'flex', 'last_ema_step', 'teacher']
    """

    def __init__(self, cfg: FixMatchConfig) -> None:
        self.cfg = cfg
        self.teacher: WeightEMA | None = WeightEMA(cfg.ema) if cfg.ema is not None else None
        self.da: DistributionAlignment | None = None
        self.flex: FlexMatchThresholds | None = None
        self.weighting: AdaptiveState | None = None
        self.pool_size: int | None = None
        self._pending: dict[str, Any] = {}

    # ------------------------------------------------------------------ data
    def setup(self, module: "ClassifierModel", dm: Any) -> None:
        """Ask the datamodule, once, for the unlabeled pool as weak and strong views (``mu``, the model's
        class order: :class:`~visiontune.models.protocols.UnlabeledViews`); the datamodule builds them.

        Called from the model's ``setup("fit")``, after the datamodule's own ``setup`` (Lightning's order), so
        the pool exists and its size is known. A datamodule without ``request_unlabeled_views``
        (:class:`~visiontune.models.protocols.SemiSupervisedData`) is an error naming it; without a
        datamodule (plain dataloaders) the user hands us ``{"labeled": ..., "unlabeled": ...}`` batches.
        """
        from ..models.protocols import SemiSupervisedData, UnlabeledViews, missing_members

        if dm is None:
            return
        missing = missing_members(dm, SemiSupervisedData)
        if missing:
            raise ConfigError(f"model.semi_supervised: the datamodule {type(dm).__name__} has no "
                              f"{', '.join(missing)}(request): it cannot be asked for the weak and strong views of "
                              "its unlabeled images (visiontune.models.protocols.SemiSupervisedData); use "
                              "visiontune.ImageDataModule, or implement it")
        request = UnlabeledViews(ratio=self.cfg.mu, class_names=tuple(module.class_names or ()))
        self.pool_size = dm.request_unlabeled_views(request)

    # ------------------------------------------------------------------ lazily built helpers
    def _ensure_teacher(self, module: "ClassifierModel") -> None:
        if self.teacher is not None:
            self.teacher.ensure(module.net)  # a copy of the student (a restored state loads into it)

    def _ensure(self, module: "ClassifierModel") -> None:
        cfg, n = self.cfg, module.num_classes
        self._ensure_teacher(module)
        if cfg.distribution_alignment and self.da is None:
            self.da = DistributionAlignment(n)
            if "da" in self._pending:
                pending = self._pending.pop("da")
                saved = int(torch.as_tensor(pending["mean"]).shape[0])
                if saved < n:  # saved before classes were added
                    self.da = DistributionAlignment(saved)
                    self.da.load_state_dict(pending)
                    self.da.grow(n)
                else:
                    self.da.load_state_dict(pending)
        if cfg.algorithm != "fixmatch" and self.weighting is None:
            kind = FreeMatchThresholds if cfg.algorithm == "freematch" else SoftMatchWeights
            self.weighting = kind(n, momentum=cfg.state_momentum)
            if "weighting" in self._pending:
                self.weighting.load_state_dict(self._pending.pop("weighting"))  # grows a smaller one
        if cfg.class_thresholds == "flexmatch" and self.flex is None:
            pending = self._pending.pop("flex", None)
            size = self.pool_size or (len(pending["selected"]) if pending else None)
            if size is None:
                raise ConfigError("class_thresholds='flexmatch' needs the size of the unlabeled pool "
                                 "(train with an ImageDataModule)")
            self.flex = FlexMatchThresholds.from_config(cfg, size, n)
            if pending is not None:
                self.flex.load_state_dict(pending)

    def teacher_module(self, module: "ClassifierModel") -> nn.Module | None:
        """The EMA teacher (moved to the student's device), or ``None`` without ``ema``.

        It evaluates the model: see :meth:`TransferClassifier.evaluated_net`.
        """
        return None if self.teacher is None else self.teacher.ensure(module.net)

    def weak_logits(self, module: "ClassifierModel", x_weak: Tensor) -> Tensor:
        """Detached logits of the weak views (teacher in eval mode, or the student as it is; no graph)."""
        teacher = self.teacher_module(module)
        return predict_weak(teacher if teacher is not None else module.net, x_weak)

    def after_step(self, module: "ClassifierModel") -> None:
        """Move the EMA teacher toward the student once per optimizer step (:meth:`WeightEMA.update`: the
        warm-up of :func:`ema_decay`; gradient accumulation repeats are skipped)."""
        if self.teacher is None or module._trainer is None:
            return
        self._ensure(module)
        self.teacher.update(module.net, int(module.trainer.global_step))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers: the config, the teacher, DA, FlexMatch and FreeMatch / SoftMatch state."""
        def get(obj: Any, key: str) -> Any:
            return obj.state_dict() if obj is not None else self._pending.get(key)

        ema = self.teacher.state_dict() if self.teacher is not None else {"teacher": self._pending.get("teacher"),
                                                                          "last_step": -1}
        out = {"config": dataclasses.asdict(self.cfg), "teacher": ema["teacher"], "da": get(self.da, "da"),
               "flex": get(self.flex, "flex"), "last_ema_step": ema["last_step"]}
        if self.cfg.algorithm != "fixmatch":
            out["weighting"] = get(self.weighting, "weighting")
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore; helpers already built load now, the others when they are built."""
        if self.teacher is not None:
            self.teacher.load_state_dict({"last_step": state.get("last_ema_step", -1), "teacher": state.get("teacher")})
        elif state.get("teacher") is not None:
            self._pending["teacher"] = state["teacher"]
        for key in ("da", "flex", "weighting"):
            value, obj = state.get(key), getattr(self, key)
            if value is None:
                continue
            if obj is not None:
                obj.load_state_dict(value)
            else:
                self._pending[key] = value


def confident_old(old_logits: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Which images the frozen old model is confident about (``max p >= threshold``), and its class for each.

    Example:
        >>> mask, cls = confident_old(torch.tensor([[9.0, 0.0], [0.1, 0.0]]), 0.95)
        >>> mask.tolist(), cls.tolist()
        ([True, False], [0, 0])
    """
    conf, cls = torch.softmax(old_logits.detach().float(), dim=-1).max(dim=-1)
    return conf >= threshold, cls


def anchor_old_classes(weak_logits: Tensor, old_logits: Tensor, threshold: float) -> Tensor:
    """Weak logits where the frozen old model's confident old-class predictions win.

    When adding classes, the grown model starts with new head rows that are not calibrated against the
    old ones, so its first confident pseudo-labels put many old-class images into new classes, and
    FixMatch would reinforce that. The old model, confident (``max p >= threshold``) on an unlabeled image,
    is right about old classes nearly always (measured on digits at 0.95: every such old-class image
    right, and 9% of the new-class images wrongly claimed): those images get its class as a certain
    pseudo-label (a one-hot logit row), the others keep the model's own.

    Example:
        >>> weak = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 5.0]])
        >>> old = torch.tensor([[9.0, 0.0], [0.1, 0.0]])       # confident on row 0 only
        >>> anchor_old_classes(weak, old, 0.95).argmax(1).tolist()
        [0, 2]
    """
    return _anchor(weak_logits, *confident_old(old_logits, threshold))


def _anchor(weak_logits: Tensor, anchored: Tensor, cls: Tensor) -> Tensor:
    if not bool(anchored.any()):
        return weak_logits
    onehot = torch.full_like(weak_logits, -1e4)
    onehot[torch.arange(len(cls), device=cls.device), cls] = 0.0
    return torch.where(anchored[:, None], onehot, weak_logits)


def training_step(module: "ClassifierModel", batch: Any, *, fixmatch: Optional[FixMatchState],
                  expansion: Optional["ClassExpansion"]) -> Tensor:
    """One training step with FixMatch and/or class-expansion distillation; logs every piece.

    Logged every step: ``train_loss``, ``train_acc`` (labeled batch), ``train_sup_loss``; with FixMatch
    ``train_unsup_loss`` (unweighted), ``train_unsup_weight``, ``train_mask_rate``, and, when the pool's
    true labels are known (``unlabeled: rest``), ``train_pseudo_acc`` (confident pseudo-labels) and
    ``train_pseudo_acc_all`` (all of them); with expansion ``train_distill_loss`` and, with replay,
    ``train_replay`` (old-class pool images added to the supervised batch).

    When adding classes with FixMatch, the unlabeled weak views the frozen old model is confident about
    are (a) anchored: their pseudo-label is the old model's class (:func:`anchor_old_classes`), and
    (b) with ``class_expansion.replay`` (default) also added to the supervised batch with that class.
    (b) matters: the labeled batch holds only new-class images, lightly augmented, while old classes would
    otherwise appear only strongly augmented, so the model learns "clean-looking image -> new class" and
    moves old test images into the new classes. Measured on digits (0-7 + two new): true labels on
    the strong views alone left old-class accuracy at 0.83; on weak views, 0.95.

    Args:
        module: the model being trained (its ``net``, ``loss`` and Lightning logging are used).
        batch: ``{"labeled": (x, y), "unlabeled": (x_weak, x_strong, true_label, index)}`` with FixMatch,
            else ``(x, y)``.
        fixmatch: the model's FixMatch state, or None (no unlabeled loss).
        expansion: the model's class-expansion state, or None (no distillation, no anchoring).

    Returns:
        The loss to back-propagate.
    """
    fm = fixmatch
    if isinstance(batch, Mapping):
        labeled, unlabeled = batch["labeled"], batch.get("unlabeled")
    else:
        labeled, unlabeled = batch, None
    x, y = labeled[0], labeled[1]
    logs: dict[str, Tensor | float] = {}
    if fm is not None:
        loss, sup, logits_l, student, teacher_logits = _fixmatch_losses(module, fm, expansion, x, y, unlabeled, logs)
    else:
        logits_l = module.net(x)
        sup = loss = module.loss(logits_l, y)
        student, teacher_logits = logits_l, None
        if expansion is not None and expansion.old_model is not None and expansion.cfg.distill > 0:
            teacher_logits = expansion.old_logits(x)
    if teacher_logits is not None and expansion.cfg.distill > 0:
        distill = expansion.distillation(student, teacher_logits)
        loss = loss + expansion.cfg.distill * distill
        logs["train_distill_loss"] = distill.detach()
    acc = (logits_l.argmax(1) == y).float().mean()
    module.log_dict({"train_loss": loss.detach(), "train_acc": acc}, prog_bar=True, batch_size=len(y))
    module.log("train_sup_loss", sup.detach(), batch_size=len(y))
    for key, value in logs.items():
        module.log(key, value, prog_bar=key == "train_mask_rate", batch_size=len(y))
    return loss


def _fixmatch_losses(module: "ClassifierModel", fm: FixMatchState, expansion: Optional["ClassExpansion"], x: Tensor,
                     y: Tensor, unlabeled: Any, logs: dict[str, Tensor | float]) -> tuple[Tensor, ...]:
    """FixMatch's part of :func:`training_step` (adds its values to ``logs``): the loss, the supervised loss, the
    labeled batch's logits, the student's logits and the old model's (``None``: no distillation)."""
    if unlabeled is None:
        raise ConfigError("model.semi_supervised is set but the batch has no 'unlabeled' part: use an "
                         "ImageDataModule with data.unlabeled (or 'rest' with labels_per_class)")
    x_w, x_s, true = unlabeled[0], unlabeled[1], unlabeled[2] if len(unlabeled) > 2 else None
    index = unlabeled[3] if len(unlabeled) > 3 else None
    fm._ensure(module)
    weak = fm.weak_logits(module, x_w)
    old_weak = None
    x_sup, y_sup, replayed = x, y, None
    if expansion is not None and expansion.old_model is not None:
        old_weak = expansion.old_logits(x_w)
        anchored, old_cls = confident_old(old_weak, expansion.cfg.anchor_threshold)
        pool = expansion.pool_labels_for(index)  # labelled once at setup (label_pool; -1: unknown)
        if pool is not None:  # setup-time labels beat the old model's (over-)confidence
            new_known = pool >= 0
            old_cls = torch.where(new_known, pool, old_cls)
            anchored = anchored | new_known
            logs["train_pool_labelled"] = float(new_known.sum())
        weak = _anchor(weak, anchored, old_cls)
        if expansion.cfg.replay:
            replayed = anchored
            x_sup, y_sup = torch.cat([x, x_w[replayed]]), torch.cat([y, old_cls[replayed].to(y.dtype)])
            logs["train_replay"] = float(replayed.sum())
    logits_sup, logits_s = forward_train(module.net, x_sup, x_s, fm.cfg.bn)
    logits_l = logits_sup[: len(y)]
    if fm.weighting is not None:  # FreeMatch / SoftMatch
        out = adaptive_loss(logits_s, weak, fm.cfg, state=fm.weighting, step=int(module.global_step), da=fm.da)
        if out.loss_fair is not None:
            logs["train_fairness_loss"] = out.loss_fair.detach()
        if isinstance(fm.weighting, FreeMatchThresholds):
            logs["train_freematch_tau"] = fm.weighting.tau
        else:
            logs["train_softmatch_mu"] = fm.weighting.mu
    else:
        out = fixmatch_loss(logits_s, weak, fm.cfg, step=int(module.global_step), da=fm.da, flex=fm.flex,
                            indices=index)
    sup = module.loss(logits_sup, y_sup)
    loss = sup + out.loss
    logs.update({"train_unsup_loss": out.loss_u.detach(), "train_unsup_weight": float(out.weight),
                 "train_mask_rate": out.mask_rate})
    if true is not None:
        known = true >= 0
        if bool(known.any()):
            hit = _hard(out.targets) == true
            logs["train_pseudo_acc_all"] = hit[known].float().mean()
            confident = known & out.mask
            if bool(confident.any()):
                logs["train_pseudo_acc"] = hit[confident].float().mean()
    teacher_logits = None
    student = torch.cat([logits_sup, logits_s])
    if old_weak is not None and expansion.cfg.distill > 0:  # LwF: old model on weak views, student on strong
        parts = [expansion.old_logits(x)] + ([old_weak[replayed]] if replayed is not None else []) + [old_weak]
        teacher_logits = torch.cat(parts)
    return loss, sup, logits_l, student, teacher_logits
