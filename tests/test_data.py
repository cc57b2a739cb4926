from __future__ import annotations

import numpy as np
import pytest
import torch

from visiontune import DataError, ImageDataModule, read_source
from visiontune.data.sources import stratified_split, take_per_class
from visiontune.data.transforms import eval_transform, train_transform

from conftest import make_folder


def test_folder_source_classes_and_hidden_dirs(image_folder):
    (image_folder / ".git").mkdir()
    (image_folder / ".ipynb_checkpoints" / "x").mkdir(parents=True)
    (image_folder / "red" / ".ipynb_checkpoints").mkdir()
    (image_folder / "red" / "notes.txt").write_text("not an image")
    s = read_source(image_folder)
    assert s.class_names == ["blue", "green", "red"]
    assert len(s) == 18 and np.bincount(s.labels).tolist() == [6, 6, 6]


def test_underscore_folders_are_classes_only_dot_names_hidden(tmp_path):
    """Issue #11, 5: `_background/` is a class like any other; `.hidden/` (and `__MACOSX/`) are not."""
    from visiontune.data.checks import _folder_fallback
    from visiontune.data.datamodule import _folder_classes

    root = make_folder(tmp_path / "d", per_class=2, classes={"_background": (0, 0, 0), "bird": (200, 0, 0),
                                                            ".hidden": (0, 200, 0), "__MACOSX": (0, 0, 200)})
    make_folder(root / "bird", per_class=1, classes={"_crops": (9, 9, 9)})  # a nested _folder: images too
    s = read_source(root)
    assert s.class_names == ["_background", "bird"]
    assert np.bincount(s.labels).tolist() == [2, 3] and any("_crops" in str(p) for p in s.items)
    assert _folder_classes(root) == ["_background", "bird"] and _folder_fallback(root).class_names == s.class_names
    assert len(read_source(root, labeled=False)) == 5
    (root / "_empty").mkdir()
    with pytest.raises(DataError, match="class folder .*_empty has no images"):
        read_source(root)


def test_csv_source_paths_relative_to_csv(image_csv):
    s = read_source(image_csv)
    assert s.class_names == ["blue", "green", "red"]
    assert all(p.is_file() for p in s.items)


def test_csv_missing_files_all_listed(tmp_path):
    csv = tmp_path / "l.csv"
    csv.write_text("path,label\nnope1.png,a\nnope2.png,b\n")
    with pytest.raises(DataError) as err:
        read_source(csv)
    assert "nope1.png" in str(err.value) and "nope2.png" in str(err.value) and "l.csv:2" in str(err.value)


def test_empty_class_folder_is_an_error(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2)
    (root / "purple").mkdir()
    with pytest.raises(DataError, match="purple"):
        read_source(root)


def test_arrays_and_digits():
    imgs = np.random.default_rng(0).integers(0, 255, (6, 10, 10, 3), dtype=np.uint8)
    s = read_source((imgs, np.array([0, 1, 2, 0, 1, 2])))
    assert s.class_names == ["0", "1", "2"] and len(s) == 6
    d = read_source("digits")
    assert len(d) == 1797 and d.items[0].shape == (32, 32, 3) and d.items[0].dtype == np.uint8


def test_unknown_source_names_it():
    with pytest.raises(DataError, match="no_such_thing"):
        read_source("no_such_thing")


def test_labels_per_class_seeded_and_stable():
    labels = np.repeat(np.arange(4), 10)
    a, rest = take_per_class(labels, 3, seed=5)
    b, _ = take_per_class(labels, 3, seed=5)
    c, _ = take_per_class(labels, 3, seed=6)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert np.bincount(labels[a]).tolist() == [3, 3, 3, 3]
    assert sorted(a.tolist() + rest.tolist()) == list(range(40))
    with pytest.raises(DataError, match="fewer than labels_per_class=11"):
        take_per_class(labels, 11, seed=0)


def test_stratified_split_keeps_every_class():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    keep, take = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[take]).tolist() == [2, 4, 6]
    assert len(set(keep) & set(take)) == 0 and len(keep) + len(take) == 60


def test_datamodule_digits_split_recorded():
    dm = ImageDataModule(train="digits", image_size=32, batch_size=16, labels_per_class=5,
                         unlabeled="rest", test_split=0.2, seed=3, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 50
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) + len(dm.unlabeled_set) == 1797
    assert set(dm.split) == {"train", "val", "test", "unlabeled"}
    assert not set(dm.split["train"]) & set(dm.split["val"])
    x, y = dm.train_set[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    dm2 = ImageDataModule(train="digits", image_size=32, labels_per_class=5, unlabeled="rest",
                          test_split=0.2, seed=3)
    dm2.setup("fit")
    assert dm2.split == dm.split  # same seed, same split
    assert dm.state_dict()["split"] == dm.split


def test_datamodule_val_classes_unseen_in_train(tmp_path):
    train = make_folder(tmp_path / "train", per_class=3)
    val = make_folder(tmp_path / "val", per_class=2, classes={"red": (255, 0, 0), "pink": (255, 100, 200)})
    dm = ImageDataModule(train=str(train), val=str(val), image_size=16)
    with pytest.raises(DataError, match="pink"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "kwargs, option",
    [({"image_size": 0}, "image_size"), ({"batch_size": -1}, "batch_size"),
     ({"labels_per_class": 0}, "labels_per_class"), ({"val_split": 1.5}, "val_split"),
     ({"unlabeled_ratio": 0}, "unlabeled_ratio")],
)
def test_datamodule_rejects_bad_options(kwargs, option):
    with pytest.raises(DataError, match=option):
        ImageDataModule(train="digits", **kwargs)


def test_transforms_shapes_normalisation_and_seeding():
    img = np.full((20, 30, 3), 255, np.uint8)
    x = eval_transform(16, (0.5,) * 3, (0.5,) * 3)(image=img)["image"]
    assert x.shape == (3, 16, 16) and torch.allclose(x, torch.ones_like(x))
    rng_img = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    from visiontune.data.transforms import seed_transform

    outs = []
    for seed in (1, 1, 2):
        t = train_transform(16, (0.5,) * 3, (0.5,) * 3, scale=(0.2, 1.0))
        seed_transform(t, seed)
        outs.append(t(image=rng_img)["image"])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
