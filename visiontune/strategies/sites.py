"""Where a strategy can hook a timm model: transformer sub-modules, and the outputs of residual blocks / stages.

* :func:`transformer_sites`: every block with ``.attn`` and ``.mlp`` (ViT, DeiT, Swin, CoAtNet's transformer
  stages, ...): its ``attn`` / ``mlp`` sub-modules.
* :func:`stage_sites`: the trunk's stages, whatever their names (:func:`~visiontune.models.stages.trunk_stages`),
  one site per stage at the module whose output is the stage's output (its last block).

The layout of a site's output (NCHW maps, NHWC maps, tokens) is not in its name: the adapter strategy reads it
from one probe forward (:mod:`visiontune.strategies.probe`) with :func:`channel_layout`.

Example:
    >>> import timm
    >>> [n for n, _ in stage_sites(timm.create_model("regnetx_002"))]
    ['s1.b1', 's2.b1', 's3.b4', 's4.b7']
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..models.stages import trunk_stages
from .base import StrategyError
from .probe import Shapes, probe, probe_sizes

__all__ = ["channel_layout", "last_block", "module_width", "output_layouts", "stage_sites",
           "transformer_sites"]

_SEQ = (nn.Sequential, nn.ModuleList)


def transformer_sites(model: nn.Module, subs: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the ``subs`` (``"attn"``, ``"mlp"``) of every block that has both."""
    sites = []
    for name, m in model.named_modules():
        if isinstance(getattr(m, "attn", None), nn.Module) and isinstance(getattr(m, "mlp", None), nn.Module):
            sites.extend((f"{name}.{s}" if name else s, getattr(m, s)) for s in subs)
    return sites


def _iterates_children(m: nn.Module) -> bool:
    """A container whose forward runs its children in turn (``Sequential``, ``ModuleDict``; RegNet's ``RegStage``,
    DenseNet's ``DenseBlock`` loop over ``self.children()`` / ``self.items()``): a child added to it would run."""
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return True
    names = getattr(getattr(type(m).forward, "__code__", None), "co_names", ())
    return any(n in names for n in ("children", "named_children", "items", "values", "_modules"))


def last_block(name: str, stage: nn.Module) -> tuple[str, nn.Module]:
    """The module whose output is the stage's output: ``stage.blocks[-1]``, ``stage[-1]``, the last child of a
    container that runs its children in turn, or the stage; never a container (a hooked child would run in it)."""
    inner = getattr(stage, "blocks", None)
    if isinstance(inner, _SEQ) and len(inner):
        return last_block(f"{name}.blocks.{len(inner) - 1}", inner[-1])
    if _iterates_children(stage):
        kids = list(stage.named_children())
        if kids:
            return last_block(f"{name}.{kids[-1][0]}", kids[-1][1])
    return name, stage


def stage_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the last block of every stage of ``model`` (empty: no stage structure found)."""
    return [last_block(n, s) for n, s in trunk_stages(model)]


def module_width(m: nn.Module) -> int | None:
    """The output width of the last layer with a weight inside ``m`` (Linear, conv, norm), if any."""
    width = None
    for sub in m.modules():
        if isinstance(sub, nn.Linear):
            width = sub.out_features
        elif isinstance(sub, nn.modules.conv._ConvNd):
            width = sub.out_channels
        elif isinstance(sub, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and sub.weight is not None:
            width = int(sub.weight.shape[0])
        elif isinstance(sub, nn.LayerNorm) and sub.normalized_shape:
            width = int(sub.normalized_shape[-1])
    return width


def output_layouts(model: nn.Module, modules: Sequence[nn.Module], *, strategy: str,
                   widths: Sequence[int | None] | None = None) -> list[tuple[Shapes, tuple[str, int]] | None]:
    """Per module: ``((input shape, output shape), (layout, channels))`` from probe forwards, or None where the
    forward does not call it with a tensor in and out. The channel dim of a 4-d map is the one that does not
    change with the input size (a second probe at 1.5× the size); where that cannot tell (a model of one input
    size, 1×1 maps), :func:`channel_layout` decides with the module's expected ``widths``."""
    first = probe(model, modules, strategy=strategy)
    sizes = [(h * 3 // 2, w * 3 // 2) for h, w in probe_sizes(model)]
    try:
        second = probe(model, modules, strategy=strategy, sizes=sizes)
    except StrategyError:  # one input size only: the widths decide
        second = {}
    out: list[tuple[Shapes, tuple[str, int]] | None] = []
    for i, m in enumerate(modules):
        shapes = first.get(id(m))
        if shapes is None or shapes[1] is None:
            out.append(None)
            continue
        a, b = shapes[1], second.get(id(m), (None, None))[1]
        fixed = [d for d in (1, 2, 3) if b is not None and len(a) == len(b) == 4 and a[d] == b[d]]
        if fixed == [1]:
            layout = ("nchw", int(a[1]))
        elif fixed == [3]:
            layout = ("last", int(a[3]))
        else:
            layout = channel_layout(a, None if widths is None else widths[i])
        out.append((shapes, layout))
    return out


def channel_layout(out: torch.Size, width: int | None) -> tuple[str, int]:
    """``("nchw" | "last", channels)`` of an output shape: a 4-d map is channels-last (NHWC: MambaOut,
    Sequencer) when its last dim is the expected ``width`` and dim 1 is not, else NCHW; tokens ``(B, N, C)`` and
    vectors ``(B, C)`` have their channels last.

    Example:
        >>> channel_layout(torch.Size([1, 8, 8, 16]), 16), channel_layout(torch.Size([1, 16, 8, 8]), 16)
        (('last', 16), ('nchw', 16))
    """
    if len(out) == 4 and not (width is not None and out[-1] == width and out[1] != width):
        return "nchw", int(out[1])
    return "last", int(out[-1])
