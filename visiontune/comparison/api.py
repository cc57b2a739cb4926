"""Compare strategies on your data in one command: same backbone, same split, same budget → a leaderboard.

    visiontune compare --config configs/compare.yaml
    visiontune compare --config configs/compare.yaml --strategies linear,lora --seeds 0,1 --trainer.max_epochs 2
    visiontune compare --config configs/finetune.yaml --data.train photos/    # any fit config

The config is a ``visiontune fit`` config plus compare's own keys (``strategies``, ``seeds``, ``output``...),
read by fit's parser: :mod:`visiontune.comparison.config` says what compare takes of it.

Each strategy (default: linear, bitfit, last_k, lora, adapter, full; any registered strategy, with
options) is trained on the same backbone, the same seeded split and batch order, and the same budget
(``trainer.max_epochs``, and/or ``trainer.max_time`` per run), for one or more seeds. Then the output folder holds:

* ``leaderboard.md`` / ``leaderboard.csv``: accuracy (mean ± std over seeds; the test split if there is
  one, else validation), macro-F1, trainable parameters, delta size on disk, peak memory, train time and
  inference latency (batch 1, ms per image, in the exported form: LoRA merged), best first;
* ``leaderboard.png``: accuracy vs. trainable parameters (log x); marker area ∝ train time;
* ``leaderboard.html``: one self-contained page: the settings, the leaderboard (sortable, each strategy linked to
  its best run's ``report.html``), that plot and the failed runs;
* ``results/<strategy>__seed<k>.json``: one result per run, written atomically. An interrupted comparison
  continues where it stopped: runs whose result exists (same settings) are not redone;
* ``runs/<strategy>/seed<k>/``: each run's report (metrics.json, confusion matrix, report.html) and its
  ``delta.safetensors`` (only what the strategy changed), so the winner can be used directly
  (``visiontune.delta.build_from_delta``); ``winner.json`` names it.

Seeds: each seed is a full replicate (split, initialisation, batch order). Within one seed every strategy
sees the identical split and batch order. Put ``seed`` in ``data`` to keep one split for all seeds (then
only initialisation, dropout and the like vary).

Peak memory: on CUDA the peak allocated memory; on CPU the peak resident memory above the level before
the run (sampled every 10 ms, after returning freed heap memory to the OS).

This module holds the ``visiontune compare`` command (:func:`compare_main`, named in ``visiontune.cli.TOOLS``)
and imports nothing heavy until used. One run
lives in :mod:`visiontune.comparison.run`, the leaderboard files in :mod:`visiontune.comparison.report`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from .report import (
    CSV_COLUMNS,
    leaderboard,
    leaderboard_csv,
    leaderboard_markdown,
    plain_settings,
    plot_leaderboard,
    print_leaderboard,
    write_leaderboard_html,
)
from .run import RESULT_FORMAT, StrategySpec, fingerprint, run_one

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_STRATEGIES",
    "Comparison",
    "StrategySpec",
    "compare",
    "compare_from_config",
    "compare_main",
    "leaderboard",
    "load_compare_config",
    "parse_strategies",
]

DEFAULT_STRATEGIES: tuple[str, ...] = ("linear", "bitfit", "last_k", "lora", "adapter", "full")


# ------------------------------------------------------------------------------------------ strategies
def parse_strategies(entries: Optional[Sequence[Union[str, Mapping[str, Any]]]]) -> list[StrategySpec]:
    """Validate a strategy list: names, or mappings ``{name, args, model, label}``.

    Unknown strategies and options fail here, before anything trains, naming the entry.

    Example:
        >>> [s.label for s in parse_strategies(["linear", {"name": "lora", "args": {"rank": 4}}])]
        ['linear', 'lora(rank=4)']
    """
    from ..strategies import make_strategy_config

    entries = list(DEFAULT_STRATEGIES if entries is None else entries)
    if not entries:
        raise ValueError("compare: strategies is empty")
    specs: list[StrategySpec] = []
    for i, e in enumerate(entries):
        where = f"strategies[{i}]"
        if isinstance(e, str):
            e = {"name": e}
        if not isinstance(e, Mapping) or not isinstance(e.get("name"), str):
            raise ValueError(f"compare: {where} must be a strategy name or a mapping with 'name', got {e!r}")
        unknown = sorted(set(e) - {"name", "args", "model", "label"})
        if unknown:
            raise ValueError(f"compare: {where} has unknown key(s) {unknown}; valid: name, args, model, label")
        args = dict(e.get("args") or {})
        try:
            make_strategy_config(e["name"], args)
        except ValueError as exc:
            raise ValueError(f"compare: {where}: {exc}") from exc
        label = e.get("label") or (e["name"] + ("(" + ", ".join(f"{k}={v}" for k, v in args.items()) + ")"
                                                 if args else ""))
        specs.append(StrategySpec(e["name"], args, dict(e.get("model") or {}), str(label)))
    seen: dict[str, int] = {}
    for s in specs:
        seen[s.slug] = seen.get(s.slug, 0) + 1
    dup = sorted(k for k, n in seen.items() if n > 1)
    if dup:
        raise ValueError(f"compare: strategies {dup} appear twice: give them different args or a 'label'")
    return specs


def _validate(backbone: str, data: Mapping[str, Any], specs: Sequence[StrategySpec], model: Mapping[str, Any]) -> None:
    """Check data and model arguments of every run before anything trains (cheap: no weights, no images)."""
    from ..data import ImageDataModule
    from ..training.module import TransferClassifier

    try:
        ImageDataModule(**dict(data))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"compare: data: {exc}") from exc
    for spec in specs:
        try:
            TransferClassifier(backbone, weights=None, strategy=spec.name, strategy_args=dict(spec.args),
                               **{**model, **spec.model})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"compare: model arguments of strategy {spec.label!r}: {exc}") from exc


# ------------------------------------------------------------------------------------------ API
@dataclasses.dataclass
class Comparison:
    """What :func:`compare` returns.

    Attributes:
        rows: leaderboard rows (the CSV's columns), best first.
        results: one record per finished run (strategy × seed).
        failures: ``{"label", "seed", "error"}`` of runs that raised (rerun to retry them).
        output: the output folder; ``markdown``, ``csv``, ``plot``: the files written there.
        ran, reused: how many runs trained now, and how many results came from an earlier invocation.
    """

    rows: list[dict[str, Any]]
    results: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    output: Path
    markdown: Path
    csv: Path
    plot: Optional[Path]
    ran: int = 0
    reused: int = 0

    @property
    def best(self) -> Optional[dict[str, Any]]:
        """The top leaderboard row (its ``delta`` is the winner's delta file), or ``None``."""
        return self.rows[0] if self.rows else None


def compare(
    data: Mapping[str, Any],
    strategies: Optional[Sequence[Union[str, Mapping[str, Any]]]] = None,
    *,
    backbone: str = "tf_efficientnet_lite0",
    weights: Optional[str] = "package",
    seeds: Union[int, Sequence[int]] = (0,),
    max_epochs: Optional[int] = 3,
    max_time: Optional[float] = None,
    output: Union[str, Path] = "runs/compare",
    model: Optional[Mapping[str, Any]] = None,
    trainer: Optional[Mapping[str, Any]] = None,
    resume: bool = True,
    latency_repeats: int = 20,
    verbose: bool = True,
) -> Comparison:
    """Train several strategies under the same conditions and write a leaderboard (see the module docs).

    Args:
        data: :class:`~visiontune.ImageDataModule` arguments (``train``, ``image_size``, ``batch_size``...);
            without ``seed``, each run's seed seeds the split too.
        strategies: names or ``{name, args, model, label}`` mappings; ``None`` = :data:`DEFAULT_STRATEGIES`.
        backbone: timm model name, shared by all runs.
        weights: weight source (``"package"``, ``"hub"``, a file, ``None``).
        seeds: one seed or several (accuracy is then mean ± std).
        max_epochs: epochs per run; with only ``max_time``, 1000 (the time limit decides) and a constant
            LR unless ``model.scheduler`` says otherwise.
        max_time: wall-clock seconds per run (Lightning's ``max_time``, checked after every step).
        output: folder for the leaderboard, per-run results, reports and deltas.
        model: :class:`~visiontune.TransferClassifier` arguments shared by all runs (``lr``, ``bn``...).
        trainer: extra ``lightning.Trainer`` arguments (``accelerator``, ``limit_train_batches``...).
        resume: reuse results of finished runs with identical settings (``False``: redo everything).
        latency_repeats: timed forward passes for the latency column (0 = skip).
        verbose: print progress and the final table.

    Returns:
        A :class:`Comparison` (rows, per-run results, failures, file paths).

    Example:
        >>> result = compare({"train": "digits", "image_size": 64, "batch_size": 32, "hflip": False},
        ...                  ["linear", "bitfit", {"name": "lora", "args": {"rank": 4}}],
        ...                  max_epochs=2, output="runs/compare_digits")  # doctest: +SKIP
        >>> result.best["strategy"], result.best["delta"]  # doctest: +SKIP
        ('lora(rank=4)', 'runs/compare_digits/runs/lora-rank4/seed0/delta.safetensors')
    """
    specs, seeds, settings = _checked_settings(
        data, strategies, backbone=backbone, weights=weights, seeds=seeds, max_epochs=max_epochs, max_time=max_time,
        model=model, trainer=trainer, latency_repeats=latency_repeats)
    out = Path(output)
    (out / "results").mkdir(parents=True, exist_ok=True)
    results, failures, ran, reused = _run_all(specs, seeds, settings, out, resume=resume, verbose=verbose)
    return _write_leaderboard(specs, seeds, settings, out, results, failures, ran, reused, verbose=verbose)


def _checked_settings(
    data: Mapping[str, Any], strategies: Any, *, backbone: str, weights: Optional[str], seeds: Any,
    max_epochs: Optional[int], max_time: Optional[float], model: Optional[Mapping[str, Any]],
    trainer: Optional[Mapping[str, Any]], latency_repeats: int,
) -> tuple[list[StrategySpec], list[int], dict[str, Any]]:
    """:func:`compare`'s arguments checked: the strategies, the seeds and the settings every run shares."""
    specs = parse_strategies(strategies)
    seeds = [int(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("compare: seeds is empty")
    if not isinstance(data, Mapping) or not data.get("train"):
        raise ValueError("compare: data must be a mapping of ImageDataModule arguments with 'train'")
    if max_epochs is None and max_time is None:
        raise ValueError("compare: set max_epochs and/or max_time (the budget every strategy gets)")
    if max_time is not None and max_time <= 0:
        raise ValueError(f"compare: max_time must be > 0 seconds, got {max_time!r}")
    model = dict(model or {})
    for key in ("backbone", "weights", "strategy", "strategy_args", "num_classes", "class_names"):
        if key in model:
            raise ValueError(f"compare: model.{key} is set by the comparison itself; remove it")
    if max_epochs is None:
        max_epochs = 1000
        model.setdefault("scheduler", "constant")
    _validate(backbone, data, specs, model)
    settings = {"backbone": backbone, "weights": weights, "data": dict(data), "model": model,
                "trainer": dict(trainer or {}), "max_epochs": max_epochs, "max_time": max_time,
                "seeds": seeds, "latency_repeats": int(latency_repeats)}
    return specs, seeds, settings


def _previous_result(path: Path, fp: str) -> Optional[dict[str, Any]]:
    """The result saved at ``path`` when it is one of the same settings (fingerprint ``fp``), else ``None``."""
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        old = {}
    return old if old.get("fingerprint") == fp else None


def _run_all(specs: Sequence[StrategySpec], seeds: Sequence[int], settings: Mapping[str, Any], out: Path, *,
             resume: bool, verbose: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int, int]:
    """Every (seed, strategy) run not done earlier with the same settings: ``(results, failures, ran, reused)``."""
    import logging

    from ..io import atomic_write_json

    results: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    ran = reused = 0
    total = len(specs) * len(seeds)
    import lightning  # noqa: F401 - sets its loggers' levels on import: quiet them after that

    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    old_levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING)  # one line per run instead of Lightning's banner
    try:
        k = 0
        for seed in seeds:
            for spec in specs:
                k += 1
                key = {k2: v for k2, v in settings.items() if k2 not in ("seeds", "latency_repeats")}
                fp = fingerprint({**key, "strategy": spec.name, "args": dict(spec.args),
                                  "overrides": dict(spec.model), "seed": seed, "format": RESULT_FORMAT})
                path = out / "results" / f"{spec.slug}__seed{seed}.json"
                old = _previous_result(path, fp) if resume else None
                if old is not None:
                    results.append(old)
                    reused += 1
                    if verbose:
                        print(f"[{k}/{total}] {spec.label} seed {seed}: done earlier "
                              f"(accuracy {old['accuracy']:.4f})")
                    continue
                if verbose:
                    print(f"[{k}/{total}] {spec.label} seed {seed}: training ...", flush=True)
                try:
                    record = run_one(spec, seed, settings, out / "runs" / spec.slug / f"seed{seed}")
                except Exception as exc:  # one failing strategy does not stop the others
                    failures.append({"label": spec.label, "seed": seed, "error": f"{type(exc).__name__}: {exc}"})
                    if verbose:
                        print(f"[{k}/{total}] {spec.label} seed {seed}: FAILED: {type(exc).__name__}: {exc}")
                    continue
                record["fingerprint"] = fp
                atomic_write_json(path, record)
                results.append(record)
                ran += 1
                if verbose:
                    print(f"[{k}/{total}] {spec.label} seed {seed}: accuracy {record['accuracy']:.4f} in "
                          f"{record['train_seconds']:.1f} s")
    finally:
        for q, level in zip(quiet, old_levels):
            q.setLevel(level)
    return results, failures, ran, reused


def _write_leaderboard(specs: Sequence[StrategySpec], seeds: Sequence[int], settings: Mapping[str, Any], out: Path,
                       results: list[dict[str, Any]], failures: list[dict[str, Any]], ran: int, reused: int, *,
                       verbose: bool) -> Comparison:
    """``leaderboard.md`` / ``.csv`` / ``.png`` / ``.html`` and ``winner.json`` / ``.yaml`` under ``out``; the Comparison."""
    from ..io import atomic_write, atomic_write_json

    rows = leaderboard(results)
    title = f"{settings['backbone']}: {len(specs)} strategies × {len(seeds)} seed(s)"
    md = atomic_write(out / "leaderboard.md", leaderboard_markdown(rows, settings, failures))
    csv_path = atomic_write(out / "leaderboard.csv", leaderboard_csv(rows))
    plot = plot_leaderboard(rows, out / "leaderboard.png", title) if rows else None
    page = write_leaderboard_html(rows, settings, failures, title, out)
    if rows:
        atomic_write_json(out / "winner.json", {k: rows[0][k] for k in ("strategy", "accuracy_mean", "split",
                                                                          "trainable_params", "delta")})
        winner = next(spec for spec in specs if spec.label == rows[0]["strategy"])
        atomic_write(out / "winner.yaml", winner_fit_config(winner, settings, rows[0]))
    if verbose:
        print_leaderboard(rows, title)
        print(f"visiontune compare: {md}, {csv_path}" + (f", {plot}" if plot else "") + f", {page}")
        if failures:
            print(f"visiontune compare: {len(failures)} run(s) failed; run the same command again to retry them")
    return Comparison(rows, results, failures, out, md, csv_path, plot, ran, reused)


# ------------------------------------------------------------------------------------------ config + CLI
def winner_fit_config(spec: Any, settings: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """A ``visiontune fit --config`` YAML for one compared strategy: the comparison's backbone, weights,
    data, shared model options, the strategy with its options and overrides, and the same epoch budget.

    Example:
        >>> import yaml
        >>> spec = parse_strategies([{"name": "lora", "args": {"rank": 4}}])[0]
        >>> text = winner_fit_config(spec, {"backbone": "resnet18", "weights": None, "data": {"train": "x/"},
        ...                                 "model": {"bn": "eval"}, "max_epochs": 5, "max_time": None},
        ...                          {"accuracy_mean": 0.9})
        >>> cfg = yaml.safe_load(text)
        >>> cfg["model"]["strategy"], cfg["model"]["strategy_args"], cfg["model"]["bn"], cfg["trainer"]
        ('lora', {'rank': 4}, 'eval', {'max_epochs': 5})
    """
    import yaml

    model = {"backbone": settings["backbone"], "weights": settings["weights"], **dict(settings.get("model") or {}),
             **dict(spec.model), "strategy": spec.name}
    if spec.args:
        model["strategy_args"] = dict(spec.args)
    trainer: dict[str, Any] = {"max_epochs": settings["max_epochs"]}
    if settings.get("max_time"):
        trainer["max_time"] = {"seconds": settings["max_time"]}
    data = {k: v for k, v in dict(settings["data"]).items() if not isinstance(v, tuple)}
    head = (f"# visiontune compare's winner: {spec.label} (accuracy {row.get('accuracy_mean', float('nan')):.4f})\n"
            "# train it on all your data: visiontune fit --config winner.yaml\n")
    return head + yaml.safe_dump(plain_settings({"model": model, "data": data, "trainer": trainer}, False), sort_keys=True)


def load_compare_config(path: Union[str, Path], *args: str) -> dict[str, Any]:
    """:func:`compare`'s arguments from a config file (a ``visiontune fit`` config, plus compare's keys) and
    command-line style overrides, read by ``fit``'s parser (:mod:`visiontune.comparison.config`); a bad key is a
    :class:`~visiontune.errors.ConfigError` naming it.

    Example:
        >>> cfg = load_compare_config("configs/compare.yaml", "--trainer.max_epochs", "1")  # doctest: +SKIP
        >>> cfg["strategies"][1], cfg["max_epochs"]  # doctest: +SKIP
        ('bitfit', 1)
    """
    from .config import compare_arguments

    kwargs = compare_arguments(["--config", str(path), *args])
    kwargs.pop("dry_run")
    return kwargs


def compare_from_config(path: Union[str, Path], *args: str, **overrides: Any) -> Comparison:
    """Run :func:`compare` with the settings of a config file (and command-line style ``args``); keyword arguments
    of :func:`compare` override them.

    Example:
        >>> compare_from_config("configs/compare.yaml", max_epochs=1)  # doctest: +SKIP
    """
    kwargs = {**load_compare_config(path, *args), **{k: v for k, v in overrides.items() if v is not None}}
    return compare(kwargs.pop("data"), kwargs.pop("strategies"), **kwargs)


def _print_plan(kwargs: Mapping[str, Any]) -> None:
    """What ``compare(**kwargs)`` would run (after checking it as compare does), for ``--dry_run``."""
    settings = {k: kwargs[k] for k in ("backbone", "weights", "seeds", "max_epochs", "max_time", "model", "trainer",
                                       "latency_repeats")}
    specs, seeds, checked = _checked_settings(kwargs["data"], kwargs["strategies"], **settings)
    print(f"visiontune compare (dry run): {len(specs)} strategies x {len(seeds)} seed(s) = {len(specs) * len(seeds)} "
          f"runs on {checked['backbone']} (weights {checked['weights']}), output {kwargs['output']}")
    print("strategies: " + ", ".join(s.label for s in specs) + f"; seeds: {', '.join(map(str, seeds))}")
    for key in ("data", "model", "trainer", "max_epochs", "max_time"):
        print(f"{key}: {json.dumps(checked[key], default=str, sort_keys=True)}")


def compare_main(argv: Sequence[str]) -> int:
    """``visiontune compare --config FIT.yaml [--strategies a,b] [--seeds 0,1] [--output DIR] [--model.* ...]``.

    The config is a ``visiontune fit`` config (see :mod:`visiontune.comparison.config` for what compare takes of it
    and its own keys). Returns 0, 1 when every run failed, 2 for a bad config (one line on stderr).
    """
    from ..errors import ConfigError
    from .config import compare_arguments

    argv = ["--resume=false" if a == "--no-resume" else a for a in argv]  # the old flag
    try:
        kwargs = compare_arguments(argv)
        if kwargs.pop("dry_run"):
            _print_plan(kwargs)
            return 0
        result = compare(kwargs.pop("data"), kwargs.pop("strategies"), **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        what = "invalid configuration: " if isinstance(exc, ConfigError) else ""  # as main() prints it for fit
        print(f"visiontune compare: error: {what}{exc}", file=sys.stderr)
        return 2
    return 1 if result.failures and not result.rows else 0
