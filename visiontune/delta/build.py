"""Build a model from a task delta's metadata, or load a delta into a model that has no network yet.

The functions the CLI and ``build_from_delta`` users need on top of :mod:`visiontune.delta.format` (which
saves and reads deltas) and :mod:`visiontune.delta.load` (which checks and loads them); importable from
:mod:`visiontune.delta` too.

Example:
    >>> from visiontune.delta.build import build_from_delta
    >>> model = build_from_delta("digits_lora.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from torch import nn

from .format import DeltaError, delta_from_file
from .load import load_delta

if TYPE_CHECKING:  # pragma: no cover
    from ..training.module import TransferClassifier

__all__ = ["apply_delta_to_module", "build_from_delta", "module_arguments_from_delta"]


def build_from_delta(
    path: str | os.PathLike,
    weights: str | os.PathLike | None = "metadata",
    *,
    check_base: bool = True,
    **overrides: Any,
) -> TransferClassifier:
    """Build the base model a delta was trained on (from its metadata) and load the delta into it.

    Args:
        path: a file written by :func:`save_delta`.
        weights: the base's weight source; ``"metadata"`` (default) uses the one recorded in the delta.
            Pass it when the recorded source is not available here (e.g. a file path from another machine).
        check_base: verify the base tensors (see :func:`load_delta`).
        **overrides: further :class:`~visiontune.TransferClassifier` arguments (``lr``, ...).

    Returns:
        A TransferClassifier in eval mode, with the delta loaded.

    Example:
        >>> model = build_from_delta("digits_lora.safetensors")  # doctest: +SKIP
        >>> model(torch.zeros(1, 3, 64, 64)).shape               # doctest: +SKIP
        torch.Size([1, 10])
    """
    from ..training.module import TransferClassifier

    kwargs: dict[str, Any] = module_arguments_from_delta(path)
    del kwargs["num_classes"]  # follows from class_names
    if weights != "metadata":
        kwargs["weights"] = weights
    args = kwargs.pop("backbone_args")
    kwargs.update(drop_path_rate=args.pop("drop_path_rate", None), backbone_args=args or None)
    kwargs.update(overrides)
    model = TransferClassifier(**kwargs)
    load_delta(model, path, check_base=check_base)
    return model.eval()


def apply_delta_to_module(module: nn.Module, path: str | os.PathLike, *, check_base: bool = True) -> dict[str, Any]:
    """Load a delta into a TransferClassifier, building its network first if it has none yet (CLI hook).

    Args:
        module: a TransferClassifier whose hparams (backbone, strategy, weights) match the delta.
        path: a file written by :func:`save_delta`.
        check_base: verify the base tensors (see :func:`load_delta`).

    Returns:
        The delta's metadata.

    Example:
        >>> apply_delta_to_module(model, "runs/x/checkpoints/delta.safetensors")  # doctest: +SKIP
    """
    if not hasattr(module, "hparams"):
        raise DeltaError(f"apply_delta_to_module needs a TransferClassifier, got {type(module).__name__}")
    if getattr(module, "net", None) is None:
        _, meta = delta_from_file(path)
        module.class_names = list(meta["class_names"])
        module._build(len(meta["class_names"]), module.hparams.get("weights"))
    return load_delta(module, path, check_base=check_base)


def module_arguments_from_delta(path: str | os.PathLike) -> dict[str, Any]:
    """The TransferClassifier arguments that must match a delta (for CLIs and configs).

    Returns:
        ``backbone``, ``weights``, ``class_names``, ``num_classes``, ``strategy``, ``strategy_args``,
        ``bn`` and ``backbone_args`` as recorded in the delta.

    Example:
        >>> module_arguments_from_delta("task.safetensors")["strategy"]  # doctest: +SKIP
        'lora'
    """
    _, meta = delta_from_file(path)
    return {
        "backbone": meta["backbone"], "weights": meta.get("weights"),
        "class_names": list(meta["class_names"]), "num_classes": len(meta["class_names"]),
        "strategy": meta["strategy"], "strategy_args": dict(meta.get("strategy_config") or {}),
        "bn": meta.get("bn") or "frozen", "backbone_args": dict(meta.get("backbone_args") or {}),
    }
