"""The data side that the classification tasks (NLVR2, SNLI-VE) share: their annotation files,
their training and evaluation datasets, and the training loader. The task gives its dataset class
(``files, image_root, transform, max_words, clean_style, seed, hint``), its collator class
(``tokenizer, max_length``) and where to get its data (``hint``); its config has ``data``
``train_files``, ``dev_files``, ``test_files``, ``image_root``, ``transform``, ``max_words``,
``clean_style``, ``num_workers``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch.utils.data import Dataset

from datasets.transforms import build_transform
from tasks.spec import Run
from tasks.train_data import SampledTrainData

__all__ = ["ClassifierData", "annotation_files", "eval_sets", "load_data", "train_data"]


@dataclass
class ClassifierData:
    train: Optional[Dataset]  # fine-tuning only
    eval_sets: dict[str, Dataset]  # dev / test


def annotation_files(cfg, training: bool) -> list[str]:
    """Every annotation file the run reads (the training files only when training)."""
    d = cfg.data
    return (list(d.train_files) if training else []) + d.dev_files + d.test_files


def eval_sets(cfg, dataset_cls: Callable, hint: str) -> dict[str, Dataset]:
    """The dev and test splits that have files, with the evaluation transform."""
    d = cfg.data
    transform = build_transform(cfg.model.vision.img_size, False, d.transform)
    return {split: dataset_cls(files, d.image_root, transform, d.max_words, d.clean_style, cfg.train.seed, hint)
            for split, files in (("dev", d.dev_files), ("test", d.test_files)) if files}


def load_data(run: Run, dataset_cls: Callable, hint: str) -> ClassifierData:
    """The training split (when training, with the training transform) and the evaluation splits."""
    cfg, d = run.cfg, run.cfg.data
    train = None
    if run.training:
        train = dataset_cls(d.train_files, d.image_root, build_transform(cfg.model.vision.img_size, True, d.transform),
                            d.max_words, d.clean_style, cfg.train.seed, hint)
    return ClassifierData(train, eval_sets(cfg, dataset_cls, hint))


def train_data(run: Run, data: ClassifierData, collator_cls: Callable) -> SampledTrainData:
    """The training loader over ``data.train``, batches collated by ``collator_cls``."""
    collator = collator_cls(run.tokenizer, run.cfg.tokenizer.max_length)
    return SampledTrainData(data.train, collator, run.cfg.train, run.dist, run.cfg.data.num_workers)
