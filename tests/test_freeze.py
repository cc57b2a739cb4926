"""The strategies that only choose which parameters train (strategies/freeze.py): norm tuning on models
without norm layers, last_k on models without timm's group_matcher."""

from __future__ import annotations

import pytest
import timm
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock
import torch
from torch import nn

from visiontune.strategies import StrategyError, apply_strategy, head_parameter_names


def _trainable_beyond_head(net: nn.Module) -> list[str]:
    head = set(head_parameter_names(net))
    return [n for n, p in net.named_parameters() if p.requires_grad and n not in head]


def test_norm_trains_weight_standardisation_gains_of_a_norm_free_net():
    torch.manual_seed(0)
    net = timm.create_model("test_nfnet", num_classes=3)
    apply_strategy(net, "norm")
    trained = _trainable_beyond_head(net)
    convs = [n for n, m in net.named_modules() if type(m).__name__ == "ScaledStdConv2d"]
    assert trained and sorted(trained) == sorted(f"{c}.{p}" for c in convs for p in ("gain", "bias"))


def test_norm_trains_affine_layers_of_resmlp():
    torch.manual_seed(0)
    net = MlpMixer(num_classes=3, img_size=32, patch_size=16, num_blocks=2, embed_dim=32, mlp_ratio=4,
                   block_layer=ResBlock, norm_layer=Affine)  # resmlp_12_224, two blocks
    apply_strategy(net, "norm")
    trained = _trainable_beyond_head(net)
    affines = [n for n, m in net.named_modules() if type(m).__name__ == "Affine"]
    assert len(affines) == 5 and sorted(trained) == sorted(f"{a}.{p}" for a in affines for p in ("alpha", "beta"))


def test_norm_keeps_to_norm_layers_where_there_are_some():
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3,
                            init_values=1e-5)  # LayerScale too: still only the LayerNorms train
    apply_strategy(net, "norm")
    assert {n.rsplit(".", 1)[0].rsplit(".", 1)[-1] for n in _trainable_beyond_head(net)} == {"norm1", "norm2", "norm"}


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_norm_refuses_a_model_with_nothing_that_normalises():
    with pytest.raises(StrategyError, match=r"strategy 'norm' does not fit _Plain: it has no normalisation layer"):
        apply_strategy(_Plain(), "norm")


def test_last_k_without_group_matcher_uses_the_models_own_stages():
    """PiT has no group_matcher(): the depth groups come from its 'transformers' stages and their blocks."""
    torch.manual_seed(0)
    net = timm.create_model("pit_ti_distilled_224", img_size=32, depth=[1, 2, 1], base_dims=[16, 16, 16], num_classes=3)
    assert getattr(net, "group_matcher", None) is None
    apply_strategy(net, "last_k", {"k": 2})
    trained = _trainable_beyond_head(net)
    assert {n.split(".")[0] for n in trained} == {"transformers", "norm"}
    assert {".".join(n.split(".")[:4]) for n in trained if n.startswith("transformers")} == {
        "transformers.2.blocks.0", "transformers.1.blocks.1", "transformers.2.pool.conv", "transformers.2.pool.fc"}
    net = timm.create_model("pit_ti_distilled_224", img_size=32, depth=[1, 2, 1], base_dims=[16, 16, 16], num_classes=3)
    apply_strategy(net, "last_k", {"k": 1, "coarse": True})
    assert {".".join(n.split(".")[:2]) for n in _trainable_beyond_head(net)} == {"transformers.2", "norm.weight",
                                                                               "norm.bias"}


def test_last_k_refuses_a_model_without_structure_naming_it():
    with pytest.raises(StrategyError, match=r"strategy 'last_k' does not fit _Plain: _Plain has no group_matcher\(\) "
                                            r"and no stage structure"):
        apply_strategy(_Plain(), "last_k", {"k": 1})
