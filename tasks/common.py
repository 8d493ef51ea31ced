"""Pieces every task shares: tokenizer set-up, loading a pre-trained checkpoint into a (possibly
differently sized) model, and moving batches to the device; for the fine-tuning tasks (caption, VQA,
NLVR2, retrieval) also the start of a run, the training batches of a map-style dataset (with the
bad-image check), the trainer, the load reports and the selected checkpoint at the end."""
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
from engine.config import ConfigError, opt
from engine.loader import SafeDataLoader
from engine.rundir import OutputDir
from engine.trainer import EpochBatchSampler, Trainer, TrainConfig, grouped, setup_logging
from models.vision import interpolate_pos_embed
from models.vlp import VLPConfig
from models.weights import LoadReport
from objectives.pretrain import checkpoint_states, moved_config_keys

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


def load_model_state(model: torch.nn.Module, state: dict, source: str = "checkpoint",
                     expected_missing: Optional[dict[str, str]] = None) -> LoadReport:
    """Copy ``state`` (our key names) into ``model`` with an explicit report:
    position embeddings are interpolated when the image size changed; keys the model lacks are
    reported as unexpected, keys the checkpoint lacks as missing (with the reason from
    ``expected_missing``, matched by key prefix).

    A state with ALBEF/BLIP names (``visual_encoder.*``, under any prefix) is first converted by the
    explicit key maps of ``models/convert.py``; the report then also lists what was dropped and why,
    and architecture mismatches (naming the config keys to set) as ``mismatched``."""
    from models.convert import convert_in_place
    state, foreign = convert_in_place(model, state)
    own = model.state_dict()
    report = LoadReport()
    fixed = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key]
        if key.endswith("pos_embed") and value.shape != target.shape:
            n_new = target.shape[1] - 1
            grid = int(round(n_new ** 0.5))
            value = interpolate_pos_embed(value, grid)
            report.interpolated.append(key)
        if value.shape != target.shape:
            report.mismatched.append(key)
            continue
        fixed[key] = value
        report.loaded.append(key)
    for key in own:
        if key not in state:
            report.missing.append(key)
            for prefix, why in (expected_missing or {}).items():
                if key.startswith(prefix):
                    report.expected_missing[key] = why
                    break
    # tied MLM decoder: shares the word embeddings
    model.load_state_dict({**own, **fixed}, strict=True)
    log.info("loaded %s: %d tensors", source, len(report.loaded))
    return foreign.finish(report) if foreign is not None else report


def load_pretrained(model: torch.nn.Module, path: str, expected_missing: Optional[dict[str, str]] = None,
                    prefix: str = "", allow_mismatch: bool = False) -> tuple[LoadReport, dict]:
    """Load one of our checkpoints (pre-training or a task's) into ``model`` (keys under ``prefix``):
    the checkpoint's model, without its training objective's state (momentum copy, queues); returns
    the report and the checkpoint dict (for its tokenizer and config).

    ALBEF and BLIP checkpoints are recognised by their key names and loaded through the explicit key
    maps of ``models/convert.py`` (which raise on anything unexplained unless ``allow_mismatch``); the
    returned dict then holds ``model`` (our names), ``layout`` and ``source_config`` (their config),
    and no ``config`` / ``tokenizer`` (those always mean ours)."""
    ckpt = load_checkpoint(path)
    model_state, _ = checkpoint_states(ckpt)
    if any(k.startswith("visual_encoder.") for k in model_state):  # ALBEF / BLIP names
        from models.convert import detect_layout, load_foreign_state
        layout = detect_layout(ckpt["model"])
        report = load_foreign_state(model, model_state, source=str(path), allow_mismatch=allow_mismatch,
                                    prefix=prefix or None, expected_missing=expected_missing)
        own = model.state_dict()
        state = {k[len(prefix):]: own[k] for k in report.loaded if k.startswith(prefix)}
        return report, {"model": state, "layout": layout, "source_config": ckpt.get("config")}
    state = {prefix + k: v for k, v in model_state.items()}
    report = load_model_state(model, state, source=path, expected_missing=expected_missing)
    return report, ckpt


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


# the base-model config keys that must equal the checkpoint's (image size and dropout may differ)
ARCH_KEYS = {"vision": ("patch_size", "width", "depth", "num_heads", "mlp_ratio", "pre_norm", "act"),
             "text": ("hidden_size", "num_text_layers", "num_fusion_layers", "num_heads", "intermediate_size",
                      "max_position_embeddings", "type_vocab_size"),
             "": ("embed_dim",)}


def check_architecture(model_cfg: VLPConfig, ckpt_config: Optional[dict], path: str) -> None:
    """A clear error when the config's model sizes differ from those the checkpoint was trained with."""
    saved = (ckpt_config or {}).get("model")
    if not isinstance(saved, dict):
        return
    diffs = []
    for section, keys in ARCH_KEYS.items():
        ours = getattr(model_cfg, section) if section else model_cfg
        theirs = saved.get(section, {}) if section else saved
        for key in keys:
            if key in theirs and theirs[key] != getattr(ours, key):
                name = f"model.{section + '.' if section else ''}{key}"
                diffs.append(f"{name}: checkpoint {theirs[key]!r}, config {getattr(ours, key)!r}")
    if diffs:
        raise ConfigError(f"checkpoint {path} was trained with another architecture than the config: "
                          + "; ".join(diffs) + ". Use the config matching the checkpoint or set the values with "
                          "--set (the image size, dropout and queue size may differ)")


def fit_model_config(cfg, tokenizer, ckpt: Optional[dict], path: Optional[str]):
    """``cfg`` with the tokenizer's vocabulary size, checked against the architecture the checkpoint
    ``ckpt`` (loaded from ``path``; None = from scratch) was trained with."""
    cfg = with_vocab(cfg, tokenizer)
    if ckpt is not None:
        check_architecture(cfg.model, ckpt.get("config"), path)
    return cfg


def saved_run_config(cls: type, data: dict):
    """The run config ``data`` saved in a checkpoint, as ``cls``. Its ``train.device`` describes the
    machine that trained, not this one: it is read as ``auto`` (so that a CUDA run's checkpoint
    loads on a machine without CUDA); keys that moved are read at their place now
    (``objectives.pretrain.moved_config_keys``)."""
    from engine.config import from_dict
    data = moved_config_keys(dict(data))
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


# ---------------------------------------------------------------------- weights and load reports
def raise_on_report(report: LoadReport, path: str, sections: str = "'model' section") -> None:
    """Raise ``ConfigError`` for unexplained missing/unexpected/mismatched keys of ``report``, adding
    that the config's ``sections`` must describe the model of the checkpoint ``path``."""
    try:
        report.raise_if_unexpected()
    except ValueError as err:
        raise ConfigError(f"{err}\nThe config's {sections} must describe the checkpoint's model "
                          f"(see the config.yaml beside {path}).") from None


def load_encoder_weights(model: torch.nn.Module, dist: D.DistInfo) -> list[LoadReport]:
    """Initialise a ``VLPModel``'s encoders from the local weight files its config names
    (``model.vision_weights``, ``model.text_weights``); prints each report (main process) and raises
    on unexplained keys. Returns the reports (none when no file is named)."""
    from models.vlp import load_pretrained_encoders
    reports = load_pretrained_encoders(model)
    for r in reports:
        if dist.is_main:
            print(r.summary(), flush=True)
        r.raise_if_unexpected()
    return reports


def load_selected_checkpoint(model: torch.nn.Module, out_dir: Path) -> tuple[Path, dict, bool]:
    """Load into ``model`` the checkpoint a fine-tuning run selected: ``checkpoint_best.pth`` (best
    val metric) when the run wrote one, else ``checkpoint_last.pth``. Returns the path, the
    checkpoint dict and whether it is the best one."""
    best = out_dir / "checkpoint_best.pth"
    chosen = best if best.is_file() else out_dir / "checkpoint_last.pth"
    ckpt = load_checkpoint(chosen)
    model.load_state_dict(ckpt["model"], strict=True)
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
