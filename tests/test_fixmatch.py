"""FixMatch and class expansion inside TransferClassifier: wiring (fast) and real offline runs (slow)."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from visiontune import ImageDataModule, TransferClassifier  # noqa: E402
from visiontune.objectives.classes import ClassExpansionConfig, new_accuracy_at, split_accuracy  # noqa: E402
from visiontune.data.sources import DataError, digits, stratified_split  # noqa: E402
from visiontune.objectives.fixmatch import FixMatchState, anchor_old_classes, as_fixmatch_config, confident_old  # noqa: E402
from visiontune.objectives.semisup import FixMatchConfig  # noqa: E402

FULL_STATE = dict(threshold=0.6, mu=2, ema=0.9, distribution_alignment=True, class_thresholds="flexmatch")


@pytest.fixture(scope="module")
def digit_arrays():
    s = digits()
    return np.stack(s.items), s.labels


def _arrays(x, y, idx, classes):
    idx = np.asarray([i for i in idx if y[i] in classes])
    return x[idx], np.searchsorted(classes, y[idx]), [str(c) for c in classes]


def _trainer(steps: int, tmp_path: Path | None = None, **kw) -> L.Trainer:
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=10**6,
                     default_root_dir=tmp_path, **kw)


def _small_fixmatch(**cfg) -> tuple[TransferClassifier, ImageDataModule]:
    model = TransferClassifier("tf_efficientnet_lite0", weights=None, strategy="full",
                               semi_supervised=FixMatchConfig(**{**FULL_STATE, **cfg}))
    dm = ImageDataModule(train="digits", image_size=32, batch_size=4, labels_per_class=2, unlabeled="rest",
                         hflip=False, num_workers=0, seed=0)
    return model, dm


# ---------------------------------------------------------------------------------------------- wiring
def test_config_is_plain_in_hparams_and_accepts_a_dict():
    model = TransferClassifier("tf_efficientnet_lite0", weights=None, num_classes=3,
                               semi_supervised=FixMatchConfig(threshold=0.9, mu=2))
    assert model.hparams.semi_supervised == {**model.hparams.semi_supervised, "threshold": 0.9, "mu": 2}
    assert isinstance(model.hparams.semi_supervised, dict)
    again = TransferClassifier("tf_efficientnet_lite0", weights=None, num_classes=3,
                               semi_supervised=dict(model.hparams.semi_supervised))
    assert again._fixmatch.cfg == FixMatchConfig(threshold=0.9, mu=2)
    with pytest.raises(ValueError, match="treshold"):
        as_fixmatch_config({"treshold": 0.9})
    with pytest.raises(ValueError, match="class_expansion needs model.init_from"):
        TransferClassifier("tf_efficientnet_lite0", weights=None, class_expansion={"distill": 1.0})


def test_unlabeled_loader_is_seeded_and_returns_true_label_and_index():
    def first_batch(seed: int):
        model, dm = _small_fixmatch()
        dm.seed = seed
        dm.setup("fit")
        model._build(10, None)
        model._fixmatch.setup(model, dm)
        loaders = dm.train_dataloader()
        assert set(loaders) == {"labeled", "unlabeled"}
        return next(iter(loaders["unlabeled"])), dm

    (w1, s1, y1, i1), dm = first_batch(0)
    (w2, s2, y2, i2), _ = first_batch(0)
    (w3, s3, _, i3), _ = first_batch(1)
    assert w1.shape == s1.shape == (4 * 2, 3, 32, 32)  # mu * batch_size
    assert torch.equal(w1, w2) and torch.equal(s1, s2) and torch.equal(i1, i2)
    assert not torch.equal(i1, i3) or not torch.equal(s1, s3)
    assert not torch.equal(w1, s1)  # two different views
    pool = dm.unlabeled_set.samples
    assert torch.equal(y1, torch.as_tensor(pool.labels[i1.numpy()]))  # 'rest' keeps the true labels
    assert (y1 >= 0).all() and int(i1.max()) < len(pool)


def test_weak_branch_runs_without_graph_and_all_keys_are_logged():
    model, dm = _small_fixmatch(ema=None)
    seen: list[tuple[int, bool]] = []
    trainer = _trainer(2, log_every_n_steps=1)

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.net.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[0], torch.is_grad_enabled())))

    trainer.callbacks.append(Spy())
    trainer.fit(model, dm)
    weak = [g for n, g in seen if n == 4 * 2]  # the weak batch alone (mu * B)
    together = [g for n, g in seen if n == 4 + 4 * 2]  # labeled + strong, one forward ("concat")
    assert weak and not any(weak), "the weak branch must run under no_grad"
    assert together and all(together)
    keys = set(trainer.callback_metrics)
    assert {"train_loss", "train_sup_loss", "train_unsup_loss", "train_mask_rate", "train_pseudo_acc_all"} <= keys


def test_checkpoint_round_trip_of_fixmatch_state(tmp_path):
    model, dm = _small_fixmatch()
    trainer = _trainer(3, tmp_path)
    trainer.fit(model, dm)
    fm = model._fixmatch
    assert fm.teacher is not None and fm.da is not None and fm.flex is not None
    path = tmp_path / "fm.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # plain tensors and numbers only
    assert isinstance(ckpt["hyper_parameters"]["semi_supervised"], dict)
    assert ckpt["visiontune_fixmatch"]["teacher"]["num_updates"] == 3

    loaded = TransferClassifier.load(str(path))
    loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.cpu()(x))  # evaluation = the restored EMA teacher
    lf = loaded._fixmatch
    lf.pool_size = fm.pool_size
    lf._ensure(loaded)
    assert torch.equal(lf.da.mean.cpu(), fm.da.mean.cpu()) and lf.da.steps == fm.da.steps
    assert torch.equal(lf.flex.selected.cpu(), fm.flex.selected.cpu())
    for (k, a), (_, b) in zip(lf.teacher.module.state_dict().items(), fm.teacher.module.state_dict().items()):
        assert torch.equal(a.cpu(), b.cpu()), k

    # resuming fit restores the state before the first resumed step
    restored = {}

    class Check(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not restored:
                f = pl_module._fixmatch
                f._ensure(pl_module)
                restored["da"] = f.da.mean.clone()
                restored["updates"] = f.teacher.num_updates

    model2, dm2 = _small_fixmatch()
    _trainer(4, tmp_path, callbacks=[Check()]).fit(model2, dm2, ckpt_path=str(path))
    assert torch.equal(restored["da"].cpu(), fm.da.mean.cpu()) and restored["updates"] == 3


def test_anchor_old_classes_keeps_confident_old_predictions():
    weak = torch.tensor([[0.0, 0.0, 9.0], [0.0, 0.0, 9.0], [5.0, 0.0, 0.0]])
    old = torch.tensor([[0.0, 9.0], [0.2, 0.0], [0.0, 0.0]])
    out = anchor_old_classes(weak, old, threshold=0.9)
    assert out.argmax(1).tolist() == [1, 2, 0]
    assert torch.equal(out[1:], weak[1:])


# ---------------------------------------------------------------------------------------------- class expansion
@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory, digit_arrays):
    """A model trained (briefly) on digits 0-7: the checkpoint to add 8 and 9 to."""
    x, y = digit_arrays
    keep, test = stratified_split(y, 0.3, 123)
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="full", bn="train", lr=1e-3,
                               label_smoothing=0.0, warmup_steps=0)
    dm = ImageDataModule(train=_arrays(x, y, keep, list(range(8))), val=_arrays(x, y, test, list(range(8))),
                         image_size=32, batch_size=32, hflip=False, num_workers=0)
    trainer = _trainer(int(os.environ.get("VT_BASE_STEPS", 80)))
    trainer.fit(model, dm)
    base = trainer.validate(model, dm, verbose=False)[0]["val_acc"]
    path = tmp_path_factory.mktemp("old") / "digits0-7.ckpt"
    trainer.save_checkpoint(path)
    return path, keep, test, base


def _expansion_data(x, y, keep, test, seed=0, k=5, pool=True):
    rng = np.random.default_rng(seed)
    lab = np.concatenate([rng.choice([i for i in keep if y[i] == c], k, replace=False) for c in (8, 9)])
    rest = np.setdiff1d(keep, lab)
    unlabeled = (x[rest], y[rest], [str(i) for i in range(10)]) if pool else None
    return ImageDataModule(train=_arrays(x, y, lab, [8, 9]), val=_arrays(x, y, test, list(range(10))),
                           unlabeled=unlabeled, image_size=32, batch_size=2 * k, hflip=False, num_workers=0,
                           val_split=0, seed=seed)


@pytest.mark.slow
def test_expansion_grows_head_keeps_old_rows_and_reports_split(old_checkpoint, digit_arrays):
    path, keep, test, _ = old_checkpoint
    x, y = digit_arrays
    model = TransferClassifier("tf_efficientnet_lite0", weights=None, strategy="full", bn="eval", lr=1e-4,
                               init_from=str(path), class_expansion={"distill": 1.0, "freeze_old_rows": True})
    dm = _expansion_data(x, y, keep, test, pool=False)
    trainer = _trainer(2)
    trainer.fit(model, dm)
    assert model.class_names == [str(i) for i in range(10)]
    old = torch.load(path, weights_only=True)["state_dict"]
    head = model.net.get_classifier()
    assert torch.equal(head.weight[:8].detach().cpu(), old["net.classifier.weight"])  # frozen rows: bit-identical
    assert torch.equal(head.bias[:8].detach().cpu(), old["net.classifier.bias"])
    assert dm.val_set.samples.class_names == model.class_names  # val aligned to old + new
    assert "train_distill_loss" in trainer.callback_metrics
    metrics = trainer.validate(model, dm, verbose=False)[0]
    assert {"val_acc", "val_acc_old", "val_acc_new"} <= set(metrics)


@pytest.mark.slow
def test_expansion_refuses_bad_input_before_training(old_checkpoint, digit_arrays, tmp_path):
    path, keep, test, _ = old_checkpoint
    x, y = digit_arrays

    def fit(dm):
        model = TransferClassifier("tf_efficientnet_lite0", weights=None, strategy="full", init_from=str(path),
                                   semi_supervised={"mu": 1})
        _trainer(1).fit(model, dm)

    lab = [i for i in keep if y[i] == 8][:3]
    clash = ImageDataModule(train=(x[lab], np.zeros(3, int), ["7 "]), val=_arrays(x, y, test, list(range(8))),
                            unlabeled=(x[lab], None), image_size=32, hflip=False, num_workers=0, val_split=0)
    with pytest.raises(DataError, match="clashes with the old class '7'"):
        fit(clash)
    # a new class with no labeled image
    empty = ImageDataModule(train=(x[lab], np.zeros(3, int), ["8", "9"]), val=_arrays(x, y, test, list(range(8))),
                            unlabeled=(x[lab], None), image_size=32, hflip=False, num_workers=0, val_split=0)
    with pytest.raises(DataError, match="'9' has no"):
        fit(empty)
    # an unlabeled folder whose files cannot be read
    bad = tmp_path / "unlabeled"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"not a jpeg")
    unreadable = ImageDataModule(train=(x[lab], np.zeros(3, int), ["8"]), val=_arrays(x, y, test, list(range(9))),
                                 unlabeled=str(bad), image_size=32, hflip=False, num_workers=0, val_split=0)
    with pytest.raises(DataError, match="unlabeled"):
        fit(unreadable)


@pytest.mark.slow
@pytest.mark.parametrize("replay", [True, False])
def test_replay_puts_pool_images_of_known_class_into_the_supervised_batch(old_checkpoint, digit_arrays, replay):
    path, keep, test, _ = old_checkpoint
    x, y = digit_arrays
    L.seed_everything(0)
    model = TransferClassifier("tf_efficientnet_lite0", weights=None, strategy="full", lr=1e-4, init_from=str(path),
                               class_expansion=ClassExpansionConfig(replay=replay),
                               semi_supervised=FixMatchConfig(threshold=0.9, mu=2))
    dm = _expansion_data(x, y, keep, test, k=3)
    expected, seen = [], []

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.net.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[0], torch.is_grad_enabled())))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            x_w, index = batch["unlabeled"][0], batch["unlabeled"][3]
            exp = pl_module._expansion
            # known class: the old model is sure (anchor_threshold, not FixMatch's), or labelled new at setup
            mask, _ = confident_old(exp.old_logits(x_w), exp.cfg.anchor_threshold)
            pool = exp.pool_labels_for(index)
            if pool is not None:
                mask = mask | (pool >= 0)
            expected.append(len(batch["labeled"][1]) + int(mask.sum()) * replay + len(x_w))

    trainer = _trainer(3, log_every_n_steps=1)
    trainer.callbacks.append(Spy())
    trainer.fit(model, dm)
    with_grad = [n for n, g in seen if g]
    assert with_grad == expected  # labeled + replayed + strong, in one forward with gradients
    assert any(e > 6 + 12 for e in expected) == replay  # some pool images were confident, and replayed
    assert ("train_replay" in trainer.callback_metrics) == replay
    # label_pool: the pool images that look new were labelled once at setup, mostly right
    table = model._expansion.pool_labels
    truth = torch.as_tensor(dm.unlabeled_set.samples.labels)
    labelled = table >= 0
    precision = float((table[labelled] == truth[labelled]).float().mean())
    print(f"pool labels: {int(labelled.sum())} of {len(table)}, precision {precision:.2f}")
    assert table.shape == (len(dm.unlabeled_set),)
    assert bool((table[labelled] >= model._expansion.num_old).all())  # new classes only
    # digits: few look new to the calibrated head (measured 0-2 of 1252 depending on the run's numerics; real
    # photos: 52 of 220); what gets labelled must be right. The labelling itself is checked exactly in
    # test_classes.py::test_label_new_in_pool_labels_only_new_looking_images_by_refined_prototypes.
    assert int(labelled.sum()) <= 0.05 * len(table) and (not labelled.any() or precision >= 0.7), (
        int(labelled.sum()), precision)


@pytest.mark.slow
def test_label_pool_all_labels_the_pool_better_than_the_old_model(old_checkpoint, digit_arrays):
    """``label_pool: all`` gives every pool image (up to the 1024 held at setup) a class, old or new; they
    must be right more often than the old model's own labels, which cannot name a new class (baseline
    computed here, on the same images)."""
    path, keep, test, _ = old_checkpoint
    x, y = digit_arrays
    L.seed_everything(0)
    model = TransferClassifier("tf_efficientnet_lite0", weights=None, strategy="full", lr=1e-4, init_from=str(path),
                               class_expansion=ClassExpansionConfig(label_pool="all"),
                               semi_supervised=FixMatchConfig(threshold=0.9, mu=2))
    dm = _expansion_data(x, y, keep, test, k=5)
    _trainer(1).fit(model, dm)
    exp = model._expansion
    table, truth = exp.pool_labels, torch.as_tensor(dm.unlabeled_set.samples.labels)
    labelled = table >= 0
    assert table.shape == (len(dm.unlabeled_set),) and int(labelled.sum()) == min(1024, len(table))
    t = exp._eval_transform(model, dm)  # what the labelling saw
    pool_x = torch.stack([t(image=dm.unlabeled_set.load(int(i)))["image"]
                          for i in labelled.nonzero().flatten()[:256]])
    ours = (table[labelled][:256] == truth[labelled][:256]).float().mean()
    old = (exp.old_logits(pool_x).argmax(1) == truth[labelled][:256]).float().mean()
    print(f"pool labels right: label_pool=all {float(ours):.3f}, old model {float(old):.3f}")
    assert bool((table[labelled] >= exp.num_old).any())  # new classes are named
    assert ours > old + 0.03, (float(ours), float(old))


def _val_logits(model: TransferClassifier, dm: ImageDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        pairs = [(model.net(xb), yb) for xb, yb in dm.val_dataloader()]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


@pytest.mark.slow
@pytest.mark.nightly  # 2-4 minutes; fails here: train_pseudo_acc 0.72 vs > 0.8 since anchoring at anchor_threshold 0.8 (was: old-class bar -0.023 vs -0.02); issue #14
def test_fixmatch_adds_classes_better_than_labeled_only(old_checkpoint, digit_arrays):
    """Digits 0-7 model + digits 8 and 9 with 5 labels each + the rest of the training images unlabeled.

    The issue's bar: old-class accuracy drops <= 2 points, and FixMatch beats labeled-only on the new classes
    by >= 10 points. Labeled-only training sees new-class images only and ends up calling most old images new
    (old-class accuracy 0.16 at these settings), which inflates its raw new-class accuracy; so its new-class
    accuracy is taken at FixMatch's old-class accuracy (:func:`new_accuracy_at`: one offset on the new
    logits, chosen on the test labels, in the baseline's favour). Measured (100 steps, lr 5e-4):
    FixMatch old/new 0.965/0.698 (seed 0), 0.963/0.670 (seed 1); base 0.954.
    """
    path, keep, test, base = old_checkpoint
    x, y = digit_arrays
    steps = int(os.environ.get("VT_EXPAND_STEPS", 100))
    assert base > 0.9
    for seed in (0, 1):  # the margins must hold for each seed (labeled images, augmentation, init)
        results, logits = {}, {}
        for fixmatch in (False, True):
            L.seed_everything(seed)
            model = TransferClassifier(
                "tf_efficientnet_lite0", weights=None, strategy="full", bn="train", lr=5e-4, init_from=str(path),
                label_smoothing=0.0, warmup_steps=0, class_expansion=ClassExpansionConfig(distill=1.0),
                semi_supervised=FixMatchConfig(threshold=0.95, mu=3) if fixmatch else None)
            dm = _expansion_data(x, y, keep, test, seed=seed, pool=fixmatch)
            trainer = _trainer(steps, log_every_n_steps=1)
            trainer.fit(model, dm)
            if fixmatch:
                assert 0 < float(trainer.callback_metrics["train_mask_rate"]) <= 1
                assert float(trainer.callback_metrics["train_pseudo_acc"]) > 0.8  # anchored pseudo-labels are right
            results[fixmatch] = trainer.validate(model, dm, verbose=False)[0]
            logits[fixmatch] = _val_logits(model, dm)
        fm, sup = results[True], results[False]
        sup_logits, labels = logits[False]
        reachable = split_accuracy(sup_logits[:, :8], labels, old_classes=8)["acc_old"]  # no new class predicted
        matched = new_accuracy_at(sup_logits, labels, old_classes=8, acc_old=min(fm["val_acc_old"], reachable))
        print(f"seed {seed} base {base:.3f}", {k: {m: round(v, 3) for m, v in r.items() if "acc" in m}
                                               for k, r in results.items()}, "labeled-only matched", matched,
              "reachable", reachable)
        assert fm["val_acc_old"] >= base - 0.02  # old classes kept
        assert fm["val_acc_new"] >= matched["acc_new"] + 0.10  # new classes: FixMatch well ahead at equal old acc
        assert fm["val_acc"] > sup["val_acc"] + 0.3  # labeled-only trades the old classes for the new ones


def test_delta_holds_the_evaluated_ema_weights(tmp_path):
    """Validation and the best checkpoint see the EMA teacher: save_delta and DeltaWriter (last and best) save
    the teacher's weights, say so (``weights_of``), and rebuild the module's eval logits (issue #11, 3)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from visiontune.delta import DeltaWriter, build_from_delta, delta_from_file, save_delta

    model = TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="lora",
                               strategy_args={"rank": 2}, lr=1e-2,
                               semi_supervised=FixMatchConfig(threshold=0.5, mu=1, ema=0.9))
    dm = ImageDataModule(train="digits", image_size=32, batch_size=4, labels_per_class=2, unlabeled="rest",
                         hflip=False, num_workers=0, seed=0)
    best_writer = DeltaWriter(dirpath=str(tmp_path / "best"), source="best")
    last_writer = DeltaWriter(dirpath=str(tmp_path / "last"), source="last")
    trainer = L.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt"), best_writer, last_writer])
    trainer.fit(model, dm)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.eval()
    assert model.evaluated_weights_of == "ema" and model.evaluated_net() is model._fixmatch.teacher.module
    with torch.no_grad():
        ema, student = model(x), model.net(x)
    assert not torch.allclose(ema, student, atol=1e-4)  # the teacher lags behind the student

    def rebuilt_logits(path) -> torch.Tensor:
        with torch.no_grad():
            return build_from_delta(path)(x)  # checks the base: the teacher's frozen tensors are the base's

    for path in (save_delta(model, tmp_path / "saved.safetensors"), last_writer.written):
        assert delta_from_file(path)[1]["weights_of"] == "ema"
        assert torch.allclose(rebuilt_logits(path), ema, rtol=0, atol=1e-6), path
    student_delta = save_delta(model, tmp_path / "student.safetensors", weights_of="model")
    assert delta_from_file(student_delta)[1]["weights_of"] == "model"
    assert torch.allclose(rebuilt_logits(student_delta), student, rtol=0, atol=1e-6)

    # best: the teacher as it was when the checkpoint was saved, not the live one
    best = trainer.checkpoint_callback.best_model_path
    with torch.no_grad():
        from_ckpt = TransferClassifier.load(best).eval()(x)
        for p in model._fixmatch.teacher.module.parameters():
            p.add_(0.1)
    best_writer.on_fit_end(trainer, model)
    assert delta_from_file(best_writer.written)[1]["weights_of"] == "ema"
    assert torch.allclose(rebuilt_logits(best_writer.written), from_ckpt, rtol=0, atol=1e-6)
