"""``visiontune suggest``: uncertainty, k-center greedy, novelty and clusters, and the command end to end."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_folder
from visiontune.active.novelty import class_prototypes, cluster_novel, novelty_scores, novelty_threshold
from visiontune.active.uncertain import k_center_greedy, select_uncertain, uncertainty_scores
from visiontune.cli import main

POINTS = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [5.0, 5.0], [1.0, 1.0], [10.0, 10.0]])


def test_k_center_greedy_takes_the_farthest_point_from_all_taken_so_far():
    # from (0,0): (10,10) at 14.1; then (10,0) and (0,10) are both 10 from the nearest taken point (the lower
    # index first); then (5,5) at 7.07 and last (1,1) at 1.41
    assert k_center_greedy(POINTS, 6) == [0, 5, 1, 2, 3, 4]
    # from (5,5): every corner is 7.07 away (the lowest index first), then the ones still 7.07 from all taken
    assert k_center_greedy(POINTS, 6, first=3) == [3, 0, 1, 2, 5, 4]
    assert k_center_greedy(POINTS, 2, first=4) == [4, 5]
    assert k_center_greedy(POINTS, 10) == [0, 5, 1, 2, 3, 4]  # at most N


def test_margin_and_entropy_on_fixed_probabilities():
    probs = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.9, 0.05, 0.05]])
    logits = probs.log() + 7.0  # softmax ignores the shift
    assert uncertainty_scores(logits, "margin").tolist() == pytest.approx([0.8, 1.0, 0.15], abs=1e-6)
    entropy = [-sum(p * math.log(p) for p in row) for row in probs.tolist()]
    assert entropy[1] == pytest.approx(math.log(3))
    assert uncertainty_scores(logits, "entropy").tolist() == pytest.approx(entropy, abs=1e-5)
    with pytest.raises(ValueError, match="score must be one of margin, entropy"):
        uncertainty_scores(logits, "variance")


def test_uncertain_picks_are_not_duplicates_of_each_other():
    # 6 distinct images, each 4 times in the pool (identical features), the most uncertain ones first
    rng = np.random.default_rng(0)
    distinct = torch.as_tensor(rng.normal(size=(6, 16)), dtype=torch.float32)
    features = distinct.repeat_interleave(4, dim=0)
    uncertainty = torch.linspace(1.0, 0.0, 24)
    for density in (True, False):
        picks = select_uncertain(uncertainty, features, 5, candidates=4, density=density)
        assert len(picks) == 5 and len({i // 4 for i in picks}) == 5  # five different images
    top = torch.argsort(uncertainty, descending=True)[:5].tolist()
    assert len({i // 4 for i in top}) == 2  # what the five most uncertain alone would have been


def _clusters_of(dim: int, centres: list[int], per: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(dim)
    return torch.cat([eye[c] + 0.08 * torch.randn(per, dim, generator=g) for c in centres])


def test_novelty_ranks_held_back_classes_first_and_clusters_recover_them():
    from sklearn.metrics import roc_auc_score

    # known classes along axes 0-2 (labeled training features), two held-back classes along axes 3 and 4
    train = _clusters_of(8, [0, 1, 2], 5, seed=0)
    labels = torch.arange(3).repeat_interleave(5)
    pool = torch.cat([_clusters_of(8, [0, 1, 2], 6, seed=1), _clusters_of(8, [3, 4], 7, seed=2)])
    truth = np.array([-1] * 18 + [3] * 7 + [4] * 7)
    protos = class_prototypes(train, labels, 4)  # a class without training images: a NaN row, ignored
    assert torch.isnan(protos[3]).all()
    scores = novelty_scores(pool, protos)
    assert roc_auc_score(truth >= 0, scores.numpy()) > 0.9
    flagged = torch.nonzero(scores > novelty_threshold(scores)).flatten().numpy()
    assert sorted(flagged.tolist()) == list(range(18, 32))
    ids, k = cluster_novel(pool[flagged])
    assert k == 2
    # the same partition as the held-back classes, up to renaming the clusters
    assert {(int(c), int(t)) for c, t in zip(ids, truth[flagged])} in ({(0, 3), (1, 4)}, {(0, 4), (1, 3)})
    assert cluster_novel(pool[flagged], 3)[1] == 3  # --clusters overrides


def test_novelty_threshold_splits_two_groups_halfway():
    assert novelty_threshold([0.1, 0.12, 0.11, 0.6, 0.62]) == pytest.approx(0.36)
    assert novelty_threshold([0.5, 0.5]) == 0.5


TINY = ["--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--model.backbone=resnet18",
        "--model.weights=null", "--data.image_size=32", "--data.batch_size=4", "--data.num_workers=0"]
NEW = {"yellow": (230, 230, 20)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step fit on red/green/blue; its checkpoint and delta; a pool with a new colour, every image twice."""
    import os

    root = tmp_path_factory.mktemp("suggest")
    data = make_folder(root / "train", per_class=4)
    pool = make_folder(root / "pool_src", per_class=5, classes={**__import__("conftest").COLOURS, **NEW})
    flat = root / "pool"
    flat.mkdir()
    for p in sorted(pool.rglob("*.png")):
        for copy in ("a", "b"):  # duplicates
            shutil.copy(p, flat / f"{p.parent.name}_{p.stem}_{copy}.png")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["fit", *TINY, f"--data.train={data}", f"--data.val={data}"])
    finally:
        os.chdir(cwd)
    ckpt = next(root.rglob("last.ckpt"))
    return {"root": root, "train": data, "pool": flat, "ckpt": ckpt,
            "delta": ckpt.parent / "delta.safetensors"}


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_suggest_command_writes_the_csv_and_a_contact_sheet_per_cluster(trained, tmp_path, capsys):
    out = tmp_path / "next" / "suggest.csv"
    base = [f"--data.unlabeled={trained['pool']}", "--n", "4", "--data.image_size=32", f"--output={out}",
            f"--data.train={trained['train']}"]
    assert main(["suggest", f"--ckpt_path={trained['ckpt']}", *base]) == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    uncertain = [r for r in rows if r["reason"] == "uncertain"]
    novel = [r for r in rows if r["reason"] == "novel"]
    assert len(uncertain) == 4 and rows[:4] == uncertain and novel
    assert set(rows[0]) == {"path", "reason", "score", "cluster"} and all(r["cluster"] == "" for r in uncertain)
    # no two picks are copies of one image
    assert len({Path(r["path"]).read_bytes() for r in uncertain}) == 4
    assert all(0 <= float(r["score"]) <= 1 for r in uncertain)
    # the new colour is what looks like no known class
    assert {Path(r["path"]).name.split("_")[0] for r in novel} == {"yellow"}
    clusters = sorted({int(r["cluster"]) for r in novel})
    assert clusters == list(range(len(clusters)))
    sheets = sorted(out.parent.glob("suggest_cluster*.png"))
    assert [p.name for p in sheets] == [f"suggest_cluster{k}.png" for k in clusters]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in sheets)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left
    assert "4 uncertain picked" in printed and f"wrote {out}" in printed
    # the task delta of the same run suggests the same images; without data.train the head's rows are the
    # prototypes
    out2 = tmp_path / "delta.csv"
    assert main(["suggest", f"--delta={trained['delta']}", *base[:-2], f"--output={out2}",
                 f"--data.train={trained['train']}"]) == 0
    assert [(r["path"], r["reason"], r["cluster"]) for r in _rows(out2)] == [
        (r["path"], r["reason"], r["cluster"]) for r in rows]
    out3 = tmp_path / "head.csv"
    assert main(["suggest", f"--ckpt_path={trained['ckpt']}", *base[:3], f"--output={out3}",
                 "--score", "entropy", "--clusters", "1"]) == 0
    head_rows = _rows(out3)
    assert "prototypes from head" in capsys.readouterr().out
    assert sum(r["reason"] == "uncertain" for r in head_rows) == 4
    assert {r["cluster"] for r in head_rows if r["reason"] == "novel"} == {"0"}


def _exit_2(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    return err.strip()


def test_bad_input_is_one_line_exit_2(trained, tmp_path, capsys):
    ckpt, pool = f"--ckpt_path={trained['ckpt']}", f"--data.unlabeled={trained['pool']}"
    out = f"--output={tmp_path / 's.csv'}"
    assert _exit_2(capsys, ["suggest", ckpt, "--data.unlabeled=/no/such/pool", out]) == (
        "visiontune suggest: error: --data.unlabeled: '/no/such/pool' does not exist")
    assert _exit_2(capsys, ["suggest", ckpt, pool, "--n", "0", out]) == (
        "visiontune suggest: error: --n must be a positive integer (the images to suggest), got 0")
    assert _exit_2(capsys, ["suggest", pool, out]) == (
        "visiontune suggest: error: give the model: --ckpt_path CKPT or --delta DELTA.safetensors")
    assert _exit_2(capsys, ["suggest", ckpt, out]).endswith("give the pool to rank: --data.unlabeled FOLDER "
                                                           "(or data.unlabeled in --config)")
    assert _exit_2(capsys, ["suggest", f"--ckpt_path={tmp_path / 'gone.ckpt'}", pool, out]) == (
        f"visiontune suggest: error: --ckpt_path: '{tmp_path / 'gone.ckpt'}' does not exist")
    assert "--score must be one of margin, entropy, got 'variance'" in _exit_2(
        capsys, ["suggest", ckpt, pool, "--score", "variance", out])
    assert not (tmp_path / "s.csv").exists()
