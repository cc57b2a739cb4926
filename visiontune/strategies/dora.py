"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024), on LoRA's layers and targets.

A targeted layer's weight becomes ``W' = m · (W0 + s·B·A) / ||W0 + s·B·A||_c``: a direction (the LoRA-updated
weight, normalised per output channel: the norm is over the input dimension, and for convolutions over
input channels × kernel, one per output row as in HF PEFT) times a trainable magnitude ``m``, one per output
channel, initialised to ``||W0 + s·B·A||_c`` (= ``||W0||_c`` with the zero init: the model starts as the base
model). As in the paper (section 4.3) and PEFT, the norm is treated as a constant in the backward pass.

Everything else is LoRA's: :class:`DoRAConfig` *is* a :class:`~visiontune.strategies.lora.LoRAConfig` (the same
``targets`` preset, ``rank``, ``alpha``, ``qkv`` parts, grouped convs, ``rslora``, ``init``, ``lr_ratio``), the
layers are LoRA layers (``lora_A``/``lora_B``) with one more parameter, ``lora_magnitude`` (``(out,)``), and
:func:`visiontune.merge` / :func:`visiontune.merge_and_unload` bake ``W'`` into the base weight. Trainable
parameters: LoRA's plus one per output channel of every targeted layer.

Example:
    >>> import timm, torch
    >>> from visiontune.strategies import apply_strategy
    >>> net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    >>> _ = apply_strategy(net, "dora", {"rank": 4})
    >>> net.blocks[0].mlp.fc1.lora_magnitude.shape
    torch.Size([768])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import StrategyError, register_strategy
from .lora import LoRAConfig, inject_lora
from .lora_layers import LoRAConv2d, LoRALayer, LoRALinear, LoRAQKVLinear

__all__ = ["DoRAConfig", "DoRAConv2d", "DoRALinear", "DoRAQKVLinear", "apply_dora", "to_dora"]


@dataclass
class DoRAConfig(LoRAConfig):
    """Options of the ``dora`` strategy: exactly LoRA's (see :class:`~visiontune.strategies.lora.LoRAConfig`).

    Example:
        >>> DoRAConfig(rank=4, rslora=True).scaling
        8.0
    """


def _channel_norm(w: Tensor) -> Tensor:
    """L2 norm of each output channel's weights (rows of a Linear weight; in × kh × kw of a conv)."""
    return torch.linalg.vector_norm(w.flatten(1), dim=1)


class _DoRA(LoRALayer):
    """The DoRA forward and merge over any LoRA layer (mixed in before the LoRA layer class)."""

    lora_magnitude: nn.Parameter

    def _init_dora(self) -> None:
        with torch.no_grad():
            m = _channel_norm(self._base_weight().detach() + self.delta_weight().detach())
        self.lora_magnitude = nn.Parameter(m.clone())
        self.register_buffer("dora_merged_scale", None, persistent=False)  # m / ||.|| a merge applied

    def _scale(self, w: Tensor) -> Tensor:
        """``m / ||w||_c`` (the norm detached), shaped to broadcast over the weight. A zero row (NF-nets' zero-gain
        last convs standardise to an all-zero weight) has ``m = 0`` and scale 0, not 0/0."""
        scale = self.lora_magnitude / _channel_norm(w).detach().clamp_min(torch.finfo(w.dtype).tiny)
        return scale.view(-1, *(1,) * (w.ndim - 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        w0 = self._base_weight()
        w = w0 + self.delta_weight()
        scale = self._scale(w)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):  # PEFT: the DoRA part sees dropout(x)
            return self.base_layer(x) + self.layer_op(self.lora_dropout(x), scale * w - w0, None)
        return self.layer_op(x, scale * w, self.base_layer.bias)

    def merged_weight(self) -> Tensor:
        w = self._base_weight().detach() + self.delta_weight().detach()
        return self._scale(w).detach() * w

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Write ``W'`` into the base weight (the forward then runs the base layer alone)."""
        if self.merged:
            return
        self._check_mergeable(safe)
        w = self.base_layer.weight
        direction = w + self.delta_weight().to(w.dtype)
        scale = self._scale(direction).to(w.dtype)
        if (scale == 0).any():
            raise StrategyError(f"DoRA layer {self.layer_name!r} has a zero magnitude: an in-place merge could not be "
                                "undone; use merge_and_unload(model)")
        self.dora_merged_scale = scale.clone()
        w.copy_(scale * direction)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Recover ``W0 = W' / scale − s·B·A`` (exact up to float rounding)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_(w / self.dora_merged_scale - self.delta_weight().to(w.dtype))
        self.dora_merged_scale = None
        self.merged = False

    def extra_repr(self) -> str:
        return "dora, " + super().extra_repr()


class DoRALinear(_DoRA, LoRALinear):
    """DoRA on an ``nn.Linear``: ``y = x · W'ᵀ + b``; parameters ``rank·(in + out) + out``."""


class DoRAQKVLinear(_DoRA, LoRAQKVLinear):
    """DoRA on a fused qkv Linear: LoRA's per-part deltas, one magnitude per output row (all three parts)."""


class DoRAConv2d(_DoRA, LoRAConv2d):
    """DoRA on an ``nn.Conv2d`` (dense or grouped): the norm of each output channel's whole kernel."""


_DORA: dict[type, type] = {LoRALinear: DoRALinear, LoRAQKVLinear: DoRAQKVLinear, LoRAConv2d: DoRAConv2d}


def to_dora(layer: LoRALayer) -> LoRALayer:
    """Turn a float LoRA layer into its DoRA form in place (adds ``lora_magnitude``); returns it.

    Example:
        >>> layer = to_dora(LoRALinear(nn.Linear(4, 3), rank=1))
        >>> type(layer).__name__, layer.lora_magnitude.shape
        ('DoRALinear', torch.Size([3]))
    """
    cls = _DORA.get(type(layer))
    if cls is None:
        raise StrategyError(f"DoRA supports {', '.join(c.__name__ for c in _DORA)}, got {type(layer).__name__}")
    if layer.quantized:
        raise StrategyError(f"DoRA layer {layer.layer_name!r}: a quantized base is not supported (use 'qlora')")
    layer.__class__ = cls  # same state (base_layer, lora_A, lora_B, ...), DoRA's forward and merge
    layer._init_dora()
    return layer


@register_strategy("dora", DoRAConfig)
def apply_dora(model: nn.Module, cfg: DoRAConfig) -> None:
    """DoRA: LoRA's deltas on a normalised direction times a trainable per-channel magnitude; base frozen."""
    for layer in inject_lora(model, cfg).values():
        to_dora(layer)
