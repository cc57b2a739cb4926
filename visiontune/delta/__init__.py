"""Task deltas: save only what a strategy changed, rebuild the model from it, keep several tasks on one base.

* :mod:`visiontune.delta.format`: the ``.safetensors`` file (``save_delta``, ``delta_from_file``);
* :mod:`visiontune.delta.load`: ``check_delta`` (does it fit the model?) and ``load_delta``;
* :mod:`visiontune.delta.build`: a model from a delta's metadata (``build_from_delta``);
* :mod:`visiontune.delta.writer`: ``DeltaWriter``, the callback that writes ``delta.safetensors`` after ``fit``;
* :mod:`visiontune.delta.bank`: ``TaskBank``, several tasks on one base, swapped in place.

Every public name of those modules is importable from here. Importing this package does not import
Lightning (``DeltaWriter`` loads it on first use; the others load with their module on first use too).

Example:
    >>> from visiontune.delta import TaskBank, build_from_delta, save_delta
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .format import (  # noqa: F401  (re-exported)
    DeltaError,
    DeltaInfo,
    DeltaLayout,
    applied_strategy,
    base_tensor_hashes,
    delta_from_file,
    delta_info,
    is_transfer_classifier,
    save_delta,
    set_class_names,
    write_delta,
)
from .load import check_delta, load_delta  # noqa: F401  (re-exported)

# name -> submodule, imported on first use (the writer subclasses a Lightning Callback)
_LAZY = {
    "build_from_delta": "build", "apply_delta_to_module": "build", "module_arguments_from_delta": "build",
    "DeltaWriter": "writer",
    "TaskBank": "bank", "MultiTask": "bank", "task_bank": "bank",
    "add_task": "bank", "use_task": "bank", "merge_task": "bank",
}

__all__ = sorted([
    "DeltaError", "DeltaInfo", "DeltaLayout", "applied_strategy", "base_tensor_hashes", "check_delta",
    "delta_from_file", "delta_info", "is_transfer_classifier", "load_delta", "save_delta", "set_class_names",
    "write_delta", *_LAZY,
])


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


if TYPE_CHECKING:  # pragma: no cover
    from .bank import MultiTask, TaskBank, add_task, merge_task, task_bank, use_task  # noqa: F401
    from .build import apply_delta_to_module, build_from_delta, module_arguments_from_delta  # noqa: F401
    from .writer import DeltaWriter  # noqa: F401
