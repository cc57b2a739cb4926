"""Tools that prepare a gradual-unfreezing run: the LR finder and the schedule printer.

``visiontune schedule --model.backbone NAME`` prints a generated :class:`~visiontune.schedule.GradualUnfreeze`
schedule as YAML, one phase a line, commented with each phase's layers (``--config X.yaml`` checks and
prints the config's own schedule). Both commands read the config ``visiontune fit --config`` takes, through
the same parser (:mod:`visiontune.cli.config`).

The learning-rate finder suggests the head LR before the schedule starts.
Runs Lightning's LR range test (``LearningRateFinder``: the LR grows exponentially from ``min_lr`` to
``max_lr`` over ``num_training`` steps; the suggestion is the steepest fall of the smoothed loss) on
what trains *first*: phase 0 of the configured :class:`~visiontune.schedule.GradualUnfreeze` schedule
(usually the head), or the head alone with ``head_only``, or else the strategy's parameters. Weights,
optimizer state and ``requires_grad`` are restored afterwards.

    visiontune lr-find --config configs/schedule_explicit.yaml
    visiontune lr-find --config configs/schedule_explicit.yaml --num_training 50 --plot lr_find.png

This module imports no heavy dependency until used (it holds the ``visiontune lr-find`` and
``visiontune schedule`` commands, named in ``visiontune.cli.TOOLS``).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    import lightning as L
    from torch import nn

    from .callback import Phase

__all__ = ["LRFindResult", "lr_find", "lr_find_main", "schedule_main", "schedule_yaml"]


@dataclass
class LRFindResult:
    """What the range test found.

    Attributes:
        suggestion: the suggested learning rate (``None`` when too few finite losses were recorded).
        lrs: the learning rates tried, one per step.
        losses: the smoothed training losses, one per step.
        trainable: number of parameters trained during the test.
        trained: what was trained: ``"phase 0 of the schedule"``, ``"head only"`` or ``"strategy"``.
    """

    suggestion: Optional[float]
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    trainable: int = 0
    trained: str = "strategy"
    finder: Any = field(default=None, repr=False)

    def plot(self, path: Optional[str] = None) -> Any:
        """The loss-vs-LR figure (matplotlib), saved to ``path`` if given."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        fig = self.finder.plot(suggest=self.suggestion is not None)
        if path:
            from ..io import atomic_save_figure

            atomic_save_figure(fig, path)
        return fig


def _finder_class() -> type:
    from lightning.pytorch.callbacks import LearningRateFinder

    class _PhaseZeroLRFinder(LearningRateFinder):
        """LearningRateFinder that first puts the schedule in its starting phase.

        Lightning runs tuner callbacks before all others, so the schedules' ``on_fit_start`` (which
        freezes everything but phase 0) is called here first.
        """

        def __init__(self, schedules: list, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.schedules = schedules
            self.trainable = 0

        def on_fit_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
            for cb in self.schedules:
                cb.load_state_dict({"phase": 0})  # the range test is about the start of the schedule
                cb.on_fit_start(trainer, pl_module)
            self.trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            super().on_fit_start(trainer, pl_module)

    return _PhaseZeroLRFinder


def lr_find(
    model: "L.LightningModule",
    datamodule: Optional["L.LightningDataModule"] = None,
    *,
    trainer: Optional["L.Trainer"] = None,
    train_dataloaders: Any = None,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    num_training: int = 100,
    mode: Literal["exponential", "linear"] = "exponential",
    early_stop_threshold: Optional[float] = 4.0,
    head_only: bool = False,
) -> LRFindResult:
    """Run the LR range test on what trains first and return the suggested learning rate.

    Args:
        model: the module (a :class:`visiontune.TransferClassifier` or any module with a timm model).
        datamodule: the data (or give ``train_dataloaders``).
        trainer: the trainer whose :class:`~visiontune.schedule.GradualUnfreeze` callbacks define phase 0;
            ``None`` = a quiet single-device trainer without a schedule.
        train_dataloaders: training loader(s) when no datamodule is given.
        min_lr, max_lr: the LR range.
        num_training: steps of the test (the loader is cycled for as many epochs as needed).
        mode: ``"exponential"`` or ``"linear"`` LR growth.
        early_stop_threshold: stop when the loss exceeds this multiple of the best loss (``None`` = never).
        head_only: train only the classification head during the test (what the trainer's schedule,
            if any, would otherwise decide).

    Returns:
        An :class:`LRFindResult`; ``result.suggestion`` is the LR to put in ``model.lr``.

    Example:
        >>> from visiontune import ImageDataModule, TransferClassifier
        >>> model = TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="full")
        >>> result = lr_find(model, ImageDataModule(train="digits", image_size=32), head_only=True)  # doctest: +SKIP
        >>> model.hparams.lr = result.suggestion  # doctest: +SKIP
    """
    import lightning as L

    from .callback import GradualUnfreeze

    if trainer is None:
        trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
    schedules = [cb for cb in trainer.callbacks if isinstance(cb, GradualUnfreeze)]
    trained = "phase 0 of the schedule" if schedules else "strategy"
    if head_only:
        schedules = [GradualUnfreeze([{"at_epoch": 0, "groups": ["head"]}], verbose=False)]
        trained = "head only"
    finder = _finder_class()(schedules, min_lr=min_lr, max_lr=max_lr, num_training_steps=num_training,
                             mode=mode, early_stop_threshold=early_stop_threshold, update_attr=False)
    finder._early_exit = True  # as Tuner.lr_find: stop the fit once the range test is done
    saved_callbacks, saved_loggers, saved_epochs = trainer.callbacks, trainer.loggers, trainer.fit_loop.max_epochs
    saved_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    # Only the schedules (and the finder) run: no checkpoints, reports or run directories for a range test.
    trainer.callbacks = [finder] + [cb for cb in saved_callbacks if isinstance(cb, GradualUnfreeze)]
    trainer.loggers = []
    trainer.fit_loop.max_epochs = 10**6  # the range test stops itself after num_training steps
    try:
        trainer.fit(model, train_dataloaders=train_dataloaders, datamodule=datamodule)
    finally:
        trainer.callbacks, trainer.loggers = saved_callbacks, saved_loggers
        trainer.fit_loop.max_epochs = saved_epochs
        for n, p in model.named_parameters():
            if n in saved_grad:
                p.requires_grad_(saved_grad[n])
        for cb in schedules:
            cb.teardown(trainer, model, "fit")
            cb.phase = 0
    found = finder.optimal_lr
    if found is None:
        return LRFindResult(None, trainable=finder.trainable, trained=trained)
    suggestion = found.suggestion()
    lrs = [float(x) for x in found.results.get("lr", [])]
    losses = [float(x) for x in found.results.get("loss", [])]
    return LRFindResult(suggestion, lrs, losses, finder.trainable, trained, found)


def _lr_find_options(parser: Any) -> None:
    """lr-find's own options, next to fit's."""
    parser.add_argument("--min_lr", type=float, default=1e-6, help="smallest LR of the range test")
    parser.add_argument("--max_lr", type=float, default=1.0, help="largest LR of the range test")
    parser.add_argument("--num_training", type=int, default=100, help="steps of the range test (default 100)")
    parser.add_argument("--mode", type=Literal["exponential", "linear"], default="exponential")
    parser.add_argument("--head_only", type=bool, nargs="?", const=True, default=False,
                        help="train only the head during the test")
    parser.add_argument("--plot", type=Optional[str], default=None, help="save the loss-vs-LR plot to this file (.png)")


def lr_find_main(argv: Sequence[str]) -> int:
    """``visiontune lr-find --config X.yaml [--num_training N] [--plot FILE] [--model.* ...]``.

    The config and every ``--model.*`` / ``--data.*`` / ``--trainer.*`` override are read as ``visiontune fit``
    reads them (:mod:`visiontune.cli.config`), so the test runs on exactly the model, data and schedule of the
    config; its own options are the finder's.

    Example:
        >>> lr_find_main(["--config", "configs/schedule_explicit.yaml"])  # doctest: +SKIP
    """
    from ..cli.config import ToolCLI
    from ..errors import ConfigError

    cli = ToolCLI("visiontune lr-find", argv, _lr_find_options,
                  description="Suggest a head learning rate (Lightning's LR range test) for a visiontune config, on "
                              "what trains first (phase 0 of its GradualUnfreeze schedule).")
    own = cli.config
    if own.data.train is None:
        raise ConfigError("lr-find needs training data: give a config (visiontune lr-find --config X.yaml) "
                          "or --data.train")
    for name in ("min_lr", "max_lr"):
        if not own[name] > 0:
            raise ConfigError(f"--{name} must be > 0, got {own[name]!r}")
    if own.min_lr >= own.max_lr:
        raise ConfigError(f"--min_lr must be below --max_lr, got {own.min_lr!r} >= {own.max_lr!r}")
    if own.num_training < 3:
        raise ConfigError(f"--num_training must be >= 3, got {own.num_training!r}")
    cli.instantiate()
    result = lr_find(cli.model, cli.datamodule, trainer=cli.trainer, min_lr=own.min_lr, max_lr=own.max_lr,
                     num_training=own.num_training, mode=own.mode, head_only=own.head_only)
    h = getattr(cli.model, "hparams", {})
    print(f"visiontune lr-find: {h.get('backbone', type(cli.model).__name__)}, strategy {h.get('strategy', '?')}; "
          f"trained {result.trained}: {result.trainable:,} parameters, {len(result.lrs)} steps "
          f"from {own.min_lr:g} to {own.max_lr:g}")
    if result.suggestion is None or not math.isfinite(result.suggestion):
        print("visiontune lr-find: no suggestion (too few finite losses): raise --num_training or use more data",
              file=sys.stderr)
        return 1
    lr = float(f"{result.suggestion:.2g}")
    print(f"suggested learning rate: {result.suggestion:.3g}")
    print(f"use it: --model.lr {lr}    (YAML: model: {{lr: {lr}}})")
    if own.plot:
        result.plot(own.plot)
        print(f"plot: {own.plot}")
    return 0


def schedule_yaml(
    net: "nn.Module",
    phases: Optional[Sequence[Union[Mapping[str, Any], "Phase"]]] = None,
    *,
    every_n_epochs: int = 1,
    groups_per_phase: int = 1,
    coarse: bool = False,
    group_patterns: Optional[Sequence[str]] = None,
    title: str = "",
) -> str:
    """A ``trainer.callbacks`` YAML snippet holding the schedule, one phase a line, commented with layers.

    Args:
        net: the timm model (after :func:`visiontune.apply_strategy`).
        phases: phases to print; ``None`` = the implicit schedule from ``every_n_epochs``/``groups_per_phase``.
        every_n_epochs, groups_per_phase, coarse, group_patterns: as for :class:`GradualUnfreeze`.
        title: a first comment line.

    Example:
        >>> import timm
        >>> print(schedule_yaml(timm.create_model("resnet18", num_classes=3), coarse=True))  # doctest: +ELLIPSIS
        # ...
        trainer:
          callbacks:
          - class_path: visiontune.schedule.GradualUnfreeze
            init_args:
              coarse: true
              phases:
              - {at_epoch: 0, groups: [head]}  # fc (1,539 parameters)
        ...
    """
    from .phases import auto_phases, resolve_schedule, summarize_names

    if phases is None:
        phases = auto_phases(net, every_n_epochs=every_n_epochs, groups_per_phase=groups_per_phase,
                             coarse=coarse, group_patterns=group_patterns)
    r = resolve_schedule(net, phases, coarse=coarse, group_patterns=group_patterns)
    sizes = dict((n, p.numel()) for n, p in net.named_parameters())
    n = len(r.groups)
    lines = []
    if title:
        lines.append(f"# {title}")
    lines += [
        f"# {n} depth groups. groups: index from the input (0 = stem), negative from the output (-1 = head,",
        "# -2 = last block), or stem / block.N / head. Per phase: at_epoch or at_step; groups and/or regex",
        "# (re.search over parameter names); optional lr (peak LR of what the phase thaws).",
        "trainer:",
        "  callbacks:",
        "  - class_path: visiontune.schedule.GradualUnfreeze",
        "    init_args:",
    ]
    if coarse:
        lines.append("      coarse: true")
    if group_patterns:
        lines.append("      group_patterns: [" + ", ".join(_yaml_str(p) for p in group_patterns) + "]")
    lines.append("      phases:")
    body = []
    for p, thaw in zip(r.phases, r.thaw):
        d = p.to_dict()
        parts = [f"at_{p.unit}: {p.at}"]
        if "groups" in d:
            parts.append("groups: [" + ", ".join(_yaml_str(g) for g in d["groups"]) + "]")
        if "regex" in d:
            rx = d["regex"] if isinstance(d["regex"], list) else [d["regex"]]
            parts.append("regex: [" + ", ".join(_yaml_str(x) for x in rx) + "]")
        if p.lr is not None:
            parts.append(f"lr: {p.lr!r}")
        body.append(("      - {" + ", ".join(parts) + "}",
                     f"{summarize_names(thaw)} ({sum(sizes[t] for t in thaw):,} parameters)"))
    width = max(len(b[0]) for b in body)
    lines += [f"{code.ljust(width)}  # {note}" for code, note in body]
    never = r.never_thawed()
    if never:
        lines.append(f"# never thawed: {summarize_names(never)} ({sum(sizes[t] for t in never):,} parameters)")
    return "\n".join(lines) + "\n"


def _yaml_str(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    s = str(value)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", s) and s not in ("true", "false", "null", "yes", "no", "on", "off"):
        return s
    return "'" + s.replace("'", "''") + "'"


def _schedule_options(parser: Any) -> None:
    """schedule's own options, next to fit's: the implicit schedule's knobs (they replace the config's)."""
    parser.add_argument("--every_n_epochs", type=Optional[int], default=None,
                        help="implicit schedule: epochs between phases (default 1)")
    parser.add_argument("--groups_per_phase", type=Optional[int], default=None,
                        help="implicit schedule: groups per phase (default 1)")
    parser.add_argument("--coarse", type=Optional[bool], nargs="?", const=True, default=None,
                        help="timm's coarse groups (stages instead of blocks)")
    parser.add_argument("--group_patterns", type=Optional[list[str]], default=None,
                        help="regexes overriding the depth groups, e.g. '[stem, \\.blocks\\.]'")


def _schedule_settings(config: Any) -> dict[str, Any]:
    """The schedule to print: the command line's knobs, else the config's GradualUnfreeze callback (its explicit
    phases too, unless ``--every_n_epochs`` / ``--groups_per_phase`` ask for a generated one)."""
    own = {k: config[k] for k in ("every_n_epochs", "groups_per_phase", "coarse", "group_patterns")}
    settings: dict[str, Any] = {"phases": None, **own}
    for cb in config.trainer.get("callbacks") or []:
        if str(cb.get("class_path", "")).endswith("GradualUnfreeze"):
            init = cb.get("init_args")
            init = init.as_dict() if hasattr(init, "as_dict") else dict(init or {})
            explicit = own["every_n_epochs"] is not None or own["groups_per_phase"] is not None
            settings["phases"] = None if explicit else init.get("phases")
            for key in own:
                if own[key] is None and init.get(key) is not None:
                    settings[key] = init[key]
            break
    settings["every_n_epochs"] = settings["every_n_epochs"] or 1
    settings["groups_per_phase"] = settings["groups_per_phase"] or 1
    settings["coarse"] = bool(settings["coarse"])
    return settings


def schedule_main(argv: Sequence[str]) -> int:
    """``visiontune schedule [--config X.yaml] [--model.backbone NAME] [--every_n_epochs N] ...``: print the
    gradual-unfreezing schedule as YAML to paste into a config and edit.

    The config and the ``--model.*`` overrides are read as ``visiontune fit`` reads them (:mod:`visiontune.cli.config`):
    the model's backbone, strategy and options, and the config's GradualUnfreeze callback's options (an explicit
    schedule too, which is then checked against the model and printed with each phase's layers). No weights are read.

    Example:
        >>> schedule_main(["--model.backbone", "resnet18", "--coarse"])  # doctest: +SKIP
    """
    from ..cli.config import ToolCLI

    cli = ToolCLI("visiontune schedule", argv, _schedule_options,
                  description="Print a gradual-unfreezing schedule (YAML) for a timm backbone.")
    model, settings = cli.config.model, _schedule_settings(cli.config)
    import timm

    from ..models.backbones import BackboneError, create_backbone
    from .callback import ScheduleError
    from ..strategies import StrategyError, apply_strategy

    name = model.backbone
    if not timm.is_model(name):
        print(f"visiontune schedule: unknown timm model {name!r}", file=sys.stderr)
        return 2
    classes = len(model.class_names) if model.class_names else model.num_classes
    try:
        net = create_backbone(name, None, num_classes=int(classes or 10), **dict(model.backbone_args or {}))
        strategy = model.strategy or "full"
        apply_strategy(net, strategy, model.strategy_args)
        text = schedule_yaml(net, settings["phases"], every_n_epochs=settings["every_n_epochs"],
                             groups_per_phase=settings["groups_per_phase"], coarse=settings["coarse"],
                             group_patterns=settings["group_patterns"],
                             title=f"Gradual unfreezing for {name} (strategy {strategy}); "
                                   f"generated by: visiontune schedule {' '.join(argv)}")
    except (ScheduleError, StrategyError, BackboneError) as exc:
        print(f"visiontune schedule: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0
