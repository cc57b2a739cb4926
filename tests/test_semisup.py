"""FixMatch building blocks on hand-made logits: masks, targets, losses, and stateful helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visiontune.objectives.semisup import (
    DistributionAlignment,
    EMATeacher,
    FixMatchConfig,
    FlexMatchThresholds,
    fixmatch_loss,
    forward_train,
    predict_weak,
    pseudo_labels,
    unlabeled_loss,
    unsup_weight,
)


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.0}, "threshold"),
        ({"mu": 0}, "mu"),
        ({"mu": 1.5}, "mu"),
        ({"lambda_u": -0.1}, "lambda_u"),
        ({"temperature": 0.0}, "temperature"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"ema": 1.0}, "ema"),
        ({"ema": 0.0}, "ema"),
        ({"class_thresholds": "adaptive"}, "class_thresholds"),
        ({"bn": "split"}, "bn"),
        ({"hard_labels": "yes"}, "hard_labels"),
    ],
)
def test_config_rejects_bad_values_naming_the_option(kw, name):
    with pytest.raises(ValueError, match=rf"FixMatchConfig\.{name} must be"):
        FixMatchConfig(**kw)


def test_config_defaults_are_the_paper():
    cfg = FixMatchConfig()
    assert (cfg.threshold, cfg.mu, cfg.lambda_u, cfg.temperature, cfg.hard_labels) == (0.95, 7, 1.0, 1.0, True)
    assert cfg.ema is None and cfg.bn == "concat" and cfg.class_thresholds == "fixed"
    with pytest.raises(ValueError, match=r"one of \('concat', 'separate'\)"):
        FixMatchConfig(bn="x")


# --- masks and targets -----------------------------------------------------------------------


def test_mask_counts_probability_equal_to_threshold():
    # softmax of equal logits is exactly 1/C in float32: p == tau exactly.
    two = torch.zeros(1, 2)
    four = torch.zeros(1, 4)
    assert pseudo_labels(two, FixMatchConfig(threshold=0.5))[1].tolist() == [True]
    assert pseudo_labels(four, FixMatchConfig(threshold=0.25))[1].tolist() == [True]
    # the next float32 above tau is not reached (masks compare in float32)
    above = 0.5 + 2.0**-24
    assert pseudo_labels(two, FixMatchConfig(threshold=above))[1].tolist() == [False]


def test_mask_and_hard_targets_on_hand_made_logits():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 10.0]])
    targets, mask = pseudo_labels(logits, FixMatchConfig(threshold=0.95))
    p = torch.softmax(logits, -1).max(-1).values  # 0.9647, 0.5761, 0.9999
    assert p[0] > 0.95 > p[1]
    assert targets.tolist() == [0, 1, 2] and targets.dtype == torch.int64
    assert mask.tolist() == [True, False, True] and mask.dtype == torch.bool


def test_temperature_scales_logits_before_mask_and_targets():
    logits = torch.tensor([[2.0, 0.0]])  # p = 0.881 at T=1
    cfg1 = FixMatchConfig(threshold=0.95, hard_labels=False)
    cfg_sharp = FixMatchConfig(threshold=0.95, hard_labels=False, temperature=0.5)
    t1, m1 = pseudo_labels(logits, cfg1)
    t2, m2 = pseudo_labels(logits, cfg_sharp)
    assert torch.allclose(t1, torch.softmax(logits, -1))
    assert torch.allclose(t2, torch.softmax(logits / 0.5, -1))  # 0.982
    assert m1.tolist() == [False] and m2.tolist() == [True]


def test_soft_targets_are_probabilities_and_hard_targets_argmax():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    soft, _ = pseudo_labels(logits, FixMatchConfig(hard_labels=False, temperature=0.7))
    hard, _ = pseudo_labels(logits, FixMatchConfig(hard_labels=True, temperature=0.7))
    assert soft.shape == (5, 4) and torch.allclose(soft.sum(-1), torch.ones(5))
    assert torch.equal(hard, soft.argmax(-1))
    assert not soft.requires_grad


def test_distribution_alignment_renormalises_and_reweights():
    probs_logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]))
    mean = torch.tensor([0.5, 0.25, 0.25])
    cfg = FixMatchConfig(hard_labels=False, distribution_alignment=True)
    soft, _ = pseudo_labels(probs_logits, cfg, class_prob_mean=mean)
    assert torch.allclose(soft.sum(-1), torch.ones(2))
    expected = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]) * (1 / 3) / mean
    expected = expected / expected.sum(-1, keepdim=True)
    assert torch.allclose(soft, expected, atol=1e-6)
    # over-predicted class 0 is damped: row 0 goes from 0.6 to 1.2 / 2.8
    assert soft[0, 0] == pytest.approx(3 / 7, abs=1e-6)
    # a non-uniform target distribution
    target = torch.tensor([0.5, 0.25, 0.25])
    soft_t, _ = pseudo_labels(probs_logits, cfg, class_prob_mean=mean, target_dist=target)
    assert torch.allclose(soft_t, torch.softmax(probs_logits, -1), atol=1e-6)  # target == mean: no-op


def test_inconsistent_state_arguments_raise():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs class_prob_mean"):
        pseudo_labels(z, FixMatchConfig(distribution_alignment=True))
    with pytest.raises(ValueError, match="distribution_alignment=False"):
        pseudo_labels(z, FixMatchConfig(), class_prob_mean=torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="needs flex_state"):
        pseudo_labels(z, FixMatchConfig(class_thresholds="flexmatch"))
    with pytest.raises(ValueError, match="class_thresholds='fixed'"):
        pseudo_labels(z, FixMatchConfig(), flex_state=torch.ones(3))


def test_flexmatch_tensor_thresholds_are_per_predicted_class():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.7, 0.2], [0.1, 0.2, 0.7]]))
    thr = torch.tensor([0.5, 0.9, 0.7])
    _, mask = pseudo_labels(logits, FixMatchConfig(class_thresholds="flexmatch"), flex_state=thr)
    assert mask.tolist() == [True, False, True]  # 0.7 >= 0.7 counts on the last row


# --- losses --------------------------------------------------------------------------------------


def test_unlabeled_loss_averages_over_all_samples():
    strong = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([True, False, True, False])
    ce = F.cross_entropy(strong, targets, reduction="none")
    expected = (ce[0] + ce[2]) / 4
    assert torch.allclose(unlabeled_loss(strong, targets, mask), expected)
    soft = F.one_hot(targets, 2).float()
    assert torch.allclose(unlabeled_loss(strong, soft, mask), expected)


def test_unlabeled_loss_is_zero_with_empty_mask_and_backprops():
    strong = torch.randn(3, 4, requires_grad=True)
    loss = unlabeled_loss(strong, torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(strong.grad, torch.zeros(3, 4))
    empty = torch.zeros(0, 4, requires_grad=True)
    assert unlabeled_loss(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)).item() == 0.0


def test_unsup_weight_linear_warmup():
    cfg = FixMatchConfig(lambda_u=2.0, warmup_steps=4)
    assert [unsup_weight(s, cfg) for s in (0, 1, 2, 4, 100)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    assert unsup_weight(0, FixMatchConfig(lambda_u=0.5)) == 0.5
    with pytest.raises(ValueError, match="step"):
        unsup_weight(-1, cfg)


def test_fixmatch_loss_weighted_and_only_strong_gets_grads():
    weak = torch.tensor([[5.0, 0.0], [0.0, 0.0], [0.0, 6.0]], requires_grad=True)
    strong = torch.zeros(3, 2, requires_grad=True)
    cfg = FixMatchConfig(threshold=0.9, lambda_u=3.0, warmup_steps=10)
    out = fixmatch_loss(strong, weak, cfg, step=5)
    assert out.mask.tolist() == [True, False, True] and out.weight == 1.5
    assert torch.allclose(out.loss_u, torch.tensor(2 * math.log(2) / 3))
    assert torch.allclose(out.loss, 1.5 * out.loss_u)
    assert out.mask_rate.item() == pytest.approx(2 / 3)
    out.loss.backward()
    assert weak.grad is None and strong.grad is not None


def test_fixmatch_loss_updates_da_and_flex_state():
    n, c = 6, 3
    weak = torch.log(torch.tensor([[0.9, 0.05, 0.05]] * 3 + [[0.05, 0.9, 0.05]] * 3))
    with pytest.raises(ValueError, match="needs da="):
        fixmatch_loss(weak, weak, FixMatchConfig(distribution_alignment=True))
    with pytest.raises(ValueError, match="indices"):
        fixmatch_loss(weak, weak, FixMatchConfig(class_thresholds="flexmatch"),
                      flex=FlexMatchThresholds(n, c))
    # FlexMatch: first step thresholds are all 0 (nothing learned yet) so everything passes,
    # then the confident (>= 0.8) predictions are recorded per pool index.
    cfg = FixMatchConfig(threshold=0.8, class_thresholds="flexmatch")
    flex = FlexMatchThresholds.from_config(cfg, n + 2, c)
    idx = torch.tensor([7, 6, 5, 0, 1, 2])
    out = fixmatch_loss(weak.clone(), weak, cfg, flex=flex, indices=idx)
    assert out.mask.all()
    assert flex.selected.tolist() == [1, 1, 1, -1, -1, 0, 0, 0]
    # DA: the running mean is updated with this batch before aligning, targets are aligned probs
    cfg = FixMatchConfig(threshold=0.8, distribution_alignment=True, hard_labels=False)
    da = DistributionAlignment(c)
    out = fixmatch_loss(weak.clone(), weak, cfg, da=da)
    assert da.steps == 1 and torch.allclose(da.mean, torch.tensor([0.475, 0.475, 0.05]))
    expected = torch.softmax(weak, -1) / da.mean
    expected = expected / expected.sum(-1, keepdim=True)  # 0.9/0.475 vs 1.0 on class 2: ~0.63
    assert torch.allclose(out.targets, expected, atol=1e-6)
    assert not out.mask.any()


# --- weak branch ---------------------------------------------------------------------------------


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_predict_weak_builds_no_graph():
    model = _bn_net().train()
    logits = predict_weak(model, torch.randn(5, 4))
    assert logits.shape == (5, 3)
    assert logits.requires_grad is False and logits.grad_fn is None
    assert torch.is_grad_enabled()  # restored


def test_predict_weak_can_leave_bn_running_stats_untouched():
    model = _bn_net().train()
    bn = model[1]
    before = {k: v.clone() for k, v in bn.named_buffers()}
    predict_weak(model, torch.randn(5, 4) * 3 + 1, update_bn_stats=False)
    for k, v in bn.named_buffers():
        assert torch.equal(v, before[k]), k
    predict_weak(model, torch.randn(5, 4) * 3 + 1)
    assert not torch.equal(bn.running_mean, before["running_mean"])
    assert bn.num_batches_tracked.item() == 1


def test_forward_train_concat_and_separate():
    model = _bn_net().train()
    xl, xs = torch.randn(2, 4), torch.randn(6, 4)
    ll, ls = forward_train(model, xl, xs, "concat")
    full = model(torch.cat([xl, xs]))
    assert torch.allclose(torch.cat([ll, ls]), full)
    ll2, ls2 = forward_train(model, xl, xs, "separate")
    assert ll2.shape == (2, 3) and ls2.shape == (6, 3)
    assert not torch.allclose(ll2, ll)  # BN statistics differ per batch
    assert ll.grad_fn is not None
    with pytest.raises(ValueError, match="bn must be one of"):
        forward_train(model, xl, xs, "both")


# --- stateful helpers ----------------------------------------------------------------------------


def test_distribution_alignment_running_mean_and_state_dict():
    da = DistributionAlignment(2, momentum=0.9)
    da.update(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))  # first batch sets the mean
    assert torch.allclose(da.mean, torch.tensor([0.75, 0.25]))
    da.update(torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(da.mean, torch.tensor([0.9 * 0.75, 0.9 * 0.25 + 0.1]))
    aligned = da.align(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    assert torch.allclose(aligned.sum(-1), torch.ones(2))
    assert aligned[0, 1] > 0.5  # under-predicted class 1 boosted
    other = DistributionAlignment(2)
    other.load_state_dict(da.state_dict())
    assert torch.equal(other.mean, da.mean) and other.steps == 2 and other.momentum == 0.9
    with pytest.raises(ValueError, match="expected 3"):
        DistributionAlignment(3).load_state_dict(da.state_dict())
    assert DistributionAlignment(5).momentum == 0.999


def test_flexmatch_thresholds_equal_tau_when_classes_learned_equally():
    flex = FlexMatchThresholds(num_samples=6, num_classes=3, threshold=0.9)
    assert torch.equal(flex.thresholds(), torch.zeros(3))  # nothing learned: all pass (warm-up)
    probs = torch.tensor([[0.95, 0.03, 0.02], [0.03, 0.95, 0.02], [0.02, 0.03, 0.95]]).repeat(2, 1)
    flex.update(torch.arange(6), probs)
    assert flex.counts().tolist() == [2.0, 2.0, 2.0]
    assert torch.allclose(flex.thresholds(), torch.full((3,), 0.9))


def test_flexmatch_lower_threshold_for_under_learned_class_and_warmup():
    flex = FlexMatchThresholds(num_samples=10, num_classes=2, threshold=0.9)
    conf0, conf1, unsure = [0.95, 0.05], [0.05, 0.95], [0.6, 0.4]
    probs = torch.tensor([conf0] * 4 + [conf1] * 2 + [unsure] * 4)
    flex.update(torch.arange(10), probs)
    # sigma = (4, 2), unused = 4: warm-up denominator max(4, 4) = 4
    beta = torch.tensor([1.0, 0.5])
    assert torch.allclose(flex.beta(), beta)
    expected = 0.9 * beta / (2 - beta)  # convex mapping: (0.9, 0.3)
    assert torch.allclose(flex.thresholds(), expected)
    assert flex.thresholds()[1] < flex.thresholds()[0]
    # warm-up: with many unused samples beta is normalised by the unused count
    warm = FlexMatchThresholds(num_samples=100, num_classes=2, threshold=0.9)
    warm.update(torch.arange(3), torch.tensor([conf0, conf0, conf1]))
    assert torch.allclose(warm.beta(), torch.tensor([2 / 97, 1 / 97]))
    nowarm = FlexMatchThresholds(num_samples=100, num_classes=2, threshold=0.9, warmup=False)
    nowarm.update(torch.arange(3), torch.tensor([conf0, conf0, conf1]))
    assert torch.allclose(nowarm.beta(), torch.tensor([1.0, 0.5]))
    # a later confident prediction overwrites, an unconfident one keeps the old label
    flex.update(torch.tensor([0, 1]), torch.tensor([conf1, unsure]))
    assert flex.selected[:2].tolist() == [1, 0]


def test_flexmatch_state_dict_round_trip_and_errors():
    flex = FlexMatchThresholds(num_samples=5, num_classes=2, threshold=0.8)
    flex.update(torch.tensor([1, 3]), torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    other = FlexMatchThresholds(num_samples=5, num_classes=2)
    other.load_state_dict(flex.state_dict())
    assert torch.equal(other.selected, flex.selected) and other.threshold == 0.8
    assert torch.equal(other.thresholds(), flex.thresholds())
    with pytest.raises(ValueError, match="5 samples"):
        FlexMatchThresholds(num_samples=6, num_classes=2).load_state_dict(flex.state_dict())
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        flex.update(torch.tensor([5]), torch.tensor([[0.9, 0.1]]))


def test_ema_update_formula_is_exact_for_params_and_buffers():
    student = _bn_net()
    with torch.no_grad():  # dyadic values so that decay 0.5 arithmetic is exact
        for p in student.parameters():
            p.copy_(torch.randint(-8, 8, p.shape).float() / 4)
    ema = EMATeacher(student, decay=0.5)
    teacher0 = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(2.0)
        student[1].num_batches_tracked.fill_(7)
    ema.update(student)
    t = ema.module.state_dict()
    s = student.state_dict()
    for k in t:
        if k.endswith("num_batches_tracked"):
            assert t[k].item() == 7  # integer buffers are copied
        else:
            assert torch.equal(t[k], 0.5 * teacher0[k] + 0.5 * s[k]), k
    assert ema.num_updates == 1
    # general decay
    ema9 = EMATeacher(student, decay=0.9)
    before = ema9.module[0].weight.clone()
    with torch.no_grad():
        student[0].weight.mul_(3)
    ema9.update(student)
    assert torch.allclose(ema9.module[0].weight, 0.9 * before + 0.1 * student[0].weight, atol=1e-7)


def test_ema_teacher_is_frozen_eval_and_update_builds_no_graph():
    student = _bn_net().train()
    ema = EMATeacher(student, decay=0.99)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    loss = student(torch.randn(4, 4)).sum()
    ema.update(student)
    assert all(p.grad_fn is None for p in ema.module.parameters())
    loss.backward()  # the student's graph is intact
    y = ema(torch.randn(2, 4))
    assert y.grad_fn is None and y.shape == (2, 3)
    with ema.evaluating() as m:
        assert not torch.is_grad_enabled() and m is ema.module
    assert torch.is_grad_enabled()
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(student, decay=1.0)


def test_ema_state_dict_round_trip():
    student = _bn_net()
    ema = EMATeacher(student, decay=0.9)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3)
    ema.update(student)
    ema.update(student)
    fresh = EMATeacher(_bn_net(), decay=0.5)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.decay == 0.9 and fresh.num_updates == 2 and not fresh.module.training
    for (k, a), (_, b) in zip(ema.module.state_dict().items(), fresh.module.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randn(3, 4)
    assert torch.equal(ema(x), fresh(x))
