"""``DeltaWriter``: after ``fit``, write the task delta next to the checkpoints (rank 0, atomically)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Literal, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from .delta import _describe, _write
from .io import safe_torch_load

__all__ = ["DeltaWriter"]


class DeltaWriter(Callback):
    """Write ``delta.safetensors`` (see :func:`visiontune.delta.save_delta`) when ``fit`` ends.

    The file goes into the checkpoint folder (``ModelCheckpoint.dirpath``), else the run directory.

    Args:
        filename: file name of the delta.
        dirpath: folder to write into instead of the checkpoint folder.
        source: ``"best"``: the weights of the best checkpoint (the ``ModelCheckpoint`` monitor), falling
            back to the final weights when there is none; ``"last"``: the final weights.
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
        enabled: bool = True,
    ) -> None:
        if source not in ("best", "last"):
            raise ValueError(f"delta writer: source must be 'best' or 'last', got {source!r}")
        self.filename = filename
        self.dirpath = dirpath
        self.source = source
        self.enabled = enabled
        self.written: Path | None = None

    def _folder(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _best_net(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """A copy of the net with the best checkpoint's weights, or None (then: the final weights)."""
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
        if not best or not Path(best).is_file():
            return None
        try:
            state = safe_torch_load(best)["state_dict"]
        except (ValueError, KeyError) as exc:
            warnings.warn(f"delta writer: cannot read {best} ({exc}); writing the final weights", stacklevel=2)
            return None
        net = copy.deepcopy(pl_module.net)
        prefix = "net."
        net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        return net

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero or getattr(pl_module, "net", None) is None:
            return
        info = _describe(pl_module)
        if self.source == "best":
            best = self._best_net(trainer, pl_module)
            if best is not None:
                info.net = best
        path = _write(info, self._folder(trainer) / self.filename)
        self.written = path
        print(f"visiontune delta: {path} ({path.stat().st_size / 1024:.1f} KB, "
              f"{info.net.visiontune_strategy.strategy_name})")
