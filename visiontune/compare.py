"""Deprecated alias of :mod:`visiontune.comparison.api` (the package was reorganised by concept, issue #12).

Importing it warns (``DeprecationWarning``); every name still resolves to the one there.
"""

from __future__ import annotations

import sys
import types
import warnings
from typing import Any

from .comparison import api as _moved
from .comparison.api import *  # noqa: F401,F403
from .comparison.api import __all__  # noqa: F401

warnings.warn("visiontune.compare is deprecated: import visiontune.comparison.api instead", DeprecationWarning,
              stacklevel=2)


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)


class _CallableModule(types.ModuleType):
    """``visiontune.compare`` names both this module and :func:`visiontune.compare`: once this module is
    imported, the package attribute is the module, so calling it must still run the comparison."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _moved.compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
