"""Gradual unfreezing: the phases (:mod:`~visiontune.schedule.phases`), the ``GradualUnfreeze`` callback
(:mod:`~visiontune.schedule.callback`, YAML format and group names in its docstring) and the ``lr_find`` /
``schedule`` tools (:mod:`~visiontune.schedule.tuning`).

``visiontune.schedule.GradualUnfreeze`` is the ``class_path`` configs name. Importing this package does not
import Lightning (the callback class is built on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .phases import (  # noqa: F401  (re-exported)
    Phase,
    ResolvedSchedule,
    ScheduleError,
    auto_phases,
    group_index,
    group_names,
    parse_phases,
    resolve_schedule,
    summarize_names,
)

__all__ = [
    "GradualUnfreeze",
    "Phase",
    "ResolvedSchedule",
    "ScheduleError",
    "auto_phases",
    "group_index",
    "group_names",
    "parse_phases",
    "resolve_schedule",
]


def __getattr__(name: str) -> Any:
    if name == "GradualUnfreeze":  # a Lightning Callback: built on first use (visiontune.schedule.callback)
        from .callback import GradualUnfreeze

        globals()[name] = GradualUnfreeze
        return GradualUnfreeze
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .callback import GradualUnfreeze  # noqa: F401,F811
