"""Build ``notebooks/02_peft_strategies.ipynb`` with nbformat (valid JSON by construction).

    python notebooks/build_02_peft_strategies.py            # writes the notebook next to this script
    python notebooks/build_02_peft_strategies.py --execute  # and runs it (offline, < 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS: list[tuple[str, str]] = [
    ("md", """# Parameter-efficient strategies and task deltas

Fine-tune a pretrained backbone by training a small fraction of its parameters, save **only what changed**
(a *task delta*, a few hundred KB), rebuild the model from it, keep several tasks on one base and switch
between them in place, and merge LoRA into the weights for deployment.

Everything here is offline: `tf_efficientnet_lite0` ImageNet weights come from a PyPI package
(`weights="package"`), the images are scikit-learn's 8×8 handwritten digits."""),
    ("code", """import os
import time
import warnings

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LitLogger.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")

import lightning as L
import torch
from sklearn.datasets import load_digits

import visiontune as vt
from visiontune.delta import TaskBank, build_from_delta, delta_from_file, save_delta

torch.set_num_threads(1)  # 32-px images: tiny convolutions, one thread is as fast
L.seed_everything(0, verbose=False)
vt.available_strategies()"""),
    ("md", """## What each strategy trains

Every strategy freezes the backbone and unfreezes (or adds) what it trains; the new head always trains."""),
    ("code", """for name in ["linear", "bitfit", "adapter", "lora", "sparse", "full"]:  # counts only: random weights
    m = vt.TransferClassifier("tf_efficientnet_lite0", weights=None, num_classes=10, strategy=name)
    s = m.parameter_summary()
    print(f"{name:8s} {s['trainable_params']:>10,d} trainable parameters ({100 * s['trainable_fraction']:.2f}%)")"""),
    ("md", """## Train LoRA on digits

LoRA adds low-rank factors `lora_A`, `lora_B` beside the frozen 1×1 convolutions (the preset for
EfficientNet). `bn="eval"` keeps the pretrained BatchNorm statistics, which helps with small data.
A short run: a few dozen steps at 32 px."""),
    ("code", """def fit(model, data, steps):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
    return trainer.validate(model, data, verbose=False)[0]["val_acc"]


digits = vt.ImageDataModule(train="digits", image_size=32, batch_size=32, num_workers=0)
model = vt.TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="lora", bn="eval", lr=3e-3)
t0 = time.perf_counter()
print(f"digits, LoRA: val_acc {fit(model, digits, steps=60):.3f} ({time.perf_counter() - t0:.0f} s)")"""),
    ("md", """## Save the task delta

`save_delta` writes the LoRA factors and the head (plus BatchNorm statistics of layers that trained, none
here) to a `.safetensors` file with metadata: backbone, weight source, strategy and its options, class
names, bn policy, and hashes of the base tensors it was trained on. Safetensors never runs code on load."""),
    ("code", """path = save_delta(model, "digits_lora.safetensors")
tensors, meta = delta_from_file(path)
full_bytes = sum(v.numel() * v.element_size() for v in model.net.state_dict().values())
print(f"delta: {path.stat().st_size / 1e6:.2f} MB, {len(tensors)} tensors; full weights: {full_bytes / 1e6:.1f} MB")
{k: meta[k] for k in ("backbone", "weights", "strategy", "strategy_config", "bn", "class_names")}"""),
    ("md", """`build_from_delta` builds the base from the metadata (same backbone, weights and strategy) and loads
the delta into it: the logits are reproduced exactly. Loading into a model that does not fit (another
backbone, class count, strategy option, or other base weights) fails and names what differs."""),
    ("code", """again = build_from_delta(path)
x, y = next(iter(digits.val_dataloader()))
x, y = x[:10], y[:10]
with torch.no_grad():
    print("identical logits:", torch.equal(again(x), model.eval()(x)))"""),
    ("md", """## A second task on the same base

Even vs. odd digits: two classes, from numpy arrays. Same backbone, weights and strategy, so its delta
fits the same base."""),
    ("code", """d = load_digits()
parity = vt.ImageDataModule(train=((d.images / 16.0).astype("float32"), d.target % 2, ["even", "odd"]),
                            image_size=32, batch_size=32, num_workers=0)
model2 = vt.TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="lora", bn="eval", lr=3e-3)
print(f"parity, LoRA: val_acc {fit(model2, parity, steps=40):.3f}")
save_delta(model2, "parity_lora.safetensors")"""),
    ("md", """## Switch tasks in place

A `TaskBank` keeps every task's tensors (and its own head: 10 vs. 2 classes) next to one base and swaps
them in place: no reload, the parameter objects stay the same. `use_task(None)` returns to the base."""),
    ("code", """bank = TaskBank(again)
bank.add_task("digits", "digits_lora.safetensors")
bank.add_task("parity", "parity_lora.safetensors")
print("true   ", y.tolist())
with torch.no_grad():
    for task in ["digits", "parity", "digits"]:
        t0 = time.perf_counter()
        bank.use_task(task)
        switch_ms = 1000 * (time.perf_counter() - t0)
        pred = again(x).argmax(1)
        print(f"{task:7s}", [again.class_names[i] for i in pred], f"(switched in {switch_ms:.1f} ms)")"""),
    ("md", """## Merge for deployment

`bank.merge(task)` returns a copy with the LoRA deltas merged into the weights and the wrappers removed:
a plain timm model, as fast as the base, ready for `torch.onnx.export` (needs the `onnx` package)."""),
    ("code", """merged = bank.merge("digits")
print(type(merged.blocks[1][0].conv_pw).__name__, "- no LoRA wrappers left")
bank.use_task("digits")
unmerged = again.net.eval()
base = vt.create_backbone("tf_efficientnet_lite0", "package", num_classes=10).eval()
with torch.no_grad():
    torch.testing.assert_close(merged(x), unmerged(x), atol=1e-4, rtol=1e-4)
    times = {"base": [], "unmerged LoRA": [], "merged LoRA": []}
    for _ in range(15):
        for name, m in zip(times, (base, unmerged, merged)):
            t0 = time.perf_counter()
            m(x)
            times[name].append(time.perf_counter() - t0)
for name, ts in times.items():
    print(f"{name:14s} {1000 * sorted(ts)[len(ts) // 2]:.2f} ms per batch of {len(x)}")
# torch.onnx.export(merged, x[:1], "digits.onnx")  # with the onnx package installed"""),
    ("md", """## SSF and DoRA: merge them too

`ssf` learns a per-channel scale and shift after every layer; `dora` splits each LoRA target into a
direction (LoRA's low-rank delta, normalised per output channel) and a trained magnitude. Both merge into
plain weights (`vt.merge`: SSF folds its scale and shift into the layer, DoRA writes
`magnitude * direction`), so a merged model computes the same logits with no extra layers. A few steps
each: the point is the merge and the delta size, not the accuracy."""),
    ("code", """import copy

sizes = {"lora": os.path.getsize("digits_lora.safetensors")}
for name, lr in [("ssf", 5e-3), ("dora", 3e-3)]:
    m = vt.TransferClassifier("tf_efficientnet_lite0", weights="package", strategy=name, bn="eval", lr=lr)
    acc = fit(m, digits, steps=15)
    net = m.net.eval()
    flat = copy.deepcopy(net)
    layers = vt.merge(flat)
    with torch.no_grad():
        gap = (flat(x) - net(x)).abs().max().item()
    sizes[name] = save_delta(m, f"digits_{name}.safetensors").stat().st_size
    print(f"{name:4s} val_acc {acc:.3f} after 15 steps; merged {layers} layers, max logit difference {gap:.1e}")
    torch.testing.assert_close(flat(x), net(x), atol=1e-4, rtol=1e-4)
for name, size in sizes.items():
    print(f"{name:4s} task delta {size / 1e3:7.0f} KB")"""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.validate(nb)
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="run the notebook (in a temp folder) after writing")
    args = parser.parse_args()
    out = Path(__file__).with_name("02_peft_strategies.ipynb")
    nb = build()
    nbformat.write(nb, out)
    print(f"wrote {out}")
    if args.execute:
        import tempfile

        from nbclient import NotebookClient

        with tempfile.TemporaryDirectory() as tmp:
            NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp}}).execute()
        print("executed without errors")


if __name__ == "__main__":
    main()
