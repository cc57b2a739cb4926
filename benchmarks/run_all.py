"""Run every benchmark script in ``benchmarks/`` and rewrite ``BENCHMARKS.md`` with the results.

    python benchmarks/run_all.py                 # every script, full size
    python benchmarks/run_all.py --quick         # every script with --quick
    python benchmarks/run_all.py --only overhead,cache

The contract for a benchmark script ``benchmarks/<name>.py``:

* it runs standalone (``python benchmarks/<name>.py``) and accepts ``--quick`` (a smaller run, minutes);
* it prints one line per measured quantity on stdout::

      RESULT <name> <value> <target>

  ``<name>``: letters, digits, ``_ . -`` (unique across scripts, e.g. ``lightning_overhead_full``);
  ``<value>``: a number (ratios preferred over seconds: the machine is shared and noisy);
  ``<target>``: ``<=X``, ``>=X``, ``<X``, ``>X`` (checked: met / missed), or any other word such as
  ``-`` or ``report`` (informational, no target). Anything after the target is kept as a note.
  Every other output line is ignored here (but shown with ``--verbose``).

BENCHMARKS.md gets the machine, library versions, date and a table (value, target, met?) per script.
The text between ``<!-- notes:start -->`` and ``<!-- notes:end -->`` is hand-written and kept. Scripts not
run this time (``--only``) keep their previous rows (with their date).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NOT_BENCHMARKS = ("run_all", "photosets", "gpu")  # photosets.py builds data; gpu.py needs a GPU (run it by hand)
ORDER = ("accuracy", "new_classes", "suggest", "overhead", "peft", "schedule", "fixmatch", "cache", "data_path",
         "cpu_opts", "compile_ckpt", "export", "report")
RESULT_RE = re.compile(r"^RESULT\s+([A-Za-z0-9_.\-]+)\s+(\S+)\s+(\S+)(?:\s+(.*))?$")
TARGET_RE = re.compile(r"^(<=|>=|<|>)(-?[0-9.]+(?:e-?[0-9]+)?)$")
NOTES_START, NOTES_END = "<!-- notes:start -->", "<!-- notes:end -->"
DATA_RE = re.compile(r"<!-- results-json: (.*?) -->", re.S)
DEFAULT_NOTES = "Hand-written notes (kept by run_all.py)."


def discover(only: list[str] | None = None) -> list[Path]:
    """Benchmark scripts in run order: the known ones first, then the rest alphabetically."""
    scripts = {p.stem: p for p in HERE.glob("*.py") if p.stem not in NOT_BENCHMARKS and not p.stem.startswith("_")}
    if only:
        missing = sorted(set(only) - set(scripts))
        if missing:
            raise SystemExit(f"run_all: no benchmark script(s) {missing}; present: {sorted(scripts)}")
        scripts = {k: v for k, v in scripts.items() if k in only}
    known = [scripts[k] for k in ORDER if k in scripts]
    return known + sorted(p for k, p in scripts.items() if k not in ORDER)


def parse_results(stdout: str) -> list[dict]:
    """``RESULT name value target [note]`` lines → dicts (value as float; ``met`` None without a target).

    Example:
        >>> parse_results("x\\nRESULT speed 1.04 <=1.10 median of 5\\n")[0]["met"]
        True
    """
    out = []
    for line in stdout.splitlines():
        m = RESULT_RE.match(line.strip())
        if not m:
            continue
        name, value, target, note = m.groups()
        try:
            v = float(value)
        except ValueError:
            out.append({"name": name, "value": value, "target": target, "met": False,
                        "note": f"unparsable value {value!r}"})
            continue
        met = None
        t = TARGET_RE.match(target)
        if t:
            op, bound = t.group(1), float(t.group(2))
            met = {"<=": v <= bound, ">=": v >= bound, "<": v < bound, ">": v > bound}[op]
        out.append({"name": name, "value": v, "target": target, "met": met, "note": note or ""})
    return out


def machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": mem, "platform": platform.platform(),
            "load average at start (1/5/15 min)": load}


def versions() -> dict[str, str]:
    code = ("import json, platform, torch, timm, lightning, numpy, visiontune; "
            "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
            "'timm': timm.__version__, 'lightning': lightning.__version__, 'numpy': numpy.__version__, "
            "'visiontune': visiontune.__version__, 'cuda': str(torch.cuda.is_available())}))")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, IndexError, json.JSONDecodeError):
        return {"python": platform.python_version()}


def run_script(path: Path, quick: bool, timeout: float, verbose: bool, extra: list[str] | None = None) -> dict:
    cmd = [sys.executable, str(path), *(["--quick"] if quick else []), *(extra or [])]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        rc, stdout, stderr = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    if verbose:
        print(stdout)
    results = parse_results(stdout)
    info = [ln for ln in stdout.splitlines() if ln.strip() and not ln.startswith("RESULT ")][-6:]
    error = "" if rc == 0 else (stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    return {"script": path.name, "rc": rc, "seconds": round(seconds, 1), "results": results, "info": info,
            "error": error, "date": time.strftime("%Y-%m-%d %H:%M"), "quick": quick, "args": list(extra or [])}


def _read_existing(path: Path) -> tuple[str, dict]:
    if not path.is_file():
        return DEFAULT_NOTES, {}
    text = path.read_text()
    notes = DEFAULT_NOTES
    if NOTES_START in text and NOTES_END in text:
        notes = text.split(NOTES_START, 1)[1].split(NOTES_END, 1)[0].strip("\n")
    m = DATA_RE.search(text)
    data = {}
    if m:
        try:
            data = json.loads(m.group(1))
        except json.JSONDecodeError:
            data = {}
    return notes, data


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def render(runs: dict[str, dict], header: dict, notes: str) -> str:
    lines = [
        "# visiontune benchmarks",
        "",
        "Generated by `python benchmarks/run_all.py` (each script also runs alone). Speed is reported as "
        "ratios measured within one run, interleaved: the machine is shared and absolute seconds are noise.",
        "",
        f"- date: {header['date']}",
        *(f"- {k}: {v}" for k, v in header["machine"].items() if v),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()),
        "",
        "| script | result | value | target | met |",
        "|---|---|---:|---:|:---:|",
    ]
    failures = []
    for script in sorted(runs, key=lambda s: (ORDER.index(Path(s).stem) if Path(s).stem in ORDER else 99, s)):
        run = runs[script]
        when = f"{run['date']}{' (--quick)' if run.get('quick') else ''}"
        if run.get("args"):
            when += f" ({' '.join(run['args'])})"
        if not run["results"]:
            lines.append(f"| {script} ({when}) | — | — | — | ❌ no RESULT |")
        for r in run["results"]:
            met = {True: "✅", False: "❌", None: "—"}[r["met"]]
            note = f" ({r['note']})" if r.get("note") else ""
            lines.append(f"| {script} ({when}) | {r['name']}{note} | {_fmt(r['value'])} | {r['target']} | {met} |")
        if run["rc"] != 0:
            failures.append(f"- {script}: exit {run['rc']} after {run['seconds']} s: `{run['error']}`")
    if failures:
        lines += ["", "Scripts that failed:", "", *failures]
    lines += ["", "## Notes", "", NOTES_START, notes, NOTES_END, "",
              f"<!-- results-json: {json.dumps(runs, sort_keys=True)} -->", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--only", help="comma-separated script names (without .py)")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per script")
    parser.add_argument("--verbose", action="store_true", help="show each script's output")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS",
                        help="extra arguments for one script, e.g. --extra 'fixmatch=--only cost,expansion'")
    args = parser.parse_args(argv)
    extra: dict[str, list[str]] = {}
    for item in args.extra:
        name, sep, rest = item.partition("=")
        if not sep or not name.strip():
            parser.error(f"--extra {item!r}: expected NAME=ARGS (a script name without .py, then its arguments)")
        extra[name.strip()] = shlex.split(rest)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    scripts = discover(only)
    out = Path(args.output)
    notes, previous = _read_existing(out)
    header = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "versions": versions()}
    runs = dict(previous) if only else {}
    for path in scripts:
        print(f"run_all: {path.name} ...", flush=True)
        run = run_script(path, args.quick, args.timeout, args.verbose, extra.get(path.stem))
        runs[path.name] = run
        for r in run["results"]:
            print(f"  RESULT {r['name']} {r['value']} {r['target']} "
                  f"{ {True: 'met', False: 'MISSED', None: ''}[r['met']] }")
        if run["rc"] != 0:
            print(f"  FAILED (exit {run['rc']}): {run['error']}")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(runs, header, notes))
    os.replace(tmp, out)
    print(f"run_all: wrote {out}")
    return 0 if all(r["rc"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
