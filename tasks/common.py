"""Pieces every task shares: tokenizer set-up and moving batches to the device; for the fine-tuning
tasks (caption, VQA, NLVR2, retrieval) also the start of a run, the training batches of a map-style
dataset (with the bad-image check), the trainer, the load reports and the selected checkpoint at the
end. Weights load through ``models/loading.py``; the section at the end loads a checkpoint into a
``VLPModel`` that holds its own momentum encoders and queues."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch
from torch.utils.data import Dataset

from datasets.formats import TooManyBadImagesError
from datasets.text import load_tokenizer, tokenizer_from_state, tokenizer_state, train_wordpiece_tokenizer
from engine import distributed as D
from engine.checkpoint import atomic_write, load_checkpoint
from engine.config import opt
from engine.loader import SafeDataLoader
from engine.rundir import OutputDir
from engine.trainer import EpochBatchSampler, Trainer, TrainConfig, grouped, setup_logging
from models.loading import Converted, LoadReport, load_checkpoint_into, load_encoder_weights, load_into

log = logging.getLogger("tasks")

SYNTHETIC_HINT = ("To try the project without downloading data, run the synthetic demo: "
                  "python run_pretrain.py --config configs/demo/pretrain.yaml")

@dataclass
class TokenizerConfig:
    path: Optional[str] = opt(None, "local directory with vocab.txt (e.g. bert-base-uncased); null = train a WordPiece vocabulary on the training captions (fine-tuning takes the checkpoint's tokenizer)")
    vocab_size: int = opt(2000, "vocabulary size when training one from the captions")
    max_length: int = opt(30, "maximum tokens per text (longer ones are truncated)")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def require_files(paths: list[str], what: str, how_to_get: str) -> None:
    """A clear error naming the first missing annotation file, how to get it, and the demo."""
    for f in paths:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{what} file not found: {f}. {how_to_get} {SYNTHETIC_HINT}")


def require_image_root(image_root: str, samples: list[str] = (), key: str = "data.image_root") -> None:
    """A clear error naming ``key`` before any data loader starts: when the directory ``image_root``
    does not exist, or when none of ``samples`` (full paths of the first few images the annotations
    name) exists, so that every image would fail to load."""
    if not Path(image_root).is_dir():
        raise FileNotFoundError(f"{key}={image_root}: no such directory (the annotations' image paths are "
                                f"relative to it). {SYNTHETIC_HINT}")
    if samples and not any(os.path.isfile(f) for f in samples):
        raise FileNotFoundError(f"{key}={image_root}: none of the first {len(samples)} images of the annotations "
                                f"is there (the first: {samples[0]}); is it the folder their image paths are "
                                "relative to?")


def make_tokenizer(cfg: TokenizerConfig, texts: Callable[[], list[str]], checkpoint: Optional[dict] = None):
    """The checkpoint's tokenizer when there is one, else a local vocab.txt directory, else a
    WordPiece vocabulary trained on ``texts()`` (main process; broadcast to the others)."""
    if checkpoint is not None and "tokenizer" in checkpoint:
        return tokenizer_from_state(checkpoint["tokenizer"])
    if cfg.path:
        return load_tokenizer(cfg.path)
    state = tokenizer_state(train_wordpiece_tokenizer(texts(), cfg.vocab_size)) if D.is_main() else None
    return tokenizer_from_state(D.broadcast_object(state))


# ---------------------------------------------------------------------- the fine-tuning tasks
def start_run(train: TrainConfig, out: Optional[OutputDir] = None) -> D.DistInfo:
    """The start of a fine-tuning run: processes (``train.device``, ``train.dist_timeout_s``), logging, ``train.num_threads``,
    and the output directory claimed (``out``, see :class:`engine.rundir.OutputDir`)."""
    dist = D.init_distributed(train.device, timeout_s=train.dist_timeout_s)
    setup_logging(dist.is_main)
    if train.num_threads > 0:
        torch.set_num_threads(train.num_threads)
    if out is not None:
        out.open(dist)
    return dist


def with_vocab(cfg, tokenizer):
    """``cfg`` with ``model.text.vocab_size`` set to the tokenizer's size."""
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, text=dataclasses.replace(cfg.model.text, vocab_size=len(tokenizer))))


def saved_run_config(cls: type, data: dict):
    """The run config ``data`` saved in a checkpoint, as ``cls``. Its ``train.device`` describes the
    machine that trained, not this one: it is read as ``auto`` (so that a CUDA run's checkpoint
    loads on a machine without CUDA)."""
    from engine.config import from_dict
    data = dict(data)
    if isinstance(data.get("train"), dict):
        data["train"] = {**data["train"], "device": "auto"}
    return from_dict(cls, data)


def require_fraction(key: str, value: float) -> None:
    """``ValueError`` naming the config ``key`` unless 0 <= ``value`` < 1 (for ``validate()``)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{key} must be in [0, 1); got {value}")


def autocast_for(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """The evaluation autocast context for ``train.precision``."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def write_json(obj: Any, path: Path, indent: Optional[int] = 1) -> None:
    """Write JSON atomically (``engine.checkpoint.atomic_write``)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent).encode("utf-8")))


def require_positive(key: str, value: int) -> None:
    """``ValueError`` naming the config ``key`` when ``value`` is not positive (for ``validate()``)."""
    if value <= 0:
        raise ValueError(f"{key} must be positive; got {value}")


# ---------------------------------------------------------------------- load reports
def print_reports(dist: D.DistInfo, reports: list[LoadReport], what: str = "") -> list[LoadReport]:
    """Print each report's summary (main process), after ``what`` when given; returns ``reports``."""
    for r in reports if dist.is_main else ():
        print(f"{what}: {r.summary()}" if what else r.summary(), flush=True)
    return reports


def load_selected_checkpoint(model: torch.nn.Module, out_dir: Path) -> tuple[Path, dict, bool]:
    """Load into ``model`` the checkpoint a fine-tuning run selected: ``checkpoint_best.pth`` (best
    val metric) when the run wrote one, else ``checkpoint_last.pth``. Returns the path, the
    checkpoint dict and whether it is the best one."""
    best = out_dir / "checkpoint_best.pth"
    chosen = best if best.is_file() else out_dir / "checkpoint_last.pth"
    ckpt = load_checkpoint(chosen)
    load_into(model, ckpt["model"], source=str(chosen))
    return chosen, ckpt, chosen == best


# ---------------------------------------------------------------------- training
def build_trainer(cfg: Any, model: torch.nn.Module, dist: D.DistInfo, find_unused: bool = False) -> Trainer:
    """The :class:`~engine.trainer.Trainer` of a task config with ``train``, ``optim`` and ``schedule``
    sections, over ``model.param_groups(lr, lr_vision, weight_decay)``."""
    o = cfg.optim
    return Trainer(cfg.train, o, cfg.schedule, model, model.param_groups(o.lr, o.lr_vision, o.weight_decay),
                   dist, cfg, find_unused=find_unused)


class BadImageCheck:
    """Stops training when too many images fail to load; called in the main process on every training
    batch, before it is used.

    Counts the images tried (the batch's samples, the rows of ``batch[size_key]``, plus its failed
    tries, ``batch["bad_images"]``: ``(path, reason)`` pairs) and the DISTINCT paths that failed, warning
    once per path. Stops with :class:`~datasets.formats.TooManyBadImagesError` (one line naming
    ``data.max_bad_fraction`` and ``data.image_root``) when, once ``check_after`` images were tried,
    more than ``max_bad_fraction`` of them are distinct bad images; at once when the bad images are
    more than ``max_bad_fraction`` of all ``num_images`` of the training set (then the fraction is
    exceeded whatever is seen later), or a sample found no loadable image (``batch["failed"]``)."""

    def __init__(self, max_bad_fraction: float, check_after: int, image_root: str, size_key: str,
                 num_images: Optional[int] = None) -> None:
        self.max_bad_fraction, self.check_after, self.image_root = max_bad_fraction, check_after, image_root
        self.size_key, self.num_images = size_key, num_images
        self.tried = 0
        self.bad_paths: dict[str, str] = {}  # path -> reason

    @classmethod
    def from_data(cls, data: Any, size_key: str, num_images: Optional[int] = None) -> "BadImageCheck":
        """From a ``data`` config section (``max_bad_fraction``, ``bad_check_after``, ``image_root``)."""
        return cls(data.max_bad_fraction, data.bad_check_after, data.image_root, size_key, num_images)

    @property
    def bad(self) -> int:
        """Distinct images that failed to load so far."""
        return len(self.bad_paths)

    def __call__(self, batch: dict) -> None:
        failures = batch.get("bad_images", ())
        self.tried += batch[self.size_key].shape[0] + len(failures)
        for path, reason in failures:
            if path not in self.bad_paths:
                self.bad_paths[path] = reason
                log.warning("skipping unreadable image %s (%s)", path, reason)
        f, n = self.max_bad_fraction, self.bad
        of_all = self.num_images is not None and n > f * self.num_images
        if batch.get("failed") or of_all:
            total = f" of the {self.num_images} images of the training set" if self.num_images is not None else ""
            raise TooManyBadImagesError(
                f"{n} distinct training images failed to load, more than data.max_bad_fraction={f}{total} "
                f"(the last: {next(reversed(self.bad_paths), '?')}); check data.image_root={self.image_root}")
        if self.tried >= self.check_after and n / self.tried > f:
            raise TooManyBadImagesError(
                f"{n} distinct training images of {self.tried} tried failed to load (more than "
                f"data.max_bad_fraction={f}; the last: {next(reversed(self.bad_paths))}); the warnings above "
                f"name them. Check data.image_root={self.image_root}")

    def log_state(self) -> dict:
        """The counts for log.jsonl: ``data/bad_images`` (distinct) and ``data/images_tried``."""
        return {"data/bad_images": self.bad, "data/images_tried": self.tried}


def validate_image_data(data: Any) -> None:
    """The checks of a training data section with ``max_bad_fraction``, ``bad_check_after`` and
    ``max_image_pixels`` (for ``validate()``)."""
    require_fraction("data.max_bad_fraction", data.max_bad_fraction)
    if data.bad_check_after < 0:
        raise ValueError(f"data.bad_check_after must be >= 0; got {data.bad_check_after}")
    if data.max_image_pixels is not None:
        require_positive("data.max_image_pixels", data.max_image_pixels)


class SampledTrainData:
    """The training batches of a map-style dataset (with ``set_epoch``): an
    :class:`~engine.trainer.EpochBatchSampler` (deterministic, exact resume) over ``train.batch_size``,
    a ``DataLoader`` with ``collator``, micro-batches grouped per optimiser step (``train.grad_accum``),
    each passed to ``bad_images`` (when given) and moved to the device.

    ``loader_seed``: seed of the loader's own generator (then the global RNG is left alone); ``None``
    lets the loader draw its worker seed from the global RNG."""

    def __init__(self, dataset: Dataset, collator: Callable[[list], dict], train: TrainConfig, dist: D.DistInfo,
                 num_workers: int, bad_images: Optional[BadImageCheck] = None,
                 loader_seed: Optional[int] = None) -> None:
        self.dataset, self.collator, self.dist, self.num_workers = dataset, collator, dist, num_workers
        self.grad_accum, self.bad_images, self.loader_seed = train.grad_accum, bad_images, loader_seed
        self.sampler = EpochBatchSampler(len(dataset), train.batch_size, train.grad_accum,
                                         dist.rank, dist.world_size, train.seed)

    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch."""
        return self.sampler.steps_per_epoch()

    def batches(self, epoch: int, start_step: int) -> Iterator[list[dict]]:
        """The micro-batches of each optimiser step of ``epoch`` from ``start_step`` on, on the device."""
        self.dataset.set_epoch(epoch)
        self.sampler.set_position(epoch, start_step)
        generator = None if self.loader_seed is None else torch.Generator().manual_seed(self.loader_seed)
        loader = SafeDataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=self.collator,
                                num_workers=self.num_workers, pin_memory=self.dist.device.type == "cuda",
                                generator=generator)
        for group in grouped(loader, self.grad_accum):
            if self.bad_images is not None:
                for b in group:
                    self.bad_images(b)
            yield [to_device(b, self.dist.device) for b in group]


class SampledTrainTask:
    """Base of the tasks whose training data is a :class:`SampledTrainData` in ``self.train_data``:
    gives them ``steps_per_epoch`` and ``train_batches`` of ``engine.trainer.Task``."""

    train_data: SampledTrainData

    def steps_per_epoch(self) -> int:
        return self.train_data.steps_per_epoch()

    def train_batches(self, epoch: int, start_step: int) -> Iterator[list[dict]]:
        return self.train_data.batches(epoch, start_step)

    def log_state(self) -> dict:
        """Counters for log.jsonl (see ``engine.trainer.Task``): the bad-image counts, when checked."""
        check = self.train_data.bad_images
        return check.log_state() if check is not None else {}


# ====================================================================== momentum state inside VLPModel
# Checkpoints keep the training objective's state (momentum encoders, feature queues) apart from the model's
# (models.loading.split_objective_state, LoadReport.objective). VLPModel(momentum=True) still holds that
# state itself: this section loads it there, and goes when the training objective holds it.
_ONLINE = {"visual_m": "visual", "text_m": "text", "vision_proj_m": "vision_proj", "text_proj_m": "text_proj"}


def load_vlp(model: torch.nn.Module, checkpoint: Any = None, *, source: Optional[str] = None,
             fresh_queues: bool = False, allow_mismatch: bool = False) -> list[LoadReport]:
    """Load ``checkpoint`` (a path or a read checkpoint, ``models.loading.load_checkpoint_into``) or, without
    one, the encoder weight files ``model.cfg`` names (``models.loading.load_encoder_weights``) into a
    ``VLPModel``. A model with momentum encoders gets the checkpoint's objective part there: a momentum
    encoder the checkpoint lacks is a copy of the loaded online one; the queues start empty when
    ``fresh_queues``, absent or of another size. Returns the reports (one for a checkpoint)."""
    if not getattr(model, "has_momentum", False) or checkpoint is None:
        if checkpoint is not None:
            return [load_checkpoint_into(model, checkpoint, source=source, allow_mismatch=allow_mismatch)]
        reports = load_encoder_weights(model)
        if reports and getattr(model, "has_momentum", False):
            model.copy_params_to_momentum()
        return reports
    online, momentum = torch.nn.Module(), torch.nn.Module()  # views sharing the model's tensors
    for name, child in model.named_children():
        setattr(momentum if name in _ONLINE else online, name, child)
    for name, p in model.named_parameters(recurse=False):
        online.register_parameter(name, p)
    for name, b in model.named_buffers(recurse=False):
        momentum.register_buffer(name, b)
    online.cfg = model.cfg
    report = load_checkpoint_into(online, checkpoint, source=source, allow_mismatch=allow_mismatch)
    own, loaded = momentum.state_dict(), online.state_dict()
    state = Converted({k: v for k, v in report.objective.items() if "." in k}, report.layout)
    state.interpolated = list(getattr(report.objective, "interpolated", []))
    queues = {k: v for k, v in report.objective.items() if "." not in k}
    image = queues.get("image_queue")
    why = ("queues start empty" if fresh_queues else "no usable queue in this checkpoint: starts empty" if image is None
           else f"queue of another size ({tuple(image.shape)} vs the model's {tuple(own['image_queue'].shape)}): "
                "re-initialised (empty)" if image.shape != own["image_queue"].shape else None)
    if why is None:
        state.update(queues)
    else:
        state.dropped.update({k: why for k in queues})
        state.expected_missing.update({k: why for k in own if "." not in k})
    for k in ("image_queue_h", "text_queue_h"):
        state.expected_missing.setdefault(k, "helper-feature queue (SRCL helper model): starts empty")
        if k in state and k not in own:
            state.dropped[k] = "helper-feature queue: this run has no helper model"
            del state[k]
    for mom, on in _ONLINE.items():
        if not any(k.startswith(mom + ".") for k in state):
            state.update({k: loaded[on + k[len(mom):]] for k in own if k.startswith(mom + ".")})
            report.notes.append(f"no momentum copy {mom} in the checkpoint: copied from {on}")
    part = load_into(momentum, state, source=report.source, allow_mismatch=allow_mismatch)
    for k in report.objective:
        report.expected_unexpected.pop(k, None)
    report.unexpected = [k for k in report.unexpected if k not in report.objective] + part.unexpected
    for name in ("loaded", "missing", "interpolated", "mismatched"):
        getattr(report, name).extend(getattr(part, name))
    report.expected_missing.update(part.expected_missing)
    report.expected_unexpected.update(part.expected_unexpected)
    return [report]
