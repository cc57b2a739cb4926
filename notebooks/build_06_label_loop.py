"""Build ``notebooks/06_label_loop.ipynb`` with nbformat (valid JSON, no outputs stored).

    python notebooks/build_06_label_loop.py
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell("""# 06 · The labelling loop: train → report → suggest → add classes → export

The loop a user runs on their own photos:

1. **train** on the classes you have labeled, and read the run's `report.html`;
2. **suggest**: let the model rank an unlabeled pool, both the photos it is unsure about and the photos that
   look like *no class it knows* (grouped into clusters, one contact sheet each);
3. **label** what it found and **add the new classes** to the trained model (`init_from`);
4. **export** the result as one ONNX file, checked against PyTorch.

Offline and small (under a minute on one core): scikit-learn's handwritten digits at 32 px, written as image
files, EfficientNet-Lite0 with its offline ImageNet weights. The first model knows digits 0-7; the pool holds
every digit, so 8 and 9 are the "new species" it has never seen. The true labels of the pool are kept aside:
they play the user's eyes when the notebook labels what `suggest` found."""),
    new_code_cell("""import json
import re
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import torch
from IPython.display import Image as Show, display
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

import visiontune as vt
from visiontune.data.sources import digits

torch.set_num_threads(1)  # tiny images: one thread is fastest, and a shared machine stays responsive
WORK = Path("label_loop")
HELD_BACK = (8, 9)"""),
    new_markdown_cell("""## The folders
```
label_loop/labeled/<0..7>/*.png    20 labeled images of each known digit
label_loop/pool/*.png              40 of every digit 0-9, no labels
label_loop/val_known/<0..7>/*.png  to measure the first model
label_loop/val/<0..9>/*.png        every digit, to measure old and new classes
```"""),
    new_code_cell("""d = digits()
X, Y = np.stack(d.items), d.labels
rng = np.random.default_rng(0)
order = {c: rng.permutation(np.flatnonzero(Y == c)) for c in range(10)}
labeled = np.concatenate([order[c][:20] for c in range(10) if c not in HELD_BACK])
pool = np.concatenate([order[c][20:60] for c in range(10)])
val = np.concatenate([order[c][-25:] for c in range(10)])

def save(folder, idx, by_class=True):
    for i in idx:
        sub = WORK / folder / (str(Y[i]) if by_class else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(X[i]).save(sub / f"{i:04d}.png")

save("labeled", labeled)
save("pool", pool, by_class=False)
save("val_known", [i for i in val if Y[i] not in HELD_BACK])
save("val", val)
truth = lambda path: int(Y[int(Path(path).stem)])  # what the user sees when looking at a pool image
print({p.name: len(list(p.rglob("*.png"))) for p in sorted(WORK.iterdir())})"""),
    new_markdown_cell("""## 1 · Train, and read the report
Eighty steps of full fine-tuning on the eight known digits. `vt.RunReport()` is the callback
`visiontune fit` adds itself: it writes the run directory (`metrics.json`, the confusion matrix, per-image
predictions, ...) and `report.html`, one self-contained page to open in a browser."""),
    new_code_cell("""def trainer(epochs, name):
    return L.Trainer(max_epochs=epochs, check_val_every_n_epoch=epochs, num_sanity_val_steps=0,
                     logger=CSVLogger(WORK / "runs", name=name), log_every_n_steps=5,
                     callbacks=[vt.RunReport(verbose=False)], enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=WORK)

L.seed_everything(0)
model = vt.TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="full", bn="train", lr=2e-3)
data = vt.ImageDataModule(train=WORK / "labeled", val=WORK / "val_known", image_size=32, batch_size=32,
                          hflip=False, num_workers=0)
t = trainer(16, "digits")  # 160 images, batch 32: 80 steps
t.fit(model, data)
t.save_checkpoint(WORK / "digits.ckpt")
run = Path(t.log_dir)
print("run directory:", run)
print("files:", sorted(p.name for p in run.iterdir()))"""),
    new_markdown_cell("""`report.html` holds these sections (its `<h2>` headings). The page is for a browser, so here is only its
per-class table, read from the run files the page is built from (`metrics.json`, `confusion_matrix_val.csv`).
`visiontune report RUN_DIR` (or `vt.build_report(run)`) rebuilds the page from those files."""),
    new_code_cell("""html = (run / "report.html").read_text()
print(f"report.html: {len(html) / 1e3:.0f} kB, sections:", re.findall(r"<h2>(.*?)</h2>", html))

metrics = json.loads((run / "metrics.json").read_text())
confusion = np.loadtxt(run / "confusion_matrix_val.csv", delimiter=",", dtype=int)
names = json.loads((run / "class_names.json").read_text())
print(f"\\nval accuracy {metrics['val_acc']:.3f}, macro-F1 {metrics['val_macro_f1']:.3f}")
print("class  support  accuracy  most often predicted instead")
for i, name in enumerate(names):
    off = confusion[i].copy()
    off[i] = 0
    instead = f"{names[off.argmax()]} ({off.max()})" if off.sum() else "-"
    print(f"{name:>5}  {confusion[i].sum():>7}  {metrics['val_per_class_acc'][name]:>8.2f}  {instead}")"""),
    new_markdown_cell("""## 2 · Which pool images to label next
`vt.suggest` runs the model once over the pool and returns two lists (and writes `suggest.csv` plus one
contact sheet per cluster):

* **uncertain**: the `n` images the model is least sure of among the typical ones, spread over the feature
  space (no near-duplicates): labelling them sharpens the known classes;
* **novel**: images far from every known class's prototype (the mean feature of its training images, hence
  `train=`), above an automatic threshold, clustered into candidate new classes.

The same from the command line:
```bash
visiontune suggest --ckpt_path label_loop/digits.ckpt --data.unlabeled label_loop/pool \\
    --data.train label_loop/labeled --data.image_size 32 --n 12 --output label_loop/next/suggest.csv
```"""),
    new_code_cell("""found = vt.suggest(model, WORK / "pool", n=12, train=WORK / "labeled", image_size=32,
                   output=WORK / "next" / "suggest.csv")
print(found.summary())
print("\\nsuggest.csv:", *(WORK / "next" / "suggest.csv").read_text().splitlines()[:4], "...", sep="\\n  ")

uncertain = [found.paths[i] for i in found.uncertain]
print("\\nuncertain picks, true digits:", [truth(p) for p in uncertain])
members = {k: [found.paths[i] for i, c in zip(found.novel, found.clusters) if c == k]
           for k in range(found.num_clusters)}
novel_new = sum(truth(found.paths[i]) in HELD_BACK for i in found.novel)
pool_new = sum(int(Y[i]) in HELD_BACK for i in pool)
print(f"novel: {novel_new} of the {len(found.novel)} novel images are 8s or 9s "
      f"({novel_new / len(found.novel):.0%}; 8s and 9s are {pool_new / len(pool):.0%} of the pool), "
      f"{novel_new} of the pool's {pool_new} 8s and 9s flagged")
for k, paths in members.items():
    counts = np.bincount([truth(p) for p in paths], minlength=10)
    print(f"  cluster {k}: {len(paths):>3} images, true digits " +
          ", ".join(f"{c}:{n}" for c, n in enumerate(counts) if n))"""),
    new_markdown_cell("""The largest cluster's contact sheet (`suggest_cluster0.png`), as you would open it:"""),
    new_code_cell("""display(Show(filename=str(found.sheets[0])))"""),
    new_markdown_cell("""## 3 · Label, and add the new classes
Looking at the sheets, you label the clusters that show the new digits (here: those where 8s and 9s are the
majority) and the uncertain picks. Each image goes into the folder of its true digit, the strays of known digits
too: they are labeled examples of the old classes. (The notebook reads the true labels; you would use your eyes.)"""),
    new_code_cell("""to_label = set(uncertain)
for k, paths in members.items():
    if np.mean([truth(p) in HELD_BACK for p in paths]) > 0.5:
        to_label |= set(paths)
for p in sorted(to_label):
    folder = WORK / "labeled" / str(truth(p))
    folder.mkdir(exist_ok=True)
    shutil.copy(p, folder)
print(f"labelled {len(to_label)} pool images; labeled/ now holds",
      {c.name: len(list(c.glob("*.png"))) for c in sorted((WORK / "labeled").iterdir())})"""),
    new_markdown_cell("""`init_from` is the first model's checkpoint: the training folder's classes it does not know (`8`, `9`)
become new classes, appended after the old ones, their head rows imprinted from their images; distillation
against the frozen old model protects the old classes (as in notebook 04; in YAML:
`configs/new_classes.yaml`)."""),
    new_markdown_cell("""`val/` holds every digit: validation reports `val_acc_old`, `val_acc_new` and `val_acc`
(`val_acc_old` is measured on the same images as the first model's accuracy: `val/0..7` = `val_known/`)."""),
    new_code_cell("""L.seed_everything(0)
grown = vt.TransferClassifier("tf_efficientnet_lite0", weights=None, strategy="full", bn="train", lr=2e-3,
                              init_from=str(WORK / "digits.ckpt"), class_expansion={"distill": 1.0})
data10 = vt.ImageDataModule(train=WORK / "labeled", val=WORK / "val", image_size=32, batch_size=32,
                            hflip=False, num_workers=0)
t10 = trainer(4, "digits_10")
t10.fit(grown, data10)
t10.save_checkpoint(WORK / "digits_10.ckpt")
scores = json.loads((Path(t10.log_dir) / "metrics.json").read_text())
print("classes:", grown.class_names)
print(f"first model, digits 0-7: val_acc {metrics['val_acc']:.3f}")
print("after adding 8 and 9:   ", {k: round(scores[k], 3) for k in ("val_acc_old", "val_acc_new", "val_acc")})
print("its report:", Path(t10.log_dir) / "report.html")"""),
    new_markdown_cell("""When this notebook was written, one round labelled 19 eights but only 6 nines (most 9s were spread
over clusters of mostly old digits, which were not labelled): the new classes start from a few dozen
labels, and old-class accuracy pays a few points for them. The next round, `suggest` with the grown model
and the grown `labeled/` on what is left of the pool, finds more of them."""),
    new_markdown_cell("""## 4 · Export for deployment
`vt.export_model` writes the evaluation graph as one ONNX file that runs without visiontune (or PyTorch):
it records the preprocessing and the class names, and before writing it runs the file in onnxruntime on real
images (here 8 from `val/`) at batch 1 and batch 8: the logits must match PyTorch's within the tolerance, with
the same top-1, else nothing is written. `exporter="legacy"` (the TorchScript-based exporter) keeps this notebook
fast: about 3 s here against about 17 s for the default torch.export-based one, which is the one to prefer
outside a demo. From the command line:
```bash
visiontune export --ckpt_path label_loop/digits_10.ckpt --data.val label_loop/val --data.image_size 32 \\
    --output label_loop/digits.onnx
```"""),
    new_code_cell("""exported = vt.export_model(grown, WORK / "digits.onnx", images=WORK / "val", image_size=32,
                           exporter="legacy")
print(*exported.summary(), sep="\\n")
meta = vt.read_export_metadata(exported.path)
print({k: meta[k] for k in ("input_size", "mean", "std", "interpolation", "class_names", "backbone", "strategy")})"""),
    new_markdown_cell("""Served without visiontune: preprocess as the metadata says, run onnxruntime, take the class name."""),
    new_code_cell("""import onnxruntime as ort

session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
files = sorted((WORK / "val" / "8").glob("*.png"))[:4] + sorted((WORK / "val" / "3").glob("*.png"))[:2]
size = tuple(meta["input_size"][1:])
x = np.stack([np.asarray(Image.open(f).convert("RGB").resize(size[::-1], Image.BICUBIC), np.float32) / 255
              for f in files])
x = ((x - np.float32(meta["mean"])) / np.float32(meta["std"])).transpose(0, 3, 1, 2)
logits = session.run(None, {session.get_inputs()[0].name: x})[0]
for f, k in zip(files, logits.argmax(1)):
    print(f"{f.parent.name}/{f.name} -> {meta['class_names'][k]}")"""),
]


def main() -> Path:
    nb = new_notebook(cells=CELLS, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    out = Path(__file__).with_name("06_label_loop.ipynb")
    nbformat.validate(nb)
    nbformat.write(nb, out)
    return out


if __name__ == "__main__":
    print(main())
