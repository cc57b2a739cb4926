"""Deprecated alias of :mod:`visiontune.objectives.fixmatch` (the package was reorganised by concept, issue #12).

Importing it warns (``DeprecationWarning``); every name still resolves to the one there.
"""

from __future__ import annotations

import warnings
from typing import Any

from .objectives import fixmatch as _moved
from .objectives.fixmatch import *  # noqa: F401,F403
from .objectives.fixmatch import __all__  # noqa: F401

warnings.warn("visiontune.fixmatch is deprecated: import visiontune.objectives.fixmatch instead", DeprecationWarning,
              stacklevel=2)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
