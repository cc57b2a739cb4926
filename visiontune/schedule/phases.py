"""Schedule specifications: phases, group references, and their resolution onto a model's depth groups.

Used by :class:`visiontune.schedule.GradualUnfreeze` (which applies a resolved schedule during training)
and by ``visiontune schedule`` (:mod:`visiontune.schedule.tuning`). Group references and YAML format: see
:mod:`visiontune.schedule`. Imports nothing heavy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["Phase", "ResolvedSchedule", "ScheduleError", "auto_phases", "group_index", "group_names",
           "parse_phases", "resolve_schedule", "summarize_names"]

GroupRef = Union[int, str]
_KEYS = ("at_epoch", "at_step", "groups", "regex", "lr")


class ScheduleError(ConfigError):
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
        visiontune.schedule.phases.ScheduleError: phase 1: lr must be > 0, got 0
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


def summarize_names(names: Iterable[str], width: int = 60) -> str:
    """A short human summary of parameter names: their module prefixes at the deepest readable level
    (at most four), cut to ``width`` characters.

    Example:
        >>> summarize_names(["layer4.0.conv1.weight", "layer4.1.conv1.weight", "fc.weight", "fc.bias"])
        'layer4.0.conv1, layer4.1.conv1, fc'
    """
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
                         summarize_names(thaw, 48)))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def _groups_of(net: "nn.Module", coarse: bool, patterns: Optional[Sequence[str]]) -> list[list[str]]:
    from ..models.groups import GroupError, depth_groups

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
    from ..strategies import delta_parameter_names

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
    from ..strategies import delta_parameter_names

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
