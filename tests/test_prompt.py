"""VPT strategy: exact counts, exactly which tokens are inserted and dropped, gradients, refusals, config errors."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import timm
import torch
from torch import nn

from visiontune.strategies import StrategyError, apply_strategy, make_strategy_config, trainable_parameter_count
from visiontune.strategies.prompt import prompt_parameter_names

NUM_CLASSES = 5
DIM, DEPTH, PATCHES = 192, 12, 16  # vit_tiny at 32 px with 8 px patches: 4 x 4 patches
HEAD = DIM * NUM_CLASSES + NUM_CLASSES
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@functools.lru_cache(maxsize=None)
def _base(global_pool: str = "token", reg_tokens: int = 0) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        num_classes=NUM_CLASSES,
        global_pool=global_pool,
        reg_tokens=reg_tokens,
    ).eval()


def vit(global_pool: str = "token", reg_tokens: int = 0) -> nn.Module:
    return copy.deepcopy(_base(global_pool, reg_tokens))


@pytest.mark.parametrize(
    "opts,expected_body,names",
    [
        ({"length": 4}, 4 * DIM, ["blocks.0.prompt"]),
        ({"length": 10}, 10 * DIM, ["blocks.0.prompt"]),
        ({"length": 3, "deep": True}, DEPTH * 3 * DIM, [f"blocks.{i}.prompt" for i in range(DEPTH)]),
    ],
)
def test_trainable_count_exact(opts, expected_body, names):
    m = vit()
    apply_strategy(m, "vpt", opts)
    trainable, total = trainable_parameter_count(m)
    assert trainable == expected_body + HEAD
    assert total == sum(p.numel() for p in _base().parameters()) + expected_body
    assert prompt_parameter_names(m) == names
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(names) | {"head.weight", "head.bias"}
    assert all(m.get_parameter(n).shape == (1, opts["length"], DIM) for n in names)
    assert trainable_parameter_count(m)[0] == {4: 1733, 10: 2885, 3: 7877}[opts["length"]]  # hand-checked


def _reference(m: nn.Module, x: torch.Tensor, deep: bool) -> torch.Tensor:
    """Prompted forward written out by hand; ``blk.forward`` bypasses the strategy's hooks."""
    n = m.num_prefix_tokens
    h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
    blocks = list(m.blocks)

    def insert(h, prompt):
        return torch.cat([h[:, :n], prompt.expand(h.shape[0], -1, -1), h[:, n:]], dim=1)

    length = blocks[0].prompt.shape[1]
    if deep:
        for blk in blocks:
            h = blk.forward(insert(h, blk.prompt))
            h = torch.cat([h[:, :n], h[:, n + length :]], dim=1)  # this block's prompt outputs are dropped
    else:
        h = insert(h, blocks[0].prompt)
        for blk in blocks:
            h = blk.forward(h)
        h = torch.cat([h[:, :n], h[:, n + length :]], dim=1)
    return m.norm(h)


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("global_pool,reg_tokens", [("token", 0), ("avg", 0), ("token", 2)])
def test_prompts_inserted_after_prefix_and_dropped_before_head(deep, global_pool, reg_tokens):
    m = vit(global_pool, reg_tokens)
    apply_strategy(m, "vpt", {"length": 3, "deep": deep})
    n_prefix = 1 + reg_tokens
    assert m.num_prefix_tokens == n_prefix
    seen = {}
    m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.__setitem__("in0", args[0]))
    m.blocks[1].register_forward_pre_hook(lambda mod, args: seen.__setitem__("in1", args[0]))
    with torch.no_grad():
        feats = m.forward_features(X)
        logits = m.forward_head(feats)
        ref = _reference(m, X, deep)
    # What the blocks see: [prefix, 3 prompts, 16 patches] (hooks registered later see the inserted tokens).
    assert seen["in0"].shape == (2, n_prefix + 3 + PATCHES, DIM)
    assert torch.equal(seen["in0"][:, n_prefix : n_prefix + 3], m.blocks[0].prompt.expand(2, -1, -1))
    assert seen["in1"].shape == (2, n_prefix + 3 + PATCHES, DIM)
    if deep:  # block 1 sees its own prompts, not block 0's outputs at those positions
        assert torch.equal(seen["in1"][:, n_prefix : n_prefix + 3], m.blocks[1].prompt.expand(2, -1, -1))
    # What comes out: the base layout [prefix, 16 patches], equal to the hand-written forward.
    assert feats.shape == _base(global_pool, reg_tokens).forward_features(X).shape == (2, n_prefix + PATCHES, DIM)
    assert torch.equal(feats, ref)
    if global_pool == "avg":  # the mean runs over the 16 patch tokens only: no prefix, no prompts
        pooled = ref[:, n_prefix:].mean(1)
        torch.testing.assert_close(logits, m.head(m.fc_norm(pooled)), rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(logits, m.head(m.fc_norm(ref[:, 0])), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(m(X), logits)


def test_uniform_prompts_change_output_and_respect_bound():
    m = vit()
    apply_strategy(m, "vpt", {"length": 4})
    p = m.blocks[0].prompt
    bound = math.sqrt(6.0 / (3 * 8 * 8 + DIM))
    assert p.abs().max() <= bound and p.abs().max() > bound / 2
    with torch.no_grad():
        assert not torch.allclose(m(X), _base()(X), atol=1e-4)


@pytest.mark.parametrize("deep", [False, True])
def test_zero_prompts_shape_and_gradients_only_into_prompts_and_head(deep):
    m = vit().train()
    apply_strategy(m, "vpt", {"length": 2, "init": "zeros", "deep": deep})
    assert all(m.get_parameter(n).abs().sum() == 0 for n in prompt_parameter_names(m))
    out = m(X)
    assert out.shape == (2, NUM_CLASSES)
    out.logsumexp(1).sum().backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == set(prompt_parameter_names(m)) | {"head.weight", "head.bias"}
    assert all(m.get_parameter(n).grad.abs().sum() > 0 for n in prompt_parameter_names(m))


def test_dropout_only_in_training():
    m = vit()
    apply_strategy(m, "vpt", {"length": 4, "dropout": 0.5})
    seen = []
    m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0][:, 1:5].clone()))
    with torch.no_grad():
        m.eval()(X)
        m.train()(X)
    prompt = m.blocks[0].prompt.detach().expand(2, -1, -1)
    assert torch.equal(seen[0], prompt)
    dropped = seen[1] == 0
    assert dropped.any() and torch.allclose(seen[1][~dropped], 2 * prompt[~dropped])


@pytest.mark.parametrize("deep", [False, True])
def test_deepcopy_and_grad_checkpointing_keep_prompts(deep):
    m = vit()
    apply_strategy(m, "vpt", {"length": 3, "deep": deep})
    with torch.no_grad():
        y = m(X)
        assert torch.equal(copy.deepcopy(m)(X), y)
    m.set_grad_checkpointing(True)
    y2 = m(X)
    torch.testing.assert_close(y2, y, rtol=0, atol=1e-6)
    y2.sum().backward()
    assert m.blocks[0].prompt.grad is not None


@pytest.mark.parametrize("name", ["resnet18", "tf_efficientnet_lite0"])
def test_vpt_refused_on_cnn(name):
    m = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    with pytest.raises(StrategyError) as exc:
        apply_strategy(m, "vpt", {})
    msg = str(exc.value)
    assert f"does not fit {type(m).__name__}" in msg
    assert "patch_embed" in msg and "ViT-style" in msg
    assert "adapter" in msg and "bitfit" in msg and "'vpt'" in msg.split(":")[0]
    assert not any("prompt" in n for n, _ in m.named_parameters())  # refused before adding anything


def test_applying_twice_refused():
    m = vit()
    apply_strategy(m, "vpt", {"length": 2})
    with pytest.raises(StrategyError, match="already has prompts"):
        apply_strategy(m, "vpt", {"length": 2})


@pytest.mark.parametrize(
    "opts,fragments",
    [
        ({"length": 0}, ["'length'", ">= 1", "0"]),
        ({"length": 2.5}, ["'length'", "integer"]),
        ({"length": True}, ["'length'"]),
        ({"deep": "yes"}, ["'deep'", "true or false"]),
        ({"dropout": 1.0}, ["'dropout'", "[0, 1)"]),
        ({"dropout": -0.1}, ["'dropout'", "[0, 1)"]),
        ({"init": "normal"}, ["'init'", "'uniform'", "'zeros'", "'normal'"]),
        ({"tokens": 4}, ["Unknown option", "'tokens'", "length"]),
    ],
)
def test_bad_config_messages(opts, fragments):
    with pytest.raises(StrategyError) as exc:
        make_strategy_config("vpt", opts)
    for frag in fragments:
        assert frag in str(exc.value)


# ------------------------------------------------------------------------------- EVA, BEiT, refusals
def test_vpt_on_eva_equals_register_tokens_that_rope_skips():
    """Shallow VPT on EVA (rotary embeddings on the patches) is exactly EVA with register tokens holding the
    prompts: the prompts count as prefix tokens of its attention, so rope still meets only the patches."""
    kw = dict(img_size=28, depth=2, num_classes=3, no_embed_class=True)
    torch.manual_seed(0)
    base = timm.create_model("eva02_tiny_patch14_224", **kw).eval()
    reg = timm.create_model("eva02_tiny_patch14_224", num_reg_tokens=3, **kw).eval()
    reg.load_state_dict(base.state_dict(), strict=False)
    apply_strategy(base, "vpt", {"length": 3})
    with torch.no_grad():
        reg.reg_token.copy_(base.blocks[0].prompt)
        x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
        ref = reg.forward_features(x)
        got = base.forward_features(x)
    assert base.blocks[0].attn.num_prefix_tokens == 1 + 3
    torch.testing.assert_close(got, torch.cat([ref[:, :1], ref[:, 4:]], dim=1), rtol=1e-5, atol=1e-5)


def test_beit_relative_position_bias_gets_zero_rows_for_the_prompts():
    from visiontune.strategies.prompt import _pad_bias

    bias = torch.arange(1.0, 10.0).view(1, 3, 3)
    padded = _pad_bias(bias, 1, 2)
    assert padded.shape == (1, 5, 5)
    assert torch.equal(padded[:, [0, 3, 4]][:, :, [0, 3, 4]], bias)
    assert not padded[:, 1:3].any() and not padded[:, :, 1:3].any()
    torch.manual_seed(0)
    net = timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                            num_classes=3)
    apply_strategy(net, "vpt", {"length": 2, "deep": True})
    out = net(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 3) and all(b.prompt.grad.abs().sum() > 0 for b in net.blocks)


@pytest.mark.parametrize("name, kwargs", [
    ("convit_tiny", {"img_size": 32, "patch_size": 8, "depth": 2, "local_up_to_layer": 1}),
    ("xcit_nano_12_p16_224", {"img_size": 32, "depth": 2}),
])
def test_vpt_refuses_blocks_that_do_not_take_more_tokens_and_leaves_the_model_as_it_was(name, kwargs):
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=3, **kwargs).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(StrategyError, match=rf"strategy 'vpt' does not fit {type(net).__name__}: its "):
        apply_strategy(net, "vpt", {"length": 2})
    assert net.state_dict().keys() == before.keys() and not prompt_parameter_names(net)
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in net.blocks)
    net(torch.randn(1, 3, 32, 32))  # still the base model
