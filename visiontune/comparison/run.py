"""One run of a comparison (:mod:`visiontune.comparison.api`): train, evaluate, save the delta, measure.

Peak memory: on CUDA the peak allocated memory; on CPU the peak resident memory above the level before
the run (sampled every 10 ms, after handing freed heap memory back to the OS). Latency: one image, eval
mode, inference mode, median of repeats, in the exported form (LoRA merged into its layers, on a copy).

Nothing heavy is imported until a run starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import statistics
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .report import plain_settings

__all__ = ["RESULT_FORMAT", "StrategySpec", "fingerprint", "run_one"]

RESULT_FORMAT = 1
"""Version of the result records: part of each run's :func:`fingerprint`, so a change redoes old runs."""


@dataclasses.dataclass(frozen=True)
class StrategySpec:
    """One contender: a registered strategy, its options, and model overrides for it alone.

    Args:
        name: registered strategy name.
        args: strategy options (``{"rank": 4}``).
        model: :class:`~visiontune.TransferClassifier` arguments for this strategy only (``{"lr": 0.01}``;
            ``{"cache_features": True}`` for a fast ``linear``).
        label: the name shown in the leaderboard; default ``name`` or ``name(k=v, ...)``.
    """

    name: str
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    label: str = ""

    @property
    def slug(self) -> str:
        """File-name-safe label: ``lora(rank=4)`` → ``lora-rank4``."""
        s = re.sub(r"[^A-Za-z0-9_.]+", "-", self.label.replace("=", "")).strip("-.")
        return s or self.name


def _rss() -> int:
    """Resident memory of this process in bytes (Linux /proc, else psutil, else 0)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover
        return 0


try:
    import os as _os

    _PAGE = _os.sysconf("SC_PAGE_SIZE")
except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
    _PAGE = 4096


class _PeakMemory:
    """Peak memory of a block: CUDA peak allocated, or sampled CPU RSS above the starting level (MB)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "_PeakMemory":
        import gc

        import torch

        gc.collect()
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:  # hand freed heap pages back, so earlier runs do not hide this run's growth
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.base = self._peak = _rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss())
        self.peak_mb = (self._peak - self.base) / 2**20


def _deployable(net: Any) -> Any:
    """The network as it would be exported: LoRA deltas merged into (SSF folded into) their layers (on a copy)."""
    try:
        from ..strategies.lora import lora_layers, merge_and_unload
        from ..strategies.ssf import ssf_sites
    except ImportError:  # pragma: no cover - lora is a built-in strategy
        return net
    if not lora_layers(net) and not ssf_sites(net):
        return net
    import copy

    return merge_and_unload(copy.deepcopy(net))


def _latency_ms(model: Any, image_size: int, repeats: int) -> float:
    """Median wall time (ms) of one eval forward pass on one image (inference mode, after warm-up)."""
    import torch

    if repeats <= 0:
        return float("nan")
    device = next(model.parameters()).device
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _save_delta(model: Any, path: Path, bn_before: Mapping[str, Any]) -> Path:
    """The run's task delta: :func:`visiontune.delta.save_delta` if present, else a minimal safetensors."""
    try:
        from ..delta.format import save_delta
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.delta":
            raise
        save_delta = None
    if save_delta is not None:
        return Path(save_delta(model, path))
    from ..io import atomic_save_safetensors
    from ..strategies import delta_parameter_names

    net = model.net
    names = delta_parameter_names(net)
    tensors = {n: p.detach().cpu() for n, p in net.named_parameters() if n in names}
    for n, b in net.named_buffers():  # BatchNorm statistics that training changed
        if n in bn_before and b.dtype.is_floating_point and not bool((b.cpu() == bn_before[n]).all()):
            tensors[n] = b.detach().cpu()
    meta = {"format": "visiontune-delta-minimal", "backbone": str(model.hparams.backbone),
            "weights": str(model.hparams.weights), "strategy": model.parameter_summary()["strategy"],
            "strategy_config": json.dumps(dataclasses.asdict(model.strategy_config), default=str),
            "class_names": json.dumps(list(model.class_names or []))}
    return atomic_save_safetensors(tensors, path, meta)


def _callback(entry: Any) -> Any:
    """A trainer callback: itself, or built from a config's ``{class_path, init_args}`` (a GradualUnfreeze
    schedule, ...), a new one for every run."""
    if not (isinstance(entry, Mapping) and "class_path" in entry):
        return entry
    import importlib

    module, _, name = str(entry["class_path"]).rpartition(".")
    return getattr(importlib.import_module(module), name)(**dict(entry.get("init_args") or {}))


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A short digest of a run's settings (file contents included): a stored result with the same one is reused."""
    return hashlib.sha256(json.dumps(plain_settings(settings, True), sort_keys=True).encode()).hexdigest()[:16]


def run_one(spec: StrategySpec, seed: int, settings: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train and evaluate one strategy with one seed; returns its result record (not yet written)."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from ..data import ImageDataModule
    from ..training.module import TransferClassifier
    from ..training.report import RunReport

    L.seed_everything(seed, workers=True, verbose=False)
    data_args = dict(settings["data"])
    data_args.setdefault("seed", seed)
    dm = ImageDataModule(**data_args)
    names = dm.class_names
    if names is None:
        raise ValueError("compare: data.train is required (the classes come from the training data)")
    model_args = {**settings["model"], **spec.model}
    model = TransferClassifier(settings["backbone"], weights=settings["weights"], class_names=names,
                               strategy=spec.name, strategy_args=dict(spec.args), **model_args)
    bn_before = {n: b.detach().clone() for n, b in model.net.named_buffers() if n.endswith(("running_mean",
                                                                                             "running_var"))}
    trainer_args: dict[str, Any] = {
        "max_epochs": settings["max_epochs"],
        "logger": CSVLogger(str(run_dir.parent.parent), name=run_dir.parent.name, version=run_dir.name),
        "callbacks": [RunReport(verbose=False)],
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    if settings["max_time"] is not None:
        trainer_args["max_time"] = {"seconds": float(settings["max_time"])}
    trainer_args.update({k: v for k, v in settings["trainer"].items() if k != "callbacks"})
    trainer_args["callbacks"] += [_callback(c) for c in settings["trainer"].get("callbacks") or []]
    trainer = L.Trainer(**trainer_args)
    with _PeakMemory() as mem:
        start = time.perf_counter()
        trainer.fit(model, dm)
        train_seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    split = "val"
    if dm.test_set is not None or dm.test is not None:
        trainer.test(model, dm, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test_")})
        split = "test"
    delta = _save_delta(model, run_dir / "delta.safetensors", bn_before)
    summary = model.parameter_summary()
    image_size = dm.resolved["image_size"] if getattr(dm, "resolved", None) else 224
    latency = _latency_ms(_deployable(model.net), image_size, settings["latency_repeats"])
    return {
        "format": RESULT_FORMAT,
        "label": spec.label,
        "strategy": spec.name,
        "args": dict(spec.args),
        "model_overrides": dict(spec.model),
        "seed": seed,
        "split": split,
        "accuracy": metrics.get(f"{split}_acc", float("nan")),
        "macro_f1": metrics.get(f"{split}_macro_f1", float("nan")),
        **{k: v for k, v in metrics.items() if k.endswith(("_acc", "_macro_f1", "_loss"))},
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "trainable_fraction": summary["trainable_fraction"],
        "delta": str(delta),
        "delta_bytes": delta.stat().st_size,
        "peak_mem_mb": round(mem.peak_mb, 1),
        "memory_kind": "cuda_allocated" if mem.cuda else "cpu_rss_increase",
        "train_seconds": round(train_seconds, 3),
        "epochs": int(trainer.current_epoch),
        "steps": int(trainer.global_step),
        "latency_ms": round(latency, 3),
        "device": str(next(model.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
