"""Bottleneck adapters: after attention / MLP in transformer blocks, or after each stage (conv or Linear adapters).

An adapter is ``scale * up(act(down(h)))`` with ``up`` zero-initialised, added to the output of the module
it follows, so the adapted model computes exactly what the base model computes until training moves
``up``.

* Transformers (any block with ``.attn`` and ``.mlp``: ViT, DeiT, Swin, ...): ``where`` picks the
  sub-modules. ``placement="sequential"``: ``out = sub(x) + adapter(sub(x))`` (Houlsby);
  ``"parallel"``: ``out = sub(x) + adapter(x)`` (AdaptFormer).
* Everything else with a stage structure (ResNet ``layerN``; ``stages`` / ``layers`` / ``blocks`` / ``network`` /
  ``features`` sequences: ConvNeXt, EfficientNet, MambaOut, MLP-Mixer, RexNet, DenseNet; numbered stages: RegNet
  ``s1..``, DLA ``level0..``, CoaT ``serial_blocks1..``, Inception ``Mixed_*``; see
  :mod:`visiontune.strategies.sites`): one adapter per stage, after its last block, whatever the layout of its
  output: 1×1 convolutions on NCHW maps, Linear layers on tokens and on channels-last (NHWC) maps (MambaOut,
  Sequencer), read from one probe forward. ``"sequential"``: ``out = stage(x) + adapter(stage(x))``.
  ``"parallel"`` needs the same shape in and out: its branch spans the stage's *last block*
  (``out = blk(x) + adapter(x)``), and single-block stages that change channels or resolution are refused.
  A model with neither structure is refused (a StrategyError naming ``adapter`` and the model).

Why hooks and not wrapper modules: an adapter is a child module named ``adapter`` of the module it follows
(``blocks.3.mlp.adapter.down.weight``; for a CNN stage, its last block: ``layer2.1.adapter.up.weight``) and
runs from a forward hook on that module. Base parameter names stay unchanged, so base checkpoints still
load, timm's ``group_matcher`` puts every adapter in the depth group of the layer it sits in (layer-wise LR
decay, gradual unfreezing), and timm's flattened gradient checkpointing (which calls blocks, not stages)
still runs them. The hooks are plain objects, so ``copy.deepcopy`` (EMA teachers) and pickling keep them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import StrategyConfig, StrategyError, available_strategies, check_positive, register_strategy
from .sites import module_width, output_layouts, stage_sites, transformer_sites

__all__ = ["ACTIVATIONS", "Adapter", "AdapterConfig", "adapter_sites", "apply_adapter"]

#: Activation names accepted by ``AdapterConfig.activation``.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}
_PLACEMENTS = ("sequential", "parallel")
_WHERE = ("attn", "mlp", "both")
#: Hidden width = channels // DEFAULT_REDUCTION when neither ``reduction`` nor ``bottleneck`` is set.
DEFAULT_REDUCTION = 16
#: Transformer default for ``where``: one adapter after the MLP is the best accuracy per parameter
#: (Adapter+, Steitz & Roth 2024).
DEFAULT_WHERE = "mlp"


def _check_choice(option: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise StrategyError(
            f"option {option!r} of strategy 'adapter' must be one of {', '.join(map(repr, allowed))}, got {value!r}"
        )


def _check_int(option: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise StrategyError(
            f"option {option!r} of strategy 'adapter' must be an integer >= 1 (or None), got {value!r}"
        )


@dataclass
class AdapterConfig(StrategyConfig):
    """Options of the ``adapter`` strategy.

    Args:
        reduction: hidden width = ``channels // reduction`` (at least 1). Default 16 when neither
            ``reduction`` nor ``bottleneck`` is set; set at most one of the two.
        bottleneck: fixed hidden width for every adapter.
        activation: one of ``gelu``, ``relu``, ``silu``, ``tanh``, ``identity``.
        placement: ``sequential`` (adapter reads the sub-module's output and adds to it) or ``parallel``
            (adapter reads the sub-module's input).
        scale: multiplies the adapter output (> 0).
        where: transformers only: ``attn``, ``mlp`` or ``both``; None means ``mlp``. CNN adapters always
            sit after each stage: leave it None there.
        init_std: std of the normal init of the down-projection (> 0); the up-projection starts at zero.

    Example:
        >>> AdapterConfig(bottleneck=8, where="both").where
        'both'
    """

    default_lr: ClassVar[float] = 3e-3  # AdamW peak LR when model.lr is None (see StrategyConfig)

    reduction: int | None = None
    bottleneck: int | None = None
    activation: str = "gelu"
    placement: str = "sequential"
    scale: float = 1.0
    where: str | None = None
    init_std: float = 1e-2

    def __post_init__(self) -> None:
        _check_int("reduction", self.reduction)
        _check_int("bottleneck", self.bottleneck)
        if self.reduction is not None and self.bottleneck is not None:
            raise StrategyError(
                "options 'reduction' and 'bottleneck' of strategy 'adapter' are exclusive: set one, "
                f"got reduction={self.reduction!r} and bottleneck={self.bottleneck!r}"
            )
        _check_choice("activation", self.activation, tuple(ACTIVATIONS))
        _check_choice("placement", self.placement, _PLACEMENTS)
        if self.where is not None:
            _check_choice("where", self.where, _WHERE)
        for option in ("scale", "init_std"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise StrategyError(f"option {option!r} of strategy 'adapter' must be a finite number, got {value!r}")
            check_positive(option, value)

    def hidden(self, channels: int) -> int:
        """Hidden width of the adapter for a module with ``channels`` features.

        Example:
            >>> AdapterConfig().hidden(192), AdapterConfig(bottleneck=8).hidden(192)
            (12, 8)
        """
        if self.bottleneck is not None:
            return self.bottleneck
        return max(1, channels // (self.reduction or DEFAULT_REDUCTION))


class Adapter(nn.Module):
    """``scale * up(act(down(x)))`` with a zero-initialised ``up``: Linear on the last dim, or 1×1 convs.

    Args:
        channels: feature size in and out (last dim for tokens, dim 1 for ``conv=True``).
        hidden: bottleneck width.
        activation: a key of :data:`ACTIVATIONS`.
        scale: output multiplier.
        init_std: std of ``down.weight`` (biases and ``up`` start at zero).
        conv: 1×1 ``Conv2d`` layers on NCHW maps instead of ``Linear`` layers on tokens.

    Example:
        >>> a = Adapter(192, 12)
        >>> a(torch.randn(2, 17, 192)).abs().max().item()
        0.0
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        activation: str = "gelu",
        scale: float = 1.0,
        init_std: float = 1e-2,
        conv: bool = False,
    ) -> None:
        super().__init__()
        if conv:
            self.down: nn.Module = nn.Conv2d(channels, hidden, 1)
            self.up: nn.Module = nn.Conv2d(hidden, channels, 1)
        else:
            self.down = nn.Linear(channels, hidden)
            self.up = nn.Linear(hidden, channels)
        self.act = ACTIVATIONS[activation]()
        self.scale = float(scale)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # zero-init: the adapted model starts as the base model, exactly
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.down(x))
        if self.scale == 1.0:
            return self.up(h)
        # the scale on up's small weight and bias, not on the output-sized result (one pass fewer)
        up, s = self.up, self.scale
        if isinstance(up, nn.Conv2d):
            return F.conv2d(h, up.weight * s, up.bias * s)
        return F.linear(h, up.weight * s, up.bias * s)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class _AdapterHook:
    """Forward hook: ``output + module.adapter(input if parallel else output)``.

    Holds no module reference, so deep copies of the model get working hooks.
    """

    def __init__(self, parallel: bool) -> None:
        self.parallel = parallel

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            x = args[0] if args else kwargs["x"]
        else:
            x = output
        return output + module.adapter(x)


def _has_adapter_hook(module: nn.Module) -> bool:
    return any(isinstance(h, _AdapterHook) for h in module._forward_hooks.values())


def _sites(model: nn.Module, cfg: AdapterConfig) -> tuple[bool, list[tuple[str, nn.Module]]]:
    """``(transformer?, sites)``: the ``where`` sub-modules of transformer blocks, else one site per stage."""
    where = cfg.where or DEFAULT_WHERE
    sites = transformer_sites(model, ("attn", "mlp") if where == "both" else (where,))
    if sites:
        return True, sites
    sites = stage_sites(model)
    if not sites:
        others = [s for s in available_strategies() if s not in ("adapter", "vpt")]
        raise StrategyError(
            f"strategy 'adapter' does not fit {type(model).__name__}: it found no transformer blocks "
            "(modules with .attn and .mlp) and no stage structure (layerN; stages, layers, blocks, network or "
            f"features; numbered stages such as s1, level0, Mixed_5b). Strategies that fit any backbone: "
            f"{', '.join(others)}"
        )
    if cfg.where is not None:
        raise StrategyError(
            f"option 'where'={cfg.where!r} of strategy 'adapter' applies to transformer blocks; "
            f"{type(model).__name__} is a CNN whose adapters sit after each stage: leave 'where' unset"
        )
    return False, sites


def adapter_sites(model: nn.Module, cfg: AdapterConfig | None = None) -> list[str]:
    """Names of the modules an ``adapter`` strategy would hook (their ``.adapter`` holds the parameters).

    Args:
        model: a timm model.
        cfg: the adapter options (``where`` decides the transformer sub-modules); default options if None.

    Example:
        >>> import timm
        >>> adapter_sites(timm.create_model("resnet18"))
        ['layer1.1', 'layer2.1', 'layer3.1', 'layer4.1']
    """
    return [n for n, _ in _sites(model, cfg or AdapterConfig())[1]]


def _attach(module: nn.Module, name: str, adapter: Adapter, parallel: bool) -> None:
    if _has_adapter_hook(module) or hasattr(module, "adapter"):
        raise StrategyError(f"adapter: {name!r} already has an adapter (apply the strategy once)")
    module.add_module("adapter", adapter)
    module.register_forward_hook(_AdapterHook(parallel), with_kwargs=True)


@register_strategy("adapter", AdapterConfig)
def apply_adapter(model: nn.Module, cfg: AdapterConfig) -> None:
    """Adapters: zero-initialised bottleneck adapters after transformer attention/MLP or after each stage.

    Only the adapters (parameter names containing ``adapter``) and the head train. Each adapter's width and
    kind come from its site's output in one probe forward: 1×1 convs on NCHW maps, Linear layers on tokens and
    channels-last (NHWC) maps.

    Args:
        model: a timm ViT-style transformer (blocks with ``.attn`` and ``.mlp``) or a model with stages.
        cfg: adapter options.

    Example:
        >>> import timm
        >>> from visiontune.strategies import apply_strategy
        >>> net = timm.create_model("resnet18", num_classes=3)
        >>> _ = apply_strategy(net, "adapter", {"bottleneck": 8})
        >>> sorted({n.split(".adapter.")[0] for n, p in net.named_parameters() if "adapter" in n})
        ['layer1.1', 'layer2.1', 'layer3.1', 'layer4.1']
    """
    parallel = cfg.placement == "parallel"
    ref = next(model.parameters())
    transformer, sites = _sites(model, cfg)
    for name, module in sites:
        if _has_adapter_hook(module) or hasattr(module, "adapter"):
            raise StrategyError(f"adapter: {name!r} already has an adapter (apply the strategy once)")
    found = output_layouts(model, [m for _, m in sites], strategy="adapter", widths=[module_width(m) for _, m in sites])
    model_name = type(model).__name__
    shapes, layouts = {}, []
    for (name, module), got in zip(sites, found):
        if got is None or (parallel and got[0][0] is None):
            raise StrategyError(f"strategy 'adapter' does not fit {model_name}: {name!r} ({type(module).__name__}) "
                                "does not map a tensor to a tensor in its forward, so no adapter can follow it")
        shapes[id(module)] = got[0]
        layouts.append(got[1])
    if parallel:
        _check_parallel(model_name, transformer, sites, shapes, layouts)
    for (name, module), (layout, ch) in zip(sites, layouts):
        adapter = Adapter(ch, cfg.hidden(ch), cfg.activation, cfg.scale, cfg.init_std, conv=layout == "nchw")
        _attach(module, name, adapter.to(device=ref.device, dtype=ref.dtype), parallel)


def _check_parallel(model_name: str, transformer: bool, sites: list[tuple[str, nn.Module]],
                    shapes: dict, layouts: list[tuple[str, int]]) -> None:
    """``placement='parallel'`` adds ``adapter(x)`` to the output: each site must keep its input's shape."""
    bad = [(n, shapes[id(m)]) for n, m in sites if shapes[id(m)][0] != shapes[id(m)][1]]
    if not bad:
        return
    if transformer:
        name, (ins, out) = bad[0]
        layout = dict(zip([n for n, _ in sites], layouts))[name]
        dim = 1 if layout[0] == "nchw" else -1
        raise StrategyError(
            f"adapter placement='parallel' needs {name!r} of {model_name} to keep its width, but it maps "
            f"{ins[dim]} -> {out[dim]} features; use placement='sequential'"
        )
    raise StrategyError(
        f"adapter placement='parallel' on {model_name} adds adapter(x) to the output of each stage's last block, "
        "so that block must keep its shape (channels, height, width); these do not: "
        f"{'; '.join(f'{n} {tuple(i[1:])} -> {tuple(o[1:])}' for n, (i, o) in bad)}. Use placement='sequential'"
    )
