"""LoRA options: rsLoRA scaling, PiSSA init (and its deltas), LoRA+ learning-rate ratio; each against its formula."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from conftest import perturb_delta, tiny_model
from visiontune.delta import DeltaError, load_delta, save_delta
from visiontune.strategies import StrategyError, apply_strategy, make_strategy_config
from visiontune.strategies.lora import LoRAConfig, LoRALinear, inject_lora, lora_layers, merge, unmerge
from visiontune.training.optim import layer_scales, param_groups

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
CLASSES = ["a", "b", "c", "d", "e"]
FC = [r"mlp\.fc\d$"]  # plain Linear targets of the ViT (PEFT has no per-part qkv pairs)


@pytest.mark.parametrize("options, words", [
    ({"rslora": "yes"}, ["'rslora'", "true or false"]),
    ({"lr_ratio": 0}, ["'lr_ratio'", "> 0"]),
    ({"lr_ratio": float("inf")}, ["'lr_ratio'"]),
    ({"lr_ratio": True}, ["'lr_ratio'"]),
    ({"init": "svd"}, ["'init'", "pissa"]),
])
def test_bad_options_are_named(options, words) -> None:
    with pytest.raises(StrategyError) as err:
        make_strategy_config("lora", options)
    for w in words:
        assert w in str(err.value)


def test_qlora_refuses_pissa() -> None:
    with pytest.raises(StrategyError, match="init='pissa'.*float base"):
        make_strategy_config("qlora", {"init": "pissa"})


# -------------------------------------------------------------------------------------------- rsLoRA
def test_rslora_scaling_formula() -> None:
    assert LoRAConfig(rank=4, alpha=8.0).scaling == 2.0
    assert LoRAConfig(rank=4, alpha=8.0, rslora=True).scaling == 4.0  # 8 / sqrt(4)
    assert LoRAConfig(rank=9, alpha=6.0, rslora=True).scaling == 2.0
    net = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="rank lowered"):
        layers = inject_lora(net, LoRAConfig(rank=4, alpha=8.0, rslora=True, targets=["^0$", "^1$"]))
    assert (layers["0"].rank, layers["0"].scaling) == (4, 4.0)
    assert (layers["1"].rank, layers["1"].scaling) == (1, 8.0)  # capped to rank 1: alpha / sqrt(1)
    layer = layers["0"]
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A.fill_(1 / 16)
        layer.lora_B.fill_(1.0)
    # A·1 = [1, 1, 1, 1]; B·(A·1) = 4 per output; · alpha/sqrt(r) = 4  ->  16 (alpha/r would give 8)
    assert layer(torch.ones(1, 16)).tolist() == [[16.0] * 16]


def test_rslora_peft_parity() -> None:
    import peft

    base = tiny_model("vit")
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(0)
    cfg = LoRAConfig(rank=4, alpha=6.0, rslora=True, init="gaussian", targets=FC)
    layers = inject_lora(ours, cfg)
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=6.0, use_rslora=True, target_modules=list(layers)), theirs)
    mods = dict(theirs.named_modules())
    with torch.no_grad():
        for n, layer in layers.items():
            assert mods[n].scaling["default"] == layer.scaling == 3.0  # 6 / sqrt(4)
            mods[n].lora_A["default"].weight.copy_(layer.lora_A)
            mods[n].lora_B["default"].weight.copy_(layer.lora_B)
        y, y_peft = ours.eval()(X), theirs.eval()(X)
    assert (y - base(X)).abs().max() > 1e-3
    torch.testing.assert_close(y, y_peft, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- PiSSA
def test_pissa_factors_on_a_fixed_weight() -> None:
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    layer = LoRALinear(lin, rank=1, alpha=4.0, init="pissa")  # scaling 4
    # top singular triple (3, e1, e1): B = ±e1·sqrt(3/4), A = ±sqrt(3/4)·e1ᵀ, s·B·A = [[3, 0], [0, 0]]
    torch.testing.assert_close(layer.lora_A.abs(), torch.tensor([[math.sqrt(0.75), 0.0]]))
    torch.testing.assert_close(layer.lora_B.abs(), torch.tensor([[math.sqrt(0.75)], [0.0]]))
    torch.testing.assert_close(layer.scaling * layer.lora_B @ layer.lora_A, torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(lin.weight, torch.tensor([[3.0, 0.0], [0.0, 1.0]]))  # the stored base stays pristine
    x = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(layer(x), lin(x))  # residual [[0, 0], [0, 1]] + principal part = W
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 1.0]]))
        layer.lora_B.copy_(torch.tensor([[1.0], [0.5]]))
    # frozen residual W - s·B0·A0 = [[0, 0], [0, 1]]; y = residual·x + 4·B·(A·x) = [0, 2] + 4·[3, 1.5]
    torch.testing.assert_close(layer(x), torch.tensor([[12.0, 8.0]]))
    torch.testing.assert_close(layer.delta_weight(), torch.tensor([[1.0, 4.0], [2.0, 2.0]]))  # s(BA - B0A0)
    with pytest.raises(StrategyError, match="rank <= 2"):
        LoRALinear(nn.Linear(2, 2), rank=3, init="pissa")


@pytest.mark.parametrize("kind", ["vit", "lite0"])
def test_pissa_starts_as_the_base_and_merges(kind) -> None:
    base = tiny_model(kind)
    net = copy.deepcopy(base)
    apply_strategy(net, "lora", {"rank": 4, "init": "pissa"})
    pristine = {n: m.base_layer.weight.clone() for n, m in lora_layers(net).items()}
    with torch.no_grad():
        torch.testing.assert_close(net(X), base(X), atol=1e-5, rtol=1e-5)
        assert not any("pissa" in k for k in net.state_dict())  # the principal part is not state
        perturb_delta(net, seed=1)
        want = net(X)
        merge(net)
        torch.testing.assert_close(net(X), want, atol=1e-5, rtol=1e-5)
        unmerge(net)
    for n, m in lora_layers(net).items():
        torch.testing.assert_close(m.base_layer.weight, pristine[n], atol=1e-5, rtol=1e-5)


def test_pissa_matches_peft() -> None:
    import peft

    base = tiny_model("vit")
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    layers = inject_lora(ours, LoRAConfig(rank=4, alpha=8.0, init="pissa", targets=FC))
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=8.0, init_lora_weights="pissa", target_modules=list(layers)), theirs)
    mods = dict(theirs.named_modules())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, layer in layers.items():  # the same factors (same SVD) ...
            torch.testing.assert_close(layer.lora_A, mods[n].lora_A["default"].weight, rtol=0, atol=1e-6)
            torch.testing.assert_close(layer.lora_B, mods[n].lora_B["default"].weight, rtol=0, atol=1e-6)
            for mine, their in ((layer.lora_A, mods[n].lora_A["default"].weight),
                                (layer.lora_B, mods[n].lora_B["default"].weight)):
                mine.add_(torch.randn(mine.shape, generator=g) * 0.05)
                their.copy_(mine)
        y, y_peft = ours.eval()(X), theirs.eval()(X)  # ... and PEFT's residual base gives the same logits
    assert (y - base(X)).abs().max() > 1e-3
    torch.testing.assert_close(y, y_peft, rtol=0, atol=1e-5)


def test_pissa_delta_round_trip_holds_only_the_factors(tmp_path) -> None:
    """PiSSA keeps the pristine base weight: the delta holds A, B (+ head) like any LoRA delta, the base hashes are
    the pristine base's, and loading recomputes the principal part from the (hash-checked) base."""
    opts = {"rank": 4, "init": "pissa"}
    net = tiny_model("vit")
    apply_strategy(net, "lora", opts)
    with torch.no_grad():
        perturb_delta(net, seed=1)
    path = save_delta(net.eval(), tmp_path / "pissa.safetensors", class_names=CLASSES)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(net.visiontune_delta) and all(k.endswith(("lora_A", "lora_B")) or k.startswith("head")
                                                     for k in keys)
    fresh = tiny_model("vit")
    apply_strategy(fresh, "lora", opts)
    with torch.no_grad():
        want = net(X)
        load_delta(fresh.eval(), path)
        assert torch.equal(fresh(X), want)
    other_base = tiny_model("vit")
    with torch.no_grad():
        other_base.blocks[0].mlp.fc1.weight.add_(0.01)  # not the base the delta was trained on
    apply_strategy(other_base, "lora", opts)
    with pytest.raises(DeltaError, match="not the base this delta was trained on"):
        load_delta(other_base, path)
    zero_init = tiny_model("vit")
    apply_strategy(zero_init, "lora", {"rank": 4})  # no principal part to subtract: refused by name
    with pytest.raises(DeltaError, match="init"):
        load_delta(zero_init, path)


def test_delta_saved_before_the_new_options_still_loads(tmp_path) -> None:
    net = tiny_model("vit")
    apply_strategy(net, "lora", {"rank": 2})
    with torch.no_grad():
        perturb_delta(net, seed=1)
    path = save_delta(net.eval(), tmp_path / "old.safetensors", class_names=CLASSES)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["strategy_config"])
    del cfg["rslora"], cfg["lr_ratio"]  # as written before these options existed
    meta["strategy_config"] = json.dumps(cfg, sort_keys=True)
    save_file(tensors, str(path), metadata=meta)
    fresh = tiny_model("vit")
    apply_strategy(fresh, "lora", {"rank": 2})
    with torch.no_grad():
        load_delta(fresh.eval(), path)  # strict: the missing options had their defaults
        assert torch.equal(fresh(X), net(X))


# ---------------------------------------------------------------------------------------------- LoRA+
def test_lr_ratio_gives_lora_b_its_multiple_in_the_param_groups() -> None:
    net = tiny_model("vit")
    apply_strategy(net, "lora", {"rank": 4, "lr_ratio": 16.0})
    lrs = {n: g["lr"] for g in param_groups(net, 1e-3, 0.05) for n in g["names"]}
    assert lrs and set(lrs) == set(net.visiontune_delta)
    for n, lr in lrs.items():
        assert lr == (1.6e-2 if n.endswith("lora_B") else 1e-3), n
    scales = layer_scales(net, 0.5)
    for g in param_groups(net, 1e-3, 0.05, layer_decay=0.5):  # combined with layer-wise decay
        for n in g["names"]:
            assert g["lr"] == pytest.approx(1e-3 * scales[n] * (16.0 if n.endswith("lora_B") else 1.0), rel=1e-12)
            assert g["initial_lr_scale"] == pytest.approx(g["lr"] / 1e-3, rel=1e-12)
    plain = tiny_model("vit")
    apply_strategy(plain, "dora", {"rank": 4, "lr_ratio": 4.0})  # the LoRA family shares the option
    lrs = {n: g["lr"] for g in param_groups(plain, 1e-3, 0.0) for n in g["names"]}
    assert {lr for n, lr in lrs.items() if n.endswith("lora_B")} == {4e-3}
    assert {lr for n, lr in lrs.items() if n.endswith(("lora_A", "lora_magnitude"))} == {1e-3}
