"""LP-FT (the head started from a linear probe) and flip test-time augmentation."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from visiontune import ImageDataModule, TransferClassifier
from visiontune.errors import ConfigError
from visiontune.models.heads import find_head, output_inputs
from visiontune.training.head_init import probe_head

BACKBONE = "test_efficientnet"  # timm's tiny test network


def _data(**kw) -> ImageDataModule:
    return ImageDataModule(train="digits", image_size=32, batch_size=16, labels_per_class=6, val_split=0.0,
                           num_workers=0, hflip=False, **kw)


def _probe(net: torch.nn.Module, dataset) -> tuple[LogisticRegression, np.ndarray]:
    """scikit-learn's regression on what the head reads, and those features."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = np.asarray([int(dataset[i][1]) for i in range(len(dataset))])
    feats = output_inputs(net, find_head(net), images, 64)[0][0].double().numpy()
    return LogisticRegression(C=1.0, max_iter=2000).fit(feats, labels), feats


def test_probe_head_is_the_logistic_regression_on_the_features_the_head_reads():
    torch.manual_seed(0)
    model = TransferClassifier(BACKBONE, weights=None, num_classes=10)
    dm = _data()
    dm.use_data_config(model.data_config)
    dm.setup("fit")
    view = dm.eval_view("train")
    clf, feats = _probe(model.net, view)
    assert probe_head(model.net, view) is None
    layer = find_head(model.net).output_layers[0]
    np.testing.assert_allclose(layer.weight.detach().double().numpy(), clf.coef_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.bias.detach().double().numpy(), clf.intercept_, rtol=1e-5, atol=1e-6)
    # the model now predicts what the regression predicts
    model.eval()
    with torch.no_grad():
        pred = model(torch.stack([view[i][0] for i in range(len(view))])).argmax(1).numpy()
    assert (pred == clf.predict(feats)).all()


def test_classes_without_images_get_zero_rows_and_the_lowest_bias():
    net = torch.nn.Sequential()  # a timm model is needed for find_head: use a tiny one with 4 classes
    import timm

    torch.manual_seed(0)
    net = timm.create_model(BACKBONE, num_classes=4)
    data = [(torch.randn(3, 32, 32) + 2 * (i % 2), i % 2) for i in range(12)]  # classes 0 and 1 only
    assert probe_head(net, data) is None
    layer = find_head(net).output_layers[0]
    assert torch.count_nonzero(layer.weight[2:]) == 0
    assert float(layer.bias[2:].max()) < float(layer.bias[:2].min())
    assert probe_head(net, [(torch.zeros(3, 32, 32), 1)] * 3) == "the training images hold fewer than two classes"


class _HeadAtStart(L.Callback):
    """The head's weight when training starts, and the probe solution of the network as it is then."""

    def on_train_start(self, trainer, pl_module):
        self.weight = find_head(pl_module.net).output_layers[0].weight.detach().double().numpy().copy()
        self.coef = _probe(pl_module.net, trainer.datamodule.eval_view("train"))[0].coef_


def _fit(model: TransferClassifier, **kw) -> _HeadAtStart:
    seen = _HeadAtStart()
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, callbacks=[seen], **kw).fit(model, _data())
    return seen


def test_fit_with_head_init_probe_starts_from_the_probe_and_random_does_not():
    torch.manual_seed(0)
    seen = _fit(TransferClassifier(BACKBONE, weights=None, head_init="probe"))
    np.testing.assert_allclose(seen.weight, seen.coef, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    plain = _fit(TransferClassifier(BACKBONE, weights=None))
    assert not np.allclose(plain.weight, plain.coef, atol=1e-3)


def test_tta_hflip_averages_the_logits_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = TransferClassifier(BACKBONE, weights=None, num_classes=3, tta="hflip").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = (model.net(x) + model.net(x.flip(3))) / 2
        torch.testing.assert_close(model(x), expected)
        assert not torch.allclose(model(x), model.net(x))
    model.train()
    torch.testing.assert_close(model.net(x), model(x))  # training: one forward


@pytest.mark.parametrize("option, value, words", [("head_init", "linear", "model.head_init"),
                                                  ("tta", "flip", "model.tta")])
def test_bad_head_init_and_tta_name_the_option(option, value, words):
    with pytest.raises(ConfigError, match=f"{words}.*{value}"):
        TransferClassifier(BACKBONE, weights=None, num_classes=3, **{option: value})


def test_the_probe_never_overwrites_a_trained_head():
    from types import SimpleNamespace

    from visiontune.training.fit_start import init_head_from_probe

    dm = _data()
    dm.setup("fit")

    def module(ckpt_path=None, **hp):
        trainer = SimpleNamespace(ckpt_path=ckpt_path, datamodule=dm, is_global_zero=True)
        return SimpleNamespace(hparams={"head_init": "probe", **hp}, trainer=trainer, net=None)

    # each would raise (net=None) if it tried to fit the head
    assert not init_head_from_probe(module(ckpt_path="last.ckpt"))  # resuming
    assert not init_head_from_probe(module(init_from="base.ckpt"))  # a base model's head
    assert not init_head_from_probe(module(class_expansion={"distill": 1.0}))
    assert not init_head_from_probe(module(head_init="random"))
