"""The BatchNorm policy, in one place: which BatchNorm layers update their running statistics.

Used by :class:`visiontune.TransferClassifier` (its ``bn`` option) and by
:class:`visiontune.schedule.GradualUnfreeze` (which thaws layers mid-run), so both always agree.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

__all__ = ["BN_POLICIES", "BNPolicy", "apply_bn_policy", "check_bn_policy"]

BNPolicy = Literal["frozen", "eval", "train"]
BN_POLICIES: tuple[str, ...] = ("frozen", "eval", "train")


def check_bn_policy(policy: object, option: str = "bn") -> str:
    """Return ``policy`` if it is one of :data:`BN_POLICIES`, else raise a ``ValueError`` naming ``option``."""
    if policy not in BN_POLICIES:
        raise ValueError(f"{option} must be 'frozen', 'eval' or 'train', got {policy!r}")
    return policy  # type: ignore[return-value]


def apply_bn_policy(net: nn.Module, policy: str) -> int:
    """Put each BatchNorm layer of ``net`` (which is training) in the mode ``policy`` asks for.

    - ``"frozen"``: a BatchNorm layer whose own parameters are all frozen stays in eval mode (running
      statistics fixed); one with a trainable scale or shift trains, statistics included;
    - ``"eval"``: every BatchNorm layer keeps its pretrained statistics (eval mode); affine parameters
      may still train;
    - ``"train"``: every BatchNorm layer updates its running statistics.

    Call it after anything that puts the network in train mode or changes ``requires_grad``.

    Args:
        net: the network (its other layers are left as they are).
        policy: ``"frozen"``, ``"eval"`` or ``"train"``.

    Returns:
        the number of BatchNorm layers left in train mode.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
        >>> apply_bn_policy(net, "eval"), net[1].training
        (0, False)
        >>> apply_bn_policy(net, "frozen")  # the BatchNorm's scale and shift train
        1
    """
    check_bn_policy(policy)
    n_train = 0
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            frozen = not any(p.requires_grad for p in m.parameters(recurse=False))
            mode = policy == "train" or (policy == "frozen" and not frozen)
            m.train(mode)
            n_train += mode
    return n_train
