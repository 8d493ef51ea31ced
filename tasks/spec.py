"""What a downstream task gives the fine-tuning driver (``tasks/finetune.py``) and what it gets.

A task is a :class:`TaskSpec`: its config class, the annotation files it reads, its data, its model
(built, and loaded from the checkpoint through :func:`load_weights`), its training batches and
step, its :class:`Evaluator` and, where it has one, its :class:`Predictor` (``--predict``). The
task's functions get a :class:`Run` (config, processes, mode, checkpoint, tokenizer).

Every task loads checkpoint weights through :func:`load_state` (printed and checked by
:func:`show_report`, both at once by :func:`load_weights`); from scratch the encoders start from
the weight files the config names (:func:`init_encoders`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Protocol

import torch
from torch import nn

from engine import distributed as D
from engine.checkpoint import atomic_write
from engine.trainer import TrainState
from models.loading import LoadReport, load_checkpoint_into, load_encoder_weights
from tasks.train_data import SampledTrainData

__all__ = ["Evaluator", "Predictor", "TaskSpec", "Run", "MODE_FLAGS", "mode_flags", "autocast_for", "write_json", "load_state",
           "show_report", "load_weights", "init_encoders"]

MODE_FLAGS = {"evaluate": "evaluate", "zero_shot": "zero-shot", "predict": "predict"}


class Evaluator(Protocol):
    """A task's evaluation, built once per run (``TaskSpec.evaluator``)."""

    def validate(self, model: nn.Module, epoch: int) -> Optional[dict]:
        """The val metrics after a training epoch (None: no val split); may print and write files."""

    def test(self, model: nn.Module, checkpoint: Optional[str], extra: dict) -> dict:
        """The final evaluation of ``checkpoint``'s weights in ``model``: prints and writes the
        results (with ``extra``: mode, selection) and returns them."""


@dataclass(frozen=True, eq=False)  # compared and hashed by identity (its flags are a dict)
class Predictor:
    """A task's ``--predict INPUT...``: one JSON object per prediction on stdout, in one process.
    ``predict(pipeline, inputs, args)`` gets an ``inference.Pipeline`` over the loaded checkpoint, the
    inputs and the parsed command line (its own ``flags``); ``check`` runs before anything is loaded."""

    help: str
    metavar: str
    predict: Callable[[Any, list[str], Any], list[dict]]
    flags: dict = dataclasses.field(default_factory=dict)  # the task's own predict flags -> argparse kwargs
    check: Optional[Callable[[list[str], Any], None]] = None


@dataclass(frozen=True)
class TaskSpec:
    """What a downstream task gives the driver (see the module docstring)."""

    name: str  # "vqa": the checkpoints' "task", the resume allow-list of tasks/resume.py
    title: str  # "VQA", in messages
    config_cls: type  # a tasks.finetune_config.FinetuneConfig
    files: Callable[[Any, bool], list[str]]  # (cfg, training) -> the annotation files the run reads
    files_hint: str  # where to get them
    data: Callable[["Run"], Any]  # the datasets (anything the task's other functions read)
    texts: Callable[[Any], list[str]]  # (data) -> texts a new vocabulary is trained on
    build_model: Callable[["Run", Optional[dict]], nn.Module]  # the model, loaded from the checkpoint dict (or None)
    train_data: Callable[["Run", Any], SampledTrainData]
    train_step: Callable[["Run", nn.Module, dict, TrainState], dict]  # -> loss and logs, "_pairs"
    evaluator: Callable[["Run", Any], Evaluator]
    metric: Callable[[Any], tuple[str, str]]  # cfg -> (val metric key selecting checkpoint_best.pth, its name)
    best_key: str  # results key of the best val value
    val_split: str = "val"
    task_part: Optional[str] = None  # what only the task's fine-tuned checkpoints have ("answer decoder")
    is_task_state: Optional[Callable[[dict], bool]] = None  # a state dict has it
    adapt_tokenizer: Optional[Callable[["Run", Any, Any, Optional[dict]], Any]] = None  # (run, data, tok, source)
    describe: Optional[Callable[["Run", Any, nn.Module], Optional[str]]] = None  # printed before the work
    find_unused: Callable[[Any], bool] = lambda cfg: False  # DDP find_unused_parameters
    zero_shot: bool = False  # --zero-shot: evaluate a pre-trained checkpoint as it is
    predictor: Optional[Predictor] = None
    extra_state: Optional[Callable[["Run", Any], dict]] = None  # (run, data) -> entries every checkpoint holds
    # the model to evaluate (and to load the selected checkpoint's "model" section into) inside what
    # build_model returns: the model itself, or the training objective that holds it
    evaluated_model: Callable[[nn.Module], nn.Module] = lambda module: module

    @property
    def modes(self) -> tuple[str, ...]:
        return ("finetune", "evaluate") + (("zero_shot",) if self.zero_shot else ()) + (
            ("predict",) if self.predictor is not None else ())


@dataclass
class Run:
    """What a task's functions get: the run's config (model section resolved, vocabulary set once
    the tokenizer exists), processes, mode, checkpoint paths and tokenizer."""

    cfg: Any
    dist: D.DistInfo
    mode: str = "finetune"
    checkpoint: Optional[str] = None
    resume: Optional[str] = None
    tokenizer: Any = None

    @property
    def training(self) -> bool:
        return self.mode == "finetune"

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    def autocast(self) -> Callable[[], ContextManager]:
        return autocast_for(self.cfg.train.precision, self.dist.device)


def autocast_for(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """The evaluation autocast context for ``train.precision``."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def write_json(obj: Any, path: Path, indent: Optional[int] = 1) -> None:
    """Write JSON atomically (``engine.checkpoint.atomic_write``)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent).encode("utf-8")))


# ---------------------------------------------------------------------- weights
def load_state(module: nn.Module, state: dict, source: str, *, prefix: str = "",
               expected_missing: Optional[dict[str, str]] = None, resized: tuple[str, ...] = ()) -> LoadReport:
    """Load a checkpoint's model ``state`` into ``module`` (its keys under ``prefix``) with an explicit
    report (``models.loading.load_checkpoint_into``: ALBEF / BLIP names are converted; a pre-training
    checkpoint's training-objective state, momentum copy and queues, is left out); ``resized`` keys
    (enlarged before loading) are reported as interpolated. Raises ``models.loading.LoadError`` on
    anything unexplained, before anything is loaded. Every task loads through here (the model section
    already comes from the checkpoint's config: ``tasks/finetune_config.py``)."""
    report = load_checkpoint_into(module, {"model": state}, source=source, prefix=prefix,
                                  expected_missing=expected_missing)
    report.interpolated.extend(k for k in resized if prefix + k in report.loaded)
    return report


def show_report(run: Run, report: LoadReport, what: str) -> LoadReport:
    """Print ``report`` (main process) and raise ``models.loading.LoadError`` on anything it does not explain."""
    if run.dist.is_main:
        print(f"{what}: {report.summary()}", flush=True)
    report.raise_if_unexpected()
    return report


def load_weights(run: Run, module: nn.Module, state: dict, **kwargs) -> LoadReport:
    """:func:`load_state` from the run's ``--checkpoint``, then :func:`show_report`."""
    return show_report(run, load_state(module, state, str(run.checkpoint), **kwargs), f"checkpoint {run.checkpoint}")


def init_encoders(run: Run, base: nn.Module) -> list[LoadReport]:
    """From scratch: a ``VLPModel``'s encoders from the weight files its config names
    (``models.loading.load_encoder_weights``; none: no report), each report shown."""
    return [show_report(run, r, r.source) for r in load_encoder_weights(base)]


def mode_flags(spec: TaskSpec) -> dict[str, dict]:
    """The mode flags of ``spec``'s command line (argparse keyword arguments by flag)."""
    flags = {"--evaluate": {"action": "store_true",
                            "help": "evaluate --checkpoint (fine-tuned) on the test split only"}}
    if spec.zero_shot:
        flags["--zero-shot"] = {"action": "store_true", "help": "evaluate a pre-trained checkpoint without fine-tuning"}
    if spec.predictor is not None:
        flags["--predict"] = {"nargs": "+", "default": None, "metavar": spec.predictor.metavar,
                              "help": spec.predictor.help}
        flags.update(spec.predictor.flags)
    return flags
