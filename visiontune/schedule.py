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

``visiontune schedule --model.backbone NAME`` (:func:`visiontune.tuning.schedule_yaml`) prints a generated
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

BatchNorm: ``bn="frozen"`` keeps BatchNorm layers with frozen parameters in eval mode (running statistics
fixed) until their group thaws; ``bn="train"`` lets them update statistics; ``None`` follows the module's
``bn`` hyper-parameter (:class:`visiontune.TransferClassifier`), else ``"frozen"``.

With DDP, use ``strategy="ddp_find_unused_parameters_true"``: frozen parameters produce no gradient.

This module imports no heavy dependency until used (``visiontune --help`` stays fast).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Union

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

GroupRef = Union[int, str]
_KEYS = ("at_epoch", "at_step", "groups", "regex", "lr")


class ScheduleError(ValueError):
    """A bad schedule; the message names the phase (``"phase 2: ..."``)."""


# ---------------------------------------------------------------------------------------------- phases
@dataclass(frozen=True)
class Phase:
    """One phase of a schedule: from ``at`` (an epoch or a step) on, ``groups``/``regex`` are also trained.

    Args:
        at: the epoch (``unit="epoch"``) or optimizer step (``unit="step"``) the phase starts at.
        unit: ``"epoch"`` or ``"step"``.
        groups: depth-group references (see the module docstring).
        regex: regexes (``re.search``) over parameter names, thawed in addition to ``groups``.
        lr: this phase's peak learning rate for what it thaws; ``None`` keeps the model's (with
            ``layer_decay``).

    Example:
        >>> Phase(at=2, unit="epoch", groups=(-2,), lr=1e-4).to_dict()
        {'at_epoch': 2, 'groups': [-2], 'lr': 0.0001}
    """

    at: int
    unit: Literal["epoch", "step"] = "epoch"
    groups: tuple[GroupRef, ...] = ()
    regex: tuple[str, ...] = ()
    lr: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {f"at_{self.unit}": self.at}
        if self.groups:
            d["groups"] = list(self.groups)
        if self.regex:
            d["regex"] = self.regex[0] if len(self.regex) == 1 else list(self.regex)
        if self.lr is not None:
            d["lr"] = self.lr
        return d


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def parse_phases(phases: Sequence[Union[Mapping[str, Any], Phase]]) -> list[Phase]:
    """Validate a schedule given as dicts (YAML) and return :class:`Phase` objects.

    Checks what can be checked without a model: known keys, exactly one of ``at_epoch``/``at_step``
    (one unit for the whole schedule), phases in increasing order starting at 0, ``groups`` or ``regex``
    present, valid regexes, ``lr > 0``. Group existence is checked by :func:`resolve_schedule`.

    Args:
        phases: e.g. ``[{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 2, "groups": [-2], "lr": 1e-4}]``.

    Example:
        >>> [p.at for p in parse_phases([{"at_epoch": 0, "groups": "head"}, {"at_epoch": 3, "groups": [-2]}])]
        [0, 3]
        >>> parse_phases([{"at_epoch": 0, "groups": "head"}, {"at_epoch": 1, "groups": [-2], "lr": 0}])
        Traceback (most recent call last):
        ...
        visiontune.schedule.ScheduleError: phase 1: lr must be > 0, got 0
    """
    if isinstance(phases, (str, bytes, Mapping)) or not isinstance(phases, Sequence):
        raise ScheduleError(f"phases must be a list of phases, got {type(phases).__name__}")
    if not phases:
        raise ScheduleError("phases is empty: give at least one phase, e.g. {at_epoch: 0, groups: [head]}")
    out: list[Phase] = []
    for i, raw in enumerate(phases):
        where = f"phase {i}"
        if isinstance(raw, Phase):
            raw = raw.to_dict()
        if not isinstance(raw, Mapping):
            raise ScheduleError(f"{where}: must be a mapping like {{at_epoch: 0, groups: [head]}}, got {raw!r}")
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise ScheduleError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(_KEYS)}")
        units = [k for k in ("at_epoch", "at_step") if raw.get(k) is not None]
        if len(units) != 1:
            raise ScheduleError(f"{where}: give exactly one of at_epoch / at_step, got {units or 'neither'}")
        unit = units[0][3:]
        at = raw[units[0]]
        if isinstance(at, bool) or not isinstance(at, int) or at < 0:
            raise ScheduleError(f"{where}: at_{unit} must be an integer >= 0, got {at!r}")
        groups = _as_list(raw.get("groups"))
        for g in groups:
            if isinstance(g, bool) or not isinstance(g, (int, str)):
                raise ScheduleError(f"{where}: group {g!r} must be an index or a name (stem, block.N, head)")
        regex = _as_list(raw.get("regex"))
        for rx in regex:
            if not isinstance(rx, str):
                raise ScheduleError(f"{where}: regex {rx!r} must be a string")
            try:
                re.compile(rx)
            except re.error as exc:
                raise ScheduleError(f"{where}: regex {rx!r} is not a valid regular expression: {exc}") from exc
        if not groups and not regex:
            raise ScheduleError(f"{where}: says nothing to thaw: give groups (e.g. [-2]) and/or regex")
        lr = raw.get("lr")
        if lr is not None:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ScheduleError(f"{where}: lr must be > 0, got {lr!r}")
            lr = float(lr)
        if out:
            prev = out[-1]
            if unit != prev.unit:
                raise ScheduleError(
                    f"{where}: uses at_{unit} but phase {i - 1} uses at_{prev.unit}: use one unit for the schedule"
                )
            if at <= prev.at:
                raise ScheduleError(
                    f"{where}: at_{unit}={at} is not after phase {i - 1} (at_{unit}={prev.at}): "
                    "phases must be in increasing order"
                )
        elif at != 0:
            raise ScheduleError(
                f"{where}: the first phase must start at {unit} 0 (it says what trains from the start, "
                f"usually groups: [head]), got at_{unit}={at}"
            )
        out.append(Phase(at=at, unit=unit, groups=tuple(groups), regex=tuple(regex), lr=lr))  # type: ignore[arg-type]
    return out


# ---------------------------------------------------------------------------------------------- groups
def group_names(n: int) -> list[str]:
    """Names of ``n`` depth groups: ``stem``, ``block.0`` ... ``block.{n-3}``, ``head``.

    Example:
        >>> group_names(4)
        ['stem', 'block.0', 'block.1', 'head']
    """
    if n == 1:
        return ["head"]
    return ["stem", *(f"block.{i}" for i in range(n - 2)), "head"]


def group_index(ref: GroupRef, n: int) -> int:
    """Resolve a group reference (index, negative index, ``stem``/``block.N``/``head``) to ``0 .. n-1``.

    Args:
        ref: the reference (strings holding integers, as YAML may give them, work too).
        n: the number of depth groups (head included).

    Example:
        >>> group_index("head", 10), group_index(-2, 10), group_index("block.0", 10), group_index("3", 10)
        (9, 8, 1, 3)
    """
    valid = f"valid: 0..{n - 1} (0 = stem), -1..-{n} (-1 = head), stem, block.0..block.{max(n - 3, 0)}, head"
    value: Any = ref
    if isinstance(ref, str):
        s = ref.strip()
        if s == "stem":
            return 0
        if s == "head":
            return n - 1
        m = re.fullmatch(r"block\.(\d+)", s)
        if m:
            k = int(m.group(1))
            if k > n - 3:
                raise ScheduleError(f"group {ref!r} does not exist: the model has {n} depth groups; {valid}")
            return k + 1
        if not re.fullmatch(r"-?\d+", s):
            raise ScheduleError(f"group {ref!r} is not a group name or index; {valid}")
        value = int(s)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScheduleError(f"group {ref!r} is not a group name or index; {valid}")
    if not -n <= value < n:
        raise ScheduleError(f"group {ref!r} does not exist: the model has {n} depth groups; {valid}")
    return value % n


def _describe(names: Iterable[str], width: int = 60) -> str:
    """A short human summary of parameter names: their module prefixes at the deepest readable level."""
    modules = list(dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else n for n in names))
    if not modules:
        return "-"
    best = [modules[0].split(".")[0]]
    for depth in range(1, max(len(m.split(".")) for m in modules) + 1):
        level = list(dict.fromkeys(".".join(m.split(".")[:depth]) for m in modules))
        if len(level) > 4:
            break
        best = level
    text = ", ".join(best)
    return text if len(text) <= width else text[: width - 3] + "..."


@dataclass
class ResolvedSchedule:
    """A schedule bound to a network: which parameter names each phase thaws.

    Attributes:
        phases: the phases.
        groups: all parameter names per depth group, from the input (0) to the head (last).
        delta: parameter names the strategy may train (only these are ever thawed).
        thaw: per phase, the delta parameter names it thaws (not thawed by an earlier phase).
        phase_groups: per phase, the depth-group indexes it touches (for display).
    """

    phases: list[Phase]
    groups: list[list[str]]
    delta: frozenset[str]
    thaw: list[list[str]]
    phase_groups: list[list[int]] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return self.phases[0].unit

    def trainable(self, phase: int) -> set[str]:
        """Parameter names trainable during ``phase`` (everything thawed by phases ``0..phase``)."""
        return {n for names in self.thaw[: phase + 1] for n in names}

    def lrs(self) -> dict[str, float]:
        """Parameter name → the learning rate of the phase that thaws it (phases that set ``lr`` only)."""
        return {n: p.lr for p, names in zip(self.phases, self.thaw) if p.lr is not None for n in names}

    def never_thawed(self) -> list[str]:
        """Delta parameters no phase thaws (they stay frozen for the whole run)."""
        thawed = self.trainable(len(self.phases) - 1)
        return [n for g in self.groups for n in g if n in self.delta and n not in thawed]

    def phase_at(self, epoch: int, step: int) -> int:
        """The phase active at ``epoch`` / optimizer ``step`` (the last phase whose start is reached)."""
        now = epoch if self.unit == "epoch" else step
        return max(i for i, p in enumerate(self.phases) if p.at <= now)

    def describe(self) -> str:
        """A table of phases: start, groups, parameter count, LR.

        Example:
            >>> print(resolved.describe())  # doctest: +SKIP
            phase  at_epoch  groups         thaws  lr     layers
            0      0         head           1,539  -      fc
        """
        rows = [("phase", f"at_{self.unit}", "groups", "tensors", "lr", "layers")]
        n = len(self.groups)
        names = group_names(n)
        for i, (p, thaw) in enumerate(zip(self.phases, self.thaw)):
            gs = ",".join(names[g] if g in (0, n - 1) else str(g - n) for g in self.phase_groups[i]) or "-"
            rows.append((str(i), str(p.at), gs, f"{len(thaw):,}", "-" if p.lr is None else f"{p.lr:g}",
                         _describe(thaw, 48)))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def _groups_of(net: "nn.Module", coarse: bool, patterns: Optional[Sequence[str]]) -> list[list[str]]:
    from .groups import GroupError, depth_groups

    try:
        return depth_groups(net, coarse=coarse, patterns=patterns)
    except GroupError as exc:
        raise ScheduleError(f"group_patterns: {exc}") from exc


def resolve_schedule(
    net: "nn.Module",
    phases: Sequence[Union[Mapping[str, Any], Phase]],
    *,
    coarse: bool = False,
    group_patterns: Optional[Sequence[str]] = None,
) -> ResolvedSchedule:
    """Bind a schedule to a network (after :func:`visiontune.apply_strategy`) and check it against it.

    Args:
        net: the timm model.
        phases: the phases (dicts or :class:`Phase`).
        coarse: use timm's coarse depth groups (stages instead of blocks).
        group_patterns: regexes overriding timm's depth groups (see :func:`visiontune.depth_groups`).

    Raises:
        ScheduleError: a group that does not exist, a regex that matches no parameter, or a phase that
            thaws nothing the strategy trains; the message names the phase.

    Example:
        >>> import timm
        >>> net = timm.create_model("resnet18", num_classes=3)
        >>> r = resolve_schedule(net, [{"at_epoch": 0, "groups": ["head"]}, {"at_epoch": 1, "groups": [-2]}])
        >>> r.thaw[0], len(r.thaw[1])
        (['fc.weight', 'fc.bias'], 6)
    """
    from .strategies import delta_parameter_names

    parsed = parse_phases(phases)
    groups = _groups_of(net, coarse, group_patterns)
    n = len(groups)
    delta = frozenset(delta_parameter_names(net))
    names = [nm for nm, _ in net.named_parameters()]
    order = {nm: i for i, nm in enumerate(names)}
    group_of = {nm: gi for gi, g in enumerate(groups) for nm in g}
    model = type(net).__name__
    strategy = getattr(getattr(net, "visiontune_strategy", None), "strategy_name", None)
    seen: set[str] = set()
    thaw: list[list[str]] = []
    touched: list[list[int]] = []
    for i, p in enumerate(parsed):
        chosen: set[str] = set()
        for ref in p.groups:
            try:
                gi = group_index(ref, n)
            except ScheduleError as exc:
                raise ScheduleError(f"phase {i}: {exc} ({model})") from None
            chosen.update(groups[gi])
        for rx in p.regex:
            hits = [nm for nm in names if re.search(rx, nm)]
            if not hits:
                raise ScheduleError(
                    f"phase {i}: regex {rx!r} matches no parameter of {model} "
                    f"(parameter names look like {names[0]!r}, {names[len(names) // 2]!r})"
                )
            chosen.update(hits)
        new = sorted((nm for nm in chosen if nm in delta and nm not in seen), key=order.__getitem__)
        if not new:
            why = "everything it selects was thawed by an earlier phase"
            if not any(nm in delta for nm in chosen):
                why = f"none of the {len(chosen)} parameters it selects is trained by strategy {strategy or '?'!r}"
            raise ScheduleError(f"phase {i}: thaws nothing: {why}")
        seen.update(new)
        thaw.append(new)
        touched.append(sorted({group_of[nm] for nm in new}))
    return ResolvedSchedule(parsed, groups, delta, thaw, touched)


def auto_phases(
    net: "nn.Module",
    *,
    every_n_epochs: int = 1,
    groups_per_phase: int = 1,
    coarse: bool = False,
    group_patterns: Optional[Sequence[str]] = None,
) -> list[dict[str, Any]]:
    """Generate the implicit schedule: the head at epoch 0, then ``groups_per_phase`` more depth groups
    (from the output towards the input) every ``every_n_epochs`` epochs.

    Groups holding nothing the strategy trains (e.g. a stem without LoRA layers) are skipped.

    Args:
        net: the timm model (after :func:`visiontune.apply_strategy`).
        every_n_epochs: epochs between phases.
        groups_per_phase: depth groups thawed by each phase after the first.
        coarse: timm's coarse depth groups (stages instead of blocks).
        group_patterns: regexes overriding timm's depth groups.

    Example:
        >>> import timm
        >>> auto_phases(timm.create_model("resnet18", num_classes=3), every_n_epochs=2, groups_per_phase=4,
        ...             coarse=True)
        [{'at_epoch': 0, 'groups': ['head']}, {'at_epoch': 2, 'groups': [-2, -3, -4, -5]}, {'at_epoch': 4, 'groups': [-6]}]
    """
    from .strategies import delta_parameter_names

    for option, value in (("every_n_epochs", every_n_epochs), ("groups_per_phase", groups_per_phase)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{option} must be an integer >= 1, got {value!r}")
    groups = _groups_of(net, coarse, group_patterns)
    delta = delta_parameter_names(net)
    n = len(groups)
    body = [gi - n for gi in range(n - 2, -1, -1) if any(nm in delta for nm in groups[gi])]
    phases: list[dict[str, Any]] = [{"at_epoch": 0, "groups": ["head"]}]
    for k in range(0, len(body), groups_per_phase):
        phases.append({"at_epoch": (k // groups_per_phase + 1) * every_n_epochs,
                       "groups": body[k : k + groups_per_phase]})
    return phases


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
        bn: Optional[Literal["frozen", "train"]] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if phases is not None and (every_n_epochs is not None or groups_per_phase is not None):
            raise ScheduleError("give either phases (explicit) or every_n_epochs / groups_per_phase (implicit), not both")
        if bn not in (None, "frozen", "train"):
            raise ScheduleError(f"bn must be 'frozen', 'train' or None, got {bn!r}")
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
            print(f"GradualUnfreeze: {p.unit} {p.at}: phase {target} thaws {_describe(self.schedule.thaw[target])}"
                  f" ({len(self.schedule.thaw[target])} tensors); {trainable:,} parameters now train")

    def _sync_bn(self, pl_module: "L.LightningModule", net: "nn.Module") -> None:
        """BatchNorm modes for the current ``requires_grad`` state (only while the module trains)."""
        if not pl_module.training:
            return
        from torch.nn.modules.batchnorm import _BatchNorm

        for m in net.modules():
            if isinstance(m, _BatchNorm):
                frozen = not any(p.requires_grad for p in m.parameters(recurse=False))
                m.train(not (frozen and self._bn_policy == "frozen"))

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
        "__module__": __name__,
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
