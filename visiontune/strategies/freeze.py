"""Strategies that only choose which existing parameters train: full, linear, last_k, bitfit, norm."""

from __future__ import annotations

from typing import ClassVar
from dataclasses import dataclass

from torch import nn

from ..models.groups import GroupError, depth_groups
from ..models.heads import find_head
from .base import StrategyConfig, StrategyError, register_strategy

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _norm_parameter_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, _NORMS) or type(m).__name__.endswith(("Norm", "Norm2d", "NormAct2d")):
            ids.update(id(p) for p in m.parameters(recurse=False))
    return ids


def _per_channel(p: nn.Parameter) -> bool:
    """A vector along one dim (``(C,)``, ``(1, 1, C)``, ``(C, 1, 1, 1)``): a per-channel scale or shift."""
    return p.ndim >= 1 and sum(s > 1 for s in p.shape) <= 1


def norm_role_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters that play a norm layer's role in a model without norm layers: the per-channel scale and shift
    of affine layers (modules whose only parameters are one or two per-channel vectors: ResMLP's ``Affine``,
    ``LayerScale``), and the gain and bias of weight-standardised convolutions (NF-nets' ``ScaledStdConv2d``:
    ``W' = gain·(W − mean)/std``, the affine after the standardisation).

    Example:
        >>> from timm.layers import ScaledStdConv2d
        >>> conv = ScaledStdConv2d(3, 4, 3)
        >>> norm_role_parameter_ids(nn.Sequential(conv, nn.PReLU())) == {id(conv.gain), id(conv.bias)}
        True
    """
    ids: set[int] = set()
    for m in model.modules():
        direct = list(m.parameters(recurse=False))
        if isinstance(m, nn.Conv2d) and isinstance(getattr(m, "gain", None), nn.Parameter):
            ids.update(id(p) for p in (m.gain, m.bias) if p is not None and _per_channel(p))
        elif (0 < len(direct) <= 2 and len(list(m.parameters())) == len(direct) and all(map(_per_channel, direct))
              and not isinstance(m, (nn.PReLU, nn.Linear, nn.modules.conv._ConvNd, nn.Embedding))):
            ids.update(id(p) for p in direct)
    return ids


@dataclass
class FullConfig(StrategyConfig):
    """Train every parameter."""

    default_lr: ClassVar[float] = 5e-4  # AdamW peak LR when model.lr is None (see StrategyConfig)


@register_strategy("full", FullConfig)
def apply_full(model: nn.Module, cfg: FullConfig) -> None:
    """Full fine-tuning: every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)


@dataclass
class LinearConfig(StrategyConfig):
    """Train the head only (linear probe)."""

    default_lr: ClassVar[float] = 1e-2  # AdamW peak LR when model.lr is None (see StrategyConfig)


@register_strategy("linear", LinearConfig)
def apply_linear(model: nn.Module, cfg: LinearConfig) -> None:
    """Linear probe: only the new head trains."""


@dataclass
class LastKConfig(StrategyConfig):
    """Train the last ``k`` depth groups (timm ``group_matcher``; without one, the blocks of the model's own
    stages, :func:`~visiontune.models.groups.structural_groups`) and the head.

    Args:
        k: number of depth groups before the head to train (≥ 1).
        coarse: count stages (timm coarse groups) instead of blocks.
    """

    default_lr: ClassVar[float] = 1e-3  # AdamW peak LR when model.lr is None (see StrategyConfig)

    k: int = 1
    coarse: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise StrategyError(f"option 'k' of strategy 'last_k' must be an integer >= 1, got {self.k!r}")


@register_strategy("last_k", LastKConfig)
def apply_last_k(model: nn.Module, cfg: LastKConfig) -> None:
    """Last-k: the last k depth groups (blocks or stages) plus the head train."""
    try:
        groups = depth_groups(model, coarse=cfg.coarse)[:-1]
    except GroupError as exc:
        raise StrategyError(f"strategy 'last_k' does not fit {type(model).__name__}: {exc}") from None
    if cfg.k > len(groups):
        raise StrategyError(
            f"last_k: k={cfg.k} but {type(model).__name__} has only {len(groups)} depth groups"
        )
    chosen = {n for g in groups[-cfg.k :] for n in g}
    for n, p in model.named_parameters():
        if n in chosen:
            p.requires_grad_(True)


@dataclass
class BitFitConfig(StrategyConfig):
    """Train all biases (and the head).

    Args:
        train_norm: also train normalisation weights (scales), not just their biases.
    """

    default_lr: ClassVar[float] = 1e-2  # AdamW peak LR when model.lr is None (see StrategyConfig)

    train_norm: bool = False


@register_strategy("bitfit", BitFitConfig)
def apply_bitfit(model: nn.Module, cfg: BitFitConfig) -> None:
    """BitFit: every bias trains; optionally the norm scales too."""
    norm_ids = _norm_parameter_ids(model) if cfg.train_norm else set()
    for n, p in model.named_parameters():
        if n.endswith("bias") or id(p) in norm_ids:
            p.requires_grad_(True)


@dataclass
class NormConfig(StrategyConfig):
    """Train only the affine parameters of normalisation layers (and the head)."""

    default_lr: ClassVar[float] = 5e-3  # AdamW peak LR when model.lr is None (see StrategyConfig)


@register_strategy("norm", NormConfig)
def apply_norm(model: nn.Module, cfg: NormConfig) -> None:
    """Norm tuning: only normalisation scales and shifts train (without norm layers: what plays their role).

    A model without normalisation layers (NF-nets, ResMLP) trains the parameters of
    :func:`norm_role_parameter_ids` instead: affine layers and weight-standardisation gains. With neither,
    the strategy refuses (a :class:`StrategyError` naming it and the model), instead of training only the head.
    """
    head = set(find_head(model, missing_ok=True).parameter_names)
    params = [(n, p) for n, p in model.named_parameters() if n not in head]
    norm_ids = _norm_parameter_ids(model) & {id(p) for _, p in params}
    if not norm_ids:
        norm_ids = norm_role_parameter_ids(model) & {id(p) for _, p in params}
    if not norm_ids:
        raise StrategyError(
            f"strategy 'norm' does not fit {type(model).__name__}: it has no normalisation layer (BatchNorm, "
            "LayerNorm, GroupNorm), no affine layer and no weight-standardisation gain to train; use 'bitfit' "
            "or 'ssf' (a trainable per-channel scale and shift after every layer)"
        )
    for _, p in params:
        if id(p) in norm_ids:
            p.requires_grad_(True)
