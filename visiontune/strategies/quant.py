"""Frozen-base helpers for LoRA: convolutions with a substituted weight, and quantized frozen layers.

``QuantizedLinear`` / ``QuantizedConv2d`` hold a frozen weight as int8 codes with one scale per output
channel, or as packed 4-bit NF4 codes with one absmax per block of 64, and dequantise it on the fly
(``qlora``), in forward and again in backward, so no float copy outlives its use. :func:`conv_like` reproduces a
conv layer's padding rules (incl. timm's TF-'same') with another weight (LoRA's conv layers use it too).
LoRA's fused training nodes over these frozen layers live in :mod:`visiontune.strategies.lora_nodes`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StrategyError

__all__ = ["SUPPORTED_BITS", "QuantizedBase", "QuantizedConv2d", "QuantizedLinear", "conv_is_supported", "conv_like",
           "is_same_pad", "is_weight_standardized", "standardized_conv", "standardized_weight"]

SUPPORTED_BITS = (4, 8)
"""The bit widths a frozen weight can be quantized to (qlora's ``bits``): 4 (NF4) or 8 (int8)."""
_NF4_BLOCK = 64


# ------------------------------------------------------------------------------------ conv helpers
def conv_is_supported(conv: nn.Conv2d) -> bool:
    """Plain ``nn.Conv2d`` forward, or timm's dynamic-'same' ``Conv2dSame``: both are reproducible here."""
    return type(conv).forward is nn.Conv2d.forward or is_same_pad(conv)


def is_same_pad(conv: nn.Module) -> bool:
    """Whether ``conv`` pads dynamically, TF-'same' style (timm's ``Conv2dSame``, or a quantized copy of one)."""
    if isinstance(conv, QuantizedConv2d):
        return conv.same_pad
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(conv, Conv2dSame)


def conv_like(conv: nn.Module, same_pad: bool, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """Convolve like ``conv`` (stride, padding, dilation, padding mode, TF 'same') with another weight."""
    if same_pad:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], conv.kernel_size, conv.stride, conv.dilation):
            p = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((p // 2, p - p // 2))
        x = F.pad(x, (*pads[1], *pads[0]))
        return F.conv2d(x, weight, bias, conv.stride, 0, conv.dilation, groups)
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return F.conv2d(x, weight, bias, conv.stride, 0, conv.dilation, groups)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)


def is_channels_last(t: Tensor) -> bool:
    """Whether a 4-D tensor is laid out channels-last (NHWC) and not also plain contiguous."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def is_weight_standardized(conv: nn.Module) -> bool:
    """timm's weight-standardised convs (``StdConv2d``, ``ScaledStdConv2d`` and their ``Same`` forms: BiT,
    NF-nets): the forward convolves with ``gain·scale·(W − mean)/sqrt(var + eps)``, not ``W``."""
    try:
        from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(conv, (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame))


def standardized_weight(conv: nn.Conv2d) -> Tensor:
    """The weight a weight-standardised conv's forward uses (the same ``F.batch_norm`` expression as timm's)."""
    gain = getattr(conv, "gain", None)
    affine = None if gain is None else (gain * conv.scale).view(-1)
    return F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None, weight=affine, training=True,
                        momentum=0.0, eps=conv.eps).reshape_as(conv.weight)


@torch.no_grad()
def standardized_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain frozen conv (timm ``Conv2dSame`` for dynamic 'same' padding) computing what the weight-standardised
    ``conv`` computes: its weight is the standardised one. A frozen base standardises to the same weight every
    forward, so LoRA (and QLoRA, DoRA) adapt this weight, merge into it exactly and unload to a plain conv."""
    w = standardized_weight(conv)
    kw = dict(stride=conv.stride, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
              device=w.device, dtype=w.dtype)
    if getattr(conv, "same_pad", False):
        from timm.layers import Conv2dSame

        out: nn.Conv2d = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size, **kw)
    else:
        out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                        padding_mode=conv.padding_mode, **kw)
    out.weight.copy_(w)
    if conv.bias is not None:
        out.bias.copy_(conv.bias)
    return out.requires_grad_(False).train(conv.training)


# ------------------------------------------------------------------------------------ quantization
def _nf4_codebook() -> Tensor:
    """The 16 NF4 levels (QLoRA paper): normal quantiles, exact zero, scaled to [-1, 1]."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


class QuantizedBase(nn.Module):
    """Holds a frozen weight as int8 codes + per-channel scales, or packed NF4 codes + block absmax.

    The base of :class:`QuantizedLinear` and :class:`QuantizedConv2d` (what ``isinstance`` checks for a
    quantized frozen layer); ``dequantized_weight()`` gives the float weight back.
    """

    def forward(self, x: Tensor) -> Tensor:
        return _frozen_forward(self, x)

    def _frozen_op(self, x: Tensor, weight: Tensor) -> Tensor:  # the layer's op with a given weight
        raise NotImplementedError

    def _input_grad(self, grad: Tensor, x_shape: torch.Size, weight: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def _filled(self, out: nn.Module, weight: Tensor) -> nn.Module:
        """``out`` (a fresh float layer) holding ``weight`` and this layer's bias, frozen (``to_float``)."""
        out.weight.copy_(weight)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out.requires_grad_(False)

    def _store(self, weight: Tensor, bias: nn.Parameter | None, bits: int) -> None:
        self.bias = bias  # kept in float, frozen
        if bias is not None:
            bias.requires_grad_(False)
        if bits not in SUPPORTED_BITS:
            raise StrategyError(f"quantization to {bits} bits is not supported; use one of {list(SUPPORTED_BITS)}")
        self.bits = bits
        self.weight_shape = tuple(weight.shape)
        #: entries of the frozen weight this layer stores as codes: parameters it stood for (parameter counts)
        self.quantized_numel = math.prod(self.weight_shape)
        self.weight_dtype = weight.dtype
        w = weight.detach().float()
        if not torch.isfinite(w).all():
            raise StrategyError("cannot quantize a weight holding NaN/inf")
        if bits == 8:
            rows = w.reshape(w.shape[0], -1)
            scale = rows.abs().amax(dim=1) / 127.0
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            self.register_buffer("weight_q", torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8))
            self.register_buffer("weight_scale", scale)
            return
        flat = w.reshape(-1)
        flat = F.pad(flat, (0, (-flat.numel()) % _NF4_BLOCK)).view(-1, _NF4_BLOCK)
        absmax = flat.abs().amax(dim=1)
        absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        code = _nf4_codebook().to(w.device)
        idx = torch.bucketize(flat / absmax[:, None], (code[1:] + code[:-1]) / 2).reshape(-1).to(torch.uint8)
        self.register_buffer("weight_q", (idx[0::2] << 4) | idx[1::2])  # two 4-bit codes per byte
        self.register_buffer("weight_scale", absmax)
        self.register_buffer("nf4_code", code, persistent=False)

    def dequantized_weight(self) -> Tensor:
        """The frozen weight in float (its original dtype and shape), rebuilt from the codes."""
        if self.bits == 8:  # convert, then scale in place (a mixed int8 x float mul measured 3x slower)
            w = self.weight_q.to(self.weight_scale.dtype).mul_(self.weight_scale[:, None])
        else:  # one lookup per byte: a 256-row table of (high code, low code) level pairs
            pairs = torch.stack([self.nf4_code.repeat_interleave(16), self.nf4_code.repeat(16)], dim=1)
            w = pairs[self.weight_q.int()].view(-1, _NF4_BLOCK).mul_(self.weight_scale[:, None])
            w = w.view(-1)[: math.prod(self.weight_shape)]
        return w.reshape(self.weight_shape).to(self.weight_dtype)


class _FrozenQuantized(torch.autograd.Function):
    """``layer(x)`` with a weight dequantised in forward and again in backward, never kept in between.

    Plain ``F.linear(x, layer.dequantized_weight())`` saves the float weight for the input gradient, so
    every quantized layer's full-precision copy stays alive until backward: QLoRA would hold more memory
    than LoRA (codes + floats). The frozen layer is linear in ``x`` and its weight gets no gradient,
    so backward needs only the weight, which is rebuilt from the codes; nothing but ``x``'s shape is saved.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: "QuantizedBase") -> Tensor:  # type: ignore[override]
        ctx.layer, ctx.x_shape, ctx.channels_last = layer, x.shape, is_channels_last(x)
        with torch.no_grad():
            return layer._frozen_op(x, layer.dequantized_weight())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        gx = ctx.layer._input_grad(grad, ctx.x_shape, ctx.layer.dequantized_weight())
        # in the input's memory format: ``conv2d_input`` returns NCHW for 1×1 weights, and an NCHW gradient
        # made every BatchNorm backward after it take a slow mixed-format path (qlora 1.4-1.6x LoRA's step
        # on channels-last Lite0); a no-op when the format already matches
        return (gx.contiguous(memory_format=torch.channels_last) if ctx.channels_last else gx), None


def _frozen_forward(layer: "QuantizedBase", x: Tensor) -> Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenQuantized.apply(x, layer)
    return layer._frozen_op(x, layer.dequantized_weight())


class QuantizedLinear(QuantizedBase):
    """A frozen ``nn.Linear`` whose weight is stored quantized and dequantised in ``forward``.

    Args:
        linear: the layer to quantize (its bias is kept, frozen, in float).
        bits: 8 (int8 per output channel) or 4 (NF4 blocks of 64).

    Example:
        >>> q = QuantizedLinear(nn.Linear(64, 32), bits=8)
        >>> q(torch.randn(2, 64)).shape
        torch.Size([2, 32])
    """

    def __init__(self, linear: nn.Linear, bits: int = 8) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._store(linear.weight, linear.bias, bits)

    def _frozen_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)

    def _input_grad(self, grad: Tensor, x_shape: torch.Size, weight: Tensor) -> Tensor:
        return grad.matmul(weight.to(grad.dtype)).reshape(x_shape)

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantised weight."""
        w = self.dequantized_weight()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        return self._filled(out, w)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class QuantizedConv2d(QuantizedBase):
    """A frozen ``nn.Conv2d`` (or timm ``Conv2dSame``) whose weight is stored quantized.

    Args:
        conv: the layer to quantize; stride, padding (incl. TF 'same'), dilation and groups are kept.
        bits: 8 (int8 per output channel) or 4 (NF4 blocks of 64).

    Example:
        >>> q = QuantizedConv2d(nn.Conv2d(8, 16, 3, padding=1), bits=8)
        >>> q(torch.randn(1, 8, 5, 5)).shape
        torch.Size([1, 16, 5, 5])
    """

    def __init__(self, conv: nn.Conv2d, bits: int = 8) -> None:
        super().__init__()
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(conv, attr))
        self.same_pad = is_same_pad(conv)
        self._store(conv.weight, conv.bias, bits)

    def _frozen_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return conv_like(self, self.same_pad, x, weight, self.bias, self.groups)

    def _input_grad(self, grad: Tensor, x_shape: torch.Size, weight: Tensor) -> Tensor:
        weight = weight.to(grad.dtype)
        if not self.same_pad and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return torch.nn.grad.conv2d_input(x_shape, weight, grad, self.stride, self.padding, self.dilation,
                                              self.groups)
        # 'same' / reflect padding: the vector-Jacobian product of a map linear in x (any x will do)
        with torch.enable_grad():
            probe = torch.zeros(x_shape, dtype=grad.dtype, device=grad.device, requires_grad=True)
            (g,) = torch.autograd.grad(conv_like(self, self.same_pad, probe, weight, None, self.groups), probe, grad)
        return g

    def to_float(self) -> nn.Conv2d:
        """A plain conv (timm ``Conv2dSame`` where the original was one) holding the dequantised weight."""
        w = self.dequantized_weight()
        kw = dict(stride=self.stride, dilation=self.dilation, groups=self.groups, bias=self.bias is not None,
                  device=w.device, dtype=w.dtype)
        if self.same_pad:
            from timm.layers import Conv2dSame

            out: nn.Conv2d = Conv2dSame(self.in_channels, self.out_channels, self.kernel_size, **kw)
        else:
            out = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, padding=self.padding,
                            padding_mode=self.padding_mode, **kw)
        return self._filled(out, w)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, bits={self.bits}")
