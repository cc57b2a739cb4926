"""Deprecated alias of :mod:`visiontune.data.checks` (the package was reorganised by concept, issue #12).

Importing it warns (``DeprecationWarning``); every name still resolves to the one there.
"""

from __future__ import annotations

import warnings
from typing import Any

from .data import checks as _moved
from .data.checks import *  # noqa: F401,F403
from .data.checks import __all__  # noqa: F401

warnings.warn("visiontune.checks is deprecated: import visiontune.data.checks instead", DeprecationWarning,
              stacklevel=2)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
