"""``visiontune check-data``: structure + every image, one report, exit code 1 on any problem."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import make_folder
from visiontune.data.checks import check_data
from visiontune.cli import main


def _run(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["check-data", *args])
    return code, out.getvalue() + err.getvalue()


def _messy(tmp: Path) -> dict[str, Path]:
    """A dataset with one of everything that can go wrong."""
    train = make_folder(tmp / "train", per_class=4)
    (train / "purple").mkdir()  # empty class folder
    (train / ".git" / "objects").mkdir(parents=True)  # hidden: ignored
    (train / ".ipynb_checkpoints").mkdir()
    (train / "red" / "empty.png").write_bytes(b"")
    (train / "green" / "notes.jpg").write_text("hello")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    (train / "blue" / "cut.png").write_bytes(buf.getvalue()[:300])
    val = make_folder(tmp / "val", per_class=1, classes={"red": (255, 0, 0), "pink": (255, 100, 200)})
    test = tmp / "test.csv"
    test.write_text(f"path,label\n{train / 'red' / '0.png'},red\nmissing.png,red\n{train / 'blue' / '0.png'},\n")
    return {"train": train, "val": val, "test": test}


def test_clean_dataset_exit_0_with_counts_per_class(tmp_path):
    train = make_folder(tmp_path / "train", per_class=5)
    code, text = _run("--data.train", str(train), "--data.val_split", "0.2")
    assert code == 0, text
    assert "checked 15 image files: 15 ok, 0 bad" in text and text.rstrip().endswith("OK")
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.split()}
    assert rows["class"] == ["train", "val"]
    assert rows["red"] == ["4", "1"] and rows["total"] == ["12", "3"]


def test_every_problem_of_every_split_listed_exit_1(tmp_path):
    paths = _messy(tmp_path)
    report_file = tmp_path / "report.json"
    code, text = _run("--data.train", str(paths["train"]), "--data.val", str(paths["val"]),
                      "--data.test", str(paths["test"]), "--json", str(report_file))
    assert code == 1 and text.rstrip().endswith("FAILED")
    report = json.loads(report_file.read_text())
    problems = "\n".join(report["problems"])
    assert "purple has no images" in problems
    assert "val: class 'pink' does not occur in the training data" in problems
    assert "test.csv:3: file not found" in problems and "test.csv:4: empty label" in problems
    bad = {Path(b["path"]).name: b["reason"] for b in report["bad_images"]}
    assert set(bad) == {"empty.png", "notes.jpg", "cut.png"}  # found despite the structure errors
    assert bad["empty.png"] == "empty file" and "not an image" in bad["notes.jpg"] and "truncated" in bad["cut.png"]
    for name in ("purple", "pink", "empty.png", "notes.jpg", "cut.png", "missing.png"):
        assert name in text
    assert ".git" not in text and "ipynb" not in text


def test_labels_per_class_and_class_list(tmp_path):
    train = make_folder(tmp_path / "train", per_class=3)
    code, text = _run("--data.train", str(train), "--data.labels_per_class", "3", "--data.classes", "[red, green]")
    assert code == 1
    assert "label 'blue' is not in the class list ['red', 'green']" in text
    code, text = _run("--data.train", str(train), "--data.labels_per_class", "3")  # val split leaves 2 per class
    assert code == 1 and "fewer than labels_per_class=3" in text


def test_reads_the_data_section_of_a_training_config(tmp_path):
    train = make_folder(tmp_path / "train", per_class=3)
    (train / "red" / "bad.png").write_bytes(b"")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model:\n  backbone: resnet18\ndata:\n  train: {train}\n  batch_size: 4\n  val_split: 0.0\n")
    code, text = _run("--config", str(cfg))
    assert code == 1 and "bad.png: empty file" in text
    code, text = _run("--config", str(cfg), "--data.train", str(make_folder(tmp_path / "ok", per_class=2)))
    assert code == 0  # flags override the config


def test_python_api_and_arrays(tmp_path):
    report = check_data(train="digits", labels_per_class=5)
    assert report["ok"] and report["images_checked"] == 0  # arrays: nothing to decode
    assert sum(report["counts"]["train"].values()) == 50


def test_bad_arguments_exit_2():
    code, text = _run()
    assert code == 2 and "--data.train" in text


def test_command_line_exit_code(tmp_path):
    paths = _messy(tmp_path)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [str(Path(sys.executable).parent / "visiontune"), "check-data", "--data.train", str(paths["train"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 1 and "purple has no images" in proc.stdout and "cut.png" in proc.stdout
