"""LoRA layers: a frozen base layer (float or quantized) plus a trainable low-rank delta.

``LoRALinear``, ``LoRAQKVLinear`` (a fused qkv Linear, per-part deltas) and ``LoRAConv2d`` (dense, grouped
and depthwise convs, incl. timm's TF-'same' padding) share :class:`LoRALayer`: scaling, dropout, init,
merge / unmerge. Which layers get wrapped, and how a model is merged or unloaded, is in
:mod:`visiontune.strategies.lora`.

Example:
    >>> layer = LoRALinear(nn.Linear(8, 4), rank=2, alpha=4)
    >>> layer(torch.randn(3, 8)).shape
    torch.Size([3, 4])
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StrategyError
from .lora_nodes import lora_linear, lora_pointwise
from .quant import QuantizedBase, conv_is_supported, conv_like, is_same_pad

__all__ = ["LORA_INITS", "LoRAConv2d", "LoRALayer", "LoRALinear", "LoRAQKVLinear"]

#: Attributes of the wrapped Linear / Conv2d a LoRA layer answers for it.
_FORWARDED = frozenset({"in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride",
                        "padding", "dilation", "groups", "padding_mode"})

LORA_INITS = ("zero", "gaussian", "pissa")
"""How the factors start (LoRA's ``init`` option): ``lora_B`` zeros (the delta starts at 0), small gaussian noise,
or ``"pissa"``: A and B from the top singular vectors of the base weight (see :meth:`LoRALayer.init_pissa`)."""


# -------------------------------------------------------------------------------------- LoRA layers
class LoRALayer(nn.Module):
    """Base of the LoRA wrappers: frozen ``base_layer`` + trainable ``lora_A``/``lora_B``, merge/unmerge.

    Args:
        base_layer: the wrapped layer (frozen here).
        rank: rank of the delta.
        alpha: ``scaling = alpha / rank``.
        dropout: dropout on the delta's input.
        name: the layer's name in the model, used in error messages.

    Example:
        >>> layer = LoRALinear(nn.Linear(16, 8), rank=2, init="gaussian")
        >>> x = torch.randn(3, 16); y = layer(x)
        >>> layer.merge(); torch.allclose(layer(x), y, atol=1e-6)
        True
    """

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(
        self, base_layer: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, name: str = ""
    ) -> None:
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.layer_name = name or type(base_layer).__name__
        self.merged = False
        # PiSSA's principal part s·B0·A0 (frozen; None without PiSSA). Not saved: a function of the base weight.
        self.register_buffer("pissa_A0", None, persistent=False)
        self.register_buffer("pissa_B0", None, persistent=False)

    @property
    def quantized(self) -> bool:
        """Whether the frozen base weight is stored quantized (qlora)."""
        return isinstance(self.base_layer, QuantizedBase)

    # The wrapper stands where the layer stood: what timm reads of it (ConViT's ``self.qk.weight.device``,
    # ``qkv.in_features``, a conv's ``out_channels``) reads the base layer. Reading ``.weight`` to compute with it
    # would skip the delta: :func:`visiontune.strategies.lora_select.check_called` refuses such layers.
    @property
    def weight(self) -> Tensor:
        """The frozen base weight (dequantised for qlora), not the adapted one."""
        return self._base_weight()

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if name in _FORWARDED and base is not None:
                return getattr(base, name)
            raise

    def _base_weight(self) -> Tensor:
        base = self.base_layer
        return base.dequantized_weight() if isinstance(base, QuantizedBase) else base.weight

    def _reset(self, init: str) -> None:
        # A as nn.Linear/nn.Conv2d initialise their weights (PEFT does the same); B decides the start.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init == "zero":
            nn.init.zeros_(self.lora_B)
        elif init == "gaussian":
            nn.init.normal_(self.lora_B, std=0.02)
        elif init == "pissa":
            self.init_pissa()
        else:
            raise StrategyError(f"option 'init' must be one of {list(LORA_INITS)}, got {init!r}")

    def _delta(self, a: Tensor, b: Tensor) -> Tensor:
        """``scaling · b·a`` shaped like the base weight, for factors shaped like ``lora_A`` / ``lora_B``."""
        raise NotImplementedError

    def _blocks(self, w: Tensor, a: Tensor, b: Tensor) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
        """(weight matrix, A view, B view) per independently factored block of the weight."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """``scaling · B·A`` shaped like the base weight (only for merging; the forward never builds it);
        PiSSA: ``scaling · (B·A − B0·A0)``, the change from the base weight."""
        delta = self._delta(self.lora_A, self.lora_B)
        return delta if self.pissa_A0 is None else delta - self._delta(self.pissa_A0, self.pissa_B0)

    @torch.no_grad()
    def init_pissa(self) -> None:
        """PiSSA init: per block, ``W = U S Vᵀ`` → ``B = U_r·sqrt(S_r/s)``, ``A = sqrt(S_r/s)·V_rᵀ`` (so
        ``s·B·A`` is the rank-r principal part, as in HF PEFT). The frozen part computes with the residual
        ``W − s·B0·A0`` (``B0``, ``A0``: these initial factors), so the layer starts as the base layer; the stored
        base weight stays the pristine one, so deltas and base hashes are unchanged."""
        if self.quantized:
            raise StrategyError(f"LoRA layer {self.layer_name!r}: init='pissa' needs a float base weight (not qlora)")
        w = self._base_weight().detach()
        for block, a, b in self._blocks(w, self.lora_A, self.lora_B):
            u, s, vh = torch.linalg.svd(block.float(), full_matrices=False)
            r = a.shape[0]
            if r > s.numel():
                raise StrategyError(f"LoRA layer {self.layer_name!r}: init='pissa' needs rank <= {s.numel()}, got {r}")
            sr = (s[:r] / self.scaling).sqrt()
            a.copy_((sr[:, None] * vh[:r]).to(a.dtype))
            b.copy_((u[:, :r] * sr).to(b.dtype))
        self.pissa_A0, self.pissa_B0 = self.lora_A.detach().clone(), self.lora_B.detach().clone()

    def layer_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The base layer's operation (linear or its convolution) with another weight and bias."""
        raise NotImplementedError

    def _fused(self, x: Tensor) -> bool:
        """Whether the forward may run as one fused node: no dropout in effect, no PiSSA residual, no
        autocast and the factors' dtype (the fused ops do not cast), and a frozen base layer (the node gives
        its weight and bias no gradient: a schedule that unfreezes them takes the plain ops)."""
        return ((not self.training or not isinstance(self.lora_dropout, nn.Dropout)) and self.pissa_A0 is None
                and not torch.is_autocast_enabled(x.device.type) and x.dtype == self.lora_A.dtype
                and not any(p.requires_grad for p in self.base_layer.parameters()))

    def _frozen(self, x: Tensor) -> Tensor:
        """The frozen part of the output: the base layer (PiSSA: with the residual weight ``W − s·B0·A0``)."""
        if self.pissa_A0 is None or self.merged:
            return self.base_layer(x)
        w = self._base_weight() - self._delta(self.pissa_A0, self.pissa_B0)
        return self.layer_op(x, w, self.base_layer.bias)

    def merged_weight(self) -> Tensor:
        """Base weight + delta, as a new tensor (the model is not changed)."""
        w = self._base_weight()
        return w.detach() + self.delta_weight().detach().to(w.dtype)

    def _check_mergeable(self, safe: bool) -> None:
        if self.quantized:
            raise StrategyError(
                f"LoRA layer {self.layer_name!r}: its base weight is quantized, so it cannot be merged in place "
                "(and unmerged exactly); use merge_and_unload(model) for a float model"
            )
        if safe and not torch.isfinite(self.merged_weight()).all():
            raise StrategyError(
                f"safe merge refused: LoRA layer {self.layer_name!r} would get non-finite (NaN/inf) weights; "
                "the model is unchanged"
            )

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Add the delta into the base weight; the forward then runs the base layer alone.

        Args:
            safe: check the merged weight is finite first and raise (naming the layer) if not.
        """
        if self.merged:
            return
        self._check_mergeable(safe)
        w = self.base_layer.weight
        w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the same delta again (exact inverse of :meth:`merge` up to float rounding)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False

    @torch.no_grad()
    def merged_module(self) -> nn.Module:
        """A plain layer with the delta baked in (float, frozen): the wrapper's export form."""
        if self.quantized:
            plain = self.base_layer.to_float()
            plain.weight.add_(self.delta_weight().to(plain.weight.dtype))
            return plain
        self.merge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """LoRA on an ``nn.Linear`` (or :class:`QuantizedLinear`): ``y = base(x) + scaling·(x Aᵀ) Bᵀ``.

    Parameters: ``rank·(in_features + out_features)``.

    Args:
        base_layer: the Linear to adapt.
        rank: rank of the delta.
        alpha: ``scaling = alpha / rank``.
        dropout: dropout on the delta's input.
        init: ``"zero"`` or ``"gaussian"`` (see :class:`LoRAConfig`).
        name: the layer's name in the model.

    Example:
        >>> layer = LoRALinear(nn.Linear(16, 8), rank=2)
        >>> layer.lora_A.shape, layer.lora_B.shape
        (torch.Size([2, 16]), torch.Size([8, 2]))
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        init: str = "zero",
        name: str = "",
    ) -> None:
        super().__init__(base_layer, rank, alpha, dropout, name)
        like = self._base_weight()
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, dtype=like.dtype, device=like.device))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, rank, dtype=like.dtype, device=like.device))
        self._reset(init)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self._frozen(x)
        # Two thin matmuls, the scaling on the small factor B; B·A is never formed, the frozen weight gets no
        # gradient; without dropout one fused node adds the delta into the base output in place.
        b = self.lora_B * self.scaling
        if self._fused(x):
            return lora_linear(x, self.base_layer, self.lora_A, b)
        return self._frozen(x) + F.linear(F.linear(self.lora_dropout(x), self.lora_A), b)

    def _delta(self, a: Tensor, b: Tensor) -> Tensor:
        return (b @ a) * self.scaling

    def _blocks(self, w: Tensor, a: Tensor, b: Tensor) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
        yield w, a, b

    def layer_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)


class LoRAQKVLinear(LoRALayer):
    """LoRA on a fused ``qkv`` Linear, treated as its three projections; only the chosen parts move.

    Each chosen part gets its own rank-``rank`` pair (as separate q/v projections would), so the output
    slices of the other parts are exactly the base layer's. Parameters: ``len(parts)·rank·(in + d)``
    with ``d = out_features / 3``.

    Args:
        base_layer: the fused Linear (``out_features`` divisible by 3, laid out q | k | v as in timm).
        rank: rank of each part's delta.
        alpha: ``scaling = alpha / rank``.
        parts: non-empty subset of ``"qkv"``.
        dropout: dropout on the delta's input.
        init: ``"zero"`` or ``"gaussian"``.
        name: the layer's name in the model.

    Example:
        >>> layer = LoRAQKVLinear(nn.Linear(8, 24), rank=2, alpha=4, parts="qv", init="gaussian")
        >>> x = torch.randn(2, 8)
        >>> torch.equal(layer(x)[:, 8:16], layer.base_layer(x)[:, 8:16])  # k untouched
        True
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int = 8,
        alpha: float = 16.0,
        parts: str = "qv",
        dropout: float = 0.0,
        init: str = "zero",
        name: str = "",
    ) -> None:
        super().__init__(base_layer, rank, alpha, dropout, name)
        if base_layer.out_features % 3:
            raise StrategyError(
                f"LoRA layer {self.layer_name!r}: a fused qkv Linear needs out_features divisible by 3, "
                f"got {base_layer.out_features}"
            )
        if not parts or set(parts) - set("qkv"):
            raise StrategyError(f"option 'qkv' must be a non-empty subset of 'qkv', got {parts!r}")
        self.parts = "".join(c for c in "qkv" if c in parts)
        self.part_dim = base_layer.out_features // 3
        like = self._base_weight()
        n = len(self.parts)
        self.lora_A = nn.Parameter(torch.empty(n * rank, base_layer.in_features, dtype=like.dtype, device=like.device))
        self.lora_B = nn.Parameter(torch.empty(n * self.part_dim, rank, dtype=like.dtype, device=like.device))
        self._reset(init)

    def _part_factors(self, a: Tensor | None = None, b: Tensor | None = None) -> Iterable[tuple[int, Tensor, Tensor]]:
        r, d = self.rank, self.part_dim
        a, b = self.lora_A if a is None else a, self.lora_B if b is None else b
        for j, c in enumerate(self.parts):
            yield "qkv".index(c), a[j * r : (j + 1) * r], b[j * d : (j + 1) * d]

    def _blocks(self, w: Tensor, a: Tensor, b: Tensor) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
        d = self.part_dim
        for i, pa, pb in self._part_factors(a, b):
            yield w[i * d : (i + 1) * d], pa, pb

    def layer_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self._frozen(x)
        # One thin matmul for every part's x·Aᵀ and one into the whole output with a zero-padded, scaled B
        # (rows of part i take columns of its rank block): no per-part slices, no concatenation.
        b = self._padded_b()
        if self._fused(x):
            return lora_linear(x, self.base_layer, self.lora_A, b)
        return self._frozen(x) + F.linear(F.linear(self.lora_dropout(x), self.lora_A), b)

    def _padded_b(self) -> Tensor:
        """``scaling · B`` as an ``(out_features, parts·rank)`` block matrix, zero outside each part's block."""
        r, d = self.rank, self.part_dim
        b = self.lora_B.new_zeros(3 * d, len(self.parts) * r)
        for i, pa, pb in self._part_factors():
            j = self.parts.index("qkv"[i])
            b[i * d : (i + 1) * d, j * r : (j + 1) * r] = pb * self.scaling
        return b

    def _delta(self, a: Tensor, b: Tensor) -> Tensor:
        d = self.part_dim
        delta = a.new_zeros(3 * d, a.shape[1])
        for i, pa, pb in self._part_factors(a, b):
            delta[i * d : (i + 1) * d] = (pb @ pa) * self.scaling
        return delta

    def extra_repr(self) -> str:
        return f"parts={self.parts!r}, " + super().extra_repr()


class LoRAConv2d(LoRALayer):
    """LoRA on an ``nn.Conv2d`` (plain or timm ``Conv2dSame``, dense, grouped or depthwise).

    ``lora_A`` has shape ``(rank, in/groups, kh, kw)``, ``lora_B`` ``(out, rank, 1, 1)``; parameters
    ``rank·(out + in/groups·kh·kw)``. Dense convs run A as a k×k conv (the layer's stride/padding) and B as
    a 1×1 conv beside the frozen base. Grouped convs use the delta weight ``B·A`` (as small as the layer,
    and group-structured): without dropout in a single conv with ``W + delta`` (one conv instead of two).

    Args:
        base_layer: the conv to adapt.
        rank: rank of the delta.
        alpha: ``scaling = alpha / rank``.
        dropout: dropout on the delta's input.
        init: ``"zero"`` or ``"gaussian"``.
        name: the layer's name in the model.

    Example:
        >>> layer = LoRAConv2d(nn.Conv2d(32, 32, 3, padding=1, groups=32), rank=4)
        >>> sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n)  # 4·(32 + 9) < 288
        164
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        init: str = "zero",
        name: str = "",
    ) -> None:
        super().__init__(base_layer, rank, alpha, dropout, name)
        if isinstance(base_layer, nn.Conv2d) and not conv_is_supported(base_layer):
            raise StrategyError(
                f"LoRA layer {self.layer_name!r}: {type(base_layer).__name__} has its own forward "
                "(a merged delta would not be exact); exclude it"
            )
        self.same_pad = is_same_pad(base_layer)
        like = self._base_weight()
        out, in_g, kh, kw = like.shape
        # a 1×1, stride-1, unpadded dense conv trains through one fused node (``lora_pointwise``)
        self.pointwise = ((kh, kw) == (1, 1) and tuple(base_layer.stride) == (1, 1) and base_layer.groups == 1
                          and (self.same_pad or base_layer.padding in ((0, 0), "same", "valid")))
        self.lora_A = nn.Parameter(torch.empty(rank, in_g, kh, kw, dtype=like.dtype, device=like.device))
        self.lora_B = nn.Parameter(torch.empty(out, rank, 1, 1, dtype=like.dtype, device=like.device))
        self._reset(init)

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        if self.merged:
            return base(x)
        if self.pointwise and self._fused(x):
            return lora_pointwise(x, base, self.lora_A, self.lora_B * self.scaling)
        if base.groups == 1:  # scaling on the small factor B; the delta added into the frozen output in place
            h = conv_like(base, self.same_pad, self.lora_dropout(x), self.lora_A, None, 1)
            return self._frozen(x).add_(F.conv2d(h, self.lora_B * self.scaling))
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            delta = self._delta(self.lora_A, self.lora_B)
            return self._frozen(x) + conv_like(base, self.same_pad, self.lora_dropout(x), delta, None, base.groups)
        # Grouped weights are tiny: one conv with W + delta beats a rank-expanded grouped conv pair.
        weight = self._base_weight() + self.delta_weight()
        return conv_like(base, self.same_pad, x, weight, base.bias, base.groups)

    def _delta(self, a: Tensor, b: Tensor) -> Tensor:
        return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:]) * self.scaling

    def _blocks(self, w: Tensor, a: Tensor, b: Tensor) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
        yield w.flatten(1), a.view(a.shape[0], -1), b.view(b.shape[0], -1)

    def layer_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return conv_like(self.base_layer, self.same_pad, x, weight, bias, self.base_layer.groups)


# --------------------------------------------------------------------------------- model surgery
