"""What the training objectives see of the model that hosts them.

The objective helpers (:mod:`visiontune.objectives.fixmatch`, :mod:`visiontune.objectives.expansion`) run inside
:class:`~visiontune.TransferClassifier` but must not import :mod:`visiontune.training.module` (it imports them: that
would be a cycle). They are typed against :class:`ClassifierModel` instead, which
:class:`~visiontune.TransferClassifier` satisfies; a new objective takes the same ``module`` argument.

Example:
    >>> from visiontune.training.module import TransferClassifier
    >>> all(hasattr(TransferClassifier, name) for name in ("loss", "data_config", "log", "log_dict", "_build"))
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Protocol

from torch import Tensor, nn

__all__ = ["ClassifierModel"]


class ClassifierModel(Protocol):
    """A LightningModule that classifies with ``net`` (a timm model) into ``class_names``.

    Attributes read or written by the objectives: ``net`` (None until built), ``class_names``, ``num_classes``,
    ``hparams`` (``backbone``, ...), ``last_eval`` (the metrics of the last evaluation), and Lightning's
    ``trainer`` / ``global_step`` / ``log`` / ``log_dict``.
    """

    net: Optional[nn.Module]
    class_names: Optional[list[str]]
    num_classes: int
    hparams: Any
    last_eval: dict[str, Any]

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's data config of ``net`` (input size, mean, std, ...)."""

    @property
    def trainer(self) -> Any: ...

    @property
    def global_step(self) -> int: ...

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The supervised loss of the labeled batch."""

    def log(self, name: str, value: Any, **kwargs: Any) -> None: ...

    def log_dict(self, dictionary: Mapping[str, Any], **kwargs: Any) -> None: ...

    def _build(self, num_classes: int, weights: Optional[str], prepare: Optional[Any] = None) -> None:
        """(Re)build ``net``; ``prepare(net) -> num_classes`` runs before the strategy (class expansion grows
        the head there)."""
