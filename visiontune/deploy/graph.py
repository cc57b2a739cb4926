"""The graph an export writes: the network that evaluates, with what its strategy trained merged in where it can
be, and the preprocessing that network expects, as metadata.

Example:
    >>> from visiontune import TransferClassifier
    >>> model = TransferClassifier("resnet18", weights=None, num_classes=2, strategy="lora")
    >>> graph = eval_graph(model)
    >>> graph.merged, strategy_modules(graph.net)
    (True, [])
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import __version__
from ..strategies.base import strategy_name

__all__ = ["EvalGraph", "INPUT_FORMAT", "eval_graph", "export_metadata", "metadata_from_strings",
           "metadata_strings", "strategy_modules"]

# what the exported model's input is (recorded in every export's metadata under "input_format")
INPUT_FORMAT = ("float32 NCHW RGB, already normalised: resize the image to input_size (height, width; no crop) "
                "with the interpolation, scale pixels to [0, 1], then (x - mean) / std per channel; the batch "
                "dimension is dynamic, height and width are fixed")


@dataclass
class EvalGraph:
    """The network to export and how it came to be.

    Attributes:
        net: a copy of the model's evaluating network, in eval mode; merged where it could be.
        strategy: the strategy's name.
        merged: whether the strategy's layers were baked into plain layers of the base.
        note: one line for the user: what was merged, or why the graph is exported unmerged.
    """

    net: nn.Module
    strategy: str
    merged: bool
    note: str


def strategy_modules(net: nn.Module) -> list[str]:
    """Names of the modules (and hooked modules) of ``net`` that belong to a visiontune strategy rather than to
    the timm model: LoRA / DoRA wrappers, SSF affines and their hooks, adapters, prompts. Empty after a merge.

    Example:
        >>> strategy_modules(nn.Sequential(nn.Linear(2, 2)))
        []
    """
    found = []
    for name, m in net.named_modules():
        hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
        if _ours(m) or any(_ours(h) and not type(h).__module__.endswith(_GRADIENT_ONLY) for h in hooks):
            found.append(name)
    return found


# sparse's forward pre-hooks only re-install the gradient masks of training: they leave the forward as it is
_GRADIENT_ONLY = ".strategies.sparse"


def _ours(obj: Any) -> bool:
    return type(obj).__module__.startswith("visiontune.strategies")


def _evaluating_copy(model: nn.Module) -> nn.Module:
    # requires_grad stays as trained (sparse's hooks re-register gradient masks on the weights that train);
    # the exporters run under no_grad
    return copy.deepcopy(model.evaluated_net()).eval()


def eval_graph(model: nn.Module) -> EvalGraph:
    """A copy of ``model``'s evaluating network (its EMA when it keeps one) ready to export: a mergeable
    strategy (``visiontune strategies``: lora, qlora, dora, ssf) is merged and unloaded
    (:func:`visiontune.merge_and_unload`); any other keeps its modules, and :attr:`EvalGraph.note` says so.

    Args:
        model: a :class:`~visiontune.TransferClassifier` (from ``TransferClassifier.load`` or
            :func:`~visiontune.build_from_delta`); left unchanged.

    Example:
        >>> from visiontune import TransferClassifier
        >>> eval_graph(TransferClassifier("resnet18", weights=None, num_classes=2, strategy="adapter")).note
        "strategy 'adapter' cannot be merged: exporting the unmerged graph (its adapter layers stay in it)"
    """
    from ..strategies import StrategyError
    from ..strategies.lora import merge_and_unload

    name = strategy_name(model.strategy_config)
    net = _evaluating_copy(model)
    if not strategy_modules(net):
        return EvalGraph(net, name, False, f"strategy {name!r} trains the base's own layers: nothing to merge")
    unmerged = f"strategy {name!r} cannot be merged: exporting the unmerged graph (its {name} layers stay in it)"
    if getattr(model.strategy_config, "mergeable", False):
        kept = sum(_ours(m) for m in net.modules())
        try:
            merge_and_unload(net)
        except StrategyError as exc:  # e.g. SSF after a weight-standardised conv that has no gain
            net = _evaluating_copy(model)
            return EvalGraph(net, name, False, unmerged.replace("merged:", f"merged ({exc}):", 1))
        left = strategy_modules(net)
        if left:  # merge_and_unload must leave plain timm layers only
            raise RuntimeError(f"merge_and_unload left strategy modules in the graph: {left[:3]}")
        return EvalGraph(net, name, True, f"strategy {name!r}: merged {kept} layers into the base "
                                          "(plain timm layers, no strategy modules left)")
    return EvalGraph(net, name, False, unmerged)


def export_metadata(model: nn.Module, graph: EvalGraph, input_size: tuple[int, int], mean: tuple[float, ...],
                    std: tuple[float, ...], interpolation: str) -> dict[str, Any]:
    """The preprocessing and identity an exported model records (ONNX ``metadata_props``, TorchScript
    ``_extra_files``): ``mean``, ``std``, ``input_size`` ``[3, H, W]``, ``interpolation``, ``class_names``,
    ``input_format``, ``backbone``, ``strategy``, ``merged``, ``visiontune_version``.

    Example:
        >>> from visiontune import TransferClassifier
        >>> m = TransferClassifier("resnet18", weights=None, class_names=["cat", "dog"])
        >>> meta = export_metadata(m, eval_graph(m), (32, 32), (0.5,) * 3, (0.5,) * 3, "bilinear")
        >>> meta["input_size"], meta["class_names"]
        ([3, 32, 32], ['cat', 'dog'])
    """
    return {
        "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        "input_size": [3, int(input_size[0]), int(input_size[1])], "interpolation": str(interpolation),
        "class_names": [str(c) for c in model.class_names], "input_format": INPUT_FORMAT,
        "backbone": str(model.hparams.backbone), "strategy": graph.strategy, "merged": graph.merged,
        "visiontune_version": __version__,
    }


def metadata_strings(meta: dict[str, Any]) -> dict[str, str]:
    """``meta`` as string → string (ONNX ``metadata_props`` hold strings): strings as they are, the rest as JSON.

    Example:
        >>> metadata_strings({"mean": [0.5, 0.5, 0.5], "interpolation": "bilinear", "merged": True})
        {'mean': '[0.5, 0.5, 0.5]', 'interpolation': 'bilinear', 'merged': 'true'}
    """
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def metadata_from_strings(props: dict[str, str]) -> dict[str, Any]:
    """The inverse of :func:`metadata_strings` for visiontune's keys (others are kept as strings).

    Example:
        >>> metadata_from_strings({"mean": "[0.5, 0.5, 0.5]", "interpolation": "bilinear", "merged": "true"})
        {'mean': [0.5, 0.5, 0.5], 'interpolation': 'bilinear', 'merged': True}
    """
    return {k: json.loads(v) if k in _JSON_KEYS else v for k, v in props.items()}


_JSON_KEYS = {"mean", "std", "input_size", "class_names", "merged"}
