"""The training batches of a map-style dataset: the batch-size check, the deterministic epoch
sampler (exact resume, the same samples per step for any process count) and the grouping of
micro-batches into optimiser steps."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from engine.config import ConfigError

__all__ = ["check_batch_size", "EpochBatchSampler", "grouped"]


def check_batch_size(num_samples: int, global_batch: int, grad_accum: int, world: int,
                     what: str = "the training set") -> None:
    """A ``ConfigError`` (one line: the sizes and the ``--set train.batch_size=N`` that fixes it) unless
    the global batch ``train.batch_size`` splits into ``world`` processes x ``grad_accum`` micro-batches
    and ``what`` (``num_samples`` samples an epoch) holds at least one global batch."""
    unit = world * grad_accum
    geometry = f"{world} process(es) x train.grad_accum={grad_accum}"
    if global_batch % unit:
        fix = max(unit, global_batch // unit * unit)
        raise ConfigError(f"train.batch_size={global_batch} does not split into {geometry} equal micro-batches: "
                          f"use a multiple of {unit}, e.g. --set train.batch_size={fix}")
    if num_samples >= global_batch:
        return
    if num_samples >= unit:
        fix = f"--set train.batch_size={num_samples // unit * unit}"
    elif num_samples >= world:
        fix = f"--set train.batch_size={num_samples // world * world} train.grad_accum=1"
    else:
        fix = f"at most {num_samples} process(es)"
    raise ConfigError(f"{what} has {num_samples} samples, fewer than one global batch of train.batch_size={global_batch} "
                      f"({geometry}); lower the batch to at most the data: {fix}")


class EpochBatchSampler:
    """Deterministic batches: the permutation depends on (seed, epoch) only; the global batch of
    each optimiser step is split into per-process, per-micro-step slices, so 1 process with
    accumulation and N processes see the same samples per step. ``start_step`` skips steps
    without loading anything (exact resume)."""

    def __init__(self, n: int, global_batch: int, grad_accum: int, rank: int, world: int, seed: int,
                 what: str = "the training set") -> None:
        check_batch_size(n, global_batch, grad_accum, world, what)
        self.n, self.global_batch, self.accum, self.rank, self.world, self.seed = n, global_batch, grad_accum, rank, world, seed
        self.micro = global_batch // (world * grad_accum)
        self.epoch, self.start_step = 0, 0

    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_position(self, epoch: int, start_step: int) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        per_rank = self.global_batch // self.world
        for step in range(self.start_step, self.steps_per_epoch()):
            chunk = perm[step * self.global_batch + self.rank * per_rank: step * self.global_batch + (self.rank + 1) * per_rank]
            for a in range(self.accum):
                yield chunk[a * self.micro:(a + 1) * self.micro]

    def __len__(self) -> int:
        return (self.steps_per_epoch() - self.start_step) * self.accum


def grouped(it: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Group micro-batches into lists of ``size`` (one optimiser step each)."""
    buf: list[dict] = []
    for x in it:
        buf.append(x)
        if len(buf) == size:
            yield buf
            buf = []
