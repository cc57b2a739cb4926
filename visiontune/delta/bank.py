"""Several task deltas on one base model in one process: switch in place, one head per task, merge for export.

The base (backbone + strategy, e.g. LoRA layers) is built once. Every task added from a delta file keeps
its tensors on the model's device and its own head module (tasks may have different class counts).
``use_task(name)`` restores what the previous task changed and writes the next task's tensors *in place*
(``copy_`` into the existing LoRA ``lora_A``/``lora_B``, adapter, prompt, bias parameters; sparse entries
at their indices; BatchNorm statistics) and swaps the head module: no reload, no rebuild, parameter
objects stay the same. ``merge(name)`` returns a deep copy with LoRA merged and unloaded (plain timm layers,
zero inference overhead, exportable to ONNX).

Example:
    >>> from visiontune.delta import TaskBank, build_from_delta
    >>> model = build_from_delta("birds.safetensors")                     # doctest: +SKIP
    >>> bank = TaskBank(model)                                             # doctest: +SKIP
    >>> bank.add_task("birds", "birds.safetensors"); bank.add_task("cars", "cars.safetensors")  # doctest: +SKIP
    >>> bank.use_task("cars"); logits = model(images)                      # doctest: +SKIP
    >>> export = bank.merge("birds")  # plain timm model, LoRA baked in    # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.heads import ClassifierHead, HeadError, find_head, set_module
from .format import (
    DeltaError,
    applied_strategy,
    base_tensor_hashes,
    delta_from_file,
    delta_info,
    is_transfer_classifier,
    set_class_names,
)
from .load import check_delta

__all__ = ["MultiTask", "TaskBank", "add_task", "merge_task", "task_bank", "use_task"]


@dataclass
class _Task:
    name: str
    meta: dict[str, Any]
    dense: dict[str, torch.Tensor]
    sparse: dict[str, tuple[torch.Tensor, torch.Tensor]]
    stats: dict[str, torch.Tensor]
    head: dict[str, nn.Module]  # head module path -> the task's copy of it
    class_names: list[str]


def _base_head(net: nn.Module) -> ClassifierHead:
    try:
        head = find_head(net)
    except HeadError as exc:
        raise DeltaError(str(exc)) from None
    if not head.parameter_names or not head.outputs:
        raise DeltaError(f"{type(net).__name__} has no classification head with parameters (get_classifier())")
    return head


def _task_head(base_head: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the base head module holding the task's head tensors (any class count), and the running
    statistics of its BatchNorm layers where the delta holds them (LeViT's NormLinear)."""
    head = copy.deepcopy(base_head)
    for pname, p in list(head.named_parameters()):
        owner_name, _, leaf = pname.rpartition(".")
        owner = head.get_submodule(owner_name) if owner_name else head
        t = tensors[f"{prefix}.{pname}"].to(device=p.device, dtype=p.dtype).clone()
        setattr(owner, leaf, nn.Parameter(t, requires_grad=p.requires_grad))
    with torch.no_grad():
        for bname, b in head.named_buffers():
            t = tensors.get(f"{prefix}.{bname}")
            if t is not None and t.shape == b.shape:
                b.copy_(t)
    for m in head.modules():
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.modules.conv._ConvNd):
            m.out_channels = m.weight.shape[0]
    return head


class TaskBank:
    """Keep several task deltas for one base model and switch between them in place.

    The model's state when the bank is created is the *base* (``use_task(None)`` returns to it exactly).
    All tasks must share the base's backbone, weights and strategy options; class counts may differ.

    Args:
        model: a TransferClassifier or a timm net with a strategy applied.
        check_base: verify, when a task is added, that the base tensors equal those its delta was trained on.
        weak: hold the model by a weak reference (what :func:`task_bank` uses, so that its registry does
            not keep models alive).

    Example:
        >>> bank = TaskBank(model)                       # doctest: +SKIP
        >>> bank.add_task("digits", "digits.safetensors") # doctest: +SKIP
        >>> bank.use_task("digits"); bank.active          # doctest: +SKIP
        'digits'
    """

    def __init__(self, model: nn.Module, *, check_base: bool = True, weak: bool = False) -> None:
        from ..strategies.lora import lora_layers
        from ..strategies.ssf import unmerge_ssf

        info = delta_info(model)
        applied_strategy(info.net)
        self._model: Any = weakref.ref(model) if weak else (lambda: model)
        merged = [layer for layer in lora_layers(info.net).values() if layer.merged]
        if merged:
            warnings.warn("TaskBank: unmerging the model's merged LoRA layers (tasks swap unmerged factors)",
                          stacklevel=2)
            for layer in merged:
                layer.unmerge()
        if unmerge_ssf(info.net):
            warnings.warn("TaskBank: unfolding the model's merged SSF layers (tasks swap unfolded vectors)",
                          stacklevel=2)
        self._head = _base_head(info.net)
        self._base_head = dict(zip(self._head.paths, self._head.modules))
        self._base_classes = list(info.module.class_names) if info.module is not None else None
        self.check_base = check_base
        self._hashes: dict[str, str] | None = None
        self._tasks: dict[str, _Task] = {}
        self._active: str | None = None
        self._undo: list[tuple] = []

    # ------------------------------------------------------------------ introspection
    @property
    def model(self) -> nn.Module:
        """The model the bank switches (a TransferClassifier or a timm net)."""
        model = self._model()
        if model is None:
            raise DeltaError("TaskBank: its model no longer exists")
        return model

    @property
    def net(self) -> nn.Module:
        """The timm network inside :attr:`model`."""
        model = self.model
        return model.net if is_transfer_classifier(model) else model

    @property
    def active(self) -> str | None:
        """Name of the active task, ``None`` for the base."""
        return self._active

    @property
    def tasks(self) -> list[str]:
        """Names of the added tasks, in the order they were added."""
        return list(self._tasks)

    def class_names(self, name: str) -> list[str]:
        """Class names of task ``name``."""
        return list(self._get(name).class_names)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def __repr__(self) -> str:
        return f"TaskBank(tasks={self.tasks}, active={self._active!r})"

    def _get(self, name: str) -> _Task:
        if name not in self._tasks:
            raise DeltaError(f"TaskBank: no task {name!r}; tasks: {self.tasks or 'none (use add_task)'}")
        return self._tasks[name]

    # ------------------------------------------------------------------ adding
    def add_task(self, name: str, path: str | os.PathLike, *, strict: bool = True) -> dict[str, Any]:
        """Read a delta, check it against the base, and keep it (on the model's device) as task ``name``.

        Args:
            name: task name (replaces an inactive task of the same name).
            path: a file written by :func:`~visiontune.delta.save_delta`.
            strict: differing strategy options are errors (``False``: warnings).

        Returns:
            The delta's metadata.

        Raises:
            DeltaError: the delta does not fit the base (backbone, strategy, keys, shapes, base tensors).

        Example:
            >>> bank.add_task("birds", "birds.safetensors")["num_classes"]  # doctest: +SKIP
            200
        """
        if not isinstance(name, str) or not name:
            raise DeltaError(f"TaskBank: task names are non-empty strings, got {name!r}")
        if name == self._active:
            raise DeltaError(f"TaskBank: task {name!r} is active; switch away before replacing it")
        net = self.net
        if self.check_base and self._hashes is None:
            if self._active is not None:  # pragma: no cover - hashes are taken before the first task exists
                raise DeltaError("TaskBank: base hashes must be taken in the base state")
            self._hashes = base_tensor_hashes(net, set())
        tensors, meta = delta_from_file(path)
        info = delta_info(self.model)
        layout = check_delta(info, tensors, meta, repr(str(path)), strict=strict, check_base=self.check_base,
                             allow_head_mismatch=True, base_hashes=self._hashes)
        params = dict(net.named_parameters())
        device = next(iter(params.values())).device
        head = set(layout.head)
        dense = {n: tensors[n].to(device=params[n].device, dtype=params[n].dtype)
                 for n in layout.dense if n not in head}
        sparse = {n: (tensors[n + ".sparse_indices"].to(device),
                      tensors[n + ".sparse_values"].to(device=params[n].device, dtype=params[n].dtype))
                  for n in layout.sparse}
        buffers = dict(net.named_buffers())
        in_head = set(self._head.state_names)  # the head's statistics travel with the task's head copy
        stats = {n: tensors[n].to(device=buffers[n].device, dtype=buffers[n].dtype) for n in layout.stats
                 if n not in in_head}
        task_head = {path: _task_head(m, path, tensors) for path, m in self._base_head.items()}
        n_out = int(tensors[self._head.output_parameter_names[0]].shape[0])
        names = [str(c) for c in (meta.get("class_names") or range(n_out))]
        self._tasks[name] = _Task(name, meta, dense, sparse, stats, task_head, names)
        return meta

    def remove_task(self, name: str) -> None:
        """Forget task ``name`` (switching back to the base first if it is active)."""
        self._get(name)
        if self._active == name:
            self.use_task(None)
        del self._tasks[name]

    # ------------------------------------------------------------------ switching
    def use_task(self, name: str | None) -> None:
        """Make task ``name`` active (``None``: the base), in place; LoRA merge state is kept.

        Build optimizers after switching: the head is another module (with its own parameters) per task.

        Args:
            name: an added task, or ``None``.

        Example:
            >>> bank.use_task("cars"); model(images).shape[1] == len(bank.class_names("cars"))  # doctest: +SKIP
            True
        """
        from ..strategies.lora import lora_layers
        from ..strategies.ssf import merge_ssf, unmerge_ssf

        task = None if name is None else self._get(name)
        if name == self._active:
            return
        net = self.net
        merged = [layer for layer in lora_layers(net).values() if layer.merged]
        for layer in merged:
            layer.unmerge()
        folded = unmerge_ssf(net)
        try:
            self._restore(net)
            if task is not None:
                self._apply(net, task)
        finally:
            for layer in merged:
                layer.merge()
            if folded:
                merge_ssf(net)

    def _set_head(self, net: nn.Module, head: dict[str, nn.Module], class_names: list[str] | None) -> None:
        for path, module in head.items():
            set_module(net, path, module)
        self._head.set_num_classes(net, find_head(net).num_classes)
        model = self.model
        if is_transfer_classifier(model) and class_names is not None:
            set_class_names(model, class_names)

    @torch.no_grad()
    def _restore(self, net: nn.Module) -> None:
        from ..strategies.sparse import write_flat

        for entry in reversed(self._undo):
            if entry[0] == "copy":
                entry[1].copy_(entry[2])
            else:  # "index": tensor, logical flat indices, old values
                write_flat(entry[1], entry[2], entry[3])
        self._undo = []
        self._set_head(net, self._base_head, self._base_classes)
        self._active = None

    @torch.no_grad()
    def _apply(self, net: nn.Module, task: _Task) -> None:
        from ..strategies.sparse import sparse_masks, write_flat

        params = dict(net.named_parameters())
        buffers = dict(net.named_buffers())
        undo: list[tuple] = []
        try:
            for n, t in task.dense.items():
                undo.append(("copy", params[n], params[n].detach().clone()))
                params[n].copy_(t)
            for n, t in task.stats.items():
                undo.append(("copy", buffers[n], buffers[n].clone()))
                buffers[n].copy_(t)
            masks = sparse_masks(net) if task.sparse else {}
            for n, (idx, values) in task.sparse.items():
                p = params[n].detach()
                undo.append(("index", p, idx, p.reshape(-1)[idx].clone()))
                write_flat(p, idx, values)  # indices in logical order, any memory format
                undo.append(("copy", masks[n], masks[n].clone()))
                write_flat(masks[n].fill_(False), idx, True)
        finally:
            self._undo = undo
        self._set_head(net, task.head, task.class_names)
        self._active = task.name

    # ------------------------------------------------------------------ export
    def merge(self, name: str | None = None) -> nn.Module:
        """A deep copy of the network with task ``name`` (default: the active one) baked in, in eval mode.

        LoRA / QLoRA / DoRA layers are merged and unloaded and SSF is folded into its layers (plain
        ``nn.Linear``/``nn.Conv2d``, float, original module names): zero inference overhead, ready for ONNX
        export. Sparse, BitFit, norm, last-k and full deltas already live in the weights. Adapters and prompts
        cannot be merged: their modules stay.

        Args:
            name: a task, or ``None`` for the active task (or the base).

        Returns:
            The copy (a timm net); the bank and its model are unchanged.

        Example:
            >>> export = bank.merge("birds")                                          # doctest: +SKIP
            >>> torch.onnx.export(export, torch.zeros(1, 3, 224, 224), "birds.onnx")  # doctest: +SKIP
        """
        from ..strategies.lora import merge_and_unload

        previous = self._active
        if name is not None and name != previous:
            self.use_task(name)
        try:
            out = copy.deepcopy(self.net)
        finally:
            if name is not None and name != previous:
                self.use_task(previous)
        merge_and_unload(out)  # LoRA / DoRA / SSF baked in; a no-op for the other strategies
        return out.eval()


#: Alias of :class:`TaskBank`.
MultiTask = TaskBank

_BANKS: "weakref.WeakKeyDictionary[nn.Module, TaskBank]" = weakref.WeakKeyDictionary()


def task_bank(model: nn.Module) -> TaskBank:
    """The :class:`TaskBank` of ``model`` (created on first use, kept while the model lives).

    Kept in a registry rather than on the model, so ``copy.deepcopy(model)`` does not copy or share it.

    Example:
        >>> task_bank(model).tasks  # doctest: +SKIP
        []
    """
    bank = _BANKS.get(model)
    if bank is None:
        bank = _BANKS[model] = TaskBank(model, weak=True)
    return bank


def add_task(model: nn.Module, name: str, path: str | os.PathLike, *, strict: bool = True) -> dict[str, Any]:
    """``task_bank(model).add_task(name, path)``: what ``TransferClassifier.add_task`` delegates to."""
    return task_bank(model).add_task(name, path, strict=strict)


def use_task(model: nn.Module, name: str | None) -> None:
    """``task_bank(model).use_task(name)``: what ``TransferClassifier.use_task`` delegates to."""
    task_bank(model).use_task(name)


def merge_task(model: nn.Module, name: str | None = None) -> nn.Module:
    """``task_bank(model).merge(name)``: a merged copy of the net for inference / export."""
    return task_bank(model).merge(name)
