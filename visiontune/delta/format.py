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

Several tasks on one base: :class:`visiontune.delta.TaskBank` (:mod:`visiontune.delta.bank`). After ``fit``:
the :class:`visiontune.delta.DeltaWriter` callback (:mod:`visiontune.delta.writer`) writes ``delta.safetensors``
next to the checkpoints. This module does not import Lightning.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .. import __version__
from ..errors import UserError
from ..io import atomic_save_safetensors
from ..strategies.base import delta_parameter_names, head_parameter_names, strategy_name

__all__ = [
    "DeltaError",
    "DeltaInfo",
    "DeltaLayout",
    "applied_strategy",
    "base_tensor_hashes",
    "check_delta",
    "delta_from_file",
    "delta_info",
    "is_transfer_classifier",
    "load_delta",
    "save_delta",
    "set_class_names",
    "write_delta",
]

FORMAT = "visiontune-delta"
FORMAT_VERSION = "1"
_BN = nn.modules.batchnorm._BatchNorm
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
_SPARSE_SUFFIXES = (".sparse_indices", ".sparse_values")
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


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ------------------------------------------------------------------------------------------- layout
@dataclass
class DeltaLayout:
    """The tensors a delta of a network holds, by kind (from :func:`check_delta`)."""

    dense: dict[str, torch.Size]     # parameter name -> shape (incl. head)
    sparse: dict[str, torch.Size]    # masked parameter name -> shape
    stats: dict[str, torch.Size]     # BatchNorm buffer name -> shape
    head: list[str]

    def keys(self) -> dict[str, torch.Size | None]:
        out: dict[str, torch.Size | None] = dict(self.dense)
        for n in self.sparse:
            out[n + ".sparse_indices"] = out[n + ".sparse_values"] = None
        out.update(self.stats)
        return out


def _sparse_masks(net: nn.Module) -> dict[str, torch.Tensor]:
    from ..strategies.sparse import sparse_masks

    return sparse_masks(net)


def _layout(net: nn.Module, bn: str) -> DeltaLayout:
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
    return DeltaLayout(dense, sparse, stats, head_parameter_names(net))


def _hash(t: torch.Tensor) -> str:
    data = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if data.numel():
        h.update(data.view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def _merged_base_weights(net: nn.Module) -> set[str]:
    from ..strategies.lora import lora_layers

    return {f"{n}.base_layer.weight" for n, layer in lora_layers(net).items() if layer.merged}


def base_tensor_hashes(net: nn.Module, skip: set[str]) -> dict[str, str]:
    """Short hash of every base tensor (state-dict entry) not in ``skip`` and not task-specific."""
    skip = skip | _merged_base_weights(net)
    return {
        k: _hash(v) for k, v in net.state_dict().items()
        if k not in skip and not k.endswith(_NOT_BASE_SUFFIXES)
    }


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
    layout = _layout(net, info.bn)
    head_out = {p.shape[0] for n, p in net.named_parameters() if n in layout.head and p.ndim >= 1}
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
        "strategy_config": json.dumps(_jsonable(cfg.to_dict()), sort_keys=True),
        "class_names": json.dumps(list(info.class_names)),
        "num_classes": str(len(info.class_names)),
        "bn": info.bn,
        "weights_of": info.weights_of,
        "backbone_args": json.dumps(_jsonable(info.backbone_args), sort_keys=True),
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


def _config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k} (delta {saved.get(k, '<unset>')!r}, model {current.get(k, '<unset>')!r})"
            for k in keys if saved.get(k, "<unset>") != current.get(k, "<unset>")]


def _shown(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def check_delta(info: DeltaInfo, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], source: str, *,
                strict: bool, check_base: bool, allow_head_mismatch: bool = False,
                base_hashes: Mapping[str, str] | None = None) -> DeltaLayout:
    """Raise a :class:`DeltaError` naming everything in the delta that does not fit ``info.net``; else return
    the layout of the tensors to write into it. ``tensors``, ``meta``: from :func:`delta_from_file`.

    ``allow_head_mismatch``: another class count is fine (a TaskBank gives every task its own head), only
    the head's input size must match. ``base_hashes``: precomputed hashes of the base (TaskBank).
    """
    net = info.net
    problems: list[str] = []
    arch = (getattr(net, "pretrained_cfg", None) or {}).get("architecture")
    model_backbone = info.backbone or arch
    if model_backbone and meta.get("backbone") and meta["backbone"] != model_backbone:
        problems.append(f"backbone: delta is for {meta['backbone']!r}, the model is {model_backbone!r}")
    cfg = applied_strategy(net)
    name = strategy_name(cfg)
    if meta.get("strategy") != name:
        problems.append(f"strategy: delta was saved with {meta.get('strategy')!r}, the model uses {name!r}")
    else:
        diff = _config_diff(meta.get("strategy_config") or {}, _jsonable(cfg.to_dict()))
        if diff:
            msg = f"strategy options of {name!r} differ: {_shown(diff)}"
            if strict:
                problems.append(msg)
            else:
                warnings.warn(f"{source}: {msg}", stacklevel=3)
    if problems:  # the rest would only repeat these in terms of keys
        raise DeltaError(f"{source} does not fit the model: " + "; ".join(problems))
    layout = _layout(net, meta.get("bn") or "frozen")
    expected = layout.keys()
    params = dict(net.named_parameters())
    head_ok = allow_head_mismatch
    for n in layout.head:
        t = tensors.get(n)
        if allow_head_mismatch and t is not None and t.shape[1:] != params[n].shape[1:]:
            problems.append(f"head {n!r}: delta {tuple(t.shape)} vs model {tuple(params[n].shape)} (input size)")
        if not allow_head_mismatch and t is not None and t.ndim >= 1 and t.shape[0] != params[n].shape[0]:
            names = [str(c) for c in meta.get("class_names") or []]
            problems.append(
                f"class count: the delta has {meta.get('num_classes')} classes ({_shown(names, 5)}) in its head "
                f"{n!r} {tuple(t.shape)} but the model's head has {params[n].shape[0]} outputs"
            )
            head_ok = True  # reported: no second line for the same tensor
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        problems.append(f"missing keys (the model's strategy trains them): {_shown(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (not part of the model's delta): {_shown(unexpected)}")
    shapes = [
        f"{k}: delta {tuple(tensors[k].shape)} vs model {tuple(s)}"
        for k, s in expected.items()
        if s is not None and k in tensors and tensors[k].shape != s and not (head_ok and k in layout.head)
    ]
    for n, s in layout.sparse.items():
        idx, val = tensors.get(n + ".sparse_indices"), tensors.get(n + ".sparse_values")
        if idx is not None and val is not None and (
            idx.ndim != 1 or idx.shape != val.shape or (idx.numel() and int(idx.max()) >= s.numel())
        ):
            shapes.append(f"{n}.sparse_indices/values do not fit shape {tuple(s)}")
    if shapes:
        problems.append(f"shape mismatch: {_shown(shapes)}")
    if problems:
        raise DeltaError(f"{source} does not fit the model: " + "; ".join(problems))
    saved = meta.get("base_hashes") or {}
    if check_base and saved:
        mine = base_hashes if base_hashes is not None else base_tensor_hashes(net, {*expected, *layout.sparse})
        differ = [k for k in saved if k in mine and mine[k] != saved[k]]
        absent = [k for k in saved if k not in mine and k not in _merged_base_weights(net)]
        if differ or absent:
            detail = []
            if differ:
                detail.append(f"{len(differ)} differ ({_shown(differ, 5)})")
            if absent:
                detail.append(f"{len(absent)} missing from the model ({_shown(absent, 5)})")
            raise DeltaError(
                f"{source}: the model's base tensors are not the base this delta was trained on: "
                f"{'; '.join(detail)}. The delta expects {meta.get('backbone')!r} with weights="
                f"{meta.get('weights')!r} and backbone_args={meta.get('backbone_args')}; build the base the "
                "same way (build_from_delta(path, weights=...)), or pass check_base=False to load anyway"
            )
    return layout


def _write_into(net: nn.Module, tensors: Mapping[str, torch.Tensor], layout: DeltaLayout) -> None:
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    with torch.no_grad():
        for n in layout.dense:
            params[n].copy_(tensors[n])
        for n in layout.stats:
            buffers[n].copy_(tensors[n])
        if layout.sparse:
            from ..strategies.sparse import apply_sparse_delta

            sparse = {k: v for k, v in tensors.items() if k.endswith(_SPARSE_SUFFIXES)}
            apply_sparse_delta(net, sparse)
            masks = _sparse_masks(net)
            for n in layout.sparse:  # continued training moves the same entries as the delta's
                masks[n].fill_(False).view(-1)[sparse[n + ".sparse_indices"].to(masks[n].device)] = True
            flag = getattr(net, "visiontune_sparse_calibrated", None)
            if isinstance(flag, torch.Tensor):
                flag.fill_(True)


def load_delta(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    check_base: bool = True,
) -> dict[str, Any]:
    """Load a delta into ``model`` (same backbone + weights + strategy), in place.

    Everything is checked before anything is written: backbone, strategy name and options, class count,
    missing / unexpected keys, shapes, and hashes of the base tensors the delta does not hold. A merged LoRA
    model is unmerged, loaded and merged again. A TransferClassifier takes the delta's class names.

    Args:
        model: a TransferClassifier or a timm net with the strategy applied.
        path: a file written by :func:`save_delta`.
        strict: differing strategy options (e.g. ``dropout``) are an error; ``False`` only warns. Key and
            shape mismatches are always errors.
        check_base: verify that the base tensors equal those the delta was trained on.

    Returns:
        The delta's metadata (see :func:`delta_from_file`).

    Raises:
        DeltaError: naming the mismatching backbone, options, keys or shapes; the model is unchanged.

    Example:
        >>> import timm
        >>> from visiontune import apply_strategy
        >>> base = timm.create_model("resnet18", num_classes=3)  # the base the delta was trained on
        >>> _ = apply_strategy(base, "lora", {"rank": 4})
        >>> load_delta(base, "task.safetensors")["class_names"]  # doctest: +SKIP
        ['a', 'b', 'c']
    """
    from ..strategies.lora import lora_layers

    info = delta_info(model)
    tensors, meta = delta_from_file(path)
    layout = check_delta(info, tensors, meta, repr(str(path)), strict=strict, check_base=check_base)
    merged = [layer for layer in lora_layers(info.net).values() if layer.merged]
    for layer in merged:
        layer.unmerge()
    _write_into(info.net, tensors, layout)
    for layer in merged:
        layer.merge()
    if info.module is not None and meta.get("class_names"):
        set_class_names(info.module, list(meta["class_names"]))
    return meta


def set_class_names(module: nn.Module, names: list[str]) -> None:
    """Give a TransferClassifier the class names ``names`` (attributes and hparams), as loading a delta does."""
    module.class_names = list(names)
    module.num_classes = len(names)
    module.hparams["class_names"] = list(names)
    module.hparams["num_classes"] = len(names)

