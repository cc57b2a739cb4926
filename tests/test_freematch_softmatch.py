"""FreeMatch and SoftMatch (``semi_supervised.algorithm``): the papers' formulas on fixed tensors, the EMA state
after two steps, checkpoint resume, growth with added classes, and small real runs."""

from __future__ import annotations

import math
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from visiontune import ConfigError, FixMatchState, ImageDataModule, TransferClassifier  # noqa: E402
from visiontune.data.sources import digits  # noqa: E402
from visiontune.objectives.semisup import FixMatchConfig, fixmatch_loss  # noqa: E402
from visiontune.objectives.weighting import (  # noqa: E402
    FreeMatchThresholds,
    SoftMatchWeights,
    adaptive_loss,
    fairness_loss,
    freematch_mask,
    softmatch_weights,
)

TOL = 1e-6


def _close(t: torch.Tensor, expected) -> None:
    assert torch.allclose(t.double(), torch.as_tensor(expected, dtype=torch.float64), atol=TOL, rtol=0), (t, expected)


# ---------------------------------------------------------------------------------------------- formulas
def test_freematch_mask_is_max_norm_local_threshold_times_tau():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]])
    p_model = torch.tensor([0.5, 0.2, 0.3])  # MaxNorm = [1, 0.4, 0.6]; x tau 0.7 = [0.7, 0.28, 0.42]
    assert freematch_mask(probs, 0.7, p_model).tolist() == [False, True, False, True, True]  # 0.7 >= 0.7 counts
    state = FreeMatchThresholds(3)
    state.tau, state.p_model = torch.tensor(0.7), p_model
    _close(state.thresholds(), [0.7, 0.28, 0.42])


def test_softmatch_weight_is_the_truncated_gaussian():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])  # max p: 0.9, 0.6, 0.7, 0.55
    w = softmatch_weights(probs, mu=0.7, var=0.05)
    _close(w, [1.0, math.exp(-0.1 ** 2 / 0.1), 1.0, math.exp(-0.15 ** 2 / 0.1)])  # max p >= mu: lambda_max = 1


def test_fairness_loss_is_minus_cross_entropy_of_the_normalised_ratios():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.3, 0.2, 0.1], [0.0, 0.0, 4.0]], requires_grad=True)
    mask = torch.tensor([True, True, True, False])
    p_model, hist_model = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.6, 0.4, 0.0])
    loss = fairness_loss(logits, mask, p_model, hist_model)
    # by hand: strong probabilities of the three confident rows, argmax 0, 1, 0 -> h_bar = [2/3, 1/3, 0]
    rows = [[math.exp(v) for v in r] for r in ([2.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.3, 0.2, 0.1])]
    rows = [[v / sum(r) for v in r] for r in rows]
    p_bar = [sum(r[c] for r in rows) / 3 for c in range(3)]
    b = [p_bar[0] / (2 / 3), p_bar[1] / (1 / 3), 0.0]  # 1/0 -> 0
    b = [v / sum(b) for v in b]
    a = [0.5 / 0.6, 0.3 / 0.4, 0.0]
    a = [v / sum(a) for v in a]
    expected = sum(ac * math.log(bc + 1e-12) for ac, bc in zip(a, b))
    assert abs(loss.item() - expected) < TOL
    loss.backward()
    assert logits.grad[3].abs().sum() == 0 and logits.grad[:3].abs().sum() > 0  # only confident rows, via p_bar
    empty = fairness_loss(logits, torch.zeros(4, dtype=torch.bool), p_model, hist_model)
    assert empty.item() == 0.0 and empty.requires_grad


# ---------------------------------------------------------------------------------------------- EMA state
def test_freematch_state_after_two_steps():
    s = FreeMatchThresholds(2, momentum=0.9)
    _close(s.tau, 0.5), _close(s.p_model, [0.5, 0.5]), _close(s.label_hist, [0.5, 0.5])
    s.update(torch.tensor([[0.8, 0.2], [0.4, 0.6]]))  # mean max 0.7, mean p [0.6, 0.4], hist [0.5, 0.5]
    _close(s.tau, 0.52), _close(s.p_model, [0.51, 0.49]), _close(s.label_hist, [0.5, 0.5])
    s.update(torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4]]))  # 0.7333, [0.7333, 0.2667], [1, 0]
    tau = 0.9 * 0.52 + 0.1 * (2.2 / 3)
    p = [0.9 * 0.51 + 0.1 * (2.2 / 3), 0.9 * 0.49 + 0.1 * (0.8 / 3)]
    _close(s.tau, tau), _close(s.p_model, p), _close(s.label_hist, [0.55, 0.45])
    _close(s.thresholds(), [tau, p[1] / p[0] * tau])
    assert s.steps == 2


def test_softmatch_state_and_uniform_alignment_after_two_steps():
    s = SoftMatchWeights(2, momentum=0.9)
    _close(s.mu, 0.5), _close(s.var, 1.0)
    s.update(torch.tensor([[0.8, 0.2], [0.4, 0.6]]))  # max p 0.8, 0.6: mean 0.7, unbiased var 0.02
    _close(s.mu, 0.52), _close(s.var, 0.902)
    s.update(torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]]))  # 0.9, 0.7, 0.5: mean 0.7, var 0.04
    _close(s.mu, 0.538), _close(s.var, 0.8158)
    s.update(torch.tensor([[0.5, 0.5]]))  # a batch of one: no variance, the mean moves
    _close(s.mu, 0.9 * 0.538 + 0.05), _close(s.var, 0.8158)
    a = SoftMatchWeights(2, momentum=0.9)
    a.align(torch.tensor([[0.8, 0.2], [0.6, 0.4]]))  # first batch: mean = [0.7, 0.3]
    out = a.align(torch.tensor([[0.5, 0.5], [0.3, 0.7]]))  # mean 0.9 [0.7, 0.3] + 0.1 [0.4, 0.6] = [0.67, 0.33]
    _close(a.alignment.mean, [0.67, 0.33])
    r = [0.5 / 0.67, 0.5 / 0.33]
    _close(out[0], [r[0] / sum(r), r[1] / sum(r)])


def test_softmatch_step_weights_from_aligned_targets_from_raw_probabilities():
    cfg = FixMatchConfig(algorithm="softmatch", mu=1, state_momentum=0.5, lambda_u=2.0)
    state = SoftMatchWeights(2, momentum=0.5)
    probs = torch.tensor([[0.6, 0.4], [0.99, 0.01]])
    strong = torch.tensor([[0.2, -0.1], [1.0, 0.0]], requires_grad=True)
    out = adaptive_loss(strong, probs.log(), cfg, state=state)
    mean = probs.mean(0)  # the first batch sets the alignment's mean
    aligned = probs * 0.5 / mean
    aligned = aligned / aligned.sum(1, keepdim=True)
    assert aligned[0].argmax() == 1 and out.targets.tolist() == [0, 0]  # targets: unaligned argmax
    conf = aligned.max(1).values
    mu = 0.5 * 0.5 + 0.5 * conf.mean()
    var = 0.5 * 1.0 + 0.5 * conf.var()
    _close(state.mu, mu), _close(state.var, var)
    expected_w = [1.0 if c >= mu else math.exp(-(c - mu) ** 2 / (2 * var)) for c in conf.tolist()]
    _close(out.weights, expected_w)
    ce = F.cross_entropy(strong, torch.tensor([0, 0]), reduction="none")
    _close(out.loss_u, (ce * torch.tensor(expected_w)).mean())
    _close(out.loss, 2.0 * out.loss_u)
    _close(out.mask_rate, sum(expected_w) / 2)
    assert out.loss_fair is None


def test_freematch_step_updates_before_masking_and_adds_fairness():
    cfg = FixMatchConfig(algorithm="freematch", mu=1, state_momentum=0.0, fairness_weight=0.5)
    state = FreeMatchThresholds(2, momentum=0.0)  # momentum 0: the state is this batch's statistics
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    strong = torch.randn(3, 2, requires_grad=True)
    out = adaptive_loss(strong, probs.log(), cfg, state=state)
    _close(state.tau, (0.9 + 0.6 + 0.8) / 3)  # tau = 0.7667; MaxNorm p~ = [1, 0.4333/0.5667]
    _close(state.p_model, [1.7 / 3, 1.3 / 3])
    thr = [2.3 / 3, 1.3 / 1.7 * 2.3 / 3]
    assert out.mask.tolist() == [0.9 >= thr[0], 0.6 >= thr[0], 0.8 >= thr[1]] == [True, False, True]
    fair = fairness_loss(strong, out.mask, state.p_model, state.label_hist)
    _close(out.loss, out.loss_u + 0.5 * fair)
    with pytest.raises(ValueError, match="adaptive_loss"):
        fixmatch_loss(strong, probs.log(), cfg)


# ---------------------------------------------------------------------------------------------- classes added
def test_per_class_state_grows_with_added_classes():
    s = FreeMatchThresholds(2, momentum=0.5)
    s.update(torch.tensor([[0.9, 0.1]]))  # p~ = [0.7, 0.3], h~ = [0.75, 0.25], tau 0.7
    saved = s.state_dict()
    s.grow(4)
    _close(s.p_model, [0.35, 0.15, 0.25, 0.25]), _close(s.label_hist, [0.375, 0.125, 0.25, 0.25])
    _close(s.tau, 0.7)
    assert s.mask(torch.tensor([[0.1, 0.1, 0.1, 0.7]])).tolist() == [True]  # 0.7 >= 0.25/0.35*0.7 = 0.5
    loaded = FreeMatchThresholds(4)
    loaded.load_state_dict(saved)  # a state saved before two classes were added loads grown
    assert torch.equal(loaded.p_model, s.p_model) and loaded.num_classes == 4
    with pytest.raises(ValueError, match="has 4 classes, this model 2"):
        FreeMatchThresholds(2).load_state_dict(loaded.state_dict())
    soft = SoftMatchWeights(2, momentum=0.5)
    soft.align(torch.tensor([[0.8, 0.2]]))
    soft.update(torch.tensor([[0.8, 0.2]]))
    other = SoftMatchWeights(3)
    other.load_state_dict(soft.state_dict())
    _close(other.alignment.mean, [0.8 * 2 / 3, 0.2 * 2 / 3, 1 / 3]), _close(other.alignment.target, [1 / 3] * 3)
    assert torch.equal(other.mu, soft.mu) and other.align(torch.rand(5, 3)).shape == (5, 3)
    # inside the model: a restored state of fewer classes grows when the helpers are built for the grown head
    fm = FixMatchState(FixMatchConfig(mu=1, algorithm="freematch"))
    fm.load_state_dict({"weighting": saved})
    model = TransferClassifier("resnet18", weights=None, num_classes=4, semi_supervised={"mu": 1})
    fm._ensure(model)
    assert torch.equal(fm.weighting.p_model, s.p_model)


def test_expansion_builds_the_state_for_old_plus_new_classes(tmp_path):
    s = digits()
    x, y = np.stack(s.items), s.labels
    old = np.flatnonzero(y < 3)[:60]
    torch.manual_seed(0)
    base = TransferClassifier("tf_efficientnet_lite0", weights=None, strategy="full", lr=1e-3)
    dm = ImageDataModule(train=(x[old], y[old], ["0", "1", "2"]), image_size=32, batch_size=8, hflip=False,
                         num_workers=0, val_split=0)
    trainer = _trainer(1)
    trainer.fit(base, dm)
    trainer.save_checkpoint(tmp_path / "old.ckpt")
    new = np.flatnonzero(y == 3)[:4]
    pool = np.flatnonzero(y <= 3)[100:140]
    for algorithm, kind in (("freematch", FreeMatchThresholds), ("softmatch", SoftMatchWeights)):
        model = TransferClassifier("tf_efficientnet_lite0", weights=None, strategy="full", lr=1e-4,
                                   init_from=str(tmp_path / "old.ckpt"), class_expansion={"distill": 1.0},
                                   semi_supervised={"mu": 1, "algorithm": algorithm})
        dm = ImageDataModule(train=(x[new], np.zeros(4, int), ["3"]), unlabeled=(x[pool], None), image_size=32,
                             batch_size=4, hflip=False, num_workers=0, val_split=0)
        trainer = _trainer(2, log_every_n_steps=1)
        trainer.fit(model, dm)
        state = model._fixmatch.weighting
        assert isinstance(state, kind) and state.num_classes == 4 and state.steps == 2
        per_class = state.p_model if kind is FreeMatchThresholds else state.alignment.mean
        assert per_class.shape == (4,) and abs(float(per_class.sum()) - 1) < 1e-5


# ---------------------------------------------------------------------------------------------- real runs
def _trainer(steps: int, tmp_path=None, **kw) -> L.Trainer:
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=10**6,
                     accelerator="cpu", default_root_dir=tmp_path, **kw)


def _small(algorithm: str, strategy: str = "full", **cfg) -> tuple[TransferClassifier, ImageDataModule]:
    model = TransferClassifier("tf_efficientnet_lite0", weights="package", strategy=strategy, bn="eval", lr=1e-3,
                               semi_supervised=FixMatchConfig(mu=2, algorithm=algorithm, state_momentum=0.5, **cfg))
    dm = ImageDataModule(train="digits", image_size=32, batch_size=4, labels_per_class=2, unlabeled="rest",
                         hflip=False, num_workers=0, seed=0)
    return model, dm


class _Record(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train_")})


@pytest.mark.parametrize("algorithm, strategy", [("freematch", "full"), ("softmatch", "lora")])
def test_small_run_trains_with_non_trivial_weights(algorithm, strategy):
    L.seed_everything(0, verbose=False)
    model, dm = _small(algorithm, strategy)
    rec = _Record()
    _trainer(6, log_every_n_steps=1, callbacks=[rec]).fit(model, dm)
    assert len(rec.rows) == 6 and all(math.isfinite(r["train_loss"]) for r in rec.rows)
    rates = [r["train_mask_rate"] for r in rec.rows]
    assert any(0.0 < v < 1.0 for v in rates), rates  # some samples weighted down, some kept
    key = "train_freematch_tau" if algorithm == "freematch" else "train_softmatch_mu"
    assert rec.rows[-1][key] != rec.rows[0][key]  # the EMA state moves
    if algorithm == "freematch":
        assert all(math.isfinite(r["train_fairness_loss"]) for r in rec.rows)
    assert model._fixmatch.weighting.steps == 6


@pytest.mark.parametrize("algorithm", ["freematch", "softmatch"])
def test_state_survives_checkpoint_and_resume_exactly(tmp_path, algorithm):
    L.seed_everything(0, verbose=False)
    model, dm = _small(algorithm)
    trainer = _trainer(3, tmp_path)
    trainer.fit(model, dm)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["visiontune_fixmatch"]["weighting"]  # plain tensors only
    live = model._fixmatch.weighting.state_dict()

    def flat(d, prefix=""):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]

    live_items = dict(flat(live))
    assert saved["algorithm"] == algorithm and saved["steps"] == 3
    for k, v in flat(saved):
        assert (torch.equal(torch.as_tensor(v).cpu(), torch.as_tensor(live_items[k]).cpu())
                if isinstance(v, torch.Tensor) else v == live_items[k]), k
    restored: dict[str, dict] = {}

    class Check(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not restored:
                pl_module._fixmatch._ensure(pl_module)
                restored["state"] = pl_module._fixmatch.weighting.state_dict()

    model2, dm2 = _small(algorithm)
    _trainer(4, tmp_path, callbacks=[Check()]).fit(model2, dm2, ckpt_path=str(path))
    for k, v in flat(restored["state"]):
        assert (torch.equal(torch.as_tensor(v).cpu(), torch.as_tensor(live_items[k]).cpu())
                if isinstance(v, torch.Tensor) else v == live_items[k]), k
    assert model2._fixmatch.weighting.steps == 4
    other = "softmatch" if algorithm == "freematch" else "freematch"
    wrong = FixMatchState(FixMatchConfig(mu=1, algorithm=other))
    wrong.load_state_dict({"weighting": saved})
    with pytest.raises(ValueError, match="resume with the algorithm"):
        wrong._ensure(model2)


# ---------------------------------------------------------------------------------------------- config
def test_bad_algorithm_is_one_line_naming_key_and_values(tmp_path, capsys, monkeypatch):
    import logging

    from visiontune.cli import main

    with pytest.raises(ConfigError) as err:
        FixMatchConfig(algorithm="freemtch")
    expected = ("model.semi_supervised.algorithm must be one of fixmatch, freematch, softmatch; "
                "got 'freemtch'")
    assert str(err.value) == expected
    with pytest.raises(ConfigError, match=r"class_thresholds must be 'fixed' with algorithm 'freematch'"):
        FixMatchConfig(algorithm="freematch", class_thresholds="flexmatch")
    with pytest.raises(ConfigError, match="distribution_alignment must be false with algorithm 'softmatch'"):
        FixMatchConfig(algorithm="softmatch", distribution_alignment=True)
    with pytest.raises(ConfigError, match="state_momentum"):
        FixMatchConfig(state_momentum=1.0)
    monkeypatch.chdir(tmp_path)
    cfg = {"trainer": {"max_steps": 1, "accelerator": "cpu", "logger": False},
           "model": {"backbone": "resnet18", "weights": None, "semi_supervised": {"mu": 1, "algorithm": "freemtch"}},
           "data": {"train": "digits", "labels_per_class": 2, "unlabeled": "rest", "image_size": 32,
                    "num_workers": 0}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as exit_:
        mp.setattr(logging, "raiseExceptions", False)
        main(["fit", "--config", str(tmp_path / "bad.yaml")])
    err_text = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err_text
    assert err_text.strip().splitlines()[-1] == f"visiontune fit: error: invalid configuration: {expected}"
