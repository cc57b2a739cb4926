"""Gradual unfreezing for any timm backbone: thaw depth groups over time, with per-phase learning rates.

The depth groups come from timm's ``group_matcher()`` (:func:`visiontune.depth_groups`): stem, blocks or
stages, head. A *schedule* is a list of phases; each phase starts at an epoch (or a step) and thaws more
groups. Only parameters the strategy trains (its delta, :func:`visiontune.strategies.delta_parameter_names`)
are ever thawed: with ``full`` the schedule thaws weights, with ``lora``/``adapter``/``bitfit`` it thaws those
parameters group by group.

Group names (in ``groups:``), for a model with ``n`` depth groups:

- an index from the input: ``0`` = the stem (first group) ... ``n - 1`` = the head;
- a negative index from the output: ``-1`` = the head, ``-2`` = the last block/stage before it, ...;
- a name: ``"stem"`` (= 0), ``"head"`` (= -1), ``"block.N"`` = the N-th group between stem and head
  (``block.0`` = group 1).

``visiontune schedule --model.backbone NAME`` (:func:`visiontune.schedule.tuning.schedule_yaml`) prints a generated
schedule with each group's layers, ready to paste under ``trainer.callbacks`` and edit. Explicit schedule in YAML::

    trainer:
      callbacks:
      - class_path: visiontune.schedule.GradualUnfreeze
        init_args:
          phases:
          - {at_epoch: 0, groups: [head]}
          - {at_epoch: 2, groups: [-2, -3], lr: 3.0e-4}
          - {at_epoch: 4, regex: "^blocks\\\\.[0-3]\\\\.", lr: 1.0e-4}

Implicit schedule (head first, then one more group every epoch, deepest last)::

    trainer:
      callbacks:
      - class_path: visiontune.schedule.GradualUnfreeze
        init_args: {every_n_epochs: 1, groups_per_phase: 2}

How it stays compatible with LR schedulers and resuming: every optimizer parameter group is created by
``configure_optimizers`` before training (frozen-for-now parameters included); the schedule only flips
``requires_grad``. A frozen parameter gets no ``.grad`` (``zero_grad(set_to_none=True)``, the default),
and AdamW skips parameters without a gradient, so neither its weights nor its optimizer state move. A
phase's ``lr`` is known before training, so it is applied once at fit start (splitting an optimizer group
whose parameters need different LRs, and the scheduler's per-group lists with it); no group is ever added,
so cosine / one-cycle / plateau schedulers run on unchanged. The callback's ``state_dict`` carries the
phase, and the matching ``requires_grad`` state is restored in ``on_fit_start``, before the first step.

BatchNorm: the same policy function as the module (:func:`visiontune.training.bn.apply_bn_policy`), re-applied
after each thaw: ``bn="frozen"`` keeps BatchNorm layers with frozen parameters in eval mode (running
statistics fixed) until their group thaws; ``bn="eval"`` keeps every BatchNorm layer's pretrained
statistics; ``bn="train"`` lets them all update statistics; ``None`` follows the module's ``bn``
hyper-parameter (:class:`visiontune.TransferClassifier`), else ``"frozen"``.

With DDP, use ``strategy="ddp_find_unused_parameters_true"``: frozen parameters produce no gradient.

This module imports no heavy dependency until used (``visiontune --help`` stays fast).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

if TYPE_CHECKING:  # pragma: no cover
    import lightning as L
    from torch import nn

    GradualUnfreeze = Any  # the real class is built lazily (see __getattr__)

__all__ = [
    "GradualUnfreeze",
    "Phase",
    "ResolvedSchedule",
    "ScheduleError",
    "auto_phases",
    "group_index",
    "group_names",
    "parse_phases",
    "resolve_schedule",
]

from .phases import (  # noqa: F401  (re-exported: the schedule's public vocabulary)
    Phase,
    ResolvedSchedule,
    ScheduleError,
    auto_phases,
    group_index,
    group_names,
    parse_phases,
    resolve_schedule,
    summarize_names,
)


# ---------------------------------------------------------------------------------------------- optimizer
_PER_GROUP_LISTS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs", "base_momentums", "max_momentums")
_LR_LISTS = ("base_lrs", "_last_lr", "min_lrs", "max_lrs")
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


def _split_groups(groups: list[dict], key: Callable[[Any], Hashable]) -> tuple[list[dict], list[list[int]], list]:
    """Split each param group by ``key(param)`` (order kept). Returns new groups, old→new index map, keys."""
    new: list[dict] = []
    mapping: list[list[int]] = []
    keys: list = []
    for g in groups:
        buckets: dict[Hashable, list[int]] = {}
        for j, p in enumerate(g["params"]):
            buckets.setdefault(key(p), []).append(j)
        mapping.append([])
        for k, idx in buckets.items():
            part = {kk: v for kk, v in g.items() if kk not in ("params", "names")}
            part["params"] = [g["params"][j] for j in idx]
            if isinstance(g.get("names"), list) and len(g["names"]) == len(g["params"]):
                part["names"] = [g["names"][j] for j in idx]
            mapping[-1].append(len(new))
            new.append(part)
            keys.append(k)
    return new, mapping, keys


def _schedulers(trainer: "L.Trainer", optimizer: Any) -> list[Any]:
    found: list[Any] = []

    def walk(s: Any) -> None:
        if getattr(s, "optimizer", None) is optimizer:
            found.append(s)
        for inner in getattr(s, "_schedulers", None) or []:
            walk(inner)

    for cfg in trainer.lr_scheduler_configs:
        walk(cfg.scheduler)
    return found


# ---------------------------------------------------------------------------------------------- callback
def _network(pl_module: "L.LightningModule") -> "nn.Module":
    """The timm model inside a LightningModule: ``.net`` (TransferClassifier), else the first submodule
    with ``group_matcher`` and ``get_classifier``."""
    net = getattr(pl_module, "net", None)
    if net is not None and hasattr(net, "get_classifier"):
        return net
    for m in pl_module.modules():
        if hasattr(m, "group_matcher") and hasattr(m, "get_classifier"):
            return m
    raise ScheduleError(f"GradualUnfreeze: no timm model (with group_matcher) found in {type(pl_module).__name__}")


class _GradualUnfreezeLogic:
    """Gradual unfreezing of timm depth groups, as a Lightning callback (``trainer.callbacks``).

    Give ``phases`` for an explicit schedule, or nothing / ``every_n_epochs`` / ``groups_per_phase`` for
    the implicit one (head first, then deeper groups). See the :mod:`visiontune.schedule` docstring for
    group names and YAML.

    Args:
        phases: explicit phases, e.g. ``[{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 2,
            "groups": [-2, -3], "lr": 3e-4}, {"at_epoch": 4, "regex": "^layer[12]\\\\."}]``; each has
            ``at_epoch`` or ``at_step``, ``groups`` and/or ``regex``, and an optional ``lr`` (the peak LR of
            what the phase thaws, replacing the model's ``lr`` × ``layer_decay`` factor for it).
        every_n_epochs: implicit schedule: epochs between phases (default 1).
        groups_per_phase: implicit schedule: depth groups thawed per phase (default 1).
        coarse: use timm's coarse depth groups (stages instead of blocks).
        group_patterns: regexes overriding timm's depth groups, one per group from input to output
            (see :func:`visiontune.depth_groups`); the head is always the last group.
        bn: ``"frozen"``: BatchNorm layers whose parameters are frozen stay in eval mode; ``"train"``: they
            update their statistics; ``None``: the module's ``bn`` hyper-parameter, else ``"frozen"``.
        verbose: print a line when a phase starts.

    Example:
        >>> import lightning as L
        >>> from visiontune import ImageDataModule, TransferClassifier
        >>> from visiontune.schedule import GradualUnfreeze
        >>> cb = GradualUnfreeze([{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "groups": [-2, -3]}])
        >>> model = TransferClassifier("tf_efficientnet_lite0", weights="package", strategy="full")
        >>> trainer = L.Trainer(max_epochs=3, callbacks=[cb])
        >>> trainer.fit(model, ImageDataModule(train="digits", image_size=48))  # doctest: +SKIP
        >>> cb.phase  # doctest: +SKIP
        2
    """

    def __init__(
        self,
        phases: Optional[list[dict[str, Any]]] = None,
        every_n_epochs: Optional[int] = None,
        groups_per_phase: Optional[int] = None,
        coarse: bool = False,
        group_patterns: Optional[list[str]] = None,
        bn: Optional[Literal["frozen", "eval", "train"]] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if phases is not None and (every_n_epochs is not None or groups_per_phase is not None):
            raise ScheduleError("give either phases (explicit) or every_n_epochs / groups_per_phase (implicit), not both")
        if bn not in (None, "frozen", "eval", "train"):
            raise ScheduleError(f"bn must be 'frozen', 'eval', 'train' or None, got {bn!r}")
        self.phases: Optional[list[Phase]] = parse_phases(phases) if phases is not None else None
        self.every_n_epochs = 1 if every_n_epochs is None else every_n_epochs
        self.groups_per_phase = 1 if groups_per_phase is None else groups_per_phase
        for option in ("every_n_epochs", "groups_per_phase"):
            v = getattr(self, option)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ScheduleError(f"{option} must be an integer >= 1, got {v!r}")
        self.coarse = coarse
        self.group_patterns = list(group_patterns) if group_patterns else None
        self.bn = bn
        self.verbose = verbose
        self.phase = 0  # current phase index (restored from a checkpoint by load_state_dict)
        self.schedule: Optional[ResolvedSchedule] = None
        self._loaded: Optional[dict[str, Any]] = None
        self._bn_policy = "frozen"

    # ------------------------------------------------------------------ public helpers
    def resolve(self, net: "nn.Module") -> ResolvedSchedule:
        """Bind the schedule to ``net`` and validate it (see :func:`resolve_schedule`)."""
        phases: Sequence[Any] = self.phases if self.phases is not None else auto_phases(
            net, every_n_epochs=self.every_n_epochs, groups_per_phase=self.groups_per_phase,
            coarse=self.coarse, group_patterns=self.group_patterns)
        return resolve_schedule(net, phases, coarse=self.coarse, group_patterns=self.group_patterns)

    def apply(self, net: "nn.Module", phase: int) -> None:
        """Set ``requires_grad`` of the strategy's parameters for ``phase`` (others are left alone)."""
        if self.schedule is None:
            self.schedule = self.resolve(net)
        trainable = self.schedule.trainable(phase)
        delta = self.schedule.delta
        for name, p in net.named_parameters():
            if name in delta:
                p.requires_grad_(name in trainable)

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        net = _network(pl_module)
        self.schedule = self.resolve(net)
        hp = getattr(pl_module, "hparams", {}) or {}
        self._bn_policy = self.bn or (hp.get("bn") if hasattr(hp, "get") else None) or "frozen"
        if self._loaded is None:
            self.phase = 0  # a fresh fit (the callback may have run before)
        else:
            saved = self._loaded.get("num_phases")
            if saved is not None and saved != len(self.schedule.phases):
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"GradualUnfreeze: the checkpoint's schedule had {saved} phases, this one has "
                               f"{len(self.schedule.phases)}; resuming at phase {self.phase}")
        self.phase = min(self.phase, len(self.schedule.phases) - 1)
        self._prepare_optimizers(trainer, net)
        self.apply(net, self.phase)  # restored before the first training step
        self._sync_bn(pl_module, net)
        if self.verbose and trainer.is_global_zero:
            never = self.schedule.never_thawed()
            print(f"GradualUnfreeze: {len(self.schedule.phases)} phases over {len(self.schedule.groups)} depth groups, "
                  f"starting in phase {self.phase}" + (f"; {len(never)} trainable tensors are never thawed" if never else ""))

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        # Loop progress is restored by now, and so is this callback's state even for strategies that
        # restore checkpoints after setup: apply the phase again whatever it is.
        self._advance(trainer, pl_module, force=True)

    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._advance(trainer, pl_module)

    def on_train_batch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self._advance(trainer, pl_module)
        self._sync_bn(pl_module, _network(pl_module))

    def state_dict(self) -> dict[str, Any]:
        n = len(self.schedule.phases) if self.schedule is not None else None
        return {"phase": self.phase, "num_phases": n}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        self.phase = int(state_dict.get("phase", 0))

    def teardown(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        self._loaded = None  # a later fit without ckpt_path starts from phase 0

    # ------------------------------------------------------------------ internals
    def _advance(self, trainer: "L.Trainer", pl_module: "L.LightningModule", force: bool = False) -> None:
        if self.schedule is None:
            return
        target = max(self.phase, self.schedule.phase_at(trainer.current_epoch, trainer.global_step))
        if target == self.phase and not force:
            return
        net = _network(pl_module)
        changed, self.phase = target != self.phase, target
        self.apply(net, target)
        self._sync_bn(pl_module, net)
        if changed and self.verbose and trainer.is_global_zero:
            p = self.schedule.phases[target]
            trainable = sum(q.numel() for q in net.parameters() if q.requires_grad)
            thaw = self.schedule.thaw[target]
            print(f"GradualUnfreeze: {p.unit} {p.at}: phase {target} thaws {summarize_names(thaw)}"
                  f" ({len(thaw)} tensors); {trainable:,} parameters now train")

    def _sync_bn(self, pl_module: "L.LightningModule", net: "nn.Module") -> None:
        """BatchNorm modes for the current ``requires_grad`` state (only while the module trains)."""
        if pl_module.training:
            from ..training.bn import apply_bn_policy

            apply_bn_policy(net, self._bn_policy)

    def _prepare_optimizers(self, trainer: "L.Trainer", net: "nn.Module") -> None:
        """Give phases with an ``lr`` their LR (splitting mixed groups) and check the group coverage."""
        assert self.schedule is not None
        by_id = {id(p): n for n, p in net.named_parameters()}
        lrs = self.schedule.lrs()
        target = {id(p): lrs[n] for n, p in net.named_parameters() if n in lrs}
        for opt in trainer.optimizers:
            old = len(opt.param_groups)
            groups, mapping, keys = _split_groups(opt.param_groups, lambda p: target.get(id(p)))
            if len(groups) != old:
                opt.param_groups[:] = groups
                for s in _schedulers(trainer, opt):
                    for attr in _PER_GROUP_LISTS:
                        values = getattr(s, attr, None)
                        if isinstance(values, list) and len(values) == old:
                            setattr(s, attr, [values[i] for i, new in enumerate(mapping) for _ in new])
            for gi, (g, lr) in enumerate(zip(opt.param_groups, keys)):
                if lr is None:
                    continue
                peak = g.get("max_lr", g.get("initial_lr", g["lr"]))
                ratio = lr / peak if peak else 0.0
                for k in _LR_KEYS:
                    if isinstance(g.get(k), (int, float)):
                        g[k] = g[k] * ratio
                for s in _schedulers(trainer, opt):
                    for attr in _LR_LISTS:
                        values = getattr(s, attr, None)
                        if isinstance(values, list) and len(values) == len(opt.param_groups):
                            values[gi] = values[gi] * ratio
        counts: dict[int, int] = {}
        for opt in trainer.optimizers:
            for g in opt.param_groups:
                for p in g["params"]:
                    counts[id(p)] = counts.get(id(p), 0) + 1
        missing = [n for n, p in net.named_parameters() if n in self.schedule.delta and counts.get(id(p), 0) == 0]
        twice = [by_id[i] for i, c in counts.items() if c > 1 and i in by_id]
        if missing or twice:
            raise ScheduleError(
                "GradualUnfreeze: every parameter the schedule may thaw must be in exactly one optimizer group, "
                "created in configure_optimizers (visiontune.param_groups does that); "
                + (f"missing: {missing[:5]}" if missing else f"in several groups: {twice[:5]}")
            )


def _build_callback() -> type:
    from lightning.pytorch.callbacks import Callback

    cls = type("GradualUnfreeze", (_GradualUnfreezeLogic, Callback), {
        "__module__": __package__,  # the public path configs name: visiontune.schedule.GradualUnfreeze
        "__doc__": _GradualUnfreezeLogic.__doc__,
        "__qualname__": "GradualUnfreeze",
    })
    return cls


def __getattr__(name: str) -> Any:
    # The callback subclasses lightning's Callback: built on first use, so that importing this module
    # (done by every ``visiontune`` command to find its tools) does not import lightning.
    if name == "GradualUnfreeze":
        cls = _build_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
