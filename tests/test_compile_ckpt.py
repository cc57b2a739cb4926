"""``model.compile`` (torch.compile of the backbone, in place) and ``model.grad_checkpointing`` (timm's
activation checkpointing) on tiny models: same numbers as without, state-dict keys unchanged, checkpoints and
deltas interchangeable between compiled and eager models, bad values named."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch._dynamo.utils as dynamo_utils

from visiontune import ImageDataModule, TransferClassifier, load_delta, save_delta
from visiontune.errors import ConfigError, UserError

VIT = dict(backbone="vit_tiny_patch16_224", weights=None, num_classes=3,
           backbone_args={"img_size": 32, "patch_size": 8, "depth": 2})


def _model(depth: int = 2, **kw) -> TransferClassifier:
    torch.manual_seed(0)
    vit = {**VIT, "backbone_args": {**VIT["backbone_args"], "depth": depth}}
    return TransferClassifier(**{**vit, **kw})


def _loss_and_grads(model: TransferClassifier, x: torch.Tensor, y: torch.Tensor):
    model.train()
    loss = model.loss(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("strategy, args", [("full", {}), ("lora", {"init": "gaussian"})])
def test_grad_checkpointing_same_loss_and_gradients_and_recomputes_blocks(strategy, args):
    """Same loss and gradients to 1e-5 as without (with LoRA's frozen base too: a reentrant checkpoint would
    drop the adapters' gradients there), the flag reaches timm, and a block really runs again in backward."""
    plain = _model(strategy=strategy, strategy_args=args)
    ckpt = _model(strategy=strategy, strategy_args=args, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.net.grad_checkpointing is True and plain.net.grad_checkpointing is False
    calls = []
    # a pre-hook: the recomputation stops early once the backward has what it needs (no forward-hook call)
    ckpt.net.blocks[0].register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0])
    loss0, grads0 = _loss_and_grads(plain, x, y)
    loss1, grads1 = _loss_and_grads(ckpt, x, y)
    assert len(calls) == 2  # the forward, then its recomputation in the backward pass
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    assert grads1.keys() == grads0.keys() and len(grads0) > 0
    for name, grad in grads0.items():
        assert grad.abs().sum() > 0, name  # LoRA "gaussian" init: every trainable tensor gets a gradient
        torch.testing.assert_close(grads1[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_grad_checkpointing_on_a_model_without_it_names_option_and_model():
    with pytest.raises(ConfigError, match=r"model\.grad_checkpointing.*'convit_tiny'"):
        TransferClassifier("convit_tiny", weights=None, num_classes=2, grad_checkpointing=True,
                           backbone_args={"img_size": 32})


@pytest.mark.parametrize("kw, match", [
    ({"compile": "yes"}, r"model\.compile must be true or false, got 'yes'"),
    ({"grad_checkpointing": 1}, r"model\.grad_checkpointing must be true or false, got 1"),
    ({"compile": True, "strategy": "sparse"}, r"model\.compile does not work with strategy 'sparse'"),
    ({"compile": True, "strategy": "linear", "cache_features": True}, r"model\.compile does nothing with "
                                                                       r"model\.cache_features"),
])
def test_bad_values_are_config_errors_naming_the_option(kw, match):
    with pytest.raises(ConfigError, match=match) as err:
        _model(**kw)
    assert isinstance(err.value, UserError)


def test_compiled_fit_checkpoint_and_delta_load_uncompiled_with_the_same_logits(tmp_path):
    """A LoRA fit with compile on: state-dict keys unchanged (no ``_orig_mod.``), the compiled eval logits equal
    an eager copy's (1e-5), its checkpoint loads with compile off and its delta loads into an eager model."""
    L.seed_everything(0)
    model = _model(1, strategy="lora", compile=True)  # one block: compiling takes most of this test's time
    eager_keys = list(_model(1, strategy="lora").state_dict())
    assert list(model.state_dict()) == eager_keys and not any("_orig_mod" in k for k in eager_keys)
    rng = np.random.default_rng(0)
    data = ImageDataModule(train=(rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8), np.repeat(np.arange(3), 4)),
                           image_size=32, batch_size=4, num_workers=0)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    frames = dynamo_utils.counters["frames"]["ok"]
    trainer.fit(model, data)
    assert dynamo_utils.counters["frames"]["ok"] > frames  # the training step really ran compiled
    assert list(model.state_dict()) == eager_keys
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    eager = TransferClassifier.load(str(tmp_path / "m.ckpt"), compile=False)
    assert eager.net._compiled_call_impl is None and model.net._compiled_call_impl is not None
    save_delta(model, tmp_path / "task.safetensors")
    from_delta = _model(1, strategy="lora")  # same seed: the same random base the delta checks against
    load_delta(from_delta, tmp_path / "task.safetensors")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for m in (model, eager, from_delta):
        m.eval()
    with torch.no_grad():
        compiled_logits = model(x)
        torch.testing.assert_close(compiled_logits, eager(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled_logits, from_delta(x), rtol=1e-5, atol=1e-5)
    assert eager.hparams.compile is False and model.hparams.compile is True


def _script(name: str):
    """benchmarks/<name>.py, loaded by path."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"visiontune_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks the module up
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run_runs_every_case_on_cpu_and_prints_parsable_results(capsys):
    """benchmarks/gpu.py's CPU-side logic (no GPU here): every case, equal LoRA / PEFT trainable counts (it raises
    otherwise), the Lightning bf16-mixed fit, RESULT lines run_all.py parses; the real run's settings."""
    gpu = _script("gpu")
    full = gpu.settings(dry_run=False)
    assert (full.backbone, full.size, full.batch, full.device, full.backbone_args) == \
        ("vit_base_patch16_224", 224, 64, "cuda", {})
    assert gpu.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    results = {r["name"]: r for r in _script("run_all").parse_results(out)}
    assert list(results) == ["gpu_lora_vs_full_step", "gpu_lora_vs_peft_step", "gpu_lora_vs_peft_mem",
                             "gpu_full_images_per_s", "gpu_lora_images_per_s", "gpu_peft_lora_images_per_s",
                             "gpu_lightning_bf16_lora_images_per_s"]
    assert results["gpu_lightning_bf16_lora_images_per_s"]["value"] > 0
    assert "precision=bf16-mixed" in results["gpu_lightning_bf16_lora_images_per_s"]["note"]
    trainable = {line.split()[0]: line.split()[2] for line in out.splitlines() if " trainable " in line}
    assert trainable["lora"] == trainable["peft_lora"] != trainable["full"]
