"""Stateful FixMatch helpers: distribution alignment, FlexMatch class-adaptive thresholds, EMA teacher.

Each keeps state across steps (running means, per-sample selections, averaged weights) and saves it with
``state_dict`` / ``load_state_dict`` as plain tensors, so :class:`~visiontune.FixMatchState` can put it in a
Lightning checkpoint. The stateless pieces (config, pseudo-labels, loss) live in :mod:`visiontune.objectives.semisup`.

Example:
    >>> da = DistributionAlignment(3)
    >>> da.update(torch.tensor([[0.8, 0.1, 0.1]]))
    >>> round(da.mean.sum().item(), 6)
    1.0
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator, Protocol

import torch
from torch import Tensor, nn

# This module is below visiontune.objectives.semisup (which re-exports its classes): it imports nothing from it.
__all__ = ["DistributionAlignment", "EMATeacher", "FlexMatchThresholds", "align_distribution", "grown_distribution"]


class _ThresholdOptions(Protocol):
    """What :meth:`FlexMatchThresholds.from_config` reads: a :class:`~visiontune.objectives.semisup.FixMatchConfig`."""

    threshold: float


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def align_distribution(probs: Tensor, class_prob_mean: Tensor, target_dist: Tensor | None) -> Tensor:
    """Distribution alignment: ``probs * target / mean``, renormalised so each row sums to 1.

    Args:
        probs: ``(N, C)`` class probabilities.
        class_prob_mean: ``(C,)`` running mean of the model's predictions (:attr:`DistributionAlignment.mean`).
        target_dist: ``(C,)`` target class distribution; None = uniform.

    Example:
        >>> align_distribution(torch.tensor([[0.5, 0.5]]), torch.tensor([0.75, 0.25]), None).tolist()
        [[0.25, 0.75]]
    """
    c = probs.shape[-1]
    if class_prob_mean.shape != (c,):
        raise ValueError(f"class_prob_mean must have shape ({c},); got {tuple(class_prob_mean.shape)}")
    mean = class_prob_mean.to(probs)
    target = torch.full_like(mean, 1.0 / c) if target_dist is None else target_dist.to(probs)
    if target.shape != (c,):
        raise ValueError(f"target_dist must have shape ({c},); got {tuple(target.shape)}")
    aligned = probs * (target / mean.clamp_min(1e-12))
    return aligned / aligned.sum(dim=-1, keepdim=True)


def grown_distribution(values: Tensor, num_classes: int) -> Tensor:
    """A ``(C,)`` distribution extended to ``num_classes`` C' >= C when classes are added: the old entries scaled
    by C/C', the new ones at the fresh value 1/C' (a distribution keeps summing to 1).

    Example:
        >>> grown_distribution(torch.tensor([0.75, 0.25]), 4).tolist()
        [0.375, 0.125, 0.25, 0.25]
    """
    old = values.shape[0]
    if num_classes < old:
        raise ValueError(f"classes can only be added: {old} -> {num_classes}")
    fresh = torch.full((num_classes - old,), 1.0 / num_classes, dtype=values.dtype, device=values.device)
    return torch.cat([values * (old / num_classes), fresh])


class DistributionAlignment:
    """Running mean of the model's class predictions on unlabeled batches (ReMixMatch's DA).

    ``mean <- momentum * mean + (1 - momentum) * batch_mean(probs)``; the first update sets
    ``mean`` to the first batch mean (a uniform start would take ~1/(1-momentum) steps to forget).
    Aligned probabilities are ``p * target / mean``, renormalised: classes the model predicts too
    often are damped, rare ones boosted, pulling pseudo-labels toward ``target``.

    Under DDP each process keeps its own mean (batch means are not all-reduced here).

    Args:
        num_classes: C.
        momentum: EMA momentum in [0, 1). Default 0.999.
        target: ``(C,)`` target distribution (e.g. the labeled class prior); None = uniform.

    Example:
        >>> da = DistributionAlignment(3)
        >>> da.update(torch.tensor([[0.8, 0.1, 0.1]]))
        >>> da.align(torch.tensor([[0.8, 0.1, 0.1]])).sum().item()
        1.0
    """

    def __init__(self, num_classes: int, momentum: float = 0.999, target: Tensor | None = None) -> None:
        if not _is_int(num_classes) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}")
        self.num_classes = num_classes
        self.momentum = float(momentum)
        if target is None:
            target = torch.full((num_classes,), 1.0 / num_classes)
        target = torch.as_tensor(target, dtype=torch.float32)
        if target.shape != (num_classes,) or (target < 0).any() or target.sum() <= 0:
            raise ValueError(f"target must be {num_classes} non-negative values; got {target.tolist()}")
        self.target = target / target.sum()
        self.mean = torch.full((num_classes,), 1.0 / num_classes)
        self.steps = 0

    @torch.no_grad()
    def update(self, probs: Tensor) -> None:
        """Fold the batch mean of ``probs`` ``(N, C)`` into the running mean."""
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs must be (N, {self.num_classes}); got {tuple(probs.shape)}")
        if probs.shape[0] == 0:
            return
        batch = probs.detach().float().mean(dim=0)
        if self.mean.device != batch.device:  # follow the model's device: no per-step copies
            self.mean, self.target = self.mean.to(batch.device), self.target.to(batch.device)
        if self.steps == 0:
            self.mean = batch.clone()
        else:
            self.mean = self.momentum * self.mean + (1.0 - self.momentum) * batch
        self.steps += 1

    def align(self, probs: Tensor) -> Tensor:
        """``probs * target / mean``, renormalised so each row sums to 1."""
        return align_distribution(probs, self.mean, self.target)

    def grow(self, num_classes: int) -> None:
        """Add classes (:func:`grown_distribution`): the running mean and the target both grow."""
        self.mean = grown_distribution(self.mean, num_classes)
        self.target = grown_distribution(self.target, num_classes)
        self.num_classes = num_classes

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.clone(), "target": self.target.clone(), "steps": self.steps,
                "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mean = torch.as_tensor(state["mean"], dtype=torch.float32)
        if mean.shape != (self.num_classes,):
            raise ValueError(
                f"DistributionAlignment state has {tuple(mean.shape)} classes, expected {self.num_classes}"
            )
        self.mean = mean.clone()
        self.target = torch.as_tensor(state["target"], dtype=torch.float32).clone()
        self.steps = int(state["steps"])
        self.momentum = float(state.get("momentum", self.momentum))


class FlexMatchThresholds:
    """FlexMatch's class-adaptive thresholds (Zhang et al., 2021), "curriculum pseudo-labeling".

    For every sample of the unlabeled pool it remembers the class last predicted with confidence
    ``>= threshold`` (or -1 if never). ``sigma_c`` = samples currently assigned to class c is the
    learning effect of c; ``beta_c = sigma_c / max(max_c' sigma_c', N_unused)`` with the warm-up
    (``N_unused`` = never-confident samples; without warm-up the denominator is ``max sigma``), and
    ``threshold_c = tau * beta_c / (2 - beta_c)`` (convex mapping). Classes learned as well as the
    best one get ``tau``; under-learned classes get lower thresholds so they receive more
    pseudo-labels. At the very start every ``beta_c`` is 0 (so is every threshold): all
    predictions count, until the pool's confident predictions accumulate.

    Args:
        num_samples: size of the unlabeled pool (indices run over ``[0, num_samples)``).
        num_classes: C.
        threshold: tau in (0, 1), also the fixed threshold that records confident predictions.
        warmup: use the threshold warm-up (paper default True).

    Example:
        >>> flex = FlexMatchThresholds(num_samples=4, num_classes=2, threshold=0.9)
        >>> flex.update(torch.tensor([0, 1, 2, 3]), torch.tensor([[0.95, 0.05]] * 2 + [[0.05, 0.95]] * 2))
        >>> flex.thresholds()
        tensor([0.9000, 0.9000])
    """

    def __init__(self, num_samples: int, num_classes: int, threshold: float = 0.95, warmup: bool = True) -> None:
        if not _is_int(num_samples) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1; got {num_samples!r}")
        if not _is_int(num_classes) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1); got {threshold}")
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.threshold = float(threshold)
        self.warmup = bool(warmup)
        self.selected = torch.full((num_samples,), -1, dtype=torch.long)

    @classmethod
    def from_config(cls, cfg: _ThresholdOptions, num_samples: int, num_classes: int) -> FlexMatchThresholds:
        return cls(num_samples, num_classes, threshold=cfg.threshold)

    def counts(self) -> Tensor:
        """``(C,)`` sigma_c: pool samples whose last confident prediction is class c."""
        return torch.bincount(self.selected + 1, minlength=self.num_classes + 1)[1:].float()

    def beta(self) -> Tensor:
        """``(C,)`` normalised learning effect in [0, 1]."""
        sigma = self.counts()
        denom = sigma.max()
        if self.warmup:
            denom = torch.maximum(denom, (self.selected < 0).sum().float())
        return sigma / denom.clamp_min(1.0)  # sigma is all 0 when denom is 0: no host sync

    def thresholds(self) -> Tensor:
        """``(C,)`` class thresholds ``tau * beta / (2 - beta)``."""
        b = self.beta()
        return self.threshold * b / (2.0 - b)

    @torch.no_grad()
    def update(self, indices: Tensor, probs: Tensor) -> None:
        """Record the confident (``max p >= tau``) predictions of pool samples ``indices``."""
        indices = torch.as_tensor(indices).long()
        if self.selected.device != probs.device:  # follow the model's device: no per-step sync
            self.selected = self.selected.to(probs.device)
        indices = indices.to(probs.device)
        if probs.shape != (indices.shape[0], self.num_classes):
            raise ValueError(
                f"probs must be ({indices.shape[0]}, {self.num_classes}) to match indices; got {tuple(probs.shape)}"
            )
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise ValueError(f"indices must lie in [0, {self.num_samples}); got min {int(indices.min())}, "
                             f"max {int(indices.max())}")
        conf, cls = probs.detach().float().max(dim=-1)
        keep = conf >= self.threshold
        self.selected[indices[keep]] = cls[keep]

    def state_dict(self) -> dict[str, Any]:
        return {"selected": self.selected.clone(), "threshold": self.threshold, "warmup": self.warmup,
                "num_classes": self.num_classes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sel = torch.as_tensor(state["selected"]).long()
        if sel.shape != (self.num_samples,) or int(state.get("num_classes", self.num_classes)) != self.num_classes:
            raise ValueError(
                f"FlexMatchThresholds state is for {sel.shape[0]} samples / "
                f"{state.get('num_classes')} classes; this one has {self.num_samples} / {self.num_classes}"
            )
        self.selected = sel.clone()
        self.threshold = float(state["threshold"])
        self.warmup = bool(state["warmup"])


class EMATeacher:
    """An exponential-moving-average copy of a model, for pseudo-labels and evaluation.

    After each optimizer step, :meth:`update` does, under ``torch.no_grad``, for every parameter
    and every floating-point buffer (BN running statistics)::

        teacher = decay * teacher + (1 - decay) * student

    (as ``teacher.lerp_(student, 1 - decay)``: exact where the student equals the teacher, so the frozen
    tensors a strategy never trains stay bit-identical to the base and a task delta of the teacher loads onto
    the base), and copies non-floating buffers (``num_batches_tracked``). The teacher is a deep copy, kept in
    eval mode with ``requires_grad=False``. It is deliberately not an ``nn.Module`` attribute: its
    parameters must not reach an optimizer built from ``model.parameters()`` and a parent's
    ``.train()`` must not flip it; persist it with :meth:`state_dict` (e.g. in Lightning's
    ``on_save_checkpoint``). It follows the student to its device on ``update``.

    Args:
        model: the student to copy.
        decay: in (0, 1), e.g. 0.999.

    Example:
        >>> student = nn.Linear(2, 2)
        >>> ema = EMATeacher(student, decay=0.99)
        >>> ema.update(student)             # after optimizer.step()
        >>> with torch.no_grad():
        ...     y = ema.module(torch.zeros(1, 2))
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1); got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self._module = copy.deepcopy(model)
        self._module.eval()
        self._module.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The teacher module (eval mode, no grad)."""
        return self._module

    def _pairs(self, model: nn.Module) -> Iterator[tuple[str, Tensor, Tensor, bool]]:
        t_params = dict(self._module.named_parameters())
        t_bufs = dict(self._module.named_buffers())
        s_params = dict(model.named_parameters())
        s_bufs = dict(model.named_buffers())
        if t_params.keys() != s_params.keys() or t_bufs.keys() != s_bufs.keys():
            missing = (s_params.keys() | s_bufs.keys()) ^ (t_params.keys() | t_bufs.keys())
            raise ValueError(f"EMATeacher: student and teacher differ in tensors {sorted(missing)[:5]}")
        for k, t in t_params.items():
            yield k, t, s_params[k], True
        for k, t in t_bufs.items():
            yield k, t, s_bufs[k], t.is_floating_point()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the teacher toward ``model``: ``t = decay * t + (1 - decay) * s``."""
        first = next(iter(model.parameters()), None)
        if first is not None and next(self._module.parameters()).device != first.device:
            self._module.to(first.device)
        d = self.decay
        for _, t, s, average in self._pairs(model):
            if average:  # not mul_ + add_: d * t + (1 - d) * t rounds away from t
                t.lerp_(s.detach().to(t.dtype), 1.0 - d)
            else:
                t.copy_(s)
        self.num_updates += 1

    @contextmanager
    def evaluating(self) -> Iterator[nn.Module]:
        """Context: yields the teacher in eval mode under ``torch.no_grad``."""
        self._module.eval()
        with torch.no_grad():
            yield self._module

    def __call__(self, x: Tensor) -> Tensor:
        """Teacher logits (eval mode, no graph)."""
        with self.evaluating() as m:
            return m(x)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "module": {k: v.detach().clone() for k, v in self._module.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._module.load_state_dict(state["module"])
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self._module.eval()
