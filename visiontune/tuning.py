"""Deprecated alias of :mod:`visiontune.schedule.tuning` (the package was reorganised by concept, issue #12).

Importing it warns (``DeprecationWarning``); every name still resolves to the one there.
"""

from __future__ import annotations

import warnings
from typing import Any

from .schedule import tuning as _moved
from .schedule.tuning import *  # noqa: F401,F403
from .schedule.tuning import __all__  # noqa: F401

warnings.warn("visiontune.tuning is deprecated: import visiontune.schedule.tuning instead", DeprecationWarning,
              stacklevel=2)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
