"""The schema of a pre-training run (``python run_pretrain.py --config ...``): model, tokenizer,
data, the objective's losses (``objectives/pretrain.py``), optimiser, schedule, training loop and
the SRCL diagnostics. ``tasks/pretrain.py`` runs it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from datasets.formats import DEFAULT_MAX_IMAGE_PIXELS
from datasets.transforms import TransformConfig
from engine.config import opt
from engine.trainer import OptimConfig, ScheduleConfig, TrainConfig
from models.vlp import VLPConfig
from objectives.pretrain import PretrainLossConfig
from tasks.common import TokenizerConfig
from tasks.train_data import validate_image_data

__all__ = ["PretrainDataConfig", "DiagnosticsConfig", "PretrainConfig"]


@dataclass
class PretrainDataConfig:
    format: Literal["json", "shards"] = opt("json", "json: annotation JSONs (train_files) + image files; shards: WebDataset-style tar shards (shards), streamed")
    train_files: list[str] = opt(["data/pretrain/cc3m_train.json", "data/pretrain/cc3m_val.json", "data/pretrain/sbu.json",
                                  "data/pretrain/coco.json", "data/pretrain/vg.json"],
                                 "annotation JSONs [{image, caption}], concatenated (default: the paper's 4M set, docs/datasets.md)")
    shards: list[str] = opt([], "with format=shards: tar shards as brace patterns (data/shards/shard-{000000..000099}.tar), globs, or the index.json that python -m datasets.shards writes; local paths or URLs (https://, s3://, gs://, any fsspec protocol; docs/datasets.md)")
    shards_num_samples: Optional[int] = opt(None, "with format=shards: samples per epoch (default: all samples the shards' index.json lists)")
    shards_shuffle_buffer: int = opt(1000, "with format=shards: samples in each loader worker's shuffle buffer (1 = shard order)")
    image_root: str = opt("data/images", "directory the 'image' paths are relative to")
    max_words: int = opt(30, "captions are cut to this many words after cleaning")
    clean_style: Literal["albef", "blip"] = opt("albef", "caption cleaning rules")
    transform: TransformConfig = opt(TransformConfig, "training image augmentation")
    num_workers: int = opt(2, "data-loading worker processes per training process")
    max_bad_fraction: float = opt(0.01, "stop when more than this fraction of the images tried are distinct images that fail to load (an unreadable image is replaced by a random other record and counted once; the count is logged as data/bad_images)")
    bad_check_after: int = opt(500, "images tried before the bad-image fraction is checked (bad images beyond max_bad_fraction of the whole training set stop the run at once)")
    max_image_pixels: Optional[int] = opt(DEFAULT_MAX_IMAGE_PIXELS, "an image that would decode to more pixels is skipped and counted as bad (a JPEG much larger than the training crop is first decoded reduced, 1/2 to 1/8, which counts); default: PIL's decompression-bomb warning limit; PIL itself refuses twice as many; null = no bound of ours")

    def validate(self) -> None:
        validate_image_data(self)


@dataclass
class DiagnosticsConfig:
    every: int = opt(0, "optimiser steps between SRCL diagnostics (needs shapes data; 0 = off)")
    collapse_check_step: int = opt(300, "at this optimiser step, warn when the image or text features of the batch are "
                                        "still collapsed (mean pairwise cosine above collapse_threshold; logged every step "
                                        "as feat/image_cos, feat/text_cos); 0 = off")
    collapse_threshold: float = opt(0.98, "mean pairwise cosine above which features count as collapsed")


@dataclass
class PretrainConfig:
    model: VLPConfig = opt(VLPConfig, "model")
    tokenizer: TokenizerConfig = opt(TokenizerConfig, "tokenizer")
    data: PretrainDataConfig = opt(PretrainDataConfig, "pre-training data")
    loss: PretrainLossConfig = opt(PretrainLossConfig, "the objective: losses, momentum model and queue")
    optim: OptimConfig = opt(OptimConfig, "optimiser")
    schedule: ScheduleConfig = opt(ScheduleConfig, "learning-rate schedule")
    train: TrainConfig = opt(TrainConfig, "training loop")
    diagnostics: DiagnosticsConfig = opt(DiagnosticsConfig, "SRCL diagnostics on synthetic data")

