"""The decode path: files decoded once, reduced to the size training needs, kept in memory."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

import visiontune.data.decoded as decoded
from visiontune import ImageDataModule
from visiontune.data.decoded import DecodedImages, default_decode_side, reduce_image
from visiontune.data.images import load_image
from visiontune.errors import UserError


def _photo(path, w=640, h=480, seed=0):
    """A smooth colour JPEG (gradients + blobs: what DCT-scaled decoding must reproduce)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 / w), (yy * 255 / h), 128 + 60 * np.sin(xx / 37.0 + yy / 53.0 + rng.uniform(0, 6))], -1)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=92)
    return path


@pytest.fixture()
def folder(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for k in range(3):
            _photo(tmp_path / c / f"{k}.jpg", seed=k + (10 if c == "b" else 0))
    return tmp_path


def test_reduce_image_short_side_exact_and_never_enlarges():
    assert reduce_image(np.zeros((480, 640, 3), np.uint8), 96).shape == (96, 128, 3)
    assert reduce_image(np.zeros((640, 480, 3), np.uint8), 96).shape == (128, 96, 3)
    small = np.zeros((50, 70, 3), np.uint8)
    assert reduce_image(small, 96) is small
    assert reduce_image(small, None) is small and reduce_image(small, 0) is small
    assert default_decode_side(96) == 192 and default_decode_side(33) == 66


def test_jpeg_draft_decode_is_smaller_and_matches_a_full_decode_resized(tmp_path):
    f = _photo(tmp_path / "p.jpg", 2000, 1500)
    full = load_image(f)
    draft = load_image(f, min_side=180)
    assert full.shape == (1500, 2000, 3)
    assert draft.shape == (188, 250, 3)  # 1/8 scale: both sides still >= 180
    assert min(load_image(f, min_side=200).shape[:2]) == 375  # 1/4: 1/8 would give 188 < 200
    import cv2

    b = reduce_image(full, 150).astype(float)
    assert b.shape == (150, 200, 3)
    a = cv2.resize(draft, (200, 150), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(a - b).mean() < 2.0, np.abs(a - b).mean()  # same picture, within JPEG rounding


def test_cache_decodes_each_file_once(folder, monkeypatch):
    calls = []
    real = decoded.load_image
    monkeypatch.setattr(decoded, "load_image", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    files = sorted(str(p) for p in folder.glob("*/*.jpg"))
    d = DecodedImages(files, side=64)
    assert d.fill(workers=2) == 6 and len(calls) == 6
    first = [d[i] for i in range(6)]
    again = [d[i] for i in range(6)]
    assert len(calls) == 6 and all(x is y for x, y in zip(first, again))
    assert all(min(x.shape[:2]) == 64 and not x.flags.writeable for x in first)
    assert d.cached_bytes == sum(x.nbytes for x in first)


def test_cache_budget_and_no_cache(folder, monkeypatch):
    files = sorted(str(p) for p in folder.glob("*/*.jpg"))
    one = DecodedImages(files, side=64)[0].nbytes
    d = DecodedImages(files, side=64, max_bytes=2 * one)
    d.fill(workers=1)
    assert d.cached == 2 and d.cached_bytes == 2 * one
    off = DecodedImages(files, side=64, cache=False)
    assert off.fill() == 0 and off[0] is not off[0] and off.cached == 0
    clone = pickle.loads(pickle.dumps(d))  # spawn-started loader workers get a copy
    assert clone.cached == 2 and np.array_equal(clone[0], d[0])


def test_datamodule_decodes_reduced_caches_and_shares_with_eval_view(folder):
    dm = ImageDataModule(train=str(folder), val_split=0.0, image_size=32, batch_size=4, num_workers=0)
    dm.setup("fit")
    ds = dm.train_set
    assert ds.images.side == 64 and ds.images.cached == len(ds) == 6  # filled at setup
    assert min(ds.load(0).shape[:2]) == 64
    assert dm.eval_view("train").images is ds.images  # no second decode of the same files
    x, y = next(iter(dm.train_dataloader()))  # the augmentation works on the read-only cached arrays
    assert tuple(x.shape) == (4, 3, 32, 32)
    full = ImageDataModule(train=str(folder), val_split=0.0, image_size=32, decode_side=0, cache_images=False)
    full.setup("fit")
    assert full.train_set.load(0).shape == (480, 640, 3) and full.train_set.images.cached == 0


def test_decode_side_must_be_a_non_negative_int():
    with pytest.raises(UserError, match="decode_side must be an integer >= 0.*-3"):
        ImageDataModule(train="digits", decode_side=-3)


def test_datamodules_over_the_same_files_share_one_decode(folder, monkeypatch):
    """fit then test, or compare's runs one after another: a second datamodule over the same folder decodes
    nothing; a file changed on disk is decoded again; another decode size is another set."""
    calls = []
    real = decoded.load_image
    monkeypatch.setattr(decoded, "load_image", lambda *a, **k: calls.append(a[0]) or real(*a, **k))

    def setup(**kw):
        dm = ImageDataModule(train=str(folder), val_split=0.0, image_size=32, batch_size=4, num_workers=0, **kw)
        dm.setup("fit")
        return dm.train_set

    first = setup()
    assert len(calls) == 6
    second = setup()
    assert len(calls) == 6 and second.images is first.images and second is not first
    assert all(second.load(i) is first.load(i) for i in range(6))
    changed = sorted(folder.glob("a/*.jpg"))[0]
    _photo(changed, seed=99)  # new contents, new size and modification time
    third = setup()
    assert third.images is not first.images
    assert len(calls) == 12  # one file changed: the set is a new one, all six decoded again
    assert not np.array_equal(third.load(0), first.load(0))
    setup(decode_side=48)
    assert len(calls) == 18


def test_trim_shared_keeps_the_newest_sets_within_the_budget(folder):
    files = sorted(str(p) for p in folder.glob("*/*.jpg"))
    sets = [decoded.shared_decoded(files, side=side) for side in (40, 50, 60)]
    for d in sets:
        d.fill(workers=1)
    per = [d.cached_bytes for d in sets]
    assert decoded.trim_shared(max_bytes=per[1] + per[2]) == 2  # older sets of other tests go too
    assert decoded.shared_decoded(files, side=60) is sets[2] and decoded.shared_decoded(files, side=50) is sets[1]
    assert decoded.shared_decoded(files, side=40) is not sets[0]  # forgotten: a fresh, empty set
    assert decoded.trim_shared(max_bytes=0) == 1  # the newest always stays
