"""Strategy registry: name -> (config dataclass, apply). Each strategy registers next to its definition.

The registry lives in :mod:`visiontune.strategies.base` (which also loads the built-in strategies' modules
the first time it is read); this package re-exports its public names.
"""

from __future__ import annotations

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


__all__ = list(_base.__all__)
