"""The ``visiontune`` command (:mod:`visiontune.cli.main`): ``main`` is its entry point (``pyproject.toml``).

``visiontune --help`` imports neither torch nor Lightning: this package loads only :mod:`visiontune.cli.main`.
"""

from __future__ import annotations

from typing import Any

from .main import DEPRECATED_TOOLS, TOOLS, cli_class, load_tool, main, register_tool  # noqa: F401  (re-exported)

__all__ = ["main", "VisionTuneCLI", "DEPRECATED_TOOLS", "TOOLS", "cli_class", "load_tool", "register_tool"]


def __getattr__(name: str) -> Any:
    if name == "VisionTuneCLI":
        return cli_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
