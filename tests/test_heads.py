"""The head abstraction (models/heads.py find_head) and what uses it: deltas, class expansion, the task bank,
the feature cache, the strategies. Heads of every layout: one Linear (ResNet), a distillation pair of Linears
(DeiT), NormLinear = BatchNorm1d + Linear, in a pair (RepViT distilled), MetaFormer's MlpHead, a 1×1-conv
head (DLA)."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv
from torch import nn

from conftest import assert_same_logits, perturb_delta
from visiontune.delta import DeltaError, TaskBank, build_from_delta, save_delta
from visiontune.models.heads import HeadError, expand_classes, find_head
from visiontune.strategies import apply_strategy, head_parameter_names
from visiontune.training.cache import fingerprint_weights

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
REPVIT = dict(depth=(1, 1, 1, 1), embed_dim=(16, 32, 64, 128), distillation=True)


def repvit(n: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("repvit_m0_9", num_classes=n, **REPVIT).eval()


def deit(n: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=1,
                             num_classes=n).eval()


def metaformer() -> nn.Module:
    torch.manual_seed(0)
    return MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), token_mixers=[SepConv, SepConv, Attention, Attention],
                      norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2, num_classes=3).eval()


def test_find_head_of_every_layout():
    h = find_head(timm.create_model("resnet18", num_classes=3))
    assert (h.paths, h.outputs, h.parameter_names, h.num_classes) == (("fc",), ("fc",), ("fc.weight", "fc.bias"), 3)

    h = find_head(deit())
    assert h.paths == ("head", "head_dist") and h.outputs == ("head", "head_dist")
    assert h.output_parameter_names == ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")

    h = find_head(repvit())  # one RepVitClassifier holding two NormLinear (BatchNorm1d + Linear)
    assert h.paths == ("head",) and h.outputs == ("head.head.l", "head.head_dist.l") and h.num_classes == 3
    assert len(h.parameter_names) == 8 and len(h.output_parameter_names) == 4
    assert {"head.head.bn.running_mean", "head.head_dist.bn.running_var"} <= set(h.state_names)

    h = find_head(metaformer())  # MlpHead: fc1, norm, fc2; no pretrained_cfg: the last Linear is the output
    assert h.paths == ("head.fc",) and h.outputs == ("head.fc.fc2",) and h.num_classes == 3
    assert [n.split(".")[2] for n in h.parameter_names] == ["fc1", "fc1", "norm", "norm", "fc2", "fc2"]

    h = find_head(timm.create_model("dla34", levels=[1] * 6, channels=[8, 8, 16, 16, 32, 64], num_classes=3))
    assert h.outputs == ("fc",) and isinstance(h.output_layers[0], nn.Conv2d) and h.num_classes == 3

    h = find_head(timm.create_model("resnet18", num_classes=0))
    assert h.outputs == () and h.num_classes is None
    with pytest.raises(HeadError, match="Sequential has no get_classifier"):
        find_head(nn.Sequential(nn.Linear(2, 2)))


def test_head_always_trains_whole_and_deltas_count_classes_on_the_output_layers(tmp_path):
    net = repvit()
    apply_strategy(net, "linear")
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == head_parameter_names(net) and len(trainable) == 8  # bn + l, twice
    perturb_delta(net, 1)
    with pytest.raises(DeltaError, match=r"2 class names given but the head has \[3\] outputs"):
        save_delta(net, tmp_path / "bad.safetensors", class_names=["a", "b"])
    # the round trip on the single NormLinear head (timm's reset_classifier drops RepViT's head_dist)
    args = {k: v for k, v in REPVIT.items() if k != "distillation"}
    torch.manual_seed(0)
    net = timm.create_model("repvit_m0_9", **args)
    net.reset_classifier(3)
    apply_strategy(net, "linear")
    perturb_delta(net, 1)
    path = save_delta(net.eval(), tmp_path / "t.safetensors", class_names=["a", "b", "c"], backbone="repvit_m0_9",
                      backbone_args=args)
    torch.manual_seed(0)
    rebuilt = build_from_delta(path).eval()
    with torch.no_grad():
        assert_same_logits(rebuilt(X), net.eval()(X))  # the rebuilt net runs channels-last (a convnet)


def test_expand_classes_grows_every_output_layer_from_what_it_reads():
    net = deit()
    with torch.no_grad():
        before = net(X)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    feats = {}
    hooks = [net.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: feats.__setitem__(p, a[0]))
             for p in ("head", "head_dist")]
    with torch.no_grad():
        net(images)
    for h in hooks:
        h.remove()
    assert expand_classes(net, ["d", "e"], (images, labels), old_class_names=["a", "b", "c"])[-2:] == ["d", "e"]
    assert net.head.out_features == net.head_dist.out_features == 5 and net.num_classes == 5
    with torch.no_grad():
        assert torch.allclose(net(X)[:, :3], before, atol=1e-6)
    for path in ("head", "head_dist"):  # each head's new rows point along ITS input's class means
        f = torch.nn.functional.normalize(feats[path], dim=1)
        row = torch.nn.functional.normalize(net.get_submodule(path).weight[3], dim=0)
        assert torch.allclose(row, torch.nn.functional.normalize(f[labels == 0].mean(0), dim=0), atol=1e-5)

    net = repvit()  # NormLinear pairs: the Linears grow, the BatchNorm1d stays
    bn = net.head.head.bn
    with torch.no_grad():
        before = net(X)
    expand_classes(net, ["d"], old_class_names=["a", "b", "c"])
    assert net.head.head.l.out_features == net.head.head_dist.l.out_features == 4 and net.head.head.bn is bn
    assert net.num_classes == net.head.num_classes == 4 and find_head(net).num_classes == 4
    with torch.no_grad():
        assert torch.allclose(net(X)[:, :3], before, atol=1e-6)

    dla = timm.create_model("dla34", levels=[1] * 6, channels=[8, 8, 16, 16, 32, 64], num_classes=3)
    with pytest.raises(TypeError, match=r"DLA has the output layer\(s\) 'fc' \(Conv2d\)"):
        expand_classes(dla, ["d"], old_class_names=["a", "b", "c"])
    assert dla.fc.out_channels == 3


def test_task_bank_swaps_heads_of_several_modules(tmp_path):
    trained = {}
    for task, n, seed in (("birds", 3, 1), ("cars", 5, 2)):
        net = repvit(n)
        apply_strategy(net, "bitfit")
        net.train()
        with torch.no_grad():
            net(torch.randn(4, 3, 32, 32))  # BatchNorm statistics move, the head's BatchNorm1d too
        perturb_delta(net, seed)
        save_delta(net.eval(), tmp_path / f"{task}.safetensors", class_names=[f"c{i}" for i in range(n)])
        with torch.no_grad():
            trained[task] = net(X)
    base = repvit()
    apply_strategy(base, "bitfit")
    bank = TaskBank(base)
    bank.add_task("birds", tmp_path / "birds.safetensors")
    bank.add_task("cars", tmp_path / "cars.safetensors")
    with torch.no_grad():
        for task in ("cars", "birds", None, "cars"):
            bank.use_task(task)
            if task:
                assert torch.equal(base(X), trained[task]), task
    assert base.num_classes == base.head.num_classes == 5


def test_feature_cache_fingerprint_skips_every_head_module():
    net = repvit()
    ref = fingerprint_weights(net)
    with torch.no_grad():
        net.head.head.bn.running_mean.add_(1.0)
        net.head.head_dist.l.weight.add_(1.0)
    assert fingerprint_weights(net) == ref
    with torch.no_grad():
        net.stem.conv1.c.weight.add_(1.0)
    assert fingerprint_weights(net) != ref


@pytest.mark.parametrize("strategy", ["lora", "qlora", "dora", "ssf"])
@pytest.mark.parametrize("make", [deit, repvit], ids=["deit-pair", "repvit-normlinear-pair"])
def test_no_module_of_the_head_is_wrapped_or_hooked(make, strategy):
    """get_classifier() as a tuple (DeiT head, head_dist) or one module of several parts (RepViT): LoRA, QLoRA,
    DoRA and SSF leave every head module alone; the head trains in full, as plain layers."""
    net = make()
    head = find_head(net)
    plain = [type(m) for m in head.output_layers]
    apply_strategy(net, strategy, {"rank": 2} if strategy != "ssf" else None)
    after = find_head(net)
    assert [type(m) for m in after.output_layers] == plain == [nn.Linear, nn.Linear]
    assert after.parameter_names == head.parameter_names  # no lora_A / ssf.scale inside the head
    for m in after.modules:
        for sub in m.modules():
            assert not hasattr(sub, "ssf") and not sub._forward_hooks
    assert all(p.requires_grad for n, p in net.named_parameters() if n in set(after.parameter_names))
