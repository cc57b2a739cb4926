"""``visiontune export`` / ``export_model``: merged graphs, checked on real images, metadata, dynamic batch, CLI."""

from __future__ import annotations

import collections
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_folder, perturb_delta
from visiontune import ImageDataModule, TransferClassifier
from visiontune.cli import main
from visiontune.deploy import ExportError, ExportFailedError, eval_graph, export_model, read_export_metadata
from visiontune.deploy.graph import INPUT_FORMAT, strategy_modules

onnx = pytest.importorskip("onnx", reason="pip install 'visiontune[export]'")
ort = pytest.importorskip("onnxruntime", reason="pip install 'visiontune[export]'")

VIT = {"backbone": "vit_tiny_patch16_224", "weights": None,
       "backbone_args": {"img_size": 32, "patch_size": 8, "depth": 2}}
CLASSES = [str(i) for i in range(10)]  # the digits


def _vit(strategy: str, **options) -> TransferClassifier:
    torch.manual_seed(0)
    model = TransferClassifier(class_names=CLASSES, strategy=strategy, strategy_args=options or None, **VIT)
    perturb_delta(model.net, seed=1)  # every trained tensor moved: a merge that dropped one cannot match
    return model.eval()


def _digits(n: int = 6) -> torch.Tensor:
    """n real images (scikit-learn's digits), as the model's evaluation normalises them (32 px, ViT's 0.5/0.5)."""
    dm = ImageDataModule(predict="digits", image_size=32, num_workers=0, mean=(0.5,) * 3, std=(0.5,) * 3)
    dm.setup("predict")
    return torch.stack([dm.predict_set[i * 150][0] for i in range(n)])


def _run(path: Path, fmt: str, x: torch.Tensor) -> np.ndarray:
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"input": x.numpy()})[0]
    with torch.inference_mode():
        return torch.jit.load(str(path))(x).numpy()


def _op_counts(path: Path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def base_ops(tmp_path_factory) -> collections.Counter:
    """The ONNX op counts of the plain timm model (strategy 'full'): what a merged graph must equal."""
    out = tmp_path_factory.mktemp("base") / "base.onnx"
    export_model(_vit("full"), out, "onnx", image_size=32, latency_runs=1)
    return _op_counts(out)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("strategy, options", [("lora", {"rank": 2, "init": "gaussian"}), ("ssf", {})])
def test_mergeable_strategies_export_merged_and_match_pytorch_on_real_images(tmp_path, base_ops, fmt, strategy,
                                                                           options):
    model = _vit(strategy, **options)
    out = tmp_path / f"model.{fmt}"
    result = export_model(model, out, fmt, images="digits", image_size=32, check_images=6, latency_runs=2)
    assert result.merged and result.checked_on == "images" and result.num_images == 6
    assert result.note.startswith(f"strategy {strategy!r}: merged ") and result.merge_max_abs_diff > 0
    assert strategy_modules(eval_graph(model).net) == [] and strategy_modules(model.net) != []
    # the written file: no LoRA/SSF left, the same logits as the trained PyTorch model on real images
    if fmt == "onnx":
        graph = onnx.load(str(out)).graph
        assert not [i.name for i in graph.initializer if "lora" in i.name or "ssf" in i.name]
        assert _op_counts(out) == base_ops  # the plain timm graph, op for op
    else:
        loaded = torch.jit.load(str(out))
        code = str(loaded.graph) + str(loaded.code)  # an unmerged graph names its lora_A / ssf tensors here
        assert "lora" not in code and "ssf" not in code
    x = _digits(6)
    with torch.inference_mode():
        want = model(x).numpy()
    for batch in (x, x[:1], x[:3]):  # dynamic batch
        got = _run(out, fmt, batch)
        assert got.shape == (len(batch), 10)
        assert np.abs(got - want[: len(batch)]).max() <= 1e-4
        assert (got.argmax(1) == want[: len(batch)].argmax(1)).all()
    assert result.max_abs_diff <= 1e-4 and result.top1_agree
    assert set(result.latency_ms) == {"pytorch", "exported"} and min(result.latency_ms.values()) > 0
    assert read_export_metadata(out) == {
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_size": [3, 32, 32], "interpolation": "bicubic",
        "class_names": CLASSES, "input_format": INPUT_FORMAT, "backbone": "vit_tiny_patch16_224",
        "strategy": strategy, "merged": True, "visiontune_version": result.metadata["visiontune_version"],
    }
    assert not [p for p in tmp_path.iterdir() if p.name != out.name]  # no temp file left beside it


def test_unmerged_ssf_graph_differs_from_the_plain_one(tmp_path, base_ops):
    """The op-count check above can fail: SSF left unmerged adds its scale/shift ops to the ONNX graph."""
    from visiontune.deploy.formats import onnx_bytes

    model = _vit("ssf")
    out = tmp_path / "unmerged.onnx"
    out.write_bytes(onnx_bytes(model.net.eval(), _digits(2), {}))
    assert _op_counts(out) != base_ops


def test_adapter_is_exported_unmerged_with_one_line_and_still_matches(tmp_path):
    model = _vit("adapter", bottleneck=4)
    out = tmp_path / "adapter.torchscript.pt"
    result = export_model(model, out, "torchscript", images="digits", image_size=32, check_images=4,
                          latency_runs=2)
    assert result.note == "strategy 'adapter' cannot be merged: exporting the unmerged graph (its adapter layers " \
                          "stay in it)"
    assert not result.merged and read_export_metadata(out)["merged"] is False
    x = _digits(3)
    with torch.inference_mode():
        want = model(x).numpy()
    assert np.abs(_run(out, "torchscript", x) - want).max() <= 1e-4


def test_synthetic_check_is_said_and_a_failed_check_writes_nothing(tmp_path):
    model = _vit("lora", rank=2, init="gaussian")
    out = tmp_path / "m.torchscript.pt"
    result = export_model(model, out, "torchscript", latency_runs=1)  # no images: synthetic input
    assert result.checked_on == "synthetic" and result.num_images == 0
    assert "a synthetic input only (give --data.predict or --data.val" in result.summary()[1]
    before = out.read_bytes()
    with pytest.raises(ExportFailedError, match=r"does not match PyTorch: max \|dlogit\| .* not written"):
        export_model(model, out, "torchscript", tolerance=0.0, latency_runs=1)  # merged LoRA is never bit-exact
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_missing_onnx_is_a_user_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ExportError, match=r"pip install 'visiontune\[export\]'"):
        export_model(_vit("full"), tmp_path / "m.onnx", "onnx")
    assert not (tmp_path / "m.onnx").exists()


def _fit(tmp_path: Path, capsys) -> Path:
    """A real run: 1 step of LoRA on lite0 (offline package weights) at 32 px; returns its checkpoints folder."""
    data = make_folder(tmp_path / "imgs", per_class=3)
    main(["fit", "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.limit_train_batches=1",
          "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--data.num_workers=0",
          "--model.backbone=tf_efficientnet_lite0", "--model.weights=package", "--model.strategy=lora",
          "--model.strategy_args={rank: 2}", "--data.image_size=32", "--data.batch_size=4", f"--data.train={data}"])
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("visiontune run directory:")][-1]
    return Path(line.split(":", 1)[1].strip()) / "checkpoints"


def test_cli_exports_a_fitted_checkpoint_and_its_delta(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpts = _fit(tmp_path, capsys)
    # the checkpoint, as ONNX; the input size is the run's (32 px, from its config.yaml), not lite0's 224
    assert main(["export", f"--ckpt_path={ckpts / 'last.ckpt'}", "--exporter=legacy", f"--data.val={tmp_path}/imgs",
                 "--check_images=4", "--latency_runs=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("strategy 'lora': merged ")
    assert lines[1].startswith(f"checked on 4 real images from {tmp_path}/imgs: onnxruntime vs PyTorch max |dlogit| ")
    assert "top-1 identical (batch 1 and 4)" in lines[1]
    assert lines[2].startswith("latency, batch 1, 32x32 px, ") and "PyTorch " in lines[2]
    out = ckpts / "last.onnx"
    assert lines[3].startswith(f"wrote {out} (onnx, ")
    meta = read_export_metadata(out)
    assert meta["class_names"] == ["blue", "green", "red"] and meta["input_size"] == [3, 32, 32]
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.5, 0.5, 0.5] and meta["merged"] is True
    model = TransferClassifier.load(str(ckpts / "last.ckpt")).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(x).numpy()
    assert np.abs(_run(out, "onnx", x) - want).max() <= 1e-4
    # the task delta, as TorchScript, to a chosen file
    ts = tmp_path / "deploy" / "lite0.pt"
    assert main(["export", f"--delta={ckpts / 'delta.safetensors'}", "--format=torchscript", f"--output={ts}",
                 "--latency_runs=2"]) == 0
    assert "a synthetic input only" in capsys.readouterr().out
    assert np.abs(_run(ts, "torchscript", x) - want).max() <= 1e-4
    extra = {"metadata.json": ""}
    torch.jit.load(str(ts), _extra_files=extra)
    assert b'"class_names": ["blue", "green", "red"]' in extra["metadata.json"]


@pytest.mark.parametrize("args, message", [
    (["--ckpt_path=/no/such.ckpt"], "visiontune export: error: --ckpt_path: no such file: /no/such.ckpt"),
    (["--delta=/no/such.safetensors"], "visiontune export: error: --delta: no such file: /no/such.safetensors"),
    (["--ckpt_path=x.ckpt", "--format=tflite"],
     "visiontune export: error: --format must be one of onnx, torchscript, got 'tflite'"),
    ([], "visiontune export: error: give exactly one of --ckpt_path (a checkpoint) or --delta (a task delta), "
         "got neither"),
    (["--ckpt_path=a.ckpt", "--delta=b.safetensors"],
     "visiontune export: error: give exactly one of --ckpt_path (a checkpoint) or --delta (a task delta), got both"),
])
def test_bad_input_is_one_line_naming_the_option_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["export", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == message


def test_unknown_exporter_is_named(tmp_path):
    with pytest.raises(ExportError, match=r"--exporter must be one of dynamo, legacy, got 'fx'"):
        export_model(_vit("full"), tmp_path / "m.onnx", exporter="fx")


def test_torchscript_bytes_round_trip_keeps_metadata():
    from visiontune.deploy.formats import runner, torchscript_bytes

    data = torchscript_bytes(torch.nn.Linear(4, 2).eval(), torch.zeros(2, 4), {"class_names": ["a", "b"]})
    extra = {"metadata.json": ""}
    torch.jit.load(io.BytesIO(data), _extra_files=extra)
    assert extra["metadata.json"] == b'{"class_names": ["a", "b"]}'
    assert runner("torchscript", data)(np.ones((5, 4), dtype=np.float32)).shape == (5, 2)


def test_an_input_size_the_model_does_not_take_is_a_user_error_naming_the_option(tmp_path):
    with pytest.raises(ExportError, match=r"^the model does not run on 48x48 px inputs \(--data.image_size, or the "
                                          r"config's data.image_size\): Input height \(48\) doesn't match model"):
        export_model(_vit("full"), tmp_path / "m.pt", "torchscript", image_size=48)
    assert not list(tmp_path.iterdir())
