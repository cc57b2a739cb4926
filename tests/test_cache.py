"""Feature cache for frozen backbones: same results as the uncached path, and correct invalidation."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from visiontune import ImageDataModule, TransferClassifier
from visiontune.training.cache import (
    FeatureCache,
    cache_key,
    clear_memory_cache,
    fingerprint_items,
    fingerprint_weights,
    frozen_prefix_problems,
)


def _arrays(n: int = 36, classes: int = 3, side: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 255, (n, side, side, 3), dtype=np.uint8)
    images[..., 0] = (labels[:, None, None] * 90).astype(np.uint8)  # learnable signal
    return images, labels


def _data(images=None, labels=None, image_size: int = 32, **kw) -> ImageDataModule:
    if images is None:
        images, labels = _arrays()
    return ImageDataModule(train=(images, labels), image_size=image_size, batch_size=8, val_split=0.25,
                           crop_scale=(1.0, 1.0), hflip=False, num_workers=0, seed=0, **kw)


def _model(cache) -> TransferClassifier:
    # tf_efficientnet_lite0 applies dropout (drop_rate) inside forward_head: the cached path must too
    return TransferClassifier("tf_efficientnet_lite0", weights=None, num_classes=3, strategy="linear",
                              lr=0.01, cache_features=cache, backbone_args={"drop_rate": 0.3})


def _fit(model: TransferClassifier, dm: ImageDataModule, epochs: int = 2) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True)
    trainer.fit(model, dm)
    return trainer


def _cache_of(trainer: L.Trainer) -> FeatureCache:
    return next(c for c in trainer.callbacks if isinstance(c, FeatureCache))


def test_cached_equals_uncached():
    clear_memory_cache()
    results = {}
    for cache in (False, True):
        L.seed_everything(7)
        model = _model(cache)
        trainer = _fit(model, _data())
        assert not model.features_input  # switched off after fit: the model takes images again
        x = torch.stack([trainer.datamodule.val_set[i][0] for i in range(6)])
        model.eval()
        with torch.no_grad():
            logits = model(x)
        head = model.net.get_classifier()
        results[cache] = (head.weight.detach().clone(), head.bias.detach().clone(), logits,
                          trainer.callback_metrics["val_acc"].item())
    for a, b in zip(results[False][:3], results[True][:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert results[False][3] == results[True][3]


def test_cache_hits_and_invalidation(tmp_path):
    clear_memory_cache()
    store = tmp_path / "features"
    dm = _data()
    L.seed_everything(0)
    t = _fit(_model(str(store)), dm, epochs=1)
    assert sorted(_cache_of(t).misses) == ["train", "val"]
    assert len(list(store.glob("*.safetensors"))) == 2

    # same weights (same seed), same data: memory hit; after clearing memory: disk hit
    L.seed_everything(0)
    t = _fit(_model(str(store)), _data(), epochs=1)
    assert _cache_of(t).hits == {"train": "memory", "val": "memory"} and not _cache_of(t).misses
    clear_memory_cache()
    L.seed_everything(0)
    t = _fit(_model(str(store)), _data(), epochs=1)
    assert _cache_of(t).hits == {"train": "disk", "val": "disk"}

    # different backbone weights, image size, normalisation or images: misses
    L.seed_everything(1)
    t = _fit(_model(str(store)), _data(), epochs=1)
    assert sorted(_cache_of(t).misses) == ["train", "val"]
    L.seed_everything(0)
    t = _fit(_model(str(store)), _data(image_size=40), epochs=1)
    assert sorted(_cache_of(t).misses) == ["train", "val"]
    L.seed_everything(0)
    t = _fit(_model(str(store)), _data(mean=(0.4, 0.4, 0.4)), epochs=1)
    assert sorted(_cache_of(t).misses) == ["train", "val"]
    images, labels = _arrays()
    images[0, 0, 0, 1] ^= 1
    L.seed_everything(0)
    t = _fit(_model(str(store)), _data(images, labels), epochs=1)
    assert "train" in _cache_of(t).misses or "val" in _cache_of(t).misses


def test_fingerprints_change_with_weights():
    model = _model(False)
    before = fingerprint_weights(model.net)
    head = model.net.get_classifier()
    with torch.no_grad():
        head.weight.add_(1.0)  # the head is not part of the frozen prefix
    assert fingerprint_weights(model.net) == before
    with torch.no_grad():
        model.net.conv_stem.weight[0, 0, 0, 0] += 1e-3
    after_weight = fingerprint_weights(model.net)
    assert after_weight != before
    with torch.no_grad():
        model.net.bn1.running_mean[0] += 1.0  # buffers count too: on their own, from the last fingerprint
    assert fingerprint_weights(model.net) not in (before, after_weight)
    a = [np.zeros((4, 4, 3), np.uint8)]
    assert fingerprint_items(a) == fingerprint_items([np.zeros((4, 4, 3), np.uint8)])
    assert cache_key("m", "w", "i", {"image_size": 32}, True) != cache_key("m", "w", "i", {"image_size": 32}, False)


def test_only_for_fixed_backbones():
    with pytest.raises(ValueError, match="model.cache_features"):
        TransferClassifier("resnet18", weights=None, num_classes=3, strategy="bitfit", cache_features=True)
    with pytest.raises(ValueError, match="model.cache_features"):
        TransferClassifier("resnet18", weights=None, num_classes=3, strategy="linear", bn="train",
                           cache_features=True)
    model = TransferClassifier("tf_efficientnet_lite0", weights=None, num_classes=3, strategy="linear",
                               drop_path_rate=0.2)
    problems = frozen_prefix_problems(model.net)
    assert problems and "DropPath" in problems[0]
    assert frozen_prefix_problems(_model(False).net) == []  # head dropout is fine


def test_channels_last_option_same_function():
    torch.manual_seed(0)
    fast = TransferClassifier("tf_efficientnet_lite0", weights=None, num_classes=3, strategy="lora",
                              channels_last=True)
    plain = TransferClassifier("tf_efficientnet_lite0", weights=None, num_classes=3, strategy="lora",
                               channels_last=False)
    plain.load_state_dict(fast.state_dict())
    assert fast.net.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.net.conv_stem.weight.is_contiguous()
    x = torch.randn(2, 3, 32, 32)
    fast.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
