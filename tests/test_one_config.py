"""One config drives every command (#12): the file ``visiontune fit --config`` takes works unchanged with
``check-data``, ``schedule``, ``lr-find`` and ``compare``, read by the same parser with the same overrides; a key
none of them knows is one line naming it, exit 2, for every command."""

from __future__ import annotations

import csv
import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

from visiontune.cli import main

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["finetune.yaml", "quickstart.yaml"]
# tiny overrides, the same spelling for every command: digits at 32 px, no pretrained weights to read
TINY = ["--data.train", "digits", "--data.image_size", "32", "--data.batch_size", "16", "--data.num_workers", "0",
        "--model.weights", "null"]


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def _config(name: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / name)]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' run directories (runs/...) land here


@pytest.mark.parametrize("name", CONFIGS)
def test_fit_trains_two_steps(name, tmp_path):
    code, out, err = _run("fit", *_config(name), *TINY, "--trainer.max_steps", "2", "--trainer.limit_val_batches",
                          "1", "--trainer.enable_progress_bar", "false")
    assert code in (0, None), err[-2000:]
    saved = yaml.safe_load(next(tmp_path.rglob("config.yaml")).read_text())
    assert saved["model"]["backbone"] == "tf_efficientnet_lite0" and saved["data"]["train"] == "digits"


@pytest.mark.parametrize("name", CONFIGS)
def test_check_data_reads_the_data_section(name, tmp_path):
    code, out, err = _run("check-data", *_config(name), "--data.train", "digits", "--json", "report.json")
    assert code == 0, err + out
    report = json.loads((tmp_path / "report.json").read_text())
    cfg = yaml.safe_load((ROOT / "configs" / name).read_text())["data"]
    counts = {split: sum(c.values()) for split, c in report["counts"].items()}
    assert set(counts) == ({"train", "val", "test"} if cfg.get("test_split") else {"train", "val"})
    assert sum(counts.values()) == 1797 and abs(counts["val"] - cfg["val_split"] * 1797) <= 10  # the config's split
    assert report["classes"] == [str(i) for i in range(10)]


@pytest.mark.parametrize("name", CONFIGS)
def test_schedule_reads_the_model_section(name):
    code, out, err = _run("schedule", *_config(name), "--groups_per_phase", "3")
    assert code == 0, err
    assert out.startswith("# Gradual unfreezing for tf_efficientnet_lite0 (strategy full)")
    phases = yaml.safe_load(out)["trainer"]["callbacks"][0]["init_args"]["phases"]
    assert phases[0] == {"at_epoch": 0, "groups": ["head"]} and phases[1]["groups"] == [-2, -3, -4]


@pytest.mark.parametrize("name", CONFIGS)
def test_lr_find_runs_on_the_config(name, tmp_path):
    code, out, err = _run("lr-find", *_config(name), *TINY, "--num_training", "15")
    assert code == 0, err[-2000:] + out
    assert "visiontune lr-find: tf_efficientnet_lite0, strategy full; trained strategy" in out
    assert "use it: --model.lr" in out and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", CONFIGS)
def test_compare_runs_on_the_config(name, tmp_path):
    common = [*_config(name), *TINY, "--strategies", "linear,bitfit", "--output", str(tmp_path / "cmp")]
    code, out, err = _run("compare", *common, "--dry_run")
    assert code == 0, err
    cfg = yaml.safe_load((ROOT / "configs" / name).read_text())
    assert f"2 strategies x {1} seed(s) = 2 runs on tf_efficientnet_lite0 (weights None)" in out
    assert f"seeds: {cfg['seed_everything']}" in out and f"max_epochs: {cfg['trainer']['max_epochs']}" in out
    assert not (tmp_path / "cmp").exists()  # a dry run trains nothing

    code, out, err = _run("compare", *common, "--strategies", "linear", "--trainer.max_steps", "2",
                          "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
                          "--latency_repeats", "0")
    assert code == 0, err[-2000:] + out
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "leaderboard.csv", newline="")))
    assert [r["strategy"] for r in rows] == ["linear"]
    result = json.loads(next((tmp_path / "cmp" / "results").glob("linear__seed*.json")).read_text())
    assert result["steps"] == 2  # the config's trainer options (and the override) reach every run
    winner = yaml.safe_load((tmp_path / "cmp" / "winner.yaml").read_text())
    assert winner["model"]["backbone"] == "tf_efficientnet_lite0" and winner["model"]["strategy"] == "linear"
    assert winner["data"]["train"] == "digits" and winner["data"]["image_size"] == 32
    assert winner["trainer"]["max_epochs"] == cfg["trainer"]["max_epochs"]
    assert not (tmp_path / "runs").exists()  # the config's logger is not used: each run logs under --output


BAD = "model:\n  backbone: resnet18\n  lrr: 0.1\ndata:\n  train: digits\n"


@pytest.mark.parametrize("command", ["fit", "check-data", "schedule", "lr-find", "compare"])
def test_a_bad_key_is_one_line_naming_it_exit_2(command, tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD)
    code, out, err = _run(command, "--config", str(tmp_path / "bad.yaml"))
    assert code == 2
    assert err.strip().splitlines() == [f"visiontune {command}: error: invalid configuration: unknown key "
                                        "'model.lrr' (did you mean 'model.lr'?)"]
    (tmp_path / "bad2.yaml").write_text("model:\n  backbone: resnet18\nepochs: 3\n")  # a top-level key
    code, out, err = _run(command, "--config", str(tmp_path / "bad2.yaml"))
    assert code == 2 and err.strip().splitlines() == [f"visiontune {command}: error: invalid configuration: "
                                                      "unknown key 'epochs'"]
    code, out, err = _run(command, "--config", str(tmp_path / "bad2.yaml").replace("bad2", "none"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "none.yaml" in err


def test_the_old_lr_find_spelling_still_works_with_a_deprecation(tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD)
    code, out, err = _run("lr_find", "--config", str(tmp_path / "bad.yaml"))
    assert code == 2
    assert err.strip().splitlines() == ["visiontune lr_find is deprecated: use visiontune lr-find",
                                        "visiontune lr-find: error: invalid configuration: unknown key 'model.lrr' "
                                        "(did you mean 'model.lr'?)"]
