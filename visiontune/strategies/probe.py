"""Running a model once on a dummy image to see what its forward does: which modules it calls, with what shapes.

Strategies that edit a model by module name learn here what the names do not say: the adapter strategy sizes
its adapters from the output shapes (NCHW or NHWC maps, tokens), the LoRA family checks that every layer it
wraps is really called (a layer whose weight timm reads directly, ``F.linear(x, self.qkv.weight, ...)``, would
silently ignore its LoRA delta). One forward in eval mode under ``no_grad`` (no BatchNorm statistics move; train
modes are restored), at the first input size the model accepts: its own (``patch_embed.img_size``,
``img_size``), then 64, 32 and ``pretrained_cfg['input_size']`` px.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 64 * 64, 2))
    >>> shapes = probe(net, [net[0], net[2]], strategy="adapter")
    >>> shapes[id(net[0])]
    (torch.Size([1, 3, 64, 64]), torch.Size([1, 4, 64, 64]))
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .base import StrategyError

__all__ = ["Shapes", "probe", "probe_sizes"]

#: (input shape, output shape) of a module in a probe forward (None: not a tensor).
Shapes = tuple["torch.Size | None", "torch.Size | None"]


def _pair(size: Any) -> tuple[int, int] | None:
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return int(size[0]), int(size[1])
    return None


def probe_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """Input sizes to try, best first: the model's own, 64, 32, then its pretrained config's.

    Example:
        >>> probe_sizes(nn.Linear(2, 2))
        [(64, 64), (32, 32), (224, 224)]
    """
    own = [getattr(getattr(model, "patch_embed", None), "img_size", None), getattr(model, "img_size", None)]
    cfg = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
    sizes = [_pair(s) for s in (*own, 64, 32, tuple(cfg[-2:]))]
    return list(dict.fromkeys(s for s in sizes if s is not None))


def _in_chans(model: nn.Module) -> int:
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first_conv.in_channels if first_conv is not None else 3


def probe(model: nn.Module, modules: Sequence[nn.Module], *, strategy: str,
          sizes: Sequence[tuple[int, int]] | None = None) -> dict[int, Shapes]:
    """``{id(module): (input shape, output shape)}`` for each of ``modules`` that ``model``'s forward calls.

    A module the forward never calls is absent; a shape is None where the first input or the output is not a
    tensor. ``sizes``: the input sizes to try (default :func:`probe_sizes`). Raises a :class:`StrategyError`
    naming ``strategy`` and the model when no input size runs.
    """
    shapes: dict[int, Shapes] = {}

    def record(m: nn.Module, args: tuple, out: Any) -> None:
        first = args[0] if args else None
        shapes.setdefault(id(m), (first.shape if isinstance(first, torch.Tensor) else None,
                                  out.shape if isinstance(out, torch.Tensor) else None))

    ref = next(model.parameters(), None)
    like = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    handles = [m.register_forward_hook(record) for m in modules]
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no BatchNorm statistics move from the probe
    errors: list[str] = []
    try:
        for size in sizes or probe_sizes(model):
            shapes.clear()
            try:
                with torch.no_grad():
                    model(torch.zeros(1, _in_chans(model), *size, **like))
                return shapes
            except Exception as exc:  # noqa: BLE001 - some models only accept their native size
                errors.append(f"{size[0]}x{size[1]}: {type(exc).__name__}: {str(exc)[:200]}")
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    raise StrategyError(
        f"strategy {strategy!r} could not run {type(model).__name__} on a dummy image to check its layers "
        f"({'; '.join(errors)})"
    )
