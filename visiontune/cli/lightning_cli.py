"""``VisionTuneCLI``: LightningCLI with visiontune's defaults (imports Lightning: :func:`visiontune.cli.cli_class`
loads this module only when a LightningCLI sub-command runs, so ``visiontune --help`` stays fast)."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Optional

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI

from ..data.datamodule import ImageDataModule
from ..delta.build import apply_delta_to_module, module_arguments_from_delta
from ..delta.writer import DeltaWriter
from ..errors import ConfigError
from ..training.module import TransferClassifier, weights_from_checkpoint
from ..training.report import PredictionCSVWriter, RunReport

__all__ = ["VisionTuneCLI", "config_error_message"]


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

    def init_parser(self, **kwargs):  # type: ignore[override]
        # a bad key or value raises (parse_arguments makes it one line; main() prints it, exit 2), no usage dump
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:  # type: ignore[override]
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as exc:
            parsers = [parser, *getattr(self, "_subcommand_parsers", {}).values()]
            keys = {a.dest for p in parsers for a in p._actions if a.dest and a.dest != "help"}
            raise ConfigError(config_error_message(str(exc), keys)) from None

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


_UNKNOWN_KEY = (
    re.compile(r"Group '(?P<group>[\w.]+)' does not accept (?:nested key|option) '(?P<key>[\w.]+)'"),
    re.compile(r"Subcommand '\w+' does not accept (?:nested key|option) '(?P<key>[\w.]+)'"),
    re.compile(r"(?:Option|Key) '(?P<key>[\w.]+)' is not accepted"),
)


def config_error_message(message: str, keys: Iterable[str] = ()) -> str:
    """jsonargparse's error as one line; an unknown key (in the config file or on the command line) is named as
    the dotted key, with the closest known one.

    Example:
        >>> config_error_message("Group 'model' does not accept option 'lrr'", ["model.lr", "data.train"])
        "unknown key 'model.lrr' (did you mean 'model.lr'?)"
        >>> config_error_message('Parser key "data.batch_size":\\n  Expected an int. Got value: x')
        'Parser key "data.batch_size": Expected an int. Got value: x'
    """
    for pattern in _UNKNOWN_KEY:
        m = pattern.search(message)
        if m:
            key = ".".join(filter(None, (m.groupdict().get("group"), m.group("key"))))
            close = difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.75)
            return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    return " ".join(line.strip() for line in message.splitlines() if line.strip())
