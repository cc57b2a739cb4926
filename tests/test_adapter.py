"""Adapter strategy: exact parameter counts, identity at init, hook semantics, refusals, config errors."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from conftest import tiny_base, tiny_model
from visiontune.models.groups import depth_groups
from visiontune.strategies import (
    StrategyError,
    apply_strategy,
    head_parameter_names,
    make_strategy_config,
    trainable_parameter_count,
)
from visiontune.strategies.adapter import Adapter, adapter_sites

NUM_CLASSES = 5
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

# Independent facts about the test models: adapter widths per site and the head's input width.
VIT_DIM, VIT_DEPTH = 192, 12
RESNET18_STAGES = [64, 128, 256, 512]
LITE0_STAGES = [16, 24, 40, 80, 112, 192, 320]
HEAD_IN = {"vit": 192, "resnet18": 512, "lite0": 1280}
HEAD_NAME = {"vit": "head", "resnet18": "fc", "lite0": "classifier"}


def _base(kind: str) -> nn.Module:
    return tiny_base(kind, NUM_CLASSES)


def model(kind: str) -> nn.Module:
    return tiny_model(kind, NUM_CLASSES)


def _adapter_params(c: int, h: int) -> int:
    return c * h + h + h * c + c  # down (weight + bias) + up (weight + bias)


def _expected(kind: str, opts: dict) -> int:
    def hidden(c: int) -> int:
        if "bottleneck" in opts:
            return opts["bottleneck"]
        return max(1, c // opts.get("reduction", 16))

    if kind == "vit":
        per_block = 2 if opts.get("where") == "both" else 1
        body = VIT_DEPTH * per_block * _adapter_params(VIT_DIM, hidden(VIT_DIM))
    else:
        stages = RESNET18_STAGES if kind == "resnet18" else LITE0_STAGES
        body = sum(_adapter_params(c, hidden(c)) for c in stages)
    return body + HEAD_IN[kind] * NUM_CLASSES + NUM_CLASSES


COUNT_CASES = [
    ("vit", {}),
    ("vit", {"where": "both", "bottleneck": 8}),
    ("vit", {"where": "attn", "reduction": 4, "placement": "parallel"}),
    ("resnet18", {}),
    ("resnet18", {"bottleneck": 8, "activation": "relu"}),
    ("lite0", {}),
    ("lite0", {"reduction": 4}),
]


@pytest.mark.parametrize("kind,opts", COUNT_CASES)
def test_trainable_count_exact_and_only_adapters_and_head(kind, opts):
    m = model(kind)
    apply_strategy(m, "adapter", opts)
    trainable, total = trainable_parameter_count(m)
    assert trainable == _expected(kind, opts)
    base_total = sum(p.numel() for p in _base(kind).parameters())
    assert total == base_total + trainable - (HEAD_IN[kind] * NUM_CLASSES + NUM_CLASSES)
    head = set(head_parameter_names(m))
    assert head == {f"{HEAD_NAME[kind]}.weight", f"{HEAD_NAME[kind]}.bias"}
    for n, p in m.named_parameters():
        assert p.requires_grad == ("adapter" in n or n in head), n


def test_hand_counted_numbers():
    # Written out once so a wrong formula in _expected cannot hide a wrong implementation.
    m = model("vit")
    apply_strategy(m, "adapter", {})
    assert trainable_parameter_count(m)[0] == 12 * (192 * 12 * 2 + 12 + 192) + 192 * 5 + 5 == 58709
    m = model("resnet18")
    apply_strategy(m, "adapter", {})
    assert trainable_parameter_count(m)[0] == 580 + 2184 + 8464 + 33312 + 2565 == 47105


@pytest.mark.parametrize(
    "kind,opts",
    [
        ("vit", {"where": "both"}),
        ("vit", {"where": "both", "placement": "parallel", "scale": 4.0}),
        ("resnet18", {}),
        ("resnet18", {"placement": "parallel"}),
        ("lite0", {"activation": "silu"}),
    ],
)
def test_output_equals_base_at_init(kind, opts):
    base = _base(kind)
    m = model(kind)
    apply_strategy(m, "adapter", opts)
    with torch.no_grad():
        assert torch.equal(m(X), base(X))
        assert torch.equal(m.forward_features(X), base.forward_features(X))


def _randomize_up(m: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "adapter.up" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_transformer_hook_semantics(placement):
    m = model("vit")
    apply_strategy(m, "adapter", {"where": "both", "placement": placement, "scale": 0.5, "bottleneck": 4})
    _randomize_up(m)
    x = torch.randn(2, 17, 192)
    for sub in (m.blocks[3].attn, m.blocks[3].mlp):
        a = sub.adapter
        base_out = sub.forward(x)  # .forward bypasses the hook
        src = base_out if placement == "sequential" else x
        manual = base_out + 0.5 * a.up(a.act(a.down(src)))
        torch.testing.assert_close(sub(x), manual, rtol=0, atol=1e-6)
        assert not torch.allclose(sub(x), base_out)
    with torch.no_grad():
        assert not torch.allclose(m(X), _base("vit")(X))


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_cnn_stage_semantics(placement):
    m = model("resnet18")
    apply_strategy(m, "adapter", {"placement": placement, "bottleneck": 4, "scale": 2.0})
    _randomize_up(m)
    x = torch.randn(2, 128, 4, 4)
    blk = m.layer2[1]  # the adapter of stage layer2 sits on its last block
    a = blk.adapter
    assert isinstance(a.down, nn.Conv2d) and a.down.kernel_size == (1, 1)
    with torch.no_grad():
        stage_in = torch.randn(2, 64, 8, 8)
        stage_out = m.layer2(stage_in)
        inner = m.layer2[0](stage_in)
        if placement == "sequential":  # out = stage(x) + scale * up(act(down(stage(x))))
            plain = blk.forward(inner)
            manual = plain + 2.0 * a.up(a.act(a.down(plain)))
        else:  # parallel branch spans the last block
            manual = blk.forward(inner) + 2.0 * a.up(a.act(a.down(inner)))
        torch.testing.assert_close(stage_out, manual, rtol=0, atol=1e-5)
        assert blk(x).shape == x.shape


@pytest.mark.parametrize("kind", ["vit", "lite0"])
def test_only_declared_parameters_get_gradients(kind):
    m = model(kind).train()
    apply_strategy(m, "adapter", {"where": "both"} if kind == "vit" else {})
    _randomize_up(m)
    m(X).logsumexp(1).sum().backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all(m.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if "adapter.down.weight" in n)


def test_adapter_parameter_names_keep_base_names_and_depth_groups():
    m = model("vit")
    apply_strategy(m, "adapter", {"where": "both"})
    base_names = {n for n, _ in _base("vit").named_parameters()}
    names = {n for n, _ in m.named_parameters()}
    assert base_names <= names
    assert {n for n in names - base_names if "adapter" not in n} == set()
    assert "blocks.3.mlp.adapter.down.weight" in names and "blocks.3.attn.adapter.up.bias" in names
    group_of = {n: i for i, g in enumerate(depth_groups(m)) for n in g}
    assert group_of["blocks.3.mlp.adapter.up.weight"] == group_of["blocks.3.mlp.fc1.weight"]
    r = model("resnet18")
    apply_strategy(r, "adapter", {})
    assert adapter_sites(r) == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    group_of = {n: i for i, g in enumerate(depth_groups(r)) for n in g}
    assert group_of["layer2.1.adapter.up.weight"] == group_of["layer2.1.conv1.weight"]
    e = model("lite0")
    assert adapter_sites(e) == ["blocks.0.0", "blocks.1.1", "blocks.2.1", "blocks.3.2", "blocks.4.2", "blocks.5.3", "blocks.6.0"]


def test_deepcopy_and_grad_checkpointing_keep_adapters():
    m = model("lite0")
    apply_strategy(m, "adapter", {})
    _randomize_up(m)
    with torch.no_grad():
        y = m(X)
        assert not torch.allclose(y, _base("lite0")(X))
        assert torch.equal(copy.deepcopy(m)(X), y)
        m.set_grad_checkpointing(True)  # timm flattens stages into blocks here: stage hooks would be skipped
        torch.testing.assert_close(m(X), y, rtol=0, atol=1e-6)


def test_parallel_refused_on_shape_changing_stage():
    m = model("lite0")
    with pytest.raises(StrategyError, match=r"placement='parallel'") as exc:
        apply_strategy(m, "adapter", {"placement": "parallel"})
    msg = str(exc.value)
    assert "blocks.0.0 (32, 32, 32) -> (16, 32, 32)" in msg and "blocks.6.0" in msg and "placement='sequential'" in msg
    assert "blocks.1.1" not in msg


def test_where_refused_on_cnn():
    with pytest.raises(StrategyError, match=r"option 'where'='attn'.*transformer.*leave 'where' unset"):
        apply_strategy(model("resnet18"), "adapter", {"where": "attn"})


def test_misfit_backbone_refused():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 2)

        def get_classifier(self):
            return self.fc

    with pytest.raises(StrategyError) as exc:
        apply_strategy(Plain(), "adapter", {})
    msg = str(exc.value)
    assert "does not fit Plain" in msg and "no transformer blocks" in msg and "bitfit" in msg and "vpt" not in msg


def test_applying_twice_refused():
    m = model("vit")
    apply_strategy(m, "adapter", {})
    with pytest.raises(StrategyError, match="already has an adapter"):
        apply_strategy(m, "adapter", {})


def test_adapter_module_zero_output():
    a = Adapter(8, 2, conv=True)
    assert a(torch.randn(1, 8, 3, 3)).abs().max() == 0
    assert a.down.weight.std() > 0 and a.up.weight.abs().max() == 0


@pytest.mark.parametrize(
    "opts,fragments",
    [
        ({"reduction": 0}, ["'reduction'", ">= 1"]),
        ({"bottleneck": 2.5}, ["'bottleneck'", "integer"]),
        ({"bottleneck": True}, ["'bottleneck'"]),
        ({"reduction": 4, "bottleneck": 8}, ["'reduction'", "'bottleneck'", "exclusive"]),
        ({"activation": "swish"}, ["'activation'", "'gelu'", "'relu'", "'swish'"]),
        ({"placement": "serial"}, ["'placement'", "'sequential'", "'parallel'"]),
        ({"where": "ffn"}, ["'where'", "'attn'", "'mlp'", "'both'"]),
        ({"scale": 0}, ["'scale'", "> 0"]),
        ({"scale": float("nan")}, ["'scale'", "finite"]),
        ({"init_std": -0.1}, ["'init_std'", "> 0"]),
        ({"dim": 8}, ["Unknown option", "'dim'", "bottleneck"]),
    ],
)
def test_bad_config_messages(opts, fragments):
    with pytest.raises(StrategyError) as exc:
        make_strategy_config("adapter", opts)
    for frag in fragments:
        assert frag in str(exc.value)


# ------------------------------------------------------------------------ any stage structure, any layout
GENERAL = {  # model, kwargs, size, the sites (stage outputs, whatever the trunk calls them), adapter kind
    "regnet": ("regnetx_002", {}, 32, ["s1.b1", "s2.b1", "s3.b4", "s4.b7"], nn.Conv2d),
    "densenet": ("densenet121", {"growth_rate": 8, "block_config": (1, 1, 1, 1)}, 32,  # DenseBlock loops its children
                 ["features.denseblock1.denselayer1", "features.transition1.pool", "features.denseblock2.denselayer1",
                  "features.transition2.pool", "features.denseblock3.denselayer1", "features.transition3.pool",
                  "features.denseblock4.denselayer1"], nn.Conv2d),
    "dla": ("dla34", {"levels": [1] * 6, "channels": [8, 8, 16, 16, 32, 64]}, 32,
            ["level0.2", "level1.2", "level2", "level3", "level4", "level5"], nn.Conv2d),
    "mambaout-nhwc": ("test_mambaout", {}, 32,
                      ["stages.0.blocks.0", "stages.1.blocks.0", "stages.2.blocks.2", "stages.3.blocks.0"], nn.Linear),
    "mixer": ("mixer", {"img_size": 32, "num_blocks": 2, "embed_dim": 32}, 32, ["blocks.0", "blocks.1"], nn.Linear),
    "coat-tokens": ("coat_lite_tiny", {"img_size": 32, "serial_depths": [1, 1, 1, 1], "embed_dims": [16, 32, 64, 64]},
                    32, ["serial_blocks1.0", "serial_blocks2.0", "serial_blocks3.0", "serial_blocks4.0"], nn.Linear),
}


@pytest.mark.parametrize("case", list(GENERAL))
def test_adapters_follow_every_stage_whatever_its_name_and_layout(case):
    """RegNet s1..s4, DenseNet features.*, DLA level*, MambaOut's NHWC stages, MLP-Mixer blocks, CoaT's
    numbered serial blocks of tokens: one adapter per stage output, sized from that output (1x1 convs on NCHW,
    Linear on NHWC maps and tokens), the model unchanged at init, every adapter reached by the gradient."""
    name, kwargs, size, sites, kind = GENERAL[case]
    torch.manual_seed(0)
    if name == "mixer":
        from timm.models.mlp_mixer import MlpMixer

        net = MlpMixer(num_classes=3, patch_size=16, **kwargs).eval()
    else:
        net = timm.create_model(name, num_classes=3, **kwargs).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = net(x)
    apply_strategy(net, "adapter", {})
    assert adapter_sites(net) == sites
    adapters = {n: net.get_submodule(n).adapter for n in sites}
    assert {type(a.down) for a in adapters.values()} == {kind}
    with torch.no_grad():
        assert torch.equal(net(x), base)
        for a in adapters.values():
            nn.init.normal_(a.up.weight, std=0.1)
    calls = []
    hooks = [a.register_forward_hook(lambda m, i, o: calls.append(m)) for a in adapters.values()]
    net.train().forward_features(x).square().sum().backward()  # features: some timm heads start at zero
    assert len(calls) == len(sites)  # each runs once: none was run as a child by a container's loop
    for h in hooks:
        h.remove()
    assert all(a.down.weight.grad is not None and a.down.weight.grad.abs().sum() > 0 for a in adapters.values())


def test_a_stage_that_outputs_no_tensor_is_refused_naming_strategy_and_model():
    class Pair(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.b = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)

        def forward(self, x):
            return self.a(x), self.b(x)

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.stage1, self.stage2 = Pair(4), Pair(4)
            self.fc = nn.Linear(4, 2)

        def get_classifier(self):
            return self.fc

        def forward(self, x):
            a, _ = self.stage1(self.stem(x))
            b, _ = self.stage2(a)
            return self.fc(b.mean((2, 3)))

    with pytest.raises(StrategyError, match=r"strategy 'adapter' does not fit Twin: 'stage1' \(Pair\) does not map "
                                            r"a tensor to a tensor"):
        apply_strategy(Twin(), "adapter", {})
