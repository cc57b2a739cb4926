"""A prepared check for one NVIDIA GPU (< 5 minutes): LoRA vs HF PEFT vs full fine-tuning on ViT-B/16, bf16.

``vit_base_patch16_224`` (random init: nothing is downloaded), 224 px, batch 64, bf16 autocast, AdamW:

* ``full``: every parameter trains;
* ``lora``: visiontune LoRA rank 8 on each block's fused ``qkv`` (split-aware: one rank-8 pair for q and one
  for v) + the head;
* ``peft_lora``: HF PEFT's LoRA, rank 8, on the *same* ``qkv`` modules (one fused rank-8 pair: as many
  trainable parameters as visiontune's q + v pairs, checked) + the head, built as ``benchmarks/peft.py`` does.

Each case runs alone (built, ``--warmup`` steps, then ``--steps`` timed steps with a CUDA synchronize around
each; median): images/s and the peak of ``torch.cuda.max_memory_allocated`` over the timed steps (weights,
gradients, AdamW state and activations; the counter is reset after the warm-up). Then one
``TransferClassifier`` LoRA fit through Lightning with ``trainer.precision: bf16-mixed`` (a few steps on
in-memory tensors, timed per batch by a callback after the warm-up): images/s.

    python benchmarks/gpu.py              # on a machine with a CUDA GPU
    python benchmarks/gpu.py --dry-run    # the same code on CPU with a tiny ViT (checks the logic, seconds)

``RESULT`` lines: ``gpu_lora_vs_full_step`` (target < 1.0), ``gpu_lora_vs_peft_step`` (<= 1.05),
``gpu_lora_vs_peft_mem`` (<= 1.05), images/s per case and of the Lightning bf16-mixed fit (report).
Not in ``run_all.py`` (it needs a GPU); run it by hand and paste its lines into BENCHMARKS.md's notes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded: random init, no hub look-ups
# This folder holds peft.py: keep it off sys.path so that `import peft` finds HF PEFT.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]

CASES = ("full", "lora", "peft_lora")


@dataclass(frozen=True)
class Setup:
    backbone: str
    backbone_args: dict
    size: int
    batch: int
    warmup: int
    steps: int
    device: str

    @property
    def autocast(self):
        import torch

        return torch.autocast(self.device, dtype=torch.bfloat16)


def settings(dry_run: bool, steps: int | None = None, warmup: int | None = None) -> Setup:
    """The full GPU check, or (``dry_run``) the same code on CPU with a tiny ViT."""
    if dry_run:
        return Setup("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 32, 4,
                     warmup or 1, steps or 2, "cpu")
    return Setup("vit_base_patch16_224", {}, 224, 64, warmup or 5, steps or 20, "cuda")


def lora_config():
    from visiontune.strategies.lora import LoRAConfig

    return LoRAConfig(rank=8, alpha=16.0, targets=[r"attn\.qkv$"], qkv="qv")


def build_case(case: str, s: Setup):
    """The network of one case on ``s.device``, its trainable parameter count, and AdamW over them."""
    import timm
    import torch

    from visiontune.strategies import apply_strategy
    from visiontune.strategies.base import head_parameter_names
    from visiontune.strategies.lora import lora_targets

    torch.manual_seed(0)
    net = timm.create_model(s.backbone, pretrained=False, num_classes=10, **s.backbone_args)
    if case == "lora":
        apply_strategy(net, lora_config())
    elif case == "peft_lora":
        import peft

        cfg = lora_config()
        pattern = "^(" + "|".join(t.replace(".", r"\.") for t in lora_targets(net, cfg)) + ")$"
        net = peft.inject_adapter_in_model(
            peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=pattern), net)
        head = set(head_parameter_names(net))
        for n, p in net.named_parameters():
            p.requires_grad_("lora_" in n or n in head)
    elif case != "full":
        raise ValueError(f"unknown case {case!r}; known: {CASES}")
    net = net.to(s.device).train()
    params = [p for p in net.parameters() if p.requires_grad]
    return net, sum(p.numel() for p in params), torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_case(case: str, s: Setup) -> dict:
    """Warm-up, then timed steps: median step seconds, images/s, peak allocated memory (CUDA; NaN on CPU)."""
    import torch
    import torch.nn.functional as F

    net, trainable, opt = build_case(case, s)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.batch, 3, s.size, s.size, generator=g).to(s.device)
    y = torch.randint(0, 10, (s.batch,), generator=g).to(s.device)
    times = []
    for i in range(s.warmup + s.steps):
        if i == s.warmup and s.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(s.device)
        t0 = time.perf_counter()
        with s.autocast:
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(s.device)
        if i >= s.warmup:
            times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss.detach()).item():
        raise RuntimeError(f"{case}: the loss is not finite ({loss.item()})")
    peak = torch.cuda.max_memory_allocated() / 2**20 if s.device == "cuda" else float("nan")
    step = statistics.median(times)
    del net, opt, x, y
    if s.device == "cuda":
        torch.cuda.empty_cache()
    return {"case": case, "trainable": trainable, "step_s": step, "images_per_s": s.batch / step,
            "peak_mem_mb": peak}


def lightning_fit(s: Setup) -> dict:
    """One ``TransferClassifier`` LoRA fit with ``precision="bf16-mixed"``: images/s per batch after the warm-up."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from visiontune import TransferClassifier

    class BatchTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            _sync(s.device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _sync(s.device)
            self.times.append(time.perf_counter() - self.t0)

    torch.manual_seed(0)
    model = TransferClassifier(s.backbone, weights=None, num_classes=10, strategy="lora",
                               strategy_args={"targets": [r"attn\.qkv$"]}, backbone_args=s.backbone_args)
    n = s.warmup + s.steps
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n * s.batch, 3, s.size, s.size, generator=g),
                         torch.randint(0, 10, (n * s.batch,), generator=g))
    loader = DataLoader(data, batch_size=s.batch, shuffle=False, pin_memory=s.device == "cuda")
    timer = BatchTimer()
    trainer = L.Trainer(accelerator="gpu" if s.device == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        max_steps=n, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer],
                        default_root_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "visiontune_gpu_check"))
    trainer.fit(model, train_dataloaders=loader)
    if len(timer.times) != n:
        raise RuntimeError(f"lightning fit ran {len(timer.times)} steps, expected {n}")
    step = statistics.median(timer.times[s.warmup:])
    return {"step_s": step, "images_per_s": s.batch / step, "precision": trainer.precision}


def ratios(rows: dict[str, dict]) -> dict[str, float]:
    """lora / full step time, lora / peft step time and lora / peft peak memory."""
    lora, full, peft_ = rows["lora"], rows["full"], rows["peft_lora"]
    return {"gpu_lora_vs_full_step": lora["step_s"] / full["step_s"],
            "gpu_lora_vs_peft_step": lora["step_s"] / peft_["step_s"],
            "gpu_lora_vs_peft_mem": lora["peak_mem_mb"] / peft_["peak_mem_mb"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny ViT on CPU: check the logic, not the GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 20; dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; dry run 1)")
    args = parser.parse_args(argv)
    import torch

    s = settings(args.dry_run, args.steps, args.warmup)
    if s.device == "cuda" and not torch.cuda.is_available():
        print("gpu.py: no CUDA device (use --dry-run to check the logic on CPU)", file=sys.stderr)
        return 2
    if s.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    t_start = time.perf_counter()
    rows = {}
    for case in CASES:
        rows[case] = run_case(case, s)
        r = rows[case]
        print(f"{case:10s} trainable {r['trainable']:>11,d}  {1000 * r['step_s']:8.1f} ms/step  "
              f"{r['images_per_s']:8.1f} img/s  peak {r['peak_mem_mb']:9.1f} MiB", flush=True)
    if rows["lora"]["trainable"] != rows["peft_lora"]["trainable"]:
        raise RuntimeError(f"trainable counts differ: lora {rows['lora']['trainable']:,} vs "
                           f"peft {rows['peft_lora']['trainable']:,}")
    fit = lightning_fit(s)
    note = "dry-run" if args.dry_run else f"{s.backbone} {s.size}px b{s.batch} bf16"
    for name, value in ratios(rows).items():
        target = "<1.0" if name == "gpu_lora_vs_full_step" else "<=1.05"
        print(f"RESULT {name} {value:.3f} {target} {note}")
    for case, r in rows.items():
        print(f"RESULT gpu_{case}_images_per_s {r['images_per_s']:.1f} report {note}")
    print(f"RESULT gpu_lightning_bf16_lora_images_per_s {fit['images_per_s']:.1f} report {note} "
          f"precision={fit['precision']}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
