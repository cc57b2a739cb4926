"""``DeltaWriter``: after ``fit``, write the task delta next to the checkpoints (rank 0, atomically)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from .format import delta_info, write_delta
from ..io import safe_torch_load

__all__ = ["DeltaWriter"]


class DeltaWriter(Callback):
    """Write ``delta.safetensors`` (see :func:`visiontune.delta.save_delta`) when ``fit`` ends.

    The file goes into the checkpoint folder (``ModelCheckpoint.dirpath``), else the run directory.

    Args:
        filename: file name of the delta.
        dirpath: folder to write into instead of the checkpoint folder.
        source: ``"best"``: the weights of the best checkpoint (the ``ModelCheckpoint`` monitor), falling
            back to the final weights when there is none; ``"last"``: the final weights.
        weights_of: ``"evaluated"``: the network that evaluated the model, the one validation ranked (its EMA
            when training keeps one, e.g. FixMatch's EMA teacher); ``"model"``: the trained network itself.
            See :func:`visiontune.delta.save_delta`.
        enabled: ``False`` writes nothing.

    Example:
        >>> trainer = L.Trainer(callbacks=[ModelCheckpoint(monitor="val_acc", mode="max"),
        ...                                DeltaWriter(source="best")])  # doctest: +SKIP
        >>> trainer.fit(model, data)  # doctest: +SKIP
        visiontune delta: runs/visiontune/version_0/checkpoints/delta.safetensors (412.3 KB, lora)
    """

    def __init__(
        self,
        filename: str = "delta.safetensors",
        dirpath: Optional[str] = None,
        source: Literal["best", "last"] = "best",
        weights_of: Literal["evaluated", "model"] = "evaluated",
        enabled: bool = True,
    ) -> None:
        if source not in ("best", "last"):
            raise ValueError(f"delta writer: source must be 'best' or 'last', got {source!r}")
        if weights_of not in ("evaluated", "model"):
            raise ValueError(f"delta writer: weights_of must be 'evaluated' or 'model', got {weights_of!r}")
        self.filename = filename
        self.dirpath = dirpath
        self.source = source
        self.weights_of = weights_of
        self.enabled = enabled
        self.written: Path | None = None

    def _folder(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _best_checkpoint(self, trainer: L.Trainer) -> dict | None:
        """The best checkpoint (a dict), or None (then: the final weights)."""
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        if not best or not Path(best).is_file():
            return None
        try:
            checkpoint = safe_torch_load(best)
            if "state_dict" not in checkpoint:
                raise KeyError("no 'state_dict'")
        except (ValueError, KeyError) as exc:
            warnings.warn(f"delta writer: cannot read {best} ({exc}); writing the final weights", stacklevel=2)
            return None
        return checkpoint

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero or getattr(pl_module, "net", None) is None:
            return
        checkpoint = self._best_checkpoint(trainer) if self.source == "best" else None
        # the network that evaluated (its EMA, if any), as the best checkpoint holds it: what validation ranked
        info = delta_info(pl_module, weights_of=self.weights_of, checkpoint=checkpoint)
        path = write_delta(info, self._folder(trainer) / self.filename)
        self.written = path
        print(f"visiontune delta: {path} ({path.stat().st_size / 1024:.1f} KB, "
              f"{info.net.visiontune_strategy.strategy_name})")
