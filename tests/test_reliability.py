"""Bad inputs → clear outcomes: dataset structure, unreadable images (error / skip), configs, checkpoints.

Each case is a row of the table in docs/reliability.md.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reliability_helpers as h
from conftest import make_folder
from visiontune import BadImageError, DataError, ImageDataModule, TransferClassifier
from visiontune.training.checkpoint import AtomicCheckpointIO, CheckpointMismatchError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- helpers
def _truncated_png(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _plant_bad_images(root: Path) -> dict[str, str]:
    """Three kinds of unreadable file in a class folder → expected reason fragments."""
    (root / "red" / "empty.png").write_bytes(b"")
    (root / "green" / "notes.jpg").write_text("not an image at all")
    _truncated_png(root / "blue" / "cut.png")
    return {"empty.png": "empty file", "notes.jpg": "not an image", "cut.png": "truncated"}


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    return path


class _Planted:
    """Unpickling calls open(marker, "w"): stands in for any code a malicious pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------- dataset structure
def _case_empty_class(tmp: Path) -> dict:
    root = make_folder(tmp / "train", per_class=3)
    (root / "purple").mkdir()
    (root / "orange").mkdir()
    (root / "orange" / "readme.txt").write_text("no images here")
    return {"train": str(root)}


def _case_csv_missing_and_empty(tmp: Path) -> dict:
    make_folder(tmp / "imgs", per_class=2)
    return {"train": str(_csv(tmp / "train.csv", [("imgs/red/0.png", "red"), ("imgs/red/gone.png", "red"),
                                                  ("imgs/blue/0.png", ""), ("nowhere/x.jpg", "blue")]))}


def _case_label_not_in_class_list(tmp: Path) -> dict:
    make_folder(tmp / "imgs", per_class=2)
    rows = [(f"imgs/{c}/{i}.png", c) for c in ("red", "green") for i in range(2)] + [("imgs/blue/0.png", "bleu")]
    return {"train": str(_csv(tmp / "train.csv", rows)), "classes": ["red", "green", "blue"]}


def _case_too_few_for_labels_per_class(tmp: Path) -> dict:
    root = make_folder(tmp / "train", per_class=4)
    return {"train": str(root), "labels_per_class": 5, "val_split": 0.0}


def _case_val_test_classes_unseen(tmp: Path) -> dict:
    train = make_folder(tmp / "train", per_class=3)
    val = make_folder(tmp / "val", per_class=2, classes={"red": (255, 0, 0), "pink": (255, 100, 200)})
    test = make_folder(tmp / "test", per_class=1, classes={"teal": (0, 128, 128)})
    return {"train": str(train), "val": str(val), "test": str(test)}


def _case_all_at_once(tmp: Path) -> dict:
    """Problems in train, val and test together: one error lists all of them."""
    train = make_folder(tmp / "train", per_class=3)
    (train / "purple").mkdir()
    val = make_folder(tmp / "val", per_class=1, classes={"pink": (255, 100, 200)})
    test = _csv(tmp / "test.csv", [("missing.png", "red")])
    return {"train": str(train), "val": str(val), "test": str(test)}


STRUCTURE_CASES = {
    "empty class folder (and one with only a .txt)": (_case_empty_class, ["purple has no images",
                                                                           "orange has no images"]),
    "CSV rows: missing files, empty label": (_case_csv_missing_and_empty,
                                             ["train.csv:3: file not found", "gone.png", "train.csv:4: empty label",
                                              "train.csv:5: file not found", "x.jpg"]),
    "label not in the class list": (_case_label_not_in_class_list, ["label 'bleu' is not in the class list",
                                                                    "blue/0.png"]),
    "fewer images than labels_per_class": (_case_too_few_for_labels_per_class,
                                           ["'blue' has 4 training images, fewer than labels_per_class=5",
                                            "'green' has 4", "'red' has 4"]),
    "val/test classes unseen in train": (_case_val_test_classes_unseen,
                                         ["val: class 'pink' does not occur in the training data",
                                          "test: class 'teal' does not occur", "pink/0.png"]),
    "train + val + test problems in one error": (_case_all_at_once,
                                                 ["3 problems", "purple has no images", "'pink'",
                                                  "test: ", "missing.png"]),
}


@pytest.mark.parametrize("case", list(STRUCTURE_CASES))
def test_structure_problems_listed_before_training(tmp_path, case):
    build, expected = STRUCTURE_CASES[case]
    dm = ImageDataModule(image_size=16, num_workers=0, **build(tmp_path))
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    text = str(err.value)
    for fragment in expected:
        assert fragment in text, (fragment, text)


def test_hidden_folders_are_ignored(tmp_path):
    root = make_folder(tmp_path / "train", per_class=3)
    for hidden in (".git/objects", ".ipynb_checkpoints", "red/.ipynb_checkpoints", "__MACOSX/red"):
        (root / hidden).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / "red" / ".ipynb_checkpoints" / "0-checkpoint.png")
    Image.new("RGB", (8, 8)).save(root / ".git" / "objects" / "x.png")
    dm = ImageDataModule(train=str(root), image_size=16, val_split=0, num_workers=0)
    dm.setup("fit")
    assert dm.class_names == ["blue", "green", "red"]
    assert len(dm.train_set) == 9 and not any("checkpoint" in p or ".git" in p for p in dm.split["train"])


def test_class_list_fixes_label_order_and_allows_absent_val_classes(tmp_path):
    train = make_folder(tmp_path / "train", per_class=2)
    val = make_folder(tmp_path / "val", per_class=1, classes={"red": (255, 0, 0)})
    dm = ImageDataModule(train=str(train), val=str(val), classes=["red", "green", "blue"], image_size=16,
                         num_workers=0)
    dm.setup("fit")
    assert dm.class_names == ["red", "green", "blue"]
    assert dm.val_set.samples.labels.tolist() == [0]


# ------------------------------------------------------------------------------------ bad images
def test_skip_drops_bad_images_and_writes_report_to_run_dir(tmp_path):
    root = make_folder(tmp_path / "train", per_class=8)
    reasons = _plant_bad_images(root)
    val = make_folder(tmp_path / "val", per_class=1)
    (val / "red" / "zero.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="dropped 3 of 27 train images"):
        model, trainer = h.fit(root, tmp_path / "run", "linear", epochs=1,
                               dm_kw={"on_bad_image": "skip", "val": str(val)})
    dm = trainer.datamodule
    assert len(dm.train_set) == 24 and len(dm.val_set) == 3
    report = json.loads((Path(trainer.log_dir) / "bad_images.json").read_text())
    assert report == dm.bad_image_report
    assert report["checked"] == 27 + 4 and report["dropped"] == 4
    by_name = {Path(b["path"]).name: b for b in report["bad"]}
    for name, reason in reasons.items():
        assert reason in by_name[name]["reason"] and by_name[name]["split"] == "train"
    assert by_name["zero.jpg"] == {"split": "val", "path": str(val / "red" / "zero.jpg"), "reason": "empty file"}


def test_skip_class_with_no_readable_image_is_a_structure_error(tmp_path):
    root = make_folder(tmp_path / "train", per_class=2)
    for p in (root / "red").iterdir():
        p.write_bytes(b"")
    dm = ImageDataModule(train=str(root), image_size=16, on_bad_image="skip", num_workers=0)
    with pytest.raises(DataError, match="class 'red' has no readable images"):
        dm.setup("fit")


def test_skip_unlabeled_and_predict_pools(tmp_path):
    train = make_folder(tmp_path / "train", per_class=2)
    pool = make_folder(tmp_path / "pool", per_class=2)
    (pool / "red" / "bad.png").write_bytes(b"\x89PNG garbage")
    dm = ImageDataModule(train=str(train), unlabeled=str(pool), predict=str(pool), image_size=16, val_split=0,
                         on_bad_image="skip", num_workers=0)
    dm.setup(None)
    assert len(dm.unlabeled_set) == 6 and len(dm.predict_set) == 6
    assert sorted(b["split"] for b in dm.bad_image_report["bad"]) == ["predict", "unlabeled"]


def _truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _plant_strict_mode_failures(root: Path) -> dict[str, str]:
    """Issue #11, 6: a truncated JPEG, a zero-byte file, a text file named .jpg and a decompression bomb."""
    _truncated_jpeg(root / "red" / "cut.jpg")
    (root / "red" / "zero.jpg").write_bytes(b"")
    (root / "green" / "notes.jpg").write_text("not an image at all")
    Image.new("1", (9500, 9500)).save(root / "blue" / "bomb.png")  # 11 KB, 90 MP > max_pixels (89.5 MP)
    return {"red/cut.jpg": "truncated image data", "red/zero.jpg": "empty file",
            "green/notes.jpg": "not an image (unrecognised or unsupported format)",
            "blue/bomb.png": "image is 9500x9500 = 90250000 pixels, exceeds max_pixels=89478485"}


def test_error_policy_lists_every_bad_file_of_every_split_at_setup(tmp_path):
    root = make_folder(tmp_path / "train", per_class=3, ext=".jpg")
    expected = _plant_strict_mode_failures(root)
    val = make_folder(tmp_path / "val", per_class=1)
    (val / "red" / "v.png").write_bytes(b"\x89PNG garbage")
    pool = make_folder(tmp_path / "pool", per_class=1)
    _truncated_png(pool / "green" / "p.png")
    dm = ImageDataModule(train=str(root), val=str(val), unlabeled=str(pool), image_size=16, num_workers=0)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert str(err.value).startswith("6 problems:\n"), str(err.value)
    found = {}  # "<split>: unreadable image <path>: <reason>"
    for line in err.value.problems:
        split, rest = line.split(": unreadable image ", 1)
        path, reason = rest.split(": ", 1)
        found[Path(path).name] = (split, path, reason)
    assert sorted(found) == sorted([*(Path(rel).name for rel in expected), "v.png", "p.png"])
    for rel, reason in expected.items():
        split, path, why = found[Path(rel).name]
        assert (split, path) == ("train", str(root / rel)) and why.startswith(reason), found[Path(rel).name]
    assert found["v.png"] == ("val", str(val / "red" / "v.png"), "not an image (unrecognised or unsupported format)")
    assert found["p.png"][:2] == ("unlabeled", str(pool / "green" / "p.png")) and "truncated" in found["p.png"][2]
    assert dm.train_set is None  # nothing to train on


@pytest.mark.parametrize("num_workers", [0, 2])
def test_error_policy_names_a_file_broken_after_setup_when_loading(tmp_path, num_workers):
    root = make_folder(tmp_path / "train", per_class=2)
    # without the decoded-image cache (with it, setup decodes every file once and later reads never touch them)
    dm = ImageDataModule(train=str(root), image_size=16, batch_size=8, val_split=0, num_workers=num_workers,
                         cache_images=False)
    dm.setup("fit")  # the setup scan passes; full decoding happens on demand
    assert len(dm.train_set) == 6
    (root / "red" / "0.png").write_bytes(b"")  # damaged after the scan: still named when it is read
    with pytest.raises((BadImageError, RuntimeError)) as err:  # from a worker: re-raised with its message
        for _ in dm.train_dataloader():
            pass
    assert f"bad image '{root / 'red' / '0.png'}': empty file" in str(err.value)


def test_on_bad_image_value_is_checked():
    with pytest.raises(DataError, match="on_bad_image must be 'error' or 'skip', got 'ignore'"):
        ImageDataModule(train="digits", on_bad_image="ignore")


# -------------------------------------------------------------------------------------- configs
PY_CONFIG_CASES = [
    (lambda: TransferClassifier("resnet18", weights=None, num_classes=2, strategy="nope"),
     ["Unknown strategy 'nope'", "Available strategies:", "lora"]),
    (lambda: TransferClassifier("resnet18", weights=None, num_classes=2, strategy="lora",
                                strategy_args={"rnak": 4}), ["Unknown option(s) ['rnak']", "Valid options:", "rank"]),
    (lambda: TransferClassifier("resnet18", weights=None, num_classes=2, strategy="lora",
                                strategy_args={"rank": 0}), ["'rank'", "integer > 0", "got 0"]),
    (lambda: TransferClassifier("resnet18", weights=None, num_classes=2, strategy="lora",
                                strategy_args={"rank": "8"}), ["'rank'", "integer > 0", "got '8'"]),
    (lambda: TransferClassifier("resnet18", weights=None, num_classes=2, lr="fast"), ["model.lr must be a number"]),
    (lambda: TransferClassifier("resnet18", weights=None, num_classes=2, lr=0), ["model.lr must be a number > 0 or null"]),
    (lambda: TransferClassifier("resnet18", weights=None, num_classes=2, bn="sometimes"),
     ["model.bn", "'frozen', 'eval' or 'train'"]),
    (lambda: TransferClassifier("resnet_nope", weights=None, num_classes=2), ["unknown timm model 'resnet_nope'"]),
    (lambda: TransferClassifier("resnet18", weights=None, num_classes=2, semi_supervised={"threshold": 1.5}),
     ["threshold", "(0, 1)", "1.5"]),
    (lambda: TransferClassifier("resnet18", weights=None, num_classes=2, semi_supervised={"threshold": 0.0}),
     ["threshold", "(0, 1)"]),
    (lambda: TransferClassifier("resnet18", weights=None, num_classes=2, semi_supervised={"mu": 0}),
     ["mu", ">= 1"]),
    (lambda: ImageDataModule(train="digits", image_size=0), ["image_size must be a positive integer, got 0"]),
    (lambda: ImageDataModule(train="digits", image_size="32"), ["image_size must be a positive integer"]),
    (lambda: ImageDataModule(train="digits", unlabeled_ratio=0), ["unlabeled_ratio (mu) must be >= 1"]),
    (lambda: ImageDataModule(train="digits", val_split=1.0), ["val_split must be in [0, 1)"]),
]


@pytest.mark.parametrize("i", range(len(PY_CONFIG_CASES)))
def test_python_api_rejects_bad_config_naming_the_option(i):
    make, expected = PY_CONFIG_CASES[i]
    with pytest.raises(ValueError) as err:  # DataError, StrategyError, BackboneError are ValueErrors
        make()
    for fragment in expected:
        assert fragment in str(err.value), (fragment, str(err.value))


_CLI_BASE = ["fit", "--model.backbone", "resnet18", "--model.weights", "null", "--data.train", "digits",
             "--trainer.max_epochs", "1", "--trainer.logger", "false"]
CLI_CONFIG_CASES = {
    "unknown strategy": (["--model.strategy", "nope"], ["Unknown strategy 'nope'", "Available strategies", "lora"]),
    "unknown strategy option": (["--model.strategy", "lora", "--model.strategy_args", "{rnak: 4}"],
                                ["['rnak']", "Valid options", "rank"]),
    "rank <= 0": (["--model.strategy", "lora", "--model.strategy_args", "{rank: 0}"], ["'rank'", "> 0"]),
    "image size not positive": (["--data.image_size", "0"], ["image_size must be a positive integer"]),
    "image size wrong type": (["--data.image_size", "abc"], ["data.image_size", "abc"]),
    "threshold outside (0, 1)": (["--model.semi_supervised", "{threshold: 1.5}"], ["threshold", "(0, 1)"]),
    "mu < 1 (FixMatch)": (["--model.semi_supervised", "{mu: 0}"], ["mu", ">= 1"]),
    "mu < 1 (data.unlabeled_ratio)": (["--data.unlabeled_ratio", "0"], ["unlabeled_ratio (mu) must be >= 1"]),
    "unknown option name": (["--model.rnak", "3"], ["unrecognized arguments: --model.rnak"]),
    "value outside a choice": (["--model.bn", "sometimes"], ["model.bn", "'frozen', 'eval', 'train'"]),
    "on_bad_image outside its choice": (["--data.on_bad_image", "ignore"], ["data.on_bad_image", "'error', 'skip'"]),
    "lr wrong type": (["--model.lr", "fast"], ["model.lr", "fast"]),
    "layer_decay out of range": (["--model.layer_decay", "1.5"], ["model.layer_decay must be in (0, 1]"]),
}


@pytest.mark.parametrize("case", list(CLI_CONFIG_CASES))
def test_cli_rejects_bad_config_before_training(case, tmp_path, monkeypatch):
    from visiontune.cli import main

    args, expected = CLI_CONFIG_CASES[case]
    monkeypatch.chdir(tmp_path)
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(_CLI_BASE + args)
    assert exit_info.value.code == 2
    text = err.getvalue() + out.getvalue()
    for fragment in expected:
        assert fragment in text, (fragment, text[-2000:])
    assert not (tmp_path / "runs").exists() and not list(tmp_path.rglob("*.ckpt"))  # nothing trained


def test_cli_subprocess_bad_yaml_exit_code_and_message(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  backbone: resnet18\n  weights: null\n  strategy: lora\n"
                   "  strategy_args: {rank: -2}\ndata:\n  train: digits\n")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [str(Path(sys.executable).parent / "visiontune"), "fit", "--config", str(cfg)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "invalid configuration: option 'rank' of strategy 'lora' must be an integer > 0, got -2" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    data = make_folder(tmp / "data", per_class=4)
    model, trainer = h.fit(data, tmp / "run", "full", epochs=1)
    return data, Path(trainer.checkpoint_callback.last_model_path), model


def test_no_unsafe_torch_load_in_the_package():
    """Every torch.load in visiontune passes weights_only=True; the only weights_only=False is the explicit
    opt-out that AtomicCheckpointIO forwards (Trainer.fit(..., weights_only=False), a user's choice)."""
    loads, opt_outs = [], []
    for path in sorted((REPO / "visiontune").rglob("*.py")):
        text = path.read_text()
        loads += [(path.name, c) for c in re.findall(r"torch\.load\([^)]*\)", text)]
        opt_outs += [path.name for line in text.splitlines() if "weights_only=False" in line
                     and not line.lstrip().startswith(("#", "if "))]
    assert len(loads) >= 3
    assert [c for c in loads if "weights_only=True" not in c[1]] == []
    assert opt_outs == ["checkpoint.py"]


def _evil_copy(ckpt: Path, tmp: Path, marker: Path) -> Path:
    state = torch.load(ckpt, weights_only=True)
    state["payload"] = _Planted(marker)
    evil = tmp / "evil.ckpt"
    torch.save(state, evil)
    return evil


def _loaders(evil: Path):
    from visiontune.models.backbones import create_backbone, load_state_dict_file
    from visiontune.io import safe_torch_load

    return {
        "TransferClassifier.load": lambda: TransferClassifier.load(str(evil)),
        "safe_torch_load": lambda: safe_torch_load(evil),
        "AtomicCheckpointIO.load_checkpoint": lambda: AtomicCheckpointIO().load_checkpoint(evil),
        "backbones.load_state_dict_file": lambda: load_state_dict_file(evil),
        "create_backbone(weights=file)": lambda: create_backbone("resnet18", weights=str(evil.with_suffix(".pth"))),
    }


@pytest.mark.parametrize("how", ["TransferClassifier.load", "safe_torch_load", "AtomicCheckpointIO.load_checkpoint",
                                 "backbones.load_state_dict_file", "create_backbone(weights=file)"])
def test_planted_pickle_is_refused_and_never_runs(trained, tmp_path, how):
    _, ckpt, _ = trained
    marker = tmp_path / "pwned"
    evil = _evil_copy(ckpt, tmp_path, marker)
    evil.with_suffix(".pth").write_bytes(evil.read_bytes())
    from visiontune.models.backbones import BackboneError
    from visiontune.errors import CheckpointError

    kind = BackboneError if how.startswith(("backbones.", "create_backbone")) else CheckpointError
    with pytest.raises(kind) as err:
        _loaders(evil)[how]()
    text = str(err.value)
    assert str(evil.with_suffix(".pth") if how.startswith("create_backbone") else evil) in text, text[:500]
    pattern = r"Refusing to load .*: it is not a plain tensor file \(UnpicklingError" if kind is BackboneError else \
        r"refusing to unpickle arbitrary objects \(torch.load with weights_only=True rejected it"
    assert re.search(pattern, text), text[:500]
    assert not marker.exists()


def test_resume_from_planted_checkpoint_is_refused(trained, tmp_path):
    data, ckpt, _ = trained
    marker = tmp_path / "pwned"
    evil = _evil_copy(ckpt, tmp_path, marker)
    from visiontune.errors import CheckpointError

    with pytest.raises(CheckpointError, match=re.escape(f"'{evil}': refusing to unpickle arbitrary objects")):
        h.fit(data, tmp_path / "run", "full", epochs=2, ckpt_path=str(evil))
    assert not marker.exists()


def test_cli_resume_from_planted_checkpoint_is_refused(trained, tmp_path, monkeypatch):
    from visiontune.cli import main

    data, ckpt, _ = trained
    marker = tmp_path / "pwned"
    evil = _evil_copy(ckpt, tmp_path, marker)
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.backbone", "resnet18", "--data.train", str(data), "--data.image_size", "32",
              "--trainer.max_epochs", "2", "--ckpt_path", str(evil)])
    assert exit_info.value.code == 2
    assert f"visiontune fit: error: '{evil}': refusing to unpickle arbitrary objects" in err.getvalue()
    assert "Traceback" not in err.getvalue()
    assert not marker.exists()


def test_mismatching_model_names_keys_and_shapes(trained, tmp_path):
    _, ckpt, _ = trained
    with pytest.raises(CheckpointMismatchError) as err:  # other backbone
        TransferClassifier.load(str(ckpt), backbone="resnet34")
    assert "backbone resnet18" in str(err.value) and "backbone resnet34" in str(err.value)
    assert "missing from the checkpoint: net.layer1.2.conv1.weight" in str(err.value)
    with pytest.raises(CheckpointMismatchError) as err:  # other class count
        TransferClassifier.load(str(ckpt), num_classes=5, class_names=list("abcde"))
    assert "shape mismatch: net.fc.weight: checkpoint (3, 512) vs model (5, 512)" in str(err.value)
    with pytest.raises(CheckpointMismatchError) as err:  # other strategy: the model has extra LoRA tensors
        TransferClassifier.load(str(ckpt), strategy="lora", strategy_args={"rank": 2})
    assert re.search(r"missing from the checkpoint: net\.\S+\.lora_A", str(err.value))
    # a checkpoint with a missing and an extra key
    state = torch.load(ckpt, weights_only=True)
    del state["state_dict"]["net.layer4.1.bn2.running_var"]
    state["state_dict"]["net.extra.weight"] = torch.zeros(2)
    edited = tmp_path / "edited.ckpt"
    torch.save(state, edited)
    with pytest.raises(CheckpointMismatchError) as err:
        TransferClassifier.load(str(edited))
    assert "missing from the checkpoint: net.layer4.1.bn2.running_var" in str(err.value)
    assert "unexpected in the checkpoint: net.extra.weight" in str(err.value)
    # and the matching case still loads, with equal weights
    loaded = TransferClassifier.load(str(ckpt))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained[2].state_dict().values()))


def test_resume_into_model_with_other_class_count_fails_naming_shapes(trained, tmp_path):
    _, ckpt, _ = trained
    data5 = make_folder(tmp_path / "five", per_class=4, classes={"a": (0, 0, 0), "b": (50, 50, 50),
                                                                 "c": (100, 100, 100), "d": (150, 150, 150),
                                                                 "e": (200, 200, 200)})
    with pytest.raises(CheckpointMismatchError, match=r"net\.fc\.weight: checkpoint \(3, 512\) vs model \(5, 512\)"):
        h.fit(data5, tmp_path / "run", "full", epochs=2, ckpt_path=str(ckpt))


def test_atomic_checkpoint_io_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def half_then_crash(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="No space left"):
        io_.save_checkpoint({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_sigkill_while_saving_checkpoints_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "last.ckpt"
    code = ("import torch, itertools\nfrom visiontune.training.checkpoint import AtomicCheckpointIO\nio = AtomicCheckpointIO()\n"
            f"for i in itertools.count():\n    io.save_checkpoint({{'i': i, 'w': torch.full((3_000_000,), float(i))}}, "
            f"{str(path)!r})\n    print(i, flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # a few complete saves, then kill in the middle of writing the next ones
            proc.stdout.readline()
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    state = AtomicCheckpointIO().load_checkpoint(path)
    assert torch.all(state["w"] == state["i"])  # a complete checkpoint, never a torn one


def test_cli_uses_atomic_checkpoint_io(tmp_path, monkeypatch):
    from visiontune.cli import VisionTuneCLI

    monkeypatch.chdir(tmp_path)
    with redirect_stdout(io.StringIO()):
        cli = VisionTuneCLI(args=["--model.backbone", "resnet18", "--model.weights", "null", "--data.train",
                                  "digits", "--trainer.logger", "false"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
