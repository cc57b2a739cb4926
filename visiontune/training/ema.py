"""An exponential moving average of the trained weights: ``model.ema``, and FixMatch's EMA teacher
(``semi_supervised.ema``, :class:`visiontune.objectives.fixmatch.FixMatchState`), one implementation for both.

The EMA evaluates (validation, test, predict, best-checkpoint choice) and is what task deltas save: see
:meth:`visiontune.TransferClassifier.evaluated_net`; with FixMatch it also makes the pseudo-labels. The averaging
itself is :class:`visiontune.objectives.semisup_state.EMATeacher` (an exact ``lerp``: tensors the strategy never
trains stay bit-identical to the base, so a delta of the EMA loads onto the base), with the warm-up of
:func:`ema_decay` (``min(decay, (1 + n) / (10 + n))``), so that a short run is not dominated by the initial
weights, and one update per optimizer step (gradient accumulation repeats are skipped).

Why not ``timm.utils.ModelEmaV3``: its warm-up ``1 - (1 + s/gamma)^-power`` (gamma 9, power 1 is this curve) differs
from ``(1 + n) / (10 + n)`` in the last bit at some steps (``0.10000000000000009`` for ``0.1`` at the first), its
default starts with a copy (decay 0), and it averages ``state_dict()`` values, so a tensor shared under two names
(tied weights; timm's CoaT) moves twice per step; the averages here are bit-identical to before.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn

__all__ = ["WeightEMA", "ema_decay"]


def ema_decay(cfg_decay: float, num_updates: int) -> float:
    """The EMA decay used at update ``num_updates``: ``min(decay, (1 + n) / (10 + n))``.

    The warm-up (Mean Teacher, timm's ModelEma) lets the teacher follow the student early on; a fixed
    0.999 would keep ~74% of the initial weights after 300 steps, longer than a small run lasts.

    Example:
        >>> ema_decay(0.999, 0), round(ema_decay(0.999, 90), 3), ema_decay(0.999, 10**6)
        (0.1, 0.91, 0.999)
    """
    return min(float(cfg_decay), (1.0 + num_updates) / (10.0 + num_updates))



class WeightEMA:
    """EMA of a network's weights, updated once per optimizer step.

    Args:
        decay: the decay reached after the warm-up, in (0, 1), e.g. 0.999.

    Example:
        >>> import torch
        >>> net = nn.Linear(2, 2)
        >>> ema = WeightEMA(0.99)
        >>> ema.update(net, step=0)                # after each optimizer step
        >>> ema.module(torch.zeros(1, 2)).shape
        torch.Size([1, 2])
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.teacher: Any = None
        self.last_step = -1
        self._pending: Optional[Mapping[str, Any]] = None

    @property
    def module(self) -> nn.Module | None:
        """The averaged network (eval mode, no grad), or ``None`` before the first update."""
        return None if self.teacher is None else self.teacher.module

    @property
    def num_updates(self) -> int:
        """Updates done so far (a restored checkpoint's count too)."""
        if self.teacher is not None:
            return int(self.teacher.num_updates)
        return int((self._pending or {}).get("num_updates", 0))

    def ensure(self, net: nn.Module) -> nn.Module:
        """The average, on ``net``'s device: built from ``net`` if there is none yet (restoring a pending
        checkpoint state)."""
        if self.teacher is None:
            from ..objectives.semisup_state import EMATeacher

            self.teacher = EMATeacher(net, self.decay)
            if self._pending is not None:
                self.teacher.load_state_dict(self._pending)
                self._pending = None
        first = next(net.parameters(), None)
        average = self.teacher.module
        if first is not None and next(average.parameters()).device != first.device:
            average.to(first.device)
        return average

    def update(self, net: nn.Module, step: int) -> None:
        """Move the average toward ``net``; once per optimizer ``step`` (repeats are ignored)."""
        if step == self.last_step:
            return  # gradient accumulation: no optimizer step since the last update
        self.ensure(net)
        self.teacher.decay = ema_decay(self.decay, self.teacher.num_updates)
        self.teacher.update(net)
        self.last_step = int(step)

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "last_step", "teacher"}``: plain numbers and the average's tensors (``EMATeacher.state_dict``)."""
        teacher = self.teacher.state_dict() if self.teacher is not None else self._pending
        return {"decay": self.decay, "last_step": self.last_step, "teacher": teacher}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the average loads now, or when it is built (a missing teacher keeps it)."""
        self.last_step = int(state.get("last_step", -1))
        teacher = state.get("teacher")
        if teacher is None:
            return
        if self.teacher is not None:
            self.teacher.load_state_dict(teacher)
        else:
            self._pending = teacher
