"""Fast frozen paths: compute a frozen backbone's features once, then train the head on the cache.

A linear probe runs the whole frozen backbone on every image in every epoch, yet, when the images see no
random augmentation, the backbone's output never changes. :class:`FeatureCache` computes
``net.forward_features`` once per split (train/val/test) with the deterministic eval transform, keeps
it in memory (and optionally on disk), and serves it to the training loop; the model then runs only
``net.forward_head`` (pooling, the head's dropout, the classifier), exactly the computation of the
uncached path after the backbone. For the same seed the two paths give the same head weights and
logits (the head's dropout draws from the same RNG state: extraction draws no random numbers).

Turn it on with ``TransferClassifier(..., strategy="linear", cache_features=True)`` (memory) or
``cache_features="cache_dir/"`` (memory + disk, reused across runs and processes). The module adds a
:class:`FeatureCache` callback to its trainer; nothing else changes.

What "no random augmentation" means: with the cache, training images get the eval transform (resize +
normalise). That is the uncached path with ``crop_scale=(1, 1)`` and ``hflip=False``.

Cache key: the model name, a fingerprint of every frozen tensor (names, shapes, dtypes and bytes of the
state dict without the head), the split's items (array bytes; file path, size and mtime), the transform
(image size, mean, std, interpolation) and the feature layout. Changing any of them misses the cache.

Features of CNNs with a plain global average/max pool are stored pooled (``[N, C]``, served as
``[N, C, 1, 1]``: pooling a 1×1 map is the identity), which keeps the cache small at any image size.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import Dataset

from ..models.heads import find_head

__all__ = [
    "FeatureCache",
    "FeatureDataset",
    "cache_key",
    "clear_memory_cache",
    "extract_features",
    "fingerprint_items",
    "fingerprint_weights",
    "frozen_prefix_problems",
]

_FORMAT = 1  # bump when the stored layout changes
_MEMORY: "OrderedDict[str, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
_MEMORY_MAX_ENTRIES = 8
_POOLS_IDENTITY_ON_1X1 = ("avg", "max", "avgmax", "fast", "fastavg", "fastmax", "fastavgmax")


def clear_memory_cache() -> None:
    """Forget every feature set held in memory (the disk cache is untouched)."""
    _MEMORY.clear()


# ---------------------------------------------------------------------------------------------- keys
def fingerprint_weights(net: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of every state-dict tensor outside the head.

    Args:
        net: a timm model.

    Example:
        >>> import timm
        >>> a = timm.create_model("resnet18", num_classes=2)
        >>> fingerprint_weights(a) == fingerprint_weights(a)
        True
    """
    h = hashlib.sha256()
    skip = set(find_head(net).state_names)
    for name, t in net.state_dict().items():
        if name in skip:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint_items(items: Sequence[Any]) -> str:
    """SHA-256 of a split's items: array bytes (with shape and dtype), or file path + size + mtime.

    Example:
        >>> fingerprint_items([np.zeros((2, 2, 3), np.uint8)]) != fingerprint_items([np.ones((2, 2, 3), np.uint8)])
        True
    """
    h = hashlib.sha256()
    h.update(str(len(items)).encode())
    for item in items:
        if isinstance(item, np.ndarray):
            a = np.ascontiguousarray(item)
            h.update(f"a|{a.shape}|{a.dtype}|".encode())
            h.update(a.tobytes())
        else:
            path = Path(item)
            try:
                st = path.stat()
                h.update(f"f|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
            except OSError:
                h.update(f"f|{path}|missing|".encode())
    return h.hexdigest()


def cache_key(model_name: str, weights: str, items: str, transform: dict[str, Any], pooled: bool) -> str:
    """Combine the fingerprints into one key (hex, 32 characters).

    Args:
        model_name: the timm model name.
        weights: :func:`fingerprint_weights` of the frozen model.
        items: :func:`fingerprint_items` of the split.
        transform: the eval transform's settings (image size, mean, std, interpolation).
        pooled: whether pooled features are stored.

    Example:
        >>> a = cache_key("resnet18", "w", "i", {"image_size": 32}, True)
        >>> a != cache_key("resnet18", "w", "i", {"image_size": 64}, True)
        True
    """
    blob = json.dumps({"format": _FORMAT, "model": model_name, "weights": weights, "items": items,
                       "transform": transform, "pooled": pooled}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- extraction
def frozen_prefix_problems(net: nn.Module, bn_policy: str = "frozen", image_size: int = 32) -> list[str]:
    """Why ``forward_features`` of ``net`` is not a fixed function during training (empty list: it is).

    Caching is exact only when nothing before the head trains and nothing there is random or
    stateful in train mode: no trainable parameter outside the head, no dropout / stochastic depth run
    by ``forward_features`` (found by running it once on a blank image), and BatchNorm statistics that
    do not update (``bn`` policy ``"frozen"`` or ``"eval"``). Dropout in ``forward_head`` is fine: the
    cached path runs it too.

    Args:
        net: the timm model, with its strategy applied.
        bn_policy: the module's ``bn`` policy.
        image_size: side of the blank probe image.

    Example:
        >>> import timm
        >>> net = timm.create_model("resnet18", num_classes=2)
        >>> frozen_prefix_problems(net)[0][:30]
        'parameters outside the head tr'
    """
    problems: list[str] = []
    head_params = set(find_head(net).parameter_names)
    training = [n for n, p in net.named_parameters() if p.requires_grad and n not in head_params]
    if training:
        problems.append(f"parameters outside the head train ({len(training)}, e.g. {training[0]!r}): "
                        "use strategy 'linear'")
    if bn_policy == "train":
        problems.append("bn='train' updates BatchNorm statistics of the frozen backbone: use 'frozen' or 'eval'")
    random_modules: list[str] = []

    def _hook(name: str):
        def fn(module: nn.Module, args: Any) -> None:
            random_modules.append(name)
        return fn

    handles = []
    for name, m in net.named_modules():
        p = m.p if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "drop_prob", None)
        if p:
            handles.append(m.register_forward_pre_hook(_hook(f"{name} ({type(m).__name__}, p={p})")))
    if handles:
        modes = {m: m.training for m in net.modules()}
        net.eval()
        try:
            with torch.no_grad():
                device = next(net.parameters()).device
                net.forward_features(torch.zeros(1, 3, image_size, image_size, device=device))
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
    if random_modules:
        problems.append(f"{random_modules[0]} is random in training: set drop_path_rate=0 / no backbone dropout")
    return problems


def _can_pool(net: nn.Module) -> bool:
    pool = getattr(net, "global_pool", None)
    pool_type = str(getattr(pool, "pool_type", "")).lower()
    return type(pool).__name__ == "SelectAdaptivePool2d" and pool_type in _POOLS_IDENTITY_ON_1X1


@torch.no_grad()
def extract_features(
    net: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    pooled: bool | None = None,
    device: torch.device | str | None = None,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Run ``net.forward_features`` (eval mode, no grad) over a ``(image, label)`` dataset.

    Draws no random numbers from the global generators (the loader gets its own), so a training run
    continues from the same RNG state as without the cache.

    Args:
        net: the timm model (its modes are restored afterwards).
        dataset: yields ``(image tensor, label)`` with a deterministic transform.
        batch_size: extraction batch size.
        pooled: store globally pooled features; ``None`` = when the model's pool allows it exactly.
        device: where to run; ``None`` = the model's device. Features are returned on the CPU.
        num_workers: loader workers.

    Returns:
        ``(features, labels, pooled)``.

    Example:
        >>> feats, labels, pooled = extract_features(net, dm.val_set)  # doctest: +SKIP
    """
    if pooled is None:
        pooled = _can_pool(net)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    modes = {m: m.training for m in net.modules()}
    net.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(0))
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in loader:
            x, y = batch[0], batch[-1]
            f = net.forward_features(x.to(device))
            if pooled:
                f = net.global_pool(f).flatten(1)
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not feats:
        return torch.empty(0), torch.empty(0, dtype=torch.long), pooled
    return torch.cat(feats), torch.cat(labels).long(), pooled


class FeatureDataset(Dataset):
    """Cached features and labels; yields ``(features, label)`` like an image dataset yields images.

    Pooled features ``[C]`` are served as ``[C, 1, 1]`` so that ``forward_head`` pools them exactly.

    Args:
        features: ``[N, ...]`` tensor.
        labels: ``[N]`` integer labels.
        samples: the image split's samples (kept for reporting: ``describe``, class names).
        pooled: whether ``features`` are pooled ``[N, C]``.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, samples: Any = None, pooled: bool = False) -> None:
        self.features = features[:, :, None, None] if pooled else features
        self.labels = labels
        self.samples = samples

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.features[i], int(self.labels[i])


# ---------------------------------------------------------------------------------------------- callback
class FeatureCache(Callback):
    """Serve cached backbone features to a linear probe during ``fit`` (see the module docs).

    Added automatically by ``TransferClassifier(cache_features=...)``; usable directly with any
    LightningModule that has a timm model in ``.net`` and a ``features_input`` flag.

    Args:
        store: ``True`` = memory only; a directory = memory + ``<dir>/<key>.safetensors`` files.
        batch_size: extraction batch size; ``None`` = the datamodule's (training) batch size, so the same
            convolution kernels run as without the cache (results then match to the last bit or nearly).
        splits: which of the datamodule's datasets to replace.

    Attributes:
        hits, misses: cache look-ups per split during the last ``fit`` (``{"train": "memory", ...}``).

    Example:
        >>> model = TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="linear",
        ...                            cache_features=True)  # doctest: +SKIP
        >>> L.Trainer(max_epochs=10).fit(model, ImageDataModule(train="digits", image_size=64))  # doctest: +SKIP
    """

    def __init__(
        self,
        store: Union[bool, str, os.PathLike] = True,
        batch_size: Optional[int] = None,
        splits: Sequence[str] = ("train", "val", "test"),
    ) -> None:
        self.directory = None if isinstance(store, bool) else Path(store)
        self.batch_size = batch_size
        self.splits = tuple(splits)
        self.hits: dict[str, str] = {}
        self.misses: list[str] = []
        self._served: list[str] = []  # the splits whose features the datamodule serves

    def _load_or_extract(self, net: nn.Module, model_name: str, weights_fp: str, role: str, view: Any,
                         transform_cfg: dict, batch_size: int, workers: int) -> FeatureDataset:
        """The features of ``view`` (the split under the eval transform, built by the datamodule)."""
        pooled = _can_pool(net)
        key = cache_key(model_name, weights_fp, fingerprint_items(view.samples.items), transform_cfg, pooled)
        entry = _MEMORY.get(key)
        if entry is not None:
            _MEMORY.move_to_end(key)
            self.hits[role] = "memory"
        elif self.directory is not None and (self.directory / f"{key}.safetensors").is_file():
            from safetensors.torch import load_file

            data = load_file(str(self.directory / f"{key}.safetensors"))
            entry = (data["features"], data["labels"])
            self.hits[role] = "disk"
        else:
            feats, labels, pooled = extract_features(net, view, batch_size=batch_size, pooled=pooled,
                                                     num_workers=workers)
            entry = (feats, labels)
            self.misses.append(role)
            if self.directory is not None:
                from ..io import atomic_save_safetensors

                atomic_save_safetensors({"features": feats, "labels": labels},
                                        self.directory / f"{key}.safetensors",
                                        {"model": model_name, "split": role, "pooled": str(pooled)})
        _MEMORY[key] = entry
        while len(_MEMORY) > _MEMORY_MAX_ENTRIES:
            _MEMORY.popitem(last=False)
        return FeatureDataset(entry[0], entry[1], view.samples, pooled)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Runs after the datamodule's setup and before the train loader is first built (Lightning builds
        # it to estimate the scheduler's steps, then keeps it): the datasets must be swapped here.
        if stage != "fit":
            return
        from ..models.protocols import FeatureServingData, missing_members

        dm = trainer.datamodule
        if getattr(pl_module, "net", None) is None and hasattr(pl_module, "setup"):
            pl_module.setup(stage)  # build the model from the data's classes (idempotent)
        net = getattr(pl_module, "net", None)
        missing = missing_members(dm, FeatureServingData) if dm is not None else []
        if dm is None or missing or net is None:
            why = f": the datamodule {type(dm).__name__} has no {', '.join(missing)} " \
                  "(visiontune.models.protocols.FeatureServingData)" if missing else ""
            raise ValueError(f"model.cache_features needs an ImageDataModule (data=...) and a TransferClassifier{why}")
        transform_cfg = dm.eval_view_settings()
        size = transform_cfg["image_size"]
        problems = frozen_prefix_problems(net, getattr(pl_module.hparams, "bn", "frozen"), size)
        if problems:
            raise ValueError("model.cache_features: the backbone is not a fixed function here: " + "; ".join(problems))
        model_name = str(getattr(pl_module.hparams, "backbone", type(net).__name__))
        weights_fp = fingerprint_weights(net)
        batch_size = self.batch_size or dm.batch_size  # the training batch size: the same conv kernels run
        pl_module.to(trainer.strategy.root_device)  # extract where training runs (the strategy moves it anyway)
        self.hits, self.misses, self._served = {}, [], []
        for role in self.splits:
            view = dm.eval_view(role)  # the datamodule builds the deterministic view; it serves what we hand back
            if view is None:
                continue
            self._served.append(role)
            dm.serve(role, self._load_or_extract(net, model_name, weights_fp, role, view, transform_cfg, batch_size,
                                                 dm.loader_workers()))
        pl_module.features_input = True

    def _restore(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        for role in self._served:
            dm.serve(role, None)  # the images again
        self._served = []
        pl_module.features_input = False

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore(trainer, pl_module)
