"""``visiontune report RUN_DIR [--output X.html]``: rebuild a run directory's ``report.html`` from its files."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from .html import GALLERY_CAP, build_report
from .runfiles import ReportError

__all__ = ["report_main", "run_gallery_cap"]


def _own_options(parser: Any) -> None:
    parser.add_argument("run_dir", type=Optional[str], nargs="?", default=None,
                        help="the run directory (holding metrics.json)")
    parser.add_argument("--output", type=Optional[str], default=None, help="the HTML file (default RUN_DIR/report.html)")


def run_gallery_cap(run_dir: Union[str, Path]) -> Optional[int]:
    """``report.gallery_cap`` of the run's resolved ``config.yaml`` (what its own report used), or ``None``."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    try:
        cap = ((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("report") or {}).get("gallery_cap")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0 else None


def report_main(argv: Sequence[str]) -> int:
    """``visiontune report RUN_DIR [--output X.html] [--config FIT.yaml] [--report.gallery_cap N]``: rebuild a
    run's ``report.html`` from its files.

    Reads the same ``--config`` as ``fit``; of it, only the ``report`` options matter (``gallery_cap``). Without
    them the run's own ``config.yaml`` gives them, so the rebuilt page is the one the run wrote. Exit 0; 2 with one
    line naming the path when the run directory is missing or has no ``metrics.json``.
    """
    from ..cli.config import ToolCLI

    cli = ToolCLI("visiontune report", argv, _own_options, description=__doc__)
    cfg = cli.config
    try:
        if cfg.run_dir is None:
            raise ReportError("give the run directory: visiontune report RUN_DIR")
        cap = cli.given("report").get("gallery_cap")
        if cap is None:
            cap = run_gallery_cap(cfg.run_dir)
        if cap is not None and (not isinstance(cap, int) or cap < 0):
            raise ReportError(f"report.gallery_cap must be an integer >= 0, got {cap!r}")
        path = build_report(cfg.run_dir, cfg.output, gallery_cap=GALLERY_CAP if cap is None else cap)
    except ReportError as exc:
        print(f"visiontune report: error: {exc}", file=sys.stderr)
        return 2
    print(f"visiontune report: {path}")
    return 0
