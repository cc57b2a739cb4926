"""What :class:`~visiontune.TransferClassifier` prepares at the start of ``fit``, before the first step: the
masks of ``sparse`` with gradient scores, and a head started from a linear probe (``head_init="probe"``)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..strategies.base import strategy_name

__all__ = ["prepare_fit", "calibrate_sparse_masks", "init_head_from_probe"]


def prepare_fit(module: Any) -> None:
    """Everything :meth:`TransferClassifier.on_fit_start` does before training (see the module docs)."""
    calibrate_sparse_masks(module)
    init_head_from_probe(module)


def calibrate_sparse_masks(module: Any) -> None:
    """``sparse`` with ``score="gradient"``: choose the masks from warm-up batches before training."""
    if strategy_name(module.strategy_config) != "sparse":
        return
    from ..strategies.sparse import calibrate_sparse, sparse_needs_calibration

    if not sparse_needs_calibration(module.net):  # magnitude masks, or restored from a checkpoint
        return
    loader = module.trainer.datamodule.train_dataloader() if module.trainer.datamodule else None
    if isinstance(loader, dict):
        loader = loader["labeled"]
    if loader is None:
        raise ConfigError("sparse with score='gradient' needs training data to choose its masks")
    n = module.strategy_config.warmup_batches
    batches = ((x.to(module.device), y.to(module.device)) for (x, y, *_), _ in zip(loader, range(n)))
    calibrate_sparse(module.net, batches, module.loss, num_batches=n)


def init_head_from_probe(module: Any) -> bool:
    """``head_init="probe"``: set the head to a logistic regression on the frozen features of the training images
    (:func:`visiontune.training.head_init.probe_head`). Not when the weights already hold a trained head: a
    resumed run, ``init_from`` (a base model), adding classes. Returns whether the head was set; a head it
    cannot fit is left random, with one line saying why."""
    h = module.hparams
    if h.get("head_init", "random") != "probe" or h.get("init_from") or h.get("class_expansion"):
        return False
    trainer = module.trainer
    dm = getattr(trainer, "datamodule", None)
    if trainer.ckpt_path is not None or dm is None or not hasattr(dm, "eval_view"):
        return False
    dataset = dm.eval_view("train")
    if dataset is None:
        return False
    from .head_init import probe_head

    why = probe_head(module.net, dataset)
    if why is not None and trainer.is_global_zero:
        print(f"visiontune: model.head_init='probe' skipped: {why}; the head starts random")
    return why is None
