"""One EMA for both uses (#12): ``model.ema`` and FixMatch's teacher are a WeightEMA; its averages are
bit-identical to the implementation before (per-tensor ``lerp`` with the ``(1 + n) / (10 + n)`` warm-up, once per
optimizer step), tied tensors included, and its state resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from visiontune import TransferClassifier
from visiontune.objectives.fixmatch import FixMatchState
from visiontune.objectives.semisup import FixMatchConfig
from visiontune.training.ema import WeightEMA, ema_decay


def _net(tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    if tied:
        net[2].weight = net[0].weight  # one tensor under two names
    return net


def _reference(net: nn.Module, decay: float, steps: int) -> dict[str, torch.Tensor]:
    """The EMA as it was computed before: a copy, then per step ``t.lerp_(s, 1 - d_n)`` over named parameters
    and floating buffers (integer buffers copied), ``d_n = min(decay, (1 + n) / (10 + n))``."""
    teacher = copy.deepcopy(net)
    student = net
    for n in range(steps):
        _train_step(student, n)
        d = min(decay, (1.0 + n) / (10.0 + n))
        with torch.no_grad():
            s_params, s_bufs = dict(student.named_parameters()), dict(student.named_buffers())
            for k, t in teacher.named_parameters():
                t.lerp_(s_params[k].detach(), 1.0 - d)
            for k, t in teacher.named_buffers():
                t.lerp_(s_bufs[k], 1.0 - d) if t.is_floating_point() else t.copy_(s_bufs[k])
    return teacher.state_dict()


def _train_step(net: nn.Module, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    net.train()
    net(torch.randn(8, 4, generator=g))  # BatchNorm running statistics move


@pytest.mark.parametrize("tied", [False, True])
def test_weight_ema_is_bit_identical_to_the_previous_averaging(tied):
    expected = _reference(_net(tied), 0.99, 25)
    net, ema = _net(tied), WeightEMA(0.99)
    ema.ensure(net)
    for n in range(25):
        _train_step(net, n)
        ema.update(net, step=n + 1)
        ema.update(net, step=n + 1)  # gradient accumulation: the same optimizer step again, skipped
    assert ema.teacher.num_updates == 25
    got = ema.module.state_dict()
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k]), k
    if tied:  # the shared tensor moved once per step, and is still shared
        assert ema.module[2].weight is ema.module[0].weight


def test_weight_ema_state_resumes_exactly():
    net, ema = _net(), WeightEMA(0.9)
    ema.ensure(net)
    for n in range(3):
        _train_step(net, n)
        ema.update(net, step=n + 1)
    state = copy.deepcopy(ema.state_dict())
    assert state["last_step"] == 3 and state["teacher"]["num_updates"] == 3
    resumed = WeightEMA(0.9)
    resumed.load_state_dict(state)  # pending until built
    assert resumed.module is None and resumed.num_updates == 3
    resumed.ensure(copy.deepcopy(net))
    for n in range(3, 6):
        _train_step(net, n)
        ema.update(net, step=n + 1)
        resumed.update(net, step=n + 1)
    assert resumed.teacher.decay == ema.teacher.decay == ema_decay(0.9, 5)
    for (k, a), (_, b) in zip(ema.module.state_dict().items(), resumed.module.state_dict().items()):
        assert torch.equal(a, b), k


def test_fixmatch_teacher_is_a_weight_ema_with_the_same_checkpoint_format():
    state = FixMatchState(FixMatchConfig(mu=1, ema=0.9))
    assert isinstance(state.teacher, WeightEMA) and state.teacher.decay == 0.9
    assert FixMatchState(FixMatchConfig(mu=1)).teacher is None
    model = TransferClassifier("resnet18", weights=None, num_classes=3, semi_supervised={"mu": 1, "ema": 0.9})
    fm = model._fixmatch
    teacher = fm.teacher_module(model)
    assert teacher is fm.teacher.module is model.evaluated_net() and not teacher.training
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.5)
    fm.teacher.update(model.net, step=1)
    saved = fm.state_dict()
    assert sorted(saved) == ["config", "da", "flex", "last_ema_step", "teacher"]
    assert saved["last_ema_step"] == 1 and sorted(saved["teacher"]) == ["decay", "module", "num_updates"]
    assert saved["teacher"]["decay"] == ema_decay(0.9, 0)
    other = TransferClassifier("resnet18", weights=None, num_classes=3, semi_supervised={"mu": 1, "ema": 0.9})
    other._fixmatch.load_state_dict(saved)  # a checkpoint of before loads the same way
    restored = other._fixmatch.teacher_module(other)
    assert other._fixmatch.teacher.last_step == 1
    for (k, a), (_, b) in zip(restored.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(a, b), k
