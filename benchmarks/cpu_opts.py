"""CPU options, measured before being kept: channels_last, inference_mode evaluation, bf16 autocast.

``tf_efficientnet_lite0`` (offline weights), batch 32 at 64 px, on the CPU. Each option is timed against
its baseline in interleaved repeats (baseline, option, baseline, option, ...); the median ratio
baseline / option is reported (> 1: the option is faster).

* ``channels_last``: model and input in NHWC memory format; full fine-tuning step and eval forward, and a
  ``sparse`` (2 %, magnitude masks) training step, which runs channels-last by default since its masks index
  weights in logical order.
* ``inference_mode``: ``torch.inference_mode()`` vs. ``torch.no_grad()`` for the eval forward.
* ``bf16``: ``torch.autocast("cpu", dtype=torch.bfloat16)`` for the eval forward and the training step;
  only where the CPU has bf16 instructions (AVX512-BF16 / AMX), else reported as skipped.

    python benchmarks/cpu_opts.py [--quick]

Prints ``RESULT cpu_<option>_<what>_speedup <ratio> -`` lines (informational: no target; the decision to
keep an option is recorded in BENCHMARKS.md) and the bf16 logit difference.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def cpu_has_bf16() -> bool:
    """Whether the CPU advertises bf16 instructions (Linux ``/proc/cpuinfo`` flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from visiontune import create_backbone
    from visiontune.strategies import apply_strategy

    torch.set_num_threads(args.threads)
    repeats = args.repeats or (4 if args.quick else 8)
    inner = 2 if args.quick else 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)

    def make(channels_last: bool, strategy: str = "full"):
        net = create_backbone("tf_efficientnet_lite0", "package", num_classes=10)
        apply_strategy(net, strategy, {"fraction": 0.02, "score": "magnitude"} if strategy == "sparse" else None)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        return net, torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    nets = {False: make(False), True: make(True)}
    sparse_nets = {False: make(False, "sparse"), True: make(True, "sparse")}
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def train_step(channels_last: bool, bf16: bool = False, table=nets) -> float:  # noqa: ANN001
        net, opt = table[channels_last]
        net.train()
        xb = x_cl if channels_last else x
        t = time.perf_counter()
        for _ in range(inner):
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with ctx:
                loss = F.cross_entropy(net(xb), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        return (time.perf_counter() - t) / inner

    def eval_step(channels_last: bool = False, inference: bool = False, bf16: bool = False) -> float:
        net, _ = nets[channels_last]
        net.eval()
        xb = x_cl if channels_last else x
        t = time.perf_counter()
        for _ in range(inner):
            with (torch.inference_mode() if inference else torch.no_grad()):
                with (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
                    net(xb)
        return (time.perf_counter() - t) / inner

    def compare(name: str, base, option) -> float:  # noqa: ANN001
        base(), option()  # warm-up (oneDNN primitive creation)
        ratios, tb, to = [], [], []
        for r in range(repeats):
            pair = (base, option) if r % 2 == 0 else (option, base)
            times = [f() for f in pair]
            b, o = (times if r % 2 == 0 else times[::-1])
            tb.append(b)
            to.append(o)
            ratios.append(b / o)
        ratio = statistics.median(ratios)
        print(f"{name}: baseline {statistics.median(tb) * 1e3:.1f} ms, option {statistics.median(to) * 1e3:.1f} ms, "
              f"speedup {ratio:.3f}")
        print(f"RESULT cpu_{name}_speedup {ratio:.3f} -")
        return ratio

    print(f"tf_efficientnet_lite0, batch {args.batch_size}, {args.image_size} px, threads {args.threads}, "
          f"{repeats} interleaved repeats; torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, bf16 flags {cpu_has_bf16()}")
    compare("channels_last_train", lambda: train_step(False), lambda: train_step(True))
    compare("channels_last_eval", lambda: eval_step(False), lambda: eval_step(True))
    compare("channels_last_sparse_train", lambda: train_step(False, table=sparse_nets),
            lambda: train_step(True, table=sparse_nets))
    compare("inference_mode_eval", lambda: eval_step(inference=False), lambda: eval_step(inference=True))
    if cpu_has_bf16():
        compare("bf16_eval", lambda: eval_step(), lambda: eval_step(bf16=True))
        compare("bf16_train", lambda: train_step(False), lambda: train_step(False, bf16=True))
        net = nets[False][0].eval()
        with torch.no_grad():
            ref = net(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = net(x).float()
        agree = (ref.argmax(1) == low.argmax(1)).float().mean().item()
        print(f"bf16 eval: max |logit difference| {(ref - low).abs().max().item():.4f}, top-1 agreement {agree:.3f}")
    else:
        print("bf16: skipped (no bf16 instructions on this CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
