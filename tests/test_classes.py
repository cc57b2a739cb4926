"""Class expansion: head growth, imprinting, in-place expansion of timm models, old-class protection."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from visiontune.objectives.classes import (
    ClassExpansionConfig,
    distillation_loss,
    expand_classes,
    expand_head,
    freeze_rows,
    imprint_weights,
    new_accuracy_at,
    split_accuracy,
)


def _head(in_f: int = 6, out_f: int = 3, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f, bias=bias)


# --- expand_head / imprint_weights ------------------------------------------------------------


def test_expand_head_keeps_old_rows_bit_identical():
    head = _head()
    w_new, b_new = torch.randn(2, 6), torch.randn(2)
    big = expand_head(head, 2, init_weights=w_new, init_bias=b_new)
    assert (big.in_features, big.out_features) == (6, 5)
    assert torch.equal(big.weight[:3], head.weight) and torch.equal(big.bias[:3], head.bias)
    assert torch.equal(big.weight[3:], w_new) and torch.equal(big.bias[3:], b_new)
    assert big.weight.requires_grad and big.weight is not head.weight
    x = torch.randn(4, 6)
    assert torch.allclose(big(x)[:, :3], head(x))
    default = expand_head(head, 1)
    assert default.out_features == 4 and torch.equal(default.weight[:3], head.weight)


def test_expand_head_preserves_dtype_no_bias_and_frozen_flag():
    head = _head(bias=False).double().requires_grad_(False)
    big = expand_head(head, 2)
    assert big.bias is None and big.weight.dtype == torch.float64 and not big.weight.requires_grad
    with pytest.raises(ValueError, match="no bias"):
        expand_head(head, 1, init_bias=torch.zeros(1))
    with pytest.raises(ValueError, match=r"init_weights must have shape \(2, 6\)"):
        expand_head(_head(), 2, init_weights=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="num_new"):
        expand_head(_head(), 0)
    with pytest.raises(TypeError, match="nn.Linear"):
        expand_head(nn.Conv2d(1, 1, 1), 1)


def test_imprint_direction_is_normalised_class_mean_and_norm_matches_old_rows():
    head = _head()
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(7, 6, generator=g) * torch.tensor([1.0, 5, 1, 1, 1, 1])
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 1])
    w, b = imprint_weights(feats, labels, 2, reference_head=head)
    mean_norm = head.weight.norm(dim=1).mean()
    for j in range(2):
        fj = F.normalize(feats[labels == j], dim=1).mean(0)
        assert torch.allclose(F.normalize(w[j], dim=0), F.normalize(fj, dim=0), atol=1e-6)
        assert w[j].norm() == pytest.approx(mean_norm.item(), rel=1e-6)
    assert torch.allclose(b, head.bias.mean().expand(2))
    _, no_bias = imprint_weights(feats, labels, 2, reference_head=_head(bias=False))
    assert no_bias is None


def test_imprint_errors_name_the_problem():
    head = _head()
    with pytest.raises(ValueError, match=r"new classes \[1\] have no support"):
        imprint_weights(torch.randn(2, 6), torch.tensor([0, 0]), 2, reference_head=head)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        imprint_weights(torch.randn(2, 6), torch.tensor([0, 5]), 2, reference_head=head)
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        imprint_weights(torch.randn(2, 5), torch.tensor([0, 1]), 2, reference_head=head)


# --- expand_classes on timm models ---------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs", [("test_efficientnet", {}), ("test_nfnet", {}), ("test_vit", {"img_size": 32})])
def test_expand_classes_in_place_on_timm_models(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).train()
    head_path = model.pretrained_cfg["classifier"]
    old_head = model.get_classifier()
    old_w, old_b = old_head.weight.detach().clone(), old_head.bias.detach().clone()
    bufs = {k: v.clone() for k, v in model.named_buffers()}
    images = torch.randn(5, 3, 32, 32)
    labels = torch.tensor([0, 1, 0, 1, 1])
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()

    names = expand_classes(model, ["wren", "robin"], (images, labels), old_class_names=["a", "b", "c"])

    assert names == ["a", "b", "c", "wren", "robin"]
    new_head = model.get_classifier()
    assert model.get_submodule(head_path) is new_head and new_head.out_features == 5
    assert model.num_classes == 5
    assert model.training  # mode restored
    assert torch.equal(new_head.weight[:3], old_w) and torch.equal(new_head.bias[:3], old_b)
    for k, v in model.named_buffers():  # support features in eval mode: BN stats untouched
        assert torch.equal(v, bufs[k]), k
    model.eval()
    with torch.no_grad():
        after = model(x)
        feats = model.forward_head(model.forward_features(images), pre_logits=True)
    assert after.shape == (2, 5) and torch.allclose(after[:, :3], before, atol=1e-5)
    for j in range(2):
        mean_dir = F.normalize(F.normalize(feats[labels == j], dim=1).mean(0), dim=0)
        assert torch.allclose(F.normalize(new_head.weight[3 + j], dim=0), mean_dir, atol=1e-5)


def test_expand_classes_without_support_gives_neutral_rows():
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=2)
    old_b = model.get_classifier().bias.detach().clone()
    assert expand_classes(model, ["c"], old_class_names=["a", "b"]) == ["a", "b", "c"]
    head = model.get_classifier()
    assert torch.equal(head.weight[2], torch.zeros(head.in_features))
    assert head.bias[2].item() == pytest.approx(old_b.mean().item())


def test_expand_classes_errors_name_the_classes():
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=2)
    old = ["crow", "gull"]
    imgs = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"already exist among the old classes: \['gull'\]"):
        expand_classes(model, ["wren", "gull"], old_class_names=old)
    with pytest.raises(ValueError, match=r"without any support image: \['robin'\]"):
        expand_classes(model, ["wren", "robin"], (imgs, torch.tensor([0, 0])), old_class_names=old)
    with pytest.raises(ValueError, match=r"repeats \['wren'\]"):
        expand_classes(model, ["wren", "wren"], old_class_names=old)
    with pytest.raises(ValueError, match="has 3 names but the classifier has 2 outputs"):
        expand_classes(model, ["wren"], old_class_names=old + ["owl"])
    with pytest.raises(ValueError, match=r"index new_class_names .*subtract 2"):
        expand_classes(model, ["wren"], (imgs, torch.tensor([2, 2])), old_class_names=old)
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        expand_classes(model, ["wren"], (imgs, torch.tensor([0])), old_class_names=old)
    assert model.get_classifier().out_features == 2  # nothing changed on error


# --- old-class protection ------------------------------------------------------------------------


def test_freeze_rows_gives_exact_zero_grads_for_weight_and_bias():
    head = _head(out_f=5)
    handles = freeze_rows(head, slice(0, 3))
    head(torch.randn(8, 6)).pow(2).sum().backward()
    assert torch.equal(head.weight.grad[:3], torch.zeros(3, 6))
    assert torch.equal(head.bias.grad[:3], torch.zeros(3))
    assert (head.weight.grad[3:] != 0).all() and (head.bias.grad[3:] != 0).all()
    for h in handles:
        h.remove()
    head.zero_grad()
    head(torch.randn(8, 6)).pow(2).sum().backward()
    assert (head.weight.grad[:3] != 0).any()


def test_freeze_rows_with_index_list_and_sgd_keeps_rows_fixed():
    head = _head(out_f=4)
    freeze_rows(head, [0, 2])
    w0 = head.weight.detach().clone()
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(head(torch.randn(8, 6)), torch.randint(0, 4, (8,))).backward()
        opt.step()
    assert torch.equal(head.weight[[0, 2]], w0[[0, 2]])
    assert not torch.equal(head.weight[[1, 3]], w0[[1, 3]])
    with pytest.raises(ValueError, match=r"rows \[7\] are out of range"):
        freeze_rows(head, [7])


def test_distillation_loss():
    z = torch.randn(4, 3)
    assert distillation_loss(z, z).item() == pytest.approx(0.0, abs=1e-7)
    assert distillation_loss(torch.cat([z, torch.randn(4, 2)], 1), z).item() == pytest.approx(0.0, abs=1e-7)
    s = torch.randn(4, 3, requires_grad=True)
    T = 3.0
    loss = distillation_loss(s, z, T=T)
    p_t = torch.softmax(z / T, -1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert torch.allclose(loss, expected, atol=1e-6) and loss.item() > 0
    loss.backward()
    assert s.grad is not None
    with pytest.raises(ValueError, match="at least 3 classes"):
        distillation_loss(torch.randn(4, 2), z)


def test_class_expansion_config_validation():
    cfg = ClassExpansionConfig()
    assert (cfg.distill, cfg.temperature, cfg.freeze_old_rows) == (1.0, 2.0, False)
    with pytest.raises(ValueError, match=r"ClassExpansionConfig\.distill must be a float >= 0"):
        ClassExpansionConfig(distill=-1)
    with pytest.raises(ValueError, match=r"ClassExpansionConfig\.temperature must be a float > 0"):
        ClassExpansionConfig(temperature=0.0)
    with pytest.raises(ValueError, match=r"ClassExpansionConfig\.freeze_old_rows must be a bool"):
        ClassExpansionConfig(freeze_old_rows=1)
    with pytest.raises(ValueError, match=r"ClassExpansionConfig\.replay must be a bool"):
        ClassExpansionConfig(replay="yes")
    assert ClassExpansionConfig().replay is True


def test_split_accuracy():
    labels = torch.tensor([0, 1, 1, 2, 3, 3])
    preds = torch.tensor([0, 0, 1, 2, 2, 2])
    out = split_accuracy(preds, labels, old_classes=2)
    assert out == {"acc_old": 2 / 3, "acc_new": 1 / 3, "acc_all": 0.5, "n_old": 3, "n_new": 3}
    logits = F.one_hot(preds, 4).float()
    assert split_accuracy(logits, labels, old_classes=2) == out
    only_old = split_accuracy(torch.tensor([0]), torch.tensor([0]), old_classes=2)
    assert only_old["acc_old"] == 1.0 and math.isnan(only_old["acc_new"])


def test_new_accuracy_at_matches_a_brute_force_offset_search():
    torch.manual_seed(0)
    logits, labels = torch.randn(200, 5) * 2, torch.randint(0, 5, (200,))
    logits[labels >= 3, 3:] += 1.5  # new classes somewhat separable
    for target in (0.0, 0.1, 0.2, 0.3):
        out = new_accuracy_at(logits, labels, old_classes=3, acc_old=target)
        shifted = logits.clone()
        shifted[:, 3:] -= out["offset"] + 1e-5 if math.isfinite(out["offset"]) else -1e6  # target 0: all new
        split = split_accuracy(shifted, labels, old_classes=3)
        assert out["acc_old"] == split["acc_old"] >= target and out["acc_new"] == split["acc_new"]
        if target > 0:  # any smaller offset (the next margin down) misses the target
            smaller = logits.clone()
            smaller[:, 3:] -= out["offset"] - 1e-4
            assert split_accuracy(smaller, labels, old_classes=3)["acc_old"] < target
    # a model that calls everything "new" has high raw new accuracy and none once old accuracy is required
    everything_new = F.one_hot(torch.tensor([3, 3, 4, 3]), 5).float() * 10
    everything_new[:, 0] = 5  # its best old class is class 0, right for the first two images
    out = new_accuracy_at(everything_new, torch.tensor([0, 0, 4, 3]), old_classes=3, acc_old=1.0)
    assert out == {"offset": 5.0, "acc_old": 1.0, "acc_new": 0.0}


def test_new_accuracy_at_refuses_unreachable_targets_and_bad_shapes():
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    with pytest.raises(ValueError, match=r"acc_old=1.0 is out of reach: only 1/2 old samples"):
        new_accuracy_at(logits, torch.tensor([0, 0, 2]), old_classes=2, acc_old=1.0)
    with pytest.raises(ValueError, match="need samples of both old and new classes"):
        new_accuracy_at(logits, torch.tensor([0, 0, 1]), old_classes=2, acc_old=0.5)
    with pytest.raises(ValueError, match=r"old_classes must be in \[1, 3\)"):
        new_accuracy_at(logits, torch.tensor([0, 0, 2]), old_classes=3, acc_old=0.5)
    with pytest.raises(ValueError, match=r"acc_old must be in \[0, 1\]"):
        new_accuracy_at(logits, torch.tensor([0, 0, 2]), old_classes=2, acc_old=1.5)


def _post_relu_task(seed: int = 0):
    """Non-negative features (a shared component + a class-specific one), 3 old and 2 new classes, and an
    old head fitted on the old classes: the situation of a fine-tuned CNN's pooled features."""
    g = torch.Generator().manual_seed(seed)
    d, n = 32, 40
    protos = torch.rand(5, d, generator=g) * (torch.rand(5, d, generator=g) < 0.3)
    shared = torch.full((d,), 1.0)

    def draw(c: int, k: int) -> torch.Tensor:
        return (shared + 2 * protos[c] + 0.3 * torch.randn(k, d, generator=g)).clamp(min=0)

    old_x = torch.cat([draw(c, n) for c in range(3)])
    old_y = torch.arange(3).repeat_interleave(n)
    head = nn.Linear(d, 3)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(old_x), old_y)
        loss.backward()
        return loss

    opt.step(closure)
    support = torch.cat([draw(3, 5), draw(4, 5)])
    support_y = torch.tensor([0] * 5 + [1] * 5)
    test_x = torch.cat([draw(c, 20) for c in range(5)])
    test_y = torch.arange(5).repeat_interleave(20)
    return head, old_x, support, support_y, test_x, test_y


def test_calibrated_new_rows_keep_old_classes_where_imprinting_takes_them():
    """Imprinted rows point along the class mean, which on non-negative features scores every image high;
    the rows fitted against the fixed old rows on old-class anchors keep old images old and still learn
    the new classes (the real-photo failure: old-class accuracy 0.899 -> 0.000 at imprinting)."""
    from visiontune.models.heads import calibrate_new_rows

    head, anchors, support, support_y, test_x, test_y = _post_relu_task()

    def split(w, b):
        pred = (test_x @ torch.cat([head.weight, w]).T + torch.cat([head.bias, b])).argmax(1)
        old, new = test_y < 3, test_y >= 3
        return (pred[old] == test_y[old]).float().mean().item(), (pred[new] == test_y[new]).float().mean().item()

    with torch.no_grad():
        w0, b0 = imprint_weights(support, support_y, 2, reference_head=head)
        anchor_y = head(anchors).argmax(1)
        old_imprinted, _ = split(w0, b0)
        w, b = calibrate_new_rows(support, support_y + 3, anchors, anchor_y, old_weight=head.weight,
                                  old_bias=head.bias, init_weight=w0, init_bias=b0)
        old_cal, new_cal = split(w, b)
    assert old_imprinted < 0.5, old_imprinted  # the failure this fixes is there
    assert old_cal >= 0.95 and new_cal >= 0.9, (old_cal, new_cal)
    assert w.shape == w0.shape and b.shape == b0.shape and w.dtype == w0.dtype


def test_expand_classes_with_anchors_uses_only_confident_old_images():
    """``anchors`` go through the model; only those the old head is confident about calibrate the rows,
    and old rows stay bit-identical."""
    model = timm.create_model("resnet18", num_classes=3, pretrained=False).eval()
    old_w = model.get_classifier().weight.detach().clone()
    torch.manual_seed(0)
    support = (torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1]))
    plain = copy.deepcopy(model)
    expand_classes(plain, ["d", "e"], support, old_class_names=["a", "b", "c"])
    # threshold 0.99: a random-init head is confident about nothing, so calibration is skipped
    skipped = copy.deepcopy(model)
    expand_classes(skipped, ["d", "e"], support, old_class_names=["a", "b", "c"], anchors=torch.randn(6, 3, 32, 32),
                   anchor_threshold=0.99)
    assert torch.equal(skipped.get_classifier().weight, plain.get_classifier().weight)
    used = copy.deepcopy(model)
    expand_classes(used, ["d", "e"], support, old_class_names=["a", "b", "c"], anchors=torch.randn(6, 3, 32, 32),
                   anchor_threshold=0.01)
    assert not torch.equal(used.get_classifier().weight[3:], plain.get_classifier().weight[3:])
    assert torch.equal(used.get_classifier().weight[:3], old_w)


def test_label_new_in_pool_labels_only_new_looking_images_by_refined_prototypes():
    """Images whose new-class probability is low stay unlabelled (-1); the others get the new class of the
    nearest prototype after k-means refinement over the pool, which fixes what the support alone gets
    wrong (class 0's one support image sits between its cluster and class 2's)."""
    from visiontune.objectives.pool_labels import label_new_in_pool

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    pool_new = torch.cat([centres[j] + 0.5 * torch.randn(15, 3, generator=g) for j in range(3)])
    pool = torch.cat([pool_new, torch.tensor([[-4.0, -4.0, -4.0]]) + 0.3 * torch.randn(10, 3, generator=g)])
    truth = torch.arange(3).repeat_interleave(15) + 1  # one old class, then three new
    support = torch.tensor([[1.0, 0.0, 3.5], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    probs = torch.zeros(55, 4)
    probs[:45, 1:] = 0.3   # new mass 0.9
    probs[:45, 0] = 0.1
    probs[45:, 0] = 0.95   # new mass 0.05
    probs[45:, 1] = 0.05

    def labels(**kw):
        return label_new_in_pool(probs, 1, support, torch.tensor([0, 1, 2]), pool, **kw)

    refined, support_only = labels(), labels(iters=0)
    assert refined.dtype == torch.long and refined.shape == (55,)
    assert refined[45:].tolist() == [-1] * 10
    assert (refined[:45] == truth).float().mean() == 1.0
    assert (support_only[:45] == truth).float().mean() < 0.95  # 3 of 45 wrong: refining fixes them
    assert labels(new_mass=0.95).tolist() == [-1] * 55


def test_label_whole_pool_features_say_old_or_new_and_the_old_model_which_old_class():
    """Every pool image gets a class. Two old classes share one cluster of the prior features, so only the
    old model tells them apart; the new class's images form their own cluster, and they are labelled new
    although the old model is 0.7 sure they are old class 0 (the over-confidence that labelling by the
    old model alone suffers; below ``anchor_threshold``, so they do not seed class 0's prototype). A large
    ``new_weight`` (trust in that confidence) turns them old."""
    from visiontune.objectives.pool_labels import label_whole_pool

    g = torch.Generator().manual_seed(0)
    old_cluster = torch.tensor([4.0, 0.0, 0.0]) + 0.5 * torch.randn(20, 3, generator=g)
    new_cluster = torch.tensor([0.0, 0.0, 4.0]) + 0.5 * torch.randn(10, 3, generator=g)
    pool = torch.cat([old_cluster, new_cluster])
    truth = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    old_probs = torch.zeros(30, 2)
    old_probs[:10] = torch.tensor([0.9, 0.1])
    old_probs[10:20] = torch.tensor([0.2, 0.8])
    old_probs[20:] = torch.tensor([0.7, 0.3])
    support = torch.tensor([[0.5, 0.0, 3.5], [0.0, 0.5, 4.0]])

    labels = label_whole_pool(old_probs, support, torch.tensor([0, 0]), pool)
    assert labels.dtype == torch.long and labels.tolist() == truth.tolist()
    trusting = label_whole_pool(old_probs, support, torch.tensor([0, 0]), pool, new_weight=50.0)
    assert bool((trusting[20:] < 2).all())  # no image left in the new class


@pytest.mark.parametrize("value", ["yes", 1, None, "All"])
def test_label_pool_takes_new_all_or_a_bool(value):
    from visiontune.errors import ConfigError

    for ok, kept in ((True, "new"), (False, False), ("new", "new"), ("all", "all")):
        assert ClassExpansionConfig(label_pool=ok).label_pool == kept
    with pytest.raises(ConfigError, match=r"label_pool must be 'new' \(or true\), 'all' or false; got"):
        ClassExpansionConfig(label_pool=value)
