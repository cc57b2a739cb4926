"""The strategy contract: a config dataclass plus an ``apply(model, cfg)`` that edits a timm model in place.

A strategy decides which parameters train. ``apply_strategy`` freezes everything, runs the strategy,
then always unfreezes the classification head, and records on the model which parameter names form
the task delta (what :mod:`visiontune.delta` saves). Strategies that inject modules (LoRA, adapters,
prompts) add parameters; their names are part of the delta automatically because they train.

Register a new strategy next to its definition::

    @dataclass
    class MyConfig(StrategyConfig):
        scale: float = 1.0
        def __post_init__(self):
            check_positive("scale", self.scale)

    @register_strategy("mine", MyConfig)
    def apply_mine(model: nn.Module, cfg: MyConfig) -> None:
        ...
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

from torch import nn

from ..errors import ConfigError
from ..models.heads import HeadError, find_head

__all__ = [
    "Strategy",
    "StrategyConfig",
    "StrategyError",
    "apply_strategy",
    "available_strategies",
    "check_positive",
    "delta_parameter_names",
    "get_strategy",
    "head_parameter_names",
    "make_strategy_config",
    "register_strategy",
    "trainable_parameter_count",
]


class StrategyError(ConfigError):
    """Unknown strategy, bad option, or a strategy that does not fit the backbone."""


@dataclass
class StrategyConfig:
    """Base class of every strategy's options. Subclasses validate in ``__post_init__``.

    ``default_lr`` (a class attribute, not an option) is the AdamW peak learning rate the strategy trains
    with when ``model.lr`` is ``None``: a linear probe or LoRA wants a far larger LR than full
    fine-tuning, so each strategy declares its own next to its config (values in BENCHMARKS.md).
    ``mergeable`` (a class attribute too): :func:`visiontune.merge_and_unload` bakes what the strategy trained
    into plain layers of the base (zero inference overhead); ``visiontune strategies`` shows both.
    """

    default_lr: ClassVar[float] = 1e-3
    mergeable: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Strategy:
    name: str
    config_cls: type[StrategyConfig]
    apply: Callable[[nn.Module, Any], None]
    description: str = ""


_REGISTRY: dict[str, Strategy] = {}
# Modules of visiontune.strategies that define built-in strategies; imported the first time the registry is read.
_BUILTIN_MODULES = ("freeze", "lora", "dora", "ssf", "adapter", "prompt", "sparse")
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:  # built-ins: a missing one is a broken install and must fail loudly
        importlib.import_module(f"{__package__}.{mod}")


def register_strategy(name: str, config_cls: type[StrategyConfig]) -> Callable:
    """Decorator registering ``apply(model, cfg)`` under ``name`` with its config class."""

    def deco(fn: Callable[[nn.Module, Any], None]) -> Callable[[nn.Module, Any], None]:
        if name in _REGISTRY and _REGISTRY[name].apply is not fn:
            raise StrategyError(f"strategy {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = Strategy(name, config_cls, fn, doc[0] if doc else "")
        config_cls.strategy_name = name  # type: ignore[attr-defined]
        return fn

    return deco


def available_strategies() -> list[str]:
    """Names of all registered strategies, e.g. ``['bitfit', 'full', 'last_k', 'linear', ...]``."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    available = available_strategies()
    if name not in _REGISTRY:
        raise StrategyError(f"Unknown strategy {name!r}. Available strategies: {', '.join(available)}")
    return _REGISTRY[name]


def check_positive(option: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise a :class:`StrategyError` naming ``option`` unless ``value`` is > 0 (or ≥ 0)."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise StrategyError(f"option {option!r} must be {bound}, got {value!r}")


def make_strategy_config(
    strategy: str | StrategyConfig, options: Mapping[str, Any] | None = None
) -> StrategyConfig:
    """Turn a name (+ options) or a config object into a validated config.

    Unknown option names are rejected with the list of valid ones.

    Example:
        >>> make_strategy_config("last_k", {"k": 2})
        LastKConfig(k=2, coarse=False)
    """
    if isinstance(strategy, StrategyConfig):
        if options:
            strategy = dataclasses.replace(strategy, **dict(options))
        return strategy
    if not isinstance(strategy, str):
        raise StrategyError(f"strategy must be a name or a StrategyConfig, got {type(strategy).__name__}")
    spec = get_strategy(strategy)
    options = dict(options or {})
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise StrategyError(
            f"Unknown option(s) {unknown} for strategy {strategy!r}. Valid options: {sorted(fields) or 'none'}"
        )
    return spec.config_cls(**options)


def strategy_name(cfg: StrategyConfig) -> str:
    name = getattr(type(cfg), "strategy_name", None)
    if name is None:
        raise StrategyError(f"{type(cfg).__name__} is not registered as a strategy")
    return name


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names (in ``model.named_parameters()``) of the classification head's parameters: every module of
    :func:`~visiontune.models.heads.find_head` (distilled models: ``head`` and ``head_dist``; LeViT: their
    BatchNorm1d and Linear)."""
    try:
        return list(find_head(model).parameter_names)
    except HeadError as exc:
        raise StrategyError(str(exc)) from None


def apply_strategy(
    model: nn.Module, strategy: str | StrategyConfig, options: Mapping[str, Any] | None = None
) -> StrategyConfig:
    """Apply a strategy to a timm model in place and return its validated config.

    Everything is frozen first; the strategy unfreezes (or adds) what it trains; the head always trains.

    Example:
        >>> import timm
        >>> net = timm.create_model("resnet18", num_classes=3)
        >>> cfg = apply_strategy(net, "bitfit")
        >>> sorted({n.split(".")[-1] for n, p in net.named_parameters() if p.requires_grad and "fc." not in n})
        ['bias']
        >>> net.fc.weight.requires_grad  # the head
        True
    """
    cfg = make_strategy_config(strategy, options)
    spec = get_strategy(strategy_name(cfg))
    for p in model.parameters():
        p.requires_grad_(False)
    spec.apply(model, cfg)
    head = set(head_parameter_names(model))
    for n, p in model.named_parameters():
        if n in head:
            p.requires_grad_(True)
    model.visiontune_strategy = cfg  # type: ignore[assignment]
    model.visiontune_delta = frozenset(n for n, p in model.named_parameters() if p.requires_grad)  # type: ignore[assignment]
    return cfg


def delta_parameter_names(model: nn.Module) -> frozenset[str]:
    """Parameter names the strategy may train (fixed at apply time, unaffected by schedules)."""
    names = getattr(model, "visiontune_delta", None)
    if names is None:
        return frozenset(n for n, p in model.named_parameters() if p.requires_grad)
    return names


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once. A frozen weight stored quantized
    (qlora: buffers of codes in a module with ``quantized_numel``) counts as the parameters it stands for, so the
    total, and the trainable share, are those of the original model.

    Example:
        >>> import timm
        >>> net = timm.create_model("resnet18", num_classes=3)
        >>> total = trainable_parameter_count(net)[1]
        >>> _ = apply_strategy(net, "qlora", {"bits": 4})
        >>> lora = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
        >>> trainable_parameter_count(net)[1] == total + lora
        True
    """
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    total += sum(int(getattr(m, "quantized_numel", 0)) for m in model.modules())
    return trainable, total
