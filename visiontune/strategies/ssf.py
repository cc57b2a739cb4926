"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022).

After each targeted operation of the backbone (default: every ``nn.Linear``, ``nn.Conv2d``, ``nn.LayerNorm``
and ``nn.BatchNorm2d`` but the head) the output is scaled and shifted per channel,
``y ← y·scale + shift`` (``scale`` starts at 1, ``shift`` at 0: the model starts as the base model, exactly).
Only these vectors and the head train: ``2·channels`` parameters per operation. The channel dimension is the
last one for Linear and LayerNorm outputs (tokens, or NHWC maps), dim 1 for convolutions, BatchNorm,
GroupNorm and timm's ``LayerNorm2d``; a LayerNorm subclass with its own forward (``LayerNorm2d``,
MetaFormer's ``LayerNorm2dNoBias``) is placed by its output shape in one probe forward, not by its name.

The vectors live in a child module ``ssf`` of the operation (``blocks.0.attn.qkv.ssf.scale``), run from a
forward hook, so base parameter names stay unchanged (base checkpoints load, timm's ``group_matcher`` puts
the vectors in the depth group of their layer), and a BatchNorm's own parameters stay frozen (``bn: frozen``
keeps its statistics). timm's norm + activation layers (``BatchNormAct2d``: norm, ``drop``, ``act``) get the
affine between the norm and its activation (a pre-hook on ``drop``), so that it folds into the norm.

Merging (:func:`visiontune.merge`, :func:`visiontune.merge_and_unload`, which also merge LoRA) folds every
affine into the layer before it: ``W ← diag(scale)·W``, ``b ← scale·b + shift`` (norms: their weight and
bias; a layer without a bias gets one), exact up to float rounding, zero inference overhead.

Example:
    >>> import timm, torch
    >>> from visiontune.strategies import apply_strategy, trainable_parameter_count
    >>> net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3)
    >>> _ = apply_strategy(net, "ssf")
    >>> trainable_parameter_count(net)[0]  # 2·(192 patch conv + 576 qkv + 192 + 768 + 192 + 2·192 + 192) + head
    5571
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..models.heads import find_head
from .base import StrategyConfig, StrategyError, register_strategy
from .lora_options import regex_list
from .probe import probe
from .quant import is_weight_standardized

__all__ = ["SSF", "SSFConfig", "SSF_OPS", "apply_ssf", "merge_ssf", "merged_ssf_tensors", "ssf_sites",
           "ssf_targets", "unload_ssf", "unmerge_ssf"]

#: Operation kinds SSF can follow (the ``ops`` option), with the module types they cover.
SSF_OPS: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv2d,),
    "layernorm": (nn.LayerNorm,),
    "batchnorm": (nn.BatchNorm2d, nn.SyncBatchNorm),
    "groupnorm": (nn.GroupNorm,),
}
DEFAULT_OPS = ("linear", "conv", "layernorm", "batchnorm")


@dataclass
class SSFConfig(StrategyConfig):
    """Options of the ``ssf`` strategy.

    Args:
        ops: operation kinds followed by a scale and shift: a non-empty subset of ``linear``, ``conv``,
            ``layernorm``, ``batchnorm``, ``groupnorm`` (default: all but ``groupnorm``).
        targets: regexes searched in module names (``re.search``) to narrow the chosen operations;
            None: all of them. The head is never a target (it trains in full).
        exclude: regexes of module names to leave alone, applied after ``targets``.

    Example:
        >>> SSFConfig(ops=["conv", "linear"]).ops  # canonical order
        ['linear', 'conv']
    """

    default_lr: ClassVar[float] = 5e-3  # AdamW peak LR when model.lr is None (as norm tuning; see StrategyConfig)
    mergeable: ClassVar[bool] = True  # folded into the layer before (merge / merge_and_unload)

    ops: list[str] = field(default_factory=lambda: list(DEFAULT_OPS))
    targets: list[str] | None = None
    exclude: list[str] | None = None

    def __post_init__(self) -> None:
        ops = [self.ops] if isinstance(self.ops, str) else self.ops
        if not isinstance(ops, (list, tuple)) or not ops or set(ops) - set(SSF_OPS):
            raise StrategyError(
                f"option 'ops' of strategy 'ssf' must be a non-empty subset of {list(SSF_OPS)}, got {self.ops!r}"
            )
        self.ops = [k for k in SSF_OPS if k in ops]
        self.targets = regex_list("ssf", "targets", self.targets)
        self.exclude = regex_list("ssf", "exclude", self.exclude)


class SSF(nn.Module):
    """``x·scale + shift`` along channel dim ``dim`` (``scale`` = 1, ``shift`` = 0 at first); identity once merged.

    Args:
        channels: number of channels.
        dim: the channel dimension: -1 (last) or 1 (NCHW).

    Example:
        >>> ssf = SSF(3, dim=1)
        >>> _ = ssf.scale.data.fill_(2.0)
        >>> ssf(torch.ones(1, 3, 2, 2))[0, :, 0, 0].tolist()
        [2.0, 2.0, 2.0]
    """

    def __init__(self, channels: int, dim: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, dtype=dtype, device=device))
        self.shift = nn.Parameter(torch.zeros(channels, dtype=dtype, device=device))
        self.dim = dim
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return x
        if self.dim == -1:
            return torch.addcmul(self.shift, x, self.scale)
        shape = (-1,) + (1,) * (x.ndim - self.dim - 1)
        return torch.addcmul(self.shift.view(shape), x, self.scale.view(shape))

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, dim={self.dim}, merged={self.merged}"


class _SSFHook:
    """Forward hook of a plain operation: ``module.ssf(output)`` (holds no module: deep copies keep working)."""

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return module.ssf(output)


class _SSFPreHook:
    """Forward pre-hook on a norm-act layer's ``drop``: the affine between the norm and its activation."""

    def __init__(self, ssf: SSF) -> None:
        self.ssf = ssf  # the norm-act layer's child; deepcopy maps it to the copy's child

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.ssf(args[0]), *args[1:])


# ------------------------------------------------------------------------------------------ targets
def _kind(m: nn.Module, ops: list[str]) -> str | None:
    return next((k for k in ops if isinstance(m, SSF_OPS[k])), None)


def _channels(m: nn.Module) -> tuple[int, int | None]:
    """(channels, channel dim) of the output of ``m``; dim None: a LayerNorm with its own forward, decided by
    the output shape (:func:`_layernorm_dims`)."""
    if isinstance(m, nn.Linear):
        return m.out_features, -1
    if isinstance(m, nn.Conv2d):
        return m.out_channels, 1
    if isinstance(m, nn.LayerNorm):  # nn.LayerNorm's own forward normalises the last dim
        return m.normalized_shape[-1], -1 if type(m).forward is nn.LayerNorm.forward else None
    if isinstance(m, nn.GroupNorm):
        return m.num_channels, 1
    return m.num_features, 1


try:
    from timm.layers import LayerNorm2d, LayerNormAct2d

    _NCHW_LAYERNORMS: tuple[type, ...] = (LayerNorm2d, LayerNormAct2d)
except ImportError:  # pragma: no cover - timm is a dependency
    _NCHW_LAYERNORMS = ()


def _ends(out: torch.Size | None, c: int) -> tuple[bool, bool]:
    """Whether ``c`` channels sit last / at dim 1 of an output of shape ``out`` (tokens (B, N, C) are last)."""
    return out is not None and out[-1] == c, out is not None and len(out) >= 4 and out[1] == c


def _layernorm_dims(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Channel dim of each LayerNorm subclass in ``names`` from its output in one forward: timm's
    ``LayerNorm2d`` / MetaFormer's ``LayerNorm2dNoBias`` normalise dim 1 of NCHW maps, ``LayerNorm`` /
    ``LayerNormNoBias`` the last dim of tokens or NHWC maps. Refuses a layer whose output cannot tell."""
    layers = [model.get_submodule(n) for n in names]
    try:
        shapes = probe(model, layers, strategy="ssf")
    except StrategyError:  # not an image model (a bare layer): timm's NCHW LayerNorm classes, by type
        return {n: 1 if isinstance(m, _NCHW_LAYERNORMS) else -1 for n, m in zip(names, layers)}
    dims = {}
    for name, m in zip(names, layers):
        c = m.normalized_shape[-1]
        out = shapes.get(id(m), (None, None))[1]
        last, first = _ends(out, c)
        if last and first:  # (1, C, C, C): a square map as wide as it is deep; another input size tells
            try:
                again = probe(model, [m], strategy="ssf", sizes=[(96, 96), (48, 48), (160, 160)])
                out = again.get(id(m), (None, out))[1]
                last, first = _ends(out, c)
            except StrategyError:
                pass
        if last == first:
            raise StrategyError(
                f"strategy 'ssf' cannot tell the channel dim of {name!r} ({type(m).__name__}, {c} channels) in "
                f"{type(model).__name__}: its output is {None if out is None else tuple(out)}; add it to 'exclude'"
            )
        dims[name] = -1 if last else 1
    return dims


def _norm_act(m: nn.Module) -> bool:
    return not isinstance(m, (nn.Linear, nn.Conv2d)) and all(
        isinstance(getattr(m, a, None), nn.Module) for a in ("drop", "act"))


def ssf_targets(model: nn.Module, cfg: SSFConfig | None = None) -> list[str]:
    """Names of the operations ``ssf`` follows under ``cfg`` (preview; raises like :func:`apply_ssf`).

    Example:
        >>> import timm
        >>> ssf_targets(timm.create_model("resnet18"), SSFConfig(ops=["batchnorm"], targets=["layer4.1"]))
        ['layer4.1.bn1', 'layer4.1.bn2']
    """
    cfg = cfg or SSFConfig()
    skip = set(find_head(model, missing_ok=True).module_ids)  # every head module (DeiT: head and head_dist)
    cands: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, SSF) or (isinstance(getattr(m, "ssf", None), SSF)):
            raise StrategyError(f"{type(model).__name__} already has SSF layers (e.g. {name!r}); apply SSF once")
        if isinstance(m, nn.MultiheadAttention):  # reads out_proj.weight directly: a hook would not run
            skip.update(id(c) for c in m.modules())
        if id(m) not in skip and _kind(m, cfg.ops):
            cands.append(name)
    names = cands
    if cfg.targets is not None:
        for pattern in cfg.targets:
            if not any(re.search(pattern, n) for n in cands):
                raise StrategyError(
                    f"SSF target {pattern!r} matches no {'/'.join(cfg.ops)} layer of {type(model).__name__} "
                    f"(the head is never a target); e.g. {', '.join(cands[:8])}"
                )
        names = [n for n in cands if any(re.search(p, n) for p in cfg.targets)]
    if cfg.exclude:
        names = [n for n in names if not any(re.search(p, n) for p in cfg.exclude)]
    if not names:
        raise StrategyError(f"SSF found no {'/'.join(cfg.ops)} layer to follow in {type(model).__name__}")
    return names


@register_strategy("ssf", SSFConfig)
def apply_ssf(model: nn.Module, cfg: SSFConfig) -> None:
    """SSF: a trainable per-channel scale and shift after every Linear/Conv2d/norm layer; base frozen; mergeable."""
    names = ssf_targets(model, cfg)
    custom = [n for n in names if _channels(model.get_submodule(n))[1] is None]
    dims = _layernorm_dims(model, custom) if custom else {}
    for name in names:
        m = model.get_submodule(name)
        if hasattr(m, "ssf"):
            raise StrategyError(f"SSF: {name!r} already has an attribute 'ssf'")
        channels, dim = _channels(m)
        dim = dims.get(name, dim)
        ref = next(m.parameters(), None)
        ref = next(model.parameters(), None) if ref is None else ref
        like = {} if ref is None else {"dtype": ref.dtype, "device": ref.device}
        m.add_module("ssf", SSF(channels, dim, **like))
        if _norm_act(m):
            m.drop.register_forward_pre_hook(_SSFPreHook(m.ssf))
        else:
            m.register_forward_hook(_SSFHook())


# ------------------------------------------------------------------------------------ merge/export
def ssf_sites(model: nn.Module) -> dict[str, nn.Module]:
    """Every operation of ``model`` followed by an SSF affine, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "ssf", None), SSF)}


# (parameter name, multiplied only) of what a fold changes: W ← scale·W, b ← scale·b + shift
_FOLDED = (("weight", True), ("bias", False))
# weight-standardised convs (NF-nets' ScaledStdConv2d) re-standardise W in every forward: the scale goes into
# their gain, the affine after the standardisation (gain·scale·std(W)), exactly
_FOLDED_GAIN = (("gain", True), ("bias", False))


def _folded(m: nn.Module) -> tuple[tuple[str, bool], ...]:
    return _FOLDED_GAIN if is_weight_standardized(m) else _FOLDED


def _view(v: Tensor, m: nn.Module, t: Tensor) -> Tensor:
    """Per-channel ``v`` shaped to broadcast over parameter ``t`` of ``m`` (out-channel dim first, or last)."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        return v.view(-1, *(1,) * (t.ndim - 1))
    return v  # norms: weight/bias are (C,) or LayerNorm's normalized_shape (..., C)


def _check_foldable(name: str, m: nn.Module) -> None:
    if is_weight_standardized(m) and not isinstance(getattr(m, "gain", None), nn.Parameter):
        raise StrategyError(f"SSF layer {name!r} follows a {type(m).__name__}, which re-standardises its weight in "
                            "every forward and has no gain to fold the scale into: it cannot be merged")


def _check(name: str, m: nn.Module, safe: bool) -> None:
    _check_foldable(name, m)
    s = m.ssf.scale.detach()
    if (s == 0).any():
        raise StrategyError(f"SSF layer {name!r} has a zero scale: an in-place merge could not be undone; "
                            "use merge_and_unload(model)")
    if safe and not (torch.isfinite(s).all() and torch.isfinite(m.ssf.shift).all()):
        raise StrategyError(f"safe merge refused: SSF layer {name!r} has non-finite (NaN/inf) values; "
                            "the model is unchanged")


@torch.no_grad()
def _fold(m: nn.Module) -> None:
    s, t = m.ssf.scale.detach(), m.ssf.shift.detach()
    created = []
    for pname, mult in _folded(m):
        p = getattr(m, pname, None)
        if p is None:
            shape = m.normalized_shape if isinstance(m, nn.LayerNorm) else s.shape
            init = torch.ones if mult else torch.zeros
            p = nn.Parameter(init(shape, dtype=s.dtype, device=s.device), requires_grad=False)
            setattr(m, pname, p)
            created.append(pname)
        p.mul_(_view(s, m, p))
        if not mult:
            p.add_(_view(t, m, p))
    m.ssf.created = created
    m.ssf.merged = True


@torch.no_grad()
def _unfold(m: nn.Module) -> None:
    s, t = m.ssf.scale.detach(), m.ssf.shift.detach()
    for pname, mult in _folded(m):
        p = getattr(m, pname)
        if not mult:
            p.sub_(_view(t, m, p))
        p.div_(_view(s, m, p))
    for pname in getattr(m.ssf, "created", []):
        setattr(m, pname, None)
    m.ssf.created = []
    m.ssf.merged = False


def merge_ssf(model: nn.Module, safe: bool = False) -> int:
    """Fold every SSF affine into the layer before it, in place (idempotent); returns the number folded.

    Checks all layers before changing any (a zero scale could not be unmerged; ``safe``: non-finite values).
    """
    todo = {n: m for n, m in ssf_sites(model).items() if not m.ssf.merged}
    for name, m in todo.items():
        _check(name, m, safe)
    for m in todo.values():
        _fold(m)
    return len(todo)


def unmerge_ssf(model: nn.Module) -> int:
    """Undo :func:`merge_ssf` (exact up to float rounding); returns the number of layers unmerged."""
    todo = [m for m in ssf_sites(model).values() if m.ssf.merged]
    for m in todo:
        _unfold(m)
    return len(todo)


def merged_ssf_tensors(model: nn.Module) -> set[str]:
    """State-dict names of the base tensors a merge changed (they no longer equal the base's)."""
    return {f"{n}.{p}" for n, m in ssf_sites(model).items() if m.ssf.merged for p, _ in _folded(m)}


def unload_ssf(model: nn.Module) -> int:
    """Fold every SSF affine (where not folded yet) and remove the SSF modules and hooks: plain timm layers.

    Returns the number of layers unloaded. The folded weights stay frozen.
    """
    sites = ssf_sites(model)
    for name, m in sites.items():  # all checked before any is folded
        if not m.ssf.merged:
            _check_foldable(name, m)
    for m in sites.values():
        if not m.ssf.merged:
            _fold(m)
        hooks = m.drop._forward_pre_hooks if _norm_act(m) else m._forward_hooks
        kind = _SSFPreHook if _norm_act(m) else _SSFHook
        for key in [k for k, h in hooks.items() if isinstance(h, kind)]:
            del hooks[key]
        del m.ssf
    return len(sites)

