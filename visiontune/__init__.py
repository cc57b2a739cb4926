"""visiontune: transfer learning for computer vision on any timm backbone.

Everything public is importable from the top level; heavy dependencies (lightning, albumentations)
load on first use, so ``import visiontune`` stays fast.

Example:
    >>> import visiontune as vt
    >>> model = vt.TransferClassifier("tf_efficientnet_lite0", weights="package", num_classes=10,
    ...                               strategy="bitfit")
    >>> data = vt.ImageDataModule(train="digits", image_size=64, labels_per_class=5)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # backbones
    "create_backbone": "models.backbones", "data_config": "models.backbones",
    "BackboneError": "models.backbones", "load_state_dict_file": "models.backbones",
    # strategies
    "available_strategies": "strategies", "apply_strategy": "strategies", "register_strategy": "strategies",
    "make_strategy_config": "strategies", "StrategyConfig": "strategies", "StrategyError": "strategies",
    "trainable_parameter_count": "strategies", "get_strategy": "strategies",
    "FullConfig": "strategies.freeze", "LinearConfig": "strategies.freeze", "LastKConfig": "strategies.freeze",
    "BitFitConfig": "strategies.freeze", "NormConfig": "strategies.freeze",
    # groups / optim
    "depth_groups": "models.groups", "param_groups": "training.optim", "layer_scales": "training.optim",
    # data
    "ImageDataModule": "data", "ImageDataset": "data", "DataError": "data", "read_source": "data",
    "register_dataset": "data", "load_image": "data.images", "BadImageError": "data.images",
    "check_images": "data.scan", "DecodedImages": "data.decoded", "probe_head": "training.head_init",
    # model, reports, cli
    "TransferClassifier": "training.module", "RunReport": "training.report",
    "PredictionCSVWriter": "training.report", "main": "cli",
    # strategies with their own modules
    "LoRAConfig": "strategies.lora", "QLoRAConfig": "strategies.lora", "merge": "strategies.lora",
    "unmerge": "strategies.lora", "merge_and_unload": "strategies.lora",
    "AdapterConfig": "strategies.adapter", "VPTConfig": "strategies.prompt",
    "SparseConfig": "strategies.sparse", "SSFConfig": "strategies.ssf", "DoRAConfig": "strategies.dora",
    # semi-supervision and new classes
    "FixMatchConfig": "objectives.semisup", "expand_classes": "models.heads",
    "ClassExpansionConfig": "objectives.classes", "split_accuracy": "objectives.classes",
    "new_accuracy_at": "objectives.classes",
    "FixMatchState": "objectives.fixmatch", "ClassExpansion": "objectives.expansion",
    "FreeMatchThresholds": "objectives.weighting", "SoftMatchWeights": "objectives.weighting",
    # deltas and tasks
    "save_delta": "delta.format", "load_delta": "delta.load", "build_from_delta": "delta.build",
    "delta_from_file": "delta.format", "DeltaError": "delta.format", "DeltaWriter": "delta.writer",
    "TaskBank": "delta.bank",
    # schedules, comparison, caching, checkpoints, checks
    "GradualUnfreeze": "schedule", "compare": "comparison.api", "compare_from_config": "comparison.api",
    "FeatureCache": "training.cache",
    "AtomicCheckpointIO": "training.checkpoint", "LatestCheckpoint": "training.checkpoint",
    "CheckpointMismatchError": "training.checkpoint", "check_data": "data.checks",
    # errors: the user-error family the command reports as one line, exit code 2
    "UserError": "errors", "ConfigError": "errors", "CheckpointError": "errors",
    "apply_bn_policy": "training.bn", "frozen_feature_baseline": "baseline", "BaselineResult": "baseline",
    # export for deployment (ONNX, TorchScript)
    "export_model": "deploy.export", "ExportResult": "deploy.export", "ExportError": "deploy.formats",
    "read_export_metadata": "deploy.formats",
    "build_report": "reports.html",
    # active learning: which photos to label next
    "suggest": "active.suggest", "SuggestResult": "active.suggest", "SuggestError": "active.suggest",
    "novelty_scores": "active.novelty", "class_prototypes": "active.novelty",
    "cluster_novel": "active.novelty", "k_center_greedy": "active.uncertain",
    "uncertainty_scores": "active.uncertain", "select_uncertain": "active.uncertain",
}


__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'visiontune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # pragma: no cover
    from .models.backbones import BackboneError, create_backbone, data_config  # noqa: F401
    from .data import DataError, ImageDataModule  # noqa: F401
    from .training.module import TransferClassifier  # noqa: F401
    from .strategies import apply_strategy, available_strategies  # noqa: F401
