"""LoRA and QLoRA for timm models: low-rank deltas on Linear and Conv2d layers, fused qkv, grouped convs.

A targeted layer is wrapped PEFT-style: the original module lives on as ``<name>.base_layer`` (frozen) and
the wrapper adds two trainable factors, ``lora_A`` and ``lora_B``; the layer computes
``base(x) + scaling · B(A(dropout(x)))`` with ``scaling = alpha / rank``. Parameter names drive what
trains and what :mod:`visiontune.delta` saves, so every adapter parameter is named ``lora_A``/``lora_B``.

* ``nn.Linear``: ``A`` is ``(rank, in)``, ``B`` is ``(out, rank)``; the forward never forms ``B·A``.
* timm's fused ``qkv`` Linear: the layer is treated as the three projections it stands for; each chosen
  part (``qkv="qv"`` → q and v, as in the LoRA paper) gets its own rank-``rank`` pair and only its output
  slice moves. ``lora_A`` stacks the parts' A's ``(parts·rank, in)``, ``lora_B`` their B's ``(parts·d, rank)``.
* dense ``nn.Conv2d`` (k×k or 1×1): ``A`` is a k×k conv to ``rank`` channels with the layer's stride,
  padding and dilation, ``B`` a 1×1 conv back (PEFT's layout).
* grouped / depthwise ``nn.Conv2d`` (``conv_groups="per_group"``): the delta keeps the layer's group
  structure (a group's outputs only see that group's inputs). The weight, viewed as an
  ``out × (in/groups·kh·kw)`` matrix, gets a rank-``rank`` factorisation: ``A`` (``rank`` kernels of shape
  ``in/groups × kh × kw``) is a basis shared by the groups and ``B`` (``out × rank``) gives every output
  channel its own mix. Parameters: ``rank·(out + in/groups·kh·kw)`` instead of the layer's
  ``out·in/groups·kh·kw``; for a depthwise 3×3 conv with C channels, ``rank·(C + 9)`` vs ``9·C``.
  A naive k×k LoRA per group would have more parameters than the layer itself.

Never over-parameterised: where ``rank·(fan_out + fan_in)`` would reach the layer's own weight count, the
rank of that layer is lowered (with a warning) to the largest one that stays below it; its scaling is then
``alpha`` over that rank.

``qlora`` also stores each targeted layer's frozen weight quantized (int8 per output channel, or 4-bit
NF4 in blocks of 64) as buffers and dequantises it on the fly; the LoRA factors train in float on top.

Example:
    >>> import timm, torch
    >>> from visiontune.strategies import apply_strategy
    >>> net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    >>> _ = apply_strategy(net, "lora", {"rank": 4})
    >>> sorted({n.rsplit(".", 1)[-1] for n, p in net.named_parameters() if p.requires_grad})
    ['bias', 'lora_A', 'lora_B', 'weight']
    >>> _ = merge_and_unload(net)  # plain Linear layers again, delta baked in
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar
from dataclasses import dataclass

from torch import nn

from .base import StrategyConfig, StrategyError, register_strategy
from .lora_layers import LORA_INITS, LoRAConv2d, LoRALayer, LoRALinear, LoRAQKVLinear
from .lora_options import check_lora_options, lora_alpha, lora_scaling, regex_list
from .lora_select import check_called, is_fused_qkv, lora_candidates, route_direct_reads, select_targets
from .ssf import merge_ssf, unload_ssf, unmerge_ssf
from .quant import (SUPPORTED_BITS, QuantizedBase, QuantizedConv2d, QuantizedLinear, conv_is_supported,
                    is_weight_standardized, standardized_conv)

__all__ = [
    "LoRAConfig",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "LoRAQKVLinear",
    "QLoRAConfig",
    "QuantizedConv2d",
    "QuantizedLinear",
    "frozen_weight_bytes",
    "inject_lora",
    "lora_layers",
    "lora_parameter_names",
    "lora_targets",
    "merge",
    "merge_and_unload",
    "unmerge",
]

_CONV_GROUPS = ("per_group", "refuse")


# ----------------------------------------------------------------------------------------- configs
@dataclass
class LoRAConfig(StrategyConfig):
    """Options of the ``lora`` strategy.

    Args:
        rank: rank of each delta (> 0).
        alpha: the delta is scaled by ``alpha / rank`` (> 0).
        dropout: dropout on the delta's input, in [0, 1).
        targets: regexes searched (``re.search``) in module names; ``None`` picks a preset from the layers
            themselves: every Linear but the head where Linear layers hold most weights (ViT ``qkv``,
            ``proj``, ``fc1``, ``fc2``); otherwise dense 1×1 convs (EfficientNet ``conv_pw``/``conv_pwl``,
            bottleneck ResNet conv1x1s), or every dense conv but the stem when 1×1 convs hold under a third
            of the dense conv weights (basic-block ResNets, VGG). The head is never wrapped: it trains in full.
        exclude: regexes of module names to leave alone, applied after ``targets``.
        qkv: parts of a fused ``qkv`` Linear that get a delta: a non-empty subset of ``"qkv"``.
        conv_groups: ``"per_group"`` gives grouped/depthwise convs a delta that keeps their groups (see the
            module docstring for its size); ``"refuse"`` raises naming the layer.
        init: ``"zero"`` (B = 0, the model starts unchanged, standard), ``"gaussian"`` (B ~ N(0, 0.02²):
            a non-zero delta from the start, for tests and ablations) or ``"pissa"`` (A, B from the base
            weight's top-rank singular vectors, the rest stays frozen: the model starts unchanged).
        rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank`` (rsLoRA).
        lr_ratio: LoRA+: ``lora_B`` trains with this many times ``lora_A``'s learning rate (None: the same).

    Example:
        >>> LoRAConfig(rank=4, targets=[r"attn\\.qkv$"], qkv="qkv").scaling
        4.0
    """

    default_lr: ClassVar[float] = 3e-3  # AdamW peak LR when model.lr is None (see StrategyConfig)
    mergeable: ClassVar[bool] = True  # merge / merge_and_unload (qlora: merge_and_unload, dequantised)

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None
    exclude: list[str] | None = None
    qkv: str = "qv"
    conv_groups: str = "per_group"
    init: str = "zero"
    rslora: bool = False
    lr_ratio: float | None = None

    def __post_init__(self) -> None:
        s = getattr(type(self), "strategy_name", "lora")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise StrategyError(f"option 'rank' of strategy {s!r} must be an integer > 0, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
            math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise StrategyError(f"option 'alpha' of strategy {s!r} must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise StrategyError(f"option 'dropout' of strategy {s!r} must be in [0, 1), got {self.dropout!r}")
        self.targets = regex_list(s, "targets", self.targets)
        self.exclude = regex_list(s, "exclude", self.exclude)
        parts = self.qkv if isinstance(self.qkv, str) else None
        if not parts or set(parts) - set("qkv") or len(set(parts)) != len(parts):
            raise StrategyError(
                f"option 'qkv' of strategy {s!r} must be a non-empty subset of 'qkv' "
                f"(e.g. 'qv', 'qkv', 'q'), got {self.qkv!r}"
            )
        self.qkv = "".join(c for c in "qkv" if c in parts)
        if self.conv_groups not in _CONV_GROUPS:
            raise StrategyError(
                f"option 'conv_groups' of strategy {s!r} must be one of {list(_CONV_GROUPS)}, got {self.conv_groups!r}"
            )
        if self.init not in LORA_INITS:
            raise StrategyError(f"option 'init' of strategy {s!r} must be one of {list(LORA_INITS)}, got {self.init!r}")
        check_lora_options(self, s)

    @property
    def scaling(self) -> float:
        """``alpha / rank`` (rsLoRA: ``alpha / sqrt(rank)``): the factor of every delta of the configured rank."""
        return lora_scaling(self.alpha, self.rank, self.rslora)


@dataclass
class QLoRAConfig(LoRAConfig):
    """Options of the ``qlora`` strategy: LoRA on a quantized frozen base.

    Args:
        bits: 8 (int8, symmetric, one scale per output channel) or 4 (NF4, one absmax per block of 64
            weights, two codes per byte). See :class:`LoRAConfig` for the other options.

    Example:
        >>> QLoRAConfig(bits=4).bits
        4
    """

    bits: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise StrategyError(f"option 'bits' of strategy 'qlora' must be one of {list(SUPPORTED_BITS)}, "
                                f"got {self.bits!r}")


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA wrapper of ``model`` by module name.

    Example:
        >>> lora_layers(nn.Sequential(nn.Linear(2, 2)))
        {}
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA factors (``...lora_A`` / ``...lora_B``) in ``model.named_parameters()``.

    Example:
        >>> lora_parameter_names(nn.Sequential(LoRALinear(nn.Linear(4, 4), rank=1, alpha=1)))
        ['0.lora_A', '0.lora_B']
    """
    return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B")]


def lora_targets(model: nn.Module, cfg: LoRAConfig | None = None) -> list[str]:
    """Names of the modules LoRA would wrap under ``cfg`` (preview; raises like :func:`inject_lora`).

    Args:
        model: a timm model (the head, every module of :func:`~visiontune.models.heads.find_head`, is never a
            target).
        cfg: the options; ``None`` means defaults.

    Example:
        >>> import timm
        >>> net = timm.create_model("resnet50", num_classes=2)
        >>> lora_targets(net)[:3]
        ['layer1.0.conv1', 'layer1.0.conv3', 'layer1.0.downsample.0']
    """
    cfg = cfg or LoRAConfig()
    return select_targets(model, cfg.targets, cfg.exclude, getattr(type(cfg), "strategy_name", "lora"))


def _fit_rank(name: str, rank: int, weights: int, per_rank: int, capped: list[str]) -> int:
    best = (weights - 1) // per_rank  # largest rank whose factors stay below the layer's own weight count
    if best < 1:
        raise StrategyError(f"layer {name!r} is too small for LoRA ({weights} weights); add it to 'exclude'")
    if best < rank:
        capped.append(f"{name} ({rank}->{best})")
    return min(rank, best)


def _wrap(model: nn.Module, name: str, m: nn.Module, cfg: LoRAConfig, bits: int | None,
          capped: list[str]) -> LoRALayer:
    common = dict(dropout=cfg.dropout, init=cfg.init, name=name)
    if isinstance(m, nn.Linear):
        is_qkv = is_fused_qkv(model, name, m)
        d = m.out_features // 3 if is_qkv else m.out_features
        r = _fit_rank(name, cfg.rank, d * m.in_features, d + m.in_features, capped)
        base = QuantizedLinear(m, bits) if bits else m
        if is_qkv:
            return LoRAQKVLinear(base, r, lora_alpha(cfg, r), parts=cfg.qkv, **common)
        return LoRALinear(base, r, lora_alpha(cfg, r), **common)
    if m.groups > 1 and cfg.conv_groups == "refuse":
        raise StrategyError(
            f"LoRA target {name!r} is a grouped convolution (groups={m.groups}) and option 'conv_groups' is "
            "'refuse'; use conv_groups='per_group' (a delta that keeps the groups) or add it to 'exclude'"
        )
    if is_weight_standardized(m):  # NF-nets, BiT: LoRA on the standardised weight the frozen base computes with
        m = standardized_conv(m)
    if not conv_is_supported(m):
        raise StrategyError(
            f"LoRA target {name!r} is a {type(m).__name__} with its own forward (a merged delta would not be "
            "exact); add it to 'exclude'"
        )
    fan_in = m.weight[0].numel()
    r = _fit_rank(name, cfg.rank, m.weight.numel(), m.out_channels + fan_in, capped)
    return LoRAConv2d(QuantizedConv2d(m, bits) if bits else m, r, lora_alpha(cfg, r), **common)


def inject_lora(model: nn.Module, cfg: LoRAConfig | None = None) -> dict[str, LoRALayer]:
    """Wrap the target layers of ``model`` in place (a :class:`QLoRAConfig` also quantizes their weights).

    Base layers are frozen; the new ``lora_A``/``lora_B`` train. ``apply_strategy(model, "lora")`` calls this
    after freezing everything and then unfreezes the head.

    Args:
        model: the model to edit.
        cfg: the options; ``None`` means ``LoRAConfig()``.

    Returns:
        The new wrappers by module name.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> sorted(inject_lora(net, LoRAConfig(rank=2, targets=["^0$"])))
        ['0']
    """
    cfg = cfg or LoRAConfig()
    bits = cfg.bits if isinstance(cfg, QLoRAConfig) else None
    cands = lora_candidates(model)
    capped: list[str] = []
    wrapped: dict[str, LoRALayer] = {}
    names = lora_targets(model, cfg)
    route_direct_reads(model, names)  # Eva/BEiT: F.linear(x, qkv.weight, bias) -> qkv(x) + bias
    check_called(model, names, getattr(type(cfg), "strategy_name", "lora"))
    for name in names:
        wrapped[name] = _wrap(model, name, cands[name], cfg, bits, capped)
    for name, layer in wrapped.items():  # replace only once every layer was accepted
        layer.alpha, layer.scaling = float(cfg.alpha), lora_scaling(cfg.alpha, layer.rank, cfg.rslora)  # exact
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer)
    if capped:
        warnings.warn(
            "LoRA rank lowered where the factors would reach the layer's own size: " + ", ".join(capped), stacklevel=2
        )
    return wrapped


@register_strategy("lora", LoRAConfig)
def apply_lora(model: nn.Module, cfg: LoRAConfig) -> None:
    """LoRA: low-rank deltas on Linear/Conv2d layers (fused qkv and grouped convs handled); base frozen."""
    inject_lora(model, cfg)


@register_strategy("qlora", QLoRAConfig)
def apply_qlora(model: nn.Module, cfg: QLoRAConfig) -> None:
    """QLoRA: LoRA on int8/NF4-quantized frozen weights of the targeted layers."""
    inject_lora(model, cfg)


# ------------------------------------------------------------------------------------ merge/export
def merge(model: nn.Module, safe: bool = False) -> int:
    """Merge every LoRA (and DoRA) delta into its base weight and fold every SSF scale/shift into its layer
    (idempotent); returns the number of layers merged.

    Args:
        model: a model with LoRA / DoRA / SSF layers (float base; qlora raises, use :func:`merge_and_unload`).
        safe: check every merged weight is finite first; on failure raise naming the layer and leave the
            whole model unchanged.

    Example:
        >>> net = nn.Sequential(LoRALinear(nn.Linear(4, 4), rank=1, alpha=1, init="gaussian"))
        >>> merge(net, safe=True), unmerge(net)
        (1, 1)
    """
    todo = [m for m in lora_layers(model).values() if not m.merged]
    for layer in todo:  # check all before touching any
        layer._check_mergeable(safe)
    folded = merge_ssf(model, safe)  # checks all SSF layers before folding any
    for layer in todo:
        layer.merge()
    return len(todo) + folded


def unmerge(model: nn.Module) -> int:
    """Subtract every merged LoRA delta again (and unfold SSF); returns the number of layers unmerged.

    Args:
        model: a model whose LoRA layers were merged with :func:`merge`.

    Example:
        >>> net = nn.Sequential(LoRALinear(nn.Linear(4, 4), rank=1, alpha=1))
        >>> unmerge(net)  # nothing merged
        0
    """
    todo = [m for m in lora_layers(model).values() if m.merged]
    for layer in todo:
        layer.unmerge()
    return len(todo) + unmerge_ssf(model)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA wrapper by a plain layer with the delta baked in (qlora: dequantised, float); fold
    SSF scales/shifts into their layers and remove the SSF modules.

    The result has the original module names (``...qkv.weight``) and no ``lora_*`` parameters: the form
    to export. The merged weights stay frozen.

    Args:
        model: a model with LoRA layers; edited in place.

    Returns:
        ``model``.

    Example:
        >>> net = nn.Sequential(LoRALinear(nn.Linear(4, 4), rank=1, alpha=1))
        >>> type(merge_and_unload(net)[0]).__name__
        'Linear'
    """
    for name, layer in lora_layers(model).items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer.merged_module())
    unload_ssf(model)
    delta = getattr(model, "visiontune_delta", None)
    if delta is not None:  # the recorded task delta must only name parameters that still exist
        present = {n for n, _ in model.named_parameters()}
        model.visiontune_delta = frozenset(n for n in delta if n in present)  # type: ignore[assignment]
    return model


def frozen_weight_bytes(model: nn.Module, lora_layers_only: bool = False) -> int:
    """Bytes held by frozen weights: frozen parameters plus quantized weight buffers at their real size.

    Args:
        model: any model.
        lora_layers_only: count only the base layers inside LoRA wrappers (the part qlora quantizes).

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 64)).requires_grad_(False)
        >>> frozen_weight_bytes(net)  # 64·64·4 + 64·4
        16640
    """
    roots = [m.base_layer for m in lora_layers(model).values()] if lora_layers_only else [model]
    seen: set[int] = set()
    total = 0
    for root in roots:
        for p in root.parameters():
            if not p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        for m in root.modules():
            if isinstance(m, QuantizedBase):
                for b in m.buffers(recurse=False):
                    if id(b) not in seen:
                        seen.add(id(b))
                        total += b.numel() * b.element_size()
    return total
