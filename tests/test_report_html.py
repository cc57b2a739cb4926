"""report.html: a real fit run writes it with predictions_val.csv; ``visiontune report`` rebuilds it; headless
Chromium renders it (no console errors, images present, sorting works, the screenshot is not blank)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from visiontune.cli import main

FIT = [
    "fit", "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.limit_train_batches=2",
    "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--model.backbone=test_efficientnet",
    "--model.weights=null", "--data.train=digits", "--data.image_size=32", "--data.batch_size=64",
    "--data.num_workers=0", "--data.hflip=false", "--report.gallery_cap=20", "--save_delta.enabled=false",
]
CAP = 20


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One real 2-step fit on digits at 32 px (tiny random-init timm model); its run directory."""
    root = tmp_path_factory.mktemp("report_run")
    old = os.getcwd()
    os.chdir(root)
    try:
        main(FIT)
    finally:
        os.chdir(old)
    return root / "runs" / "visiontune" / "version_0"


def _predictions(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "predictions_val.csv").open()))


def _gallery(html: str) -> list[tuple[str, str, str]]:
    """(true, pred, img src) of every gallery figure holding an image."""
    return re.findall(r'<figure class="miss" data-index="\d+" data-true="([^"]*)" data-pred="([^"]*)">'
                      r'<img class="thumb" alt="[^"]*" src="([^"]+)"', html)


def test_predictions_val_csv_maps_every_val_image_to_its_file_and_label(run):
    from sklearn.datasets import load_digits

    rows = _predictions(run)
    split = json.loads((run / "split.json").read_text())
    assert [r["path"] for r in rows] == split["val"]  # dataset order, one row per val image
    assert [int(r["index"]) for r in rows] == list(range(len(split["val"])))
    target = load_digits().target
    assert [int(r["true"]) for r in rows] == [int(target[int(p[7:-1])]) for p in split["val"]]  # digits[k]
    assert all(0.0 < float(r["confidence"]) <= 1.0 for r in rows)
    confusion = np.loadtxt(run / "confusion_matrix_val.csv", delimiter=",", dtype=int)
    counted = np.zeros_like(confusion)
    for r in rows:
        counted[int(r["true"]), int(r["pred"])] += 1
    np.testing.assert_array_equal(counted, confusion)  # the same predictions as the metrics


def test_fit_writes_a_self_contained_report(run):
    html = (run / "report.html").read_text()
    names = json.loads((run / "class_names.json").read_text())
    table = re.search(r'<table id="per-class-val">.*?</table>', html, re.S).group(0)
    assert [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<tr><td>(.*?)</td>", table)] == names
    assert 'alt="val confusion matrix" src="data:image/png;base64,' in html
    assert 'alt="learning curves: loss, accuracy, learning rate per step" src="data:image/png;base64,' in html
    assert '<table id="confused-val">' in html and "majority class" in html  # no baseline: said as such
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', html, re.I)
    assert "http://" not in html and "https://" not in html
    rows = _predictions(run)
    wrong = sorted((r for r in rows if r["true"] != r["pred"]), key=lambda r: (-float(r["confidence"]), int(r["index"])))
    shown = _gallery(html)
    assert len(shown) == min(len(wrong), CAP) > 0
    assert [(t, p) for t, p, _ in shown] == [(r["true"], r["pred"]) for r in wrong[:CAP]]
    assert all(src.startswith("data:image/png;base64,") for _, _, src in shown)
    assert "lr" in (run / "metrics.csv").read_text().splitlines()[0].split(",")  # LR per step, for the curves


def test_report_cli_rebuilds_it_byte_identically(run, tmp_path, capsys):
    before = (run / "report.html").read_bytes()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").read_bytes() == before
    out = tmp_path / "x.html"
    assert main(["report", str(run), "--output", str(out), "--report.gallery_cap", "1000"]) == 0
    wrong = sum(r["true"] != r["pred"] for r in _predictions(run))
    assert len(_gallery(out.read_text())) == min(wrong, 1000)  # every mistake when the cap allows


@pytest.mark.parametrize("make", ["missing", "no_metrics"])
def test_report_cli_bad_run_dir_exit_2_one_line(tmp_path, capsys, make):
    target = tmp_path / "nope"
    if make == "no_metrics":
        target.mkdir()
        (target / "metrics.csv").write_text("step\n")
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(target) in err and err.startswith("visiontune report: error:")
    assert not (target / "report.html").exists()


def test_report_cli_bad_gallery_cap_exit_2_names_the_option(run, capsys):
    assert main(["report", str(run), "--report.gallery_cap=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "visiontune report: error: report.gallery_cap must be an integer >= 0, got -1"


def test_baseline_in_metrics_json_is_the_headline_reference(run, tmp_path):
    from visiontune import build_report

    copy = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints"))
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["baseline"] = {"name": "frozen-feature logistic regression", "accuracy": 0.5, "split": "val"}
    (copy / "metrics.json").write_text(json.dumps(metrics))
    html = build_report(copy).read_text()
    points = 100 * (metrics["val_acc"] - 0.5)
    assert f"vs frozen-feature logistic regression 0.5000: " in html and f"{points:+.1f} points" in html
    assert "majority class" not in html


def test_a_failing_report_keeps_the_run_and_prints_one_warning(run, tmp_path, capsys, monkeypatch):
    import visiontune.reports.html as report_html
    from visiontune.training.report import RunReport

    copy = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "report.html"))
    files = sorted(p.name for p in copy.iterdir())

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report_html, "build_report", broken)
    trainer = type("T", (), {"loggers": []})()
    RunReport()._write_html(trainer, copy, None)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["visiontune: warning: report.html not written (RuntimeError: disk on fire)"]
    assert sorted(p.name for p in copy.iterdir()) == files


def _png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def _chromium(args: list[str], page: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", *args, page.as_uri()], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (CI installs it)")
def test_headless_chromium_renders_the_report(run, tmp_path):
    page = run / "report.html"
    # the page as it is, plus a click on the per-class "accuracy" header once it has loaded
    clicked = tmp_path / "clicked.html"
    clicked.write_text(page.read_text().replace("</body>", "<script>document.addEventListener('DOMContentLoaded', "
                       "function () { document.querySelectorAll('#per-class-val th')[3].click(); });</script></body>"))
    dom = _chromium(["--dump-dom"], clicked)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln] == []
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert "data-js-error" not in body and re.search(r'data-sortable-ready="[1-9]', body)  # the script ran
    assert len(re.findall(r'<img class="thumb"', dom.stdout)) == len(_gallery(page.read_text())) > 0
    assert len(re.findall(r'<img class="plot"', dom.stdout)) >= 2  # confusion matrix, learning curves
    table = re.search(r'<table id="per-class-val">.*?</table>', dom.stdout, re.S).group(0)
    accs = [float(v) for v in re.findall(r'<td class="n" data-v="([0-9.]+)"', table)]
    assert len(accs) == 10 and accs == sorted(accs) and accs != sorted(accs, reverse=True)  # sorted by the click
    assert 'aria-sort="ascending"' in table

    shot = tmp_path / "shot.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars"], page)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln] == []
    pixels = _png_pixels(shot.read_bytes())
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not blank, not one colour


def test_compare_writes_a_leaderboard_page_linking_each_run_report(tmp_path, monkeypatch):
    import visiontune.comparison.api as cmp

    def fake_run(spec, seed, settings, run_dir):  # a finished run: its report and delta in its run directory
        run_dir.mkdir(parents=True)
        (run_dir / "report.html").write_text("<html></html>")
        (run_dir / "delta.safetensors").write_bytes(b"x" * 2048)
        acc = {"linear": 0.5, "bitfit": 0.75}[spec.label]
        return {"label": spec.label, "seed": seed, "split": "val", "accuracy": acc, "macro_f1": acc - 0.1,
                "trainable_params": {"linear": 1539, "bitfit": 9000}[spec.label], "trainable_fraction": 0.01,
                "delta_bytes": 2048, "peak_mem_mb": 10.0, "train_seconds": 1.0, "latency_ms": 2.0, "epochs": 1,
                "delta": str(run_dir / "delta.safetensors")}

    monkeypatch.setattr(cmp, "run_one", fake_run)
    data = {"train": (np.zeros((12, 8, 8, 3), np.uint8), np.arange(12) % 3), "image_size": 32, "num_workers": 0}
    result = cmp.compare(data, ["linear", "bitfit"], output=tmp_path / "cmp", backbone="resnet18", weights=None,
                         max_epochs=1, verbose=False)
    html = (tmp_path / "cmp" / "leaderboard.html").read_text()
    table = re.search(r'<table id="leaderboard-table">.*?</table>', html, re.S).group(0)
    assert re.findall(r'<a href="([^"]+)">([^<]+)</a>', table) == [
        ("runs/bitfit/seed0/report.html", "bitfit"), ("runs/linear/seed0/report.html", "linear")]  # best first
    assert [r["strategy"] for r in result.rows] == ["bitfit", "linear"]
    assert 'alt="accuracy vs trainable parameters" src="data:image/png;base64,' in html
    assert "http://" not in html and "https://" not in html
