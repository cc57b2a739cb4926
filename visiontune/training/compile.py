"""Options for big models on :class:`~visiontune.TransferClassifier`: ``compile`` (``torch.compile`` of the
backbone) and ``grad_checkpointing`` (timm's activation checkpointing: recompute block activations in the
backward pass instead of keeping them).

``compile`` compiles the network **in place** (:meth:`torch.nn.Module.compile`): ``model.net`` stays the timm
model it was, so its ``state_dict`` keys carry no ``_orig_mod.`` prefix, and checkpoints and task deltas made
with ``compile`` on load with it off and the other way round. Compilation is lazy (at the first forward, i.e.
after what ``fit`` prepares at its start); copies of the network (an EMA of the weights, ``merge_task``) run
eagerly, since ``torch.nn.Module`` drops the compiled call when it is copied or pickled.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError

__all__ = ["apply_scale_options", "check_scale_options", "enable_grad_checkpointing"]


def check_scale_options(*, compile: Any, grad_checkpointing: Any, strategy: str, cache_features: Any) -> None:
    """Check ``model.compile`` / ``model.grad_checkpointing``: booleans, and ``compile`` only where it can work.

    Not with ``cache_features`` (the backbone does not run while the head trains on cached features) and not
    with ``sparse``, whose masks re-install gradient hooks from inside the forward pass (a module-graph
    change that ``torch.compile`` cannot trace).

    Example:
        >>> check_scale_options(compile=True, grad_checkpointing=False, strategy="sparse", cache_features=False)
        Traceback (most recent call last):
        visiontune.errors.ConfigError: model.compile does not work with strategy 'sparse' (its masks install \
gradient hooks during the forward pass); set model.compile: false
    """
    for option, value in (("compile", compile), ("grad_checkpointing", grad_checkpointing)):
        if not isinstance(value, bool):
            raise ConfigError(f"model.{option} must be true or false, got {value!r}")
    if compile and cache_features:
        raise ConfigError("model.compile does nothing with model.cache_features (the backbone does not run while "
                          "the head trains on cached features); set one of them to false")
    if compile and strategy == "sparse":
        raise ConfigError("model.compile does not work with strategy 'sparse' (its masks install gradient hooks "
                          "during the forward pass); set model.compile: false")


def enable_grad_checkpointing(net: nn.Module, backbone: str) -> None:
    """timm's ``set_grad_checkpointing(True)`` on ``net``; a model without it is a ``ConfigError`` naming it.

    Example:
        >>> import timm
        >>> net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
        >>> enable_grad_checkpointing(net, "vit_tiny_patch16_224"); net.grad_checkpointing
        True
    """
    setter = getattr(net, "set_grad_checkpointing", None)
    try:
        if setter is None:
            raise NotImplementedError
        setter(True)
    except (AssertionError, NotImplementedError) as exc:
        why = f" ({exc})" if str(exc) else ""
        raise ConfigError(f"model.grad_checkpointing: timm model {backbone!r} does not support gradient "
                          f"checkpointing{why}; set model.grad_checkpointing: false") from None


def apply_scale_options(net: nn.Module, *, backbone: str, compile: bool = False,
                        grad_checkpointing: bool = False) -> nn.Module:
    """Turn on gradient checkpointing and/or compile ``net`` in place (see the module docs); returns ``net``.

    Args:
        net: the timm network, its strategy already applied.
        backbone: its timm name (for error messages).
        compile: ``torch.compile`` its forward (default inductor backend), keeping its type and parameter names.
        grad_checkpointing: recompute activations of its blocks in the backward pass (less memory, ~1/3 more
            compute).

    Example:
        >>> import timm
        >>> net = timm.create_model("resnet18", pretrained=False, num_classes=2)
        >>> apply_scale_options(net, backbone="resnet18", compile=True) is net, "fc.weight" in net.state_dict()
        (True, True)
    """
    if grad_checkpointing:
        enable_grad_checkpointing(net, backbone)
    if compile:
        net.compile()  # lazy: nothing compiles until the first forward
    return net
