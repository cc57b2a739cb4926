"""``visiontune export``: a trained model as one ONNX or TorchScript file for deployment, checked against PyTorch.

    visiontune export --ckpt_path runs/.../checkpoints/last.ckpt --format onnx --output model.onnx
    visiontune export --delta runs/.../checkpoints/delta.safetensors --format torchscript --data.val photos/
    visiontune export --config configs/quickstart.yaml --ckpt_path last.ckpt     # its data.* and image size

The input size, mean and std are the training run's (its ``config.yaml`` beside ``checkpoints/``), unless
``--data.image_size`` / ``--data.mean`` / ``--data.std`` or ``--config`` give them; else the backbone's.

The graph is the one that evaluates (the EMA's weights when training kept one), with LoRA / QLoRA / DoRA / SSF
merged into plain timm layers (``visiontune strategies``: mergeable); a strategy that cannot be merged (adapter,
vpt) is exported as it is, after one line saying so. The file takes a float32 NCHW batch already normalised,
batch dimension dynamic, and records its preprocessing (mean, std, input size, interpolation, class names).
Before the file is written, onnxruntime (or ``torch.jit.load``) runs it on real images (``--data.predict``, else
``--data.val`` / ``test`` / ``train``; else a synthetic input, said so) at batch 1 and at the images' batch; it
must match the PyTorch model within ``--tolerance`` (1e-4, times the largest |logit| when above 1) with the same
top-1, else nothing is written (exit 1).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from ..io import atomic_write
from .formats import (EXPORTERS, FORMATS, SUFFIXES, ExportError, ExportFailedError, onnx_bytes, require_onnx,
                      runner, torchscript_bytes)
from .graph import eval_graph, export_metadata

__all__ = ["ExportResult", "export_main", "export_model", "load_for_export", "run_preprocessing"]

ROLES = ("predict", "val", "test", "train")  # where the check's images come from, first given first


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured.

    Attributes:
        path: the exported file.
        format: ``"onnx"`` or ``"torchscript"``.
        strategy, merged, note: the strategy, whether it was merged, and the line saying so.
        metadata: what the file records (mean, std, input_size, interpolation, class_names, ...).
        checked_on: ``"images"`` (real images, ``num_images`` of them, from ``source``) or ``"synthetic"``.
        max_abs_diff: max |exported - PyTorch| over the logits of the check (batch 1 and the full batch).
        merge_max_abs_diff: max |merged PyTorch graph - the model| (0 when nothing was merged).
        top1_agree: whether every image gets the same top-1 class.
        latency_ms: median batch-1 latency, ``{"pytorch": ..., "exported": ...}`` (same thread count).
    """

    path: Path
    format: str
    strategy: str
    merged: bool
    note: str
    metadata: dict[str, Any]
    checked_on: str
    num_images: int
    source: Optional[str]
    max_abs_diff: float
    merge_max_abs_diff: float
    top1_agree: bool
    latency_ms: dict[str, float] = field(default_factory=dict)

    def summary(self) -> list[str]:
        """The lines ``visiontune export`` prints."""
        what = (f"{self.num_images} real images from {self.source}" if self.checked_on == "images" else
                "a synthetic input only (give --data.predict or --data.val to check on real images)")
        runtime = "onnxruntime" if self.format == "onnx" else "torch.jit.load"
        size = "x".join(map(str, self.metadata["input_size"][1:]))
        return [
            self.note,
            f"checked on {what}: {runtime} vs PyTorch max |dlogit| {self.max_abs_diff:.2e}, "
            f"top-1 {'identical' if self.top1_agree else 'DIFFERENT'} (batch 1 and {self.num_images}); "
            f"merge alone max |dlogit| {self.merge_max_abs_diff:.2e}",
            f"latency, batch 1, {size} px, {torch.get_num_threads()} threads (median): PyTorch "
            f"{self.latency_ms['pytorch']:.2f} ms, {runtime} {self.latency_ms['exported']:.2f} ms "
            f"({self.latency_ms['exported'] / self.latency_ms['pytorch']:.2f}x)",
            f"wrote {self.path} ({self.format}, {self.path.stat().st_size / 1e6:.1f} MB)",
        ]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def load_for_export(ckpt_path: Optional[str] = None, delta: Optional[str] = None) -> nn.Module:
    """The model ``visiontune predict`` would run for ``--ckpt_path`` or ``--delta`` (exactly one):
    :meth:`TransferClassifier.load <visiontune.TransferClassifier.load>` or :func:`~visiontune.build_from_delta`,
    in eval mode.

    Example:
        >>> model = load_for_export(ckpt_path="runs/x/checkpoints/last.ckpt")  # doctest: +SKIP
    """
    if (ckpt_path is None) == (delta is None):
        raise ExportError("give exactly one of --ckpt_path (a checkpoint) or --delta (a task delta), got "
                          + ("both" if ckpt_path else "neither"))
    path = Path(str(ckpt_path or delta)).expanduser()
    option = "--ckpt_path" if ckpt_path else "--delta"
    if not path.is_file():
        raise ExportError(f"{option}: no such file: {path}")
    if delta is not None:
        from ..delta.build import build_from_delta

        return build_from_delta(path)
    from ..training.module import TransferClassifier

    return TransferClassifier.load(str(path)).eval()


def _check_inputs(model: nn.Module, images: Any, image_size: Optional[int], mean: Any, std: Any,
                  count: int) -> tuple[torch.Tensor, dict[str, Any], Optional[str]]:
    """The check's batch (normalised as the model's evaluation normalises, by the same datamodule), the
    preprocessing it used, and the images' source (``None``: synthetic)."""
    from ..data import ImageDataModule

    source = images if images is not None and not isinstance(images, torch.Tensor) else None
    dm = ImageDataModule(predict=source, image_size=image_size, mean=mean, std=std, num_workers=0)
    cfg = model.data_config
    dm.use_data_config(cfg).setup("predict")
    size = int(dm.resolved["image_size"])
    pre = {"input_size": (size, size), "mean": tuple(dm.resolved["mean"]), "std": tuple(dm.resolved["std"]),
           "interpolation": cfg.get("interpolation", "bilinear")}
    if isinstance(images, torch.Tensor):
        return images.float(), pre, "the given tensor"
    if source is None:
        x = torch.randn(max(count, 2), 3, size, size, generator=torch.Generator().manual_seed(0))
        return x, pre, None
    data = dm.predict_set
    picks = np.unique(np.linspace(0, len(data) - 1, num=min(count, len(data))).round().astype(int))
    x = torch.stack([data[int(i)][0] for i in picks])
    if len(x) == 1:  # the batch dimension must be seen > 1 for it to stay dynamic
        x = torch.cat([x, x.flip(-1)])
    return x, pre, str(source)


def _median_ms(fn: Callable[[], Any], runs: int) -> float:
    for _ in range(min(3, runs)):  # warm-up (allocations, onnxruntime's first-run planning)
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _logits(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return net(x).float().numpy()


def _reference_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The PyTorch model's logits on the check's batch; a model that does not take the input size is the user's
    choice of size (``--data.image_size``), said so."""
    try:
        return _logits(model, x)
    except (RuntimeError, AssertionError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"the model does not run on {x.shape[-2]}x{x.shape[-1]} px inputs (--data.image_size, or "
                          f"the config's data.image_size): {first[:300]}") from None


def export_model(
    model: Union[nn.Module, str, os.PathLike],
    output: Union[str, os.PathLike],
    format: str = "onnx",
    *,
    images: Any = None,
    image_size: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    exporter: str = "dynamo",
    check_images: int = 8,
    tolerance: float = 1e-4,
    latency_runs: int = 20,
) -> ExportResult:
    """Export a trained model's evaluation graph (mergeable strategies merged) as ONNX or TorchScript, check it
    against PyTorch, time both, and write it atomically.

    Args:
        model: a :class:`~visiontune.TransferClassifier`, or the path of a checkpoint (``.ckpt``) or task delta
            (``.safetensors``), loaded by :func:`load_for_export`.
        output: the file to write (parent folders are made; written only if the check passes).
        format: ``"onnx"`` or ``"torchscript"``.
        images: the check's images: a data source (folder, CSV, built-in name such as ``"digits"``), a float
            NCHW tensor already normalised, or ``None`` (a synthetic input).
        image_size: the square input side; ``None``: the backbone's (as ``ImageDataModule`` resolves it).
        mean, std: normalisation; ``None``: the backbone's.
        exporter: ONNX only: ``"dynamo"`` (torch.export-based, PyTorch's default) or ``"legacy"``.
        check_images: how many images (evenly spread over the source) the check runs.
        tolerance: the largest |Δlogit| accepted, times the largest |logit| when that is above 1.
        latency_runs: timed runs per latency (median; after 3 warm-up runs).

    Returns:
        An :class:`ExportResult`.

    Raises:
        ExportError: a bad option (a UserError); ExportFailedError: the exporter failed or the check did not
            pass (then nothing is written).

    Example:
        >>> from visiontune import TransferClassifier
        >>> model = TransferClassifier("resnet18", weights=None, num_classes=3, strategy="lora")
        >>> result = export_model(model, "model.onnx", images="digits", image_size=32)  # doctest: +SKIP
        >>> result.merged, result.max_abs_diff < 1e-4, result.metadata["input_size"]    # doctest: +SKIP
        (True, True, [3, 32, 32])
    """
    if format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if exporter not in EXPORTERS:
        raise ExportError(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if format == "onnx":
        require_onnx()
    if not isinstance(model, nn.Module):
        path = str(model)
        model = load_for_export(**({"delta": path} if path.endswith(".safetensors") else {"ckpt_path": path}))
    model = model.eval()
    x, pre, source = _check_inputs(model, images, image_size, mean, std, check_images)
    want = _reference_logits(model, x)
    graph = eval_graph(model)
    meta = export_metadata(model, graph, pre["input_size"], pre["mean"], pre["std"], pre["interpolation"])
    data = onnx_bytes(graph.net, x, meta, exporter) if format == "onnx" else torchscript_bytes(graph.net, x, meta)
    run = runner(format, data)
    merged = _logits(graph.net, x)
    got = [run(x.numpy()), np.concatenate([run(x[i:i + 1].numpy()) for i in range(len(x))])]
    diff = max(float(np.abs(g - want).max()) for g in got)
    agree = all(bool((g.argmax(1) == want.argmax(1)).all()) for g in got)
    # float32 rounding grows with the logits' size (a fused BatchNorm in onnxruntime: ~1e-5 of the scale)
    allowed = tolerance * max(1.0, float(np.abs(want).max()))
    if not (diff <= allowed and agree):
        raise ExportFailedError(f"the exported {format} model does not match PyTorch: max |dlogit| {diff:.2e} "
                                f"(tolerance {allowed:.2g}), top-1 {'same' if agree else 'differs'}; not written")
    one = x[:1]
    latency = {"pytorch": _median_ms(lambda: _logits(model, one), latency_runs),
               "exported": _median_ms(lambda: run(one.numpy()), latency_runs)}
    out = atomic_write(Path(output).expanduser(), data)
    return ExportResult(out, format, graph.strategy, graph.merged, graph.note, meta,
                        "images" if source else "synthetic", len(x) if source else 0, source, diff,
                        float(np.abs(merged - want).max()), agree, latency)


def run_preprocessing(path: Path) -> dict[str, Any]:
    """``image_size``, ``mean`` and ``std`` of the training run a checkpoint or delta comes from (its run
    directory's ``config.yaml``, which ``visiontune fit`` writes beside ``checkpoints/``), where they were set;
    ``{}`` when there is no such file. The export's input size is the one the model was trained at, unless
    ``--data.image_size`` (or ``--config``) says otherwise.

    Example:
        >>> run_preprocessing(Path("runs/visiontune/version_0/checkpoints/last.ckpt"))  # doctest: +SKIP
        {'image_size': 64}
    """
    import yaml

    config = path.resolve().parent.parent / "config.yaml"
    if path.resolve().parent.name != "checkpoints" or not config.is_file():
        return {}
    try:
        data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    return {k: data[k] for k in ("image_size", "mean", "std") if data.get(k) is not None}


def _own_options(parser: Any) -> None:
    parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                        help="a checkpoint of visiontune fit (exclusive with --delta)")
    parser.add_argument("--format", type=str, default="onnx", help="onnx or torchscript")
    parser.add_argument("--output", type=Optional[str], default=None,
                        help="the file to write (default: next to the checkpoint/delta, .onnx / .torchscript.pt)")
    parser.add_argument("--exporter", type=str, default="dynamo",
                        help="ONNX exporter: dynamo (torch.export-based, default) or legacy (TorchScript-based)")
    parser.add_argument("--check_images", type=int, default=8, help="images the check runs (evenly spread)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest |dlogit| accepted")
    parser.add_argument("--latency_runs", type=int, default=20, help="timed runs per latency (median)")
    parser.add_argument("--json", type=Optional[str], default=None, help="also write the result as JSON here")


def export_main(argv: Sequence[str]) -> int:
    """``visiontune export``: exit 0 when written, 1 when the export or its check failed, 2 on bad input."""
    from ..cli.config import ToolCLI

    cli = ToolCLI("visiontune export", argv, _own_options, description=__doc__.split("\n\n")[0])
    c = cli.config
    if c.format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {c.format!r}")
    if c.check_images < 1 or c.latency_runs < 1 or not c.tolerance >= 0:
        raise ExportError(f"--check_images and --latency_runs must be >= 1 and --tolerance >= 0, got "
                          f"{c.check_images}, {c.latency_runs}, {c.tolerance}")
    model = load_for_export(c.ckpt_path, c.delta)
    src = Path(str(c.ckpt_path or c.delta))
    given = {**run_preprocessing(src), **cli.given("data")}
    images = next((given[r] for r in ROLES if given.get(r)), None)
    output = c.output or src.with_name(src.name.split(".")[0] + SUFFIXES[c.format])
    try:
        result = export_model(model, output, c.format, images=images, image_size=given.get("image_size"),
                              mean=given.get("mean"), std=given.get("std"), exporter=c.exporter,
                              check_images=c.check_images, tolerance=c.tolerance, latency_runs=c.latency_runs)
    except ExportFailedError as exc:
        print(f"visiontune export: {exc}", file=sys.stderr)
        return 1
    print("\n".join(result.summary()))
    if c.json:
        from ..io import atomic_write_json

        atomic_write_json(c.json, result.to_dict())
    return 0
