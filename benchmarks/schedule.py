"""Training-step time in each phase of a gradual-unfreezing schedule, relative to full fine-tuning.

A frozen group needs no weight gradients, and nothing below the deepest thawed group needs any backward
pass at all, so phase 0 (head only) should cost about what ``linear`` costs, and each later phase a bit
more, up to ``full``. All configurations are measured in one run, interleaved (round-robin) and
summarised by their median, and printed as ratios: absolute seconds on a shared machine mean little.

    python benchmarks/schedule.py                                  # ~1 minute on 2 CPU cores
    python benchmarks/schedule.py --backbone resnet50 --image_size 160 --batch_size 32 --repeats 7
    python benchmarks/schedule.py --backbone vit_small_patch16_224 --image_size 224 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="tf_efficientnet_lite0", help="any timm model name")
    ap.add_argument("--image_size", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    ap.add_argument("--repeats", type=int, default=5, help="round-robin repeats (median is reported)")
    ap.add_argument("--groups_per_phase", type=int, default=2)
    ap.add_argument("--fine", action="store_true", help="block-level depth groups (default: coarse stages)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch
    import torch.nn.functional as F

    from visiontune import TransferClassifier
    from visiontune.schedule import GradualUnfreeze

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    kw = {"img_size": args.image_size} if "vit" in args.backbone or "deit" in args.backbone else {}
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    def make(strategy: str) -> TransferClassifier:
        m = TransferClassifier(args.backbone, weights=None, num_classes=10, strategy=strategy, backbone_args=kw)
        return m.to(device)

    full = make("full")
    linear = make("linear")
    cb = GradualUnfreeze(groups_per_phase=args.groups_per_phase, coarse=not args.fine, verbose=False)
    sched = make("full")
    schedule = cb.resolve(sched.net)
    optimizers = {id(m): m.configure_optimizers()["optimizer"] for m in (full, linear, sched)}

    # name -> (module, phase or None); phases share one model whose requires_grad is switched per phase
    configs: list[tuple[str, TransferClassifier, int | None]] = [("full", full, None), ("linear", linear, None)]
    configs += [(f"phase {k}", sched, k) for k in range(len(schedule.phases))]

    def step(model: TransferClassifier, phase: int | None) -> None:
        if phase is not None:
            cb.apply(model.net, phase)
        model.train()  # frozen BatchNorm stays in eval mode (TransferClassifier.train)
        opt = optimizers[id(model)]
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(model: TransferClassifier, phase: int | None) -> float:
        step(model, phase)  # warm-up (and the phase's requires_grad state)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            step(model, phase)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / args.steps

    times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    for _ in range(args.repeats):
        for name, model, phase in configs:
            times[name].append(timed(model, phase))
    med = {name: statistics.median(v) for name, v in times.items()}
    ref = med["full"]

    def trainable(model: TransferClassifier, phase: int | None) -> int:
        if phase is not None:
            cb.apply(model.net, phase)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    print(f"{args.backbone} @ {args.image_size}px, batch {args.batch_size}, {args.device}, "
          f"{torch.get_num_threads()} threads; {len(schedule.groups)} depth groups "
          f"({'blocks' if args.fine else 'coarse'}), {args.groups_per_phase} per phase; "
          f"median of {args.repeats} x {args.steps} steps")
    print(f"{'config':10s} {'trainable':>12s} {'step ms':>9s} {'vs full':>8s}  thaws")
    for name, model, phase in configs:
        what = "" if phase is None else \
            ("head" if phase == 0 else ", ".join(str(g - len(schedule.groups)) for g in schedule.phase_groups[phase]))
        print(f"{name:10s} {trainable(model, phase):12,d} {1000 * med[name]:9.1f} {med[name] / ref:8.2f}  {what}")
    print(f"phase 0 / linear = {med['phase 0'] / med['linear']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
