"""``report.html``: one self-contained page per run directory, built from the run directory's files alone.

Sections: headline metrics against the run's baseline (``metrics.json`` ``baseline``; else the majority class and
chance level, said as such), per-class accuracy (a table sortable by clicking a header), the confusion matrix (the
image and the most confused pairs), learning curves (loss, accuracy, learning rate per step from ``metrics.csv``),
the misclassified images, cost (trainable parameters, delta size, time, peak memory) and the resolved
``config.yaml``. :class:`~visiontune.RunReport` writes it at the end of every fit / validate / test;
``visiontune report RUN_DIR`` (:mod:`visiontune.reports.cli`) rebuilds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..io import atomic_write
from .gallery import ImageLoader, gallery_html, resolve_item
from .page import esc, fmt, img, page, table
from .plots import figure_png, learning_curves, plot_confusion
from .runfiles import RunFiles, read_run

__all__ = ["build_report", "report_html"]

GALLERY_CAP = 48
THUMBNAIL_PX = 96


def _baseline(run: RunFiles, split: str) -> Optional[tuple[str, float]]:
    """``(what, accuracy)`` the run is measured against on ``split``: ``metrics.json``'s baseline when it holds
    one (``baseline: {accuracy, name}``, ``baseline_<split>_acc`` or ``baseline_acc``), else ``None``."""
    m = run.metrics
    base = m.get("baseline")
    if isinstance(base, dict) and isinstance(base.get("accuracy"), (int, float)):
        if base.get("split") in (None, split):
            return str(base.get("name") or "baseline"), float(base["accuracy"])
    for key in (f"baseline_{split}_acc", "baseline_acc"):
        if isinstance(m.get(key), (int, float)):
            return "baseline", float(m[key])
    return None


def _delta(value: float, ref: float) -> str:
    d = 100 * (value - ref)
    return f'<span class="{"up" if d >= 0 else "down"}">{d:+.1f} points</span>'


def _headline(run: RunFiles) -> str:
    cards = []
    for s in run.splits:
        acc, f1 = run.metrics.get(f"{s}_acc"), run.metrics.get(f"{s}_macro_f1")
        if not isinstance(acc, (int, float)):
            continue
        base = _baseline(run, s)
        confusion = run.confusion.get(s)
        if base is not None:
            ref = f"vs {esc(base[0])} {base[1]:.4f}: {_delta(acc, base[1])}"
        elif confusion is not None and confusion.sum() > 0:
            support = confusion.sum(1)
            top = int(np.argmax(support))
            majority = float(support[top] / support.sum())
            name = run.class_names[top] if top < len(run.class_names) else str(top)
            ref = (f"no baseline in metrics.json; vs majority class ({esc(name)}) {majority:.4f}: "
                   f"{_delta(acc, majority)}; chance 1/{len(support)} = {1 / len(support):.4f}")
        else:
            ref = "no baseline in metrics.json"
        cards.append(f'<div class="card"><div class="k">{s} accuracy</div><div class="v">{acc:.4f}</div>'
                     f'<div class="d">{ref}</div></div>')
        if isinstance(f1, (int, float)):
            cards.append(f'<div class="card"><div class="k">{s} macro-F1</div><div class="v">{f1:.4f}</div>'
                         f'<div class="d">unweighted mean of the per-class F1</div></div>')
    body = "".join(cards) or '<p class="muted">no val / test metrics in metrics.json</p>'
    return f'<section id="headline"><h2>Headline</h2><div class="cards">{body}</div></section>'


def _per_class(run: RunFiles, split: str) -> str:
    names, confusion = run.class_names, run.confusion.get(split)
    acc = run.metrics.get(f"{split}_per_class_acc") or {}
    rows = []
    for i, name in enumerate(names):
        support = correct = None
        worst = "—"
        if confusion is not None and i < len(confusion):
            support, correct = int(confusion[i].sum()), int(confusion[i, i])
            off = confusion[i].copy()
            off[i] = 0
            if off.sum() > 0:
                j = int(np.argmax(off))
                worst = f"{names[j] if j < len(names) else j} ({int(off[j])})"
        a = acc.get(name)
        if a is None and support:
            a = correct / support
        bar = f'<span class="bar" style="width:{round(60 * a)}px"></span> ' if a is not None else ""
        rows.append([name, support, correct, (f"{bar}{fmt(a)}", "" if a is None else f"{a:.6f}"), worst])
    tbl = table(["class", "support", "correct", "accuracy", "most often predicted instead"], rows,
                numeric=(1, 2, 3), raw=(3,), table_id=f"per-class-{split}")
    return (f'<section id="per-class-section-{split}"><h2>Per-class accuracy ({split})</h2>'
            f'<p class="muted">Click a column header to sort.</p>{tbl}</section>')


def _confusion(run: RunFiles, split: str) -> str:
    confusion, names = run.confusion.get(split), run.class_names
    png = run.confusion_png.get(split)
    if png is None and confusion is not None:
        png = figure_png(plot_confusion(confusion, names, f"{split} confusion matrix"))
    picture = img(png, f"{split} confusion matrix") if png else '<p class="muted">no confusion matrix</p>'
    pairs = []
    if confusion is not None:
        support = confusion.sum(1)
        for i, j in zip(*np.nonzero(confusion)):
            if i != j:
                pairs.append((int(confusion[i, j]), int(i), int(j)))
        pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    rows = [[names[i], names[j], n, (f"{100 * n / support[i]:.1f}%", f"{n / support[i]:.6f}")]
            for n, i, j in pairs[:15]]
    tbl = (table(["true", "predicted", "images", "share of the true class"], rows, numeric=(2, 3),
                 table_id=f"confused-{split}") if rows else '<p class="muted">no confusions</p>')
    return (f'<section id="confusion-{split}"><h2>Confusion matrix ({split})</h2><div class="grid2">'
            f'<div>{picture}</div><div><h2>Most confused pairs</h2>{tbl}</div></div></section>')


def _curves(run: RunFiles) -> str:
    png = learning_curves(run.curves)
    body = (img(png, "learning curves: loss, accuracy, learning rate per step") if png
            else '<p class="muted">no metrics.csv (the run had no CSVLogger)</p>')
    return f'<section id="curves"><h2>Learning curves</h2>{body}</section>'


def _gallery(run: RunFiles, load: ImageLoader, cap: int, size: int) -> str:
    split = "val" if "val" in run.predictions else ("test" if "test" in run.predictions else None)
    if split is None:
        return ('<section id="misclassified"><h2>Misclassified images</h2>'
                '<p class="muted">no predictions_val.csv / predictions_test.csv in the run directory</p></section>')
    rows = run.predictions[split]
    wrong = sum(r["true"] != r["pred"] for r in rows)
    shown = min(wrong, cap)
    note = (f"{wrong} of {len(rows)} {split} images misclassified; the {shown} most confident mistakes"
            + (" (all of them)" if shown == wrong else f" (capped at {cap})") + ": true → predicted, confidence.")
    return (f'<section id="misclassified"><h2>Misclassified images ({split})</h2><p class="muted">{esc(note)}</p>'
            f"{gallery_html(rows, load, cap=cap, size=size)}</section>")


def _cost(run: RunFiles) -> str:
    m = run.metrics
    rows: list[list[Any]] = []

    def add(label: str, value: Any, unit: str = "") -> None:
        if value is not None:
            rows.append([label, f"{fmt(value, 3)}{unit}"])

    add("strategy", m.get("strategy"))
    add("trainable parameters", m.get("trainable_params"))
    add("total parameters", m.get("total_params"))
    if isinstance(m.get("trainable_fraction"), (int, float)):
        add("trainable share", f"{100 * m['trainable_fraction']:.3f}", " %")
    if run.delta_bytes is not None:
        add("task delta (delta.safetensors)", f"{run.delta_bytes / 2**20:.3f}", " MB")
    for stage in ("fit", "validate", "test"):
        add(f"{stage} time", m.get(f"{stage}_seconds"), " s")
    add("peak memory (process RSS)", m.get("peak_rss_mb"), " MB")
    add("peak CUDA memory (allocated)", m.get("peak_cuda_mb"), " MB")
    return f'<section id="cost"><h2>Cost</h2>{table(["", "value"], rows, sortable=False)}</section>'


def _config(run: RunFiles) -> str:
    body = (f"<pre>{esc(run.config)}</pre>" if run.config is not None
            else '<p class="muted">no config.yaml (the run was not started by the visiontune command)</p>')
    return f'<section id="config"><h2>Resolved config (config.yaml)</h2>{body}</section>'


def report_html(run: RunFiles, *, load: Optional[ImageLoader] = None, gallery_cap: int = GALLERY_CAP,
                thumbnail_px: int = THUMBNAIL_PX) -> str:
    """The report page of ``run`` (:func:`~visiontune.reports.runfiles.read_run`) as one HTML string.

    Args:
        run: the run directory's files.
        load: finds a prediction row's image (default: from its path / built-in dataset id).
        gallery_cap: at most this many misclassified images.
        thumbnail_px: longer side of a thumbnail.
    """
    load = load or resolve_item()
    sections = [_headline(run)]
    for s in run.splits:
        sections += [_per_class(run, s), _confusion(run, s)]
    sections += [_curves(run), _gallery(run, load, gallery_cap, thumbnail_px), _cost(run), _config(run)]
    title = f"visiontune run: {run.run_dir.parent.name}/{run.run_dir.name}"
    return page(title, str(run.run_dir.resolve()), sections)


def build_report(run_dir: Union[str, Path], output: Union[str, Path, None] = None, *,
                 load: Optional[ImageLoader] = None, gallery_cap: int = GALLERY_CAP,
                 thumbnail_px: int = THUMBNAIL_PX) -> Path:
    """Build ``report.html`` of a run directory from its files, atomically; returns its path.

    Args:
        run_dir: the run directory (holding ``metrics.json``; see :mod:`visiontune.reports`).
        output: the HTML file; default ``RUN_DIR/report.html``.
        load: finds a misclassified image from its ``predictions_<split>.csv`` row (default: by its path).
        gallery_cap: at most this many misclassified images are shown.
        thumbnail_px: thumbnail size (longer side, px).

    Raises:
        visiontune.reports.runfiles.ReportError: ``run_dir`` is missing or has no ``metrics.json``.

    Example:
        >>> import visiontune as vt
        >>> vt.build_report("runs/visiontune/version_0")  # doctest: +SKIP
        PosixPath('runs/visiontune/version_0/report.html')
    """
    run = read_run(run_dir)
    text = report_html(run, load=load, gallery_cap=gallery_cap, thumbnail_px=thumbnail_px)
    return atomic_write(Path(output) if output is not None else run.run_dir / "report.html", text)
