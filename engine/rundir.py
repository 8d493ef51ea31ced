"""The output directory of a run (``train.output_dir``): one run at a time, no silent replacement of
another run's checkpoints, no orphaned temporary files, and a ``log.jsonl`` that a resume continues
without repeating steps.

- :class:`OutputDir` claims the directory for a run: a lock (``fcntl.flock`` on :data:`LOCK_NAME`,
  exclusive for training, shared for evaluation-only runs; the kernel drops it when the process
  ends, also after ``kill -9``, so a stale lock never blocks), then, for training, refuses a new run
  where a previous run left checkpoints or a log (``--resume`` continues it, ``--overwrite``
  replaces it), and removes the temporary files of writes that a killed run left behind.
- :func:`truncate_log` drops the ``log.jsonl`` lines a resumed run will write again.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Optional

from engine import distributed as D
from engine.checkpoint import atomic_write
from engine.config import ConfigError

log = logging.getLogger("engine")

LOCK_NAME = ".run.lock"
LOG_NAME = "log.jsonl"
# temporary files of this project's writers: engine.checkpoint.atomic_write (checkpoints, log.jsonl,
# result JSONs: NAME.XXXXXXXX.tmp) and engine.config.save_config (NAME.tmp; JSONs of earlier versions too)
TMP_PATTERNS = (re.compile(r".+\.(pth|jsonl|json)\.[a-z0-9_]{8}\.tmp"), re.compile(r".+\.(yaml|json)\.tmp"))


class OutputDirError(ConfigError):
    """The output directory cannot be used by this run; the message says why and what to do."""


def previous_run_files(path: Path) -> list[str]:
    """The files in ``path`` that a training run writes and a new run would replace or mix with
    (checkpoints and the log), sorted."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir()
                  if p.is_file() and (p.name == LOG_NAME or (p.name.startswith("checkpoint") and p.suffix == ".pth")))


def remove_orphaned_tmp(path: Path) -> list[str]:
    """Remove the temporary files of interrupted writes (only this project's name patterns, only
    directly in ``path``); returns their names. Call it only while holding the directory's lock."""
    removed = []
    if not path.is_dir():
        return removed
    for p in sorted(path.iterdir()):
        if p.is_file() and any(rx.fullmatch(p.name) for rx in TMP_PATTERNS):
            p.unlink()
            removed.append(p.name)
    return removed


def _resume_dir(resume: str) -> Path:
    p = Path(resume)
    return p if p.is_dir() else p.parent


class OutputDir:
    """Claims ``path`` for one run (see the module docstring). ``training``: the run writes
    checkpoints (exclusive lock, previous-run check, temporary-file clean-up); otherwise it only
    evaluates (shared lock: evaluations may run side by side, not beside a training run).
    ``resume``: the ``--resume`` argument; ``overwrite``: replace a previous run's checkpoints and log.

    Use :meth:`open` once the processes are set up (the main process checks and locks, every
    process raises the same :class:`OutputDirError`), and :meth:`close` (or ``with``) at the end."""

    def __init__(self, path: str | os.PathLike, training: bool = True, resume: Optional[str] = None,
                 overwrite: bool = False) -> None:
        self.path = Path(path)
        self.training, self.resume, self.overwrite = training, resume, overwrite
        self._fh = None

    def __enter__(self) -> "OutputDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self, dist: Optional[D.DistInfo] = None) -> "OutputDir":
        is_main = dist.is_main if dist is not None else D.is_main()
        error = None
        if is_main:
            try:
                self._open_main()
            except OutputDirError as err:
                error = str(err)
        error = D.broadcast_object(error)
        if error is not None:
            self.close()
            raise OutputDirError(error)
        return self

    def _open_main(self) -> None:
        if self.training and self.resume and self.overwrite:
            raise OutputDirError("--overwrite starts a new run and --resume continues one: pass only one of them")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        if not self.training:
            return
        previous = previous_run_files(self.path)
        if previous and self.overwrite:
            for name in previous:
                (self.path / name).unlink()
            print(f"--overwrite: removed the previous run's {', '.join(previous)} from {self.path}", flush=True)
        elif previous and self.resume is None:
            raise OutputDirError(
                f"train.output_dir {self.path} already holds a run ({_names(previous)}): continue it with "
                f"--resume {self.path}, choose another train.output_dir, or pass --overwrite to replace it")
        elif previous and _resume_dir(self.resume).resolve() != self.path.resolve():
            raise OutputDirError(
                f"train.output_dir {self.path} holds another run ({_names(previous)}) than the one resumed "
                f"from {self.resume}: resume into the resumed run's own folder (--set train.output_dir="
                f"{_resume_dir(self.resume)}) or into an empty one")
        removed = remove_orphaned_tmp(self.path)
        if removed:
            log.info("removed %d temporary file(s) of interrupted writes from %s: %s", len(removed), self.path,
                     _names(removed))

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: no locking
            return
        fh = open(self.path / LOCK_NAME, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh, (fcntl.LOCK_EX if self.training else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            raise OutputDirError(
                f"train.output_dir {self.path} is in use by another run{f' ({holder})' if holder else ''}: wait "
                "for it to finish or choose another train.output_dir") from None
        if self.training:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            fh.flush()
        self._fh = fh

    def close(self) -> None:
        """Release the lock (idempotent)."""
        fh, self._fh = self._fh, None
        if fh is None:
            return
        try:
            import fcntl
            if self.training:
                fh.seek(0)
                fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
        finally:
            fh.close()


def _names(names: list[str], at_most: int = 4) -> str:
    shown = ", ".join(names[:at_most])
    return shown + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def truncate_log(path: str | os.PathLike, step: int, drop_eval_at_step: bool = False) -> int:
    """Drop the lines of a ``log.jsonl`` that a run resumed at optimiser step ``step`` writes again:
    those past ``step``, unreadable ones (a line cut by a kill), and with ``drop_eval_at_step`` the
    evaluation lines at ``step`` (the resumed run repeats an end-of-epoch evaluation the checkpoint
    does not include). Rewrites the file atomically; returns the number of lines dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            dropped += bool(line.strip())
            continue
        s = rec.get("step")
        if isinstance(s, (int, float)) and (s > step or (drop_eval_at_step and s == step
                                                          and any(k.startswith("eval/") for k in rec))):
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        atomic_write(path, lambda f: f.write("".join(x + "\n" for x in keep).encode("utf-8")))
        log.info("%s: dropped %d line(s) past the resumed step %d", path, dropped, step)
    return dropped
