"""SSF (scale & shift features): config, exact affine per layer kind, counts, gradients, merge, deltas, a real run."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import timm
import torch
from torch import nn

from conftest import perturb_delta, tiny_model
from visiontune.delta import TaskBank, build_from_delta, delta_from_file, load_delta, save_delta
from visiontune.strategies import (
    StrategyError,
    apply_strategy,
    available_strategies,
    make_strategy_config,
    trainable_parameter_count,
)
from visiontune.strategies.lora import merge, merge_and_unload, unmerge
from visiontune.strategies.ssf import SSF, SSFConfig, apply_ssf, merge_ssf, ssf_sites, ssf_targets, unmerge_ssf
from visiontune.training.bn import apply_bn_policy

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
CLASSES = ["a", "b", "c", "d", "e"]


def _set(ssf: SSF, scale: list[float], shift: list[float]) -> None:
    with torch.no_grad():
        ssf.scale.copy_(torch.tensor(scale))
        ssf.shift.copy_(torch.tensor(shift))


def _trained(kind: str, seed: int = 1) -> nn.Module:
    net = tiny_model(kind)
    apply_strategy(net, "ssf")
    with torch.no_grad():
        perturb_delta(net, seed)
    return net.eval()


# ------------------------------------------------------------------------------------------ config
def test_registered_with_its_lr() -> None:
    assert "ssf" in available_strategies()
    cfg = make_strategy_config("ssf", {"ops": ["conv", "linear"], "targets": "blocks"})
    assert cfg == SSFConfig(ops=["linear", "conv"], targets=["blocks"])
    assert SSFConfig.default_lr == 5e-3
    assert SSFConfig().ops == ["linear", "conv", "layernorm", "batchnorm"]


@pytest.mark.parametrize("options, words", [
    ({"ops": []}, ["'ops'", "non-empty subset"]),
    ({"ops": ["linear", "attention"]}, ["'ops'", "attention"]),
    ({"targets": ["("]}, ["'targets'", "bad regex"]),
    ({"exclude": 3}, ["'exclude'", "list of regexes"]),
])
def test_bad_options_are_named(options, words) -> None:
    with pytest.raises(StrategyError) as err:
        make_strategy_config("ssf", options)
    for w in words:
        assert w in str(err.value)


def test_targets_narrow_and_errors_name_the_layers() -> None:
    net = tiny_model("resnet18")
    assert ssf_targets(net, SSFConfig(ops=["batchnorm"], targets=["layer4.1"])) == ["layer4.1.bn1", "layer4.1.bn2"]
    assert "fc" not in ssf_targets(net)  # the head is never a target
    with pytest.raises(StrategyError, match="matches no linear layer"):
        ssf_targets(net, SSFConfig(ops=["linear"], targets=["layer1"]))
    apply_strategy(net, "ssf")
    with pytest.raises(StrategyError, match="apply SSF once"):
        apply_strategy(net, "ssf")


# ------------------------------------------------------------------------- exact affine per kind
def test_linear_and_layernorm_scale_the_last_dim_exactly() -> None:
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        lin.bias.copy_(torch.tensor([0.5, -0.5]))
    net = nn.Sequential(lin, nn.LayerNorm(2, elementwise_affine=False))
    apply_ssf(net, SSFConfig(ops=["linear"]))  # no get_classifier: every layer is a candidate
    _set(net[0].ssf, [2.0, 3.0], [1.0, -1.0])
    x = torch.tensor([[[1.0, 1.0]]])  # (B, N, C) tokens
    # W x + b = [3.5, 6.5]; · [2, 3] + [1, -1] = [8, 18.5]
    assert net[0](x).tolist() == [[[8.0, 18.5]]]
    ln = nn.LayerNorm(2, elementwise_affine=False)
    apply_ssf(ln, SSFConfig(ops=["layernorm"]))
    _set(ln.ssf, [2.0, 1.0], [0.0, 5.0])
    assert ln(torch.tensor([[1.0, 3.0]]))[0].tolist() == pytest.approx([-2.0, 6.0], abs=1e-4)  # LN -> [-1, 1]


def test_conv_and_batchnorm_scale_dim_1_exactly() -> None:
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
    apply_ssf(conv, SSFConfig(ops=["conv"]))
    _set(conv.ssf, [3.0, 2.0], [0.0, 1.0])
    y = conv(torch.full((1, 1, 2, 2), 2.0))
    assert y[0, :, 0, 0].tolist() == [6.0, -3.0]  # [2, -2]·[3, 2] + [0, 1]
    bn = nn.BatchNorm2d(2).eval()  # identity statistics
    apply_ssf(bn, SSFConfig(ops=["batchnorm"]))
    _set(bn.ssf, [2.0, -1.0], [1.0, 0.0])
    assert bn(torch.ones(1, 2, 1, 1)).flatten().tolist() == pytest.approx([3.0, -1.0], abs=1e-4)


def test_norm_act_gets_the_affine_before_its_activation() -> None:
    from timm.layers import BatchNormAct2d, LayerNorm2d

    bn = BatchNormAct2d(2, act_layer=nn.ReLU).eval()
    apply_ssf(bn, SSFConfig(ops=["batchnorm"]))
    _set(bn.ssf, [1.0, 1.0], [-2.0, 2.0])
    # ReLU(x·1 + shift): the shift acts before the activation, so -2 clips to 0 (after it, it would give -1)
    assert bn(torch.ones(1, 2, 1, 1)).flatten().tolist() == pytest.approx([0.0, 3.0], abs=1e-4)
    ln2d = LayerNorm2d(2)
    apply_ssf(ln2d, SSFConfig(ops=["layernorm"]))
    assert ln2d.ssf.dim == 1


# --------------------------------------------------------------------------- counts and gradients
@pytest.mark.parametrize("kind", ["vit", "lite0"])
def test_counts_gradients_and_exact_start(kind) -> None:
    base = tiny_model(kind)
    net = copy.deepcopy(base)
    apply_strategy(net, "ssf")
    head = net.get_classifier()
    channels = 0
    for m in net.modules():
        if m is head:
            continue
        if isinstance(m, (nn.Linear,)):
            channels += m.out_features
        elif isinstance(m, nn.Conv2d):
            channels += m.out_channels
        elif isinstance(m, nn.LayerNorm):
            channels += m.normalized_shape[-1]
        elif isinstance(m, nn.BatchNorm2d):
            channels += m.num_features
    head_params = sum(p.numel() for p in head.parameters())
    assert trainable_parameter_count(net)[0] == 2 * channels + head_params
    assert {n.split(".")[-2] for n in net.visiontune_delta if not n.startswith(("head", "classifier"))} == {"ssf"}
    with torch.no_grad():
        assert torch.equal(net(X), base(X))  # scale 1, shift 0: exactly the base model
    net.train()
    nn.functional.cross_entropy(net(X), torch.tensor([0, 1])).backward()
    assert {n for n, p in net.named_parameters() if p.grad is not None} == set(net.visiontune_delta)


def test_batchnorm_stays_frozen_under_the_frozen_policy() -> None:
    net = tiny_model("lite0")
    apply_strategy(net, "ssf")
    net.train()
    apply_bn_policy(net, "frozen")  # the BN layers' own parameters are frozen: pretrained statistics kept
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert all(isinstance(m.ssf, SSF) for m in bns)


# ---------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("kind", ["vit", "lite0"])
def test_merge_unmerge_and_unload_keep_the_logits(kind) -> None:
    net = _trained(kind)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        want = net(X)
        n = len(ssf_sites(net))
        assert merge(net, safe=True) == n  # vt.merge: LoRA and SSF alike
        assert merge(net) == 0  # idempotent
        torch.testing.assert_close(net(X), want, atol=1e-5, rtol=1e-5)
        assert unmerge(net) == n
        for k, v in net.state_dict().items():  # the created biases are gone again
            torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=1e-5)
        assert set(net.state_dict()) == set(weights)
        plain = merge_and_unload(copy.deepcopy(net))
        assert not any(".ssf." in k for k in plain.state_dict())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())
        assert set(plain.visiontune_delta) <= {n for n, _ in plain.named_parameters()}
        torch.testing.assert_close(plain(X), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(TaskBank(net).merge()(X), want, atol=1e-5, rtol=1e-5)


def test_exact_fold_numbers_and_refusals() -> None:
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    apply_ssf(lin, SSFConfig(ops=["linear"]))
    _set(lin.ssf, [2.0, 0.5], [1.0, -1.0])
    assert merge_ssf(lin) == 1
    assert lin.weight.tolist() == [[2.0, 4.0], [1.5, 2.0]] and lin.bias.tolist() == [1.0, -1.0]
    assert unmerge_ssf(lin) == 1 and lin.bias is None and lin.weight.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    with torch.no_grad():
        lin.ssf.shift[0] = float("nan")
    with pytest.raises(StrategyError, match="safe merge refused"):
        merge(lin, safe=True)
    assert not lin.ssf.merged and lin.weight.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    _set(lin.ssf, [0.0, 1.0], [0.0, 0.0])
    with pytest.raises(StrategyError, match="zero scale"):
        merge(lin)
    assert merge_and_unload(lin).weight.tolist() == [[0.0, 0.0], [3.0, 4.0]]  # unloading needs no inverse


# ----------------------------------------------------------------------------------------- deltas
@pytest.mark.parametrize("kind", ["vit", "lite0"])
def test_delta_round_trip_into_a_fresh_base(kind, tmp_path) -> None:
    net = _trained(kind)
    path = save_delta(net, tmp_path / "ssf.safetensors", class_names=CLASSES)
    tensors, meta = delta_from_file(path)
    assert meta["strategy"] == "ssf"
    assert {k for k in tensors if ".ssf." in k} == {n for n in net.visiontune_delta if ".ssf." in n}
    fresh = tiny_model(kind)
    apply_strategy(fresh, "ssf")
    fresh.eval()
    with torch.no_grad():
        want = net(X)
        assert not torch.equal(fresh(X), want)
        load_delta(fresh, path)
        assert torch.equal(fresh(X), want)
        # a merged model saves the same delta and loads one (unfolded, written, folded again)
        merge(net)
        merged_path = save_delta(net, tmp_path / "merged.safetensors", class_names=CLASSES)
        other = tiny_model(kind)
        apply_strategy(other, "ssf")
        load_delta(other.eval(), merged_path)
        torch.testing.assert_close(other(X), want, atol=1e-5, rtol=1e-5)
        merge(other)
        load_delta(other, path)
        assert all(m.ssf.merged for m in ssf_sites(other).values())
        torch.testing.assert_close(other(X), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- a real run
STEPS = 30


@pytest.mark.slow
def test_ssf_trains_on_digits_and_rebuilds_from_its_delta(tmp_path) -> None:
    """30 AdamW steps (batch 32, 32 px, offline lite0 weights, SSF's default LR) vs the same model untrained.

    Measured (seed 0): untrained 0.08, SSF 0.71 after 30 steps. At 40 steps SSF 0.74 and the linear probe 0.76
    (seed 1: SSF 0.83, linear 0.75): at this tiny budget SSF is about level with a linear probe on lite0.
    """
    import lightning as L

    from visiontune import ImageDataModule, TransferClassifier

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    L.seed_everything(0, verbose=False)
    data = ImageDataModule(train="digits", image_size=32, batch_size=32, num_workers=0)
    model = TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="ssf", bn="eval",
                               label_smoothing=0.0, warmup_steps=0)
    quiet = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        untrained = L.Trainer(**quiet).validate(model, data, verbose=False)[0]["val_acc"]
        L.Trainer(max_steps=STEPS, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                  **quiet).fit(model, data)
        acc = L.Trainer(**quiet).validate(model, data, verbose=False)[0]["val_acc"]
    print(f"ssf after {STEPS} steps: val acc {acc:.3f} (untrained {untrained:.3f})")
    assert acc > untrained + 0.4
    path = save_delta(model, tmp_path / "digits_ssf.safetensors")
    rebuilt = build_from_delta(path)
    model.eval()
    x, _ = next(iter(data.val_dataloader()))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_merge_folds_into_the_gain_of_weight_standardised_convs() -> None:
    """ScaledStdConv2d re-standardises its weight in every forward, so a scale folded into the weight was lost
    (merged NFNet logits off by ~0.1): it goes into the gain, exactly; a StdConv2d (no gain) refuses to merge."""
    from timm.layers import ScaledStdConv2d, StdConv2d

    torch.manual_seed(0)
    net = nn.Sequential(ScaledStdConv2d(3, 4, 3, padding=1, bias=True))
    apply_ssf(net, SSFConfig(ops=["conv"]))
    _set(net[0].ssf, [0.5, 2.0, -1.5, 3.0], [0.1, -0.2, 0.3, 0.0])
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        ref = net(x)
        weight, gain = net[0].weight.clone(), net[0].gain.clone()
        assert merge_ssf(net) == 1
        torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(net[0].weight, weight)
        assert torch.allclose(net[0].gain.flatten(), gain.flatten() * torch.tensor([0.5, 2.0, -1.5, 3.0]))
        unmerge_ssf(net)
        torch.testing.assert_close(net[0].gain, gain)
    plain = nn.Sequential(StdConv2d(3, 4, 3, padding=1))
    apply_ssf(plain, SSFConfig(ops=["conv"]))
    with pytest.raises(StrategyError, match=r"SSF layer '0' follows a StdConv2d, .* cannot be merged"):
        merge_ssf(plain)
    with pytest.raises(StrategyError, match="cannot be merged"):
        merge_and_unload(plain)


def test_layernorm_channel_dim_comes_from_the_output_not_the_name() -> None:
    """MetaFormer's LayerNorm2dNoBias (NCHW, dim 1) does not end in '2d'; its LayerNormNoBias is last-dim: the
    probe forward tells them apart, and merging stays exact."""
    from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

    torch.manual_seed(0)
    net = MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), token_mixers=[SepConv, SepConv, Attention, Attention],
                     norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2, num_classes=3).eval()
    apply_strategy(net, "ssf")
    dims = {type(m).__name__: set() for m in net.modules()}
    for m in ssf_sites(net).values():
        dims[type(m).__name__].add(m.ssf.dim)
    assert dims["LayerNorm2dNoBias"] == {1} and dims["LayerNormNoBias"] == {-1}
    with torch.no_grad():
        for m in ssf_sites(net).values():
            m.ssf.scale.uniform_(0.5, 1.5)
            m.ssf.shift.normal_(0, 0.1)
        ref = net(X)
        merge(net)
        torch.testing.assert_close(net(X), ref, atol=1e-5, rtol=1e-4)


class _ChannelsNorm(nn.LayerNorm):
    """A LayerNorm over dim 1 of NCHW maps, named like no timm class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.norm = _ChannelsNorm(6)
        self.fc = nn.Linear(6, 2)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x)).mean((2, 3)))


def test_a_custom_layernorm_is_placed_by_its_output_shape() -> None:
    net = _ConvNet()
    apply_ssf(net, SSFConfig(ops=["layernorm"]))
    assert net.norm.ssf.dim == 1
    with torch.no_grad():
        net.norm.ssf.scale.copy_(torch.arange(1.0, 7.0))
        assert net(X).shape == (2, 2)
