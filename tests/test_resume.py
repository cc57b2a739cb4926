"""Resume and determinism: a SIGKILLed run resumed from its last checkpoint ends bit-identical to an
uninterrupted one; same seed → same run (workers included); different seeds → different augmentations."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import reliability_helpers as h
from conftest import make_folder
from visiontune import ImageDataModule, TransferClassifier

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("resume") / "data", per_class=8)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def _start_killed_run(root: Path, out: Path, strategy: str, num_workers: int, model_kw: dict,
                      dm_kw: dict) -> tuple[subprocess.Popen, Path]:
    out.mkdir(parents=True)
    marker = out / "at_epoch1_batch1"
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import reliability_helpers as h; "
            f"h.killed_run({str(root)!r}, {str(out)!r}, {strategy!r}, {num_workers}, {str(marker)!r}, "
            f"{model_kw!r}, {dm_kw!r})")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    return proc, marker


def _kill_when_ready(proc: subprocess.Popen, marker: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training subprocess ended early: {proc.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("training subprocess never reached epoch 1")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: loader workers too
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def _kill_resume_compare(data: Path, tmp_path: Path, cases: dict[str, tuple], expect: str = "val_acc") -> None:
    """Per case (strategy, num_workers, model_kw, dm_kw): a subprocess trains 3 epochs and is SIGKILLed one
    batch into epoch 1 (after epoch 0's checkpoint); resuming from last.ckpt must end bit-identical to an
    uninterrupted run (weights and metrics)."""
    procs = {name: _start_killed_run(data, tmp_path / f"killed_{name}", *case) for name, case in cases.items()}
    # meanwhile, in this process: the uninterrupted reference runs
    reference = {name: h.fit(data, tmp_path / f"straight_{name}", s, num_workers=nw, model_kw=mkw, dm_kw=dkw)
                 for name, (s, nw, mkw, dkw) in cases.items()}
    for name, (strategy, num_workers, model_kw, dm_kw) in cases.items():
        proc, marker = procs[name]
        _kill_when_ready(proc, marker)
        ckpt_dir = tmp_path / f"killed_{name}" / "ckpt"
        last = ckpt_dir / "last.ckpt"
        assert last.is_file(), "no checkpoint before the kill"
        assert not [p.name for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]  # no half-written leftovers
        state = torch.load(last, weights_only=True, map_location="cpu")
        assert state["epoch"] == 0  # the kill came one batch into epoch 1
        resumed, trainer = h.fit(data, tmp_path / f"killed_{name}", strategy, num_workers=num_workers,
                                 model_kw=model_kw, dm_kw=dm_kw, ckpt_path=str(last))
        ref_model, ref_trainer = reference[name]
        assert trainer.global_step == ref_trainer.global_step > state["global_step"] > 0
        assert _same_weights(resumed, ref_model) == [], name
        assert expect in trainer.callback_metrics
        for k, v in ref_trainer.callback_metrics.items():
            assert float(trainer.callback_metrics[k]) == float(v), (name, k)


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_equals_uninterrupted(data, tmp_path):
    """full (no workers) and lora (dropout: RNG state; 2 persistent loader workers)."""
    _kill_resume_compare(data, tmp_path, {"full": ("full", 0, {}, {}), "lora": ("lora", 2, {}, {})})


@pytest.mark.slow
def test_fixmatch_sigkill_resume(data, tmp_path):
    # 4 labels per class (2 labeled batches per epoch), the rest of train as the unlabeled pool
    fixmatch = {"semi_supervised": {"threshold": 0.5, "mu": 1}}
    _kill_resume_compare(data, tmp_path, {"fixmatch": ("full", 0, fixmatch,
                                                       {"labels_per_class": 4, "unlabeled": "rest"})},
                         expect="train_unsup_loss")


def test_same_seed_same_run_with_worker_processes(data, tmp_path):
    """Two runs, same seed, albumentations in 2 worker processes: identical metrics and weights."""
    a, ta = h.fit(data, tmp_path / "a", "full", epochs=2, num_workers=2)
    b, tb = h.fit(data, tmp_path / "b", "full", epochs=2, num_workers=2)
    metrics_a = {k: float(v) for k, v in ta.callback_metrics.items()}
    assert metrics_a == {k: float(v) for k, v in tb.callback_metrics.items()} and "val_loss" in metrics_a
    assert _same_weights(a, b) == []


def _augmented(root: Path, seed: int, num_workers: int, epochs: int = 2) -> list[torch.Tensor]:
    """Every augmented training image of ``epochs`` epochs, keyed by (epoch, index)."""
    dm = ImageDataModule(train=str(root), image_size=16, batch_size=3, val_split=0, seed=seed,
                         num_workers=num_workers, crop_scale=(0.2, 1.0))
    dm.setup("fit")
    dm.train_set.return_index = True  # batches carry the item index: compare per item
    loader = dm.train_dataloader()
    out = {}
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)  # what Lightning does before every epoch
        for x, idx in loader:
            for img, i in zip(x, idx.tolist()):
                out[(epoch, i)] = img
    return out


def _identical_images(root: Path, per_class: int = 4) -> Path:
    """Two classes of ``per_class`` byte-identical 96 px noise images: any two equal outputs = equal draws."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_augmentations_seeded_per_item_epoch_not_per_worker(tmp_path):
    root = _identical_images(tmp_path / "d")
    with_workers = _augmented(root, seed=1, num_workers=2)
    again = _augmented(root, seed=1, num_workers=2)
    no_workers = _augmented(root, seed=1, num_workers=0)
    other_seed = _augmented(root, seed=2, num_workers=2)
    assert len(with_workers) == 16
    # same seed: same augmentations, whatever the number of worker processes
    assert all(torch.equal(with_workers[k], again[k]) for k in with_workers)
    assert all(torch.equal(with_workers[k], no_workers[k]) for k in with_workers)
    # different seed: different augmentations
    assert sum(not torch.equal(with_workers[k], other_seed[k]) for k in with_workers) >= 14
    # across epochs: each item is augmented anew
    n = len(with_workers) // 2
    assert sum(not torch.equal(with_workers[(0, i)], with_workers[(1, i)]) for i in range(n)) >= n - 1
    # all 16 inputs are the same image: items loaded by the 2 workers (batches alternate between them) in
    # 2 epochs all get different augmentations (forked workers sharing one RNG stream would repeat crops)
    outputs = {v.numpy().tobytes() for v in with_workers.values()}
    assert len(outputs) == len(with_workers)


def test_shuffle_order_is_a_function_of_seed_and_epoch(tmp_path):
    root = make_folder(tmp_path / "d", per_class=5)
    orders = {}
    for seed in (0, 0, 1):
        dm = ImageDataModule(train=str(root), image_size=16, batch_size=15, val_split=0, seed=seed, num_workers=0)
        dm.setup("fit")
        dm.train_set.return_index = True
        loader = dm.train_dataloader()
        seq = []
        for epoch in (0, 1, 5):
            loader.sampler.set_epoch(epoch)
            seq.append(next(iter(loader))[1].tolist())
        orders.setdefault(seed, []).append(seq)
    assert orders[0][0] == orders[0][1]  # same seed, fresh loader (as after a resume): same orders
    assert orders[0][0][0] != orders[0][0][1] != orders[0][0][2]  # a new order every epoch
    assert orders[0][0] != orders[1][0]
    assert all(sorted(o) == list(range(15)) for o in orders[0][0])
