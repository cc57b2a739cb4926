"""Which layers of a timm model the LoRA family (``lora``, ``qlora``, ``dora``) adapts.

* :func:`lora_candidates`: every ``nn.Linear`` / ``nn.Conv2d`` outside the classification head (every module
  of :func:`~visiontune.models.heads.find_head`: DeiT's ``head`` and ``head_dist``, LeViT's NormLinear pairs)
  and outside ``nn.MultiheadAttention`` (which reads ``out_proj.weight`` directly).
* :func:`select_targets`: the preset (``targets=None``: the layers that hold most weights) or the ``targets`` /
  ``exclude`` regexes, refusing with a :class:`~visiontune.strategies.base.StrategyError` that names the strategy
  and the model.
* :func:`route_direct_reads` and :func:`check_called`: a wrapper only adapts a layer its model *calls*. timm's
  Eva and BEiT attention compute ``F.linear(x, self.qkv.weight, qkv_bias)`` themselves (their q/v biases live
  outside the layer), which would read the frozen weight and skip the delta without a sound; they are switched
  to timm's own ``qkv_bias_separate`` path (call ``qkv``, add the bias: the same sum). Any other targeted layer
  that one forward of the model (:func:`~visiontune.strategies.probe.probe`) does not call is refused.

Example:
    >>> import timm
    >>> net = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1, num_classes=3)
    >>> [n for n in lora_candidates(net) if "head" in n]  # head and head_dist are never candidates
    []
"""

from __future__ import annotations

import re
import warnings
from typing import Sequence

from torch import nn

from ..models.heads import find_head
from .base import StrategyError
from .lora_layers import LoRALayer
from .probe import probe
from .quant import conv_is_supported, is_weight_standardized

__all__ = ["check_called", "is_fused_qkv", "lora_candidates", "route_direct_reads", "select_targets"]


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


def _adaptable(conv: nn.Conv2d) -> bool:
    """A conv LoRA reproduces: plain, timm 'same', or weight-standardised (adapted on its standardised weight)."""
    return conv_is_supported(conv) or is_weight_standardized(conv)


def _wsize(m: nn.Module) -> int:
    return m.weight.numel()


def _preset(cands: dict[str, nn.Module]) -> list[str]:
    linear = [n for n, m in cands.items() if isinstance(m, nn.Linear)]
    convs = [n for n, m in cands.items() if isinstance(m, nn.Conv2d)]
    if linear and sum(_wsize(cands[n]) for n in linear) >= sum(_wsize(cands[n]) for n in convs):
        return linear  # ViT-style: attention qkv/proj + MLP fc1/fc2 (everything but the head)
    stem = convs[:1]  # the first conv sees the image: few weights, little to gain
    dense = [n for n in convs[1:] if cands[n].groups == 1 and _adaptable(cands[n])]
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
                    f"{strategy} target {pattern!r} matches no Linear/Conv2d layer of {model_name} "
                    f"(the head is never a target). Available layers ({len(cands)}): {_sample(list(cands))}"
                )
            names.extend(h for h in hits if h not in names)
    if exclude:
        names = [n for n in names if not any(re.search(p, n) for p in exclude)]
    if not names:
        raise StrategyError(
            f"strategy {strategy!r} found no layer to adapt in {model_name} (after 'exclude'); set 'targets'. "
            f"Available layers ({len(cands)}): {_sample(list(cands))}"
        )
    return names


def route_direct_reads(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Make the attention modules that read a targeted ``qkv``'s weight directly call it instead; returns them.

    timm's Eva / BEiT attention with q/v biases run ``F.linear(x, self.qkv.weight, bias=cat(q_bias, k_bias,
    v_bias))`` unless ``qkv_bias_separate`` is set, then ``self.qkv(x) + bias``: the same sum, through the
    module. The switch is set on every attention whose ``qkv`` is a target.
    """
    routed = []
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if leaf == "qkv" and getattr(parent, "q_bias", None) is not None and \
                getattr(parent, "qkv_bias_separate", None) is False:
            parent.qkv_bias_separate = True
            routed.append(parent_name)
    return routed


def check_called(model: nn.Module, names: Sequence[str], strategy: str = "lora") -> None:
    """Refuse (:class:`StrategyError` naming ``strategy``, the model and the layers) when one forward of
    ``model`` does not call every layer in ``names``: its weight is read directly (or the layer is unused),
    so a delta there would change nothing. Models that are not timm classifiers are not checked."""
    if not callable(getattr(model, "get_classifier", None)):
        return
    layers = [model.get_submodule(n) for n in names]
    try:
        called = probe(model, layers, strategy=strategy)
    except StrategyError as exc:
        warnings.warn(f"{exc}: the {strategy} layers are not checked for direct weight reads", stacklevel=3)
        return
    skipped = [n for n, m in zip(names, layers) if id(m) not in called]
    if skipped:
        raise StrategyError(
            f"strategy {strategy!r} cannot adapt {len(skipped)} layer(s) of {type(model).__name__}: its forward "
            f"never calls {_sample(skipped)} (it reads their weight directly, or does not use them), so a "
            "delta there would be ignored; add them to 'exclude'"
        )


def is_fused_qkv(model: nn.Module, name: str, layer: nn.Linear) -> bool:
    """Whether the Linear ``name`` is timm's fused q | k | v projection: named ``qkv`` and 3 head splits wide
    (``3 · num_heads · head_dim`` of its attention, where it says so). GCViT's global attention names its
    k | v projection ``qkv`` (2 · dim: the queries come from the global token): a plain Linear.

    Example:
        >>> att = nn.Module(); att.num_heads, att.head_dim = 2, 4; att.qkv = nn.Linear(8, 16)
        >>> is_fused_qkv(nn.ModuleDict({"attn": att}), "attn.qkv", att.qkv)
        False
    """
    if name.rsplit(".", 1)[-1] != "qkv" or layer.out_features % 3:
        return False
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    heads, head_dim = getattr(parent, "num_heads", None), getattr(parent, "head_dim", None)
    if isinstance(heads, int) and isinstance(head_dim, int):
        return layer.out_features == 3 * heads * head_dim
    return True
