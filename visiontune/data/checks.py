"""``visiontune check-data``: validate a dataset before training — structure and every image — in one pass.

    visiontune check-data --config configs/finetune.yaml --data.train photos/ --data.val val/
    visiontune check-data --data.train data/train --data.val data/val --json report.json

It reads the config ``visiontune fit --config`` takes, through the same parser (:mod:`visiontune.cli.config`):
the ``data:`` section and every ``--data.*`` override, spelled as for ``fit``; its own options are ``--json`` and
``--workers``. Checks, all reported together: every structural problem the datamodule would raise (empty class
folders, CSV rows naming missing files or empty labels, labels outside ``data.classes``, val/test classes that
training lacks, classes with fewer images than ``data.labels_per_class``), then every image file of every split
decoded with :func:`visiontune.data.images.load_image` (truncated, empty, not an image, too large...). Prints
images per class and split, then the problems. Exit code 0 when clean, 1 when anything is wrong, 2 for bad
arguments or a bad config key.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["check_data", "main"]

ROLES = ("train", "val", "test", "unlabeled", "predict")


def _own_options(parser: Any) -> None:
    """check-data's options, next to fit's (the data options come from the ``data:`` section / ``--data.*``)."""
    from typing import Optional

    parser.add_argument("--workers", type=Optional[int], default=None,
                        help="threads decoding images (default: CPU count, <= 8)")
    parser.add_argument("--json", type=Optional[str], default=None, help="also write the report as JSON to this file")


def check_data(workers: int | None = None, **data: Any) -> dict[str, Any]:
    """Check a dataset as ``ImageDataModule(**data)`` would read it; returns the report (see module doc).

    Returns:
        ``{"ok", "problems": [...], "bad_images": [{"split", "path", "reason"}], "images_checked",
        "counts": {split: {class: n}}, "classes": [...]}``.

    Example:
        >>> report = check_data(train="data/train", val="data/val")  # doctest: +SKIP
        >>> report["ok"], report["problems"][:1]  # doctest: +SKIP
        (False, ['train: class folder data/train/owl has no images'])
    """
    import numpy as np

    from .datamodule import ImageDataModule
    from .images import DEFAULT_MAX_PIXELS
    from .sources import DataError, read_source
    from .validate import find_bad_images

    kwargs = {k: v for k, v in data.items() if v is not None}
    if isinstance(kwargs.get("classes"), str):
        kwargs["classes"] = [c.strip() for c in kwargs["classes"].split(",") if c.strip()]
    problems: list[str] = []
    # 1. structure: exactly what training would raise, every split at once
    dm = None
    try:
        dm = ImageDataModule(**{**kwargs, "num_workers": 0, "on_bad_image": "error"})
        dm._scan_files = False  # every image is decoded below: no setup scan listing them a second time
        dm.setup("fit" if kwargs.get("train") is not None else "validate")
    except DataError as err:
        problems += err.problems
        dm = dm if dm is not None and dm.train_set is not None else None
    except TypeError as err:  # an unknown option
        raise SystemExit(f"visiontune check-data: {err}") from None
    # 2. every image file of every split
    bad: list[dict[str, Any]] = []
    checked = 0
    counts: dict[str, dict[str, int]] = {}
    classes: list[str] = []
    for role in ROLES:
        src = kwargs.get(role)
        if src is None or (role == "unlabeled" and src == "rest"):
            continue
        try:
            samples = read_source(src, labeled=role not in ("unlabeled", "predict"))
        except DataError:  # already among the problems; still check the images of a class-folder tree
            samples = _folder_fallback(src)
            if samples is None:
                continue
        idx, records, n = find_bad_images(samples, role, max_pixels=kwargs.get("max_pixels", DEFAULT_MAX_PIXELS),
                                          workers=workers)
        bad += records
        checked += n
        if role not in ("unlabeled", "predict"):
            classes = classes or list(samples.class_names)
            counts[role] = {c: int(k) for c, k in zip(samples.class_names,
                                                      np.bincount(samples.labels, minlength=len(samples.class_names)))}
        else:
            counts[role] = {"(unlabeled)": len(samples)}
    # after the split, per class (what training will actually see)
    if dm is not None:
        classes = list(dm.class_names or classes)
        for role in ("train", "val", "test", "unlabeled"):
            ds = getattr(dm, f"{role}_set")
            if ds is not None and role != "unlabeled":
                labels = ds.samples.labels
                counts[role] = {c: int(k) for c, k in zip(classes, np.bincount(labels, minlength=len(classes)))}
            elif ds is not None:
                counts[role] = {"(unlabeled)": len(ds)}
    return {"ok": not problems and not bad, "problems": problems, "bad_images": bad, "images_checked": checked,
            "counts": counts, "classes": classes}


def _folder_fallback(src: Any):
    """The images of a ``root/<class>/`` tree that failed a structure check (e.g. one empty class folder)."""
    import numpy as np

    from .scan import find_images
    from .sources import Samples, class_folders

    root = Path(str(src))
    if not root.is_dir():
        return None
    names = class_folders(root)
    files = [f for f in find_images(root) if len(f.relative_to(root).parts) > 1]
    labels = np.asarray([names.index(f.relative_to(root).parts[0]) for f in files], dtype=np.int64)
    return Samples(files, labels, names, str(root))


def format_report(report: dict[str, Any]) -> str:
    """The report as text: a class × split table, then problems, then bad images."""
    lines = []
    counts = report["counts"]
    roles = [r for r in ROLES if r in counts]
    labeled = [r for r in roles if r not in ("unlabeled", "predict")]
    if labeled:
        names = report["classes"] or sorted({c for r in labeled for c in counts[r]})
        width = max([5, *map(len, names)])
        lines.append(f"{'class':<{width}}  " + "  ".join(f"{r:>7}" for r in labeled))
        for c in names:
            lines.append(f"{c:<{width}}  " + "  ".join(f"{counts[r].get(c, 0):>7}" for r in labeled))
        lines.append(f"{'total':<{width}}  " + "  ".join(f"{sum(counts[r].values()):>7}" for r in labeled))
    for r in roles:
        if r not in labeled:
            lines.append(f"{r}: {sum(counts[r].values())} images")
    lines.append(f"checked {report['images_checked']} image files: "
                 f"{report['images_checked'] - len(report['bad_images'])} ok, {len(report['bad_images'])} bad")
    if report["problems"]:
        lines.append(f"{len(report['problems'])} dataset problem(s):")
        lines += [f"  - {p}" for p in report["problems"]]
    if report["bad_images"]:
        lines.append(f"{len(report['bad_images'])} unreadable image(s) (train with data.on_bad_image=skip "
                     "to drop them, or fix/remove them):")
        lines += [f"  - [{b['split']}] {b['path']}: {b['reason']}" for b in report["bad_images"]]
    lines.append("OK" if report["ok"] else "FAILED")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """``visiontune check-data``: exit 0 when the data is clean, 1 on any problem, 2 without data to check."""
    from ..cli.config import ToolCLI

    cli = ToolCLI("visiontune check-data", argv, _own_options, description=__doc__.split("\n\n")[0])
    data = cli.config.data.as_dict()
    if not any(data.get(r) for r in ROLES):
        print("visiontune check-data: give at least --data.train (or --data.val / --data.test / --config)",
              file=sys.stderr)
        return 2
    report = check_data(workers=cli.config.workers, **data)
    print(format_report(report))
    if cli.config.json:
        from ..io import atomic_write_json

        atomic_write_json(cli.config.json, report)
    return 0 if report["ok"] else 1
