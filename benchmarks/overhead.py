"""Lightning overhead: a TransferClassifier training step under ``L.Trainer`` vs. a plain PyTorch loop.

Both do the same work on the same model (``tf_efficientnet_lite0`` with offline weights), the same
batch (fixed, pre-made tensors: no decoding or augmentation), the same strategy, AdamW with the same
parameter groups and a per-step LR scheduler: forward, cross-entropy, accuracy, backward, step,
zero_grad. The Lightning side adds what Lightning adds (loop, hooks, ``self.log``, closure).

Step time = time between consecutive batch starts (everything a step costs), first steps dropped as
warm-up; the two sides run interleaved, several times, and the medians are compared.

    python benchmarks/overhead.py             # strategies full and linear, 6 × 15 steps per side
    python benchmarks/overhead.py --quick     # 4 × 8 steps
    python benchmarks/overhead.py --strategy lora

Prints ``RESULT lightning_overhead_<strategy> <lightning / plain median step time> <=1.10`` per strategy.
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
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--strategy", default="full,linear", help="comma-separated strategies, one RESULT each")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each run")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 resists noisy shared CPUs)")
    args = parser.parse_args(argv)

    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset

    from visiontune import TransferClassifier
    from visiontune.training.optim import param_groups

    torch.set_num_threads(args.threads)
    repeats = args.repeats or (4 if args.quick else 6)
    steps = (args.steps or (8 if args.quick else 15)) + args.warmup

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)

    class SameBatch(Dataset):
        def __len__(self) -> int:
            return steps

        def __getitem__(self, i: int):
            return x, y

    def loader() -> DataLoader:
        return DataLoader(SameBatch(), batch_size=None, shuffle=False)

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            self.marks.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):  # noqa: ANN001
            self.marks.append(time.perf_counter())

    def lightning_run(model) -> list[float]:  # noqa: ANN001
        timer = StepTimer()
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            callbacks=[timer], accelerator="cpu", devices=1)
        trainer.fit(model, train_dataloaders=loader())
        return [b - a for a, b in zip(timer.marks, timer.marks[1:])][args.warmup:]

    def plain_run(model) -> list[float]:  # noqa: ANN001
        net = model.net
        opt = torch.optim.AdamW(param_groups(net, 1e-3, model.hparams.weight_decay), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        model.train()  # applies the BatchNorm policy like Lightning's fit loop does
        marks = []
        for xb, yb in loader():
            marks.append(time.perf_counter())
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=model.hparams.label_smoothing)
            acc = (logits.argmax(1) == yb).float().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            loss.item(), acc.item()  # what a progress bar / logger reads each step
        marks.append(time.perf_counter())
        return [b - a for a, b in zip(marks, marks[1:])][args.warmup:]

    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    import contextlib
    import io

    for strategy in [s.strip() for s in args.strategy.split(",") if s.strip()]:
        model = TransferClassifier("tf_efficientnet_lite0", weights="package", num_classes=10, strategy=strategy,
                                   lr=1e-3, scheduler="constant")
        light, plain, ratios = [], [], []
        for r in range(repeats):
            # ABBA order: a drift in machine load hits both sides alike
            order = ("lightning", "plain") if r % 2 == 0 else ("plain", "lightning")
            times = {}
            for side in order:
                if side == "lightning":
                    with contextlib.redirect_stdout(io.StringIO()):  # the module's per-fit summary line
                        times[side] = statistics.median(lightning_run(model))
                else:
                    times[side] = statistics.median(plain_run(model))
            lm, pm = times["lightning"], times["plain"]
            light.append(lm)
            plain.append(pm)
            ratios.append(lm / pm)
            print(f"{strategy} repeat {r}: lightning {lm * 1e3:.1f} ms  plain {pm * 1e3:.1f} ms  ratio {lm / pm:.3f}")
        lmed, pmed = statistics.median(light), statistics.median(plain)
        print(f"strategy {strategy}, {args.image_size} px, batch {args.batch_size}, threads {args.threads}, "
              f"{repeats} x {steps - args.warmup} steps per side")
        print(f"median step: lightning {lmed * 1e3:.1f} ms, plain {pmed * 1e3:.1f} ms; "
              f"median of paired ratios {statistics.median(ratios):.3f}")
        print(f"RESULT lightning_overhead_{strategy} {lmed / pmed:.3f} <=1.10")
    return 0


if __name__ == "__main__":
    sys.exit(main())
