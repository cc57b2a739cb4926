"""Shared fixtures: small generated image folders and CSVs, offline and fast."""

from __future__ import annotations

import copy
import functools
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# One OpenMP thread per test process (and per notebook kernel or CLI subprocess it starts): the suite runs
# one pytest-xdist worker per core (``-n auto`` in pyproject), so a second thread would only contend.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# One intra-op thread for the whole suite: the models here are tiny (32-64 px), where a second OpenMP
# thread gains little and, on a shared 2-core machine, spin-waiting workers were measured 5-100x slower.
torch.set_num_threads(1)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_image(colour: tuple[int, int, int], seed: int, size: int = 24) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_folder(root: Path, per_class: int = 6, classes: dict | None = None, ext: str = ".png") -> Path:
    """root/<class>/<i>.png with per-class colours (easy to learn)."""
    classes = classes or COLOURS
    for ci, (name, colour) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(colour, seed=ci * 1000 + i).save(root / name / f"{i}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "images")


@pytest.fixture
def image_csv(tmp_path: Path) -> Path:
    root = make_folder(tmp_path / "pool")
    lines = ["path,label"]
    for p in sorted(root.rglob("*.png")):
        lines.append(f"{p.relative_to(tmp_path).as_posix()},{p.parent.name}")
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


TINY_MODELS = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}),
    "resnet18": ("resnet18", {}),
    "lite0": ("tf_efficientnet_lite0", {}),
}


@functools.lru_cache(maxsize=None)
def tiny_base(kind: str, num_classes: int = 5) -> torch.nn.Module:
    """A seeded, random-init tiny timm model in eval mode (cached: copy it before changing it)."""
    import timm

    torch.manual_seed(0)
    name, kwargs = TINY_MODELS[kind]
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()


def tiny_model(kind: str, num_classes: int = 5) -> torch.nn.Module:
    """A fresh copy of :func:`tiny_base`."""
    return copy.deepcopy(tiny_base(kind, num_classes))


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Logits of two builds of one network agree: to 1e-5 relative (channels-last and contiguous convolutions
    differ in the last bits; a wrong weight, head row or merge moves logits by far more)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def perturb_delta(net: torch.nn.Module, seed: int, *, stats: bool = True, var: bool = False) -> None:
    """Move every tensor a task delta holds, as training would (sparse: inside the masks only).

    ``stats`` also moves BatchNorm running means (``var``: and variances), so a delta round trip that
    forgot them cannot pass.
    """
    from visiontune.strategies.sparse import sparse_masks

    g = torch.Generator().manual_seed(seed)
    masks = sparse_masks(net)
    for name, p in net.named_parameters():
        if name in net.visiontune_delta:
            noise = torch.randn(p.shape, generator=g) * 0.05
            p.add_(noise * masks[name] if name in masks else noise)
    for m in net.modules():
        if stats and isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            if var:
                m.running_var.mul_(1 + torch.rand(m.running_var.shape, generator=g))


@pytest.fixture(scope="session")
def photos_root() -> Path:
    """The held-in real photo set of ``benchmarks/photosets.py`` (12 classes, ``train/`` + ``test/``).

    Built on first use from Debian packages (``apt-get download``, about a minute) and cached under
    ``~/.cache/visiontune/photosets`` (``VISIONTUNE_PHOTOSETS`` overrides the folder); later runs reuse it.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "photosets", Path(__file__).resolve().parents[1] / "benchmarks" / "photosets.py")
    photosets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(photosets)
    return photosets.build("photos", os.environ.get("VISIONTUNE_PHOTOSETS", photosets.CACHE))


def pytest_collection_modifyitems(config, items):
    """Real runs (``slow``) first, so the pytest-xdist workers do not end on one long test; tests marked
    ``nightly`` (long real runs) run only with ``VISIONTUNE_NIGHTLY=1``."""
    items.sort(key=lambda item: "slow" not in item.keywords)  # stable: file order kept within each group
    if os.environ.get("VISIONTUNE_NIGHTLY") == "1":
        return
    skip = pytest.mark.skip(reason="nightly: set VISIONTUNE_NIGHTLY=1 to run")
    for item in items:
        if "nightly" in item.keywords:
            item.add_marker(skip)
