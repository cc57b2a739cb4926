"""The generality table: timm families × every strategy, each cell ok / refused / BROKEN, as Markdown.

Runs the cells of ``tests/backbone_cases.py`` (the case table ``tests/test_any_backbone.py`` tests; one
definition) and prints:

* the table (families × strategies): ``ok``, ``refused`` (a ``StrategyError`` naming the strategy and the
  model), ``BROKEN`` (any other exception, or a failed check), with ``(xfail)`` where the case table
  already marks the cell broken and ``!`` where the outcome differs from what the case table expects;
* the refusals with their messages and the broken cells with the exception type, its first line and
  where it was raised (innermost ``visiontune`` frame, and the innermost frame overall when that differs);
* ``RESULT`` lines (``benchmarks/run_all.py`` contract): cells ok / refused / broken, and how many cells
  differ from the case table's expectations (target 0).

    python benchmarks/backbone_table.py                 # the default families (what the test runs)
    python benchmarks/backbone_table.py --nightly       # also the nightly families
    python benchmarks/backbone_table.py --quick         # the first 8 families
    python benchmarks/backbone_table.py --only vit,swin --strategies lora,vpt
    python benchmarks/backbone_table.py --nightly --readme  # the table of README.md's "Backbones" section
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import backbone_cases as bc  # noqa: E402


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"

    def short(f: traceback.FrameSummary) -> str:
        path = Path(f.filename)
        parts = path.parts
        for anchor in ("visiontune", "timm", "torch", "tests"):
            if anchor in parts:
                i = len(parts) - 1 - parts[::-1].index(anchor)
                return f"{'/'.join(parts[i:])}:{f.name} (line {f.lineno})"
        return f"{path.name}:{f.name} (line {f.lineno})"

    ours = [f for f in frames if "/visiontune/" in f.filename.replace("\\", "/")]
    # the innermost frame that is not torch's Module plumbing (__call__, __getattr__)
    real = [f for f in frames if not f.filename.replace("\\", "/").endswith("torch/nn/modules/module.py")]
    inner = short((real or frames)[-1])
    if ours:
        mine = short(ours[-1])
        return mine if mine == inner else f"{mine} -> {inner}"
    return inner


def classify(case: bc.Case, strategy: str, workdir: Path) -> tuple[str, str, float]:
    """(status, detail, seconds) of one cell; status is ``ok``, ``refused`` or ``broken``."""
    t = time.perf_counter()
    try:
        out = bc.run_cell(case, strategy, workdir)
    except Exception as exc:  # noqa: BLE001 - every failure is a result here
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return "broken", f"{type(exc).__name__}: {first} @ {_where(exc)}", time.perf_counter() - t
    dt = time.perf_counter() - t
    if isinstance(out, bc.Refused):
        return "refused", out.message.splitlines()[0][:300], dt
    return "ok", "", dt


#: Short reason classes of the refusals (the README table), by a phrase of the StrategyError's message.
REASONS = (  # most specific first: every VPT refusal ends with the same explanation
    ("do not take", "blocks take no extra tokens"),
    ("does not give one tensor of patch tokens", "no patch tokens"),
    ("do not read a token sequence", "no token sequence"),
    ("it has no patch_embed", "no token sequence"),
    ("it has no blocks", "no flat blocks"),  # hierarchical transformers: Swin, PiT, LeViT, ...
    ("no transformer blocks", "no stages"),
    ("does not map a tensor to a tensor", "tuple outputs"),
    ("never calls", "weight read directly"),
    ("no normalisation layer", "nothing normalises"),
    ("no group_matcher", "no stages"),
)


def reason(message: str) -> str:
    """The short class of a refusal message (``other`` if none matches)."""
    return next((short for phrase, short in REASONS if phrase in message), "other")


def readme_table(cases: list[bc.Case], strategies: list[str],
                 results: dict[tuple[str, str], tuple[str, str, float]]) -> str:
    """The families x strategies table of the README: ``ok``, ``refused (reason)``, ``BROKEN``."""
    lines = ["| family | timm model | " + " | ".join(strategies) + " |", "|---|---|" + "---|" * len(strategies)]
    for case in cases:
        cells = []
        for s in strategies:
            status, detail, _ = results[case.id, s]
            cells.append({"ok": "ok", "broken": "**BROKEN**"}.get(status, f"refused ({reason(detail)})"))
        name = f"{case.id} (nightly)" if case.nightly else case.id
        lines.append(f"| {name} | `{case.model}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def expected(case: bc.Case, strategy: str) -> str:
    if strategy in case.broken:
        return "broken"
    return "refused" if strategy in case.refuses else "ok"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nightly", action="store_true", help="include the nightly families")
    ap.add_argument("--quick", action="store_true", help="only the first 8 default families")
    ap.add_argument("--only", default="", help="comma-separated family ids")
    ap.add_argument("--strategies", default="", help="comma-separated strategies (default: all registered)")
    ap.add_argument("--verbose", action="store_true", help="print each cell as it finishes")
    ap.add_argument("--readme", action="store_true",
                    help="print only the README's table (refusals as 'refused (reason)') and the RESULT lines")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    cases = [c for c in bc.CASES if args.nightly or not c.nightly]
    if args.quick:
        cases = cases[:8]
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in bc.CASES_BY_ID]
        if unknown:
            ap.error(f"unknown families {unknown}; known: {', '.join(bc.CASES_BY_ID)}")
        cases = [bc.CASES_BY_ID[w] for w in wanted]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()] or bc.strategies()

    results: dict[tuple[str, str], tuple[str, str, float]] = {}
    family_time: dict[str, float] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            tc = time.perf_counter()
            for s in strategies:
                results[case.id, s] = r = classify(case, s, Path(tmp))
                if args.verbose:
                    print(f"{case.id:20s} {s:8s} {r[0]:8s} {r[2]:6.2f}s {r[1]}", file=sys.stderr, flush=True)
            family_time[case.id] = time.perf_counter() - tc
    total = time.perf_counter() - t0

    counts = {k: sum(1 for r in results.values() if r[0] == k) for k in ("ok", "refused", "broken")}
    if args.readme:
        print(readme_table(cases, strategies, results))
        print(f"\n{len(results)} cells in {total:.1f} s")
        for k, v in counts.items():
            print(f"RESULT backbone_cells_{k} {v} report")
        return 0
    mark = {"ok": "ok", "refused": "refused", "broken": "**BROKEN**"}
    print(f"## timm families × strategies ({len(cases)} families, {len(strategies)} strategies)\n")
    print("| family | model | " + " | ".join(strategies) + " | s |")
    print("|---|---|" + "---|" * len(strategies) + "---:|")
    surprises = []
    for case in cases:
        cells = []
        for s in strategies:
            status = results[case.id, s][0]
            text = mark[status]
            if s in case.broken:
                text += " (xfail)"
            if status != expected(case, s):
                text += " !"
                surprises.append((case.id, s, expected(case, s), status))
            cells.append(text)
        print(f"| {case.id} | `{case.model}` | " + " | ".join(cells) + f" | {family_time[case.id]:.1f} |")

    print("\n## Refusals\n")
    for (fam, s), (status, detail, _) in results.items():
        if status == "refused":
            print(f"- {fam} × {s}: {detail}")
    print("\n## Broken cells\n")
    for (fam, s), (status, detail, _) in results.items():
        if status == "broken":
            cause = bc.CASES_BY_ID[fam].broken.get(s)
            print(f"- {fam} × {s}: {detail}" + (f"\n  - cause: {cause}" if cause else ""))
    if surprises:
        print("\n## Differs from the case table\n")
        for fam, s, exp, got in surprises:
            print(f"- {fam} × {s}: expected {exp}, got {got}")

    print(f"\n{len(results)} cells in {total:.1f} s")
    for k, v in counts.items():
        print(f"RESULT backbone_cells_{k} {v} report")
    print(f"RESULT backbone_cells_unexpected {len(surprises)} <=0")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
