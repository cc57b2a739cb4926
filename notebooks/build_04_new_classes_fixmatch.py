"""Build ``notebooks/04_new_classes_fixmatch.ipynb`` with nbformat (valid JSON, no outputs stored).

    python notebooks/build_04_new_classes_fixmatch.py
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell("""# 04 · Add two new species with five photos each

You have a bird classifier trained on the species you knew. Two new species turn up: you label **five
photos of each**, and you have a folder of **unlabeled photos** (of any species). This notebook adds the
two species to the trained model without forgetting the old ones:

* the head grows by two rows, **imprinted** from the five photos (the old rows stay bit-identical);
* old classes are protected by **distillation** against a frozen copy of the old model;
* **FixMatch** learns from the unlabeled photos: confident predictions on weakly augmented photos become
  targets for strongly augmented ones;
* unlabeled photos the old model is sure about keep their old class, and are **replayed** as labeled
  examples of it, so the old species are still seen next to the new ones.

To run offline and in under two minutes, the "birds" are scikit-learn's handwritten digits, written as
image files in exactly the layout a bird-photo user would have: the old model knows digits 0-7, the new
"species" are 8 and 9."""),
    new_code_cell("""import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

import visiontune as vt
from visiontune.data.sources import digits, stratified_split
from visiontune.data.transforms import eval_transform

torch.set_num_threads(1)  # tiny images: one thread is fastest, and a shared machine stays responsive
WORK = Path("birds_demo")"""),
    new_markdown_cell("""## The folders
```
birds_demo/old_species/<0..7>/*.png     what the first model was trained on
birds_demo/new_species/8/*.png          five labeled photos of each new species
birds_demo/new_species/9/*.png
birds_demo/unlabeled/*.png              photos of every species, no labels
birds_demo/val/<0..9>/*.png             old and new species, to measure both
```"""),
    new_code_cell("""d = digits()
X, Y = np.stack(d.items), d.labels
train_idx, val_idx = stratified_split(Y, 0.3, seed=123)
rng = np.random.default_rng(0)
labeled = np.concatenate([rng.choice(train_idx[Y[train_idx] == c], 5, replace=False) for c in (8, 9)])

def save(folder, idx, by_class=True):
    for i in idx:
        sub = WORK / folder / (str(Y[i]) if by_class else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(X[i]).save(sub / f"{i:04d}.png")

save("old_species", [i for i in train_idx if Y[i] < 8])
save("new_species", labeled)
save("unlabeled", np.setdiff1d(train_idx, labeled), by_class=False)
save("val", val_idx)
print({p.name: len(list(p.rglob('*.png'))) for p in sorted(WORK.iterdir())})"""),
    new_markdown_cell("""## The model you already have
Trained on the old species only (a short run here; yours is whatever checkpoint you have)."""),
    new_code_cell("""def trainer(steps, **kw):
    return L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, check_val_every_n_epoch=10**6, default_root_dir=WORK, **kw)

L.seed_everything(0)
old = vt.TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="full", bn="train", lr=1e-3)
old_data = vt.ImageDataModule(train=WORK / "old_species", image_size=32, batch_size=32, hflip=False,
                              num_workers=0)
t = trainer(80, enable_checkpointing=False)
t.fit(old, old_data)
t.save_checkpoint(WORK / "old.ckpt")
print("old classes:", old.class_names, "val acc", round(t.validate(old, old_data, verbose=False)[0]["val_acc"], 3))"""),
    new_markdown_cell("""## Add the two species
`init_from` is the old checkpoint; the training folder's classes the old model does not know (`8`, `9`)
become new classes, appended after the old ones. `val/` holds every class: validation reports
`val_acc_old`, `val_acc_new` and `val_acc`.

First with the ten labeled photos only, then with FixMatch on the unlabeled folder too (the same in YAML:
`configs/new_classes.yaml`)."""),
    new_code_cell("""def add_species(semi_supervised=None, steps=60):
    L.seed_everything(0)
    model = vt.TransferClassifier(
        "tf_efficientnet_lite0", weights=None, strategy="full", bn="train", lr=5e-4,
        init_from=str(WORK / "old.ckpt"), class_expansion={"distill": 1.0},
        semi_supervised=semi_supervised)
    data = vt.ImageDataModule(
        train=WORK / "new_species", val=WORK / "val",
        unlabeled=WORK / "unlabeled" if semi_supervised else None,
        image_size=32, batch_size=10, hflip=False, num_workers=0)
    t = trainer(steps, enable_checkpointing=False)
    t.fit(model, data)
    train_logs = {k: round(float(v), 3) for k, v in t.callback_metrics.items() if k.startswith("train_")}
    scores = {k: round(v, 3) for k, v in t.validate(model, data, verbose=False)[0].items() if "acc" in k}
    return model, data, scores, train_logs

sup_model, sup_data, labeled_only, _ = add_species()
model, data, fixmatch, logs = add_species({"threshold": 0.95, "mu": 3})
print("classes:", model.class_names)
print("labeled only:", labeled_only)
print("FixMatch:    ", fixmatch)
print("last FixMatch step:", logs)"""),
    new_markdown_cell("""Trained on photos of the new species only, the labeled-only model learns that *everything* is a new
species: old-class accuracy collapses. FixMatch sees the unlabeled photos of every species; those the
frozen old model is sure about keep their old class and are replayed as labeled photos of it
(`train_replay` per step), so the old species survive while the new ones are learned.
`train_mask_rate` is the share of unlabeled photos confident enough to train on.

The labeled-only model's new-class accuracy looks high only because it calls almost every photo new.
`vt.new_accuracy_at` asks the fair question: lower the new classes' logits by one offset until old-class
accuracy is back to FixMatch's level (or as close as the model can get), then what is left on the new
classes?"""),
    new_code_cell("""def val_logits(m, d):
    m.eval()
    with torch.no_grad():
        pairs = [(m.net(xb), yb) for xb, yb in d.val_dataloader()]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

logits, labels = val_logits(sup_model, sup_data)
best_old = vt.split_accuracy(logits[:, :8], labels, old_classes=8)["acc_old"]  # never predicting a new class
fair = vt.new_accuracy_at(logits, labels, old_classes=8, acc_old=min(fixmatch["val_acc_old"], best_old))
print("labeled only, at FixMatch's old-class accuracy:", {k: round(v, 3) for k, v in fair.items()})
print("FixMatch:                                      ", {"acc_old": fixmatch["val_acc_old"],
                                                          "acc_new": fixmatch["val_acc_new"]})"""),
    new_markdown_cell("""## FreeMatch or SoftMatch instead of FixMatch
FixMatch keeps a pseudo-label when its confidence passes one fixed threshold (0.95). One key,
`semi_supervised.algorithm`, switches to **FreeMatch** (a threshold that follows the model's own average
confidence, lowered per class for classes it predicts less, plus a fairness loss) or **SoftMatch** (no cut:
every pseudo-label is weighted by a Gaussian of its confidence around the running mean, so unsure photos count
a little instead of not at all). Their running statistics move with `state_momentum` (the papers' 0.999 is for
runs of a million steps; 0.9 suits these 60) and are saved in the checkpoint, so a resumed run continues them.
Everything else (anchoring, replay, distillation) stays as it is."""),
    new_code_cell("""soft_model, _, softmatch, soft_logs = add_species(
    {"mu": 3, "algorithm": "softmatch", "state_momentum": 0.9})
state = soft_model._fixmatch.weighting
print("FixMatch: ", fixmatch)
print("SoftMatch:", softmatch)
print(f"SoftMatch's running mean confidence {float(state.mu):.3f}, variance {float(state.var):.4f}; "
      f"mean weight of the last unlabeled batch {soft_logs['train_mask_rate']}")"""),
    new_markdown_cell("""Adding classes costs an extra forward and backward for the replayed photos (about half the unlabeled
batch here). `ClassExpansionConfig(replay=False)` turns it off; measured on this data, old-class accuracy
then falls by about 23 points instead of staying level, and training is 1.16x faster (`BENCHMARKS.md`).

The model predicts like any other; its checkpoint loads with `TransferClassifier.load` and knows all ten
class names."""),
    new_code_cell("""model.eval()
files = sorted((WORK / "val" / "9").glob("*.png"))[:5] + sorted((WORK / "val" / "3").glob("*.png"))[:3]
tf = eval_transform(32, (0.5,) * 3, (0.5,) * 3)  # the backbone's mean/std, the training size
x = torch.stack([tf(image=np.asarray(Image.open(f).convert("RGB")))["image"] for f in files])
with torch.no_grad():
    pred = model(x).argmax(1)
for f, p in zip(files, pred):
    print(f"{f.parent.name}/{f.name} -> {model.class_names[p]}")"""),
]


def main() -> Path:
    nb = new_notebook(cells=CELLS, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    out = Path(__file__).with_name("04_new_classes_fixmatch.ipynb")
    nbformat.validate(nb)
    nbformat.write(nb, out)
    return out


if __name__ == "__main__":
    print(main())
