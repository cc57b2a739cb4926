"""Option helpers shared by the LoRA family (``lora``, ``qlora``, ``dora``) and by ``ssf``.

* :func:`regex_list` validates a ``targets`` / ``exclude`` option (a regex or a list of regexes).
* rsLoRA (Kalajdzievski 2023, ``rslora=True``): the delta is scaled by ``alpha / sqrt(rank)`` instead of
  ``alpha / rank``, so raising the rank does not shrink the update (HF PEFT's ``use_rslora``).
* LoRA+ (Hayou et al. 2024, ``lr_ratio``): ``lora_B`` trains with ``lr_ratio`` times the learning rate of
  ``lora_A`` (everything else at the base LR); :func:`lr_multipliers` gives the factors the optimizer's
  parameter groups apply (:func:`visiontune.param_groups`).
* PiSSA (Meng et al. 2024, ``init="pissa"``): see :meth:`visiontune.strategies.lora.LoRALayer.init_pissa`.

Example:
    >>> lora_scaling(16.0, 4, rslora=False), lora_scaling(16.0, 4, rslora=True)
    (4.0, 8.0)
"""

from __future__ import annotations

import math
import re
from typing import Any

from torch import nn

from .base import StrategyError

__all__ = ["check_lora_options", "lora_alpha", "lora_scaling", "lr_multipliers", "regex_list"]


def regex_list(strategy: str, option: str, value: object) -> list[str] | None:
    """``value`` as a list of valid regexes (a single string is a list of one), or None; else a StrategyError.

    Example:
        >>> regex_list("lora", "targets", r"attn\\.qkv$")
        ['attn\\\\.qkv$']
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise StrategyError(
            f"option {option!r} of strategy {strategy!r} must be a non-empty list of regexes or None, got {value!r}"
        )
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise StrategyError(f"option {option!r} of strategy {strategy!r}: bad regex {pattern!r} ({exc})") from None
    return list(value)


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor of a rank-``rank`` delta: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_alpha(cfg: Any, rank: int) -> float:
    """The ``alpha`` to build a rank-``rank`` LoRA layer with, so that its ``alpha / rank`` is the
    configured scaling (rsLoRA: ``alpha·sqrt(rank)``, i.e. ``scaling = cfg.alpha / sqrt(rank)``)."""
    return cfg.alpha * math.sqrt(rank) if getattr(cfg, "rslora", False) else cfg.alpha


def check_lora_options(cfg: Any, strategy: str) -> None:
    """Validate the rsLoRA / LoRA+ / PiSSA options of a LoRA-family config (``rslora``, ``lr_ratio``, ``init``)."""
    if not isinstance(cfg.rslora, bool):
        raise StrategyError(f"option 'rslora' of strategy {strategy!r} must be true or false, got {cfg.rslora!r}")
    ratio = cfg.lr_ratio
    if ratio is not None and (
        isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (math.isfinite(ratio) and ratio > 0)
    ):
        raise StrategyError(
            f"option 'lr_ratio' of strategy {strategy!r} must be a number > 0 (lora_B's LR / lora_A's) or None, "
            f"got {ratio!r}"
        )
    if cfg.init == "pissa" and getattr(cfg, "bits", None):
        raise StrategyError(
            f"option init='pissa' of strategy {strategy!r} needs a float base weight; use strategy 'lora' "
            "(or init='zero' with qlora)"
        )


def lr_multipliers(model: nn.Module) -> dict[str, float]:
    """LR factor per parameter name beyond the layer-wise ones: LoRA+ gives every ``lora_B`` ``lr_ratio``.

    Example:
        >>> lr_multipliers(nn.Linear(2, 2))
        {}
    """
    ratio = getattr(getattr(model, "visiontune_strategy", None), "lr_ratio", None)
    if ratio is None:
        return {}
    return {n: float(ratio) for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "lora_B"}
