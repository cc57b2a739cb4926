"""What the training objectives see of the model that hosts them, and what a model and its data ask of each other.

The objective helpers (:mod:`visiontune.objectives.fixmatch`, :mod:`visiontune.objectives.expansion`) run inside
:class:`~visiontune.TransferClassifier` but must not import :mod:`visiontune.training.module` (it imports them: that
would be a cycle). They are typed against :class:`ClassifierModel` instead, which
:class:`~visiontune.TransferClassifier` satisfies; a new objective takes the same ``module`` argument.

The datamodule owns its datasets and views; a model (or a callback) never writes into it, it states what it needs:

* :class:`LabelOrder` (model side): the class order the data's labels must index, asked by the datamodule at its
  setup (adding classes: old classes first);
* :class:`SemiSupervisedData` (data side): a model that trains on unlabeled images passes one
  :class:`UnlabeledViews` request; the datamodule builds the weak and strong views of its pool itself;
* :class:`FeatureServingData` (data side): a feature cache asks for deterministic views of the splits and hands
  back what the loaders serve instead of the images.

:class:`~visiontune.ImageDataModule` implements both data sides; :func:`missing_members` names what a user's own
datamodule lacks (the error says so instead of training without the views).

Example:
    >>> from visiontune.training.module import TransferClassifier
    >>> all(hasattr(TransferClassifier, name) for name in ("loss", "data_config", "log", "log_dict", "_build"))
    True
    >>> from visiontune import ImageDataModule
    >>> missing_members(ImageDataModule(), SemiSupervisedData), missing_members(object(), SemiSupervisedData)
    ([], ['request_unlabeled_views'])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["ClassifierModel", "FeatureServingData", "LabelOrder", "SemiSupervisedData", "UnlabeledViews",
           "missing_members"]


@dataclasses.dataclass(frozen=True)
class UnlabeledViews:
    """A model's request to its data: serve the unlabeled pool too, each image as a weak and a strong view.

    From then on the training loader yields ``{"labeled": (x, y), "unlabeled": (weak, strong, true_label,
    index)}`` (``true_label`` -1 where unknown, ``index`` into the pool).

    Args:
        ratio: unlabeled images per labeled one in a batch (FixMatch's μ), unless the data sets its own
            (``data.unlabeled_ratio``).
        class_names: the class order the pool's known labels (``unlabeled: rest``) must index; empty = the
            data's own.
    """

    ratio: int = 7
    class_names: tuple[str, ...] = ()


@runtime_checkable
class LabelOrder(Protocol):
    """A model with its own class order (the datamodule asks it at setup, through ``trainer.lightning_module``)."""

    def label_order(self, data_class_names: list[str]) -> list[str]:
        """The class order the data's labels must index, given the classes the data found."""


@runtime_checkable
class SemiSupervisedData(Protocol):
    """A datamodule a semi-supervised model can train with."""

    def request_unlabeled_views(self, request: UnlabeledViews) -> Optional[int]:
        """Serve the unlabeled pool as ``request`` says, from now on (views built by the datamodule); returns
        the pool's size (``None`` before the datamodule's setup, which then builds them). Raises a
        ``DataError`` when there is no pool."""


@runtime_checkable
class FeatureServingData(Protocol):
    """A datamodule a feature cache (:class:`visiontune.training.cache.FeatureCache`) can serve features through."""

    batch_size: int

    def eval_view(self, role: str) -> Any:
        """The ``role`` split's images under the deterministic eval transform (a dataset), or ``None``."""

    def eval_view_settings(self) -> dict[str, Any]:
        """That transform's settings: ``image_size``, ``mean``, ``std``, ``interpolation``."""

    def serve(self, role: str, dataset: Any) -> None:
        """Let the ``role`` loader yield ``dataset`` (same length and labels) instead of the images; ``None``:
        the images again."""

    def loader_workers(self) -> int:
        """The number of loader worker processes the datamodule uses."""


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The methods and attributes of ``protocol`` that ``obj`` lacks (empty: it has them all)."""
    names = [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]
    names += [n for n in getattr(protocol, "__annotations__", {}) if not n.startswith("_")]
    return [n for n in names if not hasattr(obj, n)]


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
