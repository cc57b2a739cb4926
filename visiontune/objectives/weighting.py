"""FreeMatch and SoftMatch: FixMatch with thresholds or weights that adapt to the model's confidence.

Chosen with ``FixMatchConfig(algorithm=...)`` (YAML ``model.semi_supervised.algorithm``); everything else of a
FixMatch step (weak branch without a graph, one forward of ``cat(labeled, strong)``, EMA teacher, warm-up,
class expansion's anchoring and replay) stays as it is. Only the per-sample weights of the unlabeled loss
``L_u = 1/N sum_i w_i CE(strong_i, target_i)`` change:

* ``fixmatch``: ``w_i = [max p_i >= tau]`` with a fixed ``tau`` (:func:`visiontune.objectives.semisup.fixmatch_loss`).
* ``freematch`` (Wang et al., ICLR 2023, self-adaptive thresholds, :class:`FreeMatchThresholds`): a global
  ``tau_t``, the EMA of the mean max-confidence of the weak predictions, scaled per class by
  ``MaxNorm(p~_t)``, the EMA of the mean probability vector divided by its largest entry:
  ``w_i = [max p_i >= MaxNorm(p~_t)(c_i) * tau_t]``, ``c_i = argmax p_i``. Plus the self-adaptive fairness
  loss :func:`fairness_loss` on the strong views, weighted by ``fairness_weight``.
* ``softmatch`` (Chen et al., ICLR 2023, :class:`SoftMatchWeights`): a truncated Gaussian of the
  max-confidence, with the EMA mean ``mu_t`` and variance ``sigma2_t`` of it:
  ``w_i = exp(-(max p_i - mu_t)^2 / (2 sigma2_t))`` below ``mu_t``, 1 above (``lambda_max`` is ``lambda_u``),
  computed on uniformly aligned probabilities (``p * (1/C) / EMA mean``, renormalised); the pseudo-labels
  themselves come from the unaligned probabilities.

Both keep EMA state (momentum ``state_momentum``, paper 0.999) that starts at ``1/C`` (``tau``, ``p~``, the label
histogram ``h~``, ``mu``) and ``sigma2 = 1``; it is updated with each weak batch *before* that batch is weighted,
saved as plain tensors (:meth:`state_dict`, the checkpoint's ``visiontune_fixmatch["weighting"]``) and grows with
the classes (:meth:`grow`: when classes are added, the new ones start at the fresh value ``1/C'``).

Example:
    >>> cfg = FixMatchConfig(algorithm="softmatch", mu=1)
    >>> state = SoftMatchWeights(num_classes=2, momentum=0.5)
    >>> weak = torch.tensor([[4.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    >>> out = adaptive_loss(torch.zeros(3, 2, requires_grad=True), weak, cfg, state=state)
    >>> out.mask.tolist(), [round(w, 4) for w in out.weights.tolist()]   # sigma2 starts at 1: weights near 1
    ([True, False, True], [1.0, 0.9967, 1.0])
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from .semisup import FixMatchConfig, FixMatchOutput, unlabeled_loss, unsup_weight
from .semisup_state import DistributionAlignment, grown_distribution

__all__ = ["FreeMatchThresholds", "SoftMatchWeights", "adaptive_loss", "fairness_loss", "freematch_mask",
           "softmatch_weights"]


def _check(num_classes: Any, momentum: Any) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
    if not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"momentum must be in [0, 1); got {momentum}")


def freematch_mask(probs: Tensor, tau: Tensor | float, p_model: Tensor) -> Tensor:
    """FreeMatch's self-adaptive mask: ``max p >= MaxNorm(p_model)[argmax p] * tau`` (pure).

    Args:
        probs: ``(N, C)`` weak-view probabilities.
        tau: the global threshold ``tau_t``.
        p_model: ``(C,)`` EMA of the mean probability vector ``p~_t``.

    Example:
        >>> freematch_mask(torch.tensor([[0.5, 0.5], [0.4, 0.6]]), 0.8, torch.tensor([0.5, 0.25])).tolist()
        [False, True]
    """
    conf, cls = probs.max(dim=-1)
    local = p_model.to(probs) / p_model.to(probs).max()
    return conf >= local[cls] * torch.as_tensor(tau).to(probs)


def softmatch_weights(probs: Tensor, mu: Tensor | float, var: Tensor | float) -> Tensor:
    """SoftMatch's truncated Gaussian weights: ``exp(-(max p - mu)^2 / (2 var))`` for ``max p < mu``, else 1 (pure).

    Args:
        probs: ``(N, C)`` (aligned) weak-view probabilities.
        mu: EMA mean ``mu_t`` of the max-confidence.
        var: EMA variance ``sigma2_t`` of the max-confidence.

    Example:
        >>> [round(w, 6) for w in softmatch_weights(torch.tensor([[0.9, 0.1], [0.5, 0.5]]), 0.7, 0.02).tolist()]
        [1.0, 0.367879]
    """
    conf = probs.max(dim=-1).values
    below = (conf - torch.as_tensor(mu).to(conf)).clamp(max=0.0)
    return torch.exp(-below.pow(2) / (2.0 * torch.as_tensor(var).to(conf)))


def _inverse(x: Tensor) -> Tensor:
    """``1 / x`` with 0 where ``x`` is 0 (a class never predicted gets no weight, not an infinite one)."""
    return torch.where(x > 0, 1.0 / x.clamp_min(1e-30), torch.zeros_like(x))


def fairness_loss(strong_logits: Tensor, mask: Tensor, p_model: Tensor, label_hist: Tensor) -> Tensor:
    """FreeMatch's self-adaptive fairness loss ``L_f = -H(SumNorm(p~/h~), SumNorm(p_bar/h_bar))``.

    ``H(a, b) = -sum_c a_c log b_c``; ``p_bar`` is the mean strong-view probability vector over the confident
    (``mask``) samples, ``h_bar`` the histogram of their strong-view argmax (normalised to sum to 1); ``p~`` and
    ``h~`` the EMA mean probability and label histogram of the weak views. Only ``p_bar`` carries gradients.
    An empty mask gives exactly 0 (attached to the graph).

    Args:
        strong_logits: ``(N, C)`` logits of the strong views (with graph).
        mask: ``(N,)`` bool, the confident samples.
        p_model: ``(C,)`` ``p~_t``.
        label_hist: ``(C,)`` ``h~_t``.

    Example:
        >>> z = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
        >>> round(fairness_loss(z, torch.tensor([True, True]), torch.tensor([0.5, 0.5]),
        ...                     torch.tensor([0.5, 0.5])).item(), 4)
        -0.7045
    """
    mask = mask.bool()
    if not bool(mask.any()):
        return strong_logits.sum() * 0.0
    probs = torch.softmax(strong_logits[mask].float(), dim=-1)
    c = probs.shape[-1]
    hist = torch.bincount(probs.detach().argmax(-1), minlength=c).float()
    hist = hist / hist.sum()
    a = p_model.to(probs) * _inverse(label_hist.to(probs))
    a = (a / a.sum()).detach()
    b = probs.mean(0) * _inverse(hist)
    b = b / b.sum()
    return (a * torch.log(b + 1e-12)).sum()


class FreeMatchThresholds:
    """FreeMatch's self-adaptive threshold state: ``tau_t``, ``p~_t`` and the label histogram ``h~_t``.

    Each :meth:`update` with the weak probabilities ``p`` ``(N, C)`` of a batch (momentum ``m``)::

        tau <- m tau + (1 - m) mean_i max_c p_ic
        p~  <- m p~  + (1 - m) mean_i p_i
        h~  <- m h~  + (1 - m) bincount(argmax p) / N

    all starting at ``1/C``. The class thresholds are ``MaxNorm(p~) * tau`` (:meth:`thresholds`): at the start
    every threshold is ``1/C`` (every prediction counts) and they rise with the model's confidence.

    Args:
        num_classes: C.
        momentum: EMA momentum in [0, 1) (paper 0.999).

    Example:
        >>> s = FreeMatchThresholds(2, momentum=0.5)
        >>> s.update(torch.tensor([[0.9, 0.1], [0.7, 0.3]]))
        >>> round(float(s.tau), 4), [round(v, 4) for v in s.thresholds().tolist()]
        (0.65, [0.65, 0.35])
    """

    def __init__(self, num_classes: int, momentum: float = 0.999) -> None:
        _check(num_classes, momentum)
        self.num_classes = num_classes
        self.momentum = float(momentum)
        self.tau = torch.tensor(1.0 / num_classes)
        self.p_model = torch.full((num_classes,), 1.0 / num_classes)
        self.label_hist = torch.full((num_classes,), 1.0 / num_classes)
        self.steps = 0

    @torch.no_grad()
    def update(self, probs: Tensor) -> None:
        """Fold a batch of weak-view probabilities ``(N, C)`` into the EMA state (an empty batch changes nothing)."""
        if probs.ndim != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs must be (N, {self.num_classes}); got {tuple(probs.shape)}")
        if probs.shape[0] == 0:
            return
        probs = probs.detach().float()
        if self.p_model.device != probs.device:  # follow the model's device: no per-step copies
            self.tau, self.p_model, self.label_hist = (t.to(probs.device) for t in (self.tau, self.p_model,
                                                                                    self.label_hist))
        m = self.momentum
        conf, cls = probs.max(dim=-1)
        hist = torch.bincount(cls, minlength=self.num_classes).float() / probs.shape[0]
        self.tau = m * self.tau + (1.0 - m) * conf.mean()
        self.p_model = m * self.p_model + (1.0 - m) * probs.mean(0)
        self.label_hist = m * self.label_hist + (1.0 - m) * hist
        self.steps += 1

    def thresholds(self) -> Tensor:
        """``(C,)`` class thresholds ``MaxNorm(p~) * tau``."""
        return self.p_model / self.p_model.max() * self.tau

    def mask(self, probs: Tensor) -> Tensor:
        """``(N,)`` bool: ``max p >= thresholds()[argmax p]`` (:func:`freematch_mask`)."""
        return freematch_mask(probs, self.tau, self.p_model)

    def grow(self, num_classes: int) -> None:
        """Add classes: ``p~`` and ``h~`` keep summing to 1 (new classes at ``1/C'``), ``tau`` stays."""
        self.p_model = grown_distribution(self.p_model, num_classes)
        self.label_hist = grown_distribution(self.label_hist, num_classes)
        self.num_classes = num_classes

    def state_dict(self) -> dict[str, Any]:
        return {"algorithm": "freematch", "tau": self.tau.clone(), "p_model": self.p_model.clone(),
                "label_hist": self.label_hist.clone(), "steps": self.steps, "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a state saved with fewer classes is grown (:meth:`grow`), one with more is an error."""
        _same_algorithm(state, "freematch")
        p_model = torch.as_tensor(state["p_model"], dtype=torch.float32).clone()
        n = self.num_classes
        if p_model.shape[0] > n:
            raise ValueError(f"FreeMatch state has {p_model.shape[0]} classes, this model {n}")
        self.num_classes = p_model.shape[0]
        self.p_model = p_model
        self.label_hist = torch.as_tensor(state["label_hist"], dtype=torch.float32).clone()
        self.tau = torch.as_tensor(state["tau"], dtype=torch.float32).clone()
        self.steps, self.momentum = int(state["steps"]), float(state["momentum"])
        if n > self.num_classes:
            self.grow(n)


class SoftMatchWeights:
    """SoftMatch's state: the EMA mean ``mu_t`` and variance ``sigma2_t`` of the max-confidence, and the uniform
    distribution alignment (a :class:`~visiontune.DistributionAlignment` with a uniform target).

    Each :meth:`update` with the *aligned* weak probabilities of a batch (momentum ``m``, unbiased variance)::

        mu     <- m mu     + (1 - m) mean_i max_c p_ic         (starts at 1/C)
        sigma2 <- m sigma2 + (1 - m) var_i  max_c p_ic         (starts at 1; a batch of one leaves it)

    Args:
        num_classes: C.
        momentum: EMA momentum in [0, 1) (paper 0.999), also the alignment's.

    Example:
        >>> s = SoftMatchWeights(2, momentum=0.5)
        >>> s.update(torch.tensor([[0.9, 0.1], [0.7, 0.3]]))
        >>> round(float(s.mu), 4), round(float(s.var), 4)
        (0.65, 0.51)
    """

    def __init__(self, num_classes: int, momentum: float = 0.999) -> None:
        _check(num_classes, momentum)
        self.num_classes = num_classes
        self.momentum = float(momentum)
        self.mu = torch.tensor(1.0 / num_classes)
        self.var = torch.tensor(1.0)
        self.steps = 0
        self.alignment = DistributionAlignment(num_classes, momentum=self.momentum)

    def align(self, probs: Tensor) -> Tensor:
        """Uniform alignment: fold ``probs`` into the running mean, return ``probs * (1/C) / mean`` renormalised."""
        self.alignment.update(probs)
        return self.alignment.align(probs)

    @torch.no_grad()
    def update(self, aligned: Tensor) -> None:
        """Fold a batch of aligned weak-view probabilities ``(N, C)`` into ``mu`` and ``sigma2``."""
        if aligned.ndim != 2 or aligned.shape[1] != self.num_classes:
            raise ValueError(f"probs must be (N, {self.num_classes}); got {tuple(aligned.shape)}")
        if aligned.shape[0] == 0:
            return
        conf = aligned.detach().float().max(dim=-1).values
        if self.mu.device != conf.device:
            self.mu, self.var = self.mu.to(conf.device), self.var.to(conf.device)
        m = self.momentum
        self.mu = m * self.mu + (1.0 - m) * conf.mean()
        if conf.numel() > 1:
            self.var = m * self.var + (1.0 - m) * conf.var(unbiased=True)
        self.steps += 1

    def weights(self, aligned: Tensor) -> Tensor:
        """``(N,)`` weights in (0, 1] (:func:`softmatch_weights` with the current ``mu``, ``sigma2``)."""
        return softmatch_weights(aligned, self.mu, self.var)

    def grow(self, num_classes: int) -> None:
        """Add classes: the alignment's running mean grows like FreeMatch's ``p~``; ``mu``, ``sigma2`` stay."""
        self.alignment.grow(num_classes)
        self.num_classes = num_classes

    def state_dict(self) -> dict[str, Any]:
        return {"algorithm": "softmatch", "mu": self.mu.clone(), "var": self.var.clone(), "steps": self.steps,
                "momentum": self.momentum, "alignment": self.alignment.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a state saved with fewer classes is grown (:meth:`grow`), one with more is an error."""
        _same_algorithm(state, "softmatch")
        da = state["alignment"]
        saved = int(torch.as_tensor(da["mean"]).shape[0])
        n = self.num_classes
        if saved > n:
            raise ValueError(f"SoftMatch state has {saved} classes, this model {n}")
        self.alignment = DistributionAlignment(saved, momentum=float(da["momentum"]))
        self.alignment.load_state_dict(da)
        self.num_classes = saved
        self.mu = torch.as_tensor(state["mu"], dtype=torch.float32).clone()
        self.var = torch.as_tensor(state["var"], dtype=torch.float32).clone()
        self.steps, self.momentum = int(state["steps"]), float(state["momentum"])
        if n > saved:
            self.grow(n)


AdaptiveState = Union[FreeMatchThresholds, SoftMatchWeights]


def _same_algorithm(state: dict[str, Any], name: str) -> None:
    if state.get("algorithm", name) != name:
        raise ValueError(f"the saved semi-supervised state is {state.get('algorithm')!r}'s, not {name!r}'s: "
                         "resume with the algorithm it was trained with")


def adaptive_loss(
    strong_logits: Tensor,
    weak_logits: Tensor,
    cfg: FixMatchConfig,
    *,
    state: AdaptiveState,
    step: int = 0,
    da: Optional[DistributionAlignment] = None,
) -> FixMatchOutput:
    """The weighted unlabeled loss of one FreeMatch or SoftMatch step, updating ``state`` (and ``da``).

    Order (as in the papers): softmax(weak / T) -> [FreeMatch: ``da`` alignment if configured] -> update the EMA
    state with this batch -> weights -> weighted CE of the strong views (+ FreeMatch's fairness loss).

    Args:
        strong_logits: ``(N, C)`` logits of the strong views (with graph).
        weak_logits: ``(N, C)`` detached logits of the weak views.
        cfg: the options; ``cfg.algorithm`` must match ``state``.
        state: a :class:`FreeMatchThresholds` (``freematch``) or :class:`SoftMatchWeights` (``softmatch``).
        step: global step, for the warm-up of :func:`~visiontune.objectives.semisup.unsup_weight`.
        da: FreeMatch with ``cfg.distribution_alignment`` only: the running mean to align with.

    Returns:
        A :class:`~visiontune.objectives.semisup.FixMatchOutput`: ``weights`` are the per-sample weights of the
        loss, ``mask`` the samples at full weight, ``mask_rate`` the mean weight, ``loss_fair`` FreeMatch's
        (unweighted) fairness loss; ``loss = weight * loss_u + fairness_weight * loss_fair``.
    """
    if strong_logits.shape != weak_logits.shape:
        raise ValueError(f"strong_logits {tuple(strong_logits.shape)} and weak_logits "
                         f"{tuple(weak_logits.shape)} must have the same shape")
    expected = {"freematch": FreeMatchThresholds, "softmatch": SoftMatchWeights}.get(cfg.algorithm)
    if expected is None or not isinstance(state, expected):
        raise ValueError(f"algorithm {cfg.algorithm!r} needs a {getattr(expected, '__name__', 'state')}; "
                         f"got {type(state).__name__}")
    probs = torch.softmax(weak_logits.detach().float() / cfg.temperature, dim=-1)
    fair = None
    if isinstance(state, FreeMatchThresholds):
        if cfg.distribution_alignment:
            if da is None:
                raise ValueError("distribution_alignment=True needs da=DistributionAlignment(...)")
            da.update(probs)
            probs = da.align(probs)
        state.update(probs)
        mask = state.mask(probs)
        weights = mask.float()
        fair = fairness_loss(strong_logits, mask, state.p_model, state.label_hist)
    else:
        aligned = state.align(probs)  # the weights see aligned probabilities, the targets do not
        state.update(aligned)
        weights = state.weights(aligned)
        mask = aligned.max(dim=-1).values >= state.mu
    targets = probs.argmax(-1) if cfg.hard_labels else probs
    loss_u = unlabeled_loss(strong_logits, targets, weights)
    w = unsup_weight(step, cfg)
    loss = loss_u * w if fair is None else loss_u * w + cfg.fairness_weight * fair
    rate = weights.mean() if weights.numel() else weights.new_zeros(())
    return FixMatchOutput(loss=loss, loss_u=loss_u, weight=w, targets=targets, mask=mask, mask_rate=rate,
                          weights=weights, loss_fair=fair)
