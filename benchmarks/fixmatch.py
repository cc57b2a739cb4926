"""FixMatch benchmark: (a) accuracy, labeled-only vs FixMatch; (b) cost of our step vs a naive one;
(c) adding two classes to a trained model with five labels each; (d) FixMatch vs FreeMatch vs SoftMatch on photos.

    python benchmarks/fixmatch.py            # (a) 2/5/10 labels per class x 3 seeds, (b), (c) 3 seeds
    python benchmarks/fixmatch.py --quick    # (a) 5 labels per class, 1 seed, short runs; (b); (c) 1 seed
    python benchmarks/fixmatch.py --only cost,expansion
    python benchmarks/fixmatch.py --only algorithms   # (d) 2 and 5 labels per class x 3 seeds, ~20 min at 1 thread

(a) scikit-learn's digits (offline) at 32 px, ``tf_efficientnet_lite0`` with the packaged ImageNet weights,
strategy ``full``, ``bn="eval"``; the same number of optimizer steps for both runs, FixMatch drawing its
unlabeled batches from the rest of the training images (``unlabeled: rest``). Accuracy on a held-out 20 %.

(b) one optimizer step at mu = 7: ours runs the weak branch without a graph (``predict_weak``) and one
forward of ``cat(labeled, strong)``; the naive step runs ``cat(labeled, weak, strong)`` with gradients and
detaches the weak logits afterwards. Both are timed alternately in one process (ratios, not seconds: the
machine is shared and noisy). Memory: CUDA peak allocation on a GPU; on CPU the bytes autograd saves for
the backward pass (activation memory, what differs between the two).

Measured on the shared 2-core CPU (one run, ``--only accuracy --steps 100 --mu 3``; seeds 0, 1, 2):

    labels/class   labeled-only     FixMatch        gain
               2   0.600 ± 0.162    0.657 ± 0.067   +0.058
               5   0.644 ± 0.079    0.788 ± 0.025   +0.144
              10   0.897 ± 0.017    0.886 ± 0.014   -0.011

and ``--quick`` step cost (B=8, mu=7, 32 px): time 0.69x of the naive step, activation memory 0.56x.

(c) the issue's headline: a model trained on digits 0-7 (80 steps, 32 px, lite0 with packaged weights)
gets digits 8 and 9 from 5 labeled images each, the rest of the training images unlabeled (all ten
digits). Runs per seed: labeled-only, FixMatch without old-class replay, FixMatch (default: replay), all
with LwF distillation, 100 steps, lr 5e-4, mu = 3. Labeled-only training sees new-class images only and
calls most old images new, which inflates its raw new-class accuracy; it is also reported at FixMatch's
old-class accuracy (``new_accuracy_at``, an offset chosen on the test labels, in the baseline's favour).
Prints ``RESULT`` lines for ``run_all.py``.

(d) ``semi_supervised.algorithm``: the held-in real ``photos`` set (``benchmarks/photosets.py``, 12 classes,
its own test split), k = 2 and 5 labeled training images per class, the rest of the training images unlabeled;
lite0 with the packaged weights at 64 px, strategy ``full``, ``bn="eval"``, lr 5e-4 (as ``configs/fixmatch.yaml``),
``--algo-steps`` (150) optimizer steps, mu = 2, batch 8; labeled-only, FixMatch (threshold 0.95), FreeMatch and
SoftMatch (``state_momentum`` 0.99: the paper's 0.999 is for runs of a million steps; over a few hundred it keeps
their thresholds near their 1/C start). Test accuracy, mean ± std over seeds 0, 1, 2 (1 thread, shared 2-core CPU,
20 min; ``--algo-steps 70``: 10 min):

    labels/class   labeled-only     FixMatch        FreeMatch       SoftMatch
               2   0.404 ± 0.019    0.325 ± 0.053   0.309 ± 0.058   0.350 ± 0.029
               5   0.556 ± 0.025    0.499 ± 0.033   0.501 ± 0.049   0.488 ± 0.035
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def accuracy_run(labels_per_class: int, seed: int, fixmatch: bool, steps: int, size: int, mu: int,
                 threshold: float = 0.95) -> float:
    """Validation accuracy of one run (labeled-only or FixMatch) on digits."""
    import lightning as L

    from visiontune import ImageDataModule, TransferClassifier
    from visiontune.objectives.semisup import FixMatchConfig

    L.seed_everything(seed, verbose=False)
    model = TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="full", bn="eval", lr=5e-4,
                               semi_supervised=FixMatchConfig(threshold=threshold, mu=mu) if fixmatch else None)
    dm = ImageDataModule(train="digits", image_size=size, batch_size=16, labels_per_class=labels_per_class,
                         unlabeled="rest" if fixmatch else None, hflip=False, num_workers=0, seed=seed,
                         val_split=0.2)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=10**6)
    trainer.fit(model, dm)
    return float(trainer.validate(model, dm, verbose=False)[0]["val_acc"])


def accuracy_table(ks: list[int], seeds: list[int], steps: int, size: int, mu: int, threshold: float) -> None:
    print(f"(a) digits, {size} px, {steps} steps each, mu={mu}, threshold={threshold}; "
          f"val accuracy mean ± std over seeds {seeds}")
    print(f"{'labels/class':>12} {'labeled-only':>16} {'FixMatch':>16} {'gain':>8}")
    for k in ks:
        sup = [accuracy_run(k, s, False, steps, size, mu) for s in seeds]
        fm = [accuracy_run(k, s, True, steps, size, mu, threshold) for s in seeds]

        def fmt(v: list[float]) -> str:
            return f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}"

        gain = statistics.mean(fm) - statistics.mean(sup)
        print(f"{k:>12} {fmt(sup):>16} {fmt(fm):>16} {gain:>+8.3f}   per seed: {sup} vs {fm}", flush=True)


def _expansion_runs(seeds: list[int], steps: int) -> None:
    import lightning as L

    from visiontune import ImageDataModule, TransferClassifier, new_accuracy_at, split_accuracy
    from visiontune.objectives.classes import ClassExpansionConfig
    from visiontune.data.sources import digits, stratified_split
    from visiontune.objectives.semisup import FixMatchConfig

    s = digits()
    x, y = np.stack(s.items), s.labels
    keep, test = stratified_split(y, 0.3, 123)

    def arrays(idx, classes):
        idx = np.asarray([i for i in idx if y[i] in classes])
        return x[idx], np.searchsorted(classes, y[idx]), [str(c) for c in classes]

    def trainer(n: int) -> L.Trainer:
        return L.Trainer(max_steps=n, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=10**6)

    import tempfile

    work = Path(tempfile.mkdtemp(prefix="vt-expansion-"))
    L.seed_everything(0, verbose=False)
    model = TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="full", bn="train", lr=1e-3)
    dm = ImageDataModule(train=arrays(keep, list(range(8))), val=arrays(test, list(range(8))), image_size=32,
                         batch_size=32, hflip=False, num_workers=0)
    t = trainer(80)
    t.fit(model, dm)
    base = float(t.validate(model, dm, verbose=False)[0]["val_acc"])
    t.save_checkpoint(work / "old.ckpt")
    print(f"(c) base model on digits 0-7: accuracy {base:.3f}; adding 8 and 9, 5 labels each, {steps} steps")
    rows: dict[str, list[dict[str, float]]] = {"labeled-only": [], "FixMatch, no replay": [], "FixMatch": []}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        lab = np.concatenate([rng.choice([i for i in keep if y[i] == c], 5, replace=False) for c in (8, 9)])
        rest = np.setdiff1d(keep, lab)
        for name, pool, replay in (("labeled-only", False, True), ("FixMatch, no replay", True, False),
                                   ("FixMatch", True, True)):
            L.seed_everything(seed, verbose=False)
            model = TransferClassifier(
                "tf_efficientnet_lite0", weights=None, strategy="full", bn="train", lr=5e-4,
                init_from=str(work / "old.ckpt"), class_expansion=ClassExpansionConfig(distill=1.0, replay=replay),
                semi_supervised=FixMatchConfig(threshold=0.95, mu=3) if pool else None)
            dm = ImageDataModule(train=arrays(lab, [8, 9]), val=arrays(test, list(range(10))), image_size=32,
                                 unlabeled=(x[rest], y[rest], [str(i) for i in range(10)]) if pool else None,
                                 batch_size=10, hflip=False, num_workers=0, val_split=0, seed=seed)
            t = trainer(steps)
            start = time.perf_counter()
            t.fit(model, dm)
            seconds = time.perf_counter() - start
            metrics = t.validate(model, dm, verbose=False)[0]
            model.eval()
            with torch.no_grad():
                pairs = [(model.net(xb), yb) for xb, yb in dm.val_dataloader()]
            logits, labels = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
            rows[name].append({"old": metrics["val_acc_old"], "new": metrics["val_acc_new"], "all": metrics["val_acc"],
                               "seconds": seconds, "logits": logits, "labels": labels})
            print(f"    seed {seed} {name:<20} old {metrics['val_acc_old']:.3f} new {metrics['val_acc_new']:.3f} "
                  f"all {metrics['val_acc']:.3f} ({seconds:.0f} s)", flush=True)

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}"

    fm = rows["FixMatch"]
    reach = [split_accuracy(r["logits"][:, :8], r["labels"], 8)["acc_old"] for r in rows["labeled-only"]]
    matched = [new_accuracy_at(r["logits"], r["labels"], 8, min(f["old"], c))["acc_new"]
               for r, f, c in zip(rows["labeled-only"], fm, reach)]
    print(f"    {'':<22} {'old classes':>15} {'new classes':>15} {'all':>15}")
    for name, rs in rows.items():
        print(f"    {name:<22} {ms([r['old'] for r in rs]):>15} {ms([r['new'] for r in rs]):>15} "
              f"{ms([r['all'] for r in rs]):>15}")
    print(f"    labeled-only new-class accuracy at FixMatch's old-class accuracy (or the best old-class accuracy "
          f"it reaches at all, {ms(reach)}): {ms(matched)}")
    drop = statistics.mean(base - f["old"] for f in fm)
    gain = statistics.mean(f["new"] - m for f, m in zip(fm, matched))
    cost = statistics.median(f["seconds"] / n["seconds"] for f, n in zip(fm, rows["FixMatch, no replay"]))
    print(f"RESULT expansion_old_class_drop {drop:.3f} <=0.02 base {base:.3f}, mean over seeds {seeds}")
    print(f"RESULT expansion_new_class_gain_at_equal_old {gain:.3f} >=0.10 FixMatch vs labeled-only")
    print(f"RESULT expansion_new_class_gain_raw "
          f"{statistics.mean(f['new'] - r['new'] for f, r in zip(fm, rows['labeled-only'])):.3f} - "
          f"labeled-only keeps old acc {ms([r['old'] for r in rows['labeled-only']])}")
    print(f"RESULT expansion_labeled_only_best_old_class_drop {statistics.mean(base - c for c in reach):.3f} - "
          "predicting no new class at all")
    print(f"RESULT expansion_old_class_drop_without_replay "
          f"{statistics.mean(base - r['old'] for r in rows['FixMatch, no replay']):.3f} -")
    print(f"RESULT expansion_replay_time_ratio {cost:.2f} - training time with / without replay (median)")


def algorithm_run(root: Path, k: int, seed: int, algorithm: str | None, steps: int, size: int) -> float:
    """Test accuracy of one run on a photo set: labeled-only (``algorithm=None``) or one semi-supervised algorithm."""
    import lightning as L

    from visiontune import ImageDataModule, TransferClassifier
    from visiontune.objectives.semisup import FixMatchConfig

    L.seed_everything(seed, verbose=False)
    cfg = None if algorithm is None else FixMatchConfig(threshold=0.95, mu=2, algorithm=algorithm,
                                                          state_momentum=0.99)
    model = TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="full", bn="eval", lr=5e-4,
                               label_smoothing=0.0, warmup_steps=0, semi_supervised=cfg)
    dm = ImageDataModule(train=str(root / "train"), test=str(root / "test"), image_size=size, batch_size=8,
                         labels_per_class=k, unlabeled="rest" if cfg else None, num_workers=0, seed=seed,
                         val_split=0)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, dm)
    return float(trainer.test(model, dm, verbose=False)[0]["test_acc"])


def algorithm_table(ks: list[int], seeds: list[int], steps: int, size: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import photosets

    root = photosets.build("photos", photosets.CACHE)
    rows = {"labeled-only": None, "FixMatch": "fixmatch", "FreeMatch": "freematch", "SoftMatch": "softmatch"}
    print(f"(d) photos (12 classes), {size} px, {steps} steps, mu=2, batch 8; test accuracy mean ± std over "
          f"seeds {seeds}")
    print(f"{'labels/class':>12} " + " ".join(f"{name:>16}" for name in rows))
    for k in ks:
        cells = []
        for name, algorithm in rows.items():
            start = time.perf_counter()
            accs = [algorithm_run(root, k, s, algorithm, steps, size) for s in seeds]
            cells.append(f"{statistics.mean(accs):.3f} ± {statistics.pstdev(accs):.3f}")
            print(f"    k={k} {name}: {accs} ({time.perf_counter() - start:.0f} s)", flush=True)
            print(f"RESULT photos_{k}_labels_{name.lower()} {statistics.mean(accs):.3f} - "
                  f"std {statistics.pstdev(accs):.3f}, seeds {seeds}", flush=True)
        print(f"{k:>12} " + " ".join(f"{c:>16}" for c in cells), flush=True)


class _SavedBytes:
    """Bytes autograd keeps for backward (activations), via saved-tensor hooks."""

    def __init__(self) -> None:
        self.total = 0

    def __enter__(self) -> "_SavedBytes":
        def pack(t: torch.Tensor) -> torch.Tensor:
            self.total += t.numel() * t.element_size()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def step_cost(batch: int, mu: int, size: int, reps: int, device: str) -> None:
    from visiontune.models.backbones import create_backbone
    from visiontune.objectives.semisup import FixMatchConfig, fixmatch_loss, forward_train, predict_weak

    torch.manual_seed(0)
    net = create_backbone("tf_efficientnet_lite0", "package", num_classes=10).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    cfg = FixMatchConfig(threshold=0.95, mu=mu)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    xw = torch.randn(batch * mu, 3, size, size, device=device)
    xs = torch.randn(batch * mu, 3, size, size, device=device)

    def ours() -> None:
        weak = predict_weak(net, xw)
        ll, ls = forward_train(net, x, xs, cfg.bn)
        loss = F.cross_entropy(ll, y) + fixmatch_loss(ls, weak, cfg).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def naive() -> None:
        logits = net(torch.cat([x, xw, xs]))
        ll, lw, ls = logits[:batch], logits[batch: batch + batch * mu], logits[batch + batch * mu:]
        loss = F.cross_entropy(ll, y) + fixmatch_loss(ls, lw.detach(), cfg).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def memory(fn) -> int:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        with _SavedBytes() as saved:
            fn()
        return saved.total

    for fn in (ours, naive):  # warm-up (allocator, AdamW state)
        fn()
    times: dict[str, list[float]] = {"ours": [], "naive": []}
    for _ in range(reps):
        for name, fn in (("ours", ours), ("naive", naive)):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    mem = {"ours": memory(ours), "naive": memory(naive)}
    t_ours, t_naive = statistics.median(times["ours"]), statistics.median(times["naive"])
    what = "peak CUDA memory" if device == "cuda" else "activation bytes saved for backward"
    print(f"(b) step cost, {device}, tf_efficientnet_lite0 @ {size} px, B={batch}, mu={mu}, {reps} alternating reps")
    print(f"    time: ours {t_ours * 1e3:.0f} ms, naive {t_naive * 1e3:.0f} ms (median) -> ratio {t_ours / t_naive:.2f}x")
    print(f"    {what}: ours {mem['ours'] / 2**20:.0f} MiB, naive {mem['naive'] / 2**20:.0f} MiB -> ratio "
          f"{mem['ours'] / mem['naive']:.2f}x", flush=True)
    print(f"RESULT fixmatch_step_vs_naive_{device} {t_ours / t_naive:.2f} <=0.75 mu={mu}")
    print(f"RESULT fixmatch_memory_vs_naive_{device} {mem['ours'] / mem['naive']:.2f} - {what}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5 labels/class, 1 seed, short runs, fewer reps")
    p.add_argument("--only", default=None, help="comma-separated parts: accuracy, cost, expansion")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per accuracy run")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--mu", type=int, default=7)
    p.add_argument("--threshold", type=float, default=0.95, help="FixMatch confidence threshold")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on <= 2 cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--algo-steps", type=int, default=150, help="optimizer steps per run of (d)")
    p.add_argument("--algo-size", type=int, default=64, help="image size of (d)")
    args = p.parse_args(argv)
    known = {"accuracy", "cost", "expansion", "algorithms"}
    parts = set(args.only.split(",")) if args.only else known
    if parts - known:
        p.error(f"--only: unknown parts {sorted(parts - known)}; choose from {', '.join(sorted(known))}")
    threads = args.threads or (1 if (os.cpu_count() or 1) <= 2 else None)
    if threads:
        torch.set_num_threads(threads)
    if "accuracy" in parts:
        ks, seeds = ([5], [0]) if args.quick else ([2, 5, 10], [0, 1, 2])
        steps = args.steps or (100 if args.quick else 300)
        accuracy_table(ks, seeds, steps, args.size, mu=3 if args.quick else args.mu, threshold=args.threshold)
    if "cost" in parts:
        step_cost(batch=16 if args.device == "cuda" else 8, mu=args.mu, size=args.size,
                  reps=5 if args.quick else 15, device=args.device)
    if "expansion" in parts:
        _expansion_runs([0] if args.quick else [0, 1, 2], steps=args.steps or 100)
    if "algorithms" in parts:
        algorithm_table([5] if args.quick else [2, 5], [0] if args.quick else [0, 1, 2],
                        steps=args.algo_steps, size=args.algo_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
