"""Atomic outputs and safe checkpoint loading.

Every file visiontune writes (checkpoints, deltas, reports, figures) goes through :func:`atomic_open`: the
bytes go to a hidden temp file in the destination folder, which is flushed, fsynced and then
``os.replace``-d over the destination (atomic on POSIX and Windows for a same-filesystem rename). A crash,
a full disk or an exception mid-write leaves the previous file untouched and no temp file behind, never a
half-written file in its place.

Reading: :func:`safe_torch_load` is ``torch.load(..., weights_only=True)`` with a clear error when a file
would need arbitrary unpickling (which can run code). Deltas use safetensors, which cannot run code at all.

torch, matplotlib and safetensors are imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from matplotlib.figure import Figure

__all__ = [
    "atomic_open",
    "atomic_save_figure",
    "atomic_save_safetensors",
    "atomic_save_torch",
    "atomic_write",
    "atomic_write_json",
    "checkpoint_load_error",
    "safe_torch_load",
]

_WRITE_MODES = ("wb", "w", "wt")


def _temp_path(path: Path) -> Path:
    # Same folder as the destination: os.replace is only atomic within one filesystem.
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "wb", *, encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """Open ``path`` for writing so that it is replaced all at once when the ``with`` block ends.

    The data goes to a temp file next to ``path``; on normal exit it is flushed, fsynced and renamed over
    ``path``. If the block raises, the temp file is deleted, ``path`` keeps its old content (or stays
    absent) and the exception propagates. Missing parent folders are created. A new file gets the usual
    permissions (umask applies); a replaced file keeps its permission bits.

    Args:
        path: destination file.
        mode: ``"wb"`` (bytes) or ``"w"`` / ``"wt"`` (text).
        encoding: text encoding for text modes.

    Example:
        >>> with atomic_open("run/metrics.csv", "w") as f:  # doctest: +SKIP
        ...     f.write("epoch,acc\\n0,0.91\\n")
    """
    if mode not in _WRITE_MODES:
        raise ValueError(f"atomic_open: mode must be one of {', '.join(map(repr, _WRITE_MODES))}, got {mode!r}")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(dest)
    # "x": exclusive creation (never follows or reuses an existing name), permissions 0o666 & ~umask
    # like any new file (mkstemp would give 0o600).
    text_kwargs = {} if "b" in mode else {"encoding": encoding, "newline": ""}
    f = open(tmp, mode.replace("w", "x"), **text_kwargs)  # noqa: SIM115 - closed below
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, stat.S_IMODE(dest.stat().st_mode))
        except FileNotFoundError:
            pass
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, encoding: str = "utf-8") -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`).

    Args:
        path: destination file.
        data: bytes, or text (encoded with ``encoding``; newlines written as given).
        encoding: text encoding when ``data`` is a ``str``.

    Returns:
        ``Path(path)``.

    Example:
        >>> atomic_write("run/report.txt", "checked 10 images: 10 ok, 0 bad\\n")  # doctest: +SKIP
    """
    if isinstance(data, str):
        data = data.encode(encoding)
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write: data must be bytes or str, got {type(data).__name__}")
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Serialise ``obj`` as JSON and write it atomically; if it cannot be serialised, the file is untouched.

    Args:
        path: destination file.
        obj: JSON-serialisable object.
        indent: as in :func:`json.dumps`.

    Returns:
        ``Path(path)``.

    Example:
        >>> atomic_write_json("run/metrics.json", {"acc": 0.93, "epoch": 4})  # doctest: +SKIP
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"  # fails before anything is touched
    return atomic_write(path, text)


def atomic_save_torch(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)``, atomically: an interrupted or failing save never truncates an old checkpoint.

    Args:
        obj: what ``torch.save`` accepts (prefer plain tensors/containers so it reloads with
            :func:`safe_torch_load`).
        path: destination file.

    Returns:
        ``Path(path)``.

    Example:
        >>> atomic_save_torch(model.state_dict(), "run/last.pt")  # doctest: +SKIP
    """
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def atomic_save_figure(fig: Figure, path: str | os.PathLike[str], **savefig_kwargs: Any) -> Path:
    """``fig.savefig(path)``, atomically, with the format taken from the final suffix of ``path``.

    (Saving to a ``.tmp`` name directly would make matplotlib guess the format from ``.tmp``.)

    Args:
        fig: a matplotlib figure.
        path: destination, e.g. ``confusion.png`` / ``.pdf`` / ``.svg``; without a suffix,
            ``rcParams["savefig.format"]`` is used. An explicit ``format=`` wins.
        **savefig_kwargs: passed to ``Figure.savefig`` (``dpi``, ``bbox_inches``, ...).

    Returns:
        ``Path(path)``.

    Example:
        >>> fig, ax = plt.subplots(); ax.plot([0, 1])  # doctest: +SKIP
        >>> atomic_save_figure(fig, "run/loss.png", dpi=120)  # doctest: +SKIP
    """
    import matplotlib

    dest = Path(path)
    fmt = savefig_kwargs.pop("format", None) or dest.suffix[1:].lower() or matplotlib.rcParams["savefig.format"]
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(
            f"atomic_save_figure: cannot save {str(dest)!r} as {fmt!r}; "
            f"supported formats: {', '.join(sorted(supported))}"
        )
    with atomic_open(dest, "wb") as f:
        fig.savefig(f, format=fmt, **savefig_kwargs)
    return dest


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` as a safetensors file, atomically.

    Args:
        tensors: name → tensor (non-contiguous tensors are made contiguous; tensors sharing memory are
            refused by safetensors).
        path: destination file.
        metadata: optional string → string header (safetensors allows nothing else).

    Returns:
        ``Path(path)``.

    Example:
        >>> meta = {"strategy": "lora"}
        >>> atomic_save_safetensors({"head.weight": w}, "run/delta.safetensors", meta)  # doctest: +SKIP
    """
    import torch
    from safetensors.torch import save

    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(
                    f"atomic_save_safetensors: metadata must map str to str; {key!r} -> {type(value).__name__}"
                )
    prepared: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(
                "atomic_save_safetensors: tensors must map str to torch.Tensor; "
                f"{name!r} -> {type(tensor).__name__}"
            )
        prepared[name] = tensor if tensor.is_contiguous() else tensor.contiguous()
    data = save(prepared, metadata=dict(metadata) if metadata is not None else None)
    return atomic_write(path, data)


def safe_torch_load(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load(path, map_location=..., weights_only=True)`` with a clear error for unsafe pickles.

    Checkpoints holding only tensors, numbers, strings and standard containers load. Anything that would
    need arbitrary unpickling (a custom class, a ``__reduce__`` that calls a function — which can run any
    code) is refused before it runs.

    Args:
        path: a file written by ``torch.save`` / :func:`atomic_save_torch`.
        map_location: as in ``torch.load`` (default ``"cpu"``).

    Raises:
        visiontune.errors.CheckpointError: (a ``ValueError``) naming the file, when it is not a loadable
            checkpoint (empty, truncated, not a torch file) or would require unpickling arbitrary objects.
        visiontune.errors.CheckpointNotFoundError: (a ``CheckpointError`` and a ``FileNotFoundError``) the
            file does not exist.

    Example:
        >>> state = safe_torch_load("run/last.pt")  # doctest: +SKIP
    """
    import torch

    from .errors import CheckpointNotFoundError

    if isinstance(path, (str, os.PathLike)) and not Path(path).is_file():
        raise CheckpointNotFoundError(f"{str(path)!r}: checkpoint file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        err = checkpoint_load_error(path, exc)
        if err is None:
            raise
        raise err from None


def checkpoint_load_error(path: str | os.PathLike[str], exc: BaseException, *, from_torch_load: bool = True):
    """The :class:`~visiontune.errors.CheckpointError` naming ``path`` that an exception of ``torch.load`` on it
    stands for, or ``None`` when ``exc`` is not about the file (then it should propagate as it is).

    ``from_torch_load=False``: ``exc`` came from code that calls ``torch.load`` somewhere inside (Lightning's
    checkpoint loading); it is only taken for a file problem when it was raised inside ``torch.load``.

    Example:
        >>> print(checkpoint_load_error("cut.ckpt", EOFError("Ran out of input")))
        'cut.ckpt': not a loadable torch checkpoint (EOFError: Ran out of input)
    """
    import pickle

    from .errors import CheckpointError

    if isinstance(exc, CheckpointError):
        return exc
    if not from_torch_load:
        import traceback

        frames = traceback.extract_tb(exc.__traceback__)
        if not any(Path(f.filename).as_posix().endswith("torch/serialization.py") for f in frames):
            return None
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and ("weights only" in text.lower() or "weights_only" in text):
        # torch's message goes on to suggest weights_only=False; keep only what it rejected.
        detail = next(
            (ln.strip() for ln in text.splitlines() if "Unsupported" in ln or "WeightsUnpickler" in ln),
            text.splitlines()[0] if text else "",
        )
        return CheckpointError(
            f"{str(path)!r}: refusing to unpickle arbitrary objects (torch.load with weights_only=True "
            f"rejected it; unpickling can run code). Save plain tensors/containers or safetensors instead. "
            f"Rejected: {detail}"
        )
    corrupt = isinstance(exc, (pickle.UnpicklingError, EOFError, KeyError)) or (  # empty / non-pickle bytes
        isinstance(exc, RuntimeError) and ("zip" in text.lower() or "archive" in text.lower()))  # truncated zip
    if not corrupt:
        return None
    first = text.splitlines()[0] if text else ""
    if len(first) > 120 and ". " in first:  # torch's zip message runs on with advice
        first = first[: first.index(". ") + 1]
    return CheckpointError(f"{str(path)!r}: not a loadable torch checkpoint ({type(exc).__name__}: {first})")
