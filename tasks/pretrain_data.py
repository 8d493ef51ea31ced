"""The data of a pre-training run: the file checks, the dataset (annotation JSONs + image files, or
streamed tar shards) and the shapes world for the diagnostics (when the data is the synthetic world)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

from datasets.formats import PretrainDataset
from datasets.shards import ShardPretrainDataset
from datasets.transforms import build_transform, decode_min_side
from engine import distributed as D
from shapesworld.truth import ShapesWorld
from tasks.common import require_files, require_image_root
from tasks.pretrain_config import PretrainConfig

log = logging.getLogger("pretrain")

__all__ = ["prepare_data", "build_dataset"]


def prepare_data(cfg: PretrainConfig, dist: D.DistInfo) -> Optional[ShapesWorld]:
    """Check that the files exist; the shapes world (for diagnostics) when the data is synthetic."""
    d = cfg.data
    if d.format == "json":
        require_files(d.train_files, "pre-training annotation",
                      "Real data (CC3M, SBU, COCO, VG) comes as ALBEF-format JSON lists; see docs/datasets.md.")
    if not cfg.diagnostics.every:
        return None
    if d.format == "shards":
        if dist.is_main:
            log.warning("diagnostics.every is set but data.format=shards: diagnostics need the JSON reader; off")
        return None
    if (Path(d.image_root) / "scenes.json").is_file():
        return ShapesWorld.load(d.image_root)
    if dist.is_main:
        log.warning("diagnostics.every is set but %s holds no shapes world (scenes.json): diagnostics off", d.image_root)
    return None


def build_dataset(cfg: PretrainConfig) -> Union[PretrainDataset, ShardPretrainDataset]:
    """The training pairs of ``cfg.data`` with the training augmentation."""
    d = cfg.data
    transform = build_transform(cfg.model.vision.img_size, True, d.transform)
    if d.format == "shards":
        return ShardPretrainDataset(d.shards, transform, d.max_words, d.clean_style, cfg.train.seed,
                                    d.shards_shuffle_buffer, d.shards_num_samples, d.max_image_pixels,
                                    decode_min_side(cfg.model.vision.img_size, True, d.transform))
    dataset = PretrainDataset(d.train_files, d.image_root, transform, d.max_words, d.clean_style, cfg.train.seed,
                              d.max_bad_fraction, max_image_pixels=d.max_image_pixels,
                              decode_min_side=decode_min_side(cfg.model.vision.img_size, True, d.transform))
    require_image_root(d.image_root, [dataset.image_path(i) for i in range(min(16, len(dataset)))])
    return dataset
