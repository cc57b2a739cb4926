"""Option blocks given as a config dataclass, a plain mapping (YAML, hparams) or ``None``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional, TypeVar

from ..errors import ConfigError

__all__ = ["coerce_config"]

C = TypeVar("C")


def coerce_config(value: Any, cls: type[C], option: str) -> Optional[C]:
    """``cls`` from an instance, a mapping or ``None``; unknown keys are an error naming them and ``option``.

    Checkpoints keep such blocks as plain dicts (they load with ``weights_only=True``); this turns them back.

    Example:
        >>> from visiontune.objectives.semisup import FixMatchConfig
        >>> coerce_config({"mu": 2}, FixMatchConfig, "model.semi_supervised").mu
        2
    """
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{option} must be a {cls.__name__} or a mapping, got {type(value).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"{option}: unknown option(s) {unknown}; known: {', '.join(known)}")
    return cls(**dict(value))
