"""The fused LoRA training forward (one autograd node, delta added in place) against plain autograd ops,
the zero-padded fused-qkv B, the one-pass dequantisation and the adapter's folded scale."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visiontune.strategies.adapter import Adapter
from visiontune.strategies.lora_layers import LoRAConv2d, LoRALinear, LoRAQKVLinear
from visiontune.strategies.lora_nodes import _merges, lora_linear
from visiontune.strategies.quant import QuantizedLinear


def _reference(layer, x):
    """The LoRA output from plain differentiable ops, per part for a fused qkv (no fused node, no padding)."""
    w = layer._base_weight()
    out = F.linear(x, w, layer.base_layer.bias)
    if isinstance(layer, LoRAQKVLinear):
        d = layer.part_dim
        pieces = list(out.split(d, dim=-1))
        for i, pa, pb in layer._part_factors():
            pieces[i] = pieces[i] + (x @ pa.t()) @ pb.t() * layer.scaling
        return torch.cat(pieces, dim=-1)
    return out + (x @ layer.lora_A.t()) @ layer.lora_B.t() * layer.scaling


def _grads(layer, x, fn):
    x = x.clone().requires_grad_(True)
    y = fn(layer, x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
    out = (y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)
    layer.lora_A.grad = layer.lora_B.grad = None
    return out


@pytest.mark.parametrize("rows", [10, 2])  # 10 tokens: the delta folded into the weight; 2: thin products
@pytest.mark.parametrize("kind", ["linear", "qkv-qv", "qkv-k", "q8", "q4", "nobias"])
def test_fused_forward_and_grads_match_plain_autograd(kind, rows):
    torch.manual_seed(0)
    if kind.startswith("qkv"):
        layer = LoRAQKVLinear(nn.Linear(12, 18), rank=2, alpha=3, parts=kind[4:], init="gaussian")
    else:
        base = nn.Linear(12, 6, bias=kind != "nobias")
        base = QuantizedLinear(base, bits=int(kind[1])) if kind[0] == "q" else base
        layer = LoRALinear(base, rank=3, alpha=5, init="gaussian")
    x = torch.randn(2, 5, 12)[:, : rows // 2]
    ref = _grads(layer, x, _reference)
    got = _grads(layer, x, lambda m, t: m(t))
    assert layer._fused(x)
    assert _merges(x.reshape(rows, 12), layer._base_weight()) == (rows == 10)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    if kind == "qkv-qv":  # k's output slice is exactly the base layer's
        assert torch.equal(got[0][..., 6:12], layer.base_layer(x)[..., 6:12])
    with torch.no_grad():  # the plain path (eval) gives the same output
        torch.testing.assert_close(layer.eval()(x), ref[0], rtol=1e-5, atol=1e-5)


def test_fused_node_with_frozen_input_and_factors_only_trainable():
    base = nn.Linear(8, 4).requires_grad_(False)
    a = torch.randn(2, 8, requires_grad=True)
    b = torch.randn(4, 2, requires_grad=True)
    x = torch.randn(3, 8)  # no gradient wanted for x: backward must not compute one
    lora_linear(x, base, a, b).sum().backward()
    g = torch.ones(3, 4)
    torch.testing.assert_close(b.grad, g.t() @ (x @ a.t()))
    torch.testing.assert_close(a.grad, (g @ b).t() @ x)
    assert base.weight.grad is None and x.grad is None


def test_dropout_in_training_takes_the_unfused_path():
    layer = LoRALinear(nn.Linear(8, 4), rank=2, dropout=0.5, init="gaussian").train()
    x = torch.randn(3, 8)
    assert not layer._fused(x)
    assert layer.eval()._fused(x)


def test_conv_delta_in_place_matches_plain_ops():
    torch.manual_seed(0)
    layer = LoRAConv2d(nn.Conv2d(4, 6, 3, padding=1), rank=2, alpha=3, init="gaussian")
    x = torch.randn(2, 4, 7, 7)
    ref = layer.base_layer(x) + F.conv2d(F.conv2d(x, layer.lora_A, padding=1), layer.lora_B) * layer.scaling
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def _old_nf4(q):
    """The NF4 dequantisation written out per code (high nibble first), as a reference."""
    idx = torch.stack([q.weight_q >> 4, q.weight_q & 15], dim=-1).reshape(-1, 64).long()
    w = (q.nf4_code[idx] * q.weight_scale[:, None]).reshape(-1)[: math.prod(q.weight_shape)]
    return w.reshape(q.weight_shape)


def test_one_pass_dequantisation_is_exact():
    torch.manual_seed(0)
    lin = nn.Linear(40, 7)  # 280 entries: a padded last NF4 block
    q4, q8 = QuantizedLinear(lin, bits=4), QuantizedLinear(lin, bits=8)
    assert torch.equal(q4.dequantized_weight(), _old_nf4(q4))
    assert torch.equal(q8.dequantized_weight(), q8.weight_q.float() * q8.weight_scale[:, None])
    assert (q8.dequantized_weight() - lin.weight).abs().max() <= q8.weight_scale.max() / 2 + 1e-7


@pytest.mark.parametrize("conv", [False, True])
def test_adapter_scale_folded_into_up(conv):
    torch.manual_seed(0)
    ad = Adapter(6, 3, scale=0.3, conv=conv)
    nn.init.normal_(ad.up.weight)
    nn.init.normal_(ad.up.bias)
    x = torch.randn(2, 6, 4, 4) if conv else torch.randn(2, 5, 6)
    torch.testing.assert_close(ad(x), ad.up(ad.act(ad.down(x))) * 0.3, rtol=1e-5, atol=1e-6)


def _kept_tensors(out: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor the autograd graph behind ``out`` keeps for backward (built-in nodes' ``_saved_*``, custom
    Functions' ``saved_tensors``), read without saved-tensor hooks (under which the node would not rebuild)."""
    seen, stack, kept = set(), [out.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        values = list(getattr(fn, "saved_tensors", None) or ())
        values += [getattr(fn, a) for a in dir(fn) if a.startswith("_saved_")]
        kept += [v for v in values if isinstance(v, torch.Tensor)]
        stack += [n for n, _ in fn.next_functions]
    return kept


_PRE_OPS = {
    "gelu": lambda h: F.gelu(h),
    "gelu-tanh": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,
    "layernorm": nn.LayerNorm(12),
    "layernorm-plain": nn.LayerNorm(12, elementwise_affine=False),
    "none": lambda h: h * 1.0,  # any other producer: the input itself is kept
}


@pytest.mark.parametrize("pre", sorted(_PRE_OPS))
def test_input_rebuilt_from_gelu_silu_layernorm_instead_of_kept(pre):
    """Where the layer's input is a GELU/SiLU/LayerNorm output, backward rebuilds it from the tensors that
    op's node keeps anyway: the same gradients as plain autograd, and the input itself is not saved."""
    torch.manual_seed(0)
    op = _PRE_OPS[pre]
    if isinstance(op, nn.LayerNorm) and op.elementwise_affine:
        nn.init.normal_(op.weight)
        nn.init.normal_(op.bias)
    layer = LoRALinear(nn.Linear(12, 6), rank=3, alpha=5, init="gaussian")
    h = torch.randn(2, 5, 12, requires_grad=True)
    g = torch.randn(2, 5, 6)
    u = op(h)
    y = layer(u)
    kept_input = any(t.data_ptr() == u.data_ptr() for t in _kept_tensors(y))
    assert kept_input == (pre == "none")
    got = torch.autograd.grad(y, (h, layer.lora_A, layer.lora_B), g)
    h_ref = h.detach().clone().requires_grad_(True)
    y_ref = _reference(layer, op(h_ref))
    ref = torch.autograd.grad(y_ref, (h_ref, layer.lora_A, layer.lora_B), g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_vit_lora_keeps_a_quarter_less_for_backward_with_the_same_gradients(monkeypatch):
    """A ViT with LoRA on every Linear: the qkv/fc1 inputs (LayerNorm outputs) and fc2's 4x-wide input
    (the GELU output) are not stored; gradients are identical to storing them."""
    import timm

    from visiontune.strategies import apply_strategy
    from visiontune.strategies import lora_nodes

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    apply_strategy(net, "lora", {"rank": 4, "init": "gaussian"})
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])

    def step() -> tuple[int, dict[str, torch.Tensor]]:
        weights = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
        net.zero_grad()
        loss = F.cross_entropy(net(x), y)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _kept_tensors(loss)
                    if t.untyped_storage().data_ptr() not in weights}  # activations: weights are kept by reference
        loss.backward()
        return sum(storages.values()), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    kept, grads = step()
    monkeypatch.setattr(lora_nodes, "_recomputable", lambda _x: None)
    kept_all, grads_all = step()
    assert grads.keys() == grads_all.keys() and len(grads) > 20
    for n in grads:
        torch.testing.assert_close(grads[n], grads_all[n], rtol=1e-5, atol=1e-7)
    assert kept < 0.75 * kept_all, (kept, kept_all)  # 0.66 measured; 1.0 when every input is kept


@pytest.mark.parametrize("kernel", [1, 3])
def test_quantized_conv_input_gradient_keeps_channels_last(kernel):
    """An NCHW upstream gradient (as from the head's pooling) into a quantized conv of a channels-last
    network: the input gradient comes back channels-last, like a float conv's, with the same values."""
    from visiontune.strategies.quant import QuantizedConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, kernel, padding=kernel // 2)
    q = QuantizedConv2d(conv, bits=8)
    x = torch.randn(2, 6, 5, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = q(x)
    g = torch.randn(y.shape)  # plain NCHW
    (gx,) = torch.autograd.grad(y, x, g)
    assert gx.is_contiguous(memory_format=torch.channels_last) and not gx.is_contiguous()
    x_ref = x.detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(F.conv2d(x_ref, q.dequantized_weight(), q.bias, padding=kernel // 2), x_ref, g)
    torch.testing.assert_close(gx, ref, rtol=1e-5, atol=1e-6)


def test_unfrozen_base_layer_takes_the_plain_path_and_gets_gradients():
    """The fused node gives the base weight and bias no gradient, so a base that trains (a schedule
    unfreezing it) must run the plain ops: its gradients are autograd's."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 6), rank=3, init="gaussian")
    x = torch.randn(4, 12)
    assert layer._fused(x)
    layer.base_layer.requires_grad_(True)
    assert not layer._fused(x)
    g = torch.randn(4, 6)
    layer(x).backward(g)
    torch.testing.assert_close(layer.base_layer.weight.grad, g.t() @ x)
    torch.testing.assert_close(layer.base_layer.bias.grad, g.sum(0))


@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_fused_node_matches_plain_conv_ops(channels_last, bits):
    """A 1×1 conv's LoRA trains through one node (one conv with W + B·A): the same output and gradients as
    the three plain convs, in the input's memory format; a 3×3 conv keeps the plain path."""
    from visiontune.strategies.quant import QuantizedConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 1)
    base = QuantizedConv2d(conv, bits=bits) if bits else conv
    layer = LoRAConv2d(base, rank=3, alpha=5, init="gaussian")
    assert layer.pointwise and not LoRAConv2d(nn.Conv2d(6, 10, 3, padding=1), rank=3).pointwise
    x = torch.randn(2, 6, 5, 4)
    x = (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_(True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_LoRAPointwiseFnBackward"
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    g = torch.randn(y.shape)
    got = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), g)
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = (F.conv2d(x_ref, layer._base_weight(), base.bias)
             + F.conv2d(F.conv2d(x_ref, layer.lora_A), layer.lora_B) * layer.scaling)
    ref = torch.autograd.grad(y_ref, (x_ref, layer.lora_A, layer.lora_B), g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation: plain ops, same output
        torch.testing.assert_close(layer(x), y_ref, rtol=1e-5, atol=1e-5)
