"""Optimizer parameter groups (weight decay off for biases/norms, optional layer-wise LR decay) and the
learning-rate schedule (:func:`lr_schedule`: linear warm-up, then cosine or constant).

Every parameter a strategy may train lands in exactly one group (asserted), including parameters a
schedule keeps frozen for now: groups are created once, up front, so LR schedulers keep working when a
schedule thaws more layers later.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..models.groups import depth_groups
from ..strategies.base import delta_parameter_names
from ..strategies.lora_options import lr_multipliers

__all__ = ["param_groups", "layer_scales", "lr_schedule"]


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return (
        p.ndim <= 1
        or name.endswith(".bias")
        or getattr(p, "visiontune_no_weight_decay", False)
        or any(t in name for t in ("pos_embed", "cls_token", "reg_token", "prompt"))
    )


def layer_scales(model: nn.Module, layer_decay: float | None, *, coarse: bool = False) -> dict[str, float]:
    """LR multiplier per parameter name: ``layer_decay ** (distance from the head in depth groups)``.

    The head gets 1.0; ``None`` gives 1.0 everywhere.

    Example:
        >>> import timm
        >>> s = layer_scales(timm.create_model("resnet18", num_classes=2), 0.5, coarse=True)
        >>> s["fc.weight"], s["layer4.0.conv1.weight"], s["conv1.weight"]
        (1.0, 0.5, 0.03125)
    """
    names = [n for n, _ in model.named_parameters()]
    if layer_decay is None:
        return dict.fromkeys(names, 1.0)
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    groups = depth_groups(model, coarse=coarse)
    last = len(groups) - 1
    return {n: layer_decay ** (last - gi) for gi, g in enumerate(groups) for n in g}


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    *,
    layer_decay: float | None = None,
    coarse: bool = False,
    names: Iterable[str] | None = None,
) -> list[dict]:
    """Build AdamW-style parameter groups.

    Args:
        model: the network (a timm model after :func:`visiontune.apply_strategy`).
        lr: base (head) learning rate.
        weight_decay: applied to weights only, never to biases, norms, embeddings or prompts.
        layer_decay: optional layer-wise LR decay factor in (0, 1].
        coarse: use timm's coarse depth groups for layer decay.
        names: the parameter names to optimise; default: the strategy's delta (every parameter it may
            train, frozen-for-now ones included).

    Returns:
        A list of dicts with ``params``, ``lr``, ``weight_decay``, ``initial_lr_scale`` and ``names``.

    Example:
        >>> import timm
        >>> net = timm.create_model("resnet18", num_classes=2)
        >>> [len(g["params"]) for g in param_groups(net, 1e-3, 0.05)]
        [21, 41]
    """
    wanted = set(names) if names is not None else set(delta_parameter_names(model))
    scales = layer_scales(model, layer_decay, coarse=coarse)
    extra = lr_multipliers(model)  # LoRA+ (lr_ratio): lora_B at a multiple of the LR
    buckets: dict[tuple[float, bool], dict] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if name not in wanted or id(p) in seen:
            continue
        seen.add(id(p))
        nd = _no_decay(name, p)
        key = (scales[name] * extra.get(name, 1.0), nd)
        g = buckets.setdefault(
            key,
            {"params": [], "names": [], "lr": lr * key[0], "initial_lr_scale": key[0],
             "weight_decay": 0.0 if nd else weight_decay},
        )
        g["params"].append(p)
        g["names"].append(name)
    groups = [buckets[k] for k in sorted(buckets, key=lambda k: (k[0], k[1]))]
    placed = [n for g in groups for n in g["names"]]
    assert len(placed) == len(set(placed)), "a parameter landed in two optimizer groups"
    missing = wanted - set(placed)
    assert not missing, f"trainable parameters missing from optimizer groups: {sorted(missing)[:5]}"
    return groups


def lr_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: float, scheduler: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR multiplier per optimizer step: a linear warm-up over ``warmup_steps`` (a count, or a fraction of
    ``total_steps`` when in (0, 1)), then ``"cosine"`` (to 0 at ``total_steps``) or ``"constant"``.

    Example:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> s = lr_schedule(opt, total_steps=10, warmup_steps=0.2, scheduler="cosine")
        >>> [round(f(step), 3) for f in s.lr_lambdas for step in (0, 1, 2, 6, 10)]
        [0.333, 0.667, 1.0, 0.5, 0.0]
    """
    warm = int(warmup_steps * total_steps) if 0 < warmup_steps < 1 else int(warmup_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
