"""Which layers of a timm model the LoRA family (``lora``, ``qlora``, ``dora``) adapts.

* :func:`lora_candidates`: every ``nn.Linear`` / ``nn.Conv2d`` outside the classification head (every module
  of :func:`~visiontune.models.heads.find_head`: DeiT's ``head`` and ``head_dist``, LeViT's NormLinear pairs)
  and outside ``nn.MultiheadAttention`` (which reads ``out_proj.weight`` directly).
* :func:`select_targets`: the preset (``targets=None``: the layers that hold most weights) or the ``targets`` /
  ``exclude`` regexes, refusing with a :class:`~visiontune.strategies.base.StrategyError` that names the strategy
  and the model.

Example:
    >>> import timm
    >>> net = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1, num_classes=3)
    >>> [n for n in lora_candidates(net) if "head" in n]  # head and head_dist are never candidates
    []
"""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn

from ..models.heads import find_head
from .base import StrategyError
from .lora_layers import LoRALayer
from .quant import conv_is_supported

__all__ = ["lora_candidates", "select_targets"]


def lora_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear / Conv2d layers of ``model`` LoRA may wrap, by name (the head and MultiheadAttention excluded).

    Raises:
        StrategyError: the model already has LoRA layers.
    """
    head_ids = set(find_head(model, missing_ok=True).module_ids)
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALayer):
            raise StrategyError(f"{type(model).__name__} already has LoRA layers (e.g. {name!r}); apply LoRA once")
        if isinstance(m, nn.MultiheadAttention):  # reads out_proj.weight directly: a wrapper would break it
            head_ids.update(id(c) for c in m.modules())
        if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in head_ids:
            out[name] = m
    return out


def _wsize(m: nn.Module) -> int:
    return m.weight.numel()


def _preset(cands: dict[str, nn.Module]) -> list[str]:
    linear = [n for n, m in cands.items() if isinstance(m, nn.Linear)]
    convs = [n for n, m in cands.items() if isinstance(m, nn.Conv2d)]
    if linear and sum(_wsize(cands[n]) for n in linear) >= sum(_wsize(cands[n]) for n in convs):
        return linear  # ViT-style: attention qkv/proj + MLP fc1/fc2 (everything but the head)
    stem = convs[:1]  # the first conv sees the image: few weights, little to gain
    dense = [n for n in convs[1:] if cands[n].groups == 1 and conv_is_supported(cands[n])]
    pointwise = [n for n in dense if tuple(cands[n].kernel_size) == (1, 1)]
    if 3 * sum(_wsize(cands[n]) for n in pointwise) >= sum(_wsize(cands[n]) for n in dense):
        return pointwise  # depthwise-separable / bottleneck nets: the 1×1 convs mix channels
    return [n for n in dense if n not in stem]  # basic-block ResNets, VGG: dense k×k convs carry the weights


def _sample(names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return f"{', '.join(names[:10])}{', ...' if len(names) > 10 else ''} (leaf names: {', '.join(leaves)})"


def select_targets(model: nn.Module, targets: Sequence[str] | None, exclude: Sequence[str] | None,
                   strategy: str = "lora") -> list[str]:
    """Names of the modules ``strategy`` (``lora``, ``qlora``, ``dora``) wraps: the preset when ``targets`` is
    None, else the candidates the ``targets`` regexes match; minus those ``exclude`` matches.

    Raises:
        StrategyError: a ``targets`` regex matches nothing, or nothing is left; naming the strategy and the model.
    """
    cands = lora_candidates(model)
    model_name = type(model).__name__
    if targets is None:
        names = _preset(cands)
    else:
        names = []
        for pattern in targets:
            hits = [n for n in cands if re.search(pattern, n)]
            if not hits:
                raise StrategyError(
                    f"LoRA target {pattern!r} matches no Linear/Conv2d layer of {model_name} "
                    f"(the head is never a target). Available layers ({len(cands)}): {_sample(list(cands))}"
                )
            names.extend(h for h in hits if h not in names)
    if exclude:
        names = [n for n in names if not any(re.search(p, n) for p in exclude)]
    if not names:
        raise StrategyError(
            f"LoRA found no layer to adapt in {model_name} (after 'exclude'); set 'targets'. "
            f"Available layers ({len(cands)}): {_sample(list(cands))}"
        )
    return names
