"""An exponential moving average of the trained weights, for supervised training (``model.ema``).

The EMA evaluates (validation, test, predict, best-checkpoint choice) and is what task deltas save: see
:meth:`visiontune.TransferClassifier.evaluated_net`. The averaging itself is
:class:`visiontune.objectives.semisup_state.EMATeacher` (an exact ``lerp``: tensors the strategy never trains stay
bit-identical to the base, so a delta of the EMA loads onto the base), with the warm-up of
:func:`ema_decay` (``min(decay, (1 + n) / (10 + n))``), so that a short run is not
dominated by the initial weights.
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

    def ensure(self, net: nn.Module) -> nn.Module:
        """Build the average from ``net`` if there is none yet (restoring a pending checkpoint state)."""
        if self.teacher is None:
            from ..objectives.semisup_state import EMATeacher

            self.teacher = EMATeacher(net, self.decay)
            if self._pending is not None:
                self.teacher.load_state_dict(self._pending)
                self._pending = None
        return self.teacher.module

    def update(self, net: nn.Module, step: int) -> None:
        """Move the average toward ``net``; once per optimizer ``step`` (repeats are ignored)."""
        if step == self.last_step:
            return  # gradient accumulation: no optimizer step since the last update
        self.ensure(net)
        self.teacher.decay = ema_decay(self.decay, self.teacher.num_updates)
        self.teacher.update(net)
        self.last_step = int(step)

    def state_dict(self) -> dict[str, Any]:
        teacher = self.teacher.state_dict() if self.teacher is not None else self._pending
        return {"decay": self.decay, "last_step": self.last_step, "teacher": teacher}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_step = int(state.get("last_step", -1))
        teacher = state.get("teacher")
        if teacher is None:
            return
        if self.teacher is not None:
            self.teacher.load_state_dict(teacher)
        else:
            self._pending = teacher
