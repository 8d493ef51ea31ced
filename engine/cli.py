"""The exit codes of the command-line entry points: a run's failure as one line on stderr.

``run_reporting_errors(fn, output_dir)`` runs ``fn`` and turns the failures a user can act on into
one ``error: ...`` line and an exit code: 2 for bad input (a config, a checkpoint, a data file), 1 for
a diverged run or a full disk, the loader's own code for a failed loader worker. Whatever ends the run,
no loader worker outlives it and the process group is torn down.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

from datasets.formats import DataError
from engine.checkpoint import CheckpointError, CheckpointWriteError, disk_full_message
from engine.config import ConfigError
from engine.distributed import cleanup
from engine.loader import DataLoaderWorkerError, report_worker_error, shutdown_all
from engine.trainer import NonFiniteLossError


def run_reporting_errors(fn: Callable[[], Optional[int]], output_dir: Optional[str] = None) -> int:
    """``fn()``'s exit code (0 for ``None``), or the exit code of the failure it raised, reported in one
    line. ``output_dir`` is where a full disk is looked for when the error does not name a file."""
    try:
        return int(fn() or 0)
    except DataLoaderWorkerError as err:  # e.g. images that cannot be read: one line naming them
        return report_worker_error(err)
    except (CheckpointError, ConfigError, DataError, FileNotFoundError) as err:  # bad input: the message names it
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:  # the run diverged: the message names the step
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk: one line naming the file and the free space
        message = str(err) if isinstance(err, CheckpointWriteError) else disk_full_message(err, output_dir)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        shutdown_all()  # no loader worker outlives the run, whatever ended it
        cleanup()
