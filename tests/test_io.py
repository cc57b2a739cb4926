"""Atomic outputs (nothing is ever left half-written in place of a good file) and safe checkpoint loading."""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from visiontune import io as vio
from visiontune.io import (
    atomic_open,
    atomic_save_figure,
    atomic_save_safetensors,
    atomic_save_torch,
    atomic_write,
    atomic_write_json,
    safe_torch_load,
)


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# --- atomic_open / atomic_write ----------------------------------------------------------------------------


def test_crash_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"OLD-GOOD-CONTENT")
    new = b"N" * 10_000
    with pytest.raises(RuntimeError, match="power cut"):
        with atomic_open(target, "wb") as f:
            f.write(new[: len(new) // 2])
            f.flush()
            raise RuntimeError("power cut")
    assert target.read_bytes() == b"OLD-GOOD-CONTENT"
    assert _leftovers(tmp_path, {"ckpt.bin"}) == []


def test_crash_on_new_file_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(tmp_path / "new.txt", "w") as f:
            f.write("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_temp_file_is_in_the_same_folder_and_replaced_at_exit(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_open(target, "w") as f:
        f.write("new")
        temp = Path(f.name)
        assert temp.parent == tmp_path and temp != target and temp.exists()
        assert target.read_text() == "old"  # untouched until the block ends
    assert target.read_text() == "new" and not temp.exists()
    assert _leftovers(tmp_path, {"out.txt"}) == []


def test_atomic_write_bytes_str_and_parents(tmp_path):
    p = tmp_path / "a" / "b" / "x.txt"
    assert atomic_write(p, "héllo\nworld\n") == p
    assert p.read_bytes() == "héllo\nworld\n".encode()
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    with pytest.raises(TypeError, match="bytes or str"):
        atomic_write(p, 3)  # type: ignore[arg-type]
    assert p.read_bytes() == b"\x00\x01"


def test_atomic_open_rejects_read_and_append_modes(tmp_path):
    for mode in ("r", "ab", "r+b"):
        with pytest.raises(ValueError, match="mode must be one of"):
            with atomic_open(tmp_path / "x", mode):
                pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_permissions_new_file_umask_and_replaced_file_kept(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    fresh = atomic_write(tmp_path / "fresh.txt", "x")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    kept.chmod(0o640)
    atomic_write(kept, "new")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640


def test_atomic_write_json(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_json(p, {"acc": 0.5, "name": "ø"})
    assert json.loads(p.read_text(encoding="utf-8")) == {"acc": 0.5, "name": "ø"}
    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": object()})
    assert json.loads(p.read_text(encoding="utf-8")) == {"acc": 0.5, "name": "ø"}
    assert _leftovers(tmp_path, {"m.json"}) == []


# --- torch ----------------------------------------------------------------------------------------


def test_atomic_save_torch_roundtrip_with_safe_load(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7, "names": ["a", "b"]}
    p = atomic_save_torch(state, tmp_path / "s.pt")
    back = safe_torch_load(p)
    assert torch.equal(back["w"], state["w"]) and back["step"] == 7 and back["names"] == ["a", "b"]


def test_failing_torch_save_keeps_old_checkpoint(tmp_path):
    p = tmp_path / "s.pt"
    atomic_save_torch({"w": torch.ones(3)}, p)
    before = p.read_bytes()
    with pytest.raises(Exception):
        atomic_save_torch({"w": torch.zeros(3), "f": lambda: 0}, p)  # lambdas cannot be pickled
    assert p.read_bytes() == before
    assert _leftovers(tmp_path, {"s.pt"}) == []


class _Planted:
    """Unpickling this calls a function that creates the marker file (stands in for os.system(...))."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_torch_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": _Planted(marker)}, p)
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing to unpickle arbitrary objects") as info:
        safe_torch_load(p)
    assert str(p) in str(info.value)
    assert not marker.exists()


def test_planted_plain_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps(_Planted(marker), protocol=2))
    with pytest.raises(ValueError, match="refusing to unpickle arbitrary objects") as info:
        safe_torch_load(p)
    assert str(p) in str(info.value)
    assert not marker.exists()
    pickle.loads(p.read_bytes()).close()  # control: a plain unpickle really would have run it
    assert marker.exists()


def test_safe_torch_load_garbage_and_missing(tmp_path):
    for name, data in [("empty.pt", b""), ("text.pt", b"hello world, not a checkpoint")]:
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ValueError, match="not a loadable torch checkpoint") as info:
            safe_torch_load(p)
        assert str(p) in str(info.value)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1000)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ValueError, match="cut.pt"):
        safe_torch_load(cut)
    with pytest.raises(FileNotFoundError):
        safe_torch_load(tmp_path / "missing.pt")


# --- safetensors ----------------------------------------------------------------------------------


def test_atomic_save_safetensors_roundtrip_with_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5), "t": torch.randn(4, 3).t()}
    p = atomic_save_safetensors(tensors, tmp_path / "d.safetensors", {"strategy": "lora", "rank": "4"})
    back = load_file(p)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with safe_open(p, "pt") as f:
        assert f.metadata() == {"strategy": "lora", "rank": "4"}
    atomic_save_safetensors({"x": torch.ones(1)}, tmp_path / "plain.safetensors")
    assert torch.equal(load_file(tmp_path / "plain.safetensors")["x"], torch.ones(1))


def test_atomic_save_safetensors_bad_input_keeps_old_file(tmp_path):
    p = tmp_path / "d.safetensors"
    atomic_save_safetensors({"x": torch.ones(2)}, p)
    before = p.read_bytes()
    with pytest.raises(TypeError, match="rank"):
        atomic_save_safetensors({"x": torch.zeros(2)}, p, {"rank": 4})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="'x'"):
        atomic_save_safetensors({"x": [1, 2]}, p)  # type: ignore[dict-item]
    assert p.read_bytes() == before
    assert _leftovers(tmp_path, {"d.safetensors"}) == []


# --- figures --------------------------------------------------------------------------------------


@pytest.fixture()
def figure():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


@pytest.mark.parametrize("name,magic", [("f.png", b"\x89PNG"), ("f.pdf", b"%PDF"), ("f.SVG", b"<?xml")])
def test_atomic_save_figure_format_from_suffix(tmp_path, figure, name, magic):
    p = atomic_save_figure(figure, tmp_path / name, dpi=20)
    assert p.read_bytes().startswith(magic)
    assert _leftovers(tmp_path, {name}) == []


def test_atomic_save_figure_unknown_format_and_failure(tmp_path, figure, monkeypatch):
    with pytest.raises(ValueError, match="supported formats"):
        atomic_save_figure(figure, tmp_path / "f.docx")
    p = tmp_path / "f.png"
    p.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(figure, "savefig", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_save_figure(figure, p)
    assert p.read_bytes() == b"old"
    assert _leftovers(tmp_path, {"f.png"}) == []


def test_module_import_is_lazy():
    # importing visiontune.io must not pull in matplotlib or safetensors (torch may already be loaded)
    assert vio.__all__ and "matplotlib" not in vio.__dict__ and "safetensors" not in vio.__dict__
