"""Cached vs. uncached linear probe: epoch time of ``tf_efficientnet_lite0`` (offline weights) at 64 px.

Both runs train the same head on the same images with the eval transform (the uncached run uses
``crop_scale=(1, 1)`` and ``hflip=False``, which is what the cache serves). The cached run computes the
backbone's features once (at fit setup, timed separately) and then trains only ``forward_head``.

    python benchmarks/cache.py            # all 1,797 digits, 4 epochs
    python benchmarks/cache.py --quick    # 600 digits, 3 epochs

Prints ``RESULT cache_epoch_speedup <uncached / cached epoch time, epochs after the first> >=10``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and epochs")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--images", type=int, default=None, help="digits used (default: all, 600 with --quick)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 resists noisy shared CPUs)")
    args = parser.parse_args(argv)

    import lightning as L
    import numpy as np
    import torch

    from visiontune import ImageDataModule, TransferClassifier
    from visiontune.training.cache import clear_memory_cache
    from visiontune.data import read_source

    torch.set_num_threads(args.threads)
    epochs = args.epochs or (3 if args.quick else 4)
    digits = read_source("digits")
    n = args.images or (600 if args.quick else len(digits))
    images = np.stack(digits.items[:n])
    labels = digits.labels[:n]

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.end = 0.0
            self.setup_start = 0.0

        def setup(self, trainer, pl_module, stage):  # noqa: ANN001
            self.setup_start = time.perf_counter()

        def on_train_epoch_start(self, trainer, pl_module):  # noqa: ANN001
            self.starts.append(time.perf_counter())

        def on_fit_end(self, trainer, pl_module):  # noqa: ANN001
            self.end = time.perf_counter()

        def epochs(self) -> list[float]:
            marks = [*self.starts, self.end]
            return [b - a for a, b in zip(marks, marks[1:])]

    def run(cache: bool) -> tuple[list[float], float, float]:
        clear_memory_cache()
        L.seed_everything(0, verbose=False)
        dm = ImageDataModule(train=(images, labels), image_size=args.image_size, batch_size=32, val_split=0.2,
                             crop_scale=(1.0, 1.0), hflip=False, num_workers=0)
        model = TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="linear", lr=0.01,
                                   cache_features=cache)
        timer = EpochTimer()
        trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer])
        trainer.fit(model, dm)
        first_epoch_start = timer.starts[0]
        return timer.epochs(), first_epoch_start - timer.setup_start, float(trainer.callback_metrics["val_acc"])

    # setup (extraction) runs before the first epoch (the first epoch is then as fast as the others);
    # the uncached run is measured first and last to bracket drift on a shared machine
    uncached1, _, acc_u = run(False)
    cached, setup_c, acc_c = run(True)
    uncached2, _, _ = run(False)
    unc = statistics.median(uncached1[1:] + uncached2[1:])
    cac = statistics.median(cached[1:])
    print(f"images {n} (train {int(n * 0.8)}), {args.image_size} px, {epochs} epochs, threads {args.threads}")
    print(f"uncached epoch seconds: {[round(t, 3) for t in uncached1]} {[round(t, 3) for t in uncached2]}")
    print(f"cached   epoch seconds: {[round(t, 3) for t in cached]} (+ {setup_c:.2f} s feature extraction at setup)")
    print(f"val_acc uncached {acc_u:.4f} cached {acc_c:.4f}")
    print(f"RESULT cache_epoch_speedup {unc / cac:.1f} >=10")
    print(f"RESULT cache_first_epoch_incl_extraction_ratio {(cached[0] + setup_c) / unc:.2f} -")
    return 0


if __name__ == "__main__":
    sys.exit(main())
