"""Options: blocks given as a config dataclass, a plain mapping (YAML, hparams) or ``None``
(:func:`coerce_config`), and the checks of ``TransferClassifier``'s plain options (:func:`check_model_options`),
each error naming the option (``model.<name>``) and what it allows."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional, Sequence, TypeVar

from ..errors import ConfigError
from .compile import check_scale_options

__all__ = ["check_data_classes", "check_model_options", "check_option", "coerce_config", "is_number"]

C = TypeVar("C")


def coerce_config(value: Any, cls: type[C], option: str) -> Optional[C]:
    """``cls`` from an instance, a mapping or ``None``; unknown keys are an error naming them and ``option``.

    Checkpoints keep such blocks as plain dicts (they load with ``weights_only=True``); this turns them back.

    Example:
        >>> from visiontune.objectives.semisup import FixMatchConfig
        >>> coerce_config({"mu": 2}, FixMatchConfig, "model.semi_supervised").mu
        2
    """
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{option} must be a {cls.__name__} or a mapping, got {type(value).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"{option}: unknown option(s) {unknown}; known: {', '.join(known)}")
    return cls(**dict(value))


def is_number(x: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_option(ok: bool, option: str, message: str) -> None:
    """Raise ``ConfigError(f"{option} {message}")`` unless ``ok``.

    Example:
        >>> check_option(False, "model.lr", "must be > 0, got 0")
        Traceback (most recent call last):
        visiontune.errors.ConfigError: model.lr must be > 0, got 0
    """
    if not ok:
        raise ConfigError(f"{option} {message}")


def check_model_options(
    *,
    strategy: str,
    num_classes: Any,
    class_names: Optional[Sequence[Any]],
    lr: Any,
    weight_decay: Any,
    warmup_steps: Any,
    scheduler: Any,
    label_smoothing: Any,
    layer_decay: Any,
    bn: Any,
    cache_features: Any,
    head_init: Any = "random",
    tta: Any = "none",
    compile: Any = False,
    grad_checkpointing: Any = False,
) -> Optional[list[str]]:
    """Check :class:`~visiontune.TransferClassifier`'s plain options (``strategy``: the strategy's registered
    name); return ``class_names`` as strings (``None`` stays ``None``). The first problem raises a ``ConfigError``.
    """
    for option, value in (("weight_decay", weight_decay), ("label_smoothing", label_smoothing),
                          ("warmup_steps", warmup_steps), ("layer_decay", layer_decay)):
        check_option(value is None and option == "layer_decay" or is_number(value), f"model.{option}",
                     f"must be a number, got {value!r}")
    check_option(num_classes is None or _is_int(num_classes), "model.num_classes",
                 f"must be an integer, got {num_classes!r}")
    check_option(lr is None or (is_number(lr) and lr > 0), "model.lr", f"must be a number > 0 or null, got {lr!r}")
    check_option(weight_decay >= 0, "model.weight_decay", f"must be >= 0, got {weight_decay!r}")
    check_option(0 <= label_smoothing < 1, "model.label_smoothing", f"must be in [0, 1), got {label_smoothing!r}")
    check_option(warmup_steps >= 0, "model.warmup_steps", f"must be >= 0, got {warmup_steps!r}")
    check_option(scheduler in ("cosine", "constant"), "model.scheduler",
                 f"must be 'cosine' or 'constant', got {scheduler!r}")
    check_option(bn in ("frozen", "eval", "train"), "model.bn", f"must be 'frozen', 'eval' or 'train', got {bn!r}")
    check_option(head_init in ("random", "probe"), "model.head_init", f"must be 'random' or 'probe', got {head_init!r}")
    check_option(tta in ("none", "hflip"), "model.tta", f"must be 'none' or 'hflip', got {tta!r}")
    check_option(not cache_features or (strategy == "linear" and bn != "train"),
                 "model.cache_features", "needs strategy 'linear' and bn 'frozen' or 'eval' (a fixed backbone)")
    check_scale_options(compile=compile, grad_checkpointing=grad_checkpointing, strategy=strategy,
                        cache_features=cache_features)
    check_option(layer_decay is None or 0 < layer_decay <= 1, "model.layer_decay",
                 f"must be in (0, 1], got {layer_decay!r}")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        check_option(len(set(class_names)) == len(class_names), "model.class_names", "has duplicates")
        check_option(num_classes is None or num_classes == len(class_names), "model.num_classes",
                     f"is {num_classes} but class_names has {len(class_names)} names")
    if num_classes is not None:
        check_option(num_classes >= 1, "model.num_classes", f"must be >= 1, got {num_classes!r}")
    return class_names


def check_data_classes(model_names: Sequence[str], num_classes: int, data_names: Sequence[str]) -> None:
    """The data's class names may name a model's classes only when there are as many and the model's are the
    placeholders ``"0" ... "n-1"`` (no names given); else a ``ConfigError`` naming both lists.

    Example:
        >>> check_data_classes(["0", "1"], 2, ["cat", "dog"])  # fine: the model had no names
        >>> check_data_classes(["cat", "dog"], 2, ["dog", "cat"])
        Traceback (most recent call last):
        visiontune.errors.ConfigError: model classes ['cat', 'dog'] differ from the data's classes ['dog', 'cat']
    """
    if len(data_names) != num_classes:
        raise ConfigError(
            f"the model has {num_classes} classes {model_names} but the data has "
            f"{len(data_names)}: {list(data_names)}"
        )
    if model_names != [str(i) for i in range(num_classes)]:
        raise ConfigError(f"model classes {model_names} differ from the data's classes {list(data_names)}")
