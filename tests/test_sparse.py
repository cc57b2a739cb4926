"""Sparse strategy: per-tensor counts, masked gradients, bit-identical frozen entries, calibration, deltas."""

from __future__ import annotations

import math

import pytest
import copy
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_base, tiny_model
from visiontune.strategies import StrategyError, apply_strategy, make_strategy_config
from visiontune.strategies.sparse import (
    apply_sparse_delta,
    calibrate_sparse,
    sparse_delta,
    sparse_masks,
    sparse_needs_calibration,
    sparse_trainable_count,
)

NUM_CLASSES = 5
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([1, 3])
HEAD_NAME = {"vit": "head", "resnet18": "fc", "lite0": "classifier"}
HEAD_SIZE = {"vit": 192 * 5 + 5, "resnet18": 512 * 5 + 5, "lite0": 1280 * 5 + 5}


def _base(kind: str) -> nn.Module:
    return tiny_base(kind, NUM_CLASSES)


def model(kind: str) -> nn.Module:
    return tiny_model(kind, NUM_CLASSES)


def _keep(numel: int, fraction: float) -> int:
    return math.floor(fraction * numel + 0.5)  # documented rule: round half up, per tensor


def _expected_targets(kind: str) -> dict[str, int]:
    """Linear/Conv weights except the head, picked by shape (2-D or 4-D weights), not by module type."""
    head = HEAD_NAME[kind] + "."
    return {
        n: p.numel()
        for n, p in _base(kind).named_parameters()
        if n.endswith("weight") and p.ndim in (2, 4) and not n.startswith(head)
    }


@pytest.mark.parametrize("kind", ["vit", "resnet18", "lite0"])
@pytest.mark.parametrize("fraction", [0.01, 0.25])
def test_per_tensor_counts_exact(kind, fraction):
    m = model(kind)
    apply_strategy(m, "sparse", {"fraction": fraction})
    masks = sparse_masks(m)
    expected = {n: _keep(k, fraction) for n, k in _expected_targets(kind).items()}
    assert set(masks) == {n for n, k in expected.items() if k > 0}
    for n, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == m.get_parameter(n).shape
        assert int(mask.sum()) == expected[n], n
    assert sparse_trainable_count(m) == sum(expected.values()) + HEAD_SIZE[kind]
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == set(masks) | {f"{HEAD_NAME[kind]}.weight", f"{HEAD_NAME[kind]}.bias"}


def test_hand_counted_numbers():
    m = model("vit")
    apply_strategy(m, "sparse", {"fraction": 0.01})
    # patch_embed 36864 -> 369; per block qkv 110592 -> 1106, proj 36864 -> 369, fc1/fc2 147456 -> 1475
    assert sparse_trainable_count(m) == 369 + 12 * (1106 + 369 + 1475 + 1475) + 965 == 54434
    m = model("resnet18")
    apply_strategy(m, "sparse", {"fraction": 0.01})
    assert int(sparse_masks(m)["conv1.weight"].sum()) == 94  # 64*3*7*7 = 9408
    assert sparse_trainable_count(m) == 114236


def test_tiny_tensors_with_zero_quota_stay_frozen():
    m = model("lite0")
    apply_strategy(m, "sparse", {"fraction": 0.001})
    dw = m.get_parameter("blocks.0.0.conv_dw.weight")  # 32*1*3*3 = 288 entries -> 0.288 -> 0
    assert dw.numel() == 288 and not dw.requires_grad
    assert "blocks.0.0.conv_dw.weight" not in sparse_masks(m)


def test_magnitude_mask_picks_largest_entries():
    m = model("resnet18")
    apply_strategy(m, "sparse", {"fraction": 0.1})
    for n, mask in sparse_masks(m).items():
        w = m.get_parameter(n).detach().abs()
        assert w[mask].min() >= w[~mask].max(), n


@pytest.mark.parametrize("kind", ["vit", "lite0"])
def test_adamw_step_leaves_unmasked_entries_bit_identical(kind):
    m = model(kind).train()
    apply_strategy(m, "sparse", {"fraction": 0.05})
    masks = sparse_masks(m)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(m(X), Y).backward()
        for n, mask in masks.items():
            g = m.get_parameter(n).grad
            assert torch.equal(g[~mask], torch.zeros_like(g[~mask])), n  # exactly zero outside the mask
        opt.step()
    changed_inside = 0
    for n, p in m.named_parameters():
        if n in masks:
            assert torch.equal(p.detach()[~masks[n]], before[n][~masks[n]]), n
            changed_inside += int((p.detach()[masks[n]] != before[n][masks[n]]).sum())
        elif not p.requires_grad:
            assert torch.equal(p.detach(), before[n]), n
    assert changed_inside > 0.5 * sum(int(k.sum()) for k in masks.values())


def test_no_weight_decay_flag_lets_adamw_decay_keep_frozen_entries():
    m = model("vit").train()
    apply_strategy(m, "sparse", {"fraction": 0.05})
    masks = sparse_masks(m)
    assert all(getattr(m.get_parameter(n), "visiontune_no_weight_decay", False) for n in masks)
    assert not hasattr(m.head.weight, "visiontune_no_weight_decay")
    params = [p for p in m.parameters() if p.requires_grad]
    no_wd = [p for p in params if getattr(p, "visiontune_no_weight_decay", False)]
    wd = [p for p in params if not getattr(p, "visiontune_no_weight_decay", False)]
    opt = torch.optim.AdamW([{"params": wd, "weight_decay": 0.1}, {"params": no_wd, "weight_decay": 0.0}], lr=1e-2)
    base_state = {k: v.clone() for k, v in m.state_dict().items()}
    F.cross_entropy(m(X), Y).backward()
    opt.step()
    sparse_delta(m, base_state)  # raises if an entry outside a mask moved
    # The same step with decay on everything moves frozen entries, and sparse_delta notices.
    bad = model("vit").train()
    apply_strategy(bad, "sparse", {"fraction": 0.05})
    base_state = {k: v.clone() for k, v in bad.state_dict().items()}
    F.cross_entropy(bad(X), Y).backward()
    torch.optim.AdamW([p for p in bad.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1).step()
    with pytest.raises(StrategyError, match="outside its mask differ.*weight decay"):
        sparse_delta(bad, base_state)


def test_deepcopy_and_state_dict_keep_masks():
    m = model("resnet18").train()
    apply_strategy(m, "sparse", {"fraction": 0.02})
    c = copy.deepcopy(m)  # deepcopy drops tensor hooks and attributes: the forward pre-hook restores them
    F.cross_entropy(c(X), Y).backward()
    for n, mask in sparse_masks(c).items():
        g = c.get_parameter(n).grad
        assert g[~mask].abs().max() == 0, n
        assert c.get_parameter(n).visiontune_no_weight_decay is True
    # timm zero-initialises each residual block's last BN, so check a live gradient on the stem conv
    assert c.conv1.weight.grad[sparse_masks(c)["conv1.weight"]].abs().min() > 0
    sd = m.state_dict()
    assert sd["layer1.0.conv1.weight_sparse_mask"].dtype == torch.bool
    assert bool(sd["visiontune_sparse_calibrated"])


def _fisher_scores(base: nn.Module, names, batches) -> dict[str, torch.Tensor]:
    """Independent reference: squared gradients summed over the batches, in eval mode."""
    ref = copy.deepcopy(base).eval()
    params = {n: p for n, p in ref.named_parameters() if n in names}
    scores = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(ref(x), y), list(params.values()))
        for n, g in zip(params, grads):
            scores[n] += g.square()
    return scores


def test_gradient_calibration_sets_fisher_masks():
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (2,), generator=g)) for _ in range(3)]
    m = model("lite0").train()  # (timm's ResNet zero-inits BN scales: most of its convs get no gradient)
    apply_strategy(m, "sparse", {"fraction": 0.05, "score": "gradient", "warmup_batches": 2})
    assert sparse_needs_calibration(m)
    provisional = {n: v.clone() for n, v in sparse_masks(m).items()}
    for n, mask in provisional.items():  # provisional mask: magnitude
        w = m.get_parameter(n).detach().abs()
        assert w[mask].min() >= w[~mask].max()
    bn_before = m.bn1.running_mean.clone()
    masks = {n: v.clone() for n, v in calibrate_sparse(m, iter(batches)).items()}  # warmup_batches=2 of 3
    assert not sparse_needs_calibration(m)
    assert m.training and all(mod.training for mod in m.modules())  # modes restored
    assert torch.equal(m.bn1.running_mean, bn_before)  # no BatchNorm statistics update
    assert all(p.grad is None for p in m.parameters())  # .grad untouched
    scores = _fisher_scores(_base("lite0"), set(masks), batches[:2])
    for n, mask in masks.items():
        assert int(mask.sum()) == int(provisional[n].sum())
        s = scores[n]
        if s.any():  # the mask holds the top-k scores (ties at the boundary: any choice is right)
            assert s[mask].min() >= s[~mask].max(), n
        else:  # documented fallback: no gradient signal keeps the magnitude mask
            assert torch.equal(mask, provisional[n]), n
    assert sum(not torch.equal(masks[n], provisional[n]) for n in masks) > len(masks) // 2
    # Already calibrated: a second call is a no-op; force=True recalibrates (here on other batches).
    assert all(torch.equal(a, masks[n]) for n, a in calibrate_sparse(m, batches[2:]).items())
    forced = calibrate_sparse(m, batches[2:], force=True)
    assert any(not torch.equal(forced[n], masks[n]) for n in masks)


def test_calibrate_is_noop_for_magnitude_and_errors_without_strategy():
    m = model("resnet18")
    apply_strategy(m, "sparse", {"fraction": 0.05})
    before = {n: v.clone() for n, v in sparse_masks(m).items()}
    assert not sparse_needs_calibration(m)
    after = calibrate_sparse(m, [(X, Y)])
    assert all(torch.equal(after[n], before[n]) for n in before)
    with pytest.raises(StrategyError, match="apply the 'sparse' strategy"):
        calibrate_sparse(model("resnet18"), [(X, Y)])
    g = model("resnet18")
    apply_strategy(g, "sparse", {"score": "gradient"})
    with pytest.raises(StrategyError, match="got no batches"):
        calibrate_sparse(g, [])


def test_sparse_delta_round_trip():
    m = model("vit").train()
    apply_strategy(m, "sparse", {"fraction": 0.02})
    base_state = {k: v.clone() for k, v in m.state_dict().items()}
    F.cross_entropy(m(X), Y).backward()
    torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0).step()
    delta = sparse_delta(m, base_state)
    masks = sparse_masks(m)
    assert set(delta) == {f"{n}.sparse_{k}" for n in masks for k in ("indices", "values")}
    assert sum(v.numel() for k, v in delta.items() if k.endswith("values")) == sum(int(v.sum()) for v in masks.values())
    fresh = model("vit")
    apply_sparse_delta(fresh, delta)
    for n in masks:
        assert torch.equal(fresh.get_parameter(n), m.get_parameter(n)), n
    with pytest.raises(StrategyError, match="has no parameter"):
        apply_sparse_delta(model("resnet18"), delta)


def test_targets_regexes():
    m = model("vit")
    apply_strategy(m, "sparse", {"fraction": 0.1, "targets": [r"^blocks\.0\.attn\.qkv\.", r"pos_embed"]})
    masks = sparse_masks(m)
    assert set(masks) == {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "pos_embed"}
    assert int(masks["pos_embed"].sum()) == _keep(17 * 192, 0.1) == 326
    with torch.no_grad():
        m(X)  # the root model owns pos_embed: its pre-hook must not break the forward
    with pytest.raises(StrategyError, match=r"\['nothing_here'\] match no parameter"):
        apply_strategy(model("vit"), "sparse", {"targets": ["nothing_here"]})
    with pytest.raises(StrategyError, match="match no parameter"):
        apply_strategy(model("vit"), "sparse", {"targets": [r"^head\."]})  # the head is always dense


def test_full_fraction_and_twice_refused():
    m = model("lite0")
    apply_strategy(m, "sparse", {"fraction": 1.0})
    assert all(bool(v.all()) for v in sparse_masks(m).values())
    with pytest.raises(StrategyError, match="already has sparse masks"):
        apply_strategy(m, "sparse", {})


@pytest.mark.parametrize(
    "opts,fragments",
    [
        ({"fraction": 0}, ["'fraction'", "(0, 1]"]),
        ({"fraction": 1.5}, ["'fraction'", "(0, 1]", "1.5"]),
        ({"fraction": -0.1}, ["'fraction'"]),
        ({"fraction": "0.1"}, ["'fraction'"]),
        ({"fraction": True}, ["'fraction'"]),
        ({"score": "fisher"}, ["'score'", "'magnitude'", "'gradient'", "'fisher'"]),
        ({"warmup_batches": 0}, ["'warmup_batches'", ">= 1"]),
        ({"targets": ["("]}, ["'targets'", "not a valid regex"]),
        ({"targets": [3]}, ["'targets'", "list of regexes"]),
        ({"mask": 0.1}, ["Unknown option", "'mask'", "fraction"]),
    ],
)
def test_bad_config_messages(opts, fragments):
    with pytest.raises(StrategyError) as exc:
        make_strategy_config("sparse", opts)
    for frag in fragments:
        assert frag in str(exc.value)
