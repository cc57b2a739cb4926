"""Export for deployment: a trained model as one ONNX or TorchScript file, merged, checked and timed.

* :mod:`visiontune.deploy.graph`: the graph to export (``eval_graph``: mergeable strategies merged) and its
  metadata (``export_metadata``: mean, std, input size, interpolation, class names);
* :mod:`visiontune.deploy.formats`: ONNX / TorchScript bytes, a runner for them, ``read_export_metadata``;
* :mod:`visiontune.deploy.export`: ``export_model`` (check against PyTorch, latency, atomic write) and the
  ``visiontune export`` command.

Example:
    >>> from visiontune.deploy import export_model, read_export_metadata
    >>> result = export_model("runs/x/checkpoints/last.ckpt", "model.onnx", images="photos/")  # doctest: +SKIP
    >>> read_export_metadata("model.onnx")["class_names"]  # doctest: +SKIP
"""

from __future__ import annotations

from .export import ExportResult, export_main, export_model, load_for_export  # noqa: F401  (re-exported)
from .formats import ExportError, ExportFailedError, read_export_metadata  # noqa: F401  (re-exported)
from .graph import EvalGraph, eval_graph, export_metadata  # noqa: F401  (re-exported)

__all__ = ["EvalGraph", "ExportError", "ExportFailedError", "ExportResult", "eval_graph", "export_main",
           "export_metadata", "export_model", "load_for_export", "read_export_metadata"]
