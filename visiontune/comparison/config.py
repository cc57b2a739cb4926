"""``visiontune compare``'s configuration: a ``visiontune fit`` config, plus compare's own keys.

    visiontune compare --config configs/finetune.yaml --data.train photos/ --strategies linear,lora --seeds 0,1

The config and its overrides are read by ``fit``'s parser (:mod:`visiontune.cli.config`), so any fit config
compares strategies as it is:

* ``model``: what every run shares (``lr``, ``bn``, ``backbone``, ``weights``, ...); ``strategy`` and
  ``strategy_args`` are replaced by each contender's, the classes come from the data;
* ``data``: the :class:`~visiontune.ImageDataModule` of every run; without ``data.seed`` each run's seed seeds
  the split too (set it to keep one split for all seeds);
* ``trainer``: ``max_epochs`` and ``max_time`` are every strategy's budget; its other options (``max_steps``,
  ``accelerator``, ``limit_train_batches``, ``callbacks``...) go to every run's trainer, but ``logger`` (each run
  logs under ``output``);
* ``seed_everything``: the seed when ``seeds`` is not given.

Compare's own keys, in the file or on the command line: ``strategies`` (names, ``linear,lora`` on the command line,
or ``{name, args, model, label}`` mappings; default :data:`~visiontune.comparison.api.DEFAULT_STRATEGIES`),
``seeds`` (``0,1,2`` or a list), ``output`` (``runs/compare``), ``resume`` (``true``), ``latency_repeats`` (20) and
``dry_run`` (print what would run, train nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

__all__ = ["compare_arguments", "max_time_seconds"]


def _options(parser: Any) -> None:
    parser.add_argument("--strategies", type=Optional[Union[str, list[Union[str, dict[str, Any]]]]], default=None,
                        help="strategies to compare: comma-separated names (linear,lora) or a list of names and "
                             "{name, args, model, label} mappings (default: linear, bitfit, last_k, lora, adapter, full)")
    parser.add_argument("--seeds", type=Optional[Union[int, str, list[int]]], default=None,
                        help="seeds, e.g. 0,1,2 (default: seed_everything)")
    parser.add_argument("--output", type=str, default="runs/compare", help="folder of the leaderboard and the runs")
    parser.add_argument("--resume", type=bool, nargs="?", const=True, default=True,
                        help="reuse finished runs with the same settings (--resume false: redo them)")
    parser.add_argument("--latency_repeats", type=int, default=20, help="timed forward passes (0 = no latency)")
    parser.add_argument("--dry_run", type=bool, nargs="?", const=True, default=False,
                        help="check the config and print what would run; train nothing")


def max_time_seconds(value: Any) -> Optional[float]:
    """Lightning's ``max_time`` (``"DD:HH:MM:SS"``, ``{hours: 1}``, a timedelta, or seconds) in seconds.

    Example:
        >>> max_time_seconds("00:01:30:00"), max_time_seconds({"minutes": 2}), max_time_seconds(None)
        (5400.0, 120.0, None)
    """
    import datetime

    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, str):
        days, hours, minutes, seconds = (int(x) for x in value.split(":"))
        return float(datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds())
    if isinstance(value, dict) or hasattr(value, "as_dict"):
        parts = value.as_dict() if hasattr(value, "as_dict") else value
        return datetime.timedelta(**parts).total_seconds()
    return float(value)


def _strategies(value: Any) -> Optional[list[Any]]:
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return None if value is None else list(value)


def _seeds(value: Any, seed_everything: Any) -> list[int]:
    if value is None:
        return [seed_everything if isinstance(seed_everything, int) and not isinstance(seed_everything, bool) else 0]
    if isinstance(value, str):
        return [int(s) for s in value.split(",") if s.strip()]
    return [int(value)] if isinstance(value, int) else [int(s) for s in value]


def compare_arguments(argv: Sequence[str]) -> dict[str, Any]:
    """:func:`~visiontune.comparison.api.compare`'s keyword arguments (and ``dry_run``) from a command line
    (``--config FILE``, overrides, compare's own options), read by ``visiontune fit``'s parser.

    Only the ``model``, ``data`` and ``trainer`` options the config or the command line set are passed on (the
    rest are the defaults anyway), so the settings, the resume fingerprint and ``winner.yaml`` hold what the config
    says.

    Example:
        >>> kwargs = compare_arguments(["--config", "configs/compare.yaml", "--strategies", "linear,lora"])  # doctest: +SKIP
        >>> kwargs["strategies"], kwargs["max_epochs"]  # doctest: +SKIP
        (['linear', 'lora'], 3)
    """
    from ..cli.config import ToolCLI

    cli = ToolCLI("visiontune compare", argv, _options,
                  description="Compare transfer strategies on the same data, split and budget (a fit config).")
    cfg = cli.config
    model = cli.given("model")
    for key in ("strategy", "strategy_args", "num_classes", "class_names"):  # each run's own / from the data
        model.pop(key, None)
    trainer = cli.given("trainer")
    for key in ("max_epochs", "max_time", "logger"):
        trainer.pop(key, None)
    return {
        "data": cli.given("data"),
        "strategies": _strategies(cfg.strategies),
        "backbone": model.pop("backbone", cfg.model.backbone),
        "weights": model.pop("weights", cfg.model.weights),
        "seeds": _seeds(cfg.seeds, cfg.seed_everything),
        "max_epochs": cfg.trainer.max_epochs,
        "max_time": max_time_seconds(cfg.trainer.max_time),
        "output": cfg.output,
        "model": model,
        "trainer": trainer,
        "resume": bool(cfg.resume),
        "latency_repeats": int(cfg.latency_repeats),
        "dry_run": bool(cfg.dry_run),
    }
