"""Export for deployment: onnxruntime and TorchScript latency against PyTorch eager, and the export's max |Δlogit|.

Two models, each with a LoRA (rank 8, non-zero factors) merged by ``visiontune export``'s own path
(:func:`visiontune.deploy.eval_graph`): ``tf_efficientnet_lite0`` at 224 px with its offline ImageNet weights,
and a tiny ViT (``vit_tiny_patch16_224``, 224 px, random init). Each export is checked against the trained
(unmerged) PyTorch model on real images (scikit-learn's digits, 8 of them) by :func:`visiontune.export_model`.
Latency: the merged graph in PyTorch eager (``inference_mode``) vs the exported file in onnxruntime (CPU, the same
thread count as PyTorch, ``--threads``, 1 by default) and loaded back with ``torch.jit.load``, batch 1 and 32; the
three run interleaved call by call and the medians are compared (ratios: the machine is shared and noisy).

    python benchmarks/export.py             # 30 calls per runtime at batch 1, 6 at batch 32
    python benchmarks/export.py --quick     # 10 and 3
    python benchmarks/export.py --threads 2 --models lite0

Prints ``RESULT export_<onnx|torchscript>_vs_eager_<model>_b<batch> <exported / eager median> <=1.0`` and
``RESULT export_max_dlogit_<model>_<format> <max |Δlogit|> <=1e-4``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

MODELS = {
    "lite0": {"backbone": "tf_efficientnet_lite0", "weights": "package"},
    "vit_tiny": {"backbone": "vit_tiny_patch16_224", "weights": None},
}


def _latencies(runtimes: dict, batch: int, calls: int) -> dict[str, float]:
    import torch

    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
    for fn in runtimes.values():  # warm-up (TorchScript's profiling executor optimises after its first runs)
        for _ in range(3):
            fn(x)
    times: dict[str, list[float]] = {k: [] for k in runtimes}
    for _ in range(calls):  # interleaved call by call: a slow moment of the machine hits every runtime alike
        for name, fn in runtimes.items():
            t = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(name: str, calls: int, out: Path) -> None:
    import torch

    import visiontune as vt
    from visiontune.deploy import eval_graph
    from visiontune.deploy.formats import runner

    torch.manual_seed(0)
    model = vt.TransferClassifier(num_classes=10, strategy="lora", strategy_args={"rank": 8, "init": "gaussian"},
                                  **MODELS[name]).eval()
    files = {}
    for fmt in ("onnx", "torchscript"):
        t = time.perf_counter()
        result = vt.export_model(model, out / f"{name}.{fmt}", fmt, images="digits", image_size=224,
                                 latency_runs=3)
        files[fmt] = result.path
        print(f"{name} {fmt}: exported and checked in {time.perf_counter() - t:.1f} s; " + "; ".join(result.summary()))
        print(f"RESULT export_max_dlogit_{name}_{fmt} {result.max_abs_diff:.2e} <=1e-4 "
              f"{result.num_images} digits at 224 px, top-1 {'same' if result.top1_agree else 'DIFFERENT'}")
    net = eval_graph(model).net
    onnx_run, ts_run = (runner(fmt, files[fmt].read_bytes()) for fmt in ("onnx", "torchscript"))

    def eager(x):
        with torch.inference_mode():
            return net(x).numpy()

    runtimes = {"eager": eager, "onnx": lambda x: onnx_run(x.numpy()), "torchscript": lambda x: ts_run(x.numpy())}
    for batch in (1, 32):
        med = _latencies(runtimes, batch, calls if batch == 1 else max(3, calls // 5))
        print(f"{name} batch {batch}: median " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in med.items())
              + f" ({torch.get_num_threads()} threads)")
        for fmt in ("onnx", "torchscript"):
            print(f"RESULT export_{fmt}_vs_eager_{name}_b{batch} {med[fmt] / med['eager']:.3f} <=1.0 "
                  f"{1000 * med[fmt]:.1f} ms vs eager {1000 * med['eager']:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 calls per runtime at batch 1, 3 at batch 32")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch's and onnxruntime's threads")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)  # onnxruntime's sessions take the same count (visiontune.deploy.formats)
    calls = 10 if args.quick else 30
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            bench(name, calls, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
