"""Depth groups of any timm model, from its ``group_matcher()``: stem, blocks/stages, ..., head.

Used by ``last_k``, layer-wise learning-rate decay and gradual-unfreezing schedules, so every timm model
gets them without per-model code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from timm.models import group_parameters
from torch import nn

from ..errors import ConfigError
from .heads import find_head
from .stages import is_block, trunk_stages

__all__ = ["GroupError", "depth_groups", "structural_groups"]


class GroupError(ConfigError):
    """A group override matches nothing or the model exposes no group_matcher."""


def depth_groups(
    model: nn.Module,
    *,
    coarse: bool = False,
    patterns: Sequence[str] | None = None,
) -> list[list[str]]:
    """Parameter names per depth group, ordered from the input (stem) to the output (head).

    The last group is always exactly the classification head.

    Args:
        model: a timm model (possibly already carrying LoRA/adapters: their parameters join the group of
            the layer they sit in).
        coarse: timm's coarse grouping (stages instead of blocks).
        patterns: optional regexes overriding timm's groups, one per group from input to output; a
            parameter goes to the first pattern that matches (``re.search``); parameters matching none
            join the group before them. Each pattern must match at least one parameter.

    Example:
        >>> import timm
        >>> groups = depth_groups(timm.create_model("resnet18", num_classes=3), coarse=True)
        >>> len(groups), groups[-1]
        (6, ['fc.weight', 'fc.bias'])
    """
    names = [n for n, _ in model.named_parameters()]
    head = list(find_head(model).parameter_names)
    head_set = set(head)
    body = [n for n in names if n not in head_set]
    if patterns:
        compiled = []
        for i, pat in enumerate(patterns):
            try:
                compiled.append(re.compile(pat))
            except re.error as exc:
                raise GroupError(f"group pattern #{i} {pat!r} is not a valid regex: {exc}") from exc
        groups: list[list[str]] = [[] for _ in compiled]
        current = 0
        for n in body:
            hit = next((i for i, c in enumerate(compiled) if c.search(n)), None)
            if hit is not None:
                current = hit
            groups[current].append(n)
        empty = [patterns[i] for i, g in enumerate(groups) if not any(compiled[i].search(n) for n in g)]
        if empty:
            raise GroupError(f"group pattern(s) {empty} match no parameter of {type(model).__name__}")
        return [g for g in groups if g] + [head]
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        return structural_groups(model, body, coarse=coarse) + [head]
    grouped = group_parameters(model, matcher(coarse=coarse))
    groups = []
    for _, members in sorted(grouped.items()):
        members = [n for n in members if n not in head_set]
        if members:
            groups.append(members)
    return groups + [head]


def _units(model: nn.Module, coarse: bool) -> list[str]:
    """Module names of the trunk's stages (``coarse``) or of the blocks inside them, input to output."""
    units = []
    for name, stage in trunk_stages(model):
        inner = getattr(stage, "blocks", None)
        prefix = f"{name}.blocks"
        if not isinstance(inner, (nn.Sequential, nn.ModuleList)):
            inner, prefix = stage, name
        blocks = [f"{prefix}.{n}" for n, c in inner.named_children() if is_block(c)] \
            if isinstance(inner, (nn.Sequential, nn.ModuleList)) and not coarse else []
        units.extend(blocks or [name])
    return units


def structural_groups(model: nn.Module, names: Sequence[str], *, coarse: bool = False) -> list[list[str]]:
    """Depth groups of ``names`` (parameter names, the head left out) from the model's own structure, for a
    model without ``group_matcher()``: the stem (what comes before the trunk), then one group per block of the
    trunk's stages (:func:`~visiontune.models.stages.trunk_stages`; ``coarse``: per stage); a parameter in no
    block joins the group before it (a stage's downsampling, the final norm).

    Raises:
        GroupError: no stage structure found.

    Example:
        >>> import timm
        >>> m = timm.create_model("pit_ti_224", img_size=32, depth=[1, 1, 1], base_dims=[16, 16, 16])
        >>> groups = structural_groups(m, [n for n, _ in m.named_parameters() if not n.startswith("head")])
        >>> [g[0].rsplit(".", 2)[0] for g in groups][1:]  # after the stem: the block of each of PiT's 3 stages
        ['transformers.0.blocks.0', 'transformers.1.blocks.0', 'transformers.2.blocks.0']
    """
    units = _units(model, coarse)
    if not units:
        raise GroupError(
            f"{type(model).__name__} has no group_matcher() and no stage structure (layerN, stages, layers, blocks, "
            "network, features, numbered stages): pass group patterns explicitly"
        )
    groups: list[list[str]] = [[] for _ in range(len(units) + 1)]  # 0: the stem
    current = 0
    for n in names:
        hit = next((i + 1 for i, u in enumerate(units) if n.startswith(u + ".")), None)
        current = hit if hit is not None else current
        groups[current].append(n)
    return [g for g in groups if g]
