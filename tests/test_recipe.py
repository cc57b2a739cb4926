"""The fine-tuning recipe's pieces: per-strategy learning rates, the weight EMA, TrivialAugment."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from visiontune import ImageDataModule, TransferClassifier, available_strategies, build_from_delta, save_delta
from visiontune.data.sources import DataError
from visiontune.data.transforms import seed_transform, train_transform
from visiontune.errors import ConfigError
from visiontune.strategies import get_strategy


def _loader(n: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return DataLoader(TensorDataset(x, torch.arange(n) % 3), batch_size=8)


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, **kw)


# ---------------------------------------------------------------------------------------------- learning rates
VIT = {"backbone_args": {"img_size": 32}}


@pytest.mark.parametrize("strategy", sorted(set(available_strategies()) - {"qlora"}))
def test_lr_none_means_the_strategys_default(strategy):
    backbone, extra = ("vit_tiny_patch16_224", VIT) if strategy == "vpt" else ("resnet18", {})
    model = TransferClassifier(backbone, weights=None, num_classes=3, strategy=strategy, **extra)
    expected = get_strategy(strategy).config_cls.default_lr
    assert model.hparams.lr is None and model.learning_rate == expected
    groups = model.configure_optimizers()["optimizer"].param_groups
    assert {g["lr"] for g in groups} == {expected}  # no layer decay: every group at the peak LR


def test_strategy_defaults_differ_where_the_methods_do():
    lr = {s: get_strategy(s).config_cls.default_lr for s in available_strategies()}
    assert lr["linear"] >= 10 * lr["full"] and lr["lora"] > lr["full"] and lr["bitfit"] > lr["full"]
    assert lr["qlora"] == lr["lora"]  # inherited from LoRAConfig


def test_explicit_lr_wins_and_bad_lr_names_the_option():
    model = TransferClassifier("resnet18", weights=None, num_classes=3, strategy="lora", lr=0.05)
    assert model.learning_rate == 0.05
    assert {g["lr"] for g in model.configure_optimizers()["optimizer"].param_groups} == {0.05}
    for bad in (0, -1e-3, "fast"):
        with pytest.raises(ConfigError, match="model.lr must be a number > 0 or null"):
            TransferClassifier("resnet18", weights=None, num_classes=3, lr=bad)


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_evaluates_checkpoints_and_is_the_delta(tmp_path):
    """With model.ema the averaged weights evaluate (eval-mode forward), differ from the trained ones, are
    restored from a checkpoint, and are what the delta holds."""
    L.seed_everything(0)
    model = TransferClassifier("tf_efficientnet_lite0", weights="package", num_classes=3, strategy="lora",
                               ema=0.9, lr=0.05, bn="eval")  # a reproducible base: the delta rebuilds it
    trainer = _trainer(max_steps=4, max_epochs=-1)
    trainer.fit(model, _loader())
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    ema = model.evaluated_net()
    assert ema is not model.net and model.evaluated_weights_of == "ema"
    with torch.no_grad():
        evaluated, trained = model(x), model.net(x)
        assert torch.equal(evaluated, ema(x))
    assert not torch.allclose(evaluated, trained, atol=1e-4)
    assert model._ema.teacher.num_updates == 4  # once per optimizer step
    # the delta rebuilds the evaluated (EMA) model
    path = save_delta(model, tmp_path / "d.safetensors")
    rebuilt = build_from_delta(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), evaluated, atol=1e-6, rtol=0)
    # a checkpoint restores the average, not only the trained weights
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = TransferClassifier.load(str(ckpt)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), evaluated, atol=1e-6, rtol=0)


def test_ema_options_are_checked():
    with pytest.raises(ConfigError, match="model.ema must be in"):
        TransferClassifier("resnet18", weights=None, num_classes=3, ema=1.5)
    with pytest.raises(ConfigError, match="set only semi_supervised.ema"):
        TransferClassifier("resnet18", weights=None, num_classes=3, ema=0.99, semi_supervised={"ema": 0.99})
    model = TransferClassifier("resnet18", weights=None, num_classes=3)
    assert model.evaluated_net() is model.net and model.evaluated_weights_of == "model"


# ---------------------------------------------------------------------------------------------- augmentation
def test_trivial_augment_draws_one_op_per_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    plain = train_transform(32, (0.5,) * 3, (0.5,) * 3, scale=(1.0, 1.0), hflip=False)
    trivial = train_transform(32, (0.5,) * 3, (0.5,) * 3, scale=(1.0, 1.0), hflip=False, augment="trivial")
    base = plain(image=image)["image"]
    seed_transform(trivial, 0)
    outs = [trivial(image=image)["image"] for _ in range(30)]
    changed = sum(not torch.equal(o, base) for o in outs)
    assert 15 <= changed < 30  # identity is one of the 14 ops; most draws change the image
    seed_transform(trivial, 0)
    assert all(torch.equal(a, trivial(image=image)["image"]) for a in outs)  # seeded: reproducible


def test_augment_option_is_validated():
    with pytest.raises(DataError, match="augment must be one of 'none', 'trivial', got 'heavy'"):
        ImageDataModule(train="digits", augment="heavy")
    with pytest.raises(ValueError, match="augment must be one of"):
        train_transform(32, (0.5,) * 3, (0.5,) * 3, augment="heavy")


# ---------------------------------------------------------------------------------------------- the config
def test_finetune_yaml_is_the_defaults_and_no_config_follows_it():
    """configs/finetune.yaml says every value in it is also the default: check each against the classes'
    signatures, and that a CLI run with no config gets the recipe's epoch budget."""
    import inspect
    from pathlib import Path

    import yaml

    from visiontune.cli import cli_class

    path = Path(__file__).resolve().parents[1] / "configs" / "finetune.yaml"
    cfg = yaml.safe_load(path.read_text())
    for cls, section in ((TransferClassifier, "model"), (ImageDataModule, "data")):
        params = inspect.signature(cls.__init__).parameters
        for key, value in cfg[section].items():
            if (section, key) in (("model", "weights"), ("data", "train"), ("data", "image_size")):
                continue  # where the user's data and weights are, and the resolution, are the user's
            assert params[key].default == value, (section, key, params[key].default, value)
    cli = cli_class()(args=["--config", str(path), "--model.weights", "null", "--data.train", "digits"], run=False)
    assert cli.model.learning_rate == 5e-4 and cli.trainer.max_epochs == 15
    bare = cli_class()(args=["--model.weights", "null", "--data.train", "digits"], run=False)
    assert bare.trainer.max_epochs == 15 and bare.model.hparams.strategy == "full" and bare.model.hparams.bn == "eval"
