"""Checkpoints: atomic writes, RNG state capture, and loading with clear errors.

Every checkpoint file is read by :func:`read_torch_file`: ``torch.load(weights_only=True)`` with
the small allow-list :data:`ALLOWED_GLOBALS`, so that no code from the file ever runs. A file
that needs anything else is refused with a :class:`CheckpointError` that names it.
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Optional

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


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` through ``write(binary file)`` into a temporary file of the same directory
    (``NAME.XXXXXXXX.tmp``), fsync, then rename over ``path``.

    A run killed mid-write leaves the previous file intact (``engine/rundir.py`` removes such
    temporary files at the next start). A failed write (a full disk: ``OSError`` ENOSPC, or torch's
    ``unexpected pos``) removes the temporary file and raises :class:`CheckpointWriteError` with one
    line naming ``path`` and the free space.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_failure(err, path) from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`: a killed or failed write keeps the previous checkpoint."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def rng_state() -> dict:
    """Every RNG a training step can draw from (python, numpy, torch CPU and CUDA).

    Plain values and tensors only: numpy's state is stored with its key as a list of ints (not an
    ndarray), so that a checkpoint loads with torch's weights-only reader and nothing else."""
    np_state = np.random.get_state()  # ("MT19937", uint32 key array, pos, has_gauss, cached_gaussian)
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`; numpy's key may be a list of ints or an ndarray (older checkpoints)."""
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or not without running code from it; the message is one
    line that names the file (the command-line tools print it and exit with status 2)."""


def _allowed_globals() -> list[tuple[Any, str]]:
    """``(object, pickle name)`` pairs a checkpoint of this project may need beyond what
    ``torch.load(weights_only=True)`` allows by default (tensors, storages, ``OrderedDict``, plain
    Python values). Checkpoints written by earlier versions of this project hold numpy's RNG state as
    a ``uint32`` ndarray: reading it back takes numpy's array reconstructor (named
    ``numpy._core.multiarray`` by numpy 2, ``numpy.core.multiarray`` by numpy 1), the ndarray and
    dtype classes, and the ``uint32`` dtype class (its state is set when unpickled). These only build
    arrays of numbers; no other numpy type, no function, no class of any other library is allowed."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    uint32 = type(np.dtype(np.uint32))
    return [(_reconstruct, "numpy._core.multiarray._reconstruct"),
            (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype"),
            (uint32, f"{uint32.__module__}.{uint32.__qualname__}")]


ALLOWED_GLOBALS: tuple[str, ...] = tuple(name for _, name in _allowed_globals())


def _refusal(path: Path, err: Exception) -> str:
    """The one-line reason why ``torch.load`` (weights only) could not read ``path``."""
    text = " ".join(str(err).split())
    reason = text.split("WeightsUnpickler error:", 1)[-1].split(" Check the documentation of torch.load", 1)[0].strip()
    try:  # every global the pickle names, from its opcodes (nothing is run); zip checkpoints only
        needs = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in ALLOWED_GLOBALS]
    except Exception:  # noqa: BLE001 - a legacy or broken file: the reason may still name it
        needs = []
    if not needs:
        named = re.search(r"GLOBAL (\S+)|but got <class '([^']+)'>|unrecognized function (\S+)", reason)
        needs = [next(g for g in named.groups() if g)] if named else []
    if needs:
        return (f"refused to load {path}: it needs {', '.join(needs)}, which a checkpoint may not hold (only "
                "tensors, numbers, strings, lists and dicts); nothing from the file was run. Save only its tensors and "
                "plain values (state dicts, with torch.save or safetensors) where the file was made")
    return (f"cannot read checkpoint {path} (truncated, or not a file written by torch.save): "
            f"{type(err).__name__}: {reason[:300] or 'the file ends early'}")


def read_torch_file(path: str | os.PathLike) -> Any:
    """Read a ``torch.save`` file without running code from it: ``torch.load(weights_only=True)``
    with :data:`ALLOWED_GLOBALS` allowed for this call only, on the CPU.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file needs more than the allow-list (the message names which global),
            or is not readable at all (truncated, not a torch file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised as one line naming the file
        raise CheckpointError(_refusal(path, err)) from err


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load one of our checkpoints (a dict with a ``model`` entry) with :func:`read_torch_file`; a
    missing, unreadable or unsafe file is a clear error."""
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model' entry)")
    return ckpt


def find_resume(path_or_dir: str | os.PathLike) -> Path:
    """``--resume`` accepts a checkpoint file or an output directory (then its checkpoint_last.pth)."""
    p = Path(path_or_dir)
    if p.is_dir():
        p = p / "checkpoint_last.pth"
    if not p.is_file():
        raise FileNotFoundError(f"nothing to resume: {p} does not exist")
    return p
