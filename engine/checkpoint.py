"""Checkpoints: atomic writes, RNG state capture, and loading with clear errors."""
from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (usually a full disk); the message is one line naming the
    file and the free space, and the previous checkpoint of that name is intact."""


# what torch's zip writer says when a write comes up short (a full disk)
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def free_space(directory: str | os.PathLike) -> str:
    """``'1.2 MiB free of 2.0 MiB'`` for the file system holding ``directory``."""
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return "free space unknown"
    return f"{format_bytes(usage.free)} free of {format_bytes(usage.total)}"


def disk_full_message(err: OSError, directory: Optional[str | os.PathLike]) -> Optional[str]:
    """One line for an ``OSError`` of a full disk (ENOSPC, EDQUOT) raised by any write, naming the file
    (when the error does) and the free space there (or in ``directory``); None for other errors."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = err.filename or directory
    space = free_space(Path(where).parent if err.filename else where) if where else "free space unknown"
    return f"no space left on device writing {where or 'a file'} ({space}). Free space or choose another train.output_dir"


def _write_failure(err: BaseException, path: Path) -> Optional[CheckpointWriteError]:
    """The one-line error for a failed checkpoint write, None for errors that are not about writing."""
    if isinstance(err, OSError):
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "no space left on device"
        else:
            what = f"{err.strerror or err}"
    elif isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_FAILURES):
        first = " ".join(str(err).split())[:160]
        what = f"the write came up short, the disk is probably full (torch: {first})"
    else:
        return None
    kept = f"; the previous {path.name} is intact" if path.exists() else ""
    return CheckpointWriteError(f"cannot write checkpoint {path}: {what} ({free_space(path.parent)} on that file "
                                f"system){kept}. Free space or choose another train.output_dir")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``.

    A run killed mid-write leaves the previous checkpoint intact. A failed write (a full disk:
    ``OSError`` ENOSPC, or torch's ``unexpected pos``) removes the temporary file and raises
    :class:`CheckpointWriteError` with one line naming ``path`` and the free space.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_failure(err, path) from err
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        failure = _write_failure(err, path)
        if failure is not None:
            raise failure from err
        raise
    return path


def rng_state() -> dict:
    """Every RNG a training step can draw from (python, numpy, torch CPU and CUDA)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load one of our checkpoints (a dict); a missing or unreadable file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this project (no 'model' entry)")
    return ckpt


def find_resume(path_or_dir: str | os.PathLike) -> Path:
    """``--resume`` accepts a checkpoint file or an output directory (then its checkpoint_last.pth)."""
    p = Path(path_or_dir)
    if p.is_dir():
        p = p / "checkpoint_last.pth"
    if not p.is_file():
        raise FileNotFoundError(f"nothing to resume: {p} does not exist")
    return p
