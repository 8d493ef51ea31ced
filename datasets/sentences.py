"""The part the sentence-and-label datasets (NLVR2, SNLI-VE) share: validated records, their cleaned
sentences, the labels, and the epoch that seeds the augmentation."""
from __future__ import annotations

import os
from typing import Callable

from torch.utils.data import Dataset

from .formats import DataError
from .text import pre_caption

__all__ = ["LabelledSentences"]


class LabelledSentences(Dataset):
    """``records`` (each with ``_source``, its file, and ``_label``, its class index) with every
    ``sentence`` cleaned (``pre_caption``): an empty result is a :class:`~datasets.formats.DataError`
    naming the file and the record, as is a dataset without records (``kind`` and ``files`` name it)."""

    def __init__(self, records: list[dict], kind: str, files, image_root: str | os.PathLike, transform: Callable,
                 max_words: int, clean_style: str, seed: int) -> None:
        if not records:
            raise DataError(f"no {kind} records in {files!r}")
        self.records, self.image_root = records, os.fspath(image_root)
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.sentences = [pre_caption(r["sentence"], max_words, clean_style) for r in records]
        counters: dict[str, int] = {}
        for rec, s in zip(records, self.sentences):
            i = counters[rec["_source"]] = counters.get(rec["_source"], -1) + 1
            if not s:
                raise DataError(f"{rec['_source']!r} record {i}: key 'sentence' ({rec['sentence']!r}) is empty "
                                "after cleaning")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation ``__getitem__`` produces."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def labels(self) -> list[int]:
        """Every example's class index, in order."""
        return [r["_label"] for r in self.records]
