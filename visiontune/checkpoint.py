"""Deprecated alias of :mod:`visiontune.training.checkpoint` (the package was reorganised by concept, issue #12).

Importing it warns (``DeprecationWarning``); every name still resolves to the one there.
"""

from __future__ import annotations

import warnings
from typing import Any

from .training import checkpoint as _moved
from .training.checkpoint import *  # noqa: F401,F403
from .training.checkpoint import __all__  # noqa: F401

warnings.warn("visiontune.checkpoint is deprecated: import visiontune.training.checkpoint instead", DeprecationWarning,
              stacklevel=2)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
