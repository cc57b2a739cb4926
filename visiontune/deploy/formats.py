"""The two export formats: the exported file as bytes (checked before it is written), a runner for them, and
the metadata read back from a file.

* ONNX: ``torch.onnx.export`` (the torch.export-based exporter by default, ``exporter="legacy"`` for the
  TorchScript-based one), input ``input``, output ``logits``, dynamic batch; the metadata in ``metadata_props``.
* TorchScript: ``torch.jit.trace`` then ``torch.jit.freeze``; the metadata as ``metadata.json`` in
  ``_extra_files``. (TorchScript is deprecated in PyTorch 2.14; ONNX is the format to prefer.)

Example:
    >>> from torch import nn
    >>> data = torchscript_bytes(nn.Linear(4, 2).eval(), torch.zeros(2, 4), {"class_names": ["a", "b"]})
    >>> run = runner("torchscript", data)
    >>> run(np.zeros((3, 4), dtype=np.float32)).shape
    (3, 2)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .graph import metadata_from_strings, metadata_strings

__all__ = ["EXPORTERS", "FORMATS", "ExportError", "ExportFailedError", "SUFFIXES", "onnx_bytes",
           "read_export_metadata", "require_onnx", "runner", "torchscript_bytes"]

FORMATS = ("onnx", "torchscript")
EXPORTERS = ("dynamo", "legacy")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
EXTRA_FILE = "metadata.json"  # TorchScript: the metadata, as one JSON file inside the archive
_ONNX_LIMIT = 2 * 1024**3  # protobuf's limit on one serialised model (larger ones need external data files)


class ExportError(UserError, ValueError):
    """A bad export option or input (format, exporter, checkpoint/delta choice, missing onnx); the message names
    the option and the value."""


class ExportFailedError(RuntimeError):
    """The model could not be exported, or the exported file does not compute what the PyTorch model computes
    (the check); nothing was written. ``visiontune export`` prints it as one line and exits 1."""


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or an :class:`ExportError` saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(f"--format onnx needs the packages onnx and onnxruntime ({exc.name} is missing): "
                          "pip install 'visiontune[export]'") from None
    return onnx, onnxruntime


def onnx_bytes(net: nn.Module, example: torch.Tensor, meta: dict[str, Any], exporter: str = "dynamo") -> bytes:
    """``net`` as a serialised ONNX model with a dynamic batch dimension and ``meta`` in its ``metadata_props``.

    Args:
        net: the graph (eval mode).
        example: an input batch (batch size >= 2, so the batch dimension cannot be specialised to 1).
        meta: the metadata (see :func:`~visiontune.deploy.graph.export_metadata`).
        exporter: ``"dynamo"`` (torch.export-based, PyTorch's default) or ``"legacy"`` (TorchScript-based).
    """
    onnx, _ = require_onnx()
    names = {"input_names": ["input"], "output_names": ["logits"]}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*feature will be removed.*")
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1)
                program = torch.onnx.export(net, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                            verbose=False, **names)
                model = program.model_proto
            else:
                buffer = io.BytesIO()
                torch.onnx.export(net, (example,), buffer, dynamo=False, opset_version=17,
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **names)
                model = onnx.load_from_string(buffer.getvalue())
    except Exception as exc:  # the exporter's own limits (an op it cannot express, a shape it cannot keep dynamic)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        other = "legacy" if exporter == "dynamo" else "dynamo"
        raise ExportFailedError(f"torch.onnx.export ({exporter} exporter) failed on {type(net).__name__}: "
                                f"{first[:300]} (try --exporter {other}, or --format torchscript)") from exc
    del model.metadata_props[:]
    for key, value in metadata_strings(meta).items():
        model.metadata_props.add(key=key, value=value)
    data = model.SerializeToString()
    if len(data) >= _ONNX_LIMIT:
        raise ExportFailedError(f"the ONNX model is {len(data) / 1024**3:.1f} GiB: over protobuf's 2 GiB for one "
                                "file; use --format torchscript")
    return data


def torchscript_bytes(net: nn.Module, example: torch.Tensor, meta: dict[str, Any]) -> bytes:
    """``net`` traced and frozen as a TorchScript archive, ``meta`` as ``metadata.json`` in its extra files."""
    try:
        with _quiet_jit(), torch.no_grad():
            # the tracer's notes about Python values of shapes (timm's input-size asserts) are checked by running
            # batches of other sizes
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            traced = torch.jit.freeze(torch.jit.trace(net, example, check_trace=False))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportFailedError(f"torch.jit.trace failed on {type(net).__name__}: {first[:300]} "
                                "(try --format onnx)") from exc
    buffer = io.BytesIO()
    with _quiet_jit():
        torch.jit.save(traced, buffer, _extra_files={EXTRA_FILE: json.dumps(meta)})
    return buffer.getvalue()


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    # every torch.jit call warns that TorchScript is deprecated in PyTorch 2.14: the module docstring says it once
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated.*")
        yield


def runner(fmt: str, data: bytes, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function running an exported model (the bytes of :func:`onnx_bytes` / :func:`torchscript_bytes`, or a
    file's) on a float32 NCHW batch: onnxruntime's CPU session, or the archive loaded back with
    ``torch.jit.load``. ``threads``: onnxruntime's intra-op threads (default: PyTorch's thread count, so the
    latencies compare)."""
    if fmt == "onnx":
        _, ort = require_onnx()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
    with _quiet_jit():
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return loaded(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata an exported file records (mean, std, input_size, interpolation, class_names, input_format,
    backbone, strategy, merged, visiontune_version), from an ``.onnx`` file's ``metadata_props`` or a TorchScript
    archive's ``metadata.json``.

    Example:
        >>> read_export_metadata("model.onnx")["class_names"]  # doctest: +SKIP
        ['cat', 'dog']
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):  # a TorchScript archive is a zip file
        extra = {EXTRA_FILE: ""}
        with _quiet_jit():
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        return json.loads(extra[EXTRA_FILE])
    onnx, _ = require_onnx()
    model = onnx.load(str(path), load_external_data=False)
    return metadata_from_strings({p.key: p.value for p in model.metadata_props})
