"""Checkpoint safety: atomic writes, ``weights_only`` loading, clear mismatch errors, RNG state for exact resume,
and :func:`weights_from_checkpoint` (models built inside read no pretrained weights: a checkpoint follows).

Lightning's own ``TorchCheckpointIO`` serialises to memory and then writes through fsspec, which stages the
bytes in a temp file under ``/tmp`` and ``shutil.move``-s it into place: where ``/tmp`` is another
filesystem (a tmpfs, a container volume) that is a copy, so a kill mid-copy leaves a truncated ``last.ckpt``
next to the good ``best.ckpt``; nothing is fsynced either. :class:`AtomicCheckpointIO` writes through
:func:`visiontune.io.atomic_open` instead (temp file in the destination folder, fsync, ``os.replace``), and
loads with ``weights_only=True`` unless told otherwise. The ``visiontune`` command uses it by default; from
Python pass it to the trainer::

    trainer = L.Trainer(plugins=[AtomicCheckpointIO()], ...)
"""

from __future__ import annotations

import contextlib
import contextvars
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..errors import CheckpointNotFoundError, UserError
from ..io import atomic_open, checkpoint_load_error, safe_torch_load

__all__ = ["AtomicCheckpointIO", "CheckpointMismatchError", "LatestCheckpoint", "collect_rng_state",
           "check_checkpoint_fits", "evaluated_state", "load_module_checkpoint", "restore_rng_state", "saved_value",
           "state_dict_mismatch", "weights_come_from_checkpoint", "weights_from_checkpoint"]


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's tensors do not fit the model it is loaded into (names the keys and shapes)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes atomically and loads with ``weights_only=True``.

    A checkpoint is either the complete new file or the previous one, never half of one, even when the
    process is killed (SIGKILL, out of memory, pre-emption) in the middle of ``torch.save``.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(plugins=[AtomicCheckpointIO()], logger=False)  # doctest: +SKIP
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        with atomic_open(path, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Optional[Callable] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        if weights_only is False:  # an explicit opt-out for a trusted file
            try:
                return super().load_checkpoint(path, map_location=map_location, weights_only=False)
            except Exception as exc:  # a truncated / corrupt file: say which one
                err = checkpoint_load_error(path, exc, from_torch_load=False)
                if err is None:
                    raise
                raise err from None
        if not Path(path).is_file():
            raise CheckpointNotFoundError(f"Checkpoint file not found: {path}")
        return safe_torch_load(path, map_location=map_location)  # errors name the file


def state_dict_mismatch(model_state: Mapping[str, torch.Tensor], loaded: Mapping[str, Any]) -> list[str]:
    """Differences between a model's state dict and a loaded one: missing, unexpected and mis-shaped keys.

    Example:
        >>> state_dict_mismatch({"w": torch.zeros(3, 2)}, {"w": torch.zeros(5, 2), "b": torch.zeros(5)})
        ['unexpected in the checkpoint: b', 'shape mismatch: w: checkpoint (5, 2) vs model (3, 2)']
    """
    missing = [k for k in model_state if k not in loaded]
    unexpected = [k for k in loaded if k not in model_state]
    shapes = [
        f"{k}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(v.shape)}"
        for k, v in model_state.items()
        if k in loaded and hasattr(loaded[k], "shape") and tuple(loaded[k].shape) != tuple(v.shape)
    ]
    out = []
    for label, keys in (("missing from the checkpoint", missing), ("unexpected in the checkpoint", unexpected),
                        ("shape mismatch", shapes)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            out.append(f"{label}: {shown}")
    return out


def saved_value(checkpoint: Mapping[str, Any], key: str) -> Any:
    """``key`` (``"backbone"``, ``"class_names"``, ...) as a TransferClassifier checkpoint records it: in its
    ``visiontune`` block, else in its hyper-parameters; ``None`` when neither has it.

    Example:
        >>> saved_value({"visiontune": {"backbone": "resnet18"}, "hyper_parameters": {}}, "backbone")
        'resnet18'
    """
    return (checkpoint.get("visiontune") or {}).get(key) or checkpoint.get("hyper_parameters", {}).get(key)


def check_checkpoint_fits(model_state: Mapping[str, torch.Tensor], checkpoint: Mapping[str, Any], *,
                          backbone: str, num_classes: int) -> None:
    """Raise :class:`CheckpointMismatchError` when ``checkpoint["state_dict"]`` does not fit ``model_state``
    (:func:`state_dict_mismatch`), naming both backbones and class counts (the model's: ``backbone``,
    ``num_classes``)."""
    problems = state_dict_mismatch(model_state, checkpoint["state_dict"])
    if problems:
        theirs, names = saved_value(checkpoint, "backbone"), saved_value(checkpoint, "class_names")
        raise CheckpointMismatchError(
            f"checkpoint (backbone {theirs}, {len(names or [])} classes) does not fit this model "
            f"(backbone {backbone}, {num_classes} classes): " + "; ".join(problems))


def collect_rng_state() -> dict[str, Any]:
    """torch / numpy / python global RNG states, as plain tensors and tuples (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def restore_rng_state(state: Mapping[str, Any] | None) -> None:
    """Inverse of :func:`collect_rng_state` (a missing or empty state is ignored)."""
    if not state:
        return
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


_WEIGHTS_FROM_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "visiontune_weights_from_checkpoint", default=False)


@contextlib.contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Context: TransferClassifiers created inside get all their weights from a checkpoint loaded next.

    They build their network without reading the pretrained ``weights`` (no download, no file read), yet keep
    ``hparams.weights`` as it is: the base the model was trained on, which checkpoints, configs and task deltas
    record. :meth:`TransferClassifier.load` and ``visiontune ... --ckpt_path`` use it.

    Example:
        >>> from visiontune import TransferClassifier
        >>> with weights_from_checkpoint():
        ...     m = TransferClassifier("resnet18", weights="hub", num_classes=2)  # random init, no download
        >>> m.hparams.weights, m.weights_from_checkpoint
        ('hub', True)
    """
    token = _WEIGHTS_FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FROM_CHECKPOINT.reset(token)


def weights_come_from_checkpoint() -> bool:
    """Whether this runs inside :func:`weights_from_checkpoint` (a TransferClassifier asks when it is built)."""
    return _WEIGHTS_FROM_CHECKPOINT.get()


def evaluated_state(checkpoint: Mapping[str, Any], *, ema: bool) -> dict[str, torch.Tensor]:
    """The weights of the network that evaluated when a TransferClassifier checkpoint was saved: the EMA's
    (``ema``: the model keeps an EMA of its weights) when the checkpoint holds one, else its ``net``'s (a teacher
    not built yet at the checkpoint would have been the student)."""
    state = None
    if ema:
        saved = checkpoint.get("visiontune_ema") or checkpoint.get("visiontune_fixmatch") or {}
        state = (saved.get("teacher") or {}).get("module")
    if state is None:
        state = {k[len("net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    return state


def load_module_checkpoint(cls: Any, path: str, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(path, weights_only=True, **kwargs)`` inside :func:`weights_from_checkpoint`
    (:meth:`visiontune.TransferClassifier.load`); a truncated, corrupt or unsafe file raises an error naming it."""
    try:
        # weights_only: a checkpoint is data, never code (a planted pickle is refused before it runs)
        with weights_from_checkpoint():
            return cls.load_from_checkpoint(path, weights_only=True, **kwargs)
    except Exception as exc:  # a truncated / corrupt / unsafe file: an error naming it
        err = checkpoint_load_error(path, exc, from_torch_load=False)
        if err is None:
            raise
        raise err from None


class LatestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the latest epoch.

    Lightning 2.6 refreshes ``last.ckpt`` at validation end only when a top-k checkpoint was saved in the
    same step: with ``monitor="val_acc"``, an epoch that does not improve leaves ``last.ckpt`` at an older
    epoch, and a resume after a crash redoes the epochs since (or a user takes old weights for the final
    ones). This subclass saves it anyway. The ``visiontune`` command uses it for ``--checkpoint.*``.

    Example:
        >>> cb = LatestCheckpoint(monitor="val_acc", mode="max", save_last=True)  # doctest: +SKIP
    """

    def _refresh_last(self, trainer: Any, due: bool) -> None:
        if (due and self.save_last and self._last_global_step_saved != trainer.global_step
                and self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        due = not self._should_skip_saving_checkpoint(trainer) and self._should_save_on_train_epoch_end(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer, due)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        due = not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer)
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer, due)
