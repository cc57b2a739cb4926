"""``visiontune compare``: leaderboard columns, CSV, PNG plot, resume, config validation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import visiontune.comparison.api as cmp
from visiontune import TransferClassifier
from visiontune.comparison.api import CSV_COLUMNS, compare, compare_main, load_compare_config, parse_strategies

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _data() -> dict:
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    images = rng.integers(0, 255, (30, 16, 16, 3), dtype=np.uint8)
    images[..., 1] = (labels[:, None, None] * 100).astype(np.uint8)
    return {"train": (images, labels), "image_size": 32, "batch_size": 8, "val_split": 0.2, "test_split": 0.2,
            "num_workers": 0, "hflip": False}


SETTINGS = dict(backbone="resnet18", weights=None, max_epochs=1, latency_repeats=2, verbose=False,
                trainer={"limit_train_batches": 2, "limit_val_batches": 1, "limit_test_batches": 1,
                         "accelerator": "cpu"})
STRATEGIES = ["linear", "bitfit", {"name": "lora", "args": {"rank": 2}}]


@pytest.fixture
def counted(monkeypatch):
    calls: list[tuple[str, int]] = []
    real = cmp.run_one

    def run(spec, seed, settings, run_dir):
        calls.append((spec.label, seed))
        return real(spec, seed, settings, run_dir)

    monkeypatch.setattr(cmp, "run_one", run)
    return calls


def test_compare_writes_leaderboard(tmp_path, counted, capsys):
    result = compare(_data(), STRATEGIES, output=tmp_path / "cmp", **{**SETTINGS, "verbose": True})
    assert not result.failures and result.ran == 3 and len(counted) == 3
    with open(result.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {r["strategy"] for r in rows} == {"linear", "bitfit", "lora(rank=2)"}
    accs = [float(r["accuracy_mean"]) for r in rows]
    assert accs == sorted(accs, reverse=True)
    n_test = 6  # 30 images, test_split 0.2: an accuracy over the test split is a multiple of 1/6
    assert all(abs(a * n_test - round(a * n_test)) < 1e-3 for a in accs), accs  # CSV rounds to 4 places
    for r in rows:
        assert r["split"] == "test"
        assert int(r["trainable_params"]) > 0 and float(r["delta_mb"]) > 0
        assert float(r["train_seconds"]) > 0 and float(r["latency_ms"]) > 0
        assert float(r["peak_mem_mb"]) > 0
        assert Path(r["delta"]).is_file()
    by = {r["strategy"]: int(r["trainable_params"]) for r in rows}
    expected = {label: TransferClassifier("resnet18", weights=None, num_classes=3, strategy=name,
                                          strategy_args=args).parameter_summary()["trainable_params"]
                for label, name, args in [("linear", "linear", None), ("bitfit", "bitfit", None),
                                          ("lora(rank=2)", "lora", {"rank": 2})]}
    assert by == expected
    assert expected["linear"] == 512 * 3 + 3
    assert result.plot.read_bytes()[:8] == PNG_SIGNATURE
    md = result.markdown.read_text()
    assert "| # | strategy | test accuracy |" in md and "lora(rank=2)" in md
    assert json.loads((tmp_path / "cmp" / "winner.json").read_text())["strategy"] == result.best["strategy"]
    assert "test accuracy" in capsys.readouterr().out  # the rich table


def test_resume_skips_finished_runs(tmp_path, counted, monkeypatch):
    out = tmp_path / "cmp"
    real = cmp.run_one

    def interrupted(spec, seed, settings, run_dir):
        if spec.name == "bitfit":
            raise KeyboardInterrupt  # the comparison is stopped half way
        return real(spec, seed, settings, run_dir)

    monkeypatch.setattr(cmp, "run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare(_data(), ["linear", "bitfit"], output=out, **SETTINGS)
    assert [p.name for p in (out / "results").glob("*.json")] == ["linear__seed0.json"]

    calls: list[str] = []

    def counting(spec, seed, settings, run_dir):
        calls.append(spec.label)
        return real(spec, seed, settings, run_dir)

    monkeypatch.setattr(cmp, "run_one", counting)
    result = compare(_data(), ["linear", "bitfit"], output=out, **SETTINGS)
    assert calls == ["bitfit"] and result.reused == 1 and len(result.rows) == 2
    # a changed budget is a different experiment: the result is not reused
    result = compare(_data(), ["linear"], output=out, **{**SETTINGS, "max_epochs": 2})
    assert calls == ["bitfit", "linear"] and result.reused == 0


def test_failing_strategy_is_reported_and_others_finish(tmp_path, monkeypatch):
    real = cmp.run_one

    def flaky(spec, seed, settings, run_dir):
        if spec.name == "bitfit":
            raise RuntimeError("out of memory")
        return real(spec, seed, settings, run_dir)

    monkeypatch.setattr(cmp, "run_one", flaky)
    result = compare(_data(), ["linear", "bitfit"], output=tmp_path, seeds=[0, 1], **SETTINGS)
    assert [f["label"] for f in result.failures] == ["bitfit", "bitfit"]
    assert [r["strategy"] for r in result.rows] == ["linear"] and result.rows[0]["seeds"] == "0 1"
    assert "bitfit seed 0: RuntimeError: out of memory" in result.markdown.read_text()


def test_strategy_and_config_validation(tmp_path):
    with pytest.raises(ValueError, match=r"strategies\[1\].*Unknown strategy 'nope'"):
        parse_strategies(["linear", "nope"])
    with pytest.raises(ValueError, match=r"strategies\[0\].*Unknown option"):
        parse_strategies([{"name": "lora", "args": {"rnak": 4}}])
    with pytest.raises(ValueError, match="appear twice"):
        parse_strategies(["linear", "linear"])
    assert [s.slug for s in parse_strategies([{"name": "lora", "args": {"rank": 4}}])] == ["lora-rank4"]
    assert [s.name for s in parse_strategies(None)] == list(cmp.DEFAULT_STRATEGIES)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: resnet18\nepochs: 3\n")  # a fit config's keys + compare's: not 'epochs'
    with pytest.raises(ValueError, match=r"^unknown key 'epochs'$"):
        load_compare_config(bad)
    assert compare_main(["--config", str(bad)]) == 2
    with pytest.raises(ValueError, match="model.strategy"):
        compare(_data(), ["linear"], output=tmp_path, model={"strategy": "full"}, **SETTINGS)
    with pytest.raises(ValueError, match="lrr"):
        compare(_data(), ["linear"], output=tmp_path, model={"lrr": 0.1}, **SETTINGS)
    with pytest.raises(ValueError, match=r"strategy 'bitfit'.*model.cache_features"):
        compare(_data(), ["linear", {"name": "bitfit", "model": {"cache_features": True}}], output=tmp_path,
                **SETTINGS)
    with pytest.raises(ValueError, match="batch_size"):
        compare({**_data(), "batch_size": 0}, ["linear"], output=tmp_path, **SETTINGS)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_cli_compare(tmp_path, image_folder):
    from visiontune.cli import main

    cfg = tmp_path / "compare.yaml"
    cfg.write_text(  # a fit config (model, data, trainer) plus compare's keys
        "model: {backbone: resnet18, weights: null, bn: eval}\n"
        f"data: {{train: {image_folder}, image_size: 32, batch_size: 4, num_workers: 0}}\n"
        "trainer: {max_epochs: 1, limit_train_batches: 1, limit_val_batches: 1, accelerator: cpu}\n"
        f"latency_repeats: 1\noutput: {tmp_path / 'out'}\n"
        "strategies: [linear, {name: lora, args: {rank: 2}, model: {lr: 0.02}}]\n"
    )
    assert main(["compare", "--config", str(cfg)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "leaderboard.csv", newline="")))
    assert {r["strategy"] for r in rows} == {"linear", "lora(rank=2)"} and rows[0]["split"] == "val"
    # winner.yaml is a fit config for the winner, with its options, that `visiontune fit` takes as is
    winner = yaml.safe_load((tmp_path / "out" / "winner.yaml").read_text())
    expected = {"linear": {"strategy": "linear"},
                "lora(rank=2)": {"strategy": "lora", "strategy_args": {"rank": 2}, "lr": 0.02}}[rows[0]["strategy"]]
    assert winner["model"] == {"backbone": "resnet18", "weights": None, "bn": "eval", **expected}
    assert winner["trainer"] == {"max_epochs": 1} and winner["data"]["train"] == str(image_folder)
    run = tmp_path / "fit"
    assert main(["fit", "--config", str(tmp_path / "out" / "winner.yaml"), "--trainer.limit_train_batches", "1",
                 "--trainer.limit_val_batches", "1", "--trainer.logger.init_args.save_dir", str(run),
                 "--trainer.enable_progress_bar", "false"]) == 0
    saved = yaml.safe_load(next(run.rglob("config.yaml")).read_text())
    assert saved["model"]["strategy"] == expected["strategy"] and saved["model"]["bn"] == "eval"


def test_vt_compare_is_callable_after_module_import():
    import visiontune as vt

    assert callable(vt.compare)  # the module (imported above) forwards calls to compare()
    with pytest.raises(ValueError, match="strategies is empty"):
        vt.compare(_data(), [])


def test_shipped_config_is_valid():
    cfg = load_compare_config(Path(__file__).parent.parent / "configs" / "compare.yaml")
    specs = parse_strategies(cfg["strategies"])
    assert {s.name for s in specs} >= {"linear", "bitfit", "last_k", "lora", "adapter", "full"}
    assert cfg["data"]["train"] == "digits"
