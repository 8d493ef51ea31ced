"""SNLI-VE data: ALBEF's annotation format, the dataset and its collator.

Format (docs/datasets.md; ALBEF's ``ve_{train,dev,test}.json``)::

    [{"image": "2248275918", "sentence": "Two dogs are running.", "label": "entailment"}, ...]

``image`` is relative to ``image_root``; a name without a file extension is a Flickr30K id and gets
``.jpg`` (ALBEF's rule: ``image_root/<id>.jpg``). ``label`` is ``entailment``, ``neutral`` or
``contradiction``; the class indices are ALBEF's (contradiction 0, neutral 1, entailment 2). Other
keys are kept and copied into the predictions file. Sentences are cleaned like captions
(``pre_caption``, ALBEF style by default). Every problem is a one-line error naming the file, the
record and the key (:class:`~datasets.formats.DataError`, or ``FileNotFoundError`` for a missing
annotation file).

Augmentation is seeded from ``(seed, epoch, index)`` (:func:`~datasets.formats.sample_seed`). An
unreadable image is an error naming the file and the record.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

from .formats import DataError, EpochIndex, ImageLoadError, epoch_and_index, load_image, read_annotations, sample_seed
from .retrieval_data import tokenize_texts
from .sentences import LabelledSentences
from .transforms import apply_seeded

__all__ = ["LABELS", "CLASS_NAMES", "label_to_int", "image_file", "read_snli_ve", "SNLIVEDataset", "SNLIVECollator"]

LABELS: dict[str, int] = {"contradiction": 0, "neutral": 1, "entailment": 2}  # ALBEF's class indices
CLASS_NAMES: tuple[str, ...] = tuple(sorted(LABELS, key=LABELS.get))  # by class index


def label_to_int(label: Any) -> int:
    """``"entailment"`` -> 2, ``"neutral"`` -> 1, ``"contradiction"`` -> 0; anything else is a ValueError."""
    if isinstance(label, str) and label in LABELS:
        return LABELS[label]
    raise ValueError(f"SNLI-VE label must be one of {list(LABELS)}; got {label!r}")


def image_file(name: str) -> str:
    """The image file of a record's ``image``: a name without an extension is a Flickr30K id (+ ``.jpg``)."""
    return name if os.path.splitext(name)[1] else name + ".jpg"


def read_snli_ve(paths: str | os.PathLike | Sequence[str | os.PathLike], hint: str = "") -> list[dict]:
    """Read and validate SNLI-VE annotation files (concatenated in order).

    Each returned record is the original one plus ``"_source"`` (its file), ``"_label"`` (the class
    index) and ``"_image"`` (the image file relative to the image root). Raises ``FileNotFoundError``
    (followed by ``hint``) or :class:`~datasets.formats.DataError` naming file, record and key."""
    records = read_annotations(paths, {"image": str, "sentence": str, "label": str}, "SNLI-VE", hint)
    counters: dict[str, int] = {}
    for rec in records:
        i = counters.get(rec["_source"], 0)
        counters[rec["_source"]] = i + 1
        where = f"{rec['_source']!r} record {i}"
        if not rec["image"].strip():
            raise DataError(f"{where}: key 'image' is empty")
        try:
            rec["_label"] = label_to_int(rec["label"])
        except ValueError as err:
            raise DataError(f"{where}: key 'label': {err}") from None
        rec["_image"] = image_file(rec["image"])
        rec["_where"] = where
    return records


class SNLIVEDataset(LabelledSentences):
    """SNLI-VE examples of the annotation ``files`` (``hint``: where to get a missing one), images under
    ``image_root`` through ``transform`` (seeded from ``seed`` and the epoch), sentences cleaned as
    ``max_words`` and ``clean_style`` say: ``__getitem__`` returns ``image`` (a tensor), ``sentence``,
    ``label`` (the class index) and ``index``."""

    def __init__(self, files: str | os.PathLike | Sequence[str | os.PathLike], image_root: str | os.PathLike,
                 transform: Callable, max_words: int = 30, clean_style: str = "albef", seed: int = 0,
                 hint: str = "") -> None:
        super().__init__(read_snli_ve(files, hint), "SNLI-VE", files, image_root, transform, max_words, clean_style,
                         seed)

    def image_path(self, index: int) -> str:
        """The image file of example ``index``."""
        return os.path.normpath(os.path.join(self.image_root, self.records[index]["_image"]))

    def __getitem__(self, index: "int | EpochIndex") -> dict:
        epoch, index = epoch_and_index(index, self.epoch)
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} SNLI-VE examples")
        path = self.image_path(index)
        try:
            image = load_image(path)
        except ImageLoadError as err:
            raise ImageLoadError(path, f"{err.reason} (SNLI-VE example {index}: {self.records[index]['_where']}; "
                                       f"check data.image_root={self.image_root})") from None
        image = apply_seeded(self.transform, image, sample_seed(self.seed, epoch, index))
        return {"image": image, "sentence": self.sentences[index], "label": self.records[index]["_label"],
                "index": index}


class SNLIVECollator:
    """Stack the images, tokenise the sentences (``padding="longest"``, truncation to ``max_length``),
    and batch the labels and example indices."""

    def __init__(self, tokenizer, max_length: int = 30) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, samples: list[dict]) -> dict:
        ids, mask = tokenize_texts(self.tokenizer, [s["sentence"] for s in samples], self.max_length)
        return {"image": torch.stack([s["image"] for s in samples]), "input_ids": ids, "attention_mask": mask,
                "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
                "index": torch.tensor([s["index"] for s in samples], dtype=torch.long)}
