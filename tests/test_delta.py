"""Task deltas: metadata, exact round trips, mismatch errors, pickle refusal, task switching, DeltaWriter + CLI."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import visiontune
from conftest import perturb_delta
from visiontune.delta import (
    DeltaError,
    TaskBank,
    build_from_delta,
    delta_from_file,
    load_delta,
    save_delta,
)
from visiontune.strategies import apply_strategy
from visiontune.strategies.lora import lora_layers, merge
from visiontune.strategies.sparse import calibrate_sparse

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def lite(strategy: str = "lora", n: int = 3, seed: int = 0, **opts) -> nn.Module:
    torch.manual_seed(seed)
    net = timm.create_model("tf_efficientnet_lite0", num_classes=3)
    if n != 3:  # same body for every class count: the head's size changes timm's init order
        net.reset_classifier(n)
    apply_strategy(net, strategy, opts or None)
    return net


def tiny_vit(strategy: str = "lora", n: int = 3, seed: int = 0, **opts) -> nn.Module:
    torch.manual_seed(seed)
    net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=n)
    apply_strategy(net, strategy, opts or None)
    return net


def train_like(net: nn.Module, seed: int, stats: bool = True) -> nn.Module:
    """Move the delta tensors (sparse: inside the masks) and BatchNorm statistics, as training would."""
    perturb_delta(net, seed, stats=stats)
    return net.eval()


def names(n: int) -> list[str]:
    return [f"c{i}" for i in range(n)]


@pytest.fixture(scope="module")
def lora_delta(tmp_path_factory) -> tuple[Path, nn.Module]:
    net = train_like(lite("lora", rank=4), seed=1)
    path = tmp_path_factory.mktemp("delta") / "lora.safetensors"
    save_delta(net, path, class_names=names(3))
    return path, net


# ------------------------------------------------------------------------------------------- contents
def test_metadata_and_tensors(lora_delta):
    path, net = lora_delta
    tensors, meta = delta_from_file(path)
    assert meta["format"] == "visiontune-delta" and meta["visiontune_version"] == visiontune.__version__
    assert meta["backbone"] == "tf_efficientnet_lite0" and meta["weights"] is None
    assert meta["strategy"] == "lora" and meta["strategy_config"]["rank"] == 4
    assert meta["class_names"] == names(3) and meta["num_classes"] == 3 and meta["bn"] == "train"
    assert meta["head"] == ["classifier.weight", "classifier.bias"]
    kinds = {k.rsplit(".", 1)[-1] for k in tensors}
    assert kinds == {"lora_A", "lora_B", "weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert {k for k in tensors if k.endswith(("weight", "bias"))} == {"classifier.weight", "classifier.bias"}
    assert "conv_stem.weight" in meta["base_hashes"] and "classifier.weight" not in meta["base_hashes"]


def test_bn_policy_decides_which_statistics_are_saved(tmp_path):
    net = train_like(lite("bitfit"), seed=1)
    for bn, expect_stats in (("eval", False), ("train", True), ("frozen", True)):  # bitfit trains BN biases
        save_delta(net, tmp_path / f"{bn}.safetensors", class_names=names(3), bn=bn)
        tensors, _ = delta_from_file(tmp_path / f"{bn}.safetensors")
        assert any(k.endswith("running_mean") for k in tensors) == expect_stats
    lora = lite("lora")
    save_delta(lora, tmp_path / "lora.safetensors", class_names=names(3), bn="frozen")  # no BN trains
    assert not any(k.endswith("running_mean") for k in delta_from_file(tmp_path / "lora.safetensors")[0])


def test_bare_net_needs_class_names(tmp_path):
    with pytest.raises(DeltaError, match="pass class_names"):
        save_delta(lite("linear"), tmp_path / "d.safetensors")
    with pytest.raises(DeltaError, match="3 class names given but the head has"):
        save_delta(lite("linear", n=5), tmp_path / "d.safetensors", class_names=names(3))
    with pytest.raises(DeltaError, match="no strategy applied"):
        save_delta(timm.create_model("resnet18", num_classes=3), tmp_path / "d.safetensors", class_names=names(3))


def test_round_trip_into_merged_lora_target(lora_delta):
    path, net = lora_delta
    fresh = train_like(lite("lora", rank=4), seed=7)
    merge(fresh)
    load_delta(fresh, path)
    assert all(layer.merged for layer in lora_layers(fresh).values())
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), net(X), atol=1e-5, rtol=1e-4)


def test_importing_delta_does_not_import_lightning():
    import subprocess
    import sys

    code = ("import sys, visiontune.delta as d; d.save_delta, d.TaskBank; "
            "print(any(m.startswith('lightning') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -------------------------------------------------------------------------------------- mismatches
def _unchanged(net: nn.Module):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    return lambda: all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_other_backbone(lora_delta):
    path, _ = lora_delta
    other = tiny_vit("lora", rank=4)
    with pytest.raises(DeltaError, match=r"backbone: delta is for 'tf_efficientnet_lite0', the model is "
                                         r"'vit_tiny_patch16_224'"):
        load_delta(other, path)


def test_other_class_count(lora_delta):
    path, _ = lora_delta
    target = lite("lora", n=5, rank=4)
    same = _unchanged(target)
    with pytest.raises(DeltaError, match=r"class count: the delta has 3 classes \(c0, c1, c2\) in its head "
                                         r"'classifier.weight' \(3, 1280\) but the model's head has 5 outputs"):
        load_delta(target, path)
    assert same()


def test_other_strategy_and_options(lora_delta, tmp_path):
    path, _ = lora_delta
    with pytest.raises(DeltaError, match="strategy: delta was saved with 'lora', the model uses 'bitfit'"):
        load_delta(lite("bitfit"), path)
    with pytest.raises(DeltaError, match=r"strategy options of 'lora' differ: rank \(delta 4, model 8\)"):
        load_delta(lite("lora", rank=8), path)
    # an option that changes no shape: an error by default, a warning with strict=False
    target = lite("lora", rank=4, dropout=0.1)
    with pytest.raises(DeltaError, match=r"dropout \(delta 0.0, model 0.1\)"):
        load_delta(target, path)
    with pytest.warns(UserWarning, match="dropout"):
        load_delta(target, path, strict=False)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_missing_extra_and_misshaped_keys(lora_delta, tmp_path):
    path, _ = lora_delta
    key = "blocks.1.0.conv_pw.lora_A"
    target = lite("lora", rank=4)
    same = _unchanged(target)
    missing = _rewrite(path, tmp_path / "missing.safetensors", lambda t: t.pop(key))
    with pytest.raises(DeltaError, match=rf"missing keys \(the model's strategy trains them\): {key}"):
        load_delta(target, missing)
    extra = _rewrite(path, tmp_path / "extra.safetensors", lambda t: t.update({"blocks.9.foo": torch.zeros(2)}))
    with pytest.raises(DeltaError, match=r"unexpected keys \(not part of the model's delta\): blocks.9.foo"):
        load_delta(target, extra)
    assert target.get_parameter(key).shape == (4, 16, 1, 1)
    bad = _rewrite(path, tmp_path / "shape.safetensors", lambda t: t.update({key: torch.zeros(4, 7, 1, 1)}))
    with pytest.raises(DeltaError, match=rf"shape mismatch: {key}: delta \(4, 7, 1, 1\) vs model \(4, 16, 1, 1\)"):
        load_delta(target, bad)
    assert same()


def test_other_base_weights_are_detected(lora_delta):
    path, net = lora_delta
    other = lite("lora", rank=4, seed=123)  # same architecture, other (random) base weights
    with pytest.raises(DeltaError, match=r"base tensors are not the base this delta was trained on: \d+ differ "
                                         r"\(blocks\.0\.0\.conv_dw\.weight"):
        load_delta(other, path)
    load_delta(other, path, check_base=False)  # explicitly allowed: loads, but cannot reproduce the logits
    with torch.no_grad():
        assert not torch.allclose(other.eval()(X), net(X))


def test_not_a_delta(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(DeltaError, match="not a visiontune delta"):
        delta_from_file(plain)
    with pytest.raises(DeltaError, match="delta file not found"):
        delta_from_file(tmp_path / "nope.safetensors")


class _Planted:
    """Unpickling this calls ``open(marker, "w")``: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_planted_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payloads = {"pickle.safetensors": pickle.dumps({"lora_A": _Planted(marker)})}
    torch_file = tmp_path / "torch.safetensors"
    torch.save({"lora_A": _Planted(marker)}, torch_file)
    payloads["torch.safetensors"] = torch_file.read_bytes()
    target = lite("lora", rank=4)
    for name, data in payloads.items():
        path = tmp_path / name
        path.write_bytes(data)
        for load in (delta_from_file, lambda p: load_delta(target, p), lambda p: TaskBank(target).add_task("t", p)):
            with pytest.raises(DeltaError, match="is not a safetensors delta .* never unpickled"):
                load(path)
        assert not marker.exists()


# -------------------------------------------------------------------------------------- task banks
def test_task_bank_switches_in_place(tmp_path):
    base = lite("lora", rank=4, seed=0)
    trained = {}
    for task, n, seed in (("birds", 3, 1), ("cars", 5, 2)):
        net = train_like(lite("lora", n=n, rank=4, seed=0), seed=seed)
        save_delta(net, tmp_path / f"{task}.safetensors", class_names=names(n))
        with torch.no_grad():
            trained[task] = net(X)
    base.eval()
    with torch.no_grad():
        base_logits = base(X)
    lora_a = base.blocks[1][0].conv_pw.lora_A
    bank = TaskBank(base)
    assert bank.add_task("birds", tmp_path / "birds.safetensors")["num_classes"] == 3
    bank.add_task("cars", tmp_path / "cars.safetensors")
    assert bank.tasks == ["birds", "cars"] and bank.active is None
    with torch.no_grad():
        for task in ("cars", "birds", "cars", None, "birds"):
            bank.use_task(task)
            assert bank.active == task
            out = base(X)
            assert torch.equal(out, trained[task] if task else base_logits)
    assert base.blocks[1][0].conv_pw.lora_A is lora_a  # tensors swapped in place, not re-created
    assert base.num_classes == 3 and bank.class_names("cars") == names(5)

    merged = bank.merge("cars")  # a copy: the bank stays on 'birds'
    assert bank.active == "birds" and not lora_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(X), trained["cars"], atol=1e-5, rtol=1e-4)
        assert torch.equal(base(X), trained["birds"])
    with pytest.raises(DeltaError, match=r"no task 'boats'; tasks: \['birds', 'cars'\]"):
        bank.use_task("boats")
    bank.remove_task("birds")
    assert bank.active is None and bank.tasks == ["cars"]


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_task_bank_sparse_masks_and_base_checks(tmp_path, fmt):
    """Also in channels-last memory format (the default for CNNs): sparse indices count logical entries."""
    xs = [(X, torch.tensor([0, 1, 2])), (-X, torch.tensor([2, 2, 0]))]
    trained = {}
    for task, seed in (("a", 0), ("b", 1)):
        net = lite("sparse", fraction=0.02, score="gradient", warmup_batches=1).to(memory_format=fmt)
        calibrate_sparse(net, [xs[seed]])  # different data: different masks
        train_like(net, seed=10 + seed)
        save_delta(net, tmp_path / f"{task}.safetensors", class_names=names(3))
        with torch.no_grad():
            trained[task] = net(X)
    base = lite("sparse", fraction=0.02, score="gradient", warmup_batches=1).to(memory_format=fmt).eval()
    assert base.conv_stem.weight.is_contiguous(memory_format=fmt)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    bank = TaskBank(base)
    bank.add_task("a", tmp_path / "a.safetensors")
    bank.add_task("b", tmp_path / "b.safetensors")
    with torch.no_grad():
        for task in ("a", "b", "a"):
            bank.use_task(task)
            assert torch.equal(base(X), trained[task])
    bank.use_task(None)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the base, bit for bit
    other = TaskBank(lite("sparse", fraction=0.02, seed=5))
    with pytest.raises(DeltaError, match="strategy options of 'sparse' differ: score"):
        other.add_task("a", tmp_path / "a.safetensors")


# ------------------------------------------------------------------- TransferClassifier, writer, CLI
def test_transfer_classifier_round_trip_and_sizes(tmp_path):
    from visiontune.delta import add_task, use_task
    from visiontune.training.module import TransferClassifier

    def module(classes: list[str], seed: int) -> TransferClassifier:
        m = TransferClassifier("tf_efficientnet_lite0", weights="package", class_names=classes, strategy="lora",
                               strategy_args={"rank": 8}, bn="frozen")  # no BatchNorm trains under LoRA
        train_like(m.net, seed=seed, stats=False)
        return m

    model = module(["x", "y", "z"], seed=3)
    path = save_delta(model, tmp_path / "task.safetensors")
    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(full))
    assert path.stat().st_size < 0.1 * full.stat().st_size
    _, meta = delta_from_file(path)
    assert meta["weights"] == "package" and meta["bn"] == "frozen" and meta["class_names"] == ["x", "y", "z"]
    rebuilt = build_from_delta(path)
    assert rebuilt.class_names == ["x", "y", "z"] and not rebuilt.training
    with torch.no_grad():
        assert torch.equal(rebuilt(X), model.net(X))

    # the module-level API TransferClassifier.add_task / use_task delegate to: class names follow the task
    save_delta(module(["p", "q"], seed=4), tmp_path / "two.safetensors")
    add_task(rebuilt, "two", tmp_path / "two.safetensors")
    use_task(rebuilt, "two")
    assert rebuilt.class_names == ["p", "q"] and rebuilt.num_classes == 2 and rebuilt(X).shape == (3, 2)
    use_task(rebuilt, None)
    assert rebuilt.class_names == ["x", "y", "z"]
    with torch.no_grad():
        assert torch.equal(rebuilt(X), model.net(X))


def test_sparse_transfer_classifier_runs_channels_last_and_round_trips(tmp_path):
    """A CNN under ``sparse`` now runs channels-last (``channels_last: auto``), its masks too; the delta it
    saves rebuilds the same logits and restores the masks (continued training moves the same entries)."""
    from visiontune.strategies.sparse import sparse_masks
    from visiontune.training.module import TransferClassifier

    model = TransferClassifier("tf_efficientnet_lite0", weights="package", class_names=names(3), strategy="sparse",
                               strategy_args={"fraction": 0.02}, bn="frozen")
    assert model.net.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    masks = sparse_masks(model.net)
    assert masks["conv_stem.weight"].is_contiguous(memory_format=torch.channels_last)
    train_like(model.net, seed=7, stats=False)
    path = save_delta(model, tmp_path / "sparse.safetensors")
    rebuilt = build_from_delta(path)
    assert rebuilt.net.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(rebuilt(X), model.eval().net(X))
    again = sparse_masks(rebuilt.net)
    assert all(torch.equal(again[n], masks[n]) for n in masks)


def test_fit_writes_delta_and_predict_uses_it(tmp_path, monkeypatch, capsys):
    from conftest import make_folder
    from visiontune.cli import main

    monkeypatch.chdir(tmp_path)
    data = make_folder(tmp_path / "imgs", per_class=4)
    common = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--data.image_size=32",
              "--data.num_workers=0", "--data.batch_size=4"]
    main(["fit", *common, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
          "--model.backbone=tf_efficientnet_lite0", "--model.weights=package", "--model.strategy=lora",
          "--model.strategy_args={rank: 2}", f"--data.train={data}"])
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("visiontune delta:")][-1]
    delta = Path(line.split(":", 1)[1].split(" (")[0].strip())
    assert delta.name == "delta.safetensors" and delta.parent.name == "checkpoints"
    assert (delta.parent / "best.ckpt").is_file()
    _, meta = delta_from_file(delta)
    assert meta["class_names"] == ["blue", "green", "red"] and meta["weights"] == "package"

    preds = tmp_path / "preds.csv"
    main(["predict", *common, f"--delta={delta}", f"--data.predict={data}", f"--predictions.output={preds}"])
    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == 12 and {r["label"] for r in rows} <= {"blue", "green", "red"}
    # the delta was written from the best checkpoint: the same predictions, to the printed digit
    from_ckpt = tmp_path / "preds_ckpt.csv"
    main(["predict", *common, "--model.backbone=tf_efficientnet_lite0", "--model.strategy=lora",
          "--model.strategy_args={rank: 2}", f"--ckpt_path={delta.parent / 'best.ckpt'}",
          f"--data.predict={data}", f"--predictions.output={from_ckpt}"])
    assert list(csv.DictReader(from_ckpt.open())) == rows

    with pytest.raises((SystemExit, ValueError)) as err:
        main(["predict", *common, f"--delta={delta}", f"--ckpt_path={delta.parent / 'best.ckpt'}",
              f"--data.predict={data}"])
    assert "--delta and --ckpt_path exclude each other" in str(err.value) + capsys.readouterr().err


def test_module_use_task_switches_heads_and_metrics(tmp_path):
    """TransferClassifier.add_task/use_task: two tasks with different class counts on one base."""
    import torch as _torch

    from visiontune import TransferClassifier, save_delta

    _torch.manual_seed(0)
    a = TransferClassifier("resnet18", weights=None, num_classes=3, strategy="lora", strategy_args={"rank": 2})
    b = TransferClassifier("resnet18", weights=None, num_classes=5, strategy="lora", strategy_args={"rank": 2})
    b.net.load_state_dict({k: v for k, v in a.net.state_dict().items() if not k.startswith("fc.")}, strict=False)
    for m in (a, b):  # make the deltas non-trivial
        with _torch.no_grad():
            for n, p in m.net.named_parameters():
                if p.requires_grad:
                    p.add_(_torch.randn_like(p) * 0.05)
    save_delta(a, tmp_path / "a.safetensors")
    save_delta(b, tmp_path / "b.safetensors")
    x = _torch.randn(2, 3, 32, 32)
    a.eval(), b.eval()
    with _torch.no_grad():
        want_a, want_b = a(x), b(x)
    host = TransferClassifier("resnet18", weights=None, num_classes=3, strategy="lora", strategy_args={"rank": 2})
    host.net.load_state_dict({k: v for k, v in a.net.state_dict().items()})
    host.add_task("a", str(tmp_path / "a.safetensors"))
    host.add_task("b", str(tmp_path / "b.safetensors"))
    host.eval()
    host.use_task("b")
    with _torch.no_grad():
        _torch.testing.assert_close(host(x), want_b)
    assert host.metrics["val"]["acc"].num_classes == 5
    host.use_task("a")
    with _torch.no_grad():
        _torch.testing.assert_close(host(x), want_a)
    assert host.metrics["val"]["acc"].num_classes == 3


def test_resumed_fit_and_load_keep_the_weight_source(tmp_path, monkeypatch, capsys):
    """A fit resumed with --ckpt_path (and a model from TransferClassifier.load) keeps its weight source: the
    resumed run's delta records the base it was trained on and rebuilds the resumed model (issue #11, 2)."""
    import yaml

    from conftest import make_folder
    from visiontune import TransferClassifier
    from visiontune.cli import main

    monkeypatch.chdir(tmp_path)
    data = make_folder(tmp_path / "imgs", per_class=3)
    common = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.limit_train_batches=1",
              "--trainer.limit_val_batches=1", "--data.image_size=32", "--data.num_workers=0",
              "--data.batch_size=4", "--save_delta.source=last", f"--data.train={data}"]

    def delta_of_run() -> Path:
        line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("visiontune delta:")][-1]
        return Path(line.split(":", 1)[1].split(" (")[0].strip())

    main(["fit", *common, "--trainer.max_epochs=1", "--model.backbone=tf_efficientnet_lite0",
          "--model.weights=package", "--model.strategy=lora", "--model.strategy_args={rank: 2}"])
    first = delta_of_run().parent / "last.ckpt"
    main(["fit", *common, "--trainer.max_epochs=2", f"--ckpt_path={first}"])
    delta = delta_of_run()
    assert delta.parent != first.parent
    run = delta.parent.parent
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["weights"] == "package"
    _, meta = delta_from_file(delta)
    assert meta["weights"] == "package"

    resumed = TransferClassifier.load(str(delta.parent / "last.ckpt"))
    assert resumed.hparams.weights == "package"
    assert torch.load(delta.parent / "last.ckpt", weights_only=True)["epoch"] == 1  # it did resume and train
    rebuilt = build_from_delta(delta)  # the package base, checked tensor by tensor
    resumed.eval()
    with torch.no_grad():
        want = resumed(X)
        assert torch.allclose(rebuilt(X), want, rtol=0, atol=1e-6)
    # a delta of the loaded model records the true source too
    _, meta = delta_from_file(save_delta(resumed, tmp_path / "loaded.safetensors"))
    assert meta["weights"] == "package"


# ------------------------------------------------------------------------------------------ tied tensors
COAT = dict(img_size=32, serial_depths=[1, 1, 1, 1], embed_dims=[16, 32, 64, 64])


def _coat(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("coat_lite_tiny", num_classes=3, **COAT)


@pytest.mark.parametrize("strategy", ["full", "bitfit", "sparse", "ssf"])
def test_shared_tensors_are_saved_once_and_restored_under_every_name(strategy, tmp_path):
    """CoaT shares its conv position encodings between blocks: one tensor, two state-dict names. The delta
    holds it once, the base hashes never hold its alias (it was hashed with its trained value: the rebuilt base
    'differed'), and loading restores it under both names."""
    net = _coat()
    sd = net.state_dict(keep_vars=True)
    aliases = {k for k, t in sd.items() if any(t is u and k != j for j, u in sd.items())}
    assert len(aliases) >= 2  # the model does share tensors
    apply_strategy(net, strategy, {"fraction": 0.05} if strategy == "sparse" else None)
    perturb_delta(net, 1)
    path = save_delta(net.eval(), tmp_path / "coat.safetensors", class_names=names(3), backbone="coat_lite_tiny",
                      backbone_args=COAT)
    tensors, meta = delta_from_file(path)
    sd = net.state_dict(keep_vars=True)
    delta_ids = {id(sd[n]) for n in net.visiontune_delta}
    assert not [k for k in meta["base_hashes"] if id(sd[k]) in delta_ids]
    assert len({id(sd[k]) for k in meta["base_hashes"]}) == len(meta["base_hashes"])  # once per tensor
    fresh = _coat()
    apply_strategy(fresh, strategy, {"fraction": 0.05} if strategy == "sparse" else None)
    load_delta(fresh, path)
    got = fresh.eval().state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(got[k], v), k
    with torch.no_grad():
        assert torch.equal(fresh(X), net(X))
