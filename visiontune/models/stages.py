"""The trunk of any timm model as a sequence of stages, from its own structure, whatever its names.

Used where timm gives no ``group_matcher`` (depth groups for ``last_k``: PiT, PoolFormer, CAFormer) and to place
adapters after every stage (:mod:`visiontune.strategies.sites`). :func:`trunk_stages` looks, in this order, for

1. ResNet's ``layer1`` .. ``layerN``;
2. a sequence (``nn.Sequential`` / ``nn.ModuleList``) named ``stages``, ``layers``, ``blocks``, ``network`` or
   ``features`` (ConvNeXt, EfficientNet, Swin, MLP-Mixer, RexNet, DenseNet);
3. numbered children: RegNet ``s1..s4``, DLA ``level0..5``, CoaT ``serial_blocks1..4``, Inception
   ``Mixed_5b..7c`` (of several numbered groups, the one holding the most layers);
4. the sequence child holding the most layers (PiT's ``transformers``).

A stage holds more than one layer with parameters: a stem conv or a final norm is not one. The head is never
part of the trunk.

Example:
    >>> import timm
    >>> [n for n, _ in trunk_stages(timm.create_model("regnetx_002"))]
    ['s1', 's2', 's3', 's4']
"""

from __future__ import annotations

import re

from torch import nn

from .heads import find_head

__all__ = ["SEQUENCE_NAMES", "is_block", "layer_count", "trunk_stages"]

#: Names of the trunk's sequence of stages / blocks, in the order they are looked for.
SEQUENCE_NAMES = ("stages", "layers", "blocks", "network", "features")
_NUMBERED = re.compile(r"(.*?)_?(\d+)[a-z]?")
_SEQ = (nn.Sequential, nn.ModuleList)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def layer_count(m: nn.Module) -> int:
    """How many layers with parameters ``m`` holds (itself included)."""
    return sum(1 for sub in m.modules() if next(sub.parameters(recurse=False), None) is not None)


def is_block(m: nn.Module) -> bool:
    """A block or a stage: more than one layer with parameters (not a single conv or norm)."""
    return layer_count(m) > 1


def _blocks_of(prefix: str, seq: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}.{n}", c) for n, c in seq.named_children() if _params(c) and is_block(c)]


def trunk_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the stages of ``model``'s trunk, input to output (empty: no structure found)."""
    head = find_head(model, missing_ok=True).module_ids
    children = [(n, c) for n, c in model.named_children() if id(c) not in head and _params(c)]
    layers = [(n, c) for n, c in children if re.fullmatch(r"layer\d+", n)]
    if len(layers) >= 2:
        return layers
    for attr in SEQUENCE_NAMES:
        seq = getattr(model, attr, None)
        if isinstance(seq, _SEQ) and id(seq) not in head and len(stages := _blocks_of(attr, seq)) >= 2:
            return stages
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for n, c in children:
        m = _NUMBERED.fullmatch(n)
        if m and is_block(c):
            groups.setdefault(m.group(1), []).append((n, c))
    groups = {k: v for k, v in groups.items() if len(v) >= 2}
    if groups:
        return max(groups.values(), key=lambda g: sum(layer_count(c) for _, c in g))  # the deepest numbered group
    seqs = [_blocks_of(n, c) for n, c in children if isinstance(c, _SEQ)]
    seqs = [s for s in seqs if len(s) >= 2]
    return max(seqs, key=lambda s: sum(layer_count(c) for _, c in s)) if seqs else []
