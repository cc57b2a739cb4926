"""Robust image reading: every file either becomes an ``HxWx3`` uint8 RGB array or a :class:`BadImageError`
that names the file and the reason.

``load_image(path)`` outcomes (input → outcome):

==========================================  ================================================================
input                                       outcome
==========================================  ================================================================
missing path                                ``BadImageError("file not found")``
a directory / not a regular file            ``BadImageError("not a regular file")``
zero-byte file                              ``BadImageError("empty file")``
text (or other non-image) named ``.jpg``    ``BadImageError("not an image (unrecognised or unsupported
                                            format)")``
truncated JPEG / PNG / GIF / BMP / TIFF     ``BadImageError("truncated image data (...)")``, even if some
                                            other library set ``ImageFile.LOAD_TRUNCATED_IMAGES = True``
other undecodable data                      ``BadImageError("corrupt image data (...)")``
width*height > ``max_pixels``               ``BadImageError("image is WxH = N pixels, exceeds
                                            max_pixels=M")``, checked from the header before decoding
over PIL's own hard bomb limit              ``BadImageError("exceeds PIL's decompression-bomb limit ...")``
RGB                                         returned as is
CMYK (e.g. print JPEGs)                     RGB, through the embedded ICC profile when there is a usable
                                            one, else PIL's conversion (Adobe inversion handled by PIL)
16-bit grayscale PNG/TIFF (``I;16*``)       scaled, never clipped: ``(v + 128) // 257`` (65535 → 255,
                                            32768 → 128, 256 → 1)
32-bit integer (``I``)                      taken as 16-bit data: clipped to [0, 65535], then scaled as above
float (``F``)                               clipped to [0, 255] and rounded; NaN → 0
palette (``P``) with transparency           RGBA, then composited on white
RGBA / LA / PA / premultiplied alpha        composited on **white**: a transparent pixel is 255, 255, 255
grayscale ``L`` / bilevel ``1``             replicated to 3 channels
YCbCr, HSV, RGBX, ...                       converted to RGB by PIL
EXIF orientation 2-8 (e.g. 6, 8)            applied with ``ImageOps.exif_transpose``: a 20x10 photo tagged
                                            6 or 8 comes back 10 wide, 20 tall; unreadable EXIF → unrotated
animated GIF / WebP, multi-page TIFF        first frame
==========================================  ================================================================

Only the formats a training set plausibly holds are decoded (JPEG incl. MPO, PNG, BMP, GIF, WebP,
TIFF), whatever the file's extension says: a PNG named ``.jpg`` loads, a PSD or EPS named ``.jpg``
(EPS would run Ghostscript) is "not an image". :data:`IMAGE_EXTENSIONS` only decides which files a
folder scan (:func:`visiontune.data.scan.find_images`) picks up, :func:`is_hidden` which names it skips.

:func:`scan_image` is the cheap version of these checks (no decoding: header, pixel count, end-of-data marker),
what ``ImageDataModule(on_bad_image="error")`` runs on every file at setup.

Why the truncation guard: ``Image.open`` reads only the header, so a cut file looks fine until its pixels
are decoded. :func:`load_image` therefore calls ``img.load()`` inside its ``try``. PIL then raises on
premature end of data *unless* ``ImageFile.LOAD_TRUNCATED_IMAGES`` is true — a flag some third-party code
flips globally to "fix" broken datasets, which makes PIL pad the missing part with grey. visiontune never
turns that flag on; if it finds it on, it turns it off for the duration of its own decodes (reference-counted
across threads) and restores it afterwards.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import UserError

__all__ = [
    "BadImageError",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "is_hidden",
    "is_image_file",
    "load_image",
    "scan_image",
]

#: Default decompression-bomb limit (pixels): PIL's default warning threshold (~89.5 MP, 1 GiB of RGBA / 4 /
#: 3). Every camera photo up to ~89 MP passes; PIL itself only *refuses* at twice this.
DEFAULT_MAX_PIXELS: int = 1024 * 1024 * 1024 // 4 // 3

#: Lower-case file suffixes (with the dot) that folder scans treat as images; compare case-insensitively.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

# PIL plugins allowed to decode. Restricting ``Image.open(formats=...)`` keeps exotic decoders (EPS runs
# Ghostscript, PSD, FITS, ...) away from untrusted training data. "JPEG" also opens MPO (multi-picture
# JPEG from phones and 3D cameras).
_PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "DIB", "GIF", "WEBP", "TIFF")

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = 255


class BadImageError(UserError, ValueError):
    """An image file that cannot be turned into an RGB array.

    Attributes:
        path: the file, as given.
        reason: short, human-readable cause ("file not found", "empty file", "truncated image data (...)", ...).

    Example:
        >>> try:
        ...     load_image("missing.jpg")
        ... except BadImageError as err:
        ...     print(err.reason)
        file not found
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"bad image {self.path!r}: {reason}")

    def __reduce__(self):  # keep path/reason when crossing process boundaries (DataLoader workers)
        return (type(self), (self.path, self.reason))


# --- truncation guard ------------------------------------------------------------------------------------

_guard_lock = threading.Lock()
_guard_depth = 0
_guard_restore = False


@contextmanager
def _refuse_truncated() -> Iterator[None]:
    """Make PIL raise on truncated data while inside, even if someone set LOAD_TRUNCATED_IMAGES = True."""
    global _guard_depth, _guard_restore
    with _guard_lock:
        if _guard_depth == 0 and ImageFile.LOAD_TRUNCATED_IMAGES:
            _guard_restore = True
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _guard_depth += 1
    try:
        yield
    finally:
        with _guard_lock:
            _guard_depth -= 1
            if _guard_depth == 0 and _guard_restore:
                ImageFile.LOAD_TRUNCATED_IMAGES = True
                _guard_restore = False


# Image.open uses warnings for its bomb check; catch_warnings mutates process-wide filters, so it is
# serialised. Only header parsing runs under this lock, decoding runs in parallel.
_open_lock = threading.Lock()


def _open_header(path: Path) -> Image.Image:
    """Image.open (header only), with PIL's bomb warning caught locally and other warnings passed on."""
    with _open_lock, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = Image.open(path, formats=_PIL_FORMATS)
    for w in caught:
        # PIL's warning threshold is a global we do not rely on: max_pixels decides (see load_image).
        if not issubclass(w.category, Image.DecompressionBombWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return img


def _decode_error_reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "truncat" in str(exc).lower() or isinstance(exc, EOFError):
        return f"truncated image data ({text})"
    return f"corrupt image data ({text})"


# --- mode conversion -------------------------------------------------------------------------------------


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    # exact integer "over" on white, rounded: alpha=255 keeps the colour, alpha=0 gives white
    out = (rgb * alpha + _WHITE * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16"):
        # 16-bit grayscale: scale (not clip) to 8 bits. np.array honours the byte order of I;16B.
        wide = np.array(img).astype(np.uint32)
        return _gray_to_rgb(((wide + 128) // 257).astype(np.uint8))
    if mode == "I":
        wide = np.clip(np.array(img, dtype=np.int64), 0, 65535)
        return _gray_to_rgb(((wide + 128) // 257).astype(np.uint8))
    if mode == "F":
        flt = np.nan_to_num(np.array(img, dtype=np.float32), nan=0.0)
        return _gray_to_rgb(np.clip(np.rint(flt), 0, 255).astype(np.uint8))
    if mode == "CMYK":
        return np.array(_cmyk_to_rgb(img))
    if mode in _ALPHA_MODES or "transparency" in img.info:
        return _composite_on_white(np.array(img.convert("RGBA")))
    if mode == "L":
        return _gray_to_rgb(np.array(img))
    if mode == "RGB":
        return np.array(img)
    return np.array(img.convert("RGB"))  # 1, P, YCbCr, HSV, RGBX, LAB, ...


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
            if out is not None:
                return out
        except Exception:  # broken/unsupported profile or no littlecms: fall back to PIL's formula
            pass
    # PIL undoes Adobe's inverted CMYK on read, so its plain conversion is right for profile-less files.
    return img.convert("RGB")


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # unreadable EXIF: the pixels are still fine
        return img
    if orientation in (None, 1):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


# --- header stage, shared by load_image and scan_image --------------------------------------------------


def _open_checked(path: str | os.PathLike[str], max_pixels: int | None) -> tuple[Image.Image, int]:
    """Everything :func:`load_image` checks before decoding: the file (exists, regular, not empty), the header
    (a supported image format, under PIL's hard bomb limit) and ``max_pixels``.

    Returns:
        ``(img, size)``: the opened, not yet decoded image (the caller closes it) and the file's size in bytes.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except OSError as exc:
        raise BadImageError(path, f"cannot read ({type(exc).__name__}: {exc})") from None
    if not p.is_file():
        raise BadImageError(path, "not a regular file")
    if st.st_size == 0:
        raise BadImageError(path, "empty file")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")

    try:
        img = _open_header(p)
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image (unrecognised or unsupported format)") from None
    except Image.DecompressionBombError as exc:
        raise BadImageError(path, f"exceeds PIL's decompression-bomb limit ({exc})") from None
    except PermissionError as exc:
        raise BadImageError(path, f"cannot read ({type(exc).__name__}: {exc})") from None
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error, ... on broken headers
        raise BadImageError(path, _decode_error_reason(exc)) from None

    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise BadImageError(
            path, f"image is {width}x{height} = {width * height} pixels, exceeds max_pixels={max_pixels}"
        )
    return img, st.st_size


# --- public API --------------------------------------------------------------------------------------------


def load_image(
    path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int | None = None
) -> np.ndarray:
    """Read an image file as an ``HxWx3`` uint8 RGB array, or raise :class:`BadImageError`.

    See the module docstring for the full "input → outcome" table: EXIF orientation applied, transparency
    composited on white, CMYK / 16-bit / palette / grayscale converted, truncated or non-image files and
    decompression bombs refused with the reason.

    Args:
        path: the image file.
        max_pixels: refuse images with ``width * height > max_pixels``, checked from the header before
            decoding. ``None`` disables this limit (PIL's own hard limit, twice ``Image.MAX_IMAGE_PIXELS``,
            still refuses).
        min_side: decode a JPEG at a reduced scale (1/2, 1/4 or 1/8: the decoder's DCT scaling, several times
            faster than a full decode) as long as both sides stay ``>= min_side``; other formats and ``None``:
            full size. Nothing is resized here (see :func:`visiontune.data.decoded.reduce_image`).

    Returns:
        A C-contiguous, writable ``(height, width, 3)`` ``uint8`` array.

    Raises:
        BadImageError: the file is missing, empty, not an image, truncated, corrupt or too large.

    Example:
        >>> arr = load_image("birds/robin/001.jpg")  # doctest: +SKIP
        >>> arr.shape, arr.dtype  # doctest: +SKIP
        ((375, 500, 3), dtype('uint8'))
    """
    img = _open_checked(path, max_pixels)[0]
    with img:
        if min_side and img.format in ("JPEG", "MPO"):
            img.draft(img.mode, (int(min_side), int(min_side)))
        try:
            with _refuse_truncated():
                img.load()  # decode everything here, so truncation surfaces inside this try
        except MemoryError:
            raise
        except Exception as exc:
            raise BadImageError(path, _decode_error_reason(exc)) from None
        try:
            oriented = _apply_exif_orientation(img)
            return np.ascontiguousarray(_to_rgb_array(oriented), dtype=np.uint8)
        except MemoryError:
            raise
        except Exception as exc:
            reason = f"cannot convert mode {img.mode!r} to RGB ({type(exc).__name__}: {exc})"
            raise BadImageError(path, reason) from None


def scan_image(path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """The cheap check of an image file, without decoding its pixels; raises :class:`BadImageError` like
    :func:`load_image` would.

    Checks the file (missing, not a regular file, empty), the header (not an image or an unsupported format,
    corrupt header, PIL's hard bomb limit), the pixel count against ``max_pixels`` (decompression bombs) and
    whether the data is complete: a JPEG's end-of-image marker, a PNG's ``IEND`` chunk, a GIF's trailer, a
    WebP's RIFF length, the strip/tile extents of a TIFF and the file size a BMP header declares. A file that
    fails the completeness check is decoded with :func:`load_image` to confirm it (and to name the reason),
    so a file this refuses is one training could not read. What it cannot see: damage in the middle of the
    compressed data of a complete file (bit flips); :func:`load_image` still refuses those when they are read.

    Cost: one ``stat``, the header parse and a read of the last KiB: about 0.2 ms a JPEG, whatever its size
    (measured in :func:`visiontune.data.scan.check_images`).

    Example:
        >>> scan_image("birds/robin/001.jpg")  # doctest: +SKIP
    """
    img, size = _open_checked(path, max_pixels)
    with img:
        complete = _looks_complete(img, Path(path), size)
    if not complete:
        load_image(path, max_pixels=max_pixels)  # raises the precise reason; a file PIL can decode passes


_TAIL = 1024  # bytes read from the end of a file to find its end marker


def _looks_complete(img: Image.Image, path: Path, size: int) -> bool:
    """Whether the file holds all the data its header announces (cheap: no decoding). ``False`` = suspect."""
    fmt = img.format
    try:
        if fmt in ("JPEG", "MPO", "PNG", "GIF"):
            with path.open("rb") as f:
                f.seek(max(0, size - _TAIL))
                tail = f.read().rstrip(b"\x00")  # some writers pad with zeros after the end marker
            # the file must end with its end marker: one further inside (an EXIF thumbnail's) proves nothing;
            # a complete file with bytes after its marker is merely decoded to make sure
            if fmt == "PNG":
                return tail[-8:-4] == b"IEND"  # the IEND chunk: length 0, type, CRC
            if fmt == "GIF":
                return tail.endswith(b";")  # the GIF trailer
            return tail.endswith(b"\xff\xd9")  # JPEG end-of-image (MPO: that of the last picture)
        if fmt == "WEBP":
            with path.open("rb") as f:
                head = f.read(8)
            return len(head) == 8 and int.from_bytes(head[4:8], "little") + 8 <= size
        if fmt == "TIFF":
            tags = getattr(img, "tag_v2", {})
            for offsets_tag, counts_tag in ((273, 279), (324, 325)):  # strips, tiles
                offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
                if offsets is not None and counts is not None:
                    offsets = offsets if isinstance(offsets, tuple) else (offsets,)
                    counts = counts if isinstance(counts, tuple) else (counts,)
                    if max((o + c for o, c in zip(offsets, counts)), default=0) > size:
                        return False
            return True
        if fmt in ("BMP", "DIB"):
            with path.open("rb") as f:
                head = f.read(6)
            declared = int.from_bytes(head[2:6], "little") if head[:2] == b"BM" else 0
            if declared > size:
                return False
        # any format: every tile of data PIL will read must start inside the file
        return all(tile[2] < size for tile in (img.tile or []))
    except (OSError, TypeError, ValueError, IndexError):  # odd headers: let the decoder decide
        return False


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive); the content is not read.

    Args:
        path: a file name or path.

    Example:
        >>> is_image_file("a/B.JPG"), is_image_file("notes.txt")
        (True, False)
    """
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_hidden(name: str) -> bool:
    """Whether folder scans skip a file or folder of this name (the one rule for every scan in visiontune).

    Hidden: dot-names (``.git``, ``.ipynb_checkpoints``, ``.DS_Store``, macOS ``._photo.jpg`` resource forks)
    and ``__MACOSX``, the metadata folder of zips made on macOS (it holds only such ``._*`` copies).
    Any other name is data: ``_background/`` or ``__init__/`` are ordinary class folders.

    Example:
        >>> is_hidden(".git"), is_hidden("__MACOSX"), is_hidden("_background"), is_hidden("bird")
        (True, True, False, False)
    """
    return name.startswith(".") or name == "__MACOSX"
