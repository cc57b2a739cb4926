"""Tiny training runs shared by test_resume.py / test_reliability.py, also run in killed subprocesses."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from visiontune import ImageDataModule, TransferClassifier  # noqa: E402
from visiontune.training.checkpoint import AtomicCheckpointIO  # noqa: E402

STRATEGY_ARGS: dict[str, dict[str, Any]] = {
    "full": {},
    "lora": {"rank": 2, "dropout": 0.2},  # dropout: resume must restore the global RNG too
}


def datamodule(root: Path | str, *, seed: int = 0, num_workers: int = 0, **kw: Any) -> ImageDataModule:
    # 3 classes x 8 images: 18 train (3 batches of 6), 6 val
    return ImageDataModule(train=str(root), image_size=32, batch_size=6, val_split=0.25, seed=seed,
                           num_workers=num_workers, **kw)


def model(strategy: str, **kw: Any) -> TransferClassifier:
    return TransferClassifier("resnet18", weights=None, strategy=strategy,
                              strategy_args=STRATEGY_ARGS.get(strategy, {}), lr=3e-3, warmup_steps=2, **kw)


class StopAt(Callback):
    """Writes ``marker`` at (epoch, batch) and then hangs, waiting to be killed."""

    def __init__(self, marker: str, epoch: int, batch: int) -> None:
        self.marker, self.epoch, self.batch = marker, epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            Path(self.marker).write_text("waiting to be killed")
            time.sleep(600)


def fit(root: Path | str, out: Path | str, strategy: str = "full", *, seed: int = 0, epochs: int = 3,
        num_workers: int = 0, ckpt_path: str | None = None, callbacks: list | None = None,
        model_kw: dict | None = None, dm_kw: dict | None = None,
        **trainer_kw: Any) -> tuple[TransferClassifier, L.Trainer]:
    """One tiny CPU run, single-threaded (bitwise comparable across processes), checkpoint every epoch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        L.seed_everything(seed, verbose=False)
        out = Path(out)
        trainer = L.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=str(out),
            logger=CSVLogger(str(out), name="logs", version=0),
            callbacks=[ModelCheckpoint(dirpath=str(out / "ckpt"), save_last=True, every_n_epochs=1),
                       *(callbacks or [])],
            plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, **trainer_kw,
        )
        m = model(strategy, **(model_kw or {}))
        dm = datamodule(root, seed=seed, num_workers=num_workers, **(dm_kw or {}))
        trainer.fit(m, datamodule=dm, ckpt_path=ckpt_path)
        return m, trainer
    finally:
        torch.set_num_threads(threads)


def killed_run(root: str, out: str, strategy: str, num_workers: int, marker: str, model_kw: dict,
               dm_kw: dict) -> None:
    """Entry point of the subprocess that is SIGKILLed mid-epoch 1 (after epoch 0's checkpoint)."""
    fit(root, out, strategy, num_workers=num_workers, model_kw=model_kw, dm_kw=dm_kw,
        callbacks=[StopAt(marker, epoch=1, batch=1)])
    sys.exit("StopAt did not trigger")
