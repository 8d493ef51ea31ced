"""Where the training log goes: ``log.jsonl`` always, and optionally TensorBoard and Weights & Biases
(``train.loggers: [jsonl, tensorboard, wandb]``). Every record that goes to ``log.jsonl`` goes to each
sink with its step; the optional sinks take its numeric values.

TensorBoard writes event files into ``<output_dir>/tensorboard``; on a resume it drops the events
after the resumed step (``purge_step``), as ``log.jsonl`` is truncated there. W&B logs into
``<output_dir>/wandb``, offline by default (``train.wandb_mode``; ``wandb sync`` uploads later).
"""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

LOGGERS = ("jsonl", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class LoggerError(ValueError):
    """A sink that cannot start (its package is missing): the message names the key and the package."""


class Sink(Protocol):
    def log(self, record: dict, step: int) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict) -> dict[str, float]:
    """The finite numeric values of a log record (the step and non-numbers left out)."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, numbers.Real)
            and not isinstance(v, bool) and math.isfinite(float(v))}


class JsonlSink:
    """One JSON line per record in ``path`` (appended)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def log(self, record: dict, step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardSink:
    def __init__(self, log_dir: Path, purge_step: Optional[int] = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise LoggerError("train.loggers: 'tensorboard' needs the tensorboard package (pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, record: dict, step: int) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, out_dir: Path, project: str, mode: str, config: Optional[dict], resume_step: Optional[int]) -> None:
        try:
            import wandb
        except ImportError:
            raise LoggerError("train.loggers: 'wandb' needs the wandb package (pip install wandb)") from None
        out_dir.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=project, dir=str(out_dir), mode=mode, config=config or {},
                              name=out_dir.name, reinit="create_new")
        self.resume_step = resume_step

    def log(self, record: dict, step: int) -> None:
        self.run.log(scalars(record), step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """The run's sinks (main process only); ``log(record)`` sends a record with its ``step`` to each."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)

    def log(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for sink in self.sinks:
            sink.log(record, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def check_logger_names(names: Sequence[str]) -> None:
    """``ValueError`` naming ``train.loggers`` for an unknown or repeated name, or a list without jsonl."""
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ValueError(f"train.loggers: unknown logger(s) {unknown}; choose from {list(LOGGERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"train.loggers: {list(names)} names a logger twice")
    if "jsonl" not in names:
        raise ValueError("train.loggers must include 'jsonl' (log.jsonl is what resume, the tools and the tests read)")


def build_loggers(names: Sequence[str], out_dir: Path, resume_step: Optional[int] = None, config: Optional[dict] = None,
                  wandb_project: str = "srcl-vlp", wandb_mode: str = "offline") -> Loggers:
    """The sinks ``names`` for a run writing into ``out_dir`` (call on the main process only)."""
    check_logger_names(names)
    out_dir = Path(out_dir)
    sinks: list[Any] = []
    for name in names:
        if name == "jsonl":
            sinks.append(JsonlSink(out_dir / "log.jsonl"))
        elif name == "tensorboard":
            sinks.append(TensorBoardSink(out_dir / "tensorboard", purge_step=resume_step))
        else:
            sinks.append(WandbSink(out_dir, wandb_project, wandb_mode, config, resume_step))
    return Loggers(sinks)
