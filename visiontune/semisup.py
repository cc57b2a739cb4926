"""Deprecated alias of :mod:`visiontune.objectives.semisup` (the package was reorganised by concept, issue #12).

Importing it warns (``DeprecationWarning``); every name still resolves to the one there.
"""

from __future__ import annotations

import warnings
from typing import Any

from .objectives import semisup as _moved
from .objectives.semisup import *  # noqa: F401,F403
from .objectives.semisup import __all__  # noqa: F401

warnings.warn("visiontune.semisup is deprecated: import visiontune.objectives.semisup instead", DeprecationWarning,
              stacklevel=2)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
