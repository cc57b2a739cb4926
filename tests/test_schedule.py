"""Gradual unfreezing (GradualUnfreeze): phases, group names, LRs, BatchNorm policy, exact resume, LR finder."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from visiontune import TransferClassifier, param_groups
from visiontune.models.groups import depth_groups
from visiontune.schedule import (
    GradualUnfreeze,
    ScheduleError,
    auto_phases,
    group_index,
    group_names,
    parse_phases,
    resolve_schedule,
)
from visiontune.schedule.tuning import lr_find, lr_find_main, schedule_main
from visiontune.strategies import apply_strategy, delta_parameter_names

ROOT = Path(__file__).resolve().parents[1]
VIT = {"img_size": 32}


# ---------------------------------------------------------------------------------------------- helpers
def _loader(n: int = 24, batch: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % 3
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _model(backbone: str = "resnet18", strategy: str = "full", **kw) -> TransferClassifier:
    args = dict(VIT) if backbone.startswith("vit") else {}
    args.update(kw.pop("backbone_args", {}))
    return TransferClassifier(backbone, weights=None, num_classes=3, strategy=strategy,
                              backbone_args=args, **kw)


def _trainer(callbacks: list, **kw) -> L.Trainer:
    kw.setdefault("max_epochs", 3)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks, **kw)


class Recorder(Callback):
    """After GradualUnfreeze (placed after it), records per step: epoch, step, requires_grad, LR, BN modes."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lr = {id(p): g["lr"] for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        net = pl_module.net
        self.rows.append({
            "epoch": trainer.current_epoch, "step": trainer.global_step,
            "grad": {n: p.requires_grad for n, p in net.named_parameters()},
            "lr": {n: lr.get(id(p)) for n, p in net.named_parameters()},
            "bn_training": {n: m.training for n, m in net.named_modules() if isinstance(m, _BatchNorm)},
        })


def _group_state(row: dict, groups: list[list[str]], delta) -> list[tuple[bool, float]]:
    """Per depth group: (trainable, effective LR = LR if trainable else 0); checks groups are uniform."""
    out = []
    for g in groups:
        names = [n for n in g if n in delta]
        states = {(row["grad"][n], row["lr"][n] if row["grad"][n] else 0.0) for n in names}
        assert len(states) == 1, f"depth group {g[0]}... is not uniform: {states}"
        out.append(states.pop())
    return out


# ---------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("phases, message", [
    ([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 3, "groups": [-2]}, {"at_epoch": 2, "groups": [-3]}],
     r"phase 2: at_epoch=2 is not after phase 1 \(at_epoch=3\)"),
    ([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "groups": [-2]}, {"at_epoch": 2, "groups": [-3], "lr": 0}],
     r"phase 2: lr must be > 0, got 0"),
    ([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "groups": [-2], "lr": -1e-3}],
     r"phase 1: lr must be > 0"),
    ([{"at_epoch": 0, "groups": ["head"]}, {"at_step": 10, "groups": [-2]}],
     r"phase 1: uses at_step but phase 0 uses at_epoch"),
    ([{"at_epoch": 1, "groups": ["head"]}], r"phase 0: the first phase must start at epoch 0"),
    ([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1}], r"phase 1: says nothing to thaw"),
    ([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "group": [-2]}], r"phase 1: unknown key\(s\) \['group'\]"),
    ([{"at_epoch": 0, "at_step": 0, "groups": ["head"]}], r"phase 0: give exactly one of at_epoch / at_step"),
    ([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "regex": "blocks.("}], r"phase 1: regex 'blocks\.\(' is not a valid regular expression"),
    ([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": -1, "groups": [-2]}], r"phase 1: at_epoch must be an integer >= 0"),
    ([], r"phases is empty"),
])
def test_bad_schedules_fail_at_construction(phases, message):
    with pytest.raises(ScheduleError, match=message):
        GradualUnfreeze(phases)


def test_group_names_and_references():
    assert group_names(5) == ["stem", "block.0", "block.1", "block.2", "head"]
    n = 10
    assert [group_index(r, n) for r in ("stem", "head", "block.0", "block.7", 0, 9, -1, -2, "-2", "4")] == \
        [0, 9, 1, 8, 0, 9, 9, 8, 8, 4]
    for bad in (10, -11, "block.8", "neck", "1.5", True):
        with pytest.raises(ScheduleError):
            group_index(bad, n)
    (p,) = parse_phases([{"at_step": 0, "groups": "head", "regex": "^fc\\.", "lr": 1}])
    assert (p.at, p.unit, p.groups, p.regex, p.lr) == (0, "step", ("head",), ("^fc\\.",), 1.0)
    with pytest.raises(ScheduleError, match="either phases"):
        GradualUnfreeze([{"at_epoch": 0, "groups": ["head"]}], every_n_epochs=2)
    with pytest.raises(ScheduleError, match="every_n_epochs must be an integer >= 1"):
        GradualUnfreeze(every_n_epochs=0)


@pytest.mark.parametrize("phases, message", [
    ([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "groups": [-2]}, {"at_epoch": 2, "groups": [12]}],
     r"phase 2: group 12 does not exist: the model has 10 depth groups"),
    ([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "groups": ["block.9"]}],
     r"phase 1: group 'block.9' does not exist"),
    ([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "groups": ["neck"]}],
     r"phase 1: group 'neck' is not a group name or index"),
    ([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "regex": r"^blocks\.3\."}],
     r"phase 1: regex '\^blocks\\\\.3\\\\.' matches no parameter of ResNet"),
    ([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "groups": [-2]}, {"at_epoch": 2, "regex": r"^layer4\.1\."}],
     r"phase 2: thaws nothing: everything it selects was thawed by an earlier phase"),
])
def test_bad_schedules_against_the_model(phases, message):
    net = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(ScheduleError, match=message):
        resolve_schedule(net, phases)


def test_phase_thawing_nothing_the_strategy_trains():
    net = timm.create_model("resnet18", num_classes=3)
    apply_strategy(net, "last_k", {"k": 1})
    with pytest.raises(ScheduleError, match=r"phase 1: thaws nothing: none of the \d+ parameters it selects is "
                                            r"trained by strategy 'last_k'"):
        resolve_schedule(net, [{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "groups": ["stem"]}])


def test_bad_schedule_fails_before_training():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = GradualUnfreeze([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "regex": "^nothing_like_this"}])
    steps = Recorder()
    with pytest.raises(ScheduleError, match="phase 1: regex '\\^nothing_like_this' matches no parameter"):
        _trainer([cb, steps]).fit(model, _loader())
    assert steps.rows == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- phases, LRs
def test_cnn_phase_boundaries_requires_grad_and_lrs():
    """resnet18, epoch schedule, layer decay 0.5; phase 1 sets its own LR; phase 2 thaws by regex."""
    lr, decay = 1e-2, 0.5
    model = _model("resnet18", lr=lr, layer_decay=decay, scheduler="constant", weight_decay=0.1)
    start = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    cb = GradualUnfreeze([
        {"at_epoch": 0, "groups": ["head"]},
        {"at_epoch": 1, "groups": [-2, "block.6"], "lr": 3e-4},
        {"at_epoch": 2, "regex": r"^layer3\."},
    ], verbose=False)
    rec = Recorder()
    _trainer([cb, rec], max_epochs=3).fit(model, _loader())
    groups = depth_groups(model.net)
    n = len(groups)
    delta = delta_parameter_names(model.net)
    full = lambda gi: lr * decay ** (n - 1 - gi)  # noqa: E731
    expected = {
        0: {n - 1: full(n - 1)},
        1: {n - 1: full(n - 1), n - 2: 3e-4, n - 3: 3e-4},
        2: {n - 1: full(n - 1), n - 2: 3e-4, n - 3: 3e-4, n - 4: full(n - 4), n - 5: full(n - 5)},
    }
    assert n == 10 and groups[n - 4][0].startswith("layer3.1") and groups[n - 5][0].startswith("layer3.0")
    for row in rec.rows:
        state = _group_state(row, groups, delta)
        want = expected[row["epoch"]]
        assert [s[0] for s in state] == [gi in want for gi in range(n)], row["step"]
        for gi, (_, eff) in enumerate(state):
            assert eff == pytest.approx(want.get(gi, 0.0), rel=1e-9), (row["epoch"], gi)
    assert cb.phase == 2
    # frozen parameters: no gradient, no AdamW state, no weight-decay drift (bit-identical)
    opt_state = model.trainer.optimizers[0].state
    for gi in range(n - 5):
        for name in groups[gi]:
            p = dict(model.net.named_parameters())[name]
            assert p.grad is None and p not in opt_state
            assert torch.equal(p.detach(), start[name]), name
    assert not torch.equal(model.net.fc.weight.detach(), start["fc.weight"])


def test_vit_step_phases_split_optimizer_groups_for_phase_lrs():
    """ViT, step schedule crossing an epoch, no layer decay: phase LRs need the two (decay / no-decay)
    optimizer groups split; every delta parameter still sits in exactly one group."""
    model = _model("vit_tiny_patch16_224", lr=1e-2, scheduler="constant")
    cb = GradualUnfreeze([
        {"at_step": 0, "groups": ["head"]},
        {"at_step": 2, "groups": [-2], "lr": 1e-3},
        {"at_step": 5, "groups": ["stem", "block.0"], "lr": 1e-4},
    ], verbose=False)
    rec = Recorder()
    _trainer([cb, rec], max_steps=7, max_epochs=-1).fit(model, _loader())
    groups = depth_groups(model.net)
    n = len(groups)
    assert n == 14
    delta = delta_parameter_names(model.net)
    for row in rec.rows:
        s = row["step"]
        want = {n - 1: 1e-2}
        if s >= 2:
            want[n - 2] = 1e-3
        if s >= 5:
            want.update({0: 1e-4, 1: 1e-4})
        state = _group_state(row, groups, delta)
        assert [x[0] for x in state] == [gi in want for gi in range(n)], s
        assert [x[1] for x in state] == pytest.approx([want.get(gi, 0.0) for gi in range(n)]), s
    assert [r["step"] for r in rec.rows] == list(range(7)) and rec.rows[5]["epoch"] == 1
    pgs = model.trainer.optimizers[0].param_groups
    assert len(pgs) > 2  # split
    placed = [id(p) for g in pgs for p in g["params"]]
    assert len(placed) == len(set(placed)) == len(delta)


@pytest.mark.parametrize("backbone", ["resnet18", "vit_tiny_patch16_224", "tf_efficientnet_lite0"])
def test_layer_decay_factors(backbone):
    """Each depth group's LR scale is decay ** (distance from the head); the head has the full LR."""
    kw = VIT if backbone.startswith("vit") else {}
    net = timm.create_model(backbone, num_classes=3, **kw)
    groups = depth_groups(net)
    n = len(groups)
    scale = {id(p): g["lr"] / 1e-3 for g in param_groups(net, 1e-3, 0.05, layer_decay=0.75) for p in g["params"]}
    params = dict(net.named_parameters())
    for gi, names in enumerate(groups):
        for name in names:
            assert scale[id(params[name])] == pytest.approx(0.75 ** (n - 1 - gi)), name
    assert {scale[id(params[nm])] for nm in groups[-1]} == {1.0}


@pytest.mark.parametrize("kind", ["onecycle", "plateau"])
def test_lr_schedulers_keep_working_across_phases(kind):
    """One-cycle and plateau schedulers run on through phase changes: at every step all groups share the
    scheduler's factor relative to their own peak LR (phase LR or layer-decayed LR)."""

    class Model(TransferClassifier):
        def training_step(self, batch, batch_idx):
            self.log("constant", 1.0)  # never improves: the plateau scheduler halves the LRs every epoch
            return super().training_step(batch, batch_idx)

        def configure_optimizers(self):
            groups = param_groups(self.net, self.hparams.lr, 0.0, layer_decay=self.hparams.layer_decay)
            opt = torch.optim.AdamW(groups, lr=self.hparams.lr)
            if kind == "onecycle":
                sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups],
                                                            total_steps=int(self.trainer.estimated_stepping_batches))
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "constant", "interval": "epoch"}}

    model = Model("resnet18", weights=None, num_classes=3, strategy="full", lr=1e-2, layer_decay=0.8)
    peak = {"fc.weight": 1e-2}
    cb = GradualUnfreeze([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "groups": [-2], "lr": 2e-3},
                          {"at_epoch": 2, "groups": [-3]}], verbose=False)
    rec = Recorder()
    _trainer([cb, rec], max_epochs=4).fit(model, _loader())
    groups = depth_groups(model.net)
    peak[groups[-2][0]] = 2e-3
    peak[groups[-3][0]] = 1e-2 * 0.8 ** 2
    if kind == "onecycle":
        ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=1.0, total_steps=12)
        factors = []
        for _ in range(12):
            factors.append(ref_opt.param_groups[0]["lr"])
            ref_opt.step()
            ref.step()
    for row in rec.rows:
        f = row["lr"]["fc.weight"] / peak["fc.weight"]
        for name, pk in peak.items():
            assert row["lr"][name] / pk == pytest.approx(f, rel=1e-6), (row["step"], name)
        if kind == "onecycle":
            assert f == pytest.approx(factors[row["step"]], rel=1e-6)
        else:
            assert f == pytest.approx(0.5 ** max(0, row["epoch"] - 1), rel=1e-6)
    assert rec.rows[-1]["grad"][groups[-3][0]] and not rec.rows[-1]["grad"][groups[-4][0]]


def test_a_second_fit_without_checkpoint_starts_again_at_phase_zero():
    model = _model("resnet18")
    cb = GradualUnfreeze([{"at_step": 0, "groups": ["head"]}, {"at_step": 2, "groups": [-2]}], verbose=False)
    _trainer([cb], max_steps=3, max_epochs=-1).fit(model, _loader())
    assert cb.phase == 1
    rec = Recorder()
    _trainer([cb, rec], max_steps=1, max_epochs=-1).fit(model, _loader())
    assert {n for n, g in rec.rows[0]["grad"].items() if g} == {"fc.weight", "fc.bias"} and cb.phase == 0


# ---------------------------------------------------------------------------------------------- BatchNorm
def _bn_trains(bn: str, group: int, thawed: set) -> bool:
    return bn == "train" or (bn == "frozen" and group in thawed)


@pytest.mark.parametrize("bn", ["frozen", "eval", "train"])
def test_batchnorm_policy_through_train_eval_toggling(bn):
    """bn='frozen': a frozen group's BN stays in eval mode (stats fixed) through validation's eval()/train()
    toggling, and trains again once its group thaws; bn='eval': no BN ever trains, not even thawed ones
    (the schedule applies the module's policy, not its own); bn='train': every BN trains."""
    model = _model("resnet18", bn=bn, lr=1e-3)
    groups = depth_groups(model.net)
    bn_group = {}
    for gi, g in enumerate(groups):
        for name in g:
            bn_group.setdefault(name.rsplit(".", 1)[0], gi)
    start = {k: v.clone() for k, v in model.net.state_dict().items() if "running_mean" in k}
    cb = GradualUnfreeze([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "groups": [-2]}], verbose=False)
    rec = Recorder()
    trainer = _trainer([cb, rec], max_epochs=2, num_sanity_val_steps=1, limit_val_batches=1)
    trainer.fit(model, _loader(), val_dataloaders=_loader(8))
    n = len(groups)
    for row in rec.rows:
        thawed = {n - 2} if row["epoch"] >= 1 else set()
        for mod, training in row["bn_training"].items():
            assert training == _bn_trains(bn, bn_group[mod], thawed), (row["step"], mod)
    for key, before in start.items():
        changed = not torch.equal(model.net.state_dict()[key], before)
        assert changed == _bn_trains(bn, bn_group[key.rsplit(".", 1)[0]], {n - 2}), key
    assert any(_bn_trains(bn, g, {n - 2}) for g in bn_group.values()) == (bn != "eval")


def test_schedule_bn_option_overrides_the_module_policy():
    """GradualUnfreeze(bn='eval') keeps every BatchNorm in eval mode even under a module with bn='train'."""
    model = _model("resnet18", bn="train", lr=1e-3)
    start = {k: v.clone() for k, v in model.net.state_dict().items() if "running_mean" in k}
    cb = GradualUnfreeze([{"at_step": 0, "groups": ["head"]}, {"at_step": 1, "groups": [-2, -3]}], bn="eval",
                         verbose=False)
    _trainer([cb], max_steps=3, max_epochs=-1).fit(model, _loader())
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in start.items())
    with pytest.raises(ScheduleError, match="bn must be 'frozen', 'eval', 'train' or None, got 'off'"):
        GradualUnfreeze(bn="off")


# ---------------------------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("strategy, backbone", [("bitfit", "resnet18"), ("lora", "vit_tiny_patch16_224")])
def test_schedule_thaws_only_the_strategys_parameters(strategy, backbone):
    model = _model(backbone, strategy)
    delta = delta_parameter_names(model.net)
    phases = auto_phases(model.net, groups_per_phase=3)
    cb = GradualUnfreeze(groups_per_phase=3, verbose=False)
    rec = Recorder()
    _trainer([cb, rec], max_epochs=3).fit(model, _loader())
    for row in rec.rows:
        on = {n for n, g in row["grad"].items() if g}
        assert on <= delta
    last = {n for n, g in rec.rows[-1]["grad"].items() if g}
    assert last == cb.schedule.trainable(2) and len(last) < len(delta)
    if strategy == "lora":  # the stem has no LoRA layer: the generated schedule skips it
        assert all(0 not in [group_index(g, len(cb.schedule.groups)) for g in p["groups"]] for p in phases)


# ---------------------------------------------------------------------------------------------- resume
def _fit(model, cb, ckdir, max_epochs, ckpt_path=None, max_steps=-1):
    ck = ModelCheckpoint(dirpath=ckdir, filename="{epoch}", every_n_epochs=2, save_top_k=-1,
                         save_on_train_epoch_end=True)
    rec = Recorder()

    class AtStart(Callback):
        def on_fit_start(self, trainer, pl_module):
            rec.start = (cb.phase, {n for n, p in pl_module.net.named_parameters() if p.requires_grad})

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb, AtStart(), rec, ck], max_epochs=max_epochs,
                        max_steps=max_steps)
    trainer.fit(model, _loader(), ckpt_path=ckpt_path)
    return trainer, rec


def _optimizer_tensors(trainer):
    sd = trainer.optimizers[0].state_dict()
    out = {(k, kk): v for k, st in sd["state"].items() for kk, v in st.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])} for g in sd["param_groups"]]
    return out, groups


@pytest.mark.parametrize("strategy, backbone, unit", [
    ("full", "resnet18", "epoch"),
    ("lora", "vit_tiny_patch16_224", "step"),
])
def test_resume_mid_schedule_is_exact(tmp_path, strategy, backbone, unit):
    """Stop after epoch 1 (mid-schedule), resume from that checkpoint: same weights, optimizer state and
    phase as the uninterrupted run; requires_grad is restored before the first training step."""
    if unit == "epoch":
        phases = [{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "groups": [-2]},
                  {"at_epoch": 2, "groups": [-3, -4], "lr": 3e-3}, {"at_epoch": 3, "groups": ["stem"]}]
        kw = dict(layer_decay=0.7, warmup_steps=2)
    else:  # 3 steps per epoch: phase 2 starts mid-epoch 2, after the resume
        phases = [{"at_step": 0, "groups": ["head"]}, {"at_step": 4, "groups": [-2], "lr": 2e-3},
                  {"at_step": 7, "groups": [-3, -4, -5]}, {"at_step": 10, "regex": r"^blocks\.[0-3]\."}]
        kw = dict(warmup_steps=0)

    def run(ckdir, ckpt=None):
        L.seed_everything(0)
        model = _model(backbone, strategy, lr=1e-2, **kw)
        cb = GradualUnfreeze(phases, verbose=False)
        trainer, rec = _fit(model, cb, ckdir, 4, ckpt)
        return model, cb, trainer, rec

    m1, cb1, t1, rec1 = run(tmp_path / "a")
    ckpt = tmp_path / "a" / "epoch=1.ckpt"
    assert ckpt.exists()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert [v for k, v in saved["callbacks"].items() if "GradualUnfreeze" in k] == [{"phase": 1, "num_phases": 4}]
    m2, cb2, t2, rec2 = run(tmp_path / "b", ckpt)

    assert cb1.phase == cb2.phase == 3
    # the loaded phase's requires_grad state is in place at fit start, before any resumed step
    assert rec2.start[0] == 1 and rec2.start[1] == cb2.schedule.trainable(1)
    assert [r["step"] for r in rec2.rows] == [r["step"] for r in rec1.rows][6:]
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    diff = [k for k in sd1 if not torch.equal(sd1[k], sd2[k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"
    s1, g1 = _optimizer_tensors(t1)
    s2, g2 = _optimizer_tensors(t2)
    assert s1.keys() == s2.keys() and all(torch.equal(torch.as_tensor(s1[k]), torch.as_tensor(s2[k])) for k in s1)
    assert g1 == g2
    for a, b in zip(rec1.rows[6:], rec2.rows):
        assert a["grad"] == b["grad"] and a["lr"] == b["lr"]


# ---------------------------------------------------------------------------------------------- generated YAML, configs
def test_schedule_command_prints_yaml_that_round_trips():
    out = io.StringIO()
    with redirect_stdout(out):
        rc = schedule_main(["--model.backbone", "resnet18", "--every_n_epochs", "2", "--groups_per_phase", "2"])
    assert rc == 0
    text = out.getvalue()
    assert "# fc (" in text and "layer4.1" in text
    cfg = yaml.safe_load(text)
    entry = cfg["trainer"]["callbacks"][0]
    assert entry["class_path"] == "visiontune.schedule.GradualUnfreeze"
    phases = entry["init_args"]["phases"]
    assert phases[0] == {"at_epoch": 0, "groups": ["head"]}
    assert phases[1] == {"at_epoch": 2, "groups": [-2, -3]} and phases[-1]["at_epoch"] == 2 * (len(phases) - 1)
    net = timm.create_model("resnet18", num_classes=3)
    r = GradualUnfreeze(**entry["init_args"]).resolve(net)
    assert r.trainable(len(phases) - 1) == {n for n, _ in net.named_parameters()}
    assert auto_phases(net, every_n_epochs=2, groups_per_phase=2) == phases


def test_schedule_command_errors_and_cli_registration(capsys):
    from visiontune import cli

    assert cli.main(["schedule", "--model.backbone", "no_such_net"]) == 2
    assert "unknown timm model 'no_such_net'" in capsys.readouterr().err
    assert {"schedule", "lr-find"} <= set(cli.TOOLS) and cli.DEPRECATED_TOOLS == {"lr_find": "lr-find"}
    # the tools' modules must not import lightning (``visiontune --help`` imports none of them)
    code = "import sys, visiontune.cli as c; [c.load_tool(n) for n in c.TOOLS]; print('lightning' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip() == "False"


@pytest.mark.parametrize("name", ["schedule_explicit.yaml", "schedule_auto.yaml"])
def test_configs_parse_and_resolve(name):
    from visiontune.cli import cli_class

    cli = cli_class()(args=["--config", str(ROOT / "configs" / name), "--model.weights", "null"], run=False)
    cbs = [c for c in cli.trainer.callbacks if isinstance(c, GradualUnfreeze)]
    assert len(cbs) == 1
    net = timm.create_model(cli.model.hparams.backbone, num_classes=10)
    apply_strategy(net, cli.model.hparams.strategy, cli.model.hparams.strategy_args)
    r = cbs[0].resolve(net)
    assert len(r.phases) >= 3


# ---------------------------------------------------------------------------------------------- LR finder
def test_lr_find_trains_phase_zero_and_restores_everything():
    model = _model("resnet18", lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = GradualUnfreeze([{"at_epoch": 0, "groups": ["head", -2]}, {"at_epoch": 1, "groups": [-3]}], verbose=False)
    trainer = _trainer([cb], max_epochs=1)
    result = lr_find(model, trainer=trainer, train_dataloaders=_loader(), num_training=20, min_lr=1e-5, max_lr=1.0)
    head_and_last = sum(p.numel() for n, p in model.net.named_parameters() if n in cb.schedule.trainable(0))
    assert result.trained == "phase 0 of the schedule" and result.trainable == head_and_last
    assert len(result.lrs) == 20 and result.lrs == sorted(result.lrs)
    # the suggestion is the steepest fall of the recorded (smoothed) losses past the first 10 steps
    losses = np.array(result.losses[10:-1])
    finite = np.isfinite(losses)
    steepest = 10 + np.flatnonzero(finite)[np.argmin(np.gradient(losses[finite]))]
    assert result.suggestion == result.lrs[steepest]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.net.parameters())  # strategy 'full' state restored
    assert trainer.callbacks == [cb]


def test_lr_find_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with redirect_stdout(out):
        rc = lr_find_main(["--config", str(ROOT / "configs" / "schedule_explicit.yaml"), "--num_training", "15",
                           "--plot", "lr.png", "--data.image_size", "32", "--data.batch_size", "16",
                           "--data.labels_per_class", "8", "--model.weights", "null"])
    text = out.getvalue()
    assert rc == 0, text
    assert "trained phase 0 of the schedule" in text and re.search(r"use it: --model.lr [0-9.e-]+", text)
    assert (tmp_path / "lr.png").stat().st_size > 0
    assert not list(tmp_path.glob(".lr_find*")) and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_gradual_unfreezing_beats_last_k_when_batchnorm_statistics_train():
    """The claim this supports: when BatchNorm statistics are re-estimated (bn="train"), thawing gradually
    beats training the last stages from the start. It does *not* claim gradual beats last_k at each one's
    best BatchNorm policy: there they tie (numbers below).

    Pretrained EfficientNet-Lite0 (offline weights), scikit-learn digits at 48 px, 20 labels per class,
    8 epochs (56 steps) each, identical settings (lr 2e-3 cosine, bn="train") except what trains:

    - last_k: the last 2 coarse stages + head, from the start;
    - gradual: the generated schedule (coarse groups, 2 per phase, every epoch: head, then everything by
      epoch 4).

    Measured val accuracy over seeds 0-3: last_k 0.855 / 0.770 / 0.826 / 0.768, gradual 0.918 / 0.887 /
    0.928 / 0.902 (margin +0.06 to +0.13). For reference, last_k with bn="frozen" (its better policy
    here) gets 0.918 / 0.909 / 0.905 / 0.913: a tie with gradual (within +-0.022); gradual with
    bn="frozen" is worse (0.83): thawing switches a BatchNorm from ImageNet running statistics to batch
    statistics mid-run, which costs a lot on data this far from ImageNet.
    """
    from visiontune import ImageDataModule

    def run(strategy, strategy_args, callbacks):
        L.seed_everything(0)
        dm = ImageDataModule(train="digits", image_size=48, batch_size=32, labels_per_class=20, val_split=0.3,
                             hflip=False, crop_scale=(0.85, 1.0), seed=0)
        model = TransferClassifier("tf_efficientnet_lite0", weights="package", strategy=strategy,
                                   strategy_args=strategy_args, lr=2e-3, warmup_steps=0.05, bn="train")
        trainer = _trainer(callbacks, max_epochs=8, num_sanity_val_steps=0, check_val_every_n_epoch=8)
        trainer.fit(model, dm)
        return float(trainer.callback_metrics["val_acc"])

    last_k = run("last_k", {"k": 2, "coarse": True}, [])
    gradual = run("full", None, [GradualUnfreeze(groups_per_phase=2, coarse=True, verbose=False)])
    print(f"digits val acc: last_k {last_k:.4f}  gradual {gradual:.4f}")
    assert gradual >= last_k + 0.02, (gradual, last_k)
