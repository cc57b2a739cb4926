"""LoRA / QLoRA strategies: counts, gradients, merge/unmerge, fused qkv, grouped convs, quantized base, PEFT parity."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import timm
import torch
from torch import nn

from visiontune.strategies import (
    StrategyError,
    apply_strategy,
    available_strategies,
    make_strategy_config,
    trainable_parameter_count,
)
from visiontune.strategies.lora import (
    LoRAConfig,
    LoRAConv2d,
    LoRALinear,
    LoRAQKVLinear,
    QLoRAConfig,
    QuantizedConv2d,
    QuantizedLinear,
    frozen_weight_bytes,
    inject_lora,
    lora_layers,
    lora_parameter_names,
    lora_targets,
    merge,
    merge_and_unload,
    unmerge,
)

R = 8  # default rank


def _make(name: str) -> nn.Module:
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8) if name.startswith("vit") else {}
    if name == "resnet18":
        kw["zero_init_last"] = False  # else every residual branch starts at zero and gets no gradient
    return timm.create_model(name, pretrained=False, num_classes=5, **kw).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {n: _make(n) for n in ("vit_tiny_patch16_224", "tf_efficientnet_lite0", "resnet18")}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _fresh(models: dict[str, nn.Module], name: str) -> nn.Module:
    return copy.deepcopy(models[name])


def _is_lora_or_head(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or name.split(".")[0] in ("head", "classifier", "fc")


# ------------------------------------------------------------------------------------------ config
def test_registered() -> None:
    assert {"lora", "qlora"} <= set(available_strategies())
    assert make_strategy_config("qlora", {"bits": 4}) == QLoRAConfig(bits=4)
    assert make_strategy_config("lora", {"qkv": "vq"}).qkv == "qv"  # canonical order


@pytest.mark.parametrize(
    "cls, options, words",
    [
        (LoRAConfig, {"rank": 0}, ["'rank'", "> 0", "0"]),
        (LoRAConfig, {"rank": 2.5}, ["'rank'", "integer"]),
        (LoRAConfig, {"alpha": -1}, ["'alpha'", "> 0", "-1"]),
        (LoRAConfig, {"dropout": 1.0}, ["'dropout'", "[0, 1)"]),
        (LoRAConfig, {"qkv": "x"}, ["'qkv'", "subset of 'qkv'", "'x'"]),
        (LoRAConfig, {"qkv": ""}, ["'qkv'", "non-empty"]),
        (LoRAConfig, {"conv_groups": "split"}, ["'conv_groups'", "'per_group'", "'refuse'"]),
        (LoRAConfig, {"init": "ones"}, ["'init'", "'zero'", "'gaussian'"]),
        (LoRAConfig, {"targets": ["("]}, ["'targets'", "bad regex"]),
        (LoRAConfig, {"targets": []}, ["'targets'", "non-empty"]),
        (QLoRAConfig, {"bits": 3}, ["'bits'", "[4, 8]", "3"]),
        (QLoRAConfig, {"rank": -2}, ["'rank'", "'qlora'"]),
    ],
)
def test_bad_options_name_option_and_allowed_values(cls, options, words) -> None:
    with pytest.raises(StrategyError) as err:
        cls(**options)
    for w in words:
        assert w in str(err.value)


def test_unmatched_target_lists_available_layers(models) -> None:
    net = _fresh(models, "vit_tiny_patch16_224")
    with pytest.raises(StrategyError) as err:
        apply_strategy(net, "lora", {"targets": ["attn\\.qkv$", "nonexistent_layer"]})
    msg = str(err.value)
    assert "'nonexistent_layer'" in msg and "blocks.0.attn.qkv" in msg and "fc1" in msg
    assert not lora_layers(net)  # nothing wrapped on failure


def test_apply_twice_refused(models) -> None:
    net = _fresh(models, "vit_tiny_patch16_224")
    apply_strategy(net, "lora")
    with pytest.raises(StrategyError, match="already has LoRA layers"):
        apply_strategy(net, "lora")


# ----------------------------------------------------------------------------------------- counts
def _expected_vit(net: nn.Module, parts: int) -> tuple[list[str], int]:
    names, count = [], 0
    for n, m in net.named_modules():
        if isinstance(m, nn.Linear) and n.startswith("blocks."):
            names.append(n)
            if n.endswith("qkv"):
                count += parts * R * (m.in_features + m.out_features // 3)
            else:
                count += R * (m.in_features + m.out_features)
    return names, count


def test_vit_preset_and_exact_counts(models) -> None:
    base = models["vit_tiny_patch16_224"]
    names, lora = _expected_vit(base, parts=2)
    head = base.head.weight.numel() + base.head.bias.numel()
    net = _fresh(models, "vit_tiny_patch16_224")
    apply_strategy(net, "lora")
    assert sorted(lora_layers(net)) == sorted(names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"qkv", "proj", "fc1", "fc2"}
    assert isinstance(net.blocks[0].attn.qkv, LoRAQKVLinear) and isinstance(net.blocks[0].mlp.fc1, LoRALinear)
    assert trainable_parameter_count(net)[0] == lora + head == 294912 + 965
    assert "blocks.0.attn.qkv.base_layer.weight" in dict(net.named_parameters())
    assert all(_is_lora_or_head(n) for n, p in net.named_parameters() if p.requires_grad)
    assert set(lora_parameter_names(net)) == {n for n, p in net.named_parameters() if p.requires_grad} - {
        "head.weight",
        "head.bias",
    }


def test_vit_all_qkv_parts_count(models) -> None:
    net = _fresh(models, "vit_tiny_patch16_224")
    _, lora = _expected_vit(net, parts=3)
    apply_strategy(net, "lora", {"qkv": "qkv"})
    assert trainable_parameter_count(net)[0] == lora + 965


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_cnn_preset_and_exact_counts(models, name) -> None:
    base = models[name]
    if name == "resnet18":  # basic blocks: dense 3x3 convs and downsample 1x1s, not the 7x7 stem
        pattern = r"^layer\d\.\d\.(conv\d|downsample\.0)$"
    else:  # depthwise-separable: the pointwise convs
        pattern = r"(conv_pw|conv_pwl|conv_head)$"
    expected, count = [], 0
    for n, m in base.named_modules():
        if isinstance(m, nn.Conv2d) and re.search(pattern, n):
            expected.append(n)
            kh, kw = m.kernel_size
            assert m.groups == 1
            count += R * (m.in_channels * kh * kw + m.out_channels)
    head = sum(p.numel() for p in base.get_classifier().parameters())
    net = _fresh(models, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rank capping on these layers
        apply_strategy(net, "lora")
    assert sorted(lora_layers(net)) == sorted(expected)
    assert all(isinstance(m, LoRAConv2d) for m in lora_layers(net).values())
    assert trainable_parameter_count(net)[0] == count + head
    print(name, "trainable", count + head)


# -------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "tf_efficientnet_lite0", "resnet18"])
def test_only_lora_and_head_get_gradients(models, images, name) -> None:
    net = _fresh(models, name)
    apply_strategy(net, "lora", {"init": "gaussian", "dropout": 0.1})
    net.train()
    net(images).logsumexp(-1).sum().backward()
    for n, p in net.named_parameters():
        if _is_lora_or_head(n):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


def test_zero_init_starts_as_the_base_model(models, images) -> None:
    net = _fresh(models, "vit_tiny_patch16_224")
    apply_strategy(net, "lora")
    torch.testing.assert_close(net(images), models["vit_tiny_patch16_224"](images), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------- merge/unmerge
def _base_weights(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.base_layer.weight.detach().clone() for n, m in lora_layers(net).items()}


@pytest.mark.parametrize(
    "name, options",
    [
        ("vit_tiny_patch16_224", {}),
        ("tf_efficientnet_lite0", {}),
        ("resnet18", {}),
        # grouped/depthwise + TF-'same' (stride-2 Conv2dSame) + dense 3x3 stem
        ("tf_efficientnet_lite0", {"targets": [r"conv_dw$", "conv_stem"], "rank": 4}),
        ("vit_tiny_patch16_224", {"targets": ["patch_embed", "qkv"], "qkv": "k", "dropout": 0.2}),
    ],
)
def test_merge_unmerge_equivalence(models, images, name, options) -> None:
    net = _fresh(models, name)
    apply_strategy(net, "lora", {"init": "gaussian", **options})
    net.eval()
    with torch.no_grad():
        y = net(images)
        base_y = models[name](images)
        assert (y - base_y).abs().max() > 1e-3  # the delta is not trivially zero
        before = _base_weights(net)
        assert merge(net) == len(before)
        assert all(m.merged for m in lora_layers(net).values())
        assert any(not torch.equal(before[n], w) for n, w in _base_weights(net).items())
        torch.testing.assert_close(net(images), y, rtol=0, atol=1e-5)
        assert merge(net) == 0  # idempotent
        assert unmerge(net) == len(before)
        for n, w in _base_weights(net).items():
            torch.testing.assert_close(w, before[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(net(images), y, rtol=0, atol=1e-5)


def test_safe_merge_refuses_non_finite_and_leaves_model_unchanged(models, images) -> None:
    net = _fresh(models, "vit_tiny_patch16_224")
    apply_strategy(net, "lora", {"init": "gaussian"})
    with torch.no_grad():
        net.blocks[3].mlp.fc2.lora_B[0, 0] = float("nan")
    before = _base_weights(net)
    with pytest.raises(StrategyError, match=r"blocks\.3\.mlp\.fc2.*non-finite"):
        merge(net, safe=True)
    assert not any(m.merged for m in lora_layers(net).values())
    for n, w in _base_weights(net).items():
        assert torch.equal(w, before[n]), n
    with pytest.raises(StrategyError, match=r"blocks\.3\.mlp\.fc2"):
        net.blocks[3].mlp.fc2.merge(safe=True)


def test_merge_and_unload_gives_plain_layers(models, images) -> None:
    base = models["vit_tiny_patch16_224"]
    net = _fresh(models, "vit_tiny_patch16_224")
    apply_strategy(net, "lora", {"init": "gaussian"})
    with torch.no_grad():
        y = net(images)
        merge_and_unload(net)
        torch.testing.assert_close(net(images), y, rtol=0, atol=1e-5)
    assert not lora_layers(net) and not lora_parameter_names(net)
    assert type(net.blocks[0].attn.qkv) is nn.Linear
    assert list(net.state_dict()) == list(base.state_dict())
    assert net.visiontune_delta == {"head.weight", "head.bias"}


# ----------------------------------------------------------------------------------- fused qkv
@pytest.mark.parametrize("parts", ["qv", "k", "qkv"])
def test_qkv_parts_move_only_their_slice(models, parts) -> None:
    net = _fresh(models, "vit_tiny_patch16_224")
    apply_strategy(net, "lora", {"init": "gaussian", "qkv": parts, "targets": [r"attn\.qkv$"]})
    layer = net.blocks[0].attn.qkv
    d = layer.part_dim
    assert layer.lora_A.shape == (len(parts) * R, 192) and layer.lora_B.shape == (len(parts) * d, R)
    x = torch.randn(2, 17, 192)
    with torch.no_grad():
        out, ref = layer(x), layer.base_layer(x)
        delta = layer.delta_weight()
    for i, c in enumerate("qkv"):
        moved = (out[..., i * d : (i + 1) * d] - ref[..., i * d : (i + 1) * d]).abs().max()
        rows = delta[i * d : (i + 1) * d].abs().max()
        if c in parts:
            assert moved > 1e-3 and rows > 0, c
        else:
            assert moved == 0 and rows == 0, c  # bit-exact: the base slice is passed through


# --------------------------------------------------------------------------------- grouped convs
def test_grouped_conv_delta_is_smaller_than_the_layer(models) -> None:
    net = _fresh(models, "tf_efficientnet_lite0")
    # blocks.0.0.conv_dw: 32 channels, 3x3 -> rank 8 would give 8*(32+9)=328 > 288 weights: lowered to 7
    with pytest.warns(UserWarning, match=r"blocks\.0\.0\.conv_dw \(8->7\)"):
        apply_strategy(net, "lora", {"targets": [r"conv_dw$"], "conv_groups": "per_group"})
    layers = lora_layers(net)
    assert len(layers) == 16
    for n, layer in layers.items():
        w = layer.base_layer.weight
        assert layer.base_layer.groups == w.shape[0] > 1  # depthwise
        k2 = w.shape[-1] * w.shape[-2]
        lora = layer.lora_A.numel() + layer.lora_B.numel()
        assert lora == layer.rank * (w.shape[0] + k2) < w.numel(), n
    big = layers["blocks.5.1.conv_dw"]  # 1152 channels, 5x5: 8*(1152+25) = 9416 vs 28800
    assert big.rank == R and big.lora_A.numel() + big.lora_B.numel() == 9416


def test_grouped_conv_refuse_names_the_layer(models) -> None:
    net = _fresh(models, "tf_efficientnet_lite0")
    with pytest.raises(StrategyError, match=r"'blocks\.0\.0\.conv_dw'.*groups=32.*'refuse'"):
        apply_strategy(net, "lora", {"targets": ["conv_dw", "conv_pw"], "conv_groups": "refuse"})
    assert not lora_layers(net)


# ----------------------------------------------------------------------------------------- qlora
def _copy_factors(src: nn.Module, dst: nn.Module) -> None:
    src_layers = lora_layers(src)
    with torch.no_grad():
        for n, layer in lora_layers(dst).items():
            layer.lora_A.copy_(src_layers[n].lora_A)
            layer.lora_B.copy_(src_layers[n].lora_B)


@pytest.mark.parametrize("bits, min_ratio, max_err", [(8, 3.8, 0.012), (4, 6.5, 0.12)])
def test_qlora_quantized_base(models, images, bits, min_ratio, max_err) -> None:
    name = "vit_tiny_patch16_224"
    ref = _fresh(models, name)
    apply_strategy(ref, "lora", {"init": "gaussian"})
    net = _fresh(models, name)
    apply_strategy(net, "qlora", {"init": "gaussian", "bits": bits})
    _copy_factors(ref, net)
    qkv = net.blocks[0].attn.qkv
    assert isinstance(qkv.base_layer, QuantizedLinear) and qkv.quantized
    assert "weight" not in dict(qkv.base_layer.named_parameters())
    assert {"weight_q", "weight_scale"} <= {n for n, _ in qkv.base_layer.named_buffers()}
    expected_q = 192 * 576 if bits == 8 else 192 * 576 // 2
    assert qkv.base_layer.weight_q.numel() * qkv.base_layer.weight_q.element_size() == expected_q

    float_bytes, q_bytes = frozen_weight_bytes(ref, lora_layers_only=True), frozen_weight_bytes(net, True)
    print(f"qlora bits={bits}: frozen bytes of adapted layers {float_bytes} -> {q_bytes}")
    expected_float = expected_quant = 0
    for layer in lora_layers(ref).values():
        n, out = layer.base_layer.weight.numel(), layer.base_layer.out_features
        expected_float += 4 * (n + out)  # fp32 weight + bias
        if bits == 8:  # int8 codes + fp32 scale per output channel + fp32 bias
            expected_quant += n + 4 * out + 4 * out
        else:  # two NF4 codes per byte + fp32 absmax per 64 weights + fp32 bias + 16-level codebook
            expected_quant += n // 2 + 4 * -(-n // 64) + 4 * out + 4 * 16
    assert (float_bytes, q_bytes) == (expected_float, expected_quant)
    assert float_bytes / q_bytes > min_ratio
    assert frozen_weight_bytes(ref) - frozen_weight_bytes(net) == float_bytes - q_bytes

    with torch.no_grad():  # relative error of one layer and of the whole feature extractor (48 layers)
        t = torch.randn(2, 17, 192)
        for a, b in [(ref.blocks[0].attn.qkv(t), qkv(t)), (ref.forward_features(images), net.forward_features(images))]:
            assert (a - b).norm() / a.norm() < max_err

    net.train()
    net(images).sum().backward()
    assert all(_is_lora_or_head(n) for n, p in net.named_parameters() if p.grad is not None)
    assert qkv.lora_B.grad is not None and qkv.lora_B.grad.abs().sum() > 0

    net.eval()
    with pytest.raises(StrategyError, match="quantized.*merge_and_unload"):
        merge(net)
    with torch.no_grad():
        y = net(images)
        merge_and_unload(net)
        torch.testing.assert_close(net(images), y, rtol=0, atol=1e-5)
    assert type(net.blocks[0].attn.qkv) is nn.Linear and not any(
        isinstance(m, (QuantizedLinear, QuantizedConv2d)) for m in net.modules()
    )


def test_qlora_conv_including_tf_same_padding(models, images) -> None:
    name = "tf_efficientnet_lite0"
    opts = {"init": "gaussian", "targets": ["conv_pw", "conv_dw", "conv_stem"], "rank": 4}
    ref, net = _fresh(models, name), _fresh(models, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank lowered on the small depthwise convs
        apply_strategy(ref, "lora", opts)
        apply_strategy(net, "qlora", opts)
    _copy_factors(ref, net)
    assert isinstance(net.conv_stem.base_layer, QuantizedConv2d) and net.conv_stem.base_layer.same_pad
    with torch.no_grad():
        y_ref, y = ref(images), net(images)
        assert ((y - y_ref).norm() / y_ref.norm()) < 0.05
        merge_and_unload(net)
        torch.testing.assert_close(net(images), y, rtol=0, atol=1e-5)
    assert type(net.conv_stem).__name__ == "Conv2dSame"


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Linear(24, 40), (3, 5, 24)),
    (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1), (2, 8, 9, 9)),
    (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (2, 8, 7, 7)),
    (lambda: nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"), (2, 8, 7, 7)),
    (lambda: __import__("timm.layers", fromlist=["Conv2dSame"]).Conv2dSame(8, 16, 3, stride=2), (2, 8, 9, 9)),
])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layers_rebuild_the_weight_in_backward(make, shape, bits) -> None:
    """Same input gradient as autograd through the dequantised weight, without saving that weight."""
    torch.manual_seed(0)
    layer = make()
    q = (QuantizedLinear if isinstance(layer, nn.Linear) else QuantizedConv2d)(layer, bits=bits)
    q = copy.deepcopy(q.to("cpu").float())  # ordinary module moves and copies (Lightning does them)
    w = q.dequantized_weight()
    x = torch.randn(shape, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= w.numel()]  # no float weight kept
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, g)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = q._frozen_op(x_ref, w)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, torch.autograd.grad(y_ref, x_ref, g)[0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation and inputs without gradients take the plain path
        torch.testing.assert_close(q(x), y_ref, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ PEFT parity
def _peft_parity(base: nn.Module, images: torch.Tensor, options: dict) -> None:
    import peft  # a dev dependency: parity is checked, never skipped
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    cfg = LoRAConfig(init="gaussian", **options)
    layers = inject_lora(ours, cfg)
    parts = len(cfg.qkv)
    qkv_pattern = r"blocks\.\d+\.attn\.qkv"
    has_qkv = any(isinstance(m, LoRAQKVLinear) for m in layers.values())
    # PEFT has one rank-r pair per layer: our per-part pairs are one rank-(parts*r) pair with a
    # block-structured B; alpha scales with the rank so that alpha/r stays the same.
    peft_cfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=list(layers),
        rank_pattern={qkv_pattern: parts * cfg.rank} if has_qkv else {},
        alpha_pattern={qkv_pattern: parts * cfg.alpha} if has_qkv else {},
    )
    theirs = peft.inject_adapter_in_model(peft_cfg, theirs)
    peft_layers = {n: m for n, m in theirs.named_modules() if n in layers}
    with torch.no_grad():
        for n, layer in layers.items():
            a, b = peft_layers[n].lora_A["default"].weight, peft_layers[n].lora_B["default"].weight
            a.copy_(layer.lora_A)
            if isinstance(layer, LoRAQKVLinear):
                b.zero_()
                d, r = layer.part_dim, layer.rank
                for j, c in enumerate(layer.parts):
                    i = "qkv".index(c)
                    b[i * d : (i + 1) * d, j * r : (j + 1) * r] = layer.lora_B[j * d : (j + 1) * d]
            else:
                b.copy_(layer.lora_B)
        ours.eval(), theirs.eval()
        y, y_peft = ours(images), theirs(images)
    assert (y - base(images)).abs().max() > 1e-3
    torch.testing.assert_close(y, y_peft, rtol=0, atol=1e-5)


@pytest.mark.parametrize("qkv", ["qkv", "qv"])
def test_peft_parity_vit(models, images, qkv) -> None:
    _peft_parity(models["vit_tiny_patch16_224"], images, {"qkv": qkv})


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_peft_parity_cnn(models, images, name) -> None:
    _peft_parity(models[name], images, {"rank": 4, "alpha": 6.0})


def test_targets_preview_matches_apply(models) -> None:
    net = _fresh(models, "resnet18")
    names = lora_targets(net, LoRAConfig(targets=["layer4"], exclude=["downsample"]))
    assert names == ["layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    apply_strategy(net, "lora", {"targets": ["layer4"], "exclude": ["downsample"]})
    assert list(lora_layers(net)) == names


@pytest.mark.parametrize("bits", [8, 4])
def test_qlora_state_dict_round_trip(bits) -> None:
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Conv2d(48, 16, 1))  # noqa: E731
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    for net in (a, b):
        inject_lora(net, QLoRAConfig(bits=bits, targets=["^0$"], init="gaussian"))
    sd = a.state_dict()
    assert sd["0.base_layer.weight_q"].dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert "0.base_layer.weight" not in sd and "0.lora_A" in sd
    b.load_state_dict(sd)
    x = torch.randn(3, 24)
    torch.testing.assert_close(a[0](x), b[0](x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------- direct weight reads
def test_wrappers_answer_for_the_wrapped_layer() -> None:
    """timm reads attributes of the layers it built (ConViT: ``self.qk.weight.device``): the wrappers answer."""
    lin = nn.Linear(4, 3)
    layer = LoRALinear(lin, rank=1, init="gaussian")
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert (layer.in_features, layer.out_features) == (4, 3)
    conv = LoRAConv2d(nn.Conv2d(2, 6, 3, stride=2, padding=1), rank=1)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.groups) == (2, 6, (3, 3), (2, 2), 1)
    q = LoRALinear(QuantizedLinear(nn.Linear(64, 8), bits=8), rank=1)
    assert torch.equal(q.weight, q.base_layer.dequantized_weight()) and q.out_features == 8
    with pytest.raises(AttributeError):
        layer.no_such_attribute  # noqa: B018


@pytest.mark.parametrize("strategy", ["lora", "qlora", "dora"])
@pytest.mark.parametrize("name, kwargs", [
    ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 1}),
    ("beit_base_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 64, "num_heads": 2}),
    ("convit_tiny", {"img_size": 32, "patch_size": 8, "depth": 1, "local_up_to_layer": 1}),
])
def test_attention_that_reads_qkv_weight_runs_the_delta(name, kwargs, strategy) -> None:
    """Eva/BEiT attention computes F.linear(x, self.qkv.weight, qkv_bias) itself: with a non-zero B the
    output must change (the delta is not skipped), and with B = 0 it is the base model's."""
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=3, **kwargs).eval()
    size = kwargs["img_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = net.forward_features(x)  # the features: a random-init head is near zero
    apply_strategy(net, strategy, {"rank": 2, "init": "gaussian", "qkv": "qkv"})
    net.eval()
    layers = lora_layers(net)
    assert any(n.endswith("qkv") or n.endswith("qk") for n in layers)
    with torch.no_grad():
        moved = net.forward_features(x)
        for layer in layers.values():
            layer.lora_B.zero_()
            if hasattr(layer, "lora_magnitude"):  # DoRA: m = ||W0||, the direction is W0 again
                layer.lora_magnitude.copy_(torch.linalg.vector_norm(layer._base_weight().flatten(1), dim=1))
        back = net.forward_features(x)
    assert (moved - back).abs().max() > 1e-3  # the delta is used (skipped, they would be bit-identical)
    if strategy != "qlora":  # qlora's B = 0 is the quantized base
        torch.testing.assert_close(back, base, atol=1e-5, rtol=1e-4)


class _ReadsWeight(nn.Module):
    """A timm-like classifier whose forward reads ``proj.weight`` instead of calling ``proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 2)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).mean((2, 3))
        return self.fc(torch.nn.functional.linear(h, self.proj.weight, self.proj.bias))


@pytest.mark.parametrize("strategy", ["lora", "qlora", "dora"])
def test_layer_whose_weight_is_read_directly_is_refused(strategy) -> None:
    net = _ReadsWeight()
    with pytest.raises(StrategyError, match=rf"strategy '{strategy}' cannot adapt 1 layer\(s\) of _ReadsWeight: its "
                                            r"forward never calls proj .*add them to 'exclude'"):
        apply_strategy(net, strategy, {"targets": ["proj", "stem"]})
    assert isinstance(net.proj, nn.Linear) and isinstance(net.stem, nn.Conv2d)  # nothing was wrapped
    apply_strategy(net, strategy, {"targets": ["stem"]})


@pytest.mark.parametrize("strategy", ["lora", "qlora", "dora"])
def test_weight_standardised_convs_are_adapted_on_their_standardised_weight(strategy) -> None:
    """NF-nets are ScaledStdConv2d throughout; LoRA used to skip them (and train nothing that got a gradient).
    Each becomes a plain frozen conv holding the weight its forward computes with, then a LoRA conv."""
    torch.manual_seed(0)
    net = timm.create_model("test_nfnet", num_classes=3).eval()
    stds = [n for n, m in net.named_modules() if type(m).__name__ == "ScaledStdConv2d"]
    pointwise = [n for n in stds if net.get_submodule(n).kernel_size == (1, 1) and net.get_submodule(n).groups == 1]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = net(x)
    apply_strategy(net, strategy, {"rank": 2})
    layers = lora_layers(net)
    wrapped = [n for n in stds if n in layers]
    assert wrapped == pointwise and len(wrapped) == 13  # the preset: the 1x1 convs (most of the dense weights)
    assert all(type(layers[n].base_layer).__name__ in ("Conv2d", "QuantizedConv2d") for n in wrapped)
    net.eval()
    with torch.no_grad():
        if strategy == "qlora":
            assert (net(x) - base).abs().max() < 0.1 * base.abs().max()  # int8 codes of the standardised weight
            return
        assert torch.equal(net(x), base)  # zero init: the base model, bit for bit
        for layer in layers.values():
            torch.nn.init.normal_(layer.lora_B, std=0.05)
            if hasattr(layer, "lora_magnitude"):  # zero-gain convs start at m = 0, which merge refuses to divide
                layer.lora_magnitude.add_(0.1)
        ref = net(x)
        merge(net)
        torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-4)
        unmerge(net)
        merge_and_unload(net)
        torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-4)
    assert not lora_layers(net)


@pytest.mark.parametrize("strategy", ["lora", "qlora", "dora"])
def test_refusals_name_the_strategy_in_use_and_the_model(strategy) -> None:
    net = _make("resnet18")
    with pytest.raises(StrategyError, match=rf"{strategy} target 'nope' matches no Linear/Conv2d layer of ResNet"):
        apply_strategy(net, strategy, {"targets": ["nope"]})
    with pytest.raises(StrategyError, match=rf"strategy '{strategy}' found no layer to adapt in ResNet"):
        apply_strategy(net, strategy, {"exclude": ["."]})


def test_a_qkv_that_holds_only_k_and_v_is_a_plain_linear() -> None:
    """GCViT's global attention names its k | v projection 'qkv' (2·dim): not three head splits."""
    torch.manual_seed(0)
    net = timm.create_model("gcvit_xxtiny", img_size=64, num_classes=3)
    qkvs = {n: m for n, m in net.named_modules() if n.endswith(".qkv")}
    globals_ = {n for n, m in qkvs.items() if m.out_features == 2 * m.in_features}
    assert globals_ and len(globals_) < len(qkvs)
    apply_strategy(net, "lora", {"rank": 2, "targets": [r"\.qkv$"]})
    layers = lora_layers(net)
    assert {type(layers[n]) for n in globals_} == {LoRALinear}
    assert {type(layers[n]) for n in set(qkvs) - globals_} == {LoRAQKVLinear}
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trainable_share_is_of_the_original_parameter_count(bits) -> None:
    """The quantized weights are buffers: the share used to be of what was left (57.69 % on a tiny ViT)."""
    net = _make("vit_tiny_patch16_224")
    total = sum(p.numel() for p in net.parameters())
    apply_strategy(net, "qlora", {"bits": bits, "rank": 2})
    lora = sum(p.numel() for n, p in net.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B"))
    head = 192 * 5 + 5
    assert trainable_parameter_count(net) == (lora + head, total + lora)
    lora_net = _make("vit_tiny_patch16_224")
    apply_strategy(lora_net, "lora", {"rank": 2})
    assert trainable_parameter_count(lora_net) == trainable_parameter_count(net)
