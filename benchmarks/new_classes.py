"""Adding classes on real photos: a base model on the old classes, then new classes from 5 labels each.

    python benchmarks/new_classes.py                          # both sets, 3 seeds, every variant
    python benchmarks/new_classes.py --sets photos --seeds 0 --variants shipped,labeled_only
    python benchmarks/new_classes.py --variants "mine:model.lr=0.001,trainer.max_epochs=5"
    python benchmarks/new_classes.py --quick                  # photos, seed 0, shipped config (~6 min)

Each set of ``benchmarks/photosets.py`` is split as a user has it: some classes are *old* (the base
model is trained on their training images with ``visiontune fit``, the recipe, 96 px), a few are *new*
(``NEW`` below): 5 labeled training images each (chosen by the seed); an unlabeled folder holds the
other training images of the new classes plus half of the old classes' (a photo dump); the test images
of every class are the validation folder. Every run goes through the CLI (``visiontune fit --config
configs/new_classes.yaml --model.init_from base.ckpt ...``), so what is measured is what a user runs;
a variant adds dotted overrides (``--model.lr 0.001``).

Reports per set and variant, mean ± std over seeds: old-class, new-class and all-class accuracy on the
test images, the base model's old-class accuracy, and the class-balanced logistic regression on frozen
ImageNet features (all old labels + the 5 new per class, same resolution), with the issue's targets:
old >= base - 0.03, new >= 0.60, all >= LR + 0.10. Prints ``RESULT`` lines for ``run_all.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import photosets  # noqa: E402

NEW = {"photos": ["bird", "household", "sea_life", "tool"], "art4apps": ["clothes", "food", "jobs"]}
SIZE = 96
LABELS = 5
BASE_EPOCHS = 10
VARIANTS: dict[str, list[str]] = {
    "shipped": [],
    "labeled_only": ["--model.semi_supervised", "null"],
    "label_all": ["--model.class_expansion.label_pool", "all"],
}
EXTS = {".jpg", ".jpeg", ".png"}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTS)


def make_split(root: Path, new: list[str], seed: int, out: Path) -> dict[str, Path]:
    """Symlinked folders: base_train/, base_val/ (old classes), new/, unlabeled/ (flat), val/."""
    rng = random.Random(seed)
    dirs = {k: out / k for k in ("base_train", "base_val", "new", "unlabeled", "val", "lr_train")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)

    def link(src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src.resolve())

    for cls_dir in sorted((root / "train").iterdir()):
        name, files = cls_dir.name, _images(cls_dir)
        rng.shuffle(files)
        for p in _images(root / "test" / name):
            link(p, dirs["val"] / name / p.name)
            if name not in new:
                link(p, dirs["base_val"] / name / p.name)
        if name in new:
            labeled, pool = files[:LABELS], files[LABELS:]
            for p in labeled:
                link(p, dirs["new"] / name / p.name)
                link(p, dirs["lr_train"] / name / p.name)
        else:
            labeled, pool = files, files[: len(files) // 2]
            for p in labeled:
                link(p, dirs["base_train"] / name / p.name)
                link(p, dirs["lr_train"] / name / p.name)
        for p in pool:
            link(p, dirs["unlabeled"] / f"{name}__{p.name}")
    return dirs


def _fit(args: list[str], save_dir: Path) -> Path:
    """``visiontune fit`` in a subprocess; returns the run directory (version_0)."""
    cmd = [str(Path(sys.executable).parent / "visiontune"), "fit", *args,
           "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    runs = sorted(save_dir.glob("*/version_*"), key=lambda p: p.stat().st_mtime)
    return runs[-1]


def _last_metrics(run: Path) -> dict[str, float]:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    out: dict[str, float] = {}
    for row in rows:
        for k, v in row.items():
            if v not in ("", None) and k.startswith("val_"):
                out[k] = float(v)
    return out


def base_model(dirs: dict[str, Path], work: Path, seed: int) -> tuple[Path, float]:
    run = _fit(["--data.train", str(dirs["base_train"]), "--data.val", str(dirs["base_val"]),
                "--model.weights", "package", "--data.image_size", str(SIZE),
                "--trainer.max_epochs", str(BASE_EPOCHS), "--seed_everything", str(seed),
                "--trainer.logger", "lightning.pytorch.loggers.CSVLogger"], work / "base")
    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        ckpt = sorted(run.glob("checkpoints/*.ckpt"))[-1]
    return ckpt, _last_metrics(run)["val_acc"]


def lr_baseline(dirs: dict[str, Path], new: list[str], seed: int) -> dict[str, float]:
    from visiontune import ImageDataModule, frozen_feature_baseline

    dm = ImageDataModule(train=str(dirs["lr_train"]), test=str(dirs["val"]), val_split=0.0, image_size=SIZE,
                         batch_size=32, num_workers=0, seed=seed)
    res = frozen_feature_baseline("tf_efficientnet_lite0", dm, weights="package", split="test",
                                  class_weight="balanced")
    counts = {c: len(_images(dirs["val"] / c)) for c in res.per_class}

    def mean_over(names: list[str]) -> float:
        n = sum(counts[c] for c in names)
        return sum(res.per_class[c] * counts[c] for c in names) / n

    old = [c for c in res.per_class if c not in new]
    return {"old": mean_over(old), "new": mean_over(new), "all": res.accuracy}


def add_classes(dirs: dict[str, Path], ckpt: Path, work: Path, seed: int, extra: list[str]) -> dict[str, float]:
    start = time.perf_counter()
    run = _fit(["--config", "configs/new_classes.yaml", "--model.init_from", str(ckpt),
                "--data.train", str(dirs["new"]), "--data.unlabeled", str(dirs["unlabeled"]),
                "--data.val", str(dirs["val"]), "--data.image_size", str(SIZE), "--data.num_workers", "0",
                "--seed_everything", str(seed), *extra], work)
    m = _last_metrics(run)
    return {"old": m["val_acc_old"], "new": m["val_acc_new"], "all": m["val_acc"],
            "seconds": time.perf_counter() - start}


def _parse_variant(spec: str) -> tuple[str, list[str]]:
    if spec in VARIANTS:
        return spec, VARIANTS[spec]
    name, _, overrides = spec.partition(":")
    args: list[str] = []
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        args += [f"--{key}", value]
    return name, args


def _ms(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="photos,art4apps")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="names or 'name:key=value,key=value'; ';' separates")
    ap.add_argument("--keep", help="keep the work folders here (the split, base model and baseline are reused)")
    ap.add_argument("--quick", action="store_true", help="photos, seed 0, the shipped config only")
    args = ap.parse_args(argv)
    if args.quick:
        args.sets, args.seeds, args.variants = "photos", "0", "shipped"
    seeds = [int(s) for s in args.seeds.split(",")]
    specs = args.variants.split(";") if ";" in args.variants else args.variants.split(",")
    variants = [_parse_variant(s) for s in specs]
    for set_name in args.sets.split(","):
        root = photosets.build(set_name)
        new = NEW[set_name]
        res: dict[str, dict[str, list[float]]] = {}
        for seed in seeds:
            if args.keep:  # the split, base model and baseline of a (set, seed) are reused across calls
                work = Path(args.keep) / f"{set_name}_{seed}"
            else:
                work = Path(tempfile.mkdtemp(prefix=f"vt_newcls_{set_name}_{seed}_"))
            cached = work / "base.json"
            if cached.exists():
                info = json.loads(cached.read_text())
                dirs = {k: work / "data" / k for k in ("base_train", "base_val", "new", "unlabeled", "val", "lr_train")}
            else:
                shutil.rmtree(work, ignore_errors=True)
                dirs = make_split(root, new, seed, work / "data")
                ckpt, base_acc = base_model(dirs, work, seed)
                info = {"ckpt": str(ckpt), "base": base_acc, "lr": lr_baseline(dirs, new, seed)}
                cached.write_text(json.dumps(info))
            ckpt = Path(info["ckpt"])
            res.setdefault("base", {}).setdefault("old", []).append(info["base"])
            for k, v in info["lr"].items():
                res.setdefault("lr", {}).setdefault(k, []).append(v)
            print(f"[{set_name} seed {seed}] base old {info['base']:.3f}; LR {res['lr']['old'][-1]:.3f} / "
                  f"{res['lr']['new'][-1]:.3f} / {res['lr']['all'][-1]:.3f}", flush=True)
            for name, extra in variants:
                shutil.rmtree(work / name, ignore_errors=True)
                r = add_classes(dirs, ckpt, work / name, seed, extra)
                for k, v in r.items():
                    res.setdefault(name, {}).setdefault(k, []).append(v)
                print(f"[{set_name} seed {seed}] {name}: old {r['old']:.3f} new {r['new']:.3f} all {r['all']:.3f} "
                      f"({r['seconds']:.0f} s)", flush=True)
        base, lr = statistics.fmean(res["base"]["old"]), statistics.fmean(res["lr"]["all"])
        print(f"\n{set_name}: {len(new)} new classes x {LABELS} labels, {SIZE} px, seeds {seeds}")
        print(f"  base model old-class acc {_ms(res['base']['old'])}")
        print(f"  class-balanced LR on frozen features: old {_ms(res['lr']['old'])} new {_ms(res['lr']['new'])} "
              f"all {_ms(res['lr']['all'])}")
        for name, _ in variants:
            r = res[name]
            print(f"  {name:>14}: old {_ms(r['old'])} new {_ms(r['new'])} all {_ms(r['all'])} "
                  f"({statistics.fmean(r['seconds']):.0f} s)")
            ok = (statistics.fmean(r["old"]) >= base - 0.03, statistics.fmean(r["new"]) >= 0.60,
                  statistics.fmean(r["all"]) >= lr + 0.10)
            print(f"RESULT new_classes.{set_name}.{name} " + json.dumps(
                {"old": statistics.fmean(r["old"]), "new": statistics.fmean(r["new"]), "all": statistics.fmean(r["all"]),
                 "base_old": base, "lr_all": lr, "targets_met": all(ok)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
