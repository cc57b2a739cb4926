"""Strategy registry: name -> (config dataclass, apply). Each strategy registers next to its definition."""

from __future__ import annotations

import importlib

from . import base as _base
from .base import (  # noqa: F401  (re-exported)
    Strategy,
    StrategyConfig,
    StrategyError,
    apply_strategy,
    available_strategies,
    check_positive,
    delta_parameter_names,
    get_strategy,
    head_parameter_names,
    make_strategy_config,
    register_strategy,
    trainable_parameter_count,
)

# Modules that define built-in strategies; imported lazily the first time the registry is read.
_BUILTIN_MODULES = ("freeze", "lora", "adapter", "prompt", "sparse")
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:  # built-ins: a missing one is a broken install and must fail loudly
        importlib.import_module(f"{__name__}.{mod}")


__all__ = list(_base.__all__)
