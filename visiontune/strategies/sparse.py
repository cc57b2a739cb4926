"""Sparse fine-tuning: only a chosen fraction of the entries of selected weight tensors train.

Masks are **per tensor**: a targeted tensor with ``n`` entries trains exactly
``k = floor(fraction * n + 0.5)`` of them (round half up; a tensor with ``k == 0`` stays frozen). Per-tensor
masks keep every layer adaptable, whereas a global ranking would be dominated by the layers with the
largest weight (or gradient) scale.

* ``score="magnitude"``: the ``k`` entries of largest ``|w|``, chosen at apply time.
* ``score="gradient"``: the ``k`` entries of largest accumulated squared gradient (the diagonal Fisher
  information, as in FISH masks) over ``warmup_batches`` batches, chosen by :func:`calibrate_sparse`,
  which the training module calls before training. Until then ``apply`` sets a provisional magnitude mask.

Mechanics: each mask is a persistent bool buffer ``<param>_sparse_mask`` next to its parameter (so it moves
with ``.to()`` and is restored with a checkpoint's ``state_dict``), and a gradient hook replaces the
gradient outside the mask with exact zeros. Masked parameters carry ``p.visiontune_no_weight_decay = True``
so the optimizer builder puts them in a no-weight-decay group: decoupled weight decay would otherwise move
the frozen entries. Because ``copy.deepcopy`` and pickling drop tensor hooks and attributes, a forward
pre-hook on the owning module re-installs both when they are missing.

With plain SGD/Adam/AdamW (weight_decay 0 for masked tensors) entries outside the mask stay bit-identical.
:func:`sparse_delta` stores only the masked entries (flat indices + values); :func:`apply_sparse_delta`
writes them back.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar, Union
from dataclasses import dataclass
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn

from .base import StrategyConfig, StrategyError, head_parameter_names, register_strategy

__all__ = [
    "SparseConfig",
    "apply_sparse",
    "write_flat",
    "apply_sparse_delta",
    "calibrate_sparse",
    "sparse_delta",
    "sparse_keep_count",
    "sparse_masks",
    "sparse_needs_calibration",
    "sparse_trainable_count",
]

_SCORES = ("magnitude", "gradient")
_MASK_SUFFIX = "_sparse_mask"
#: Persistent root buffer: True once gradient masks are calibrated (survives checkpoint resume).
_CALIBRATED = "visiontune_sparse_calibrated"


@dataclass
class SparseConfig(StrategyConfig):
    """Options of the ``sparse`` strategy.

    Args:
        fraction: share of each targeted tensor's entries that train, in (0, 1].
        score: ``magnitude`` (largest ``|w|``, fixed at apply time) or ``gradient`` (largest accumulated
            squared gradient, set by :func:`calibrate_sparse`).
        warmup_batches: batches :func:`calibrate_sparse` accumulates gradients over (>= 1).
        targets: regexes (``re.search``) on parameter names selecting the tensors to mask; None means the
            ``weight`` of every Linear / Conv layer except the head. The head always trains densely.

    Example:
        >>> SparseConfig(fraction=0.05, targets=[r"blocks\\.\\d+\\.mlp"]).fraction
        0.05
    """

    default_lr: ClassVar[float] = 1e-3  # AdamW peak LR when model.lr is None (see StrategyConfig)

    fraction: float = 0.01
    score: str = "magnitude"
    warmup_batches: int = 4
    targets: list[str] | None = None

    def __post_init__(self) -> None:
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0.0 < f <= 1.0) or math.isnan(f):
            raise StrategyError(f"option 'fraction' of strategy 'sparse' must be in (0, 1], got {f!r}")
        self.fraction = float(f)
        if self.score not in _SCORES:
            raise StrategyError(
                f"option 'score' of strategy 'sparse' must be one of {', '.join(map(repr, _SCORES))}, "
                f"got {self.score!r}"
            )
        w = self.warmup_batches
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise StrategyError(f"option 'warmup_batches' of strategy 'sparse' must be an integer >= 1, got {w!r}")
        if self.targets is not None:
            if isinstance(self.targets, str):
                self.targets = [self.targets]
            if not isinstance(self.targets, (list, tuple)) or not all(isinstance(t, str) for t in self.targets):
                raise StrategyError(
                    f"option 'targets' of strategy 'sparse' must be a list of regexes, got {self.targets!r}"
                )
            self.targets = list(self.targets)
            for pat in self.targets:
                try:
                    re.compile(pat)
                except re.error as exc:
                    raise StrategyError(
                        f"option 'targets' of strategy 'sparse': {pat!r} is not a valid regex: {exc}"
                    ) from exc


def sparse_keep_count(numel: int, fraction: float) -> int:
    """Entries of a tensor with ``numel`` entries that train: ``floor(fraction * numel + 0.5)``.

    Example:
        >>> sparse_keep_count(36864, 0.01), sparse_keep_count(50, 0.01)
        (369, 1)
    """
    return int(math.floor(fraction * numel + 0.5))


class _MaskGrad:
    """Tensor hook: zero the gradient outside ``module.<leaf>_sparse_mask`` (read at call time)."""

    def __init__(self, module: nn.Module, leaf: str) -> None:
        self.module = weakref.ref(module)
        self.buffer = leaf + _MASK_SUFFIX

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        module = self.module()
        if module is None:
            return grad
        mask = getattr(module, self.buffer)
        return grad.masked_fill(~mask, 0)


def _ensure_hooks(module: nn.Module, leaf: str) -> None:
    p = getattr(module, leaf)
    hooks = p._backward_hooks or {}
    if not any(isinstance(h, _MaskGrad) and h.module() is module for h in hooks.values()):
        p.register_hook(_MaskGrad(module, leaf))
    p.visiontune_no_weight_decay = True


class _EnsureMaskHooks:
    """Forward pre-hook re-installing gradient hooks/attributes dropped by deepcopy or pickling."""

    def __init__(self, leaves: tuple[str, ...]) -> None:
        self.leaves = leaves

    def __call__(self, module: nn.Module, args: tuple) -> None:
        for leaf in self.leaves:
            _ensure_hooks(module, leaf)


def _default_target(model: nn.Module, head: set[str]) -> list[str]:
    names = []
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(m.weight, nn.Parameter):
            name = f"{mname}.weight" if mname else "weight"
            if name not in head:
                names.append(name)
    return names


def _select_targets(model: nn.Module, cfg: SparseConfig) -> list[str]:
    head = set(head_parameter_names(model))
    if cfg.targets is None:
        names = _default_target(model, head)
        if not names:
            raise StrategyError(f"strategy 'sparse': {type(model).__name__} has no Linear/Conv weights to mask")
        return names
    body = [n for n, _ in model.named_parameters() if n not in head]
    compiled = [re.compile(t) for t in cfg.targets]
    unmatched = [t for t, c in zip(cfg.targets, compiled) if not any(c.search(n) for n in body)]
    if unmatched:
        raise StrategyError(
            f"option 'targets' of strategy 'sparse': {unmatched} match no parameter of {type(model).__name__} "
            f"(head excluded); parameter names look like {body[:3]}"
        )
    return [n for n in body if any(c.search(n) for c in compiled)]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mname, _, leaf = name.rpartition(".")
    return (model.get_submodule(mname) if mname else model), leaf


def _masked(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(parameter name, owning module, leaf) of every masked parameter."""
    out = []
    for mname, m in model.named_modules():
        for bname, _ in m.named_buffers(recurse=False):
            if bname.endswith(_MASK_SUFFIX):
                leaf = bname[: -len(_MASK_SUFFIX)]
                out.append((f"{mname}.{leaf}" if mname else leaf, m, leaf))
    return out


@torch.no_grad()
def write_flat(t: torch.Tensor, idx: torch.Tensor, values: Union[torch.Tensor, bool, float]) -> None:
    """``t.reshape(-1)[idx] = values`` in place, whatever ``t``'s memory format: sparse indices count entries in
    logical (row-major) order, also for a channels-last weight, whose flat view does not exist.

    Example:
        >>> w = torch.zeros(1, 2, 2, 2).to(memory_format=torch.channels_last)
        >>> write_flat(w, torch.tensor([1]), 5.0)
        >>> w[0, 0, 0, 1].item(), w.is_contiguous(memory_format=torch.channels_last)
        (5.0, True)
    """
    flat = t.view(-1) if t.is_contiguous() else t.reshape(-1)  # reshape: a logical-order copy
    flat[idx.to(t.device)] = values.to(t.device, t.dtype) if isinstance(values, torch.Tensor) else values
    if not t.is_contiguous():
        t.copy_(flat.view(t.shape))


def _topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[torch.topk(score.detach().flatten().float(), k, sorted=False).indices] = True
    return mask.view_as(score)


@register_strategy("sparse", SparseConfig)
def apply_sparse(model: nn.Module, cfg: SparseConfig) -> None:
    """Sparse: a fraction of the entries of each targeted weight tensor trains (per-tensor masks).

    With ``score="gradient"`` this sets a provisional magnitude mask; :func:`calibrate_sparse` replaces it.

    Args:
        model: any timm classifier.
        cfg: sparse options.

    Example:
        >>> import timm
        >>> from visiontune.strategies import apply_strategy
        >>> net = timm.create_model("resnet18", num_classes=3)
        >>> _ = apply_strategy(net, "sparse", {"fraction": 0.01})
        >>> int(sparse_masks(net)["conv1.weight"].sum())  # 64*3*7*7 = 9408 entries
        94
    """
    if _masked(model):
        raise StrategyError("sparse: the model already has sparse masks (apply the strategy once)")
    by_module: dict[nn.Module, list[str]] = {}
    for name in _select_targets(model, cfg):
        module, leaf = _owner(model, name)
        p = getattr(module, leaf)
        k = sparse_keep_count(p.numel(), cfg.fraction)
        if k == 0:
            continue  # too small to hold a single trainable entry: stays frozen
        module.register_buffer(leaf + _MASK_SUFFIX, _topk_mask(p.abs(), k), persistent=True)
        p.requires_grad_(True)
        _ensure_hooks(module, leaf)
        by_module.setdefault(module, []).append(leaf)
    for module, leaves in by_module.items():
        module.register_forward_pre_hook(_EnsureMaskHooks(tuple(leaves)))
    ref = next(model.parameters())
    model.register_buffer(_CALIBRATED, torch.tensor(cfg.score == "magnitude", device=ref.device), persistent=True)
    model.visiontune_sparse_config = cfg  # type: ignore[assignment]


def sparse_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Bool masks (True = trains) of every masked parameter, keyed by parameter name.

    The values are the live mask buffers, not copies: clone them to keep a snapshot.

    Example:
        >>> import timm
        >>> from visiontune.strategies import apply_strategy
        >>> net = timm.create_model("resnet18", num_classes=3)
        >>> _ = apply_strategy(net, "sparse", {"fraction": 0.5})
        >>> "fc.weight" in sparse_masks(net), int(sparse_masks(net)["layer1.0.conv1.weight"].sum())  # head: dense
        (False, 18432)
    """
    return {name: getattr(m, leaf + _MASK_SUFFIX) for name, m, leaf in _masked(model)}


def sparse_trainable_count(model: nn.Module) -> int:
    """Trainable entries: mask sizes for masked parameters, full size for other trainable ones (head).

    Example:
        >>> import timm
        >>> from visiontune.strategies import apply_strategy
        >>> net = timm.create_model("resnet18", num_classes=3)
        >>> _ = apply_strategy(net, "sparse", {"fraction": 0.01})
        >>> sparse_trainable_count(net) == sum(int(m.sum()) for m in sparse_masks(net).values()) + 512 * 3 + 3
        True
    """
    masks = {id(getattr(m, leaf)): getattr(m, leaf + _MASK_SUFFIX) for _, m, leaf in _masked(model)}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        total += int(masks[id(p)].sum()) if id(p) in masks else p.numel()
    return total


def sparse_needs_calibration(model: nn.Module) -> bool:
    """True when the model uses ``score="gradient"`` masks that :func:`calibrate_sparse` has not set yet."""
    flag = getattr(model, _CALIBRATED, None)
    return isinstance(flag, torch.Tensor) and not bool(flag)


def calibrate_sparse(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    *,
    num_batches: int | None = None,
    force: bool = False,
) -> dict[str, torch.Tensor]:
    """Set gradient-score masks: top-k of the squared gradient summed over the first warm-up batches.

    Runs in eval mode (no BatchNorm statistics change, no dropout) and leaves ``.grad`` untouched. A tensor
    whose accumulated gradient is all zero keeps its magnitude mask. Does nothing (and returns the current
    masks) for ``score="magnitude"``, or when the masks are already calibrated (e.g. restored from a
    checkpoint) unless ``force=True``.

    Args:
        model: a model the ``sparse`` strategy was applied to.
        batches: ``(images, targets)`` pairs, e.g. a DataLoader; moved to the model's device.
        loss_fn: ``loss_fn(model(images), targets) -> scalar``.
        num_batches: batches to use; default the config's ``warmup_batches``.
        force: recalibrate even if already calibrated.

    Returns:
        :func:`sparse_masks` after calibration (the live mask buffers).

    Example:
        >>> import timm
        >>> from visiontune.strategies import apply_strategy
        >>> net = timm.create_model("resnet18", num_classes=3)
        >>> _ = apply_strategy(net, "sparse", {"score": "gradient", "warmup_batches": 1})
        >>> masks = calibrate_sparse(net, [(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))])
        >>> sparse_needs_calibration(net)
        False
    """
    cfg = getattr(model, "visiontune_sparse_config", None)
    masked = _masked(model)
    if cfg is None or not masked:
        raise StrategyError("calibrate_sparse: apply the 'sparse' strategy to the model first")
    if cfg.score != "gradient" or (not force and not sparse_needs_calibration(model)):
        return sparse_masks(model)
    n = cfg.warmup_batches if num_batches is None else num_batches
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise StrategyError(f"calibrate_sparse: num_batches must be an integer >= 1, got {n!r}")
    params = [getattr(m, leaf) for _, m, leaf in masked]
    scores = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    device = params[0].device
    modes = {m: m.training for m in model.modules()}
    old_masks = [getattr(m, leaf + _MASK_SUFFIX).clone() for _, m, leaf in masked]
    used = 0
    try:
        model.eval()
        for _, m, leaf in masked:  # full masks: the hooks must not hide gradients from the score
            getattr(m, leaf + _MASK_SUFFIX).fill_(True)
        for images, targets in islice(batches, n):
            loss = loss_fn(model(images.to(device)), targets.to(device))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for s, g in zip(scores, grads):
                if g is not None:
                    s.add_(g.detach().float().square())
            used += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
        for (_, m, leaf), old in zip(masked, old_masks):
            getattr(m, leaf + _MASK_SUFFIX).copy_(old)
    if used == 0:
        raise StrategyError("calibrate_sparse: got no batches")
    with torch.no_grad():
        for (_, m, leaf), s, old in zip(masked, scores, old_masks):
            if bool(s.any()):
                getattr(m, leaf + _MASK_SUFFIX).copy_(_topk_mask(s, int(old.sum())))
        getattr(model, _CALIBRATED).fill_(True)
    return sparse_masks(model)


def sparse_delta(model: nn.Module, base_state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The masked entries only: ``{name}.sparse_indices`` (flat int64) and ``{name}.sparse_values``.

    Args:
        model: a model the ``sparse`` strategy was applied to (and trained).
        base_state: optional base weights (``state_dict`` before training); when given, checks that no
            entry outside a mask moved (weight decay on a masked tensor would do that) and raises otherwise.

    Example:
        >>> import timm
        >>> from visiontune.strategies import apply_strategy
        >>> net = timm.create_model("resnet18", num_classes=3)
        >>> _ = apply_strategy(net, "sparse", {"fraction": 0.01})
        >>> sparse_delta(net)["conv1.weight.sparse_values"].shape
        torch.Size([94])
    """
    out: dict[str, torch.Tensor] = {}
    for name, m, leaf in _masked(model):
        p = getattr(m, leaf).detach()
        mask = getattr(m, leaf + _MASK_SUFFIX)
        if base_state is not None:
            if name not in base_state:
                raise StrategyError(f"sparse_delta: base_state has no entry {name!r}")
            base = base_state[name].to(p.device, p.dtype)
            moved = int(((p != base) & ~mask).sum())
            if moved:
                raise StrategyError(
                    f"sparse_delta: {moved} entries of {name!r} outside its mask differ from base_state "
                    "(was weight decay applied to it? masked parameters set visiontune_no_weight_decay)"
                )
        idx = mask.flatten().nonzero().squeeze(1)
        out[f"{name}.sparse_indices"] = idx.cpu()
        out[f"{name}.sparse_values"] = p.flatten()[idx].cpu().clone()
    return out


def apply_sparse_delta(model: nn.Module, delta: Mapping[str, torch.Tensor]) -> None:
    """Write the entries stored by :func:`sparse_delta` into ``model``'s parameters, in place.

    Args:
        model: a model with the same parameter names and shapes as the one the delta came from (masks are
            not needed).
        delta: the output of :func:`sparse_delta`.

    Example:
        >>> import timm
        >>> from visiontune.strategies import apply_strategy
        >>> tuned, fresh = timm.create_model("resnet18"), timm.create_model("resnet18")
        >>> _ = apply_strategy(tuned, "sparse")
        >>> apply_sparse_delta(fresh, sparse_delta(tuned))
    """
    params = dict(model.named_parameters())
    names = {k[: -len(".sparse_indices")] for k in delta if k.endswith(".sparse_indices")}
    stray = [k for k in delta if not k.endswith((".sparse_indices", ".sparse_values"))]
    if stray:
        raise StrategyError(f"apply_sparse_delta: unexpected keys {stray[:5]}")
    with torch.no_grad():
        for name in sorted(names):
            if name not in params:
                raise StrategyError(f"apply_sparse_delta: {type(model).__name__} has no parameter {name!r}")
            values = delta.get(f"{name}.sparse_values")
            if values is None:
                raise StrategyError(f"apply_sparse_delta: {name!r} has indices but no values")
            idx = delta[f"{name}.sparse_indices"]
            p = params[name]
            if idx.numel() != values.numel() or (idx.numel() and int(idx.max()) >= p.numel()):
                raise StrategyError(f"apply_sparse_delta: indices/values of {name!r} do not fit shape {tuple(p.shape)}")
            write_flat(p, idx, values.to(p.device, p.dtype))  # indices in logical order, any memory format
