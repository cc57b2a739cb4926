"""``visiontune suggest`` on real photos: does labelling its picks beat labelling random ones, and does its
novelty score find classes the model never saw?

    python benchmarks/suggest.py            # photos, 3 seeds (about 3 minutes on one core)
    python benchmarks/suggest.py --quick    # seed 0 only

Model: the offline EfficientNet-Lite0 (``weights="package"``), frozen, at 96 px; its head is a logistic regression
(scikit-learn, C=1) on the frozen pooled features, copied into the ``linear`` strategy's classifier of a
``TransferClassifier``, so that :func:`visiontune.suggest` runs on it as on a trained checkpoint.

(a) active vs random: per seed, 2 labels per class of the ``photos`` training images; the rest is the pool.
    ``suggest(n=20)`` (margin, k-center greedy among the 80 most uncertain) vs 20 random pool images: each set is
    labelled (true labels), the regression refitted, test accuracy on the held-out ``test/`` images. Also: the
    20 most uncertain without k-center (``top``), entropy, and margin without the density weight.
(b) novelty: per seed, 3 classes held back (seeded); 5 labels per known class train the head and give the
    prototypes (``train=``); the pool is every other training image (known classes' rest + all of the held-back
    ones). AUROC of the novelty score, held-back vs known pool images (``roc_auc_score``); of the images above the
    threshold: the share that is held back (precision), the held-back images found (recall), and the purity of
    the clusters (each cluster's most frequent true class / images clustered). For comparison, the AUROC of the
    classifier-row prototypes (no ``train``) and of one minus the maximum softmax probability.

Prints ``RESULT`` lines for ``run_all.py``.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import photosets  # noqa: E402

SIZE, N, SEEDS, HOLD_BACK = 96, 20, (0, 1, 2), 3


def _samples(paths, labels, names):
    from visiontune.data.sources import Samples

    return Samples([str(p) for p in paths], np.asarray(labels, dtype=np.int64), list(names))


def load(root: Path):
    """Paths, labels and frozen features of the train and test images."""
    from visiontune import create_backbone, data_config
    from visiontune.data.dataset import ImageDataset
    from visiontune.data.transforms import eval_transform
    from visiontune.training.cache import extract_features

    names = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    net = create_backbone("tf_efficientnet_lite0", "package", num_classes=0).eval()
    cfg = data_config(net)
    tf = eval_transform(SIZE, cfg["mean"], cfg["std"], cfg.get("interpolation", "bilinear"))
    out = {}
    for split in ("train", "test"):
        paths = [p for k, n in enumerate(names) for p in sorted((root / split / n).iterdir())]
        labels = [names.index(p.parent.name) for p in paths]
        feats, _, _ = extract_features(net, ImageDataset(_samples(paths, labels, names), tf), pooled=True)
        out[split] = (paths, np.asarray(labels), feats.numpy())
    return names, out


def fit_head(x, y):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0, max_iter=3000).fit(x, y)


def as_model(clf, names):
    """A TransferClassifier (lite0, linear) whose classifier is the regression."""
    from visiontune import TransferClassifier

    model = TransferClassifier("tf_efficientnet_lite0", weights="package", num_classes=len(names),
                               class_names=list(names), strategy="linear").eval()
    head = model.net.get_classifier()
    full_w = torch.zeros_like(head.weight)
    full_b = torch.full_like(head.bias, -1e4)  # classes the regression never saw: never predicted
    cls = [int(c) for c in clf.classes_]
    full_w[cls] = torch.as_tensor(clf.coef_, dtype=torch.float32)
    full_b[cls] = torch.as_tensor(clf.intercept_, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(full_w)
        head.bias.copy_(full_b)
    return model


def per_class(labels, k, rng, classes=None):
    idx = []
    for c in (classes if classes is not None else np.unique(labels)):
        members = np.flatnonzero(labels == c)
        idx += rng.choice(members, size=min(k, len(members)), replace=False).tolist()
    return np.asarray(sorted(idx))


def active_vs_random(names, data, seed, out_dir):
    import visiontune as vt

    paths, y, x = data["train"]
    _, yt, xt = data["test"]
    rng = np.random.default_rng(seed)
    labeled = per_class(y, 2, rng)
    pool = np.setdiff1d(np.arange(len(y)), labeled)
    clf = fit_head(x[labeled], y[labeled])
    acc = {"start": clf.score(xt, yt)}
    r = vt.suggest(as_model(clf, names), _samples([paths[i] for i in pool], np.full(len(pool), -1), []), N,
                   image_size=SIZE, output=out_dir / f"a{seed}.csv")
    picks = {"suggest": pool[r.uncertain],
             "top": pool[np.argsort(-r.uncertainty, kind="stable")[:N]],  # the 20 most uncertain, no k-center
             "random": rng.choice(pool, size=N, replace=False)}
    for name, kwargs in (("entropy", {"score": "entropy"}), ("no_density", {"density": False})):
        other = vt.suggest(as_model(clf, names), _samples([paths[i] for i in pool], np.full(len(pool), -1), []), N,
                           image_size=SIZE, **kwargs)
        picks[name] = pool[other.uncertain]
    for name, chosen in picks.items():
        train = np.concatenate([labeled, chosen])
        acc[name] = fit_head(x[train], y[train]).score(xt, yt)
        acc[name + "_classes"] = len(set(y[chosen].tolist()))
    return acc


def novelty(names, data, seed, out_dir):
    import visiontune as vt
    from sklearn.metrics import roc_auc_score

    paths, y, x = data["train"]
    rng = np.random.default_rng(100 + seed)
    held = sorted(rng.choice(len(names), size=HOLD_BACK, replace=False).tolist())
    known = [c for c in range(len(names)) if c not in held]
    labeled = per_class(y, 5, rng, known)
    pool = np.setdiff1d(np.arange(len(y)), labeled)
    clf = fit_head(x[labeled], y[labeled])
    model = as_model(clf, names)
    is_new = np.isin(y[pool], held)
    r = vt.suggest(model, _samples([paths[i] for i in pool], np.full(len(pool), -1), []), N, image_size=SIZE,
                   train=_samples([paths[i] for i in labeled], y[labeled], names), output=out_dir / f"b{seed}.csv")
    flagged = np.asarray(r.novel, dtype=np.int64)
    clusters = np.asarray(r.clusters)
    true = y[pool][flagged]
    purity = sum(np.bincount(true[clusters == k]).max() for k in range(r.num_clusters)) / max(1, len(flagged))
    head = vt.novelty_scores(torch.as_tensor(x[pool]), torch.as_tensor(clf.coef_, dtype=torch.float32)).numpy()
    probs = clf.predict_proba(x[pool])
    return {"held": [names[c] for c in held], "auroc": roc_auc_score(is_new, r.novelty),
            "auroc_head": roc_auc_score(is_new, head), "auroc_msp": roc_auc_score(is_new, 1 - probs.max(1)),
            "precision": float(is_new[flagged].mean()) if len(flagged) else 0.0,
            "recall": float(is_new[flagged].sum() / is_new.sum()), "purity": float(purity), "k": r.num_clusters,
            "flagged": len(flagged), "new_in_pool": int(is_new.sum()), "pool": len(pool)}


def _ms(values):
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seed 0 only")
    p.add_argument("--cache", default=photosets.CACHE)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    seeds = SEEDS[:1] if args.quick else SEEDS
    names, data = load(photosets.build("photos", args.cache))
    print(f"photos: {len(data['train'][1])} train / {len(data['test'][1])} test images, {len(names)} classes; "
          f"features in {time.perf_counter() - start:.0f} s")
    with tempfile.TemporaryDirectory() as tmp:
        a = [active_vs_random(names, data, s, Path(tmp)) for s in seeds]
        b = [novelty(names, data, s, Path(tmp)) for s in seeds]
    for s, row in zip(seeds, a):
        print(f"(a) seed {s}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items()))
    for s, row in zip(seeds, b):
        print(f"(b) seed {s}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items()))
    for key in ("start", "suggest", "random", "top", "entropy", "no_density"):
        m, sd = _ms(r[key] for r in a)
        print(f"RESULT suggest_acc_{key} {m:.4f} report ± {sd:.4f} over {len(seeds)} seeds (2 labels/class + 20)")
    m, sd = _ms(r["suggest"] - r["random"] for r in a)
    print(f"RESULT suggest_minus_random {m:.4f} >0 ± {sd:.4f}; per seed "
          + " ".join(f"{r['suggest'] - r['random']:+.3f}" for r in a))
    for key, target in (("auroc", ">=0.8"), ("auroc_head", "report"), ("auroc_msp", "report"),
                        ("precision", "report"), ("recall", "report"), ("purity", ">=0.6"), ("k", "report")):
        m, sd = _ms(float(r[key]) for r in b)
        print(f"RESULT suggest_novel_{key} {m:.4f} {target} ± {sd:.4f} over {len(seeds)} seeds ({HOLD_BACK} held back)")
    print(f"RESULT suggest_benchmark_seconds {time.perf_counter() - start:.0f} report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
