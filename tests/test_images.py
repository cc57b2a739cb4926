"""Robust image loading: each odd or broken file is generated with PIL and checked for its exact outcome."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from visiontune.data import images as images_mod
from visiontune.data.images import IMAGE_EXTENSIONS, BadImageError, is_image_file, load_image
from visiontune.data.scan import ImageReport, check_images, find_images

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _noise(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _patches() -> np.ndarray:
    """32x32 RGB made of four flat colour patches (JPEG-friendly, colour errors easy to see)."""
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:16, :16] = (200, 30, 30)
    rgb[:16, 16:] = (30, 200, 30)
    rgb[16:, :16] = (30, 30, 200)
    rgb[16:, 16:] = (240, 220, 40)
    return rgb


def _truncated(tmp_path: Path, fmt: str = "JPEG", name: str = "cut.jpg") -> Path:
    full = tmp_path / f"full_{name}"
    Image.fromarray(_noise()).save(full, fmt)
    data = full.read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) // 2])
    return cut


def _reason(path: Path, **kwargs) -> str:
    with pytest.raises(BadImageError) as info:
        load_image(path, **kwargs)
    err = info.value
    assert err.path == str(path)
    assert str(path) in str(err) and err.reason in str(err)
    return err.reason


# --- refused files --------------------------------------------------------------------------------


def test_truncated_jpeg_is_refused(tmp_path):
    cut = _truncated(tmp_path)
    Image.open(cut).close()  # the header alone looks fine: only a full decode finds the problem
    assert _reason(cut).startswith("truncated")


@pytest.mark.parametrize(
    "fmt,name", [("PNG", "cut.png"), ("GIF", "cut.gif"), ("BMP", "cut.bmp"), ("TIFF", "cut.tif")]
)
def test_truncated_other_formats_are_refused(tmp_path, fmt, name):
    assert _reason(_truncated(tmp_path, fmt, name)).startswith("truncated")


def test_truncated_refused_even_if_someone_set_load_truncated_images(tmp_path, monkeypatch):
    cut = _truncated(tmp_path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    Image.open(cut).load()  # PIL on its own now silently pads the missing half
    assert _reason(cut).startswith("truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the other library's setting is restored
    good = tmp_path / "good.png"
    Image.fromarray(_noise()).save(good)
    load_image(good)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_loader_never_turns_truncated_loading_on(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(BadImageError):
        load_image(_truncated(tmp_path))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert _reason(p) == "empty file"


def test_text_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("these are not pixels\n" * 20)
    assert _reason(p).startswith("not an image")


def test_exotic_format_named_jpg_is_not_decoded(tmp_path):
    p = tmp_path / "sneaky.jpg"
    Image.fromarray(_noise(8, 8)).save(p, "PPM")  # a real image, but not a format we decode
    assert _reason(p).startswith("not an image")


def test_png_named_jpg_loads(tmp_path):
    p = tmp_path / "actually_png.jpg"
    Image.fromarray(_noise(8, 8)).save(p, "PNG")
    np.testing.assert_array_equal(load_image(p), _noise(8, 8))


def test_missing_file(tmp_path):
    assert _reason(tmp_path / "nope.jpg") == "file not found"


def test_directory(tmp_path):
    d = tmp_path / "dir.jpg"
    d.mkdir()
    assert _reason(d) == "not a regular file"


def test_error_pickles_with_path_and_reason(tmp_path):
    err = BadImageError(tmp_path / "x.jpg", "empty file")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ValueError)
    assert (back.path, back.reason, str(back)) == (err.path, err.reason, str(err))


# --- decompression bombs --------------------------------------------------------------------------


def test_bomb_refused_from_header_before_decoding(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.fromarray(_noise(20, 20)).save(p)
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or real_load(self))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no reliance on PIL's global limit
    reason = _reason(p, max_pixels=100)
    assert "exceeds max_pixels=100" in reason and "400" in reason
    assert decoded == []
    assert load_image(p, max_pixels=400).shape == (20, 20, 3)  # the limit is inclusive
    assert decoded  # ...and a legal size does get decoded


def test_pil_bomb_error_is_converted(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.fromarray(_noise(20, 20)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL refuses above 2 * 50
    assert "decompression-bomb" in _reason(p, max_pixels=None)


def test_pil_bomb_warning_caught_locally(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.fromarray(_noise(20, 20)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # PIL warns (400 > 300) but does not refuse
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(p, max_pixels=1000).shape == (20, 20, 3)
        assert "exceeds max_pixels=399" in _reason(p, max_pixels=399)


def test_invalid_max_pixels(tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(_noise(4, 4)).save(p)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(p, max_pixels=0)


# --- conversions ----------------------------------------------------------------------------------


def test_rgb_roundtrip_is_exact_and_writable(tmp_path):
    p = tmp_path / "rgb.png"
    Image.fromarray(_noise(12, 20)).save(p)
    arr = load_image(str(p))
    assert arr.shape == (12, 20, 3) and arr.dtype == np.uint8
    assert arr.flags.writeable and arr.flags.c_contiguous
    np.testing.assert_array_equal(arr, _noise(12, 20))


def test_cmyk_jpeg_colours_preserved(tmp_path):
    rgb = _patches()
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(p, "JPEG", quality=95)
    assert Image.open(p).mode == "CMYK"
    arr = load_image(p)
    assert arr.shape == (32, 32, 3)
    assert np.abs(arr.astype(int) - rgb).mean() < 6
    # each patch keeps its colour (a wrong inversion would turn red into cyan)
    for y, x in [(4, 4), (4, 28), (28, 4), (28, 28)]:
        assert np.abs(arr[y, x].astype(int) - rgb[y, x]).max() < 20


def test_cmyk_with_unusable_icc_profile_falls_back(tmp_path):
    rgb = _patches()
    p = tmp_path / "cmyk_icc.jpg"
    Image.fromarray(rgb).convert("CMYK").save(p, "JPEG", quality=95, icc_profile=b"not a real profile")
    assert Image.open(p).info.get("icc_profile") == b"not a real profile"
    assert np.abs(load_image(p).astype(int) - rgb).mean() < 6


def test_float_tiff_clipped_and_rounded(tmp_path):
    img = Image.new("F", (5, 1))
    img.putdata([-5.0, 0.4, 127.6, 300.0, float("nan")])
    p = tmp_path / "float.tif"
    img.save(p)
    assert load_image(p)[0, :, 0].tolist() == [0, 0, 128, 255, 0]


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(values).save(p)
    assert Image.open(p).mode.startswith("I;16")
    arr = load_image(p)
    assert arr.shape == (1, 4, 3)
    assert arr[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (arr == arr[..., :1]).all()


def test_32bit_int_tiff_is_treated_as_16bit(tmp_path):
    img = Image.new("I", (4, 1))
    img.putdata([0, 32768, 65535, 100000])
    p = tmp_path / "deep.tif"
    img.save(p)
    assert Image.open(p).mode == "I"
    assert load_image(p)[0, :, 0].tolist() == [0, 128, 255, 255]


def test_palette_with_transparency_on_white(tmp_path):
    img = Image.new("P", (4, 2))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (3 * 254))  # index 0 black, index 1 red
    img.putdata([0, 1, 1, 1, 1, 1, 1, 0])
    p = tmp_path / "pal.png"
    img.save(p, transparency=0)
    assert Image.open(p).mode == "P"
    arr = load_image(p)
    assert arr[0, 0].tolist() == [255, 255, 255]  # transparent black -> white, not black
    assert arr[1, 3].tolist() == [255, 255, 255]
    assert arr[0, 1].tolist() == list(RED)


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent
    rgba[0, 1] = (10, 20, 30, 255)  # opaque
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(p)
    arr = load_image(p)
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[0, 1].tolist() == [10, 20, 30]
    assert arr[0, 2].tolist() == [127, 127, 127]
    assert arr[1, 0].tolist() == [255, 255, 255]


def test_la_composited_on_white(tmp_path):
    la = np.array([[[40, 0], [40, 255]]], np.uint8)
    p = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(p)
    assert load_image(p).tolist() == [[[255, 255, 255], [40, 40, 40]]]


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_replicated(tmp_path, mode):
    gray = np.array([[0, 255, 255], [255, 0, 0]], np.uint8)
    p = tmp_path / f"gray_{mode}.png"
    Image.fromarray(gray).convert(mode).save(p)
    assert Image.open(p).mode == mode
    arr = load_image(p)
    assert arr.shape == (2, 3, 3)
    np.testing.assert_array_equal(arr, np.repeat(gray[..., None], 3, axis=2))


@pytest.mark.parametrize(
    "orientation,marker_at",
    [
        (6, (0, 9)),  # rotate 90° clockwise: top-left lands top-right
        (8, (19, 0)),  # rotate 90° counter-clockwise: top-left lands bottom-left
    ],
)
def test_exif_orientation_applied(tmp_path, orientation, marker_at):
    img = Image.new("RGB", (20, 10), BLUE)  # 20 wide, 10 tall as stored
    for x in range(4):
        for y in range(4):
            img.putpixel((x, y), RED)  # marker block in the stored top-left corner
    exif = img.getexif()
    exif[0x0112] = orientation
    p = tmp_path / f"orient{orientation}.jpg"
    img.save(p, "JPEG", quality=100, exif=exif.tobytes())
    arr = load_image(p)
    assert arr.shape == (20, 10, 3)  # displayed 10 wide, 20 tall
    y, x = marker_at
    assert arr[y, x, 0] > 200 and arr[y, x, 2] < 60  # red marker
    assert arr[19 - y, 9 - x, 2] > 200 and arr[19 - y, 9 - x, 0] < 60  # opposite corner still blue


# --- helpers and report ---------------------------------------------------------------------------


def test_image_extensions_case_insensitive():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    assert is_image_file("a/B.JPG") and is_image_file("x.TiFf") and is_image_file(Path("y.webp"))
    assert not is_image_file("notes.txt") and not is_image_file("jpg")


def test_find_images(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "_background").mkdir()
    for rel in ["a.PNG", "b/c.jpeg", "b/readme.txt", ".hidden/d.jpg", "b/._c.jpeg", "_background/e.png", "_f.jpg"]:
        (tmp_path / rel).write_bytes(b"x")
    assert find_images(tmp_path) == [tmp_path / "_background" / "e.png", tmp_path / "_f.jpg", tmp_path / "a.PNG",
                                     tmp_path / "b" / "c.jpeg"]
    with pytest.raises(NotADirectoryError):
        find_images(tmp_path / "a.PNG")


def _dataset(tmp_path: Path) -> list[Path]:
    good = []
    for i in range(3):
        p = tmp_path / f"good{i}.png"
        Image.fromarray(_noise(8, 8, seed=i)).save(p)
        good.append(p)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    return [good[0], empty, good[1], _truncated(tmp_path), text, tmp_path / "missing.png", good[2]]


@pytest.mark.parametrize("workers", [0, 3])
def test_check_images_report(tmp_path, workers):
    paths = _dataset(tmp_path)
    report = check_images(paths, workers=workers)
    assert isinstance(report, ImageReport)
    assert report.ok == 3 and report.total == 7
    assert [Path(p).name for p, _ in report.bad] == ["empty.jpg", "cut.jpg", "text.jpg", "missing.png"]
    reasons = [r for _, r in report.bad]
    assert reasons[0] == "empty file" and reasons[1].startswith("truncated")
    assert reasons[2].startswith("not an image") and reasons[3] == "file not found"

    text = report.to_text()
    assert text.splitlines()[0] == "checked 7 images: 3 ok, 4 bad"
    assert len(text.splitlines()) == 5 and str(paths[1]) in text

    data = json.loads(report.to_json())
    assert data["ok"] == 3 and data["total"] == 7
    assert data["bad"][0] == {"path": str(paths[1]), "reason": "empty file"}


def test_check_images_threads_with_truncated_flag_set_elsewhere(tmp_path, monkeypatch):
    paths = _dataset(tmp_path) * 4
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    report = check_images(paths, workers=4)
    assert report.ok == 12 and sum(r.startswith("truncated") for _, r in report.bad) == 4
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True and images_mod._guard_depth == 0


def test_check_images_max_pixels_and_validation(tmp_path):
    p = tmp_path / "big.png"
    Image.fromarray(_noise(20, 20)).save(p)
    report = check_images([p], max_pixels=100)
    assert report.ok == 0 and "max_pixels=100" in report.bad[0][1]
    assert check_images([]).to_text() == "checked 0 images: 0 ok, 0 bad"
    with pytest.raises(ValueError, match="workers"):
        check_images([p], workers=-1)


def test_truncation_guard_is_balanced():
    assert images_mod._guard_depth == 0


# --- the cheap scan (on_bad_image="error" at setup) ----------------------------------------------------


def _scan_reason(path: Path, **kwargs) -> str:
    with pytest.raises(BadImageError) as info:
        images_mod.scan_image(path, **kwargs)
    assert info.value.path == str(path)
    return info.value.reason


def _no_decoding(monkeypatch) -> None:
    def refuse(self):
        raise AssertionError(f"decoded {self.filename}")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize("fmt,name", [("JPEG", "cut.jpg"), ("PNG", "cut.png"), ("GIF", "cut.gif"),
                                      ("BMP", "cut.bmp"), ("TIFF", "cut.tif"), ("WEBP", "cut.webp")])
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_scan_refuses_truncated_files_with_load_images_reason(tmp_path, fmt, name, keep):
    full = tmp_path / f"full_{name}"
    Image.fromarray(_noise()).save(full, fmt)
    data = full.read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: int(len(data) * keep)])
    assert _scan_reason(cut) == _reason(cut)


def test_scan_refuses_what_the_header_shows_like_load_image(tmp_path):
    _, empty, _, _, text, missing, _ = _dataset(tmp_path)
    big = tmp_path / "big.png"
    Image.new("L", (200, 100)).save(big)
    assert _scan_reason(empty) == "empty file" and _scan_reason(missing) == "file not found"
    assert _scan_reason(text).startswith("not an image") and _scan_reason(tmp_path) == "not a regular file"
    assert _scan_reason(big, max_pixels=19_999) == _reason(big, max_pixels=19_999) == \
        "image is 200x100 = 20000 pixels, exceeds max_pixels=19999"


def test_scan_passes_good_files_without_decoding_them(tmp_path, monkeypatch):
    paths = []
    for fmt, name in [("JPEG", "a.jpg"), ("PNG", "b.png"), ("GIF", "c.gif"), ("BMP", "d.bmp"), ("TIFF", "e.tif"),
                      ("WEBP", "f.webp")]:
        Image.fromarray(_noise()).save(tmp_path / name, fmt)
        paths.append(tmp_path / name)
    padded = tmp_path / "padded.jpg"  # zeros after the end marker (some writers pad): still complete
    padded.write_bytes((tmp_path / "a.jpg").read_bytes() + b"\x00" * 100)
    Image.fromarray(_noise()).convert("L").save(tmp_path / "gray.png")
    _no_decoding(monkeypatch)
    for p in [*paths, padded, tmp_path / "gray.png"]:
        images_mod.scan_image(p)


def test_scan_decodes_a_suspect_file_to_confirm_it(tmp_path):
    trailer = tmp_path / "trailer.jpg"  # bytes after the end marker: suspect, but it decodes, so it is fine
    Image.fromarray(_noise()).save(trailer, "JPEG")
    trailer.write_bytes(trailer.read_bytes() + b"camera maker notes")
    images_mod.scan_image(trailer)
    assert load_image(trailer).shape == (64, 64, 3)


@pytest.mark.parametrize("workers", [0, 3])
def test_check_images_scan_mode_same_report_as_decoding(tmp_path, workers):
    paths = _dataset(tmp_path) * 3
    scanned = check_images(paths, workers=workers, decode=False)
    assert scanned == check_images(paths, workers=workers)
    assert scanned.ok == 9 and [Path(p).name for p, _ in scanned.bad[:4]] == ["empty.jpg", "cut.jpg", "text.jpg",
                                                                            "missing.png"]


def test_is_hidden_only_dot_names_and_macosx():
    assert images_mod.is_hidden(".git") and images_mod.is_hidden("._photo.jpg") and images_mod.is_hidden("__MACOSX")
    assert not images_mod.is_hidden("_background") and not images_mod.is_hidden("__init__")
    assert not images_mod.is_hidden("bird")
