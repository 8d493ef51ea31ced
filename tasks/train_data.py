"""The training side of a fine-tuning task: the batches of a map-style dataset (deterministic
sampler, loader, micro-batches per optimiser step, the bad-image check) and the checks of a
training data section (its bad-image fields, shared by the tasks that read images with them)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import Dataset

from datasets.formats import DEFAULT_MAX_IMAGE_PIXELS, EpochIndex, TooManyBadImagesError
from engine import distributed as D
from engine.config import opt
from engine.loader import SafeDataLoader
from engine.batching import EpochBatchSampler, grouped
from engine.trainer import TrainConfig
from tasks.common import to_device

log = logging.getLogger("tasks")

__all__ = ["require_fraction", "require_positive", "validate_image_data", "ImageChecks", "BadImageCheck",
           "EpochLoader", "SampledTrainData"]


def require_fraction(key: str, value: float) -> None:
    """``ValueError`` naming the config ``key`` unless 0 <= ``value`` < 1 (for ``validate()``)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{key} must be in [0, 1); got {value}")


def require_positive(key: str, value: int) -> None:
    """``ValueError`` naming the config ``key`` when ``value`` is not positive (for ``validate()``)."""
    if value <= 0:
        raise ValueError(f"{key} must be positive; got {value}")


def validate_image_data(data: Any) -> None:
    """The checks of a training data section with ``max_bad_fraction``, ``bad_check_after`` and
    ``max_image_pixels`` (for ``validate()``)."""
    require_fraction("data.max_bad_fraction", data.max_bad_fraction)
    if data.bad_check_after < 0:
        raise ValueError(f"data.bad_check_after must be >= 0; got {data.bad_check_after}")
    if data.max_image_pixels is not None:
        require_positive("data.max_image_pixels", data.max_image_pixels)


@dataclass
class ImageChecks:
    """The bad-image fields of a training data section (a task's data config derives from it)."""

    max_bad_fraction: float = opt(0.01, "stop when more than this fraction of the training images tried are distinct images that fail to load (an unreadable image is replaced by a random other record and counted once; logged as data/bad_images)")
    bad_check_after: int = opt(500, "training images tried before the bad-image fraction is checked (bad images beyond max_bad_fraction of the whole training set stop the run at once)")
    max_image_pixels: Optional[int] = opt(DEFAULT_MAX_IMAGE_PIXELS, "an image that would decode to more pixels is skipped and counted as bad (a JPEG much larger than the training crop is first decoded reduced, 1/2 to 1/8, which counts); default: PIL's decompression-bomb warning limit; PIL itself refuses twice as many; null = no bound of ours")

    def validate(self) -> None:
        validate_image_data(self)


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


class EpochLoader:
    """The training ``DataLoader`` of a map-style dataset over an
    :class:`~engine.batching.EpochBatchSampler`, built once per run: :meth:`epoch` gives an epoch's
    batches from a step on. Its batches carry their epoch (:class:`~datasets.formats.EpochIndex`),
    so with ``persistent`` workers (``train.persistent_workers``), which keep the copy of the dataset
    made when they started, the workers started for the first epoch serve every later one; the
    samples are the same as with new workers per epoch."""

    def __init__(self, dataset: Dataset, sampler: EpochBatchSampler, collate_fn: Callable[[list], Any],
                 num_workers: int, persistent: bool, dist: D.DistInfo, generator: Optional[torch.Generator]) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.loader = SafeDataLoader(dataset, batch_sampler=_EpochTagged(sampler), collate_fn=collate_fn,
                                     num_workers=num_workers, pin_memory=dist.device.type == "cuda",
                                     generator=generator, persistent_workers=persistent and num_workers > 0)

    def epoch(self, epoch: int, start_step: int) -> Iterator:
        """The micro-batches of ``epoch`` from optimiser step ``start_step`` on (``set_epoch`` too, for
        a loader without workers and anything reading the dataset in this process)."""
        self.dataset.set_epoch(epoch)
        self.sampler.set_position(epoch, start_step)
        return iter(self.loader)


class _EpochTagged:
    """A batch sampler yielding ``sampler``'s batches as :class:`~datasets.formats.EpochIndex` lists."""

    def __init__(self, sampler: EpochBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[EpochIndex]]:
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [EpochIndex(epoch, i) for i in batch]

    def __len__(self) -> int:
        return len(self.sampler)


class SampledTrainData:
    """The training batches of a map-style dataset (with ``set_epoch``): an
    :class:`~engine.batching.EpochBatchSampler` (deterministic, exact resume) over ``train.batch_size``,
    an :class:`EpochLoader` with ``collator``, micro-batches grouped per optimiser step
    (``train.grad_accum``), each passed to ``bad_images`` (when given) and moved to the device.

    ``loader_seed``: seed of the loader's own generator (then the global RNG is left alone); ``None``
    lets the loader draw its worker seed from the global RNG."""

    def __init__(self, dataset: Dataset, collator: Callable[[list], dict], train: TrainConfig, dist: D.DistInfo,
                 num_workers: int, bad_images: Optional[BadImageCheck] = None,
                 loader_seed: Optional[int] = None) -> None:
        self.dataset, self.dist = dataset, dist
        self.grad_accum, self.bad_images = train.grad_accum, bad_images
        self.sampler = EpochBatchSampler(len(dataset), train.batch_size, train.grad_accum,
                                         dist.rank, dist.world_size, train.seed)
        generator = None if loader_seed is None else torch.Generator().manual_seed(loader_seed)
        self.loader = EpochLoader(dataset, self.sampler, collator, num_workers, train.persistent_workers, dist, generator)

    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch."""
        return self.sampler.steps_per_epoch()

    def batches(self, epoch: int, start_step: int) -> Iterator[list[dict]]:
        """The micro-batches of each optimiser step of ``epoch`` from ``start_step`` on, on the device."""
        for group in grouped(self.loader.epoch(epoch, start_step), self.grad_accum):
            if self.bad_images is not None:
                for b in group:
                    self.bad_images(b)
            yield [to_device(b, self.dist.device) for b in group]
