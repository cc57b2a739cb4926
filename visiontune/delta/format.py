"""Task deltas: save only what a strategy changed, load it onto a fresh base, swap tasks, merge for export.

A delta is a ``.safetensors`` file (never a pickle: loading one cannot run code) holding

* every parameter the strategy may train (``model.visiontune_delta``: LoRA ``lora_A``/``lora_B``, adapter
  and prompt tensors, BitFit biases, norm affines, last-k blocks, the head), under its name in the timm net;
* for ``sparse``, only the trained entries: ``<name>.sparse_indices`` (flat int64) + ``<name>.sparse_values``;
* BatchNorm running statistics of the BatchNorm layers that trained under the model's ``bn`` policy
  (``"train"``: all; ``"frozen"``: those whose affine parameters are in the delta; ``"eval"``: none);

and a string header with the backbone, weight source, strategy name and options (JSON), class names, bn
policy, which weights it holds (``weights_of``: ``"ema"`` when an EMA of the weights evaluated the model, as
FixMatch's EMA teacher does, else ``"model"``), visiontune version, and a short hash of every base tensor the
delta does *not* hold. Loading checks all of it against the target model and names what does not fit
(backbone, strategy option, class count, missing / unexpected keys, shapes, base tensors that differ from the
base the delta was trained on), so a delta loaded into a freshly built base (same backbone + weights +
strategy) reproduces the fine-tuned logits exactly, or fails loudly.

Example:
    >>> import visiontune as vt
    >>> from visiontune.delta import save_delta, build_from_delta
    >>> model = vt.TransferClassifier("tf_efficientnet_lite0", weights="package", num_classes=10,
    ...                               strategy="lora")                                # doctest: +SKIP
    >>> save_delta(model, "digits.safetensors")       # ~0.4 MB instead of ~13 MB   # doctest: +SKIP
    >>> again = build_from_delta("digits.safetensors")                             # doctest: +SKIP

Loading and checking: :mod:`visiontune.delta.load`. Several tasks on one base: :class:`visiontune.delta.TaskBank` (:mod:`visiontune.delta.bank`). After ``fit``:
the :class:`visiontune.delta.DeltaWriter` callback (:mod:`visiontune.delta.writer`) writes ``delta.safetensors``
next to the checkpoints. This module does not import Lightning.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .. import __version__
from ..errors import UserError
from ..io import atomic_save_safetensors
from ..models.heads import HeadError, find_head
from ..strategies.base import delta_parameter_names, strategy_name

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SPARSE_SUFFIXES",
    "DeltaError",
    "DeltaInfo",
    "DeltaLayout",
    "applied_strategy",
    "base_tensor_hashes",
    "delta_from_file",
    "delta_info",
    "delta_layout",
    "is_transfer_classifier",
    "jsonable",
    "merged_base_weights",
    "save_delta",
    "set_class_names",
    "write_delta",
]

FORMAT = "visiontune-delta"
FORMAT_VERSION = "1"
_BN = nn.modules.batchnorm._BatchNorm
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
#: suffixes of the tensors that hold a sparse parameter's trained entries
SPARSE_SUFFIXES = (".sparse_indices", ".sparse_values")
# Task-specific state that is neither delta nor base: sparse masks are rebuilt from the stored indices.
_NOT_BASE_SUFFIXES = ("_sparse_mask", "visiontune_sparse_calibrated")
_JSON_FIELDS = ("strategy_config", "class_names", "backbone_args", "head", "base_hashes")


class DeltaError(UserError, ValueError):
    """A delta file is unreadable, or does not fit the model (backbone, strategy, classes, keys, shapes)."""


# ------------------------------------------------------------------------------------------ describing
@dataclass
class DeltaInfo:
    """What a delta of a model is about (from :func:`delta_info`): the network whose tensors it holds, the
    TransferClassifier around it (or None for a bare timm net), and the header fields."""

    net: nn.Module
    module: nn.Module | None
    backbone: str
    weights: str | None
    class_names: list[str] | None
    bn: str
    backbone_args: dict[str, Any] = field(default_factory=dict)
    weights_of: str = "model"  # "ema" | "model": which weights `net` holds (metadata `weights_of`)


def is_transfer_classifier(model: Any) -> bool:
    """A TransferClassifier (duck-typed: importing it would import Lightning)."""
    hparams = getattr(model, "hparams", None)
    return isinstance(model, nn.Module) and hparams is not None and "backbone" in hparams and hasattr(model, "net")


def delta_info(
    model: nn.Module,
    *,
    class_names: list[str] | None = None,
    backbone: str | None = None,
    weights: str | os.PathLike | None = None,
    bn: str | None = None,
    backbone_args: Mapping[str, Any] | None = None,
    weights_of: str = "model",
    checkpoint: Mapping[str, Any] | None = None,
) -> DeltaInfo:
    """What a delta of ``model`` is about. ``weights_of="evaluated"`` (saving): the network that evaluates a
    TransferClassifier (:meth:`~visiontune.TransferClassifier.evaluated_net`: its EMA, if it keeps one);
    ``"model"``: ``model.net`` (loading, task banks). ``checkpoint``: that network as in this checkpoint dict."""
    if weights_of not in ("evaluated", "model"):
        raise DeltaError(f"weights_of must be 'evaluated' or 'model', got {weights_of!r}")
    if is_transfer_classifier(model):
        if model.net is None:
            raise DeltaError(
                "the TransferClassifier has no network yet: set num_classes/class_names or run setup first"
            )
        h = model.hparams
        args = dict(h.get("backbone_args") or {})
        if h.get("drop_path_rate") is not None:
            args["drop_path_rate"] = h["drop_path_rate"]
        w = weights if weights is not None else h.get("weights")
        net, held = _held_net(model, weights_of, checkpoint)
        return DeltaInfo(
            net=net, module=model, backbone=backbone or h["backbone"],
            weights=None if w is None else str(w),
            class_names=list(class_names or model.class_names or []) or None,
            bn=bn or h.get("bn", "frozen"), backbone_args={**args, **dict(backbone_args or {})}, weights_of=held,
        )
    if not isinstance(model, nn.Module):
        raise DeltaError(f"expected a TransferClassifier or a timm model, got {type(model).__name__}")
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return DeltaInfo(
        net=model, module=None, backbone=backbone or arch or "",
        weights=None if weights is None else str(weights),
        class_names=list(class_names) if class_names is not None else None,
        bn=bn or "train", backbone_args=dict(backbone_args or {}),
    )


def _held_net(model: nn.Module, weights_of: str, checkpoint: Mapping[str, Any] | None) -> tuple[nn.Module, str]:
    """The network of a TransferClassifier a delta holds, and which weights these are (``"ema"``/``"model"``)."""
    if weights_of == "evaluated" and hasattr(model, "evaluated_net"):
        return model.evaluated_net(checkpoint), model.evaluated_weights_of
    if checkpoint is None:
        return model.net, "model"
    net = copy.deepcopy(model.net)
    net.load_state_dict({k[len("net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")},
                        strict=True)
    return net, "model"


def applied_strategy(net: nn.Module) -> Any:
    """The strategy config applied to ``net`` (``net.visiontune_strategy``); a :class:`DeltaError` if none is."""
    cfg = getattr(net, "visiontune_strategy", None)
    if cfg is None:
        raise DeltaError(
            f"{type(net).__name__} has no strategy applied (no visiontune_strategy): a delta is defined by the "
            "strategy; use visiontune.apply_strategy(net, ...) or a TransferClassifier"
        )
    return cfg


def jsonable(obj: Any) -> Any:
    """``obj`` as JSON would give it back (unknown types as ``str``): what a delta's header records."""
    return json.loads(json.dumps(obj, default=str))


# ------------------------------------------------------------------------------------------- layout
@dataclass
class DeltaLayout:
    """The tensors a delta of a network holds, by kind (from :func:`delta_layout`, checked by
    :func:`visiontune.delta.load.check_delta`)."""

    dense: dict[str, torch.Size]     # parameter name -> shape (incl. head)
    sparse: dict[str, torch.Size]    # masked parameter name -> shape
    stats: dict[str, torch.Size]     # BatchNorm buffer name -> shape
    head: list[str]                  # every head parameter
    outputs: list[str] = field(default_factory=list)  # the head's output-layer parameters: dim 0 = classes

    def keys(self) -> dict[str, torch.Size | None]:
        out: dict[str, torch.Size | None] = dict(self.dense)
        for n in self.sparse:
            out[n + ".sparse_indices"] = out[n + ".sparse_values"] = None
        out.update(self.stats)
        return out


def _sparse_masks(net: nn.Module) -> dict[str, torch.Tensor]:
    from ..strategies.sparse import sparse_masks

    return sparse_masks(net)


def delta_layout(net: nn.Module, bn: str) -> DeltaLayout:
    """The tensors a delta of ``net`` (its strategy applied) holds under the BatchNorm policy ``bn``."""
    if bn not in ("frozen", "eval", "train"):
        raise DeltaError(f"bn policy must be 'frozen', 'eval' or 'train', got {bn!r}")
    applied_strategy(net)
    delta = delta_parameter_names(net)
    masks = _sparse_masks(net)
    params = dict(net.named_parameters())
    dense = {n: p.shape for n, p in params.items() if n in delta and n not in masks}
    sparse = {n: params[n].shape for n in masks if n in delta}
    stats: dict[str, torch.Size] = {}
    for mname, m in net.named_modules():
        if not isinstance(m, _BN) or not m.track_running_stats:
            continue
        prefix = f"{mname}." if mname else ""
        trained = bn == "train" or (
            bn == "frozen" and any(prefix + pn in delta for pn, _ in m.named_parameters(recurse=False))
        )
        if trained:
            for b in _BN_STATS:
                t = getattr(m, b, None)
                if isinstance(t, torch.Tensor):
                    stats[prefix + b] = t.shape
    try:
        head = find_head(net)
    except HeadError as exc:
        raise DeltaError(str(exc)) from None
    return DeltaLayout(dense, sparse, stats, list(head.parameter_names), list(head.output_parameter_names))


def _hash(t: torch.Tensor) -> str:
    data = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if data.numel():
        h.update(data.view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def merged_base_weights(net: nn.Module) -> set[str]:
    """Base tensors a merged LoRA / folded layer has changed in place: not hashed, not compared."""
    from ..strategies.lora import lora_layers
    from ..strategies.ssf import merged_ssf_tensors

    lora = {f"{n}.base_layer.weight" for n, layer in lora_layers(net).items() if layer.merged}
    return lora | merged_ssf_tensors(net)


def base_tensor_hashes(net: nn.Module, skip: set[str]) -> dict[str, str]:
    """Short hash of every base tensor not in ``skip`` and not task-specific, once per tensor.

    A tensor with several state-dict names (tied or shared modules: CoaT shares its conv position encodings
    between blocks) is one tensor: hashed once, under its first name, and not at all when any of its names is
    in ``skip`` (a delta holds it under the name ``named_parameters()`` gives it, and writing it there restores
    every alias).

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> sorted(base_tensor_hashes(nn.Sequential(lin, lin), {"0.weight"}))  # '1.weight' is '0.weight'
        ['0.bias']
    """
    skip = skip | merged_base_weights(net)
    entries = net.state_dict(keep_vars=True)
    skipped = {id(t) for k, t in entries.items() if k in skip}
    seen: set[int] = set()
    out = {}
    for k, t in entries.items():
        if k in skip or k.endswith(_NOT_BASE_SUFFIXES) or id(t) in skipped or id(t) in seen:
            continue
        seen.add(id(t))
        out[k] = _hash(t)
    return out


# ------------------------------------------------------------------------------------------- saving
def _collect(net: nn.Module, layout: DeltaLayout) -> dict[str, torch.Tensor]:
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    out = {n: params[n].detach().to("cpu").clone() for n in layout.dense}
    if layout.sparse:
        from ..strategies.sparse import sparse_delta

        sparse = sparse_delta(net)  # {name}.sparse_indices (flat int64) + {name}.sparse_values
        out.update({k: v for k, v in sparse.items() if k.rsplit(".", 1)[0] in layout.sparse})
    out.update({n: buffers[n].detach().to("cpu").clone() for n in layout.stats})
    return out


def write_delta(info: DeltaInfo, path: str | os.PathLike) -> Path:
    """Write the delta described by ``info`` (see :func:`delta_info`) to ``path`` atomically; what
    :func:`save_delta` does after describing its model."""
    net = info.net
    cfg = applied_strategy(net)
    if info.class_names is None:
        raise DeltaError(
            "save_delta: pass class_names=[...] for a bare timm net (a TransferClassifier knows its classes)"
        )
    if not info.backbone:
        raise DeltaError("save_delta: pass backbone='<timm model name>' for a net without pretrained_cfg")
    layout = delta_layout(net, info.bn)
    head_out = {p.shape[0] for n, p in net.named_parameters() if n in layout.outputs and p.ndim >= 1}
    if head_out and head_out != {len(info.class_names)}:
        raise DeltaError(
            f"save_delta: {len(info.class_names)} class names given but the head has {sorted(head_out)} outputs"
        )
    tensors = _collect(net, layout)
    skip = set(layout.dense) | set(layout.sparse) | set(layout.stats)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "visiontune_version": __version__,
        "backbone": info.backbone,
        "architecture": str((getattr(net, "pretrained_cfg", None) or {}).get("architecture", "")),
        "weights": "none" if info.weights is None else str(info.weights),
        "strategy": strategy_name(cfg),
        "strategy_config": json.dumps(jsonable(cfg.to_dict()), sort_keys=True),
        "class_names": json.dumps(list(info.class_names)),
        "num_classes": str(len(info.class_names)),
        "bn": info.bn,
        "weights_of": info.weights_of,
        "backbone_args": json.dumps(jsonable(info.backbone_args), sort_keys=True),
        "head": json.dumps(layout.head),
        "base_hashes": json.dumps(base_tensor_hashes(net, skip), sort_keys=True),
    }
    return atomic_save_safetensors(tensors, path, meta)


def save_delta(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    class_names: list[str] | None = None,
    backbone: str | None = None,
    weights: str | os.PathLike | None = None,
    bn: str | None = None,
    backbone_args: Mapping[str, Any] | None = None,
    weights_of: str = "evaluated",
) -> Path:
    """Write the task delta of ``model`` to a ``.safetensors`` file, atomically.

    Args:
        model: a :class:`~visiontune.TransferClassifier`, or a timm net that
            :func:`~visiontune.apply_strategy` was applied to.
        path: destination file (an interrupted save never leaves a truncated file).
        class_names: class names in label order; required for a bare net (a TransferClassifier's are used).
        backbone: timm model name; a bare net defaults to its ``pretrained_cfg["architecture"]``.
        weights: weight source of the base (``"package"``, ``"hub"``, a path, ``None`` = random init),
            recorded for :func:`build_from_delta`; defaults to the TransferClassifier's.
        bn: BatchNorm policy the model trained under (decides which running statistics are saved);
            TransferClassifier: its ``bn``; bare net: ``"train"`` (``net.train()`` updates every BatchNorm).
        backbone_args: extra ``timm.create_model`` arguments needed to rebuild the base (``img_size``...).
        weights_of: TransferClassifier: ``"evaluated"`` saves the network that evaluates it (validation, test,
            predict: its EMA when training keeps one, see :meth:`~visiontune.TransferClassifier.evaluated_net`);
            ``"model"`` saves ``model.net``, the trained weights themselves. The metadata's ``weights_of`` says
            which one the file holds (``"ema"`` or ``"model"``).

    Returns:
        ``Path(path)``.

    Example:
        >>> import timm
        >>> from visiontune import apply_strategy
        >>> net = timm.create_model("resnet18", num_classes=3)
        >>> _ = apply_strategy(net, "lora", {"rank": 4})
        >>> save_delta(net, "task.safetensors", class_names=["a", "b", "c"])  # doctest: +SKIP
    """
    info = delta_info(model, class_names=class_names, backbone=backbone, weights=weights, bn=bn,
                      backbone_args=backbone_args, weights_of=weights_of)
    return write_delta(info, path)


# ------------------------------------------------------------------------------------------ reading
def delta_from_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a delta: its tensors (on CPU) and its metadata (JSON fields decoded).

    The file is parsed as safetensors only: a pickle (or anything else) is refused, never executed.

    Args:
        path: a file written by :func:`save_delta`.

    Returns:
        ``(tensors, metadata)``; metadata keys: ``backbone``, ``weights``, ``strategy``,
        ``strategy_config`` (dict), ``class_names`` (list), ``num_classes`` (int), ``bn``, ``weights_of``
        (``"ema"``/``"model"``), ``backbone_args`` (dict), ``head`` (list), ``base_hashes`` (dict),
        ``visiontune_version``, ...

    Example:
        >>> tensors, meta = delta_from_file("task.safetensors")  # doctest: +SKIP
        >>> meta["strategy"], meta["class_names"][:2]            # doctest: +SKIP
        ('lora', ['a', 'b'])
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise DeltaError(f"delta file not found: {str(p)!r}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            raw = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise DeltaError(
            f"{str(p)!r} is not a safetensors delta ({type(exc).__name__}: {exc}); deltas are never unpickled"
        ) from None
    if raw.get("format") != FORMAT:
        raise DeltaError(
            f"{str(p)!r} is a safetensors file but not a visiontune delta (no format={FORMAT!r} in its header)"
        )
    meta: dict[str, Any] = dict(raw)
    try:
        for key in _JSON_FIELDS:
            if key in meta:
                meta[key] = json.loads(meta[key])
        meta["num_classes"] = int(meta.get("num_classes", len(meta.get("class_names") or [])))
    except (ValueError, TypeError) as exc:
        raise DeltaError(f"{str(p)!r}: corrupt delta metadata ({exc})") from None
    meta["weights"] = None if meta.get("weights") in (None, "none") else meta["weights"]
    meta.setdefault("weights_of", "model")  # deltas from before the field held the model's own weights
    return tensors, meta


def set_class_names(module: nn.Module, names: list[str]) -> None:
    """Give a TransferClassifier the class names ``names`` (attributes and hparams), as loading a delta does."""
    module.class_names = list(names)
    module.num_classes = len(names)
    module.hparams["class_names"] = list(names)
    module.hparams["num_classes"] = len(names)

