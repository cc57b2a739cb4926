"""Leaderboard of a comparison (:mod:`visiontune.comparison.api`): aggregation, Markdown, CSV, plot, HTML page,
rich table."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CSV_COLUMNS", "leaderboard", "leaderboard_csv", "leaderboard_html", "leaderboard_markdown",
           "plain_settings", "plot_leaderboard", "print_leaderboard", "write_leaderboard_html"]

CSV_COLUMNS = ("rank", "strategy", "accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std",
               "trainable_params", "trainable_pct", "delta_mb", "peak_mem_mb", "train_seconds", "latency_ms",
               "epochs", "seeds", "split", "delta")

def plain_settings(value: Any, digest: bool) -> Any:
    """JSON-able form of settings: arrays become a content hash (fingerprint) or a short description."""
    if isinstance(value, Mapping):
        return {str(k): plain_settings(v, digest) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_settings(v, digest) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy array / tensor
        import numpy as np

        a = np.ascontiguousarray(np.asarray(value))
        if digest:
            return f"array:{a.shape}:{a.dtype}:{hashlib.sha256(a.tobytes()).hexdigest()}"
        return f"<array {tuple(a.shape)} {a.dtype}>"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def leaderboard(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate per-run results into leaderboard rows (mean ± std over seeds), best accuracy first.

    Example:
        >>> rows = leaderboard([{"label": "linear", "accuracy": 0.8, "macro_f1": 0.7, "trainable_params": 10,
        ...                      "trainable_fraction": 0.01, "delta_bytes": 2**20, "peak_mem_mb": 5.0,
        ...                      "train_seconds": 1.0, "latency_ms": 2.0, "epochs": 1, "seed": 0,
        ...                      "split": "val", "delta": "d.safetensors"}])
        >>> rows[0]["strategy"], rows[0]["accuracy_mean"], rows[0]["delta_mb"]
        ('linear', 0.8, 1.0)
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["label"], []).append(r)
    rows = []
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        acc, acc_sd = _mean_std([r["accuracy"] for r in rs])
        f1, f1_sd = _mean_std([r["macro_f1"] for r in rs])
        best = max(rs, key=lambda r: (r["accuracy"] if not math.isnan(r["accuracy"]) else -1.0))
        rows.append({
            "strategy": label,
            "accuracy_mean": round(acc, 4), "accuracy_std": round(acc_sd, 4),
            "macro_f1_mean": round(f1, 4), "macro_f1_std": round(f1_sd, 4),
            "trainable_params": int(rs[0]["trainable_params"]),
            "trainable_pct": round(100 * float(rs[0]["trainable_fraction"]), 3),
            "delta_mb": round(statistics.fmean(r["delta_bytes"] for r in rs) / 2**20, 3),
            "peak_mem_mb": round(statistics.fmean(r["peak_mem_mb"] for r in rs), 1),
            "train_seconds": round(statistics.fmean(r["train_seconds"] for r in rs), 2),
            "latency_ms": round(statistics.fmean(r["latency_ms"] for r in rs), 2),
            "epochs": round(statistics.fmean(r["epochs"] for r in rs), 1),
            "seeds": " ".join(str(r["seed"]) for r in rs),
            "split": rs[0]["split"],
            "delta": best["delta"],
        })
    rows.sort(key=lambda r: (-(r["accuracy_mean"] if not math.isnan(r["accuracy_mean"]) else -1.0),
                             r["trainable_params"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return [{k: r[k] for k in CSV_COLUMNS} for r in rows]


def _fmt_pm(mean: float, std: float, n_seeds: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4f} ± {std:.4f}" if n_seeds > 1 else f"{mean:.4f}"


def _human(n: int) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _display_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    split = rows[0]["split"] if rows else "val"
    header = ["#", "strategy", f"{split} accuracy", "macro-F1", "trainable", "delta MB", "peak mem MB",
              "train s", "latency ms"]
    body = []
    for r in rows:
        n = len(str(r["seeds"]).split())
        body.append([str(r["rank"]), str(r["strategy"]), _fmt_pm(r["accuracy_mean"], r["accuracy_std"], n),
                     _fmt_pm(r["macro_f1_mean"], r["macro_f1_std"], n),
                     f"{_human(r['trainable_params'])} ({r['trainable_pct']:.2f}%)", f"{r['delta_mb']:.3f}",
                     f"{r['peak_mem_mb']:.0f}", f"{r['train_seconds']:.1f}", f"{r['latency_ms']:.2f}"])
    return header, body


def leaderboard_markdown(rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
                         failures: Sequence[Mapping[str, Any]]) -> str:
    """``leaderboard.md``: the settings, one table row per :func:`leaderboard` row, and the failed runs."""
    header, body = _display_rows(rows)
    budget = [f"{settings['max_epochs']} epochs" if settings["max_epochs"] not in (None, -1) else "",
              f"{settings['max_time']} s per run" if settings["max_time"] is not None else ""]
    lines = [
        "# Strategy comparison",
        "",
        f"- backbone: `{settings['backbone']}` (weights: {settings['weights']})",
        f"- data: `{json.dumps(plain_settings(settings['data'], False))}`",
        f"- budget: {', '.join(b for b in budget if b)}; seeds: {', '.join(map(str, settings['seeds']))}",
        f"- generated: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body),
        "",
        "Accuracy and macro-F1: mean ± std over seeds. Delta: the file holding only what the strategy "
        "changed (see the `delta` column of leaderboard.csv). Latency: one image, eval mode, median ms, "
        "in the exported form (LoRA merged into its layers).",
        "Plot: `leaderboard.png` (accuracy vs. trainable parameters, log x; marker area ∝ train time). "
        "Up and to the left is better: as accurate with fewer trained parameters.",
    ]
    if failures:
        lines += ["", "## Failed runs (rerun the comparison to retry them)", ""]
        lines += [f"- {f['label']} seed {f['seed']}: {f['error']}" for f in failures]
    return "\n".join(lines) + "\n"


def leaderboard_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """``leaderboard.csv``: the :func:`leaderboard` rows, columns :data:`CSV_COLUMNS`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _leaderboard_figure(rows: Sequence[Mapping[str, Any]], title: str) -> Any:
    """Accuracy vs. trainable parameters (log x; marker area ∝ train time; thick edge = best)."""
    from ..reports.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ok = [r for r in rows if not math.isnan(r["accuracy_mean"])]
    longest = max([r["train_seconds"] for r in ok] + [1e-9])
    for r in ok:
        size = 40 + 460 * r["train_seconds"] / longest
        ax.errorbar(r["trainable_params"], r["accuracy_mean"], yerr=r["accuracy_std"] or None, fmt="none",
                    ecolor="grey", capsize=3, zorder=1)
        ax.scatter([r["trainable_params"]], [r["accuracy_mean"]], s=size, alpha=0.7, zorder=2,
                   edgecolors="black", linewidths=0.6 if r["rank"] != 1 else 2.0)
        ax.annotate(f"{r['strategy']} ({r['train_seconds']:.0f} s)", (r["trainable_params"], r["accuracy_mean"]),
                    textcoords="offset points", xytext=(8, 6), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.15)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{rows[0]['split'] if rows else 'val'} accuracy (mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.text(0.01, 0.01, "marker area ∝ train time; thick edge = best", transform=ax.transAxes, fontsize=8,
            color="dimgrey")
    fig.tight_layout()
    return fig


def plot_leaderboard(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Save ``leaderboard.png`` (accuracy vs. trainable parameters, log x; marker area ∝ train time) to ``path``."""
    from ..io import atomic_save_figure
    from ..reports.plots import pyplot

    fig = _leaderboard_figure(rows, title)
    try:
        return atomic_save_figure(fig, path, dpi=110)
    finally:
        pyplot().close(fig)


def leaderboard_html(rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
                     failures: Sequence[Mapping[str, Any]], title: str, output: Path) -> str:
    """``leaderboard.html``: one self-contained page (no network) with the settings, the leaderboard as a table
    sortable by clicking a header (each strategy linked to its best run's ``report.html``), the accuracy-vs-
    trainable-parameters plot and the failed runs.

    Args:
        rows: :func:`leaderboard` rows.
        settings: the comparison's settings (backbone, weights, data, budget, seeds).
        failures: ``{"label", "seed", "error"}`` of the runs that raised.
        title: the plot's title.
        output: the comparison's folder (run reports are linked relative to it).

    Example:
        >>> page = leaderboard_html([], {"backbone": "resnet18", "weights": None, "data": {}, "max_epochs": 1,
        ...                          "max_time": None, "seeds": [0]}, [], "t", Path("out"))
        >>> "<table" in page and "https://" not in page
        True
    """
    from ..reports.page import esc, img, page, table
    from ..reports.plots import figure_png

    header, body = _display_rows(rows)
    links = []
    for r in rows:
        report = Path(str(r["delta"])).parent / "report.html"  # the best seed's run directory holds both
        try:
            rel = report.resolve().relative_to(Path(output).resolve())
        except ValueError:
            rel = None
        links.append(f'<a href="{esc(rel.as_posix())}">{esc(r["strategy"])}</a>' if rel and report.is_file()
                     else esc(r["strategy"]))
    cells = [[(row[0], r["rank"]), link, (row[2], r["accuracy_mean"]), (row[3], r["macro_f1_mean"]),
              (row[4], r["trainable_params"]), (row[5], r["delta_mb"]), (row[6], r["peak_mem_mb"]),
              (row[7], r["train_seconds"]), (row[8], r["latency_ms"])] for row, r, link in zip(body, rows, links)]
    budget = ", ".join(b for b in [f"{settings['max_epochs']} epochs" if settings["max_epochs"] not in (None, -1)
                                   else "", f"{settings['max_time']} s per run" if settings["max_time"] else ""] if b)
    facts = [["backbone", f"{settings['backbone']} (weights: {settings['weights']})"],
             ["data", json.dumps(plain_settings(settings["data"], False))],
             ["budget", budget or "—"], ["seeds", ", ".join(map(str, settings["seeds"]))]]
    sections = [
        f'<section id="settings"><h2>Settings</h2>{table(["", ""], facts, sortable=False)}</section>',
        f'<section id="leaderboard"><h2>Leaderboard</h2><p class="muted">Click a column header to sort; a '
        f"strategy links to the report of its best run. Accuracy and macro-F1: mean ± std over seeds.</p>"
        f"{table(header, cells, numeric=(0, 2, 3, 4, 5, 6, 7, 8), raw=(1,), table_id='leaderboard-table')}</section>",
    ]
    if rows:
        plot = img(figure_png(_leaderboard_figure(rows, title), dpi=110), "accuracy vs trainable parameters")
        sections.append(f'<section id="plot"><h2>Accuracy vs. trainable parameters</h2>{plot}<p class="muted">'
                        "Up and to the left is better: as accurate with fewer trained parameters.</p></section>")
    if failures:
        items = "".join(f"<li>{esc(f['label'])} seed {esc(f['seed'])}: {esc(f['error'])}</li>" for f in failures)
        sections.append(f'<section id="failures"><h2>Failed runs (rerun the comparison to retry them)</h2>'
                        f"<ul>{items}</ul></section>")
    return page("visiontune strategy comparison", title, sections)


def write_leaderboard_html(rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
                           failures: Sequence[Mapping[str, Any]], title: str, output: Path) -> Path:
    """Write ``output/leaderboard.html`` (:func:`leaderboard_html`) atomically; returns its path."""
    from ..io import atomic_write

    return atomic_write(Path(output) / "leaderboard.html", leaderboard_html(rows, settings, failures, title, output))


def print_leaderboard(rows: Sequence[Mapping[str, Any]], title: str) -> None:
    """Print the :func:`leaderboard` rows as a table (rich, when installed) to stdout."""
    header, body = _display_rows(rows)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency
        print(title)
        for row in [header, *body]:
            print("  ".join(row))
        return
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i in (1,) else "right")
    for row in body:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


plain_settings = plain_settings
