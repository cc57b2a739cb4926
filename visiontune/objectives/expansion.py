"""Adding classes to a trained model inside :class:`~visiontune.TransferClassifier` (the Lightning side
of :mod:`visiontune.objectives.classes`).

``TransferClassifier(init_from="old.ckpt", class_expansion=ClassExpansionConfig(...))`` starts from a
model trained on the old classes. At ``setup`` the training data's class names that the old model does
not know become new classes, appended after the old ones (label order ``old + new``). The head grows
with rows imprinted from the labeled new-class images (old rows bit-identical), and the old classes are
protected while training: Learning-without-Forgetting distillation against a frozen copy of the old
model on the batch images (``distill``), and/or frozen old head rows (``freeze_old_rows``). With FixMatch
(``semi_supervised``) the unlabeled photos help both ways: they teach the new classes, and those the frozen
old model is confident about keep their old class as pseudo-label (:func:`visiontune.objectives.fixmatch.anchor_old_classes`),
which is what stops old classes from drifting into the new ones. Validation and test log ``*_acc_old``,
``*_acc_new`` and ``*_acc``.

The data a bird-photo user brings::

    new_species/<new class>/*.jpg     few labeled images of the classes to add   -> data.train
    unlabeled/*.jpg                   any species, no labels (optional, FixMatch) -> data.unlabeled
    val/<every class>/*.jpg           old and new classes                         -> data.val

The datamodule asks the model for its label order (:meth:`ClassExpansion.label_order`), so training,
validation and test labels all index ``old + new``.

Example:
    >>> model = TransferClassifier("tf_efficientnet_lite0", weights=None, strategy="full", bn="train",
    ...                            init_from="runs/birds/last.ckpt",
    ...                            class_expansion=ClassExpansionConfig(distill=1.0))  # doctest: +SKIP
    >>> data = ImageDataModule(train="new_species", val="val", unlabeled="unlabeled")  # doctest: +SKIP
    >>> L.Trainer(max_epochs=10).fit(model, data)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .classes import ClassExpansionConfig, distillation_loss, expand_classes, freeze_rows
from ..errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ..models.protocols import ClassifierModel  # the hosting TransferClassifier (visiontune.training.module imports this module)

__all__ = ["ClassExpansion", "as_expansion_config", "split_from_confusion"]


def as_expansion_config(
    value: Union[ClassExpansionConfig, Mapping[str, Any], None]
) -> Optional[ClassExpansionConfig]:
    """A :class:`~visiontune.ClassExpansionConfig` from itself, a plain dict (hparams, YAML) or ``None``.

    Example:
        >>> as_expansion_config({"distill": 0.5}).distill
        0.5
    """
    from ..training.options import coerce_config

    return coerce_config(value, ClassExpansionConfig, "model.class_expansion")


def _key(name: str) -> str:
    return re.sub(r"[\s_\-.]+", "", name.casefold())


def split_from_confusion(confusion: np.ndarray, num_old: int) -> dict[str, float]:
    """Accuracy on old classes (rows ``< num_old``), on new ones and on all, from a confusion matrix.

    Example:
        >>> split_from_confusion(np.array([[3, 1, 0], [0, 4, 0], [1, 0, 1]]), num_old=2)
        {'acc_old': 0.875, 'acc_new': 0.5, 'acc': 0.8}
    """
    c = np.asarray(confusion, dtype=np.float64)
    diag = np.diag(c)

    def acc(rows: slice) -> float:
        n = c[rows].sum()
        return float(diag[rows].sum() / n) if n else float("nan")

    return {"acc_old": acc(slice(0, num_old)), "acc_new": acc(slice(num_old, None)), "acc": acc(slice(None))}


class ClassExpansion:
    """Grow a trained model's head with the training data's new classes, and keep the old ones.

    Not an ``nn.Module``: the frozen old model is rebuilt from ``init_from`` at every ``setup`` (also when
    resuming), so it never enters the optimizer, the ``state_dict`` or the checkpoint.

    Args:
        init_from: checkpoint (``.ckpt``) of a :class:`~visiontune.TransferClassifier` trained on the old
            classes, with plain backbone weights (strategies ``full``, ``linear``, ``last_k``, ``bitfit``,
            ``norm``; merge LoRA into the weights first).
        cfg: how to protect the old classes.

    Example:
        >>> exp = ClassExpansion("old.ckpt", ClassExpansionConfig())  # doctest: +SKIP
        >>> exp.label_order(["wren", "robin"])  # old model knows ["crow", "robin"]  # doctest: +SKIP
        ['crow', 'robin', 'wren']
    """

    def __init__(self, init_from: str, cfg: ClassExpansionConfig) -> None:
        self.init_from = str(init_from)
        self.cfg = cfg
        self._checkpoint: dict[str, Any] | None = None
        self.old_model: nn.Module | None = None
        self.num_old: int | None = None
        self.new_class_names: list[str] = []
        self._old_rows: tuple[Tensor, Tensor | None] | None = None
        self._hooks: list[Any] = []
        self.pool_labels: Tensor | None = None  # pool index -> class, or -1 (set by _label_pool)

    # ------------------------------------------------------------------ the old model
    def checkpoint(self) -> dict[str, Any]:
        """The ``init_from`` checkpoint, read once with ``weights_only=True``."""
        if self._checkpoint is None:
            from ..io import safe_torch_load

            path = Path(self.init_from).expanduser()
            if not path.is_file():
                raise CheckpointError(f"model.init_from: checkpoint not found: {path}")
            ckpt = safe_torch_load(path)
            if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
                raise CheckpointError(f"model.init_from: {path} is not a visiontune/Lightning checkpoint "
                                      "(no state_dict)")
            meta = ckpt.get("visiontune") or {}
            names = meta.get("class_names") or (ckpt.get("hyper_parameters") or {}).get("class_names")
            if not names:
                raise CheckpointError(f"model.init_from: {path} records no class names")
            self._checkpoint = ckpt
        return self._checkpoint

    @property
    def old_class_names(self) -> list[str]:
        """Class names of the ``init_from`` model, in its label order."""
        ckpt = self.checkpoint()
        meta = ckpt.get("visiontune") or {}
        return [str(n) for n in (meta.get("class_names") or ckpt["hyper_parameters"]["class_names"])]

    def label_order(self, data_class_names: list[str]) -> list[str]:
        """``old + new``: the old model's classes, then the data's classes it does not know.

        Data classes with an old name are more images of that old class. A data class whose name differs
        from an old one only in case, spaces, ``-``, ``_`` or ``.`` is an error (``"Robin"`` next to
        ``"robin"`` is almost surely the same species), as are two such new names.
        """
        from ..data.sources import DataError

        old = self.old_class_names
        keys = {_key(n): n for n in old}
        problems, seen = [], {}
        new = [str(n) for n in data_class_names if str(n) not in old]
        for n in new:
            if _key(n) in keys:
                problems.append(f"new class {n!r} clashes with the old class {keys[_key(n)]!r} (names differ only in "
                                f"case, spaces or punctuation): name the folder {keys[_key(n)]!r} to add images of "
                                f"the old class, or give the new class a distinct name")
            elif _key(n) in seen:
                problems.append(f"new classes {seen[_key(n)]!r} and {n!r} differ only in case, spaces or punctuation")
            seen.setdefault(_key(n), n)
        if problems:
            raise DataError(problems, f"adding classes to {self.init_from}")
        return old + new

    def _old_weights(self, module: "ClassifierModel") -> tuple[list[str], dict[str, Tensor]]:
        ckpt = self.checkpoint()
        meta = ckpt.get("visiontune") or {}
        theirs = meta.get("backbone") or (ckpt.get("hyper_parameters") or {}).get("backbone")
        if theirs and theirs != module.hparams.backbone:
            raise ConfigError(f"model.init_from was trained with backbone {theirs!r} but model.backbone is "
                             f"{module.hparams.backbone!r}")
        state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        return self.old_class_names, state

    def _load_old(self, module: "ClassifierModel", net: nn.Module) -> None:
        from ..models.backbones import BackboneError, load_weights

        _, state = self._old_weights(module)
        try:
            load_weights(net, state, source=f"model.init_from {self.init_from}", name=module.hparams.backbone,
                         allow_head_mismatch=False)
        except BackboneError as exc:
            raise BackboneError(f"{exc}. init_from needs plain backbone weights (a model trained with strategy "
                                "full, linear, last_k, bitfit or norm; merge LoRA into the weights first)") from None

    def _freeze_copy(self, net: nn.Module) -> nn.Module:
        old = copy.deepcopy(net)
        old.eval()
        old.requires_grad_(False)
        return old

    # ------------------------------------------------------------------ setup
    def setup(self, module: "ClassifierModel", dm: Any, stage: str = "fit") -> None:
        """Build (or check) the grown model, the frozen old copy and the old-row protection.

        Called from the model's ``setup``, after the datamodule's (so its labels already index
        ``old + new`` and the labeled new-class images can be read for imprinting). Outside ``fit``, a
        model already grown (loaded from a checkpoint) needs nothing, not even the ``init_from`` file.
        """
        from ..data.sources import DataError

        if stage != "fit" and module.net is not None and self.num_old is not None:
            return
        old = self.old_class_names
        self.num_old = len(old)
        data_names = getattr(dm, "class_names", None)
        if data_names is None:
            if module.net is None:
                raise DataError("model.init_from: adding classes needs training data (data.train: a folder "
                                "<class>/*.jpg of the new classes)")
            order = list(module.class_names)
        else:
            order = self.label_order(list(data_names))
        self.new_class_names = order[len(old):]
        if module.net is None:
            support = self._support(module, dm, order) if self.new_class_names else None
            anchors, pool_idx = self._anchors(module, dm) if self.new_class_names else (None, None)
            module.class_names = list(order)

            def grow(net: nn.Module) -> int:
                self._load_old(module, net)
                self.old_model = self._freeze_copy(net)  # LwF targets, old-class anchoring of pseudo-labels
                if self.new_class_names:
                    expand_classes(net, self.new_class_names, support, old_class_names=old, anchors=anchors,
                                   anchor_threshold=self.cfg.anchor_threshold)
                    if anchors is not None and self.cfg.label_pool:
                        self._label_pool(module, net, support, anchors, pool_idx, len(dm.unlabeled_set))
                return len(order)

            module._build(len(old), None, prepare=grow)
        else:
            if list(module.class_names) != order:
                raise ValueError(f"the model's classes {module.class_names} are not the old classes plus the "
                                 f"data's new ones {order}")
            if self.old_model is None:
                from ..models.backbones import create_backbone

                kwargs = dict(module.hparams.backbone_args or {})
                net = create_backbone(module.hparams.backbone, None, num_classes=len(old), **kwargs)
                self._load_old(module, net)
                self.old_model = self._freeze_copy(net)
        head = module.net.get_classifier()
        if isinstance(head, nn.Linear):
            self._old_rows = (head.weight.detach()[: len(old)].clone(),
                              None if head.bias is None else head.bias.detach()[: len(old)].clone())
        if self.cfg.freeze_old_rows and not self._hooks:
            if not isinstance(head, nn.Linear):
                raise ValueError(f"class_expansion.freeze_old_rows needs a Linear head, got {type(head).__name__}")
            self._hooks = freeze_rows(head, slice(0, len(old)))
        if self.new_class_names and getattr(module, "_trainer", None) is not None and module.trainer.is_global_zero:
            n = len(self.new_class_names)
            print(f"visiontune: adding {n} class{'es' if n != 1 else ''} {self.new_class_names} to the "
                  f"{len(old)} of {self.init_from}")

    def _support(self, module: "ClassifierModel", dm: Any, order: list[str]) -> tuple[Tensor, Tensor]:
        """The labeled new-class images (eval transform) and their indices into the new classes."""
        from ..data.sources import DataError

        ds = getattr(dm, "train_set", None)
        if ds is None:
            raise DataError("model.init_from: adding classes needs labeled images of the new classes (data.train)")
        n_old = len(order) - len(self.new_class_names)
        labels = np.asarray(ds.samples.labels)
        counts = np.bincount(labels[labels >= 0], minlength=len(order))
        empty = [order[i] for i in range(n_old, len(order)) if counts[i] == 0]
        if empty:
            raise DataError([f"new class {n!r} has no labeled training images" for n in empty], "data.train")
        t = self._eval_transform(module, dm)
        idx = np.flatnonzero(labels >= n_old)
        images = torch.stack([t(image=ds.load(int(i)))["image"] for i in idx])
        return images, torch.as_tensor(labels[idx] - n_old)

    @staticmethod
    def _eval_transform(module: "ClassifierModel", dm: Any) -> Any:
        """The evaluation transform at the data's resolution and normalisation (the model's by default)."""
        from ..data.transforms import eval_transform

        res = getattr(dm, "resolved", None) or {}
        size = int(res.get("image_size") or module.data_config["input_size"][-1])
        cfg = module.data_config
        return eval_transform(size, res.get("mean") or cfg["mean"], res.get("std") or cfg["std"])

    def _anchors(self, module: "ClassifierModel", dm: Any, limit: int = 1024) -> tuple[Tensor | None, Any]:
        """Up to ``limit`` unlabeled images (eval transform, a fixed random subset: held in memory at once,
        1024 x 3 x 224 x 224 floats is 0.6 GB) and their pool indices:
        the anchors that calibrate the new head rows (:func:`visiontune.models.heads.calibrate_new_rows`)
        and the images :meth:`_label_pool` labels; ``(None, None)`` without a pool."""
        ds = getattr(dm, "unlabeled_set", None)
        if ds is None or not len(ds):
            return None, None
        t = self._eval_transform(module, dm)
        idx = np.sort(np.random.default_rng(0).permutation(len(ds))[:limit])
        return torch.stack([t(image=ds.load(int(i)))["image"] for i in idx]), torch.as_tensor(idx)

    def _prior(self, module: "ClassifierModel", net: nn.Module) -> nn.Module:
        """The backbone with the weights the old model started from (its pretrained features tell new
        classes apart better than the fine-tuned ones); the old model itself when it started from none."""
        weights = (self.checkpoint().get("hyper_parameters") or {}).get("weights")
        if weights is None:
            return net
        from ..models.backbones import create_backbone

        kwargs = dict(module.hparams.backbone_args or {})
        return create_backbone(module.hparams.backbone, weights, num_classes=0, **kwargs).eval()

    def _label_pool(self, module: "ClassifierModel", net: nn.Module, support: tuple[Tensor, Tensor],
                    anchors: Tensor, pool_idx: Tensor, pool_size: int) -> None:
        """Label pool images once (``label_pool``: ``"all"``, :func:`~visiontune.objectives.pool_labels.label_whole_pool`;
        else those that look new, :func:`~visiontune.objectives.pool_labels.label_new_in_pool`)."""
        from .pool_labels import label_new_in_pool, label_whole_pool, pooled_features

        prior = self._prior(module, net)
        if self.cfg.label_pool == "all":
            old_probs = torch.cat([self.old_logits(anchors[i: i + 64]).float().cpu()
                                   for i in range(0, len(anchors), 64)]).softmax(1)
            labels = label_whole_pool(old_probs, pooled_features(prior, support[0]), support[1],
                                      pooled_features(prior, anchors), anchor_threshold=self.cfg.anchor_threshold)
        else:
            head = net.get_classifier()
            with torch.no_grad():
                probs = head(pooled_features(net, anchors).to(head.weight.dtype)).softmax(1).float().cpu()
            labels = label_new_in_pool(probs, len(self.old_class_names), pooled_features(prior, support[0]), support[1],
                                       pooled_features(prior, anchors))
        table = torch.full((pool_size,), -1, dtype=torch.long)
        table[pool_idx] = labels
        self.pool_labels = table

    def pool_labels_for(self, index: Tensor | None) -> Tensor | None:
        """The setup-time labels (``-1``: none) of the unlabeled images with these pool indices, or None."""
        if index is None or self.pool_labels is None:
            return None
        return self.pool_labels.to(index.device)[index.long()]

    def state_dict(self) -> dict[str, Any]:
        """What evaluation needs without the ``init_from`` file: the old and new class names."""
        return {"num_old": self.num_old, "new_class_names": list(self.new_class_names)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the class split saved by :meth:`state_dict`."""
        if state.get("num_old") is not None:
            self.num_old = int(state["num_old"])
        self.new_class_names = [str(n) for n in state.get("new_class_names", [])]

    # ------------------------------------------------------------------ training and evaluation
    @torch.no_grad()
    def old_logits(self, images: Tensor) -> Tensor:
        """Logits of the frozen old model (eval mode, no graph), on the images' device."""
        assert self.old_model is not None
        first = next(self.old_model.parameters())
        if first.device != images.device:
            self.old_model.to(images.device)
        return self.old_model(images)

    def distillation(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """LwF loss: the student's old-class outputs against the frozen old model's (``old_logits``)."""
        return distillation_loss(student_logits, teacher_logits, T=self.cfg.temperature)

    @torch.no_grad()
    def after_step(self, module: "ClassifierModel") -> None:
        """With ``freeze_old_rows``, put the old head rows back exactly (weight decay moves them)."""
        if not self.cfg.freeze_old_rows or self._old_rows is None:
            return
        head = module.net.get_classifier()
        w, b = self._old_rows
        n = w.shape[0]
        head.weight[:n].copy_(w.to(head.weight.device))
        if b is not None:
            head.bias[:n].copy_(b.to(head.bias.device))

    def log_split(self, module: "ClassifierModel", stage: str, confusion: np.ndarray) -> None:
        """Log ``{stage}_acc_old`` and ``{stage}_acc_new`` (``{stage}_acc`` is logged by the model)."""
        if not self.num_old or not self.new_class_names:
            return
        split = split_from_confusion(confusion, self.num_old)
        module.log(f"{stage}_acc_old", split["acc_old"])
        module.log(f"{stage}_acc_new", split["acc_new"])
        module.last_eval.update({"acc_old": split["acc_old"], "acc_new": split["acc_new"]})
