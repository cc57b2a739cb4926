"""FixMatch building blocks: pseudo-labels, confidence masks, the unlabeled loss, EMA teacher,
distribution alignment and FlexMatch class-adaptive thresholds. Pure PyTorch, no Lightning.
The stateful helpers (EMA teacher, alignment, FlexMatch) are defined in :mod:`visiontune.objectives.semisup_state`
and re-exported here.

One FixMatch step, for a labeled batch ``(x_l, y_l)`` of size B and an unlabeled batch of size
``mu * B`` seen twice (``x_w`` weakly and ``x_s`` strongly augmented)::

    cfg = FixMatchConfig(threshold=0.95, mu=7)
    weak = predict_weak(teacher_or_model, x_w)                # no graph, detached logits
    logits_l, logits_s = forward_train(model, x_l, x_s, cfg.bn)
    out = fixmatch_loss(logits_s, weak, cfg, step=global_step, da=da, flex=flex, indices=idx)
    loss = F.cross_entropy(logits_l, y_l) + out.loss          # out.loss = lambda_u * warm-up * L_u

Semantics worth knowing:

* A sample is confident when its top probability is **>= the threshold** (``p == tau`` counts).
* ``temperature`` divides the weak logits before the one softmax whose probabilities drive both
  the mask and the soft targets (T = 1 is the paper; T < 1 sharpens and raises confidences).
* The unlabeled loss is the masked cross-entropy averaged over **all** unlabeled samples (masked
  ones count as zero), as in the paper, so its scale falls as fewer samples pass the threshold.
* The weak branch never needs a graph: its logits only become detached targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .semisup_state import DistributionAlignment, EMATeacher, FlexMatchThresholds, align_distribution  # noqa: F401

__all__ = [
    "DistributionAlignment",
    "EMATeacher",
    "FixMatchConfig",
    "FixMatchOutput",
    "FlexMatchThresholds",
    "fixmatch_loss",
    "forward_train",
    "predict_weak",
    "pseudo_labels",
    "unlabeled_loss",
    "unsup_weight",
]

_THRESHOLD_MODES = ("fixed", "flexmatch")
_ALGORITHMS = ("fixmatch", "freematch", "softmatch")
_BN_MODES = ("concat", "separate")


@dataclass
class FixMatchConfig:
    """Options of FixMatch (Sohn et al., 2020) and its common extensions.

    Args:
        threshold: confidence threshold tau in (0, 1); a pseudo-label is kept when its top
            probability is ``>= threshold``. Paper: 0.95.
        mu: unlabeled-to-labeled batch-size ratio (>= 1), read by the data side. Paper: 7; with a
            pretrained backbone 1 already works well.
        lambda_u: weight of the unlabeled loss (>= 0). Paper: 1.
        temperature: softmax temperature (> 0) applied to the weak logits before masking and
            before building soft targets. 1 = paper.
        hard_labels: True = argmax pseudo-labels (paper); False = soft targets, the
            (temperature-sharpened, aligned) probabilities.
        warmup_steps: the unlabeled weight ramps linearly from 0 to ``lambda_u`` over this many
            steps (>= 0; 0 = no ramp). See :func:`unsup_weight`.
        ema: decay in (0, 1) of an EMA teacher (:class:`EMATeacher`) used for pseudo-labels and
            evaluation; None = off (the student labels itself, as in the paper; the paper's EMA
            is for evaluation only).
        distribution_alignment: rescale weak probabilities by ``target / running mean`` of the
            model's predictions (ReMixMatch); see :class:`DistributionAlignment`.
        class_thresholds: ``"fixed"`` (one tau for all classes) or ``"flexmatch"`` (class-adaptive
            thresholds from learning status; see :class:`FlexMatchThresholds`).
        bn: how labeled and strongly augmented unlabeled batches meet BatchNorm, see
            :func:`forward_train`. ``"concat"`` (default): one forward of ``cat(x_l, x_s)``, so
            BN normalises them with shared batch statistics, as in the paper (which concatenates
            labeled, weak and strong). A labeled batch of a few images gets no noisy statistics
            of its own, the running statistics see the mixture the model is trained on, and one
            forward is cheaper than two. ``"separate"``: two forwards, each batch normalised by
            its own statistics (running stats updated twice per step); use it when labeled and
            unlabeled images come from visibly different distributions, or to bound peak memory.
            For models without BatchNorm (ViTs) the two give the same losses.
        algorithm: ``"fixmatch"``, ``"freematch"`` or ``"softmatch"`` (:mod:`visiontune.objectives.weighting`;
            the last two ignore ``threshold``). ``state_momentum``: their EMA momentum in [0, 1) (paper 0.999);
            ``fairness_weight``: FreeMatch's fairness-loss weight (>= 0, USB's default 0.01).

    Example:
        >>> cfg = FixMatchConfig(threshold=0.9, mu=1, ema=0.999)
        >>> FixMatchConfig(threshold=1.0)
        Traceback (most recent call last):
        ...
        visiontune.errors.ConfigError: FixMatchConfig.threshold must be in (0, 1) (exclusive); got 1.0
    """

    threshold: float = 0.95
    mu: int = 7
    lambda_u: float = 1.0
    temperature: float = 1.0
    hard_labels: bool = True
    warmup_steps: int = 0
    ema: float | None = None
    distribution_alignment: bool = False
    class_thresholds: str = "fixed"
    bn: str = "concat"
    algorithm: str = "fixmatch"
    state_momentum: float = 0.999
    fairness_weight: float = 0.01

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ConfigError:
            return ConfigError(f"FixMatchConfig.{name} must be {allowed}; got {getattr(self, name)!r}")

        if not _is_real(self.threshold) or not 0.0 < self.threshold < 1.0:
            raise bad("threshold", "in (0, 1) (exclusive)")
        if not _is_int(self.mu) or self.mu < 1:
            raise bad("mu", "an int >= 1")
        if not _is_real(self.lambda_u) or self.lambda_u < 0:
            raise bad("lambda_u", "a float >= 0")
        if not _is_real(self.temperature) or not self.temperature > 0:
            raise bad("temperature", "a float > 0")
        if not isinstance(self.hard_labels, bool):
            raise bad("hard_labels", "a bool")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise bad("warmup_steps", "an int >= 0")
        if self.ema is not None and (not _is_real(self.ema) or not 0.0 < self.ema < 1.0):
            raise bad("ema", "None or in (0, 1) (exclusive)")
        if not isinstance(self.distribution_alignment, bool):
            raise bad("distribution_alignment", "a bool")
        if self.class_thresholds not in _THRESHOLD_MODES:
            raise bad("class_thresholds", f"one of {_THRESHOLD_MODES}")
        if self.bn not in _BN_MODES:
            raise bad("bn", f"one of {_BN_MODES}")
        if self.algorithm not in _ALGORITHMS:
            raise ConfigError(f"model.semi_supervised.algorithm must be one of {', '.join(_ALGORITHMS)}; "
                              f"got {self.algorithm!r}")
        if not _is_real(self.state_momentum) or not 0.0 <= self.state_momentum < 1.0:
            raise bad("state_momentum", "in [0, 1)")
        if not _is_real(self.fairness_weight) or self.fairness_weight < 0:
            raise bad("fairness_weight", "a float >= 0")
        if self.algorithm != "fixmatch" and self.class_thresholds != "fixed":
            raise bad("class_thresholds", f"'fixed' with algorithm {self.algorithm!r} (its own thresholds)")
        if self.algorithm == "softmatch" and self.distribution_alignment:
            raise bad("distribution_alignment", "false with algorithm 'softmatch' (it aligns uniformly itself)")


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --- weak branch and training forward ---------------------------------------------------------


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def predict_weak(model: nn.Module, x_weak: Tensor, *, update_bn_stats: bool = True) -> Tensor:
    """Logits of the weakly augmented unlabeled batch, computed without building a graph.

    Contract: the weak branch only produces pseudo-labels (targets), so it runs under
    ``torch.no_grad()``; the result has ``requires_grad=False`` and ``grad_fn=None`` and costs no
    activation memory. The model's train/eval mode is left as it is (FixMatch computes the weak
    branch in train mode, BN on batch statistics).

    Args:
        model: the student, or ``EMATeacher.module`` (which is always in eval mode).
        x_weak: weakly augmented unlabeled images ``(mu*B, C, H, W)``.
        update_bn_stats: when the model is in train mode, whether this forward may move the
            BatchNorm running statistics. True (default) matches the paper, whose running
            statistics are fed by labeled, weak and strong images alike; False restores them
            (and ``num_batches_tracked``) exactly after the forward.

    Returns:
        Detached logits ``(mu*B, num_classes)``.

    Example:
        >>> m = nn.Linear(4, 3)
        >>> z = predict_weak(m, torch.randn(2, 4))
        >>> z.requires_grad, z.grad_fn
        (False, None)
    """
    saved: list[tuple[nn.Module, dict[str, Tensor]]] = []
    if not update_bn_stats:
        for bn in _batchnorms(model):
            if bn.training and bn.track_running_stats:
                saved.append((bn, {k: v.clone() for k, v in bn.named_buffers(recurse=False) if v is not None}))
    try:
        logits = model(x_weak)
    finally:
        for bn, bufs in saved:
            for k, v in bufs.items():
                getattr(bn, k).copy_(v)
    return logits.detach()


def forward_train(
    model: nn.Module, x_labeled: Tensor, x_strong: Tensor, bn: str = "concat"
) -> tuple[Tensor, Tensor]:
    """Logits of the labeled and the strongly augmented batches, with the BN policy ``bn``.

    Args:
        model: the student (train mode).
        x_labeled: labeled images ``(B, C, H, W)``.
        x_strong: strongly augmented unlabeled images ``(mu*B, C, H, W)``.
        bn: ``"concat"``: one forward of ``cat(x_labeled, x_strong)`` (shared BN batch statistics,
            as in the paper); ``"separate"``: two forwards. See :class:`FixMatchConfig`.

    Returns:
        ``(logits_labeled, logits_strong)``, both part of the graph.

    Example:
        >>> ll, ls = forward_train(nn.Linear(4, 3), torch.randn(2, 4), torch.randn(6, 4))
        >>> ll.shape, ls.shape
        (torch.Size([2, 3]), torch.Size([6, 3]))
    """
    if bn == "concat":
        logits = model(torch.cat([x_labeled, x_strong], dim=0))
        return logits[: x_labeled.shape[0]], logits[x_labeled.shape[0] :]
    if bn == "separate":
        return model(x_labeled), model(x_strong)
    raise ValueError(f"bn must be one of {_BN_MODES}; got {bn!r}")


# --- pseudo-labels and losses -----------------------------------------------------------------


def _class_thresholds(flex_state: FlexMatchThresholds | Tensor, num_classes: int) -> Tensor:
    thr = flex_state if isinstance(flex_state, Tensor) else flex_state.thresholds()
    if not isinstance(thr, Tensor) or thr.shape != (num_classes,):
        raise ValueError(
            f"flex_state must be a FlexMatchThresholds or a tensor of {num_classes} thresholds; "
            f"got {getattr(thr, 'shape', type(thr).__name__)}"
        )
    return thr


def _targets_and_mask(
    probs: Tensor,
    cfg: FixMatchConfig,
    class_prob_mean: Tensor | None,
    flex_state: FlexMatchThresholds | Tensor | None,
    target_dist: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    if cfg.distribution_alignment:
        if class_prob_mean is None:
            raise ValueError("distribution_alignment=True needs class_prob_mean (DistributionAlignment.mean)")
        probs = align_distribution(probs, class_prob_mean, target_dist)
    elif class_prob_mean is not None:
        raise ValueError("class_prob_mean was given but distribution_alignment=False")
    conf, hard = probs.max(dim=-1)
    if cfg.class_thresholds == "flexmatch":
        if flex_state is None:
            raise ValueError("class_thresholds='flexmatch' needs flex_state (FlexMatchThresholds)")
        thr = _class_thresholds(flex_state, probs.shape[-1]).to(probs)[hard]
    else:
        if flex_state is not None:
            raise ValueError("flex_state was given but class_thresholds='fixed'")
        thr = torch.full_like(conf, cfg.threshold)
    mask = conf >= thr
    targets = hard if cfg.hard_labels else probs
    return targets, mask, probs


def pseudo_labels(
    weak_logits: Tensor,
    cfg: FixMatchConfig,
    *,
    class_prob_mean: Tensor | None = None,
    flex_state: FlexMatchThresholds | Tensor | None = None,
    target_dist: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pseudo-labels and confidence mask from weak-branch logits (pure: updates no state).

    ``p = softmax(weak_logits / T)``; with distribution alignment ``p <- p * target / mean``,
    renormalised to sum to 1; ``mask = max(p) >= threshold`` (per predicted class with FlexMatch).

    Args:
        weak_logits: ``(N, C)`` logits of the weak views (detached inside).
        cfg: the FixMatch options (threshold, temperature, hard_labels, distribution_alignment,
            class_thresholds).
        class_prob_mean: ``(C,)`` running mean of the model's predictions; required exactly when
            ``cfg.distribution_alignment`` (see :class:`DistributionAlignment`).
        flex_state: a :class:`FlexMatchThresholds` or a ``(C,)`` tensor of per-class thresholds;
            required exactly when ``cfg.class_thresholds == "flexmatch"``.
        target_dist: ``(C,)`` target class distribution for alignment; None = uniform.

    Returns:
        ``(targets, mask)``: targets are ``(N,)`` int64 class ids (hard) or ``(N, C)`` probabilities
        (soft); mask is ``(N,)`` bool.

    Example:
        >>> cfg = FixMatchConfig(threshold=0.5)
        >>> t, m = pseudo_labels(torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]]), cfg)
        >>> t.tolist(), m.tolist()   # p == 0.5 on the first row counts as confident
        ([0, 0, 1], [True, True, True])
    """
    probs = torch.softmax(weak_logits.detach().float() / cfg.temperature, dim=-1)
    targets, mask, _ = _targets_and_mask(probs, cfg, class_prob_mean, flex_state, target_dist)
    return targets, mask


def unlabeled_loss(strong_logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Masked cross-entropy of the strong views against pseudo-labels, averaged over ALL samples.

    ``L_u = 1/N * sum_i mask_i * CE(strong_i, target_i)`` (FixMatch eq. 4): masked-out samples
    count as zeros in the mean, not removed from it. An empty mask gives exactly 0 (still attached
    to the graph, so ``backward`` works and yields zero gradients).

    Args:
        strong_logits: ``(N, C)`` logits of the strong views (with graph).
        targets: ``(N,)`` class ids, or ``(N, C)`` soft targets (rows summing to 1).
        mask: ``(N,)`` bool or float weights.

    Returns:
        A scalar tensor.

    Example:
        >>> z = torch.zeros(4, 2, requires_grad=True)
        >>> unlabeled_loss(z, torch.tensor([0, 1, 0, 1]), torch.tensor([True, False, False, False]))
        tensor(0.1733, grad_fn=<MeanBackward0>)
    """
    if strong_logits.shape[0] != targets.shape[0] or mask.shape != (strong_logits.shape[0],):
        raise ValueError(
            f"strong_logits {tuple(strong_logits.shape)}, targets {tuple(targets.shape)} and mask "
            f"{tuple(mask.shape)} must share the batch size"
        )
    if strong_logits.shape[0] == 0:
        return strong_logits.sum() * 0.0
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        ce = F.cross_entropy(strong_logits, targets.long(), reduction="none")
    else:
        ce = -(targets.detach().to(strong_logits.dtype) * F.log_softmax(strong_logits, dim=-1)).sum(-1)
    return (ce * mask.to(ce.dtype)).mean()


def unsup_weight(step: int, cfg: FixMatchConfig) -> float:
    """Weight of the unlabeled loss at ``step``: ``lambda_u * min(1, step / warmup_steps)``.

    Linear ramp from 0 at step 0 to ``lambda_u`` at ``step >= warmup_steps``; constant
    ``lambda_u`` when ``warmup_steps == 0``.

    Example:
        >>> cfg = FixMatchConfig(lambda_u=2.0, warmup_steps=10)
        >>> unsup_weight(0, cfg), unsup_weight(5, cfg), unsup_weight(50, cfg)
        (0.0, 1.0, 2.0)
    """
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")
    if cfg.warmup_steps == 0:
        return float(cfg.lambda_u)
    return float(cfg.lambda_u) * min(1.0, step / cfg.warmup_steps)


@dataclass
class FixMatchOutput:
    """What :func:`fixmatch_loss` returns.

    Attributes:
        loss: ``weight * loss_u``, to add to the supervised loss.
        loss_u: the unweighted unlabeled loss (for logging).
        weight: ``unsup_weight(step, cfg)``.
        targets: pseudo-labels (hard ``(N,)`` or soft ``(N, C)``).
        mask: ``(N,)`` bool confidence mask.
        mask_rate: fraction of confident samples (SoftMatch: the mean weight), a 0-dim tensor (no host sync).
        weights: ``(N,)`` float per-sample weights of the loss (FreeMatch / SoftMatch; None: ``mask``).
        loss_fair: FreeMatch's unweighted fairness loss (None otherwise).
    """

    loss: Tensor
    loss_u: Tensor
    weight: float
    targets: Tensor
    mask: Tensor
    mask_rate: Tensor
    weights: Tensor | None = None
    loss_fair: Tensor | None = None


def fixmatch_loss(
    strong_logits: Tensor,
    weak_logits: Tensor,
    cfg: FixMatchConfig,
    *,
    step: int = 0,
    da: DistributionAlignment | None = None,
    flex: FlexMatchThresholds | None = None,
    indices: Tensor | None = None,
) -> FixMatchOutput:
    """The weighted unlabeled loss of one step, updating the stateful helpers.

    Order (as in USB): softmax(weak / T) -> ``da.update`` then align -> mask with the current
    (FlexMatch) thresholds -> ``flex.update(indices, probs)`` -> masked CE of the strong views.

    Args:
        strong_logits: ``(N, C)`` logits of the strong views (with graph).
        weak_logits: ``(N, C)`` logits of the weak views (e.g. from :func:`predict_weak`).
        cfg: FixMatch options.
        step: global step, for the warm-up of :func:`unsup_weight`.
        da: required when ``cfg.distribution_alignment``.
        flex: required when ``cfg.class_thresholds == "flexmatch"``, together with ``indices``.
        indices: ``(N,)`` positions of the unlabeled samples in the pool (FlexMatch only).

    Returns:
        A :class:`FixMatchOutput`.

    Example:
        >>> cfg = FixMatchConfig(threshold=0.9)
        >>> strong = torch.zeros(3, 2, requires_grad=True)
        >>> out = fixmatch_loss(strong, torch.tensor([[5.0, 0.0], [0.0, 0.0], [0.0, 9.0]]), cfg)
        >>> out.mask.tolist(), round(out.mask_rate.item(), 3)
        ([True, False, True], 0.667)
    """
    if strong_logits.shape != weak_logits.shape:
        raise ValueError(f"strong_logits {tuple(strong_logits.shape)} and weak_logits "
                         f"{tuple(weak_logits.shape)} must have the same shape")
    if cfg.algorithm != "fixmatch":
        raise ValueError(f"{cfg.algorithm}'s loss is visiontune.objectives.weighting.adaptive_loss")
    probs = torch.softmax(weak_logits.detach().float() / cfg.temperature, dim=-1)
    mean = None
    if cfg.distribution_alignment:
        if da is None:
            raise ValueError("distribution_alignment=True needs da=DistributionAlignment(...)")
        da.update(probs)
        mean = da.mean
    flex_state = None
    if cfg.class_thresholds == "flexmatch":
        if flex is None or indices is None:
            raise ValueError("class_thresholds='flexmatch' needs flex=FlexMatchThresholds(...) and indices")
        flex_state = flex.thresholds()
    targets, mask, aligned = _targets_and_mask(
        probs, cfg, mean, flex_state, None if da is None else da.target
    )
    if flex is not None and flex_state is not None:
        flex.update(indices, aligned)
    loss_u = unlabeled_loss(strong_logits, targets, mask)
    w = unsup_weight(step, cfg)
    rate = mask.float().mean() if mask.numel() else mask.new_zeros((), dtype=torch.float32)
    return FixMatchOutput(loss=loss_u * w, loss_u=loss_u, weight=w, targets=targets, mask=mask, mask_rate=rate)
