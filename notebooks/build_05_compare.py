"""Build ``notebooks/05_compare.ipynb`` with nbformat (valid JSON, no outputs stored).

    python notebooks/build_05_compare.py
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell("""# 05 · Compare strategies on your data in one command

Which transfer strategy suits *your* data: a linear probe, BitFit, LoRA, full fine-tuning...?
`visiontune.compare` trains each of them on the same backbone, the same seeded split and batch order and
the same budget, then writes a leaderboard (Markdown + CSV), a plot, and each strategy's delta file.

From the command line the same thing is `visiontune compare --config configs/compare.yaml`.

This notebook runs offline and small (2 minutes on 2 CPU cores): EfficientNet-Lite0 with offline
ImageNet weights, scikit-learn's digits at 32 px, three strategies, one epoch each."""),
    new_code_cell("""import os
import torch
import visiontune as vt

# small images train fastest on few threads (and a shared machine stays responsive)
torch.set_num_threads(max(1, min(4, (os.cpu_count() or 2) // 2)))"""),
    new_markdown_cell("""## Run the comparison
`strategies` takes names or `{name, args, model, label}` entries: `args` are the strategy's options,
`model` overrides `TransferClassifier` arguments for that strategy alone. Here the linear probe gets a
larger learning rate and the fast frozen path (`cache_features=True`: the frozen backbone's features
are computed once, then only the head trains).

The budget is `max_epochs` and/or `max_time` (seconds per run). Several `seeds` give mean ± std."""),
    new_code_cell("""DATA = {"train": "digits", "image_size": 32, "batch_size": 64, "hflip": False,
        "labels_per_class": 60, "val_split": 0.2, "test_split": 0.2, "num_workers": 0}
result = vt.compare(
    data=DATA,
    strategies=[
        {"name": "linear", "model": {"lr": 0.01, "cache_features": True}},
        "bitfit",
        {"name": "lora", "args": {"rank": 4}},
    ],
    backbone="tf_efficientnet_lite0",
    weights="package",
    max_epochs=1,
    seeds=[0],
    model={"lr": 0.003},
    latency_repeats=5,
    output="runs/compare_digits",
)"""),
    new_markdown_cell("""## Read the leaderboard
* **accuracy / macro-F1**: on the test split (20 % of the digits, never trained on; training uses 60
  labeled images per class); mean ± std when
  there are several seeds. Macro-F1 weighs every class equally: it drops when a few classes fail.
* **trainable**: parameters the strategy trains (and their share of the model).
* **delta MB**: the file that holds only what the strategy changed: ship it instead of a whole model.
* **peak mem MB**: peak memory of the training run (CPU: above the level before the run).
* **train s / latency ms**: training wall time, and one-image inference time."""),
    new_code_cell("""from IPython.display import Image, Markdown, display

display(Markdown(result.markdown.read_text()))"""),
    new_markdown_cell("""## Read the plot
Each strategy is a point: accuracy (y) against trainable parameters (x, **log scale**). The marker area
grows with training time; the winner has a thick edge. Up and to the left is the sweet spot: as accurate
as full fine-tuning while training (and storing) orders of magnitude fewer parameters. A point far to
the right that is not higher than its neighbours is paying for parameters it does not need.
One epoch at 32 px is a tiny budget: with `max_epochs=3` at 64 px (`configs/compare.yaml`) the ranking
is the one to trust. BitFit in particular lands low here: it trains BatchNorm biases, so under the default
`bn="frozen"` policy those BatchNorm layers run in train mode and ten steps are too few for their running
statistics to settle. `{"name": "bitfit", "model": {"bn": "eval"}}` roughly doubles its accuracy in the
same budget: a comparison is also a quick way to try such options side by side."""),
    new_code_cell("""display(Image(filename=str(result.plot)))"""),
    new_markdown_cell("""## Use the winner
Each run keeps its delta (`runs/<strategy>/seed<k>/delta.safetensors`); `result.best["delta"]` is the
winner's. Rebuild the model from it (the base weights come from the same offline package)."""),
    new_code_cell("""from visiontune.delta import build_from_delta

best = result.best
print(best["strategy"], best["accuracy_mean"], best["delta"])
model = build_from_delta(best["delta"])
norm = model.data_config  # the backbone's mean/std (a Trainer would pass them to the data)
data = vt.ImageDataModule(train="digits", image_size=32, batch_size=64, val_split=0.2, test_split=0.2,
                          mean=norm["mean"], std=norm["std"])
data.setup("test")
x, y = next(iter(data.test_dataloader()))
with torch.no_grad():
    accuracy = (model(x).argmax(1) == y).float().mean().item()
print(f"winner on one test batch: {accuracy:.3f}")"""),
    new_markdown_cell("""## Interrupted? Run it again
Each run's result is written atomically to `runs/compare_digits/results/<strategy>__seed<k>.json`.
Calling `compare` again with the same settings reuses finished runs (`result.reused`) and trains only
what is missing; changing a setting (budget, data, options) makes those runs count as new."""),
    new_code_cell("""again = vt.compare(
    data=DATA,
    strategies=[{"name": "linear", "model": {"lr": 0.01, "cache_features": True}}, "bitfit"],
    max_epochs=1, model={"lr": 0.003}, latency_repeats=5, output="runs/compare_digits", verbose=False,
)
again.ran, again.reused"""),
]


def build(path: Path) -> Path:
    nb = new_notebook(cells=CELLS, metadata={"kernelspec": {"display_name": "Python 3", "language": "python",
                                                            "name": "python3"}})
    nbformat.validate(nb)
    nbformat.write(nb, str(path))
    return path


if __name__ == "__main__":
    print(build(Path(__file__).with_name("05_compare.ipynb")))
