"""What report.html costs: the time to build it (from the run directory's files) relative to one validation epoch.

One short fit of ``tf_efficientnet_lite0`` (offline weights) on scikit-learn's digits at 64 px (360 validation
images), then: the median of three validation epochs (``trainer.validate``), and the median of three builds of
``report.html`` (:func:`visiontune.build_report`: reading the files, the learning-curve plot, the gallery's
thumbnails). The per-image predictions the page needs are recorded by the validation steps themselves (no second
pass over the data), so they are inside the validation epoch's time.

    python benchmarks/report.py            # all 1,797 digits (360 validation images)
    python benchmarks/report.py --quick    # 900 digits (180 validation images)

Prints ``RESULT report_build_vs_val_epoch <build / validation epoch time> <=0.5`` and the page size
(``RESULT report_html_kb <KB> report``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="half the digits")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 resists noisy shared CPUs)")
    args = parser.parse_args(argv)

    import lightning as L
    import numpy as np
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from visiontune import ImageDataModule, RunReport, TransferClassifier, build_report
    from visiontune.data import read_source

    torch.set_num_threads(args.threads)
    digits = read_source("digits")
    n = len(digits) // 2 if args.quick else len(digits)
    data = (np.stack(digits.items[:n]), digits.labels[:n])

    class ValTimer(L.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._start = 0.0

        def on_validation_epoch_start(self, trainer, pl_module):  # noqa: ANN001
            self._start = time.perf_counter()

        def on_validation_epoch_end(self, trainer, pl_module):  # noqa: ANN001
            if not trainer.sanity_checking:
                self.seconds.append(time.perf_counter() - self._start)

    with tempfile.TemporaryDirectory() as tmp:
        L.seed_everything(0, verbose=False)
        dm = ImageDataModule(train=data, image_size=args.image_size, batch_size=64, num_workers=0, hflip=False,
                             val_split=0.2)
        model = TransferClassifier("tf_efficientnet_lite0", weights="package", class_names=dm.class_names,
                                   strategy="linear")
        timer = ValTimer()
        trainer = L.Trainer(max_epochs=1, limit_train_batches=5, log_every_n_steps=1, accelerator="cpu",
                            logger=CSVLogger(tmp, name="bench", version=0), callbacks=[RunReport(verbose=False), timer],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0)
        trainer.fit(model, dm)
        for _ in range(args.repeats - 1):
            trainer.validate(model, dm, verbose=False)
        run = Path(tmp) / "bench" / "version_0"
        builds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            page = build_report(run)
            builds.append(time.perf_counter() - start)
        val, build = statistics.median(timer.seconds), statistics.median(builds)
        n_val = len(dm.val_set)
        print(f"validation epoch ({n_val} images, {args.image_size} px): {val:.3f} s (median of "
              f"{len(timer.seconds)}); report build: {build:.3f} s (median of {len(builds)})")
        print(f"RESULT report_build_vs_val_epoch {build / val:.3f} <=0.5 {n_val} val images, one run")
        print(f"RESULT report_html_kb {page.stat().st_size / 1024:.0f} report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
