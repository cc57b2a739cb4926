"""Bottleneck adapters: after attention / MLP in transformer blocks, residual 1×1-conv adapters on CNN stages.

An adapter is ``scale * up(act(down(h)))`` with ``up`` zero-initialised, added to the output of the module
it follows, so the adapted model computes exactly what the base model computes until training moves
``up``.

* Transformers (any block with ``.attn`` and ``.mlp``: ViT, DeiT, Swin, ...): ``where`` picks the
  sub-modules. ``placement="sequential"``: ``out = sub(x) + adapter(sub(x))`` (Houlsby);
  ``"parallel"``: ``out = sub(x) + adapter(x)`` (AdaptFormer).
* CNNs (ResNet ``layerN``, EfficientNet/MobileNet ``blocks[i]``, ConvNeXt ``stages[i]``): one adapter of
  1×1 convolutions per stage. ``"sequential"``: ``out = stage(x) + adapter(stage(x))``. ``"parallel"``
  needs the same shape in and out: its branch spans the stage's *last block* (``out = blk(x) + adapter(x)``),
  and single-block stages that change channels or resolution are refused.

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
from torch import nn

from .base import StrategyConfig, StrategyError, available_strategies, check_positive, register_strategy

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
        return self.up(self.act(self.down(x))) * self.scale

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


def _transformer_sites(model: nn.Module, where: str) -> list[tuple[str, nn.Module]]:
    subs = ("attn", "mlp") if where == "both" else (where,)
    sites = []
    for name, m in model.named_modules():
        if isinstance(getattr(m, "attn", None), nn.Module) and isinstance(getattr(m, "mlp", None), nn.Module):
            for s in subs:
                sites.append((f"{name}.{s}" if name else s, getattr(m, s)))
    return sites


def _cnn_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """CNN stages: ResNet ``layerN``; ConvNeXt-style ``stages[i]``; EfficientNet-style ``blocks[i]``."""
    layers = []
    i = 1
    while isinstance(getattr(model, f"layer{i}", None), nn.Module):
        layers.append((f"layer{i}", getattr(model, f"layer{i}")))
        i += 1
    if layers:
        return layers
    stages = getattr(model, "stages", None)
    if isinstance(stages, (nn.Sequential, nn.ModuleList)) and len(stages):
        return [(f"stages.{i}", s) for i, s in enumerate(stages)]
    blocks = getattr(model, "blocks", None)
    if (
        isinstance(blocks, (nn.Sequential, nn.ModuleList))
        and len(blocks)
        and all(isinstance(b, (nn.Sequential, nn.ModuleList)) for b in blocks)
    ):
        return [(f"blocks.{i}", s) for i, s in enumerate(blocks)]
    return []


def _last_block(stage_name: str, stage: nn.Module) -> tuple[str, nn.Module]:
    """The module whose output is the stage's output: ``stage.blocks[-1]``, ``stage[-1]`` or the stage."""
    inner = getattr(stage, "blocks", None)
    if isinstance(inner, nn.Sequential) and len(inner):
        return f"{stage_name}.blocks.{len(inner) - 1}", inner[-1]
    if isinstance(stage, nn.Sequential) and len(stage):
        return f"{stage_name}.{len(stage) - 1}", stage[-1]
    return stage_name, stage


def _probe_shapes(model: nn.Module, modules: list[nn.Module]) -> list[tuple[torch.Size, torch.Size]]:
    """(input, output) shapes of ``modules`` in one no-grad eval forward of a small dummy image."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    ref = next(model.parameters())
    in_chans = first_conv.in_channels if first_conv is not None else 3
    cfg_size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[1:])
    shapes: dict[int, tuple[torch.Size, torch.Size]] = {}

    def record(m: nn.Module, args: tuple, out: Any) -> None:
        if not isinstance(out, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
            raise StrategyError(f"adapter: {type(m).__name__} does not map a tensor to a tensor")
        shapes[id(m)] = (args[0].shape, out.shape)

    handles = [m.register_forward_hook(record) for m in modules]
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no BatchNorm statistics update from the probe
    try:
        last_exc: Exception | None = None
        for size in ((64, 64), cfg_size):
            try:
                with torch.no_grad():
                    model(torch.zeros(1, in_chans, *size, device=ref.device, dtype=ref.dtype))
                last_exc = None
                break
            except StrategyError:
                raise
            except Exception as exc:  # noqa: BLE001 - some models only accept their native size
                last_exc = exc
        if last_exc is not None:
            raise StrategyError(
                f"adapter: could not run {type(model).__name__} on a dummy image to size the adapters: {last_exc}"
            ) from last_exc
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return [shapes[id(m)] for m in modules]


def _last_linear(module: nn.Module) -> nn.Linear | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


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
    cfg = cfg or AdapterConfig()
    sites = _transformer_sites(model, cfg.where or DEFAULT_WHERE)
    if sites:
        return [n for n, _ in sites]
    return [_last_block(n, s)[0] for n, s in _cnn_stages(model)]


def _attach(module: nn.Module, name: str, adapter: Adapter, parallel: bool) -> None:
    if _has_adapter_hook(module) or hasattr(module, "adapter"):
        raise StrategyError(f"adapter: {name!r} already has an adapter (apply the strategy once)")
    module.add_module("adapter", adapter)
    module.register_forward_hook(_AdapterHook(parallel), with_kwargs=True)


@register_strategy("adapter", AdapterConfig)
def apply_adapter(model: nn.Module, cfg: AdapterConfig) -> None:
    """Adapters: zero-initialised bottleneck adapters after transformer attention/MLP or CNN stages.

    Only the adapters (parameter names containing ``adapter``) and the head train.

    Args:
        model: a timm ViT-style transformer (blocks with ``.attn`` and ``.mlp``) or CNN with stages.
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
    sites = _transformer_sites(model, cfg.where or DEFAULT_WHERE)
    if sites:
        for name, sub in sites:
            first, last = (
                next((m for m in sub.modules() if isinstance(m, nn.Linear)), None),
                _last_linear(sub),
            )
            if last is None:
                raise StrategyError(f"adapter: {name!r} ({type(sub).__name__}) has no Linear layer to size it")
            dim = last.out_features
            if parallel and first.in_features != dim:
                raise StrategyError(
                    f"adapter placement='parallel' needs {name!r} to keep its width, but it maps "
                    f"{first.in_features} -> {dim} features; use placement='sequential'"
                )
            adapter = Adapter(dim, cfg.hidden(dim), cfg.activation, cfg.scale, cfg.init_std)
            _attach(sub, name, adapter.to(device=ref.device, dtype=ref.dtype), parallel)
        return

    stages = _cnn_stages(model)
    if not stages:
        others = [s for s in available_strategies() if s not in ("adapter", "vpt")]
        raise StrategyError(
            f"strategy 'adapter' does not fit {type(model).__name__}: it found no transformer blocks "
            "(modules with .attn and .mlp) and no CNN stages (layerN, stages[i], or blocks[i] made of "
            f"blocks). Strategies that fit any backbone: {', '.join(others)}"
        )
    if cfg.where is not None:
        raise StrategyError(
            f"option 'where'={cfg.where!r} of strategy 'adapter' applies to transformer blocks; "
            f"{type(model).__name__} is a CNN whose adapters sit after each stage: leave 'where' unset"
        )
    lasts = [_last_block(n, s) for n, s in stages]
    shapes = _probe_shapes(model, [m for _, m in lasts])
    if parallel:
        bad = [f"{n} {tuple(i[1:])} -> {tuple(o[1:])}" for (n, _), (i, o) in zip(lasts, shapes) if i != o]
        if bad:
            raise StrategyError(
                "adapter placement='parallel' on a CNN adds adapter(x) to the output of each stage's last "
                "block, so that block must keep its shape (channels, height, width); these do not: "
                f"{'; '.join(bad)}. Use placement='sequential'"
            )
    for (name, block), (_, out_shape) in zip(lasts, shapes):
        if len(out_shape) != 4:
            raise StrategyError(
                f"adapter: CNN stage block {name!r} outputs shape {tuple(out_shape)}, expected NCHW feature maps"
            )
        ch = int(out_shape[1])
        adapter = Adapter(ch, cfg.hidden(ch), cfg.activation, cfg.scale, cfg.init_std, conv=True)
        _attach(block, name, adapter.to(device=ref.device, dtype=ref.dtype), parallel)
