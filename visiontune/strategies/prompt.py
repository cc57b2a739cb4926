"""Visual prompt tuning (VPT, Jia et al. 2022) for timm ViT-style models.

``length`` learnable prompt tokens go right after the prefix tokens (class / register tokens):
``[prefix, prompts, patches]``. Shallow VPT inserts them once, before the first block, and they flow
through every block. Deep VPT gives every block its own prompts, which replace the previous block's
prompt outputs (equivalently: each block inserts its prompts and its outputs at those positions are
discarded). Either way the prompt positions are cut out of the last block's output, so
``forward_features`` returns exactly the base model's token layout ``[prefix, patches]`` and timm's
``forward_head`` pools correctly for every ``global_pool`` (``token`` reads the class token, ``avg``
averages the patch tokens only, ``map`` attends over the patch tokens).

Prompts of block ``i`` are the parameter ``blocks.{i}.prompt`` (shape ``1 × length × embed_dim``; shallow:
only ``blocks.0.prompt``), so timm's ``group_matcher`` puts them in their block's depth group and base
parameter names are unchanged. Insertion and removal run from forward hooks on the blocks: they work with
``set_grad_checkpointing()`` and survive ``copy.deepcopy``.

Limitation: with shallow prompts, the per-block outputs of timm's ``forward_intermediates`` (all but the
last block) still hold the prompt tokens; deep prompts have no such issue.
"""

from __future__ import annotations

import math
from typing import ClassVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import StrategyConfig, StrategyError, available_strategies, register_strategy
from .probe import probe

__all__ = ["VPTConfig", "apply_vpt", "prompt_parameter_names"]

_INITS = ("uniform", "zeros")


@dataclass
class VPTConfig(StrategyConfig):
    """Options of the ``vpt`` strategy.

    Args:
        length: prompt tokens per insertion (integer >= 1).
        deep: one set of prompts per block (VPT-deep) instead of one at the input (VPT-shallow).
        dropout: dropout probability on the prompt tokens while training, in [0, 1).
        init: ``uniform`` (VPT's Xavier-style U(-v, v), v = sqrt(6 / (in_chans·patch_area + dim)))
            or ``zeros``.

    Example:
        >>> VPTConfig(length=5, deep=True).length
        5
    """

    default_lr: ClassVar[float] = 1e-2  # AdamW peak LR when model.lr is None (see StrategyConfig)

    length: int = 10
    deep: bool = False
    dropout: float = 0.0
    init: str = "uniform"

    def __post_init__(self) -> None:
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise StrategyError(f"option 'length' of strategy 'vpt' must be an integer >= 1, got {self.length!r}")
        if not isinstance(self.deep, bool):
            raise StrategyError(f"option 'deep' of strategy 'vpt' must be true or false, got {self.deep!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise StrategyError(f"option 'dropout' of strategy 'vpt' must be in [0, 1), got {self.dropout!r}")
        if self.init not in _INITS:
            raise StrategyError(
                f"option 'init' of strategy 'vpt' must be one of {', '.join(map(repr, _INITS))}, got {self.init!r}"
            )


class _InsertPrompts:
    """Forward pre-hook: ``x -> [x[:, :n_prefix], dropout(block.prompt), x[:, n_prefix:]]``."""

    def __init__(self, num_prefix: int, dropout: float) -> None:
        self.num_prefix = num_prefix
        self.dropout = dropout

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            x, rest = args[0], args[1:]
        else:
            x, rest = kwargs.pop("x"), ()
        prompt = F.dropout(block.prompt, self.dropout, block.training).to(x.dtype)
        n = self.num_prefix
        x = torch.cat([x[:, :n], prompt.expand(x.shape[0], -1, -1), x[:, n:]], dim=1)
        return (x, *rest), kwargs


class _DropPrompts:
    """Forward hook: removes the ``length`` prompt positions after the prefix tokens."""

    def __init__(self, num_prefix: int, length: int) -> None:
        self.num_prefix = num_prefix
        self.length = length

    def __call__(self, block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        n = self.num_prefix
        return torch.cat([output[:, :n], output[:, n + self.length :]], dim=1)


def _misfit(model: nn.Module, why: str) -> StrategyError:
    others = [s for s in available_strategies() if s != "vpt"]
    return StrategyError(
        f"strategy 'vpt' does not fit {type(model).__name__}: {why}. VPT adds learnable tokens to the token "
        "sequence a ViT-style transformer's blocks read (patch_embed, then blocks on (batch, tokens, channels): "
        "vit_*, deit_*, eva*, beit*); a CNN's feature maps have no token sequence to extend. "
        f"Strategies that fit other backbones: {', '.join(others)} (CNNs: 'adapter' adds residual conv adapters)"
    )


def _pad_bias(bias: torch.Tensor, n_prefix: int, length: int) -> torch.Tensor:
    """A ``(..., N, N)`` attention bias with ``length`` zero rows and columns after the first ``n_prefix``: the
    prompts get no position bias (BEiT's relative position bias is sized to the patch grid)."""
    pad = bias.new_zeros(*bias.shape[:-2], bias.shape[-2] + length, bias.shape[-1] + length)
    keep = torch.cat([torch.arange(n_prefix), torch.arange(n_prefix + length, pad.shape[-1])]).to(bias.device)
    pad[..., keep[:, None], keep[None, :]] = bias
    return pad


class _PaddedRelPosBias:
    """Instance override of a BEiT attention's ``_get_rel_pos_bias``: the class's bias, padded for the prompts."""

    def __init__(self, attn: nn.Module, n_prefix: int, length: int) -> None:
        self.attn, self.n_prefix, self.length = attn, n_prefix, length

    def __call__(self) -> torch.Tensor:
        return _pad_bias(type(self.attn)._get_rel_pos_bias(self.attn), self.n_prefix, self.length)


class _PadSharedBias:
    """Forward hook on BEiT's shared ``rel_pos_bias`` module: its output padded for the prompts."""

    def __init__(self, n_prefix: int, length: int) -> None:
        self.n_prefix, self.length = n_prefix, length

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return _pad_bias(output, self.n_prefix, self.length)


def _token_layout(model: nn.Module, blocks: nn.Module) -> tuple[int, int, torch.Size]:
    """(prefix tokens, embed dim, output shape of the last block) of the sequence the blocks read, measured in
    one probe forward: the prefix is what ``blocks[0]`` reads beyond the patches ``patch_embed`` gives (CaiT's
    class token joins after its blocks: 0)."""
    shapes = probe(model, [model.patch_embed, blocks[0], blocks[-1]], strategy="vpt")
    first = shapes.get(id(blocks[0]), (None, None))[0]
    patches = shapes.get(id(model.patch_embed), (None, None))[1]
    last = shapes.get(id(blocks[-1]), (None, None))[1]
    if first is None or len(first) != 3 or last is None:
        raise _misfit(model, f"its blocks do not read a token sequence (batch, tokens, channels) "
                             f"(blocks.0 reads {None if first is None else tuple(first)})")
    if patches is None:
        raise _misfit(model, f"its patch_embed ({type(model.patch_embed).__name__}) does not give one tensor of "
                             "patch tokens, so the prefix tokens cannot be told from the patches")
    dim = int(first[-1])
    n_prefix = int(first[1]) - math.prod(patches[1:]) // dim
    if n_prefix < 0:
        raise _misfit(model, f"its blocks read {first[1]} tokens, fewer than its {math.prod(patches[1:]) // dim} patches")
    return n_prefix, dim, last


def prompt_parameter_names(model: nn.Module) -> list[str]:
    """Names of the VPT prompt parameters of ``model`` (empty if it has none).

    Example:
        >>> import timm
        >>> from visiontune.strategies import apply_strategy
        >>> net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
        >>> _ = apply_strategy(net, "vpt", {"length": 4})
        >>> prompt_parameter_names(net)
        ['blocks.0.prompt']
    """
    return [n for n, _ in model.named_parameters() if n.split(".")[-1] == "prompt" and n.startswith("blocks.")]


@register_strategy("vpt", VPTConfig)
def apply_vpt(model: nn.Module, cfg: VPTConfig) -> None:
    """VPT: learnable prompt tokens after the prefix tokens (shallow: at the input; deep: in every block).

    Only the prompts (``blocks.{i}.prompt``) and the head train. The prompts are removed again after the
    last block, so ``forward_features`` keeps the base token layout and pooling never sees them. The prompt
    positions carry no position information: EVA's rotary embedding skips them (they count as prefix tokens of
    its attention), BEiT's relative position bias gets zero rows and columns for them. Any other model whose
    blocks do not take the longer sequence is refused (a probe forward with the prompts, undone on failure).

    Args:
        model: a timm ViT-style transformer (``patch_embed``, then ``blocks`` on token sequences).
        cfg: prompt options.

    Example:
        >>> import timm
        >>> from visiontune.strategies import apply_strategy
        >>> net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
        >>> _ = apply_strategy(net, "vpt", {"length": 4, "deep": True})
        >>> net.blocks[5].prompt.shape, net.forward_features(torch.zeros(1, 3, 32, 32)).shape
        (torch.Size([1, 4, 192]), torch.Size([1, 17, 192]))
    """
    missing = [a for a in ("patch_embed", "blocks") if not isinstance(getattr(model, a, None), nn.Module)]
    if missing:
        raise _misfit(model, f"it has no {' and no '.join(missing)}")
    blocks = model.blocks
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks):
        raise _misfit(model, "its 'blocks' is not a sequence of transformer blocks")
    for i, blk in enumerate(blocks):
        if hasattr(blk, "prompt") or any(isinstance(h, _InsertPrompts) for h in blk._forward_pre_hooks.values()):
            raise StrategyError(f"vpt: blocks.{i} already has prompts (apply the strategy once)")
    n_prefix, dim, last = _token_layout(model, blocks)
    undo = _install(model, blocks, cfg, n_prefix, dim)
    try:
        got = probe(model, [blocks[-1]], strategy="vpt").get(id(blocks[-1]), (None, None))[1]
        if got != last:
            raise StrategyError(f"the last block gives {None if got is None else tuple(got)}, not {tuple(last)}")
    except StrategyError as exc:
        for step in reversed(undo):
            step()
        raise _misfit(model, f"its blocks do not take {cfg.length} more tokens ({exc})") from None


def _install(model: nn.Module, blocks: nn.Module, cfg: VPTConfig, n_prefix: int, dim: int) -> list:
    """Prompts, their hooks and the position handling; returns the steps that undo it."""
    ref = next(model.parameters())
    proj = getattr(model.patch_embed, "proj", None)
    in_chans = getattr(proj, "in_channels", 3)
    patch = getattr(model.patch_embed, "patch_size", (16, 16))
    patch_area = math.prod(patch) if isinstance(patch, (tuple, list)) else int(patch) ** 2
    bound = math.sqrt(6.0 / float(in_chans * patch_area + dim))
    undo: list = []
    hosts = list(blocks) if cfg.deep else [blocks[0]]
    for blk in hosts:
        prompt = nn.Parameter(torch.zeros(1, cfg.length, dim, device=ref.device, dtype=ref.dtype))
        if cfg.init == "uniform":
            nn.init.uniform_(prompt, -bound, bound)
        blk.register_parameter("prompt", prompt)
        undo.append(lambda blk=blk: delattr(blk, "prompt"))
        undo.append(blk.register_forward_pre_hook(_InsertPrompts(n_prefix, cfg.dropout), with_kwargs=True).remove)
        if cfg.deep:
            undo.append(blk.register_forward_hook(_DropPrompts(n_prefix, cfg.length)).remove)
    if not cfg.deep:
        undo.append(blocks[-1].register_forward_hook(_DropPrompts(n_prefix, cfg.length)).remove)
    for m in blocks.modules():
        if isinstance(getattr(m, "num_prefix_tokens", None), int) and m is not model:  # EVA attention: rope skips them
            m.num_prefix_tokens += cfg.length
            undo.append(lambda m=m: setattr(m, "num_prefix_tokens", m.num_prefix_tokens - cfg.length))
        if callable(getattr(type(m), "_get_rel_pos_bias", None)):  # BEiT attention
            m._get_rel_pos_bias = _PaddedRelPosBias(m, n_prefix, cfg.length)
            undo.append(lambda m=m: m.__dict__.pop("_get_rel_pos_bias"))
    shared = getattr(model, "rel_pos_bias", None)
    if isinstance(shared, nn.Module):
        undo.append(shared.register_forward_hook(_PadSharedBias(n_prefix, cfg.length)).remove)
    return undo
