"""Real colour image-classification sets, built offline from images that ship inside Debian packages.

Sets (``available_sets()``), from ``apt-get download`` (bookworm; the pinned version) and ``dpkg-deb -x``:

``photos``: photographs, 12 classes (folders and files of each in ``SETS``): bird, coin, flower, fruit,
  household, mammal, monument, sea_life, space, tool, vegetable, vehicle, from
  * ``tuxpaint-stamps-default`` 2022.06.04-1 (GPL-2): Tux Paint's cut-out photo stamps (PNG + alpha) in
    category folders (``animals/birds``, ``food/fruit``, ...), without the ``cartoon/`` and ``toys/`` ones;
  * ``gcompris-qt-data`` 3.1-2 (GPL-3+): GCompris' WebP photos in Qt resource bundles (``*.rcc``, read by
    ``_unpack_rcc``) of the activities erase, explore_*_animals, categorization, explore_monuments, solar_system;
  * ``tuxpaint-data`` 1:0.9.28-sdl2-1 (GPL-2+): 14 template photos (bark, rocks, waves, sky, trees, ...),
    only as backdrops: a stamp is pasted at a random place on a random crop of one, faded towards a
    light colour (seeded per file), so that a plain border does not tell a stamp from a GCompris photo.
  All are resized to exactly ``MAX_SIDE`` px on the long side (small stamps upscaled: the size does not
  tell the class; the small ones, fruit, vegetable, coin: 50-110 px, stay softer than the rest).
``art4apps``: painted clip art, 200x200 JPEG on white, kept as is, 10 classes: actions, animals, body,
  clothes, construction, food, fruit_veg, jobs, people, sport (its folders but the small nature, transport),
  from ``pysiogame`` 4.20.01-1, ``res/images/art4apps/`` (Art4Apps drawings; Debian's copyright file says
  GPL-3+, and public domain for ``images/*``: check Art4Apps' own licence before redistributing).

Dropped: near-duplicates (by a 256-bit difference hash of the object and of its mirror image: the
``*_mirror.png`` stamps, a photo in two activities), near-grey (tintable stamps) and tiny images, classes
under the set's minimum. A seeded, stratified 75/25 split, which keeps same-named files (``3_earth.png``,
``earth.webp``) on one side, writes ``train/<class>/*.jpg``, ``test/<class>/*.jpg`` (RGB JPEG, quality 95)
and ``manifest.json`` (counts, package versions, what was dropped, each file's source).

    python benchmarks/photosets.py [--only photos] [--cache DIR]   # build (or find), print the counts

Needs ``apt-get``, ``dpkg-deb`` (root for ``apt-get update`` if a download fails); ``<cache>/debs/*.deb``
are used as is. From scratch about a minute (~215 MB of packages); delete a set's folder to rebuild it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

CACHE = "~/.cache/visiontune/photosets"
RECIPE = 1  # bump when anything below changes what gets built
MAX_SIDE, MIN_SIDE, TEST_FRACTION = 256, 48, 0.25
HASH_BITS_DIFF = 24  # of 256: closer than this, two images (or one and the other's mirror) are duplicates
MIN_COLOURFULNESS = 4.0  # Hasler-Suesstrunk metric on the opaque pixels; below it an image counts as grey
LANCZOS = Image.Resampling.LANCZOS

TUX = "tuxpaint-stamps-default:usr/share/tuxpaint/stamps/"
GC = "gcompris-qt-data:rcc/gcompris/src/activities/"
ERASE, CAT = GC + "erase/resource/", GC + "categorization/resource/images/"
WORLD, FARM = GC + "explore_world_animals/resource/animals/", GC + "explore_farm_animals/resource/animals/"
A4A = "pysiogame:usr/share/games/pysiogame/res/images/art4apps/"

# A class is a list of "package:glob" patterns ({a,b} alternatives allowed); a file goes to the first match.
SETS: dict[str, dict] = {
    "photos": {
        "packages": {"tuxpaint-stamps-default": "2022.06.04-1", "gcompris-qt-data": "3.1-2",
                     "tuxpaint-data": "1:0.9.28-sdl2-1"},
        "backdrops": "tuxpaint-data:usr/share/tuxpaint/templates/{burnt_bark,cliff,corn_maze,mossy_log,mudstone,"
                     "ocean_splash,ocean_waves,redwoods_above,rocks,spiders_web,sun_behind_clouds,"
                     "sun_behind_leaves,trees_above,trees_at_dusk}.jpg",
        "exact_side": True, "min_per_class": 15, "exclude": r"/cartoon/|/toys/",
        "classes": {
            "bird": [TUX + "animals/birds/*.png", WORLD + "scarlet_macaw.webp", FARM + "{chicken,duck,owl}.webp",
                     ERASE + "{gosling,heron,kingfisher,northern_harrier,penguin,spoonbills,swans,toucan}.webp"],
            "mammal": [TUX + "animals/{mammals/**,marsupials}/*.png", FARM + "{cat,cow,dog,horse,pig,sheep}.webp",
                       ERASE + "{alpaca,calf,camels,cheetah,dolphin,flying_fox,gibbon,giraffe,goat,gorilla,horse,"
                               "kitten,long_nosed_monkey,macaque,meerkats,nubian_ibex,pika,red_panda,rhinoceros,"
                               "squirrel}.webp",
                       WORLD + "{bison,giraffe,hedgehog,jaguar,kangaroo,koala,lemur,moose,narwhal,panda,"
                               "polar_bear}.webp"],
            "sea_life": [TUX + "animals/{fish,shellfish}/*.png", ERASE + "crab.webp", CAT + "fishes/*.webp"],
            "fruit": [TUX + "food/{fruit,nuts}/*.png"], "vegetable": [TUX + "food/{vegetables,spices}/*.png"],
            "flower": [TUX + "plants/flowers/**/*.png"], "vehicle": [TUX + "{vehicles/**,military/vehicles}/*.png"],
            "tool": [TUX + "household/tools/*.png", CAT + "tools/*.webp"],
            "household": [TUX + "household/{,dishes/**/,arttools/**/}*.png", CAT + "others/{blackslate,bucket,"
                          "buffetset,bulb,chair,cup,erasers,knife,pan,pencil,pillow,plate,spoons,weighingMachine}"
                          ".webp"],
            "coin": [TUX + "symbols/money/{*/coins,japanese}/*.png"],
            "monument": [TUX + "town/monuments/*.png", CAT + "monuments/*.webp", GC + "explore_monuments/*/*/*.webp"],
            "space": [TUX + "space/**/*.png", GC + "solar_system/resource/*.webp"],
        },
    },
    "art4apps": {
        "packages": {"pysiogame": "4.20.01-1"},
        "min_per_class": 25,
        "classes": {c: [A4A + folder + "/*.jpg"] for c, folder in {
            "actions": "actions", "animals": "animals", "body": "body", "clothes": "clothes_n_accessories",
            "construction": "construction", "food": "food", "fruit_veg": "fruit_n_veg", "jobs": "jobs",
            "people": "people", "sport": "sport"}.items()},  # nature, transport: 19 each
    },
}


def available_sets() -> list[str]:
    return list(SETS)


def _fetch(pkg: str, version: str, cache: Path) -> tuple[Path, str]:
    """Download and unpack ``pkg`` under ``cache`` (once); return (unpacked root, version)."""
    debs, root = cache / "debs", cache / "raw" / pkg
    debs.mkdir(parents=True, exist_ok=True)

    def download() -> bool:
        return any(subprocess.run(["apt-get", "download", spec], cwd=debs, capture_output=True).returncode == 0
                   for spec in (f"{pkg}={version}", pkg))
    if not list(debs.glob(f"{pkg}_*.deb")) and not download():
        subprocess.run(["apt-get", "update"], capture_output=True)  # no (or stale) package lists
        if not download():
            raise RuntimeError(f"apt-get download {pkg} failed (unknown package, or no network)")
    deb = sorted(debs.glob(f"{pkg}_*.deb"))[-1]
    got = subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True, check=True).stdout.strip()
    if not (root / ".done").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
        for rcc in sorted(root.glob("usr/share/*/rcc/*.rcc")):
            _unpack_rcc(rcc.read_bytes(), root / "rcc")
        for f in [f for f in root.rglob("*") if f.is_file() and f.suffix.lower() not in (".png", ".jpg", ".webp")]:
            f.unlink()  # sounds, translations, the rcc files: ~60% of the space
        (root / ".done").write_text(got)
    return root, got


def _unpack_rcc(blob: bytes, out: Path) -> None:
    """Write the images in a Qt resource bundle (rcc format 1-3, zlib or stored) under ``out``."""
    version, tree, data, names = struct.unpack(">4xIIII", blob[:20])
    entry = 22 if version >= 2 else 14

    def walk(i: int, prefix: str) -> None:
        e = tree + i * entry
        name_at, flags = struct.unpack(">IH", blob[e:e + 6])
        n = struct.unpack(">H", blob[names + name_at:names + name_at + 2])[0]
        path = prefix + "/" + blob[names + name_at + 6:names + name_at + 6 + 2 * n].decode("utf-16-be") if i else ""
        if flags & 2:  # a directory: its children are the entries [first, first + count)
            count, first = struct.unpack(">II", blob[e + 6:e + 14])
            for j in range(first, first + count):
                walk(j, path)
        elif path.lower().endswith((".webp", ".png", ".jpg")) and not flags & 4:  # flag 4: zstd
            at = data + struct.unpack(">I", blob[e + 10:e + 14])[0]
            raw = blob[at + 4:at + 4 + struct.unpack(">I", blob[at:at + 4])[0]]
            target = out / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zlib.decompress(raw[4:]) if flags & 1 else raw)
    walk(0, "")


def _expand(pattern: str) -> list[str]:
    """``a{b,c}d`` -> ``["abd", "acd"]``."""
    if not (m := re.search(r"\{([^}]*)\}", pattern)):
        return [pattern]
    return [p for alt in m.group(1).split(",") for p in _expand(pattern[:m.start()] + alt + pattern[m.end():])]


def _dhash(gray: Image.Image) -> np.ndarray:
    a = np.asarray(gray.resize((17, 16), Image.Resampling.BILINEAR), dtype=np.float32)
    return (a[:, 1:] > a[:, :-1]).ravel()


def _backdrop(w: int, h: int, rng: random.Random, backdrops: list[Image.Image]) -> np.ndarray:
    """An h x w x 3 backdrop: a light colour, or a random crop of a backdrop photo faded towards it."""
    colour = rng.uniform(150, 245) + np.array([rng.uniform(-20, 20) for _ in range(3)])
    if not backdrops:
        return np.broadcast_to(colour, (h, w, 3))
    photo = rng.choice(backdrops)
    s = rng.uniform(0.3, 1.0) * min(photo.width / w, photo.height / h)
    x, y = rng.uniform(0, photo.width - s * w), rng.uniform(0, photo.height - s * h)
    crop = photo.resize((w, h), LANCZOS, box=(x, y, x + s * w, y + s * h))
    fade = rng.uniform(0.0, 0.4)  # and a random mirror image
    return np.asarray(crop, dtype=np.float32)[:, :: rng.choice((1, -1))] * (1 - fade) + colour * fade


def _load(path: Path, seed: str, backdrops: list[Image.Image], exact: bool) -> tuple[Image.Image, np.ndarray, float]:
    """(RGB image, its and its mirror's hash, colourfulness); a cut-out gets a backdrop around it."""
    im = Image.open(path)
    im = im.convert("RGBA") if im.mode in ("RGBA", "LA", "PA", "P") or "transparency" in im.info else im.convert("RGB")
    if im.mode == "RGBA":  # an opaque one is a photo; otherwise keep the object alone, without its padding
        im = im.convert("RGB") if im.getchannel("A").getextrema()[0] == 255 else im.crop(im.getchannel("A").getbbox())
    im.thumbnail((MAX_SIDE, MAX_SIDE), LANCZOS)
    a = np.asarray(im, dtype=np.float32)
    alpha = a[..., 3:] / 255.0 if im.mode == "RGBA" else np.ones_like(a[..., :1])
    grey = Image.fromarray((a[..., :3] * alpha + 128 * (1 - alpha)).astype(np.uint8)).convert("L")
    hashes = np.stack([_dhash(grey), _dhash(grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
    opaque = a[alpha[..., 0] > 0.5][:, :3]
    rg, yb = opaque[:, 0] - opaque[:, 1], (opaque[:, 0] + opaque[:, 1]) / 2 - opaque[:, 2]
    colourful = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())) if len(opaque) else 0.0
    if im.mode == "RGBA":  # paste the cut-out at a random place on a canvas 1.2-1.6 times its size
        rng = random.Random(seed)
        w, h = round(im.width * rng.uniform(1.2, 1.6)), round(im.height * rng.uniform(1.2, 1.6))
        x, y = rng.randint(0, w - im.width), rng.randint(0, h - im.height)
        canvas = _backdrop(w, h, rng, backdrops).copy()
        region = canvas[y:y + im.height, x:x + im.width]
        region[:] = a[..., :3] * alpha + region * (1 - alpha)
        im = Image.fromarray(np.round(np.clip(canvas, 0, 255)).astype(np.uint8))
    if max(im.size) > MAX_SIDE or (exact and max(im.size) >= MIN_SIDE):
        im = ImageOps.contain(im, (MAX_SIDE, MAX_SIDE), LANCZOS)  # up or down to MAX_SIDE
    return im, hashes, colourful


def _counts(root: Path) -> dict[str, dict[str, int]]:
    classes = sorted({p.name for split in ("train", "test") for p in (root / split).glob("*") if p.is_dir()})
    return {c: {s: len(list((root / s / c).glob("*.jpg"))) for s in ("train", "test")} for c in classes}


def build(name: str, cache_dir: str | Path = CACHE) -> Path:
    """Build set ``name`` under ``cache_dir`` unless already there; return its root (``train/``, ``test/``)."""
    if name not in SETS:
        raise ValueError(f"unknown set {name!r}; available: {', '.join(SETS)}")
    spec, cache = SETS[name], Path(cache_dir).expanduser()
    root = cache / name
    old = json.loads((root / "manifest.json").read_text()) if (root / "manifest.json").exists() else {}
    if old.get("recipe") == RECIPE and old.get("counts") == _counts(root):  # already built
        return root
    fetched = {pkg: _fetch(pkg, version, cache) for pkg, version in spec["packages"].items()}

    def files(pattern: str) -> list[Path]:
        pkg, rel = pattern.split(":", 1)
        return sorted(fetched[pkg][0].glob(rel))
    backdrops = [Image.open(f).convert("RGB") for p in _expand(spec.get("backdrops", "")) if p for f in files(p)]
    exclude = re.compile(spec.get("exclude", r"(?!)"))
    hashes: list[np.ndarray] = []
    kept: dict[str, list[tuple[str, Image.Image]]] = {}
    dropped: dict[str, list[str]] = {"duplicate": [], "grey": [], "tiny": [], "small_class": []}
    seen: set[Path] = set()
    for cls, patterns in spec["classes"].items():
        for f in (f for pat in patterns for p in _expand(pat) for f in files(p)):
            if f in seen or exclude.search(f.as_posix()):
                continue
            seen.add(f)
            source = f.relative_to(cache / "raw").as_posix()
            im, h, colourful = _load(f, f"{name}:{source}", backdrops, spec.get("exact_side", False))
            if max(im.size) < MIN_SIDE:
                dropped["tiny"].append(source)
            elif colourful < MIN_COLOURFULNESS:
                dropped["grey"].append(source)
            elif hashes and (np.stack(hashes)[:, None] != h[None]).sum(-1).min() < HASH_BITS_DIFF:
                dropped["duplicate"].append(source)
            else:
                hashes.extend(h)
                kept.setdefault(cls, []).append((source, im))
    for cls in [c for c, items in kept.items() if len(items) < spec["min_per_class"]]:
        dropped["small_class"].append(f"{cls}: {len(kept.pop(cls))}")
    tmp, sources = cache / f".{name}.tmp", {}
    shutil.rmtree(tmp, ignore_errors=True)
    for cls, items in kept.items():
        groups: dict[str, list[int]] = {}  # images of one name (3_earth.png, earth.webp) go to one side
        for i, (source, _) in enumerate(items):
            groups.setdefault(re.sub(r"^\d+_|[^a-z0-9]", "", Path(source).stem.lower()), []).append(i)
        keys, test = sorted(groups), set()
        random.Random(f"{name}:{cls}").shuffle(keys)
        for key in keys:
            if len(test) < max(1, round(TEST_FRACTION * len(items))):
                test.update(groups[key])
        for i, (source, im) in enumerate(items):
            stem = re.sub(r"[^A-Za-z0-9]+", "_", Path(source).stem)
            out = tmp / ("test" if i in test else "train") / cls / f"{i:03d}_{stem}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            im.save(out, quality=95)
            sources[out.relative_to(tmp).as_posix()] = source
    info = {"recipe": RECIPE, "name": name, "packages": {p: v for p, (_, v) in fetched.items()},
            "counts": _counts(tmp), "dropped": dropped, "sources": dict(sorted(sources.items()))}
    (tmp / "manifest.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=available_sets(), help="build just this set")
    parser.add_argument("--cache", default=CACHE, help=f"cache folder (default {CACHE})")
    args = parser.parse_args(argv)
    for name in [args.only] if args.only else available_sets():
        root = build(name, args.cache)
        counts = json.loads((root / "manifest.json").read_text())["counts"]
        train, test = (sum(v[s] for v in counts.values()) for s in ("train", "test"))
        print(f"{name}: {len(counts)} classes, {train} train + {test} test images, {root}")
        print("  per class (train+test): " + ", ".join(f"{c} {v['train']}+{v['test']}" for c, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
