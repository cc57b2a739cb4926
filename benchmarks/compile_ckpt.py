"""``model.compile`` and ``model.grad_checkpointing`` on CPU: what they cost and what they save.

* compile: ``tf_efficientnet_lite0`` (offline ``weights="package"``, channels-last as ``TransferClassifier``
  makes it), 64 px, batch 32, full fine-tuning, AdamW. An eager and a compiled copy (in place, as
  ``model.compile: true`` does) train in one process, steps **interleaved** (eager, compiled, eager, ...);
  median step times after the warm-up. Compile time = the compiled model's first step minus the eager first
  step, with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` set to a fresh folder: a cold compile, what a
  first run pays; later runs reuse the cache and pay less).
* grad checkpointing: ``vit_small_patch16_224`` (random init), 224 px, batch 8, full fine-tuning. Step time:
  both cases in one process, interleaved, medians. Memory: each case in a fresh process, measured as
  ``benchmarks/peft.py`` does (steady-state peak of anonymous RSS above the RSS before the first step, peak
  counter reset after one warm-up step, glibc malloc with a fixed mmap threshold so RSS follows live tensors).

    python benchmarks/compile_ckpt.py            # the sizes above, a few minutes on 2 cores
    python benchmarks/compile_ckpt.py --quick    # ViT at 112 px, fewer steps

``RESULT`` lines: ``compile_vs_eager_step`` (target < 1.0), ``compile_seconds`` (report),
``ckpt_vs_plain_mem`` (target < 0.8), ``ckpt_vs_plain_step`` (report: recomputation costs about a forward).
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
_HERE = os.path.dirname(os.path.abspath(__file__))


def _peft_bench():
    """benchmarks/peft.py's memory helpers (loaded by path: its file name would shadow HF PEFT on sys.path)."""
    spec = importlib.util.spec_from_file_location("_peft_bench", os.path.join(_HERE, "peft.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _in_child(conn, fn, args) -> None:  # pragma: no cover - runs in the forked process
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def in_fresh_process(ctx, fn, *args):
    """``fn(*args)`` in a new process of ``ctx`` (functions of this file only: the child imports it by path)."""
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_in_child, args=(child, fn, args))
    proc.start()
    child.close()
    status, payload = parent.recv()
    proc.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def _setup(kind: str, size: int, batch: int, *, ckpt: bool = False, compile: bool = False):
    import timm
    import torch

    from visiontune.models.backbones import create_backbone
    from visiontune.training.compile import apply_scale_options

    torch.manual_seed(0)
    if kind == "lite0":
        name = "tf_efficientnet_lite0"
        net = create_backbone(name, "package", num_classes=10).to(memory_format=torch.channels_last)
    else:
        name = "vit_small_patch16_224"
        net = timm.create_model(name, pretrained=False, num_classes=10, img_size=size)
    net = apply_scale_options(net.train(), backbone=name, compile=compile, grad_checkpointing=ckpt)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return net, opt, x, y


def _step(net, opt, x, y) -> float:
    import torch.nn.functional as F

    t0 = time.perf_counter()
    F.cross_entropy(net(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def interleaved(cases: dict[str, tuple], warmup: int, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Steps of all cases round-robin; (median step after ``warmup``, first step) per case."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(warmup + steps):
        for name, case in cases.items():
            times[name].append(_step(*case))
    return {k: statistics.median(v[warmup:]) for k, v in times.items()}, {k: v[0] for k, v in times.items()}


def compile_case(size: int, batch: int, warmup: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    cases = {"eager": _setup("lite0", size, batch), "compiled": _setup("lite0", size, batch, compile=True)}
    med, first = interleaved(cases, warmup, steps)
    return {"eager_s": med["eager"], "compiled_s": med["compiled"],
            "compile_s": first["compiled"] - first["eager"], "first_eager_s": first["eager"]}


def ckpt_time_case(size: int, batch: int, warmup: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    cases = {"plain": _setup("vit", size, batch), "ckpt": _setup("vit", size, batch, ckpt=True)}
    med, _ = interleaved(cases, warmup, steps)
    return med


def ckpt_memory_case(size: int, batch: int, ckpt: bool, steps: int, threads: int) -> dict:
    import gc

    import torch

    bench = _peft_bench()
    torch.set_num_threads(threads)
    case = _setup("vit", size, batch, ckpt=ckpt)
    gc.collect()
    before = bench._status_kb("RssAnon")
    _step(*case)
    exact = bench._reset_peak()
    for _ in range(steps):
        _step(*case)
    peak = bench._status_kb("VmHWM")
    anon_peak = peak - bench._status_kb("RssFile") - bench._status_kb("RssShmem")
    return {"train_mem_mb": (anon_peak - before) / 1024 if exact else float("nan"), "peak_rss_mb": peak / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ViT at 112 px and fewer steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 resists noisy shared CPUs)")
    args = parser.parse_args(argv)
    q = args.quick
    vit_size, steps, warmup = (112 if q else 224), (3 if q else 5), 2

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # before the fork server: see benchmarks/peft.py
    cache = tempfile.mkdtemp(prefix="vt_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compile (see the module doc)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "timm", "visiontune.models.backbones"])
    t0 = time.perf_counter()
    c = in_fresh_process(ctx, compile_case, 64, 32, warmup, steps, args.threads)
    ratio = c["compiled_s"] / c["eager_s"]
    print(f"lite0 @64 px, batch 32, full: eager {1000 * c['eager_s']:.0f} ms/step, compiled "
          f"{1000 * c['compiled_s']:.0f} ms/step; compile (cold cache) {c['compile_s']:.1f} s", flush=True)
    t = in_fresh_process(ctx, ckpt_time_case, vit_size, 8, warmup, steps, args.threads)
    mem = {k: in_fresh_process(ctx, ckpt_memory_case, vit_size, 8, k == "ckpt", 2, args.threads)
           for k in ("plain", "ckpt")}
    print(f"vit_small @{vit_size} px, batch 8, full: plain {1000 * t['plain']:.0f} ms/step "
          f"+{mem['plain']['train_mem_mb']:.0f} MB, grad checkpointing {1000 * t['ckpt']:.0f} ms/step "
          f"+{mem['ckpt']['train_mem_mb']:.0f} MB ({args.threads} thread(s), {steps} steps + {warmup} warm-up)")
    print(f"RESULT compile_vs_eager_step {ratio:.3f} <1.0 lite0 64px b32")
    print(f"RESULT compile_seconds {c['compile_s']:.1f} report cold inductor cache")
    print(f"RESULT ckpt_vs_plain_mem {mem['ckpt']['train_mem_mb'] / mem['plain']['train_mem_mb']:.3f} <0.8 "
          f"vit_small {vit_size}px b8")
    print(f"RESULT ckpt_vs_plain_step {t['ckpt'] / t['plain']:.3f} report")
    print(f"total {time.perf_counter() - t0:.0f} s")
    shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
