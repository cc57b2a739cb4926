"""The datamodule owns its views (#12): a model states what it needs (models/protocols.py) and ImageDataModule
builds it; a datamodule without the interface is an error naming what it lacks, not a run without the views."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from visiontune import ImageDataModule, TransferClassifier
from visiontune.data.sources import DataError
from visiontune.errors import ConfigError
from visiontune.models.protocols import (
    FeatureServingData,
    LabelOrder,
    SemiSupervisedData,
    UnlabeledViews,
    missing_members,
)


def _dm(**kw) -> ImageDataModule:
    args = dict(train="digits", image_size=16, batch_size=4, labels_per_class=3, unlabeled="rest", hflip=False,
                num_workers=0)
    return ImageDataModule(**{**args, **kw})


class _OwnData(L.LightningDataModule):
    """A user's datamodule: labeled batches only, none of visiontune's interfaces."""

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)), batch_size=2)


def _trainer() -> L.Trainer:
    return L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)


def test_image_datamodule_offers_every_interface_and_the_model_states_its_order():
    dm = _dm()
    assert missing_members(dm, SemiSupervisedData) == [] and missing_members(dm, FeatureServingData) == []
    assert isinstance(dm, SemiSupervisedData) and isinstance(dm, FeatureServingData)
    assert isinstance(TransferClassifier("resnet18", weights=None, num_classes=3), LabelOrder)
    assert missing_members(_OwnData(), FeatureServingData) == ["eval_view", "eval_view_settings", "serve",
                                                               "loader_workers", "batch_size"]


def test_the_datamodule_builds_the_requested_views_itself():
    dm = _dm()
    dm.setup("fit")
    assert not dm.semi_supervised and isinstance(dm.train_dataloader(), DataLoader)  # nobody asked: labeled only
    assert len(dm.unlabeled_set.transforms) == 1  # the training augmentation
    size = dm.request_unlabeled_views(UnlabeledViews(ratio=2, class_names=tuple(dm.class_names)))
    assert size == len(dm.unlabeled_set) == len(dm.split["unlabeled"]) == 1797 - len(dm.val_set) - 30
    assert dm.semi_supervised and dm.unlabeled_ratio is None  # the data's own option is not rewritten
    weak, strong, true, index = next(iter(dm.train_dataloader()["unlabeled"]))
    assert weak.shape == strong.shape == (2 * 4, 3, 16, 16) and not torch.equal(weak, strong)
    assert torch.equal(true, torch.as_tensor(dm.unlabeled_set.samples.labels[index.numpy()]))
    # the request holds for every later setup (a second fit, a resume)
    dm.setup("fit")
    assert len(dm.unlabeled_set.transforms) == 2 and set(dm.train_dataloader()) == {"labeled", "unlabeled"}
    # asked before setup: setup builds them
    early = _dm()
    assert early.request_unlabeled_views(UnlabeledViews(ratio=1)) is None
    early.setup("fit")
    assert set(early.train_dataloader()) == {"labeled", "unlabeled"}


def test_the_pool_follows_the_requested_class_order_and_a_users_pair_of_views_wins():
    dm = _dm()
    dm.setup("fit")
    names, before = list(reversed(dm.class_names)), dm.unlabeled_set.samples.labels.copy()
    dm.request_unlabeled_views(UnlabeledViews(ratio=1, class_names=tuple(names)))
    pool = dm.unlabeled_set.samples
    assert pool.class_names == names and np.array_equal(pool.labels, 9 - before) and (before >= 0).all()
    own = _dm()
    pair = [lambda image: {"image": torch.zeros(3, 16, 16)}, lambda image: {"image": torch.ones(3, 16, 16)}]
    own.unlabeled_transforms = pair
    own.setup("fit")
    own.request_unlabeled_views(UnlabeledViews(ratio=1))
    weak, strong, _, _ = next(iter(own.train_dataloader()["unlabeled"]))
    assert float(weak.abs().sum()) == 0 and bool((strong == 1).all())


def test_a_request_without_a_pool_is_a_data_error():
    dm = ImageDataModule(train="digits", image_size=16, num_workers=0)
    dm.setup("fit")
    with pytest.raises(DataError, match="model.semi_supervised needs unlabeled images"):
        dm.request_unlabeled_views(UnlabeledViews())


def test_fixmatch_with_a_datamodule_lacking_the_interface_names_it():
    model = TransferClassifier("resnet18", weights=None, num_classes=3, semi_supervised={"mu": 1})
    with pytest.raises(ConfigError, match=r"the datamodule _OwnData has no request_unlabeled_views\(request\)"):
        _trainer().fit(model, _OwnData())


def test_feature_cache_with_a_datamodule_lacking_the_interface_names_it():
    model = TransferClassifier("resnet18", weights=None, num_classes=3, strategy="linear", cache_features=True)
    with pytest.raises(ValueError, match=r"_OwnData has no eval_view, eval_view_settings, serve, loader_workers"):
        _trainer().fit(model, _OwnData())


def test_serve_replaces_what_the_loader_yields_not_the_split():
    dm = ImageDataModule(train="digits", image_size=16, batch_size=8, num_workers=0, val_split=0.5)
    dm.setup("fit")
    images = dm.train_set
    view = dm.eval_view("val")
    assert len(view) == len(dm.val_set) and view.samples is dm.val_set.samples
    assert dm.eval_view_settings() == {"image_size": 16, "mean": [0.485, 0.456, 0.406],
                                       "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}
    feats = TensorDataset(torch.arange(len(images)).float()[:, None], torch.zeros(len(images), dtype=torch.long))
    dm.serve("train", feats)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1) and dm.train_set is images
    dm.serve("train", None)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 16, 16)
    assert dm.eval_view("test") is None  # no test split
