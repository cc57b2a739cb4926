"""The classification head of any timm model, and growing it for new classes.

* :func:`find_head` gives the :class:`ClassifierHead` of a timm model: the modules ``get_classifier()``
  returns (one ``nn.Linear``; one module of several parts, such as LeViT/RepViT's ``NormLinear`` =
  BatchNorm1d + Linear or MetaFormer's ``MlpHead``; or a tuple of heads, such as DeiT's distillation pair
  ``(head, head_dist)``), their paths and parameter names, and the *output* layers whose rows are the
  classes (timm's ``pretrained_cfg['classifier']`` names where they resolve, else each head module's last
  Linear). Every part of visiontune that needs "the head" asks it: strategies (the head always trains and is
  never wrapped), deltas (the class count), the task bank (one head per task), the feature cache.
* :func:`expand_head` grows an ``nn.Linear`` by ``num_new`` rows; old rows stay bit-identical, so old-class
  logits are unchanged until training moves them.
* :func:`expand_classes` does it in place on a timm model: every output layer grows, its new rows
  imprinted from a few support images (:func:`~visiontune.models.imprint.imprint_weights`, re-exported
  here with :func:`~visiontune.models.imprint.calibrate_new_rows`).

Keeping the old classes while training on the new ones (distillation, frozen rows, split accuracy) is in
:mod:`visiontune.objectives.classes`, which re-exports these functions. New classes are appended: class index
``len(old_class_names) + j`` is ``new_class_names[j]``.

Example:
    >>> import timm, torch
    >>> model = timm.create_model("resnet18", num_classes=3, pretrained=False)
    >>> names = expand_classes(model, ["d"], (torch.randn(2, 3, 32, 32), torch.tensor([0, 0])),
    ...                        old_class_names=["a", "b", "c"])
    >>> names, model.get_classifier().out_features
    (['a', 'b', 'c', 'd'], 4)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import UserError
from .imprint import calibrate_new_rows, imprint_weights

__all__ = ["ClassifierHead", "HeadError", "calibrate_new_rows", "cfg_classifier_names", "expand_classes",
           "expand_head", "find_head", "imprint_weights", "output_inputs", "set_module"]


class HeadError(UserError, ValueError):
    """A model whose classification head cannot be found, or whose output layers disagree on the class count."""


def cfg_classifier_names(model: nn.Module) -> list[str]:
    """timm's ``pretrained_cfg['classifier']``: one name or a tuple of names (``('head', 'head_dist')``)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("classifier") if isinstance(cfg, dict) else None
    return [name] if isinstance(name, str) else [n for n in (name or ()) if isinstance(n, str)]


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _is_output(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d))


@dataclass(frozen=True)
class ClassifierHead:
    """The classification head of a timm model (from :func:`find_head`), however many modules it has.

    Attributes:
        paths: module paths of the head modules (``("fc",)``, ``("head", "head_dist")``, ``("head.fc",)``).
        modules: those modules.
        outputs: module paths of the output layers (``nn.Linear``, or a 1×1 ``nn.Conv2d``) whose rows are the
            classes: ``("head.linear", "head_dist.linear")`` for LeViT, ``("head.fc.fc2",)`` for CAFormer.
        output_layers: those layers.
        parameter_names: names (in ``model.named_parameters()``) of every head parameter.
        output_parameter_names: those of the output layers (their dim 0 is the class count).
        state_names: ``model.state_dict()`` names of the head's parameters and buffers.

    Example:
        >>> import timm
        >>> h = find_head(timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=3))
        >>> h.paths, h.outputs, h.num_classes
        (('head', 'head_dist'), ('head', 'head_dist'), 3)
    """

    paths: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    outputs: tuple[str, ...]
    output_layers: tuple[nn.Module, ...]
    parameter_names: tuple[str, ...]
    output_parameter_names: tuple[str, ...]
    state_names: tuple[str, ...]

    @property
    def num_classes(self) -> int | None:
        """The class count (rows of every output layer); None for a head without outputs (``num_classes=0``)."""
        counts = sorted({int(layer.weight.shape[0]) for layer in self.output_layers})
        if len(counts) > 1:
            raise HeadError(f"the head's output layers {list(self.outputs)} disagree on the class count: {counts}")
        return counts[0] if counts else None

    @property
    def module_ids(self) -> frozenset[int]:
        """``id()`` of every module inside the head (what strategies never wrap or hook)."""
        return frozenset(id(m) for h in self.modules for m in h.modules())

    def set_num_classes(self, model: nn.Module, n: int) -> None:
        """Set ``num_classes`` to ``n`` on the model and on every module on the way to an output layer."""
        owners = {id(model): model}
        for path in self.outputs:
            parts = path.split(".")
            for i in range(1, len(parts)):
                m = model.get_submodule(".".join(parts[:i]))
                owners[id(m)] = m
        for owner in owners.values():
            if isinstance(getattr(owner, "num_classes", None), int):
                owner.num_classes = n


def find_head(model: nn.Module, *, missing_ok: bool = False) -> ClassifierHead:
    """The :class:`ClassifierHead` of a timm model (``get_classifier()``, a module or a tuple of modules).

    Args:
        model: a timm model.
        missing_ok: a model without ``get_classifier()`` has an empty head instead of raising.

    Raises:
        HeadError: no ``get_classifier()`` (unless ``missing_ok``), or a head module that is not a sub-module.

    Example:
        >>> import timm
        >>> h = find_head(timm.create_model("levit_128s", img_size=32, num_classes=3))
        >>> h.paths, h.outputs, len(h.parameter_names)
        (('head', 'head_dist'), ('head.linear', 'head_dist.linear'), 8)
    """
    get = getattr(model, "get_classifier", None)
    if not callable(get):
        if missing_ok:
            return ClassifierHead((), (), (), (), (), (), ())
        raise HeadError(f"{type(model).__name__} has no get_classifier(): not a timm classifier")
    found = get()
    mods = tuple(m for m in (found if isinstance(found, (tuple, list)) else (found,)) if isinstance(m, nn.Module))
    cfg_names = cfg_classifier_names(model)
    by_id = {id(m): name for name, m in model.named_modules() if name}
    by_id.update({id(m): n for n in reversed(cfg_names) if (m := _submodule(model, n)) is not None})
    missing = [type(m).__name__ for m in mods if id(m) not in by_id]
    if missing:
        raise HeadError(f"the classifier of {type(model).__name__} ({', '.join(missing)}) is not one of its modules")
    paths = tuple(by_id[id(m)] for m in mods)
    outputs: list[str] = []
    for path, m in zip(paths, mods):
        inside = {id(x): f"{path}.{sub}" if sub else path for sub, x in m.named_modules()}
        hits = [inside[id(x)] for n in cfg_names if (x := _submodule(model, n)) is not None
                and id(x) in inside and _is_output(x)]
        if not hits:  # each head module's last Linear (MlpHead: fc2; NormLinear: linear)
            hits = [inside[id(x)] for x in m.modules() if _is_output(x)][-1:]
        outputs += [h for h in hits if h not in outputs]
    layers = tuple(model.get_submodule(o) for o in outputs)
    ids = {id(p) for m in mods for p in m.parameters()}
    out_ids = {id(p) for layer in layers for p in layer.parameters()}
    state_ids = ids | {id(b) for m in mods for b in m.buffers()}
    return ClassifierHead(
        paths=paths, modules=mods, outputs=tuple(outputs), output_layers=layers,
        parameter_names=tuple(n for n, p in model.named_parameters() if id(p) in ids),
        output_parameter_names=tuple(n for n, p in model.named_parameters() if id(p) in out_ids),
        state_names=tuple(n for n, t in model.state_dict(keep_vars=True).items() if id(t) in state_ids),
    )


def set_module(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the dotted ``path`` of ``model``; returns its parent."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)
    return parent


def expand_head(
    head: nn.Linear,
    num_new: int,
    *,
    init_weights: Tensor | None = None,
    init_bias: Tensor | None = None,
) -> nn.Linear:
    """A new ``nn.Linear`` with ``num_new`` extra output rows; the old rows are copied bit-exactly.

    Args:
        head: the current classifier, ``out_features = C_old``.
        num_new: rows to add (>= 1).
        init_weights: ``(num_new, in_features)`` new rows; None = ``nn.Linear``'s default init.
        init_bias: ``(num_new,)`` new biases; None = ``nn.Linear``'s default init. Ignored
            (must be None) when ``head`` has no bias.

    Returns:
        A fresh ``nn.Linear(in_features, C_old + num_new)`` on the head's device and dtype, with the
        head's ``requires_grad``.

    Example:
        >>> h = nn.Linear(4, 2)
        >>> h2 = expand_head(h, 3, init_weights=torch.zeros(3, 4), init_bias=torch.zeros(3))
        >>> h2.out_features, torch.equal(h2.weight[:2], h.weight)
        (5, True)
    """
    if not isinstance(head, nn.Linear):
        raise TypeError(f"expand_head needs an nn.Linear head; got {type(head).__name__}")
    if not isinstance(num_new, int) or isinstance(num_new, bool) or num_new < 1:
        raise ValueError(f"num_new must be an int >= 1; got {num_new!r}")
    w = head.weight
    has_bias = head.bias is not None
    if init_weights is not None and tuple(init_weights.shape) != (num_new, head.in_features):
        raise ValueError(
            f"init_weights must have shape ({num_new}, {head.in_features}); got {tuple(init_weights.shape)}"
        )
    if init_bias is not None:
        if not has_bias:
            raise ValueError("init_bias was given but the head has no bias")
        if tuple(init_bias.shape) != (num_new,):
            raise ValueError(f"init_bias must have shape ({num_new},); got {tuple(init_bias.shape)}")
    new = nn.Linear(head.in_features, head.out_features + num_new, bias=has_bias, device=w.device, dtype=w.dtype)
    c = head.out_features
    with torch.no_grad():
        new.weight[:c].copy_(w)
        if init_weights is not None:
            new.weight[c:].copy_(init_weights)
        if has_bias:
            new.bias[:c].copy_(head.bias)
            if init_bias is not None:
                new.bias[c:].copy_(init_bias)
    new.weight.requires_grad_(w.requires_grad)
    if has_bias:
        new.bias.requires_grad_(head.bias.requires_grad)
    new.train(head.training)
    return new


@torch.no_grad()
def output_inputs(model: nn.Module, head: ClassifierHead, images: Tensor,
                   batch_size: int) -> tuple[list[Tensor], Tensor]:
    """What each output layer reads (``(N, D)`` per layer) and the model's logits, on ``images`` in eval mode
    (the model's train/eval mode is restored). One forward serves every output (DeiT: the class and the
    distillation token; LeViT: the BatchNorm1d's output)."""
    seen: list[list[Tensor]] = [[] for _ in head.output_layers]

    def hook(i: int):
        def fn(module: nn.Module, args: tuple) -> None:
            seen[i].append(args[0].detach().flatten(1))
        return fn

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(head.output_layers)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        logits = [model(images[i : i + batch_size].to(device)) for i in range(0, images.shape[0], batch_size)]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [torch.cat(s) for s in seen], torch.cat(logits)


def _checked_support(support: tuple[Tensor, Tensor], old: list[str], new: list[str]) -> tuple[Tensor, Tensor]:
    images, labels = support
    labels = torch.as_tensor(labels).long()
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"support has {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(new)):
        raise ValueError(
            f"support labels index new_class_names and must lie in [0, {len(new)}); got "
            f"{sorted(set(labels.tolist()))} (subtract {len(old)} from full-list labels)"
        )
    counts = torch.bincount(labels, minlength=len(new)).tolist()
    missing = [n for n, c in zip(new, counts) if c == 0]
    if missing:
        raise ValueError(f"new classes without any support image: {missing}")
    return images, labels


def _new_rows(model: nn.Module, head: ClassifierHead, old: list[str], new: list[str],
              support: tuple[Tensor, Tensor] | None, anchors: Tensor | None, anchor_threshold: float,
              batch_size: int) -> list[tuple[Tensor, Tensor | None]]:
    """``(weight, bias)`` of the new rows of every output layer (imprinted, calibrated, or neutral)."""
    layers = head.output_layers
    if support is None:  # zero rows with the mean old bias: neutral logits, left to training
        return [(torch.zeros(len(new), layer.in_features),
                 None if layer.bias is None else layer.bias.detach().mean().expand(len(new)).clone())
                for layer in layers]
    images, labels = _checked_support(support, old, new)
    feats, _ = output_inputs(model, head, images, batch_size)
    rows = [imprint_weights(f, labels, len(new), reference_head=layer) for f, layer in zip(feats, layers)]
    if anchors is None or not len(anchors):
        return rows
    anchor_feats, logits = output_inputs(model, head, anchors, batch_size)
    conf, pred = logits.float().softmax(1).max(1)
    keep = conf >= anchor_threshold
    if not keep.any():
        return rows
    return [calibrate_new_rows(f, labels + len(old), af[keep.to(af.device)], pred[keep].to(af.device),
                               old_weight=layer.weight.detach(),
                               old_bias=None if layer.bias is None else layer.bias.detach(),
                               init_weight=w, init_bias=b)
            for f, af, layer, (w, b) in zip(feats, anchor_feats, layers, rows)]


def _checked_names(model: nn.Module, head: ClassifierHead, old: list[str], new: list[str]) -> None:
    if not new:
        raise ValueError("new_class_names is empty: nothing to add")
    if not head.output_layers:
        raise TypeError(f"expand_classes: {type(model).__name__} has no output layer to grow (no classifier)")
    bad = [f"{path!r} ({type(layer).__name__})" for path, layer in zip(head.outputs, head.output_layers)
           if not isinstance(layer, nn.Linear)]
    if bad:
        raise TypeError(f"expand_classes needs an nn.Linear classifier; {type(model).__name__} has the output "
                        f"layer(s) {', '.join(bad)}: grow it by hand or reset_classifier()")
    if len(old) != head.num_classes:
        raise ValueError(f"old_class_names has {len(old)} names but the classifier has {head.num_classes} outputs")
    dup_new = sorted({n for n in new if new.count(n) > 1})
    if dup_new:
        raise ValueError(f"new_class_names repeats {dup_new}")
    clash = [n for n in new if n in set(old)]
    if clash:
        raise ValueError(f"new class names already exist among the old classes: {clash}")


def expand_classes(
    model: nn.Module,
    new_class_names: Sequence[str],
    support: tuple[Tensor, Tensor] | None = None,
    *,
    old_class_names: Sequence[str],
    batch_size: int = 64,
    anchors: Tensor | None = None,
    anchor_threshold: float = 0.9,
) -> list[str]:
    """Add classes to a timm classifier in place, imprinting their rows from support images.

    Every output layer of the head (:func:`find_head`: one ``nn.Linear``, or several, as DeiT's
    ``(head, head_dist)`` or LeViT's two ``NormLinear`` heads) is replaced by a larger ``nn.Linear`` whose
    first ``len(old_class_names)`` rows are bit-identical to the old ones; the rest of the head (LeViT's
    BatchNorm1d, MetaFormer's ``MlpHead`` hidden layer) is unchanged. With ``support``, each output layer's new
    rows come from :func:`imprint_weights` on what that layer reads (computed in eval mode under ``no_grad``;
    the model's train/eval mode is restored). Without support, new rows start at zero with the mean old bias
    (neutral logits, left to training). ``model.num_classes`` (and the heads' parents') is updated. The head is
    a new module: build the optimizer (and any EMA teacher) after calling this. An output layer that is not an
    ``nn.Linear`` (DLA's 1×1 conv) is refused (``TypeError``) before anything changes.

    Args:
        model: a timm classification model with a Linear classifier.
        new_class_names: names of the classes to add, distinct from each other and the old ones.
        support: ``(images (N, C, H, W), labels (N,))``, labels indexing ``new_class_names``;
            every new class needs at least one image.
        old_class_names: the current class names, one per head row.
        batch_size: support images per forward.
        anchors: ``(M, C, H, W)`` unlabeled images (a user's photo dump). Those the model (still
            old-class only) gives an old class with probability ``>= anchor_threshold`` stand for
            their old class, and the imprinted rows are refitted against the fixed old rows
            (:func:`calibrate_new_rows`). Imprinting alone points each new row along its class's mean
            feature, which on non-negative pooled features scores *every* image high: measured on
            real photos (8 old + 4 new classes, 5 labels each, 96 px), old-class accuracy went from
            0.899 to 0.000 at imprinting, and is 0.848 after calibration.
        anchor_threshold: confidence for an anchor to count, in (0, 1).

    Returns:
        ``list(old_class_names) + list(new_class_names)``, the new index -> name list.

    Example:
        >>> import timm
        >>> m = timm.create_model("resnet18", num_classes=2, pretrained=False)
        >>> expand_classes(m, ["wren"], old_class_names=["crow", "gull"])
        ['crow', 'gull', 'wren']
    """
    old, new = list(old_class_names), list(new_class_names)
    head = find_head(model)
    _checked_names(model, head, old, new)
    rows = _new_rows(model, head, old, new, support, anchors, anchor_threshold, batch_size)
    for path, layer, (weight, bias) in zip(head.outputs, head.output_layers, rows):
        set_module(model, path, expand_head(layer, len(new), init_weights=weight, init_bias=bias))
    head.set_num_classes(model, len(old) + len(new))
    return old + new
