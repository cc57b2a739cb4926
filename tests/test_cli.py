"""CLI round trips through ``visiontune.cli.main`` (in-process: same code path as the console script)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_folder
from visiontune.cli import main

TINY = [
    "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.limit_train_batches=2",
    "--trainer.enable_progress_bar=false", "--model.backbone=resnet18", "--model.weights=null",
    "--data.image_size=32", "--data.batch_size=4", "--data.num_workers=0",
]


def _run_dir(out: str) -> Path:
    line = [ln for ln in out.splitlines() if ln.startswith("visiontune run directory:")][-1]
    return Path(line.split(":", 1)[1].strip())


def test_print_config_then_fit_on_printed_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_folder(tmp_path / "imgs", per_class=5)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, f"--data.train={data}", "--model.strategy=last_k",
              "--model.strategy_args={k: 2}", "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(printed)
    assert cfg["model"]["strategy"] == "last_k" and cfg["model"]["strategy_args"] == {"k": 2}
    assert cfg["data"]["train"] == str(data)
    (tmp_path / "cfg.yaml").write_text(printed)
    main(["fit", "--config", str(tmp_path / "cfg.yaml")])
    out = capsys.readouterr().out
    run = _run_dir(out)
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val_acc", "val_macro_f1", "trainable_params", "total_params"} <= set(metrics)
    assert json.loads((run / "class_names.json").read_text()) == ["blue", "green", "red"]
    split = json.loads((run / "split.json").read_text())
    assert set(split) == {"train", "val"} and len(split["train"]) + len(split["val"]) == 15
    assert (run / "confusion_matrix_val.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()

    # predict with the checkpoint: class count and names come from the checkpoint, not the data
    pred_dir = make_folder(tmp_path / "new", per_class=2, classes={"x": (200, 30, 30), "y": (30, 30, 200)})
    out_csv = tmp_path / "preds.csv"
    main(["predict", *TINY[:2], "--trainer.enable_progress_bar=false", "--model.backbone=resnet18",
          "--data.image_size=32", "--data.num_workers=0", f"--data.predict={pred_dir}",
          f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"--predictions.output={out_csv}"])
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 4 and set(rows[0]) == {"path", "label", "score"}
    assert {r["label"] for r in rows} <= {"blue", "green", "red"}
    assert all(0 <= float(r["score"]) <= 1 for r in rows)


def test_bad_option_names_the_option(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((SystemExit, ValueError)) as err:
        main(["fit", *TINY, "--data.train=digits", "--model.strategy=lorra"])
    text = str(err.value) + capsys.readouterr().err
    assert "lorra" in text and "Available strategies" in text


def _user_error(tmp_path, capsys, argv) -> str:
    """Run ``main(argv)``: a user error is exit code 2 with one message on stderr, no traceback, nothing trained."""
    import logging

    # Lightning's log handler may hold the stderr of an earlier test: its "--- Logging error ---" traceback is
    # about pytest's capturing, not about the command
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as exit_:
        mp.setattr(logging, "raiseExceptions", False)
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-2000:]
    assert "Traceback" not in err
    assert not [p for p in tmp_path.rglob("*.ckpt") if p.parent.name == "checkpoints"]  # nothing trained
    return err


def _cut_checkpoint(tmp_path: Path) -> Path:
    import torch

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {"backbone": "resnet18"}}, good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:500])
    return cut


def test_user_errors_one_line_exit_2_no_traceback(tmp_path, capsys, monkeypatch):
    """Issue #11, 7: a missing folder, an empty class folder, a truncated or missing --ckpt_path."""
    monkeypatch.chdir(tmp_path)
    base = ["fit", *TINY, "--trainer.logger=false"]
    err = _user_error(tmp_path, capsys, [*base, "--data.train=/no/such/dir"])
    assert err.splitlines()[-1] == ("visiontune fit: error: train: '/no/such/dir' is not a folder, a .csv file, "
                                    "or a built-in dataset (digits)")
    one = make_folder(tmp_path / "one", per_class=2, classes={"red": (200, 0, 0)})
    (one / "empty").mkdir()
    err = _user_error(tmp_path, capsys, [*base, f"--data.train={one}"])
    assert err.splitlines()[-1] == f"visiontune fit: error: train: class folder {one / 'empty'} has no images"
    data = make_folder(tmp_path / "data", per_class=2)
    cut = _cut_checkpoint(tmp_path)
    err = _user_error(tmp_path, capsys, [*base, f"--data.train={data}", f"--ckpt_path={cut}"])
    assert err.splitlines()[-1].startswith(f"visiontune fit: error: '{cut}': not a loadable torch checkpoint (")
    err = _user_error(tmp_path, capsys, ["predict", *TINY, f"--data.predict={data}", f"--ckpt_path={cut}"])
    assert err.splitlines()[-1].startswith(f"visiontune predict: error: '{cut}': not a loadable torch checkpoint")
    missing = tmp_path / "gone.ckpt"
    err = _user_error(tmp_path, capsys, [*base, f"--data.train={data}", f"--ckpt_path={missing}"])
    assert err.splitlines()[-1] == f"visiontune fit: error: Checkpoint file not found: {missing}"


def test_every_bad_image_listed_before_training_exit_2(tmp_path, capsys, monkeypatch):
    """Issue #11, 6: under on_bad_image=error (the default) all bad files are named at setup, none trained."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    data = make_folder(tmp_path / "data", per_class=3, ext=".jpg")
    good = (data / "red" / "0.jpg").read_bytes()
    (data / "red" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (data / "red" / "zero.jpg").write_bytes(b"")
    (data / "green" / "notes.jpg").write_text("not an image")
    Image.new("1", (9500, 9500)).save(data / "blue" / "bomb.png")
    err = _user_error(tmp_path, capsys, ["fit", *TINY, "--trainer.logger=false", f"--data.train={data}"])
    lines = err.splitlines()
    start = lines.index("visiontune fit: error: 4 problems:")
    cut = lines[start + 3]
    assert lines[start + 1:] == [
        f"  - train: unreadable image {data / 'blue' / 'bomb.png'}: image is 9500x9500 = 90250000 pixels, "
        "exceeds max_pixels=89478485",
        f"  - train: unreadable image {data / 'green' / 'notes.jpg'}: not an image (unrecognised or unsupported "
        "format)",
        cut,
        f"  - train: unreadable image {data / 'red' / 'zero.jpg'}: empty file",
    ]
    assert cut.startswith(f"  - train: unreadable image {data / 'red' / 'cut.jpg'}: truncated image data ("), cut


def test_bad_config_values_are_config_errors_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _user_error(tmp_path, capsys, ["fit", *TINY, "--data.train=digits", "--model.lr=0"])
    last = err.splitlines()[-1]
    assert last.startswith("visiontune fit: error: invalid configuration: model.lr must be ") and "got 0.0" in last
    err = _user_error(tmp_path, capsys, ["fit", *TINY, "--data.train=digits", "--data.val_split=1.5"])
    assert err.splitlines()[-1] == ("visiontune fit: error: invalid configuration: ImageDataModule: val_split must "
                                    "be in [0, 1), got 1.5")


@pytest.mark.parametrize("where", ["instantiation", "setup"])
def test_a_bug_is_not_reported_as_a_user_error(tmp_path, capsys, monkeypatch, where):
    """Only the UserError family becomes exit 2: a plain ValueError/TypeError from a bug keeps its traceback."""
    import visiontune.training.module
    from visiontune.data import ImageDataModule

    def bug(*args, **kwargs):
        raise (ValueError if where == "instantiation" else TypeError)(f"a bug in {where}")

    if where == "instantiation":
        monkeypatch.setattr(visiontune.training.module, "make_strategy_config", bug)
    else:
        monkeypatch.setattr(ImageDataModule, "setup", bug)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError if where == "instantiation" else TypeError, match=f"^a bug in {where}$"):
        main(["fit", *TINY, "--trainer.logger=false", "--data.train=digits"])
    assert "error:" not in capsys.readouterr().err


def test_user_error_in_a_real_process_exit_2_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "visiontune.cli", "fit", *TINY, "--trainer.logger=false",
                           f"--data.train={tmp_path / 'nowhere'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (f"visiontune fit: error: train: '{tmp_path / 'nowhere'}' is not a "
                                            "folder, a .csv file, or a built-in dataset (digits)")
    assert "Traceback" not in proc.stderr


def test_strategies_tool_and_fast_help():
    out = subprocess.run([sys.executable, "-m", "visiontune.cli", "strategies"], capture_output=True, text=True,
                         check=True).stdout
    for name in ("full", "linear", "last_k", "bitfit"):
        assert name in out
    code = "import sys, visiontune; visiontune.main(['--help']); print(sorted(m for m in sys.modules if m.startswith('lightning'))[:1])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "visiontune fit" in out and out.strip().endswith("[]")  # --help imports no lightning


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["quickstart.yaml", "fixmatch.yaml", "new_classes.yaml"])
def test_shipped_fit_configs_parse(name):
    from visiontune.cli import cli_class

    cli = cli_class()(args=["--config", str(ROOT / "configs" / name), "--model.weights", "null"], run=False)
    hp = cli.model.hparams
    assert hp.backbone == "tf_efficientnet_lite0"
    if name != "quickstart.yaml":
        assert hp.semi_supervised["threshold"] == 0.95
    if name == "new_classes.yaml":
        assert hp.class_expansion == {"distill": 1.0, "temperature": 2.0, "freeze_old_rows": False, "replay": True,
                                      "label_pool": "new", "anchor_threshold": 0.8}
        assert hp.init_from.endswith("last.ckpt")


@pytest.mark.parametrize("value, kept", [("all", "all"), ("new", "new"), ("true", "new"), ("false", False)])
def test_label_pool_from_the_command_line(value, kept):
    from visiontune.cli import cli_class

    cli = cli_class()(args=["--config", str(ROOT / "configs" / "new_classes.yaml"), "--model.weights", "null",
                            "--model.class_expansion.label_pool", value], run=False)
    assert cli.model._expansion.cfg.label_pool == kept  # hparams keep the config's own spelling


@pytest.mark.slow
def test_new_classes_yaml_adds_a_class_to_a_cli_trained_model(tmp_path, capsys, monkeypatch):
    """The README's two commands: train on the old classes, then `fit --config configs/new_classes.yaml`."""
    monkeypatch.chdir(tmp_path)
    old = make_folder(tmp_path / "old", per_class=4, classes={"red": (220, 30, 30), "green": (30, 200, 40)})
    main(["fit", *TINY, f"--data.train={old}"])
    ckpt = _run_dir(capsys.readouterr().out) / "checkpoints" / "last.ckpt"
    new = make_folder(tmp_path / "new_species", per_class=3, classes={"blue": (30, 40, 220)})
    val = make_folder(tmp_path / "val", per_class=2)
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for p in sorted(make_folder(tmp_path / "pool", per_class=2).rglob("*.png")):
        p.rename(unlabeled / f"{p.parent.name}_{p.name}")  # no labels: a flat folder
    main(["fit", "--config", str(ROOT / "configs" / "new_classes.yaml"), *TINY, f"--model.init_from={ckpt}",
          f"--data.train={new}", f"--data.unlabeled={unlabeled}", f"--data.val={val}", "--data.batch_size=3",
          "--model.semi_supervised.mu=1", "--trainer.logger=false"])
    out = capsys.readouterr().out
    assert "adding 1 class ['blue'] to the 2 of" in out
    run = _run_dir(out)
    assert json.loads((run / "class_names.json").read_text()) == ["green", "red", "blue"]  # old (sorted) + new
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val_acc", "val_acc_old", "val_acc_new"} <= set(metrics)


def test_lightning_pin_admits_only_clis_that_read_checkpoint_hparams():
    """`predict --ckpt_path CKPT` with no config rebuilds the model from the checkpoint's hyper-parameters, which
    LightningCLI does from 2.5.5 on (``_parse_ckpt_path``, Lightning PR #21116): the pin must exclude older ones."""
    tomllib = pytest.importorskip("tomllib")
    from importlib.metadata import version

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(Requirement(d) for d in deps if Requirement(d).name == "lightning").specifier
    assert not spec.contains("2.5.4") and not spec.contains("2.4.0")
    assert spec.contains("2.5.5") and spec.contains(version("lightning"))
    from lightning.pytorch.cli import LightningCLI

    assert hasattr(LightningCLI, "_parse_ckpt_path")


@pytest.mark.parametrize("backbone,strategy", [
    ("resnet18", "lora"), ("resnet18", "sparse"), ("vit", "adapter"), ("vit", "vpt"),
])
def test_predict_from_checkpoint_alone(tmp_path, capsys, monkeypatch, backbone, strategy):
    """README: `visiontune predict --ckpt_path CKPT --data.predict photos/` with no config rebuilds the model
    (backbone, backbone_args, strategy and its options, classes) from the checkpoint: its predictions.csv is
    the checkpoint's model's own predictions (issue #11, 4)."""
    import lightning as L
    import torch

    from visiontune import ImageDataModule, TransferClassifier

    monkeypatch.chdir(tmp_path)
    data = make_folder(tmp_path / "imgs", per_class=2)
    model_args = {"resnet18": ["--model.backbone=resnet18"],
                  "vit": ["--model.backbone=vit_tiny_patch16_224",
                          "--model.backbone_args={img_size: 32, patch_size: 8, depth: 2}"]}[backbone]
    options = {"lora": "{rank: 2}", "sparse": "{fraction: 0.05}", "adapter": "{bottleneck: 4}",
               "vpt": "{length: 3}"}[strategy]
    main(["fit", *TINY, "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", *model_args,
          f"--model.strategy={strategy}", f"--model.strategy_args={options}", f"--data.train={data}",
          f"--data.val={data}", "--save_delta.enabled=false"])
    ckpt = _run_dir(capsys.readouterr().out) / "checkpoints" / "last.ckpt"
    out_csv = tmp_path / "predictions.csv"
    main(["predict", f"--ckpt_path={ckpt}", f"--data.predict={data}", "--trainer.accelerator=cpu",
          "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--data.num_workers=0",
          f"--predictions.output={out_csv}"])
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 6

    model = TransferClassifier.load(str(ckpt))
    assert model.hparams.strategy == strategy and model.hparams.backbone in model_args[0]
    dm = ImageDataModule(predict=str(data), num_workers=0)
    batches = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).predict(model, dm)
    samples = dm.predict_set.samples
    want = sorted((samples.describe(i), model.class_names[lab], score) for b in batches
                  for i, lab, score in zip(b["index"].tolist(), b["label"].tolist(), b["score"].tolist()))
    assert [(r["path"], r["label"]) for r in rows] == [(p, lab) for p, lab, _ in want]
    assert torch.allclose(torch.tensor([float(r["score"]) for r in rows]), torch.tensor([s for *_, s in want]),
                          rtol=0, atol=2e-6)
