"""The data path: what a training epoch spends waiting on image decoding, before and after the decode cache.

    python benchmarks/data_path.py            # timing (3 interleaved repeats) + accuracy check (seed 0)
    python benchmarks/data_path.py --quick    # timing only, 1 repeat

Images: the held-in ``photos`` set of ``benchmarks/photosets.py`` (train + test, 482 real photos), also saved
as camera-size JPEGs (long side 2048 px, quality 90: what a phone folder holds; the content is the same
photo enlarged, the decoding cost is that of a 2048 px JPEG) under ``<cache>/photos_camera``.

Timing: one LoRA training epoch (tf_efficientnet_lite0, offline weights, 96 px, batch 32, plain loop, 1 thread,
``num_workers`` 0 as the default on 2 cores) over the camera-size set, with

* ``before``: every image decoded at full size in every epoch (``decode_side=0, cache_images=False``),
* ``reduced``: decoded reduced to 192 px (JPEG DCT scaling + area resize) in every epoch, no cache,
* ``cached`` (the default): decoded reduced once at setup into memory; an epoch only augments.

``RESULT data_path_epoch_speedup`` = before / cached epoch (target >= 1.5), with the fill time reported apart;
``RESULT data_path_loader_share_before`` = the share of the ``before`` epoch spent waiting for batches;
``RESULT data_path_second_setup_vs_first`` = a second datamodule's setup over the same files (shared decode
cache: ``trainer.test`` after ``fit``, the next ``compare`` run) / the first, cold one.
Accuracy: LoRA, 10 epochs, seed 0, on the camera-size set, test split, ``before`` vs ``cached``: the
difference must be within noise (``RESULT data_path_accuracy_delta``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import photosets  # noqa: E402

SIZE, BATCH, LONG_SIDE = 96, 32, 2048
MODES = {"before": dict(decode_side=0, cache_images=False), "reduced": dict(cache_images=False),
         "cached": dict(cache_images=True)}


def camera_set(cache: str) -> Path:
    """The photos set saved at camera size (long side 2048 px, JPEG quality 90), built once and cached."""
    import cv2

    src = Path(photosets.build("photos", cache))
    dst = Path(cache).expanduser() / "photos_camera"
    if (dst / "done").exists():
        return dst
    for f in sorted(src.glob("*/*/*.jpg")):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        img = cv2.imread(str(f))
        scale = LONG_SIDE / max(img.shape[:2])
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                         interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(out), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    (dst / "done").write_text("ok\n")
    return dst


def data(train: Path, test: Path | None, mode: str, seed: int = 0):
    from visiontune import ImageDataModule

    return ImageDataModule(train=str(train), test=str(test) if test else None, val_split=0.0, image_size=SIZE,
                           batch_size=BATCH, num_workers=0, seed=seed, **MODES[mode])


def all_folder(root: Path) -> Path:
    """``root/all/<class>/``: links to every image of train and test (482 files), for the timing epoch."""
    out = root / "all"
    if not out.exists():
        for f in sorted(root.glob("t*/*/*.jpg")):
            link = out / f.parent.name / f"{f.parent.parent.name}_{f.name}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f)
    return out


def lora_model(num_classes: int):
    import torch

    from visiontune import TransferClassifier

    model = TransferClassifier("tf_efficientnet_lite0", weights="package", num_classes=num_classes, strategy="lora")
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=3e-3)


def epoch(root: Path, mode: str) -> dict[str, float]:
    """Setup (incl. cache fill, cold), a second datamodule's setup over the same files (what ``trainer.test``
    after ``fit`` or the next ``compare`` run pays), then one training epoch: total, time waiting for batches."""
    import torch.nn.functional as F

    from visiontune.data.decoded import clear_shared

    clear_shared()
    t0 = time.perf_counter()
    dm = data(root / "all", None, mode)  # the timing epoch runs over every image (train + test folders)
    dm.setup("fit")
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    data(root / "all", None, mode).setup("fit")
    again = time.perf_counter() - t0
    model, opt = lora_model(len(dm.class_names))
    model.train()
    wait = 0.0
    start = time.perf_counter()
    it = iter(dm.train_dataloader())
    while True:
        t = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            break
        wait += time.perf_counter() - t
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    total = time.perf_counter() - start
    return {"setup": setup, "again": again, "epoch": total, "wait": wait, "images": len(dm.train_set)}


def accuracy(root: Path, mode: str, epochs: int) -> float:
    import lightning as L

    from visiontune import TransferClassifier

    L.seed_everything(0)
    dm = data(root / "train", root / "test", mode)
    model = TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="lora")
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, dm)
    trainer.test(model, dm, verbose=False)
    return float(trainer.callback_metrics["test_acc"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one timing repeat, no accuracy runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10, help="epochs of each accuracy run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=photosets.CACHE)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    root = camera_set(a.cache)
    all_folder(root)
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for _ in range(1 if a.quick else a.repeats):
        for mode in MODES:  # interleaved: the machine's load hits every mode alike
            runs[mode].append(epoch(root, mode))
            r = runs[mode][-1]
            print(f"{mode:8s} setup {r['setup']:6.1f} s  second setup {r['again']:6.2f} s  epoch {r['epoch']:6.1f} s  waiting for batches "
                  f"{r['wait']:6.1f} s  ({r['images']} images)", flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("setup", "again", "epoch", "wait")}
           for m, rs in runs.items()}
    print(f"RESULT data_path_epoch_speedup {med['before']['epoch'] / med['cached']['epoch']:.2f} >=1.5")
    print(f"RESULT data_path_reduced_epoch_speedup {med['before']['epoch'] / med['reduced']['epoch']:.2f} -")
    print(f"RESULT data_path_loader_share_before {med['before']['wait'] / med['before']['epoch']:.2f} -")
    print(f"RESULT data_path_loader_share_cached {med['cached']['wait'] / med['cached']['epoch']:.2f} -")
    print(f"RESULT data_path_cache_fill_vs_before_epoch {med['cached']['setup'] / med['before']['epoch']:.2f} -")
    print(f"RESULT data_path_second_setup_vs_first {med['cached']['again'] / med['cached']['setup']:.3f} -")
    if not a.quick:
        accs = {m: accuracy(root, m, a.epochs) for m in ("before", "cached")}
        print(f"accuracy (LoRA, {a.epochs} epochs, seed 0, camera-size photos, test): "
              + ", ".join(f"{m} {v:.3f}" for m, v in accs.items()))
        print(f"RESULT data_path_accuracy_delta {accs['cached'] - accs['before']:+.3f} -")


if __name__ == "__main__":
    main()
