"""Every registered strategy × a small ViT and a small CNN, through one shared tester.

For each case: trainable-parameter count equals an independent computation from the base's shapes, only
the declared parameters receive gradients, forward/backward run, the delta round-trips exactly into a
freshly built base (after perturbing the trained tensors so it cannot pass trivially), and merging is
equivalent where the strategy can merge. Strategies that do not fit a backbone are expected errors.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import timm
import torch
from torch import nn

from conftest import perturb_delta
from visiontune.delta import TaskBank, delta_from_file, load_delta, save_delta
from visiontune.strategies import StrategyError, apply_strategy, available_strategies, trainable_parameter_count
from visiontune.strategies.lora import merge, merge_and_unload, unmerge
from visiontune.strategies.sparse import sparse_masks, sparse_trainable_count

NUM_CLASSES = 3
CLASSES = ["a", "b", "c"]
_BN = nn.modules.batchnorm._BatchNorm


# ------------------------------------------------------------------------------------------ backbones
def vit() -> nn.Module:
    # vit_tiny at 32 px with 8-px patches (16 tokens), 4 blocks: the real architecture, fast on 2 cores
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=NUM_CLASSES)


def cnn() -> nn.Module:
    # depthwise-separable blocks, TF 'same' padding (Conv2dSame), BatchNormAct2d
    return timm.create_model("tf_efficientnet_lite0", num_classes=NUM_CLASSES)


BACKBONES: dict[str, Callable[[], nn.Module]] = {"vit": vit, "cnn": cnn}


# ------------------------------------------------------------------- independent trainable counts
def _numel(net: nn.Module, keep: Callable[[str, nn.Parameter], bool]) -> int:
    return sum(p.numel() for n, p in net.named_parameters() if keep(n, p))


def _head(net: nn.Module) -> int:
    return sum(p.numel() for p in net.get_classifier().parameters())


def _lora_count(net: nn.Module, rank: int, kind: str) -> int:
    """rank·(in + out) per targeted layer (qkv: 2 parts·rank·(in + d)), rank capped below the layer size."""
    total = 0
    for name, m in net.named_modules():
        if m is net.get_classifier():
            continue
        if kind == "vit" and isinstance(m, nn.Linear):
            if name.endswith("qkv"):
                d = m.out_features // 3
                r = min(rank, (d * m.in_features - 1) // (d + m.in_features))
                total += 2 * r * (m.in_features + d)
            else:
                r = min(rank, (m.weight.numel() - 1) // (m.in_features + m.out_features))
                total += r * (m.in_features + m.out_features)
        elif kind == "cnn" and isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1:
            r = min(rank, (m.weight.numel() - 1) // (m.in_channels + m.out_channels))
            total += r * (m.in_channels + m.out_channels)
    return total


def _adapter_count(net: nn.Module, kind: str) -> int:
    if kind == "vit":  # one adapter after every MLP, hidden = dim // 16, Linear layers with biases
        dims = [blk.mlp.fc2.out_features for blk in net.blocks]
    else:  # one 1×1-conv adapter after each stage, sized by the stage's output channels
        dims = [[c for c in stage[-1].modules() if isinstance(c, nn.Conv2d)][-1].out_channels for stage in net.blocks]
    return sum(2 * c * max(1, c // 16) + max(1, c // 16) + c for c in dims)


def _dora_magnitudes(net: nn.Module, kind: str) -> int:
    """One magnitude per output channel of every layer LoRA targets (a fused qkv: all 3·d rows)."""
    head = net.get_classifier()
    if kind == "vit":
        return sum(m.out_features for m in net.modules() if isinstance(m, nn.Linear) and m is not head)
    return sum(m.out_channels for m in net.modules()
               if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1)


def _ssf_count(net: nn.Module) -> int:
    """A scale and a shift per output channel of every Linear, Conv2d, LayerNorm and BatchNorm2d but the head."""
    head = net.get_classifier()
    total = 0
    for m in net.modules():
        if m is head:
            continue
        if isinstance(m, nn.Linear):
            total += 2 * m.out_features
        elif isinstance(m, nn.Conv2d):
            total += 2 * m.out_channels
        elif isinstance(m, nn.LayerNorm):
            total += 2 * m.normalized_shape[-1]
        elif isinstance(m, nn.BatchNorm2d):
            total += 2 * m.num_features
    return total


def expected_trainable(net: nn.Module, strategy: str, opts: dict[str, Any], kind: str) -> int:
    """Trainable entries of ``net`` (an un-modified base) under ``strategy``, from shapes and names only."""
    head = _head(net)
    if strategy == "full":
        return _numel(net, lambda n, p: True)
    if strategy == "linear":
        return head
    if strategy == "last_k":  # timm groups: the last block, plus the final norm (ViT) / conv_head + bn2 (CNN)
        prefixes = ("blocks.3.", "norm.") if kind == "vit" else ("blocks.6.", "conv_head.", "bn2.")
        return head + _numel(net, lambda n, p: n.startswith(prefixes))
    if strategy == "bitfit":
        return head + _numel(net, lambda n, p: n.endswith(".bias") and not n.startswith(("head.", "classifier.")))
    if strategy == "norm":
        ids = {id(p) for m in net.modules() if isinstance(m, (nn.LayerNorm, _BN)) for p in m.parameters(False)}
        return head + _numel(net, lambda n, p: id(p) in ids)
    if strategy in ("lora", "qlora"):
        return head + _lora_count(net, opts["rank"], kind)
    if strategy == "dora":
        return head + _lora_count(net, opts["rank"], kind) + _dora_magnitudes(net, kind)
    if strategy == "ssf":
        return head + _ssf_count(net)
    if strategy == "adapter":
        return head + _adapter_count(net, kind)
    if strategy == "vpt":
        return head + opts["length"] * net.embed_dim * (len(net.blocks) if opts["deep"] else 1)
    if strategy == "sparse":
        f = opts["fraction"]
        weights = [m.weight for m in net.modules()
                   if isinstance(m, (nn.Linear, nn.Conv2d)) and m is not net.get_classifier()]
        return head + sum(int(math.floor(f * w.numel() + 0.5)) for w in weights)
    raise AssertionError(f"no independent count for {strategy!r}: add one")


# ------------------------------------------------------------------------------------------ the table
OPTIONS: dict[str, dict[str, Any]] = {
    "full": {}, "linear": {}, "last_k": {"k": 1}, "bitfit": {}, "norm": {},
    # gaussian init: the delta is non-zero from the start, so merge tests cannot pass trivially
    "lora": {"rank": 4, "init": "gaussian"},
    "qlora": {"rank": 4, "init": "gaussian", "bits": 4},
    "adapter": {}, "vpt": {"length": 4, "deep": True}, "sparse": {"fraction": 0.05},
    "dora": {"rank": 4, "init": "gaussian"}, "ssf": {},
}
EXPECTED_ERRORS: dict[tuple[str, str], tuple[type[Exception], str]] = {
    ("vpt", "cnn"): (StrategyError, "strategy 'vpt' does not fit EfficientNet"),
}
MERGEABLE = {"lora", "qlora", "dora", "ssf"}


@dataclass
class Case:
    strategy: str
    backbone: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.strategy}-{self.backbone}"


CASES = [Case(s, b, OPTIONS[s]) for s in sorted(OPTIONS) for b in BACKBONES]


def test_table_covers_every_registered_strategy():
    assert sorted(OPTIONS) == available_strategies()


# ------------------------------------------------------------------------------------ shared tester
def build(case: Case, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = BACKBONES[case.backbone]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LoRA rank capping on tiny layers
        apply_strategy(net, case.strategy, case.options)
    return net


def perturb(net: nn.Module, seed: int) -> None:
    """Move every tensor the delta holds (sparse: only entries inside the masks; BN statistics too)."""
    perturb_delta(net, seed, var=True)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class StrategyTester:
    """The checks every (strategy, backbone) case goes through."""

    def __init__(self, case: Case) -> None:
        self.case = case

    def check_counts(self, net: nn.Module) -> None:
        expected = expected_trainable(BACKBONES[self.case.backbone](), self.case.strategy, self.case.options,
                                      self.case.backbone)
        if self.case.strategy == "sparse":
            got = sparse_trainable_count(net)
        else:
            got = trainable_parameter_count(net)[0]
        assert got == expected
        assert net.visiontune_delta == {n for n, p in net.named_parameters() if p.requires_grad}

    def check_gradients(self, net: nn.Module) -> None:
        net.train()
        logits = net(_x())
        assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()
        nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
        with_grad = {n for n, p in net.named_parameters() if p.grad is not None}
        assert with_grad == set(net.visiontune_delta)
        masks = sparse_masks(net)
        for name, mask in masks.items():
            grad = dict(net.named_parameters())[name].grad
            assert not grad[~mask].any(), f"{name}: gradient outside the sparse mask"
            assert grad[mask].any()

    def check_round_trip(self, net: nn.Module, tmp_path) -> None:
        perturb(net, seed=1)
        net.eval()
        path = tmp_path / "delta.safetensors"
        save_delta(net, path, class_names=CLASSES)
        tensors, meta = delta_from_file(path)
        assert meta["strategy"] == self.case.strategy and meta["class_names"] == CLASSES
        masks = sparse_masks(net)
        dense = {k for k in tensors if not k.endswith((".sparse_indices", ".sparse_values"))}
        stats = {k for k in dense if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}
        assert dense - stats == set(net.visiontune_delta) - set(masks)  # exactly the declared tensors
        assert {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".sparse_values")} == set(masks)

        fresh = build(self.case)  # the same base, rebuilt
        perturb(fresh, seed=2)  # a different delta that loading must overwrite
        fresh.eval()
        x = _x(1)
        with torch.no_grad():
            want = net(x)
            assert not torch.equal(fresh(x), want)
            load_delta(fresh, path)
            assert torch.equal(fresh(x), want)

    def check_merge(self, net: nn.Module) -> None:
        net.eval()
        x = _x(2)
        with torch.no_grad():
            want = net(x)
            if self.case.strategy in ("lora", "dora", "ssf"):
                assert merge(net, safe=True) > 0
                torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-4)
                assert unmerge(net) > 0
                torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-4)
            else:
                with pytest.raises(StrategyError, match="quantized"):
                    merge(net)
            bank_copy = TaskBank(net).merge()
            plain = merge_and_unload(build_copy(net))
            for other in (bank_copy, plain):
                assert not any(("lora_" in n or ".ssf." in n) for n, _ in other.named_parameters())
                torch.testing.assert_close(other(x), want, atol=1e-5, rtol=1e-4)


def build_copy(net: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(net)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_strategy_case(case: Case, tmp_path):
    expected_error = EXPECTED_ERRORS.get((case.strategy, case.backbone))
    if expected_error is not None:
        exc, message = expected_error
        with pytest.raises(exc, match=message):
            build(case)
        return
    tester = StrategyTester(case)
    net = build(case)
    tester.check_counts(net)
    tester.check_gradients(net)
    tester.check_round_trip(net, tmp_path)
    if case.strategy in MERGEABLE:
        tester.check_merge(net)
