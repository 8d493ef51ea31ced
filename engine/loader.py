"""The project's one way to load data in worker processes: :class:`SafeDataLoader`, a ``DataLoader``
whose workers never keep a failed or finished run alive.

Signals: a batch scheduler (SIGTERM) or Ctrl-C (SIGINT) signals the whole process group, loader
workers included. A worker that died of it would make the main process fail mid-step instead of
saving a checkpoint at the end of the step, so workers ignore SIGTERM / SIGINT *while their parent
runs and uses them*. Once the main process shuts an iteration's workers down, or once the parent is
gone, the same signals end them at once.

Shutdown: every iteration over a ``SafeDataLoader`` shuts its workers down when it ends, whatever
ends it: the last batch, the consumer stopping early, an exception in a worker or in the consumer,
or the interpreter exiting with the iteration still open (an exception whose traceback keeps the
iterator alive). The workers are first asked to finish (torch's own shutdown: they exit after
their current batch); a worker still alive after that is killed (SIGKILL). Without this, a worker
that ignores SIGTERM would block the interpreter's exit for ever: ``multiprocessing`` terminates
(SIGTERM) and then joins its daemon children at exit.

Errors: an exception raised in a worker reaches the main process as a
:class:`DataLoaderWorkerError` whose message is the worker's own one-line error (which names the
file and record), with the worker's traceback in ``worker_traceback``.
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import signal
import sys
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader

log = logging.getLogger("engine")

__all__ = ["SafeDataLoader", "DataLoaderWorkerError", "report_worker_error", "shutdown_all", "live_worker_pids", "KILL_AFTER_S"]

KILL_AFTER_S = 2.0
"""Seconds a worker that did not exit when asked is given after SIGKILL to be reaped."""

# exception types that reading and decoding data raises (missing or broken files, bad records):
# user errors; anything else raised in a worker is a bug and keeps its traceback
DATA_ERROR_TYPES = (OSError, ValueError, RuntimeError)

_WORKER_ERROR = re.compile(r"^Caught (\w+) (in DataLoader worker process (\d+)|in pin memory thread[^.\n]*)\.\n"
                           r"Original (.*)$", re.S)


class DataLoaderWorkerError(RuntimeError):
    """An exception raised in a data-loading worker, re-raised in the main process.

    ``str()`` is the worker's error message (``type_name``: its exception class), ``where`` the
    worker, ``worker_traceback`` its full traceback; ``data_error`` is true for the exception types
    reading and decoding data raises (OSError, ValueError, RuntimeError): a user error."""

    def __init__(self, message: str, type_name: str, where: str, worker_traceback: str, data_error: bool) -> None:
        super().__init__(message)
        self.type_name, self.where, self.worker_traceback, self.data_error = type_name, where, worker_traceback, data_error

    def __reduce__(self):
        return type(self), (str(self), self.type_name, self.where, self.worker_traceback, self.data_error)


def _exception_part(tb: str) -> str:
    """The ``Type: message`` part that ends a formatted traceback (after its last frame)."""
    lines = tb.rstrip("\n").split("\n")
    last_frame = max((i for i, line in enumerate(lines) if line.startswith("  File ")), default=-1)
    i = last_frame + 1
    while last_frame >= 0 and i < len(lines) and lines[i].startswith(" "):
        i += 1  # the frame's source line and markers
    return "\n".join(lines[i:]).strip() or lines[-1].strip()


def worker_error(err: BaseException) -> Optional[DataLoaderWorkerError]:
    """The :class:`DataLoaderWorkerError` for ``err`` when torch re-raised it from a worker, else None."""
    m = _WORKER_ERROR.match(str(err.args[0]) if err.args and isinstance(err.args[0], str) else str(err))
    if m is None:
        return None
    type_name, where, tb = m.group(1), m.group(2), m.group(4)
    part = _exception_part(tb)
    head, sep, rest = part.partition(": ")
    message = rest if sep and " " not in head else part  # drop the "module.Type: " prefix
    worker = f"data-loading worker {m.group(3)}" if m.group(3) is not None else where.removeprefix("in ")
    data_error = isinstance(err, DATA_ERROR_TYPES)
    if not data_error:  # a bug: say which exception
        message = f"{type_name}: {message}"
    return DataLoaderWorkerError(f"{message} (in {worker})", type_name, worker, tb, data_error)


def report_worker_error(err: DataLoaderWorkerError, file=None) -> int:
    """Print ``err`` for the command line and return the exit code: a data error is one line
    ``error: ...`` (exit code 2, a user error); any other exception type is a bug: the worker's
    traceback, then that line (exit code 1)."""
    file = file if file is not None else sys.stderr
    if not err.data_error:
        print(f"{err.where} failed:\n{err.worker_traceback.rstrip()}", file=file)
    print(f"error: {err}", file=file, flush=True)
    return 2 if err.data_error else 1


# ---------------------------------------------------------------------- the worker side
def _worker_init(stopping: Any, parent_pid: int, user_init: Optional[Callable[[int], None]], worker_id: int) -> None:
    """``worker_init_fn`` of every :class:`SafeDataLoader`: SIGTERM / SIGINT are ignored while the
    parent runs and has not shut this iteration's workers down (``stopping``), and end the worker
    at once otherwise; then the loader's own ``worker_init_fn``."""

    def on_stop_signal(signum, frame):
        if stopping.value or os.getppid() != parent_pid:
            os._exit(0)  # exit code 0: the parent asked (or is gone); torch reports nothing

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_stop_signal)
    if user_init is not None:
        user_init(worker_id)


# ---------------------------------------------------------------------- the main-process side
class _Iteration:
    """One multi-process iteration: torch's iterator, its workers' stop flag; shut down once."""

    def __init__(self, it: Any, stopping: Any) -> None:
        self.it, self.stopping, self.closed = it, stopping, False

    def __del__(self) -> None:  # e.g. a loader with persistent workers that is dropped
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - at interpreter teardown anything may be gone
            pass

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        workers = list(getattr(self.it, "_workers", ()))
        self.stopping.value = 1  # from now on SIGTERM / SIGINT end these workers
        try:
            # torch's own shutdown: every worker is told to exit after its current batch and joined;
            # a no-op once the interpreter is shutting down
            self.it._shutdown_workers()
        except Exception as e:  # noqa: BLE001 - the workers are killed below in any case
            log.debug("loader shutdown: %s", e)
        alive = [w for w in workers if w.is_alive()]
        if not alive:
            return
        if getattr(self.it, "_worker_pids_set", False):  # torch's SIGCHLD check must not report the kill
            try:
                from torch.utils.data._utils import signal_handling
                signal_handling._remove_worker_pids(id(self.it))
                self.it._worker_pids_set = False
            except Exception as e:  # noqa: BLE001
                log.debug("loader shutdown: %s", e)
        for w in alive:
            try:
                w.kill()
            except (OSError, ValueError):
                pass
        for w in alive:
            try:
                w.join(timeout=KILL_AFTER_S)
            except (OSError, ValueError, AssertionError):
                pass


# the iterations not shut down yet; weak: an iteration lives as long as its generator (or, with
# persistent workers, its loader) does, and shuts its workers down when it goes
_LIVE: "weakref.WeakValueDictionary[int, _Iteration]" = weakref.WeakValueDictionary()


def shutdown_all() -> None:
    """Shut down the workers of every iteration still open (entry points on exit; at interpreter
    exit automatically, before ``multiprocessing`` would wait on them)."""
    for key in list(_LIVE):
        it = _LIVE.pop(key, None)
        if it is not None:
            it.shutdown()


def live_worker_pids() -> list[int]:
    """The process ids of the loader workers of the iterations still open (for tests)."""
    return [w.pid for it in list(_LIVE.values()) for w in getattr(it.it, "_workers", ()) if w.is_alive()]


# runs before multiprocessing's own exit handler (atexit runs in reverse order of registration) and
# before torch's, which turns its worker shutdown into a no-op
atexit.register(shutdown_all)


def _guarded(iteration: _Iteration, persistent: bool) -> Iterator:
    """Batches of ``iteration`` with worker errors translated and the workers shut down at the end."""
    key = id(iteration)
    _LIVE[key] = iteration
    completed = False
    try:
        while True:
            try:
                batch = next(iteration.it)
            except StopIteration:
                completed = True
                return
            except Exception as err:
                translated = worker_error(err)
                if translated is None:
                    raise
                raise translated from None
            yield batch
    finally:
        if not (completed and persistent):  # persistent workers live on for the next pass
            _LIVE.pop(key, None)
            iteration.shutdown()


class SafeDataLoader(DataLoader):
    """A ``torch.utils.data.DataLoader`` (same arguments) whose worker processes follow the module
    docstring: they ignore SIGTERM / SIGINT only while the main process uses them, are shut down
    (killed if need be) whenever an iteration ends, and report their errors as
    :class:`DataLoaderWorkerError`. A ``worker_init_fn`` given runs in each worker after the signal
    set-up. With ``num_workers=0`` it is a plain ``DataLoader``."""

    def __init__(self, *args, worker_init_fn: Optional[Callable[[int], None]] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._user_worker_init = worker_init_fn
        self._iteration: Optional[_Iteration] = None

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        persistent = bool(self.persistent_workers)
        if persistent and self._iterator is not None:
            if not self._iteration.closed:
                super().__iter__()  # the same workers, reset for a new pass
                return _guarded(self._iteration, True)
            self._iterator = None  # the last pass shut its workers down: start new ones
        ctx = self.multiprocessing_context or torch.multiprocessing
        stopping = ctx.RawValue("b", 0)  # shared with the workers; read in their signal handler
        self.worker_init_fn = functools.partial(_worker_init, stopping, os.getpid(), self._user_worker_init)
        iteration = _Iteration(super().__iter__(), stopping)
        if persistent:
            self._iteration = iteration
        return _guarded(iteration, persistent)
