"""The ``visiontune`` command: LightningCLI (fit/validate/test/predict) plus visiontune's own tools.

    visiontune fit --config configs/quickstart.yaml
    visiontune fit --config configs/quickstart.yaml --model.strategy last_k --model.strategy_args '{k: 2}'
    visiontune fit --config configs/quickstart.yaml --print_config > my.yaml
    visiontune predict --ckpt_path runs/.../checkpoints/last.ckpt --data.predict photos/
    visiontune predict --delta runs/.../checkpoints/delta.safetensors --data.predict photos/
    visiontune strategies              # the strategies; visiontune strategies lora: its options
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Union

__all__ = ["main", "VisionTuneCLI", "DEPRECATED_TOOLS", "TOOLS", "cli_class", "load_tool", "register_tool"]

Tool = Callable[[Sequence[str]], int]

# visiontune's own sub-commands (not LightningCLI ones): name -> "module:function", the function taking the
# remaining argv. Only the chosen tool's module is imported (``visiontune --help`` imports none), and the tools'
# modules never import this one to register themselves: this map is the one place that names them.
TOOLS: dict[str, Union[str, Tool]] = {
    "check-data": "visiontune.data.checks:main",
    "compare": "visiontune.comparison.api:compare_main",
    "export": "visiontune.deploy.export:export_main",
    "lr-find": "visiontune.schedule.tuning:lr_find_main",
    "report": "visiontune.reports.cli:report_main",
    "schedule": "visiontune.schedule.tuning:schedule_main",
    "strategies": "visiontune.cli.strategies:strategies_main",
    "suggest": "visiontune.active.suggest:suggest_main",
}
# Tools' names are spelled with dashes (``check-data``, ``lr-find``). An old spelling still runs its tool, after one
# deprecation line on stderr.
DEPRECATED_TOOLS: dict[str, str] = {"lr_find": "lr-find"}


def load_tool(name: str) -> Tool:
    """The function of ``visiontune NAME`` (importing its module now); a ``KeyError`` for an unknown name."""
    target = TOOLS[name]
    if not isinstance(target, str):
        return target
    import importlib

    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def register_tool(name: str) -> Callable[[Tool], Tool]:
    """Add a ``visiontune NAME ...`` sub-command defined outside visiontune (built-ins are listed in
    :data:`TOOLS`). The decorated function takes the remaining argv and returns the exit code."""

    def deco(fn: Tool) -> Tool:
        TOOLS[name] = fn
        return fn

    return deco


def cli_class():
    """The :class:`~visiontune.cli.lightning_cli.VisionTuneCLI` class (imports Lightning on first use;
    ``visiontune.cli.VisionTuneCLI`` calls this)."""
    from .lightning_cli import VisionTuneCLI

    return VisionTuneCLI


def __getattr__(name: str):
    if name == "VisionTuneCLI":
        return cli_class()
    raise AttributeError(name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``visiontune`` command."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("visiontune tools: " + ", ".join(sorted(TOOLS)))
        print("LightningCLI sub-commands: fit, validate, test, predict (visiontune fit --help)")
        return 0
    from ..errors import ConfigError

    if argv[0] in DEPRECATED_TOOLS:
        print(f"visiontune {argv[0]} is deprecated: use visiontune {DEPRECATED_TOOLS[argv[0]]}", file=sys.stderr)
        argv[0] = DEPRECATED_TOOLS[argv[0]]
    try:
        if argv[0] in TOOLS:
            return load_tool(argv[0])(argv[1:]) or 0
        cli_class()(args=None if from_sys else argv)
    except Exception as exc:
        # the user's mistake (data, option, file), found before training: one message, exit 2, no traceback.
        # Anything else is a bug and keeps its traceback.
        user = _user_error(exc)
        if user is None:
            raise
        prog = "visiontune" + (f" {argv[0]}" if not argv[0].startswith("-") else "")
        what = "invalid configuration: " if isinstance(user, ConfigError) else ""
        print(f"{prog}: error: {what}{user}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


def _user_error(exc: BaseException):
    """``exc`` if it is a :class:`~visiontune.errors.UserError`, or the one it was raised ``from`` (jsonargparse
    wraps a config dataclass's error in its own ``ValueError``); ``None`` for anything else."""
    from ..errors import UserError

    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, UserError):
            return exc
        exc, seen = exc.__cause__, seen + 1
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
