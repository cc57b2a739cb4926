"""The ``visiontune`` command: LightningCLI (fit/validate/test/predict) plus visiontune's own tools.

    visiontune fit --config configs/quickstart.yaml
    visiontune fit --config configs/quickstart.yaml --model.strategy last_k --model.strategy_args '{k: 2}'
    visiontune fit --config configs/quickstart.yaml --print_config > my.yaml
    visiontune predict --ckpt_path runs/.../checkpoints/last.ckpt --data.predict photos/
    visiontune predict --delta runs/.../checkpoints/delta.safetensors --data.predict photos/
    visiontune strategies
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Optional, Union

__all__ = ["main", "VisionTuneCLI", "TOOLS", "cli_class", "load_tool", "register_tool"]

Tool = Callable[[Sequence[str]], int]

# visiontune's own sub-commands (not LightningCLI ones): name -> "module:function", the function taking the
# remaining argv. Only the chosen tool's module is imported (``visiontune --help`` imports none), and the tools'
# modules never import this one to register themselves: this map is the one place that names them.
TOOLS: dict[str, Union[str, Tool]] = {
    "check-data": "visiontune.data.checks:main",
    "compare": "visiontune.comparison.api:compare_main",
    "lr_find": "visiontune.schedule.tuning:lr_find_main",
    "schedule": "visiontune.schedule.tuning:schedule_main",
    "strategies": "visiontune.cli.main:strategies_main",
}


def load_tool(name: str) -> Tool:
    """The function of ``visiontune NAME`` (importing its module now); a ``KeyError`` for an unknown name."""
    target = TOOLS[name]
    if not isinstance(target, str):
        return target
    import importlib

    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def register_tool(name: str) -> Callable[[Tool], Tool]:
    """Add a ``visiontune NAME ...`` sub-command defined outside visiontune (built-ins are listed in
    :data:`TOOLS`). The decorated function takes the remaining argv and returns the exit code."""

    def deco(fn: Tool) -> Tool:
        TOOLS[name] = fn
        return fn

    return deco


def strategies_main(argv: Sequence[str]) -> int:
    """``visiontune strategies``: every registered strategy with its one-line description."""
    from ..strategies import available_strategies, get_strategy

    for name in available_strategies():
        print(f"{name:10s} {get_strategy(name).description}")
    return 0


def cli_class():
    """Build the :class:`VisionTuneCLI` class (imports Lightning; ``visiontune.cli.VisionTuneCLI`` calls this)."""
    import contextlib

    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.cli import LightningCLI

    from ..data import ImageDataModule
    from ..delta.build import apply_delta_to_module, module_arguments_from_delta
    from ..delta.writer import DeltaWriter
    from ..errors import ConfigError
    from ..training.module import TransferClassifier, weights_from_checkpoint
    from ..training.report import PredictionCSVWriter, RunReport

    class VisionTuneCLI(LightningCLI):
        """LightningCLI with visiontune's defaults: run directory, checkpoints, report, predictions CSV."""

        def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
            # --ckpt_path: the classes are instantiated inside weights_from_checkpoint() (before_instantiate_classes
            # enters it, instantiate_trainer leaves it, and so does any error before)
            self._restoring = contextlib.ExitStack()
            with self._restoring:
                super().__init__(
                    TransferClassifier,
                    ImageDataModule,
                    seed_everything_default=0,
                    save_config_kwargs={"overwrite": True},
                    trainer_defaults={
                        "logger": {
                            "class_path": "lightning.pytorch.loggers.CSVLogger",
                            "init_args": {"save_dir": "runs", "name": "visiontune"},
                        },
                        "enable_model_summary": False,
                        "max_epochs": 15,  # the recipe's budget for a folder of photos (README: Recipe)
                    },
                    args=list(args) if args is not None else None,
                    run=run,
                )

        def add_arguments_to_parser(self, parser) -> None:  # type: ignore[override]
            from ..training.checkpoint import LatestCheckpoint  # ModelCheckpoint, but last.ckpt = the latest epoch

            parser.add_lightning_class_args(LatestCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.monitor": "val_acc", "checkpoint.mode": "max",
                                 "checkpoint.save_last": True, "checkpoint.filename": "best"})
            parser.add_lightning_class_args(RunReport, "report")
            parser.add_lightning_class_args(PredictionCSVWriter, "predictions")
            parser.add_lightning_class_args(DeltaWriter, "save_delta")  # delta.safetensors after fit
            parser.add_argument(
                "--delta", type=Optional[str], default=None,
                help="a task delta (.safetensors, from fit or save_delta) loaded onto the base model; the "
                     "model's backbone, strategy, classes and bn policy are taken from it",
            )

        def _instantiate_trainer(self, config, callbacks):  # type: ignore[override]
            # a rich progress bar unless the user turned bars off or brought their own
            if config.get("enable_progress_bar", True) is not False and not any(
                type(c).__name__.endswith("ProgressBar") for c in callbacks + list(config.get("callbacks") or [])
            ):
                callbacks = [*callbacks, RichProgressBar()]
            return super()._instantiate_trainer(config, callbacks)

        # bad option values (unknown strategy, rank <= 0, image_size 0, ...) raise ConfigError while the classes
        # are instantiated: main() reports them (exit 2, no traceback); any other exception is a bug

        def _parse_ckpt_path(self) -> None:  # type: ignore[override]
            # Lightning reads --ckpt_path's hyperparameters here with torch.load: a truncated or foreign file
            # is a CheckpointError naming it, not a traceback from inside torch
            try:
                super()._parse_ckpt_path()
            except Exception as exc:
                from ..io import checkpoint_load_error

                sub = self.config.get("subcommand")
                path = self.config[sub].get("ckpt_path") if sub else None
                err = checkpoint_load_error(path, exc, from_torch_load=False) if path else None
                if err is None:
                    raise
                raise err from None

        def instantiate_trainer(self, **kwargs):  # type: ignore[override]
            from lightning.pytorch.plugins.io import TorchCheckpointIO

            from ..training.checkpoint import AtomicCheckpointIO

            self._restoring.close()  # the model exists: TransferClassifiers made from now on read their weights
            trainer = super().instantiate_trainer(**kwargs)
            # checkpoints: atomic writes, weights_only loads (unless the user brought their own CheckpointIO)
            if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
                trainer.strategy.checkpoint_io = AtomicCheckpointIO()
            return trainer

        def before_instantiate_classes(self) -> None:
            sub = self.config.get("subcommand")
            if sub and self.config[sub].get("delta"):
                self._model_from_delta(self.config[sub])
            if sub and self.config[sub].get("ckpt_path"):
                # every weight comes from the checkpoint: never download or re-read the pretrained ones, but keep
                # model.weights (config.yaml, checkpoints and deltas record the base the model was trained on)
                self._restoring.enter_context(weights_from_checkpoint())

        def _model_from_delta(self, cfg) -> None:
            if cfg.get("ckpt_path"):
                raise ConfigError("--delta and --ckpt_path exclude each other: a checkpoint already holds the task")
            args = module_arguments_from_delta(cfg.delta)
            model = cfg.model
            backbone_args = dict(args["backbone_args"])
            model.drop_path_rate = backbone_args.pop("drop_path_rate", None)
            for key in ("backbone", "class_names", "num_classes", "strategy", "strategy_args", "bn"):
                setattr(model, key, args[key])
            model.backbone_args = backbone_args or None
            if model.weights == "hub":  # the default: use the base the delta was trained on
                model.weights = args["weights"]

        def _load_delta(self) -> None:
            path = self.config[self.config.subcommand].get("delta")
            if path:
                apply_delta_to_module(self.model, path)

        before_fit = before_validate = before_test = before_predict = _load_delta

    return VisionTuneCLI


def __getattr__(name: str):
    if name == "VisionTuneCLI":
        return cli_class()
    raise AttributeError(name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``visiontune`` command."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("visiontune tools: " + ", ".join(sorted(TOOLS)))
        print("LightningCLI sub-commands: fit, validate, test, predict (visiontune fit --help)")
        return 0
    from ..errors import ConfigError

    try:
        if argv[0] in TOOLS:
            return load_tool(argv[0])(argv[1:]) or 0
        cli_class()(args=None if from_sys else argv)
    except Exception as exc:
        # the user's mistake (data, option, file), found before training: one message, exit 2, no traceback.
        # Anything else is a bug and keeps its traceback.
        user = _user_error(exc)
        if user is None:
            raise
        prog = "visiontune" + (f" {argv[0]}" if not argv[0].startswith("-") else "")
        what = "invalid configuration: " if isinstance(user, ConfigError) else ""
        print(f"{prog}: error: {what}{user}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


def _user_error(exc: BaseException):
    """``exc`` if it is a :class:`~visiontune.errors.UserError`, or the one it was raised ``from`` (jsonargparse
    wraps a config dataclass's error in its own ``ValueError``); ``None`` for anything else."""
    from ..errors import UserError

    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, UserError):
            return exc
        exc, seen = exc.__cause__, seen + 1
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
