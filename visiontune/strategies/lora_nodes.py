"""LoRA's training forward as single autograd nodes over a frozen base layer (float or quantized).

:func:`lora_linear` (Linear, incl. timm's fused qkv) and :func:`lora_pointwise` (1×1 dense convs): the
delta folded into the weight where that is cheaper than the thin products, no graph through the frozen
weight, and an input that is a GELU/SiLU/LayerNorm output rebuilt in backward from what that op's node keeps
anyway instead of being stored a second time. ``LoRALinear``/``LoRAQKVLinear``/``LoRAConv2d`` call them
when no dropout, PiSSA residual, autocast or trainable base weight is in effect.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quant import QuantizedBase

__all__ = ["lora_linear", "lora_pointwise"]


def _recomputable(x: Tensor) -> tuple[str, str, tuple[Tensor | None, ...]] | None:
    """How to rebuild ``x`` in backward from what the node that made it saves anyway, or ``None``.

    When ``x`` is the direct output of GELU or SiLU (their nodes keep the input ``h``) or of LayerNorm (its
    node keeps ``h``, the mean, ``1/std``, weight and bias), keeping those references costs no memory, and
    ``x`` itself need not be kept: it is recomputed when ``A``'s gradient needs it. In a ViT block this
    drops the stored inputs of ``qkv``, ``fc1`` (LayerNorm outputs) and ``fc2`` (the 4×-wide GELU output).
    """
    if _saved_tensor_hooks_active():  # checkpointing / offloading: reading another node's tensors would unpack them
        return None
    fn = x.grad_fn
    kind = type(fn).__name__ if fn is not None else ""
    try:
        if kind in ("GeluBackward0", "SiluBackward0"):
            return kind, getattr(fn, "_saved_approximate", "none"), (fn._saved_self,)
        if kind == "NativeLayerNormBackward0":
            return kind, "", (fn._saved_input, fn._saved_result1, fn._saved_result2, fn._saved_weight,
                              fn._saved_bias)
    except (AttributeError, RuntimeError):  # a build without these accessors, or tensors already freed
        return None
    return None


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are in effect (activation checkpointing, CPU offloading, ...). There, reading
    ``grad_fn._saved_*`` runs the unpack hook: a checkpointed block would be recomputed during the forward.
    Without the (private) query, assume they are."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError, RuntimeError):
        return True


def _recompute(kind: str, approximate: str, saved: tuple[Tensor | None, ...]) -> Tensor:
    """``x`` again from :func:`_recomputable`'s tensors (GELU/SiLU: the same kernel, so the same bits)."""
    if kind == "GeluBackward0":
        return F.gelu(saved[0], approximate=approximate)
    if kind == "SiluBackward0":
        return F.silu(saved[0])
    h, mean, rstd, weight, bias = saved  # LayerNorm: two full-size passes, (h·rstd − mean·rstd)·w + b
    x = torch.addcmul(-mean * rstd, h, rstd)
    if weight is not None:
        return x.mul_(weight) if bias is None else torch.addcmul(bias, x, weight)
    return x if bias is None else x.add_(bias)


class _LoRALinearFn(torch.autograd.Function):
    """``base(x) + (x·Aᵀ)·Bᵀ`` for a frozen Linear ``base`` as one node (``B`` already scaled).

    Many tokens (:func:`_merges`): forward and input gradient are one matmul each with ``W + B·A`` (rebuilt
    in backward, never stored). Few tokens: ``x·Aᵀ``, the base matmul and the thin product added into its
    output in place; the input gradient ``g·W`` with ``g·B·A`` accumulated in place. Either way the frozen
    weight gets no gradient and is not differentiated through. Saved: ``x`` (or, where ``x`` is a
    GELU/SiLU/LayerNorm output, the tensors that node keeps anyway: see :func:`_recomputable`), the thin
    ``x·Aᵀ`` (few tokens only), the factors and (float base) the weight by reference; a quantized base
    dequantises again in backward, as ``_FrozenQuantized`` does. The thin products are computed transposed,
    ``(R, tokens)`` (``A·xᵀ``, ``Bᵀ·gᵀ``, ``(A·xᵀ)·g``): with one MKL thread at ViT-S/224 sizes these
    layouts ran 1.4-6x faster than ``x·Aᵀ``, ``g·B``, ``gᵀ·h``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, a: Tensor, b: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        quantized = isinstance(base, QuantizedBase)
        w = base.dequantized_weight() if quantized else base.weight
        x2 = x.reshape(-1, x.shape[-1])
        ctx.merged = _merges(x2, w)
        ht = None
        if ctx.merged:  # one matmul with W + B·A
            wm = _merged(w, a, b, quantized)
            out = x2.mm(wm.t()) if base.bias is None else torch.addmm(base.bias, x2, wm.t())
        else:
            ht = a.mm(x2.t())  # (R, tokens)
            out = x2.mm(w.t()) if base.bias is None else torch.addmm(base.bias, x2, w.t())
            out.addmm_(ht.t(), b.t())
        ctx.base, ctx.x_shape = base, x.shape
        needs_x = ctx.needs_input_grad[1] or (ctx.merged and ctx.needs_input_grad[2])
        source = _recomputable(x) if needs_x else None
        ctx.source = None if source is None else source[:2]
        kept = () if not needs_x else (x2,) if source is None else source[2]
        ctx.save_for_backward(ht, a, b, None if quantized else w, *kept)
        return out  # 2-D: a view returned from here could not be modified in place (EVA's ``qkv += bias``)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        ht, a, b, w, *kept = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        ght = b.t().mm(g.t())  # (R, tokens)
        x = None
        if kept:
            x = kept[0] if ctx.source is None else _recompute(*ctx.source, tuple(kept))
            x = x.reshape(-1, x.shape[-1])
        ga = ght.mm(x) if ctx.needs_input_grad[1] else None
        gb = None
        if ctx.needs_input_grad[2]:
            gb = (a.mm(x.t()) if ht is None else ht).mm(g).t().contiguous()
        gx = None
        if ctx.needs_input_grad[0]:
            quantized = w is None
            w = ctx.base.dequantized_weight() if quantized else w
            if ctx.merged:
                gx = g.mm(_merged(w, a, b, quantized)).view(ctx.x_shape)
            else:
                gx = g.mm(w).addmm_(ght.t(), a).view(ctx.x_shape)
        return gx, ga, gb, None


def _merged(w: Tensor, a: Tensor, b: Tensor, in_place: bool) -> Tensor:
    """``W + B·A`` for a Linear or 1×1 conv weight; ``in_place`` for a quantized base's dequantised copy
    (fresh on every call), a new tensor for a float base's weight."""
    w2, a2, b2 = w.flatten(1), a.flatten(1), b.flatten(1)
    return (w2.addmm_(b2, a2) if in_place else torch.addmm(w2, b2, a2)).view_as(w)


def _records(*tensors: Tensor) -> bool:
    """Whether autograd records an op on these tensors: the fused nodes are for training only."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _merges(x2: Tensor, w: Tensor) -> bool:
    """Whether folding the delta into the weight is cheaper than the thin products: ``B·A`` and one matmul
    cost ``out·in·(R+1)`` extra multiply-adds against ``tokens·R·(in+out)`` for ``x·Aᵀ`` and its product with
    ``Bᵀ``, i.e. once the batch has more tokens than ``out·in / (in+out)`` (307 for a ViT-S ``fc1``)."""
    return x2.shape[0] * (w.shape[0] + w.shape[1]) >= w.shape[0] * w.shape[1]


def lora_linear(x: Tensor, base: nn.Module, a: Tensor, b: Tensor) -> Tensor:
    """``base(x) + (x·aᵀ)·bᵀ`` for a frozen ``nn.Linear`` or :class:`QuantizedLinear` ``base`` (``b`` scaled).

    With gradients: one fused autograd node (see ``_LoRALinearFn``); without (eval, no_grad): plain ops.

    Args:
        x: input, ``(..., in_features)``.
        base: the frozen layer.
        a: ``(R, in_features)`` down factor.
        b: ``(out_features, R)`` up factor, scaling included.

    Example:
        >>> base = nn.Linear(8, 4).requires_grad_(False)
        >>> a, b = torch.randn(2, 8), torch.randn(4, 2)
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(lora_linear(x, base, a, b), base(x) + (x @ a.t()) @ b.t(), atol=1e-5)
        True
    """
    if _records(x, a, b):
        out = _LoRALinearFn.apply(x, a, b, base)
        return out.view(*x.shape[:-1], out.shape[-1])
    return base(x) + F.linear(F.linear(x, a), b)


class _LoRAPointwiseFn(torch.autograd.Function):
    """A 1×1 conv's LoRA, ``base(x) + B(A(x))`` (``B`` scaled), as one conv with ``W + B·A``.

    Forward: one conv (the plain path runs three and adds two maps). Backward: the input gradient through
    ``W + B·A`` (one conv backward, no second input-sized gradient to add), ``h = A(x)`` recomputed (``rank``
    channels) for ``B``'s gradient and ``A``'s through ``B``. Saved: ``x`` (the base conv keeps it anyway
    on the plain path), the factors and (float base) the weight by reference.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, a: Tensor, b: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        quantized = isinstance(base, QuantizedBase)
        w = base.dequantized_weight() if quantized else base.weight
        ctx.base = base
        ctx.save_for_backward(x, a, b, None if quantized else w)
        return F.conv2d(x, _merged(w, a, b, quantized), base.bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, a, b, w = ctx.saved_tensors
        quantized = w is None
        w = ctx.base.dequantized_weight() if quantized else w
        gx = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = _conv_backward(grad, x, _merged(w, a, b, quantized), (True, False))[0]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            h = F.conv2d(x, a)
            gh, gb = _conv_backward(grad, h, b, (ctx.needs_input_grad[1], ctx.needs_input_grad[2]))
            ga = _conv_backward(gh, x, a, (False, True))[1] if ctx.needs_input_grad[1] else None
        return gx, ga, gb, None


def _conv_backward(grad: Tensor, x: Tensor, weight: Tensor, mask: tuple[bool, bool]) -> tuple[Tensor | None, ...]:
    """Input and/or weight gradient of a 1×1, stride-1, unpadded conv (in ``x``'s memory format)."""
    gi, gw, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                    [mask[0], mask[1], False])
    return gi, gw


def lora_pointwise(x: Tensor, base: nn.Module, a: Tensor, b: Tensor) -> Tensor:
    """``base(x) + conv(conv(x, a), b)`` for a frozen 1×1, stride-1, unpadded dense conv ``base`` (float or
    :class:`QuantizedConv2d`; ``b`` scaled) as one fused node (``_LoRAPointwiseFn``) when training;
    without gradients, plain convs.

    Args:
        x: input, ``(N, in_channels, H, W)`` (NCHW or channels-last: the output and gradients follow it).
        base: the frozen conv.
        a: ``(R, in_channels, 1, 1)`` down factor.
        b: ``(out_channels, R, 1, 1)`` up factor, scaling included.

    Example:
        >>> base = nn.Conv2d(6, 4, 1).requires_grad_(False)
        >>> a, b = torch.randn(2, 6, 1, 1, requires_grad=True), torch.randn(4, 2, 1, 1)
        >>> x = torch.randn(1, 6, 3, 3)
        >>> torch.allclose(lora_pointwise(x, base, a, b), base(x) + F.conv2d(F.conv2d(x, a), b), atol=1e-5)
        True
    """
    if _records(x, a, b):
        return _LoRAPointwiseFn.apply(x, a, b, base)
    return base(x) + F.conv2d(F.conv2d(x, a), b)
