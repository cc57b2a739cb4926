"""DoRA: the formula on fixed tensors, HF PEFT parity (forward and after SGD steps), merge, deltas, a real run."""

from __future__ import annotations

import copy
import logging
import math
import warnings

import pytest
import torch
from torch import nn

from conftest import perturb_delta, tiny_model
from visiontune.delta import build_from_delta, load_delta, save_delta
from visiontune.strategies import StrategyError, apply_strategy, make_strategy_config, trainable_parameter_count
from visiontune.strategies.dora import DoRAConfig, DoRAConv2d, DoRALinear, DoRAQKVLinear, apply_dora, to_dora
from visiontune.strategies.lora import LoRAConfig, LoRALinear, lora_layers, merge, merge_and_unload, unmerge

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
CLASSES = ["a", "b", "c", "d", "e"]


def _linear(w: list[list[float]], b: list[float]) -> nn.Linear:
    lin = nn.Linear(len(w[0]), len(w))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(w))
        lin.bias.copy_(torch.tensor(b))
    return lin


# ------------------------------------------------------------------------------------------ config
def test_config_is_loras() -> None:
    cfg = make_strategy_config("dora", {"rank": 4, "alpha": 8, "rslora": True, "qkv": "vq"})
    assert isinstance(cfg, DoRAConfig) and isinstance(cfg, LoRAConfig)
    assert cfg.qkv == "qv" and cfg.scaling == 4.0  # 8 / sqrt(4)
    with pytest.raises(StrategyError, match="strategy 'dora'"):
        DoRAConfig(rank=0)


# ------------------------------------------------------------------------------- exact formula
def test_linear_formula_on_fixed_tensors() -> None:
    # W0 = [[3, 4], [0, 1]], s·B·A = [[0, 0], [1, 0]] -> W0 + s·B·A = [[3, 4], [1, 1]], row norms [5, √2]
    layer = to_dora(LoRALinear(_linear([[3.0, 4.0], [0.0, 1.0]], [1.0, -1.0]), rank=1, alpha=1.0))
    assert layer.lora_magnitude.tolist() == [5.0, 1.0]  # ||W0|| per output row (B = 0)
    x = torch.tensor([[1.0, 1.0]])
    assert torch.allclose(layer(x), layer.base_layer(x))  # starts as the base layer
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0]]))
        layer.lora_B.copy_(torch.tensor([[0.0], [1.0]]))
        layer.lora_magnitude.copy_(torch.tensor([10.0, 2 * math.sqrt(2)]))
    # W' = m · (W0 + sBA) / ||.||_c = [[6, 8], [2, 2]]; W'x + b = [14 + 1, 4 - 1]
    torch.testing.assert_close(layer(x), torch.tensor([[15.0, 3.0]]))
    torch.testing.assert_close(layer.merged_weight(), torch.tensor([[6.0, 8.0], [2.0, 2.0]]))
    merge(layer_net := nn.Sequential(layer))
    torch.testing.assert_close(layer.base_layer.weight, torch.tensor([[6.0, 8.0], [2.0, 2.0]]))
    torch.testing.assert_close(layer_net(x), torch.tensor([[15.0, 3.0]]))
    unmerge(layer_net)
    torch.testing.assert_close(layer.base_layer.weight, torch.tensor([[3.0, 4.0], [0.0, 1.0]]))


def test_conv_norm_spans_the_whole_kernel() -> None:
    from visiontune.strategies.lora_layers import LoRAConv2d

    conv = nn.Conv2d(1, 1, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 2.0], [2.0, 4.0]]]]))  # norm 5
    layer = to_dora(LoRAConv2d(conv, rank=1, alpha=1.0))
    assert isinstance(layer, DoRAConv2d) and layer.lora_magnitude.tolist() == [5.0]
    with torch.no_grad():
        layer.lora_magnitude.fill_(10.0)
    x = torch.ones(1, 1, 2, 2)
    torch.testing.assert_close(layer(x), 2 * conv(x))  # B = 0: the direction is W0's, magnitude doubled


def test_counts_gradients_and_exact_start() -> None:
    base = tiny_model("vit")
    net = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_strategy(net, "dora", {"rank": 4})
    lora_net = copy.deepcopy(base)
    apply_strategy(lora_net, "lora", {"rank": 4})
    layers = lora_layers(net)
    assert {type(m) for m in layers.values()} == {DoRALinear, DoRAQKVLinear}
    magnitudes = sum(m.base_layer.out_features for m in layers.values())
    assert trainable_parameter_count(net)[0] == trainable_parameter_count(lora_net)[0] + magnitudes
    with torch.no_grad():
        torch.testing.assert_close(net(X), base(X), atol=1e-5, rtol=0)
    net.train()
    nn.functional.cross_entropy(net(X), torch.tensor([0, 1])).backward()
    assert {n for n, p in net.named_parameters() if p.grad is not None} == set(net.visiontune_delta)


def test_pissa_and_dora_start_as_the_base() -> None:
    base = tiny_model("lite0")
    net = copy.deepcopy(base)
    apply_strategy(net, "dora", {"rank": 4, "init": "pissa"})
    with torch.no_grad():
        torch.testing.assert_close(net(X), base(X), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- PEFT parity
def _peft_pair(base: nn.Module, options: dict) -> tuple[nn.Module, nn.Module, list[tuple[nn.Parameter, nn.Parameter]]]:
    """Our DoRA and PEFT's (``use_dora=True``) on the same layers, with the same A, B and m."""
    import peft  # a dev dependency: parity is checked, never skipped

    ours, theirs = copy.deepcopy(base).requires_grad_(False), copy.deepcopy(base)
    torch.manual_seed(0)
    cfg = DoRAConfig(init="gaussian", **options)
    apply_dora(ours, cfg)
    layers = lora_layers(ours)
    peft_cfg = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(layers), use_dora=True,
                               use_rslora=cfg.rslora)
    theirs = peft.inject_adapter_in_model(peft_cfg, theirs)
    peft_layers = {n: m for n, m in theirs.named_modules() if n in layers}
    pairs = []
    with torch.no_grad():
        for n, layer in layers.items():
            p = peft_layers[n]
            assert p.scaling["default"] == layer.scaling
            for mine, their in ((layer.lora_A, p.lora_A["default"].weight), (layer.lora_B, p.lora_B["default"].weight),
                                (layer.lora_magnitude, p.lora_magnitude_vector["default"].weight)):
                their.copy_(mine.view_as(their))
                pairs.append((mine, their))
    return ours.eval(), theirs.eval(), pairs


@pytest.mark.parametrize("kind, options", [
    ("vit", {"rank": 4, "targets": [r"attn\.proj$", r"mlp\.fc\d$"]}),
    ("vit", {"rank": 2, "alpha": 3.0, "rslora": True, "targets": [r"blocks\.[03]\.mlp\.fc2$"]}),
    ("lite0", {"rank": 4, "alpha": 6.0}),  # the 1×1 conv preset
])
def test_peft_parity_forward_and_after_sgd(kind, options) -> None:
    ours, theirs, pairs = _peft_pair(tiny_model(kind), options)
    count = lambda net: sum(p.numel() for p in net.parameters() if p.requires_grad)  # noqa: E731
    assert count(ours) == count(theirs) == sum(a.numel() for a, _ in pairs)
    start = ours(X).detach()
    torch.testing.assert_close(start, theirs(X), rtol=0, atol=1e-5)
    opt_ours = torch.optim.SGD([a for a, _ in pairs], lr=0.05)
    opt_theirs = torch.optim.SGD([b for _, b in pairs], lr=0.05)
    target = torch.tensor([1, 3])
    for _ in range(3):
        for net, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(X), target).backward()
            opt.step()
    for a, b in pairs:
        torch.testing.assert_close(a.detach().view_as(b), b.detach(), rtol=0, atol=1e-5)
    with torch.no_grad():
        y, y_peft = ours(X), theirs(X)
    assert (y - start).abs().max() > 1e-3  # the steps moved the model
    delta = (y - y_peft).abs().max().item()
    print(f"DoRA vs PEFT ({kind}, {options}): max |Δlogit| after 3 SGD steps {delta:.2e}")
    torch.testing.assert_close(y, y_peft, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------- merge and deltas
def _trained(kind: str, seed: int = 1) -> nn.Module:
    net = tiny_model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_strategy(net, "dora", {"rank": 4, "init": "gaussian"})
    with torch.no_grad():
        perturb_delta(net, seed)
    return net.eval()


@pytest.mark.parametrize("kind", ["vit", "lite0"])
def test_merge_unmerge_and_unload_keep_the_logits(kind) -> None:
    net = _trained(kind)
    weights = {n: m.base_layer.weight.clone() for n, m in lora_layers(net).items()}
    with torch.no_grad():
        want = net(X)
        assert merge(net, safe=True) == len(weights)
        torch.testing.assert_close(net(X), want, atol=1e-5, rtol=1e-5)
        assert unmerge(net) == len(weights)
        for n, m in lora_layers(net).items():
            torch.testing.assert_close(m.base_layer.weight, weights[n], atol=1e-5, rtol=1e-5)
        plain = merge_and_unload(copy.deepcopy(net))
        assert not lora_layers(plain) and not any("lora_" in n for n, _ in plain.named_parameters())
        torch.testing.assert_close(plain(X), want, atol=1e-5, rtol=1e-5)


def test_zero_magnitude_refuses_an_in_place_merge() -> None:
    net = _trained("vit")
    layer = next(iter(lora_layers(net).values()))
    with torch.no_grad():
        layer.lora_magnitude[0] = 0.0
    with pytest.raises(StrategyError, match="zero magnitude"):
        merge(net)


@pytest.mark.parametrize("kind", ["vit", "lite0"])
def test_delta_round_trip_into_a_fresh_base(kind, tmp_path) -> None:
    net = _trained(kind)
    path = save_delta(net, tmp_path / "dora.safetensors", class_names=CLASSES)
    fresh = _trained(kind, seed=2)  # the same base, another delta: loading must overwrite it
    with torch.no_grad():
        want = net(X)
        assert not torch.equal(fresh(X), want)
        load_delta(fresh, path)
        assert torch.equal(fresh(X), want)
        merge(fresh)  # a merged model: unmerged, written, merged again
        load_delta(fresh, path)
        torch.testing.assert_close(fresh(X), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- a real run
STEPS = 30


@pytest.mark.slow
def test_dora_trains_on_digits_and_rebuilds_from_its_delta(tmp_path) -> None:
    """30 AdamW steps (batch 32, 32 px, offline lite0 weights, LoRA's default LR) vs the same model untrained.

    Measured (seed 0, 40 steps): untrained 0.08, DoRA 0.81, LoRA 0.83, the linear probe 0.76.
    """
    import lightning as L

    from visiontune import ImageDataModule, TransferClassifier

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    L.seed_everything(0, verbose=False)
    data = ImageDataModule(train="digits", image_size=32, batch_size=32, num_workers=0)
    model = TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="dora", bn="eval",
                               label_smoothing=0.0, warmup_steps=0)
    quiet = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        untrained = L.Trainer(**quiet).validate(model, data, verbose=False)[0]["val_acc"]
        L.Trainer(max_steps=STEPS, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                  **quiet).fit(model, data)
        acc = L.Trainer(**quiet).validate(model, data, verbose=False)[0]["val_acc"]
    print(f"dora after {STEPS} steps: val acc {acc:.3f} (untrained {untrained:.3f})")
    assert acc > untrained + 0.4
    path = save_delta(model, tmp_path / "digits_dora.safetensors")
    rebuilt = build_from_delta(path)
    model.eval()
    x, _ = next(iter(data.val_dataloader()))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
