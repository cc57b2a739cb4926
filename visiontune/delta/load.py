"""Loading a task delta into a model: :func:`check_delta` names everything in a delta that does not fit the
model (backbone, strategy options, class count, keys, shapes, the base tensors), :func:`load_delta` checks and
then writes it in place. The file format, saving and reading are in :mod:`visiontune.delta.format`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from ..strategies.base import strategy_name
from .format import (
    SPARSE_SUFFIXES,
    DeltaError,
    DeltaInfo,
    DeltaLayout,
    applied_strategy,
    base_tensor_hashes,
    delta_from_file,
    delta_info,
    delta_layout,
    jsonable,
    merged_base_weights,
    set_class_names,
)

__all__ = ["check_delta", "load_delta"]


def _config_diff(saved: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    saved = {**defaults, **saved}  # an option added after the delta was saved had its default then
    keys = sorted(set(saved) | set(current))
    return [f"{k} (delta {saved.get(k, '<unset>')!r}, model {current.get(k, '<unset>')!r})"
            for k in keys if saved.get(k, "<unset>") != current.get(k, "<unset>")]


def _shown(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _check_strategy(info: DeltaInfo, meta: Mapping[str, Any], source: str, *, strict: bool) -> None:
    """Backbone, strategy name and options (``strict``: differing options are an error, else a warning)."""
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
        diff = _config_diff(meta.get("strategy_config") or {}, jsonable(cfg.to_dict()),
                            jsonable(type(cfg)().to_dict()))
        if diff:
            msg = f"strategy options of {name!r} differ: {_shown(diff)}"
            if strict:
                problems.append(msg)
            else:
                warnings.warn(f"{source}: {msg}", stacklevel=4)
    if problems:  # the rest would only repeat these in terms of keys
        raise DeltaError(f"{source} does not fit the model: " + "; ".join(problems))


def _check_tensors(net: nn.Module, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], source: str,
                   *, allow_head_mismatch: bool) -> DeltaLayout:
    """Class count, missing / unexpected keys and shapes; the layout of the tensors to write."""
    problems: list[str] = []
    layout = delta_layout(net, meta.get("bn") or "frozen")
    expected = layout.keys()
    params = dict(net.named_parameters())
    head_ok = allow_head_mismatch
    for n in layout.outputs:  # the output layers' rows are the classes; the rest of the head has fixed shapes
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
        if s is not None and k in tensors and tensors[k].shape != s and not (head_ok and k in layout.outputs)
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
    return layout


def _check_base(net: nn.Module, layout: DeltaLayout, meta: Mapping[str, Any], source: str,
                base_hashes: Mapping[str, str] | None) -> None:
    """The model's base tensors (those the delta does not hold) against the hashes the delta recorded."""
    expected = layout.keys()
    saved = meta.get("base_hashes") or {}
    if saved:
        mine = base_hashes if base_hashes is not None else base_tensor_hashes(net, {*expected, *layout.sparse})
        differ = [k for k in saved if k in mine and mine[k] != saved[k]]
        names = net.state_dict(keep_vars=True)  # an alias of a tensor hashed (or held) under another name is fine
        absent = [k for k in saved if k not in names and k not in merged_base_weights(net)]
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


def check_delta(info: DeltaInfo, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], source: str, *,
                strict: bool, check_base: bool, allow_head_mismatch: bool = False,
                base_hashes: Mapping[str, str] | None = None) -> DeltaLayout:
    """Raise a :class:`DeltaError` naming everything in the delta that does not fit ``info.net``; else return
    the layout of the tensors to write into it. ``tensors``, ``meta``: from :func:`delta_from_file`.

    ``allow_head_mismatch``: another class count is fine (a TaskBank gives every task its own head), only
    the head's input size must match. ``base_hashes``: precomputed hashes of the base (TaskBank).
    """
    _check_strategy(info, meta, source, strict=strict)
    layout = _check_tensors(info.net, tensors, meta, source, allow_head_mismatch=allow_head_mismatch)
    if check_base:
        _check_base(info.net, layout, meta, source, base_hashes)
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
            from ..strategies.sparse import apply_sparse_delta, sparse_masks, write_flat

            sparse = {k: v for k, v in tensors.items() if k.endswith(SPARSE_SUFFIXES)}
            apply_sparse_delta(net, sparse)
            masks = sparse_masks(net)
            for n in layout.sparse:  # continued training moves the same entries as the delta's
                write_flat(masks[n].fill_(False), sparse[n + ".sparse_indices"], True)
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
    from ..strategies.ssf import merge_ssf, unmerge_ssf

    info = delta_info(model)
    tensors, meta = delta_from_file(path)
    layout = check_delta(info, tensors, meta, repr(str(path)), strict=strict, check_base=check_base)
    merged = [layer for layer in lora_layers(info.net).values() if layer.merged]
    for layer in merged:
        layer.unmerge()
    ssf_folded = unmerge_ssf(info.net)
    _write_into(info.net, tensors, layout)
    for layer in merged:
        layer.merge()
    if ssf_folded:
        merge_ssf(info.net)
    if info.module is not None and meta.get("class_names"):
        set_class_names(info.module, list(meta["class_names"]))
    return meta
