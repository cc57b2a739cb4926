"""Accuracy on real colour photos: the recipe's strategies against the frozen-feature baseline.

    python benchmarks/accuracy.py                       # every set, 3 seeds, the default strategy list
    python benchmarks/accuracy.py --quick               # one set, one seed, default recipe + baseline
    python benchmarks/accuracy.py --sets photos --strategies full lora --seeds 0 --epochs 10
    python benchmarks/accuracy.py --set-arg model.bn=frozen --set-arg data.augment=none   # ablations

Data: the held-in sets of ``benchmarks/photosets.py`` (real images from Debian packages, built and cached
on first use), ``train/`` for training, ``test/`` for the reported accuracy; no validation split (the
last epoch's model is tested, as a user without a validation set would get).

For each set and seed: the frozen-feature logistic regression (:func:`visiontune.frozen_feature_baseline`,
same backbone, weights, resolution, images), then each strategy under the recipe (every option at its
default unless ``--set-arg`` says otherwise), trained for ``--epochs`` epochs. Prints a table per set
(mean ± std over seeds of test accuracy and macro-F1, train seconds, trainable parameters) and
``RESULT`` lines for ``run_all.py``: ``acc_<set>_<strategy>`` and ``gain_<set>_<strategy>`` (points over
the baseline), with the issue's targets (default recipe >= +10 points, best >= +15, PEFT >= linear).
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

BACKBONE, WEIGHTS = "tf_efficientnet_lite0", "package"
STRATEGIES = ["default", "full", "last_k", "lora", "dora", "ssf", "adapter", "bitfit", "linear"]
PEFT = ("lora", "dora", "ssf", "adapter", "bitfit")


def _value(text: str):
    import yaml

    try:
        return float(text) if "." in text or "e" in text.lower() else yaml.safe_load(text)
    except ValueError:  # not a number: YAML decides (null, true, a word, a list)
        return yaml.safe_load(text)


def _split_args(pairs: list[str]) -> tuple[dict, dict]:
    model, data = {}, {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        where, _, name = key.partition(".")
        if where not in ("model", "data") or not name or not _:
            raise SystemExit(f"--set-arg {pair!r}: expected model.NAME=VALUE or data.NAME=VALUE")
        (model if where == "model" else data)[name] = _value(value)
    return model, data


def data_module(root: Path, size: int, seed: int, **overrides):
    from visiontune import ImageDataModule

    kw = dict(train=str(root / "train"), test=str(root / "test"), val_split=0.0, image_size=size,
              batch_size=32, seed=seed, num_workers=0)
    kw.update(overrides)
    return ImageDataModule(**kw)


def run_strategy(root: Path, strategy: str, seed: int, size: int, epochs: int, model_args: dict,
                 data_args: dict) -> dict:
    """Train one strategy under the recipe and test it; returns accuracy, macro-F1, seconds, params."""
    import lightning as L

    from visiontune import TransferClassifier

    L.seed_everything(seed, verbose=False)
    args = dict(model_args)
    if strategy != "default":
        args["strategy"] = strategy
    model = TransferClassifier(BACKBONE, weights=WEIGHTS, **args)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    dm = data_module(root, size, seed, **data_args)
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    trainer.test(model, dm, verbose=False)
    m = trainer.callback_metrics
    out = {"acc": float(m["test_acc"]), "f1": float(m["test_macro_f1"]), "seconds": seconds,
           "params": model.parameter_summary()["trainable_params"]}
    if model.hparams.get("tta", "none") == "none" and dm.hflip:  # the same model, tested with flip TTA too
        model.hparams["tta"] = "hflip"
        trainer.test(model, dm, verbose=False)
        out["acc_tta"] = float(trainer.callback_metrics["test_acc"])
        model.hparams["tta"] = "none"
    return out


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    import photosets

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=None, help=f"default: {photosets.available_sets()}")
    p.add_argument("--strategies", nargs="+", default=STRATEGIES, help="'default' = no strategy given")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--set-arg", action="append", default=[], help="model.NAME=VALUE or data.NAME=VALUE")
    p.add_argument("--cache", default=photosets.CACHE)
    p.add_argument("--quick", action="store_true", help="first set, seed 0, default recipe and baseline")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, a.threads))
    sets = a.sets or photosets.available_sets()
    if a.quick:
        sets, a.seeds, a.strategies = sets[:1], [0], ["default"]
    model_args, data_args = _split_args(a.set_arg)
    from visiontune import frozen_feature_baseline

    for name in sets:
        root = photosets.build(name, a.cache)
        rows: dict[str, list[dict]] = {"baseline": []}
        for seed in a.seeds:
            b = frozen_feature_baseline(BACKBONE, data_module(root, a.size, seed, **data_args), weights=WEIGHTS,
                                        split="test")
            rows["baseline"].append({"acc": b.accuracy, "f1": b.macro_f1, "seconds": b.seconds, "params": 0})
            print(f"[{name} seed {seed}] baseline acc {b.accuracy:.3f} ({b.n_train} train, {b.n_eval} test)",
                  flush=True)
            for s in a.strategies:
                r = run_strategy(root, s, seed, a.size, a.epochs, model_args, data_args)
                rows.setdefault(s, []).append(r)
                tta = f" (hflip TTA {r['acc_tta']:.3f})" if "acc_tta" in r else ""
                print(f"[{name} seed {seed}] {s:10s} acc {r['acc']:.3f}{tta} f1 {r['f1']:.3f} "
                      f"{r['seconds']:.0f}s {r['params']:,} params", flush=True)
        base = _mean_std([r["acc"] for r in rows["baseline"]])[0]
        print(f"\n{name} @ {a.size}px, {a.epochs} epochs, seeds {a.seeds}, args {a.set_arg or 'recipe defaults'}")
        print(f"{'run':12s} {'test acc':>15s} {'macro-F1':>15s} {'gain':>7s} {'train s':>8s} {'params':>10s}")
        for s, rs in rows.items():
            acc, acc_sd = _mean_std([r["acc"] for r in rs])
            f1, f1_sd = _mean_std([r["f1"] for r in rs])
            sec = statistics.median(r["seconds"] for r in rs)
            print(f"{s:12s} {acc:7.3f} ± {acc_sd:5.3f} {f1:7.3f} ± {f1_sd:5.3f} {100 * (acc - base):+7.1f} "
                  f"{sec:8.0f} {rs[0]['params']:>10,}")
        linear = _mean_std([r["acc"] for r in rows["linear"]])[0] if "linear" in rows else None
        for s, rs in rows.items():
            acc = _mean_std([r["acc"] for r in rs])[0]
            print(f"RESULT acc_{name}_{s} {acc:.4f} report")
            if all("acc_tta" in r for r in rs):
                print(f"RESULT tta_gain_{name}_{s} {100 * (_mean_std([r['acc_tta'] for r in rs])[0] - acc):.1f} report")
            if s == "baseline":
                continue
            target = ">=10" if s == "default" else "report"
            print(f"RESULT gain_{name}_{s} {100 * (acc - base):.1f} {target}")
            if s in PEFT and linear is not None:
                print(f"RESULT peft_minus_linear_{name}_{s} {100 * (acc - linear):.1f} >=0")
        tuned = [s for s in rows if s != "baseline"]
        if tuned:
            best = max(_mean_std([r["acc"] for r in rows[s]])[0] for s in tuned)
            print(f"RESULT gain_{name}_best {100 * (best - base):.1f} >=15")
    return 0


if __name__ == "__main__":
    sys.exit(main())
