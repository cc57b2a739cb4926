"""DDP on CPU: ``visiontune fit --trainer.strategy ddp --trainer.devices 2`` (gloo), metrics synced across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_folder
from visiontune import ImageDataModule, TransferClassifier


@pytest.mark.slow
def test_ddp_two_cpu_processes_lora_metrics_synced(tmp_path):
    data = make_folder(tmp_path / "data", per_class=8)  # 18 train (9 per rank), 6 val (3 per rank)
    cmd = [str(Path(sys.executable).parent / "visiontune"), "fit",
           "--model.backbone", "resnet18", "--model.weights", "null", "--model.strategy", "lora",
           "--model.strategy_args", "{rank: 2}", "--model.lr", "0.003",
           "--data.train", str(data), "--data.image_size", "32", "--data.batch_size", "3", "--data.val_split", "0.25",
           "--data.num_workers", "0",
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Starting with 2 processes" in out and "distributed_backend=gloo" in out

    run = tmp_path / "runs" / "visiontune" / "version_0"
    assert not (tmp_path / "runs" / "visiontune" / "version_1").exists()  # one run directory, not one per rank
    metrics = json.loads((run / "metrics.json").read_text())
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    state = torch.load(last, weights_only=True, map_location="cpu")
    assert state["global_step"] == 2 * 3  # 9 images per rank, batch 3: 3 steps per epoch, not 6

    # the logged val metrics are over all 6 val images (both ranks), not over rank 0's 3:
    # recompute them in one process from the final weights
    import lightning as L

    model = TransferClassifier.load(str(last))
    dm = ImageDataModule(train=str(data), image_size=32, batch_size=6, val_split=0.25, num_workers=0)
    single = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False).validate(model, datamodule=dm, verbose=False)[0]
    assert len(dm.val_set) == 6
    assert metrics["val_acc"] == pytest.approx(single["val_acc"], abs=1e-6)
    assert metrics["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4, abs=1e-5)
