"""NLVR2 data: the ALBEF annotation format, the dataset and its collator.

Format (docs/datasets.md; ALBEF's ``nlvr_{train,dev,test}.json``)::

    [{"images": ["left.png", "right.png"], "sentence": "The left image contains two dogs.",
      "label": "True"}, ...]

``images`` are relative to ``image_root``; ``label`` is the string ``"True"`` or ``"False"`` (JSON
``true`` / ``false`` are accepted too). Other keys (e.g. NLVR2's ``identifier``) are kept and copied
into the predictions file. Sentences are cleaned like captions (``pre_caption``, ALBEF style by
default). Every problem is a ``DataError`` (a ``ValueError``) / ``FileNotFoundError`` naming the file and the record.

Augmentation is per image and seeded from ``(seed, epoch, index)`` (:func:`~datasets.formats.sample_seed`),
with independent streams for the left and the right image. An unreadable image is an error naming
the file and the record (an NLVR2 example cannot be scored without both of its images).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

from .formats import DataError, EpochIndex, ImageLoadError, derive_seed, epoch_and_index, load_image, read_annotations, sample_seed
from .sentences import LabelledSentences
from .transforms import apply_seeded

__all__ = ["LABELS", "label_to_int", "int_to_label", "read_nlvr2", "NLVR2Dataset", "NLVR2Collator"]

LABELS: dict[str, int] = {"False": 0, "True": 1}
_NAMES: dict[int, str] = {v: k for k, v in LABELS.items()}


def label_to_int(label: Any) -> int:
    """``"True"`` -> 1, ``"False"`` -> 0 (JSON booleans as well); anything else is a ValueError."""
    if isinstance(label, bool):
        return int(label)
    if isinstance(label, str) and label in LABELS:
        return LABELS[label]
    raise ValueError(f"NLVR2 label must be \"True\" or \"False\"; got {label!r}")


def int_to_label(value: int) -> str:
    """1 -> ``"True"``, 0 -> ``"False"`` (the inverse of :func:`label_to_int`)."""
    try:
        return _NAMES[int(value)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"NLVR2 class index must be 0 or 1; got {value!r}") from None


def read_nlvr2(paths: str | os.PathLike | Sequence[str | os.PathLike], hint: str = "") -> list[dict]:
    """Read and validate NLVR2 annotation files (concatenated in order).

    Each returned record is the original one plus ``"_source"`` (its file) and ``"_label"`` (0/1).
    Raises ``FileNotFoundError`` (followed by ``hint``) or ``ValueError`` naming file and record.
    """
    records = read_annotations(paths, {"images": list, "sentence": str, "label": (str, bool)}, "NLVR2", hint)
    counters: dict[str, int] = {}
    for rec in records:
        i = counters.get(rec["_source"], 0)
        counters[rec["_source"]] = i + 1
        where = f"{rec['_source']!r} record {i}"
        images = rec["images"]
        if len(images) != 2 or not all(isinstance(p, str) and p for p in images):
            raise DataError(f"{where}: 'images' must be a list of two image paths [left, right]; got {images!r}")
        try:
            rec["_label"] = label_to_int(rec["label"])
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None
    return records


class NLVR2Dataset(LabelledSentences):
    """NLVR2 examples: ``__getitem__`` returns ``image_left``, ``image_right`` (tensors),
    ``sentence`` (cleaned), ``label`` (0/1) and ``index``.

    Args:
        files: annotation JSON file(s).
        image_root: directory the ``images`` paths are relative to.
        transform: PIL image -> tensor (training augmentation or the evaluation resize).
        max_words, clean_style: sentence cleaning (``pre_caption``).
        seed: base seed of the per-sample augmentation (with :meth:`set_epoch`).
        hint: appended to the error for a missing annotation file (where to get the data).
    """

    def __init__(self, files: str | os.PathLike | Sequence[str | os.PathLike], image_root: str | os.PathLike,
                 transform: Callable, max_words: int = 30, clean_style: str = "albef", seed: int = 0,
                 hint: str = "") -> None:
        super().__init__(read_nlvr2(files, hint), "NLVR2", files, image_root, transform, max_words, clean_style, seed)

    def image_paths(self, index: int) -> tuple[str, str]:
        """The (left, right) image files of example ``index``."""
        left, right = self.records[index]["images"]
        return (os.path.normpath(os.path.join(self.image_root, left)),
                os.path.normpath(os.path.join(self.image_root, right)))

    def _load(self, path: str, index: int) -> Any:
        try:
            return load_image(path)
        except ImageLoadError as err:
            rec = self.records[index]
            raise ImageLoadError(path, f"{err.reason} (NLVR2 example {index} of {rec['_source']}; "
                                       f"check data.image_root={self.image_root})") from None

    def __getitem__(self, index: "int | EpochIndex") -> dict:
        epoch, index = epoch_and_index(index, self.epoch)
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} NLVR2 examples")
        left_path, right_path = self.image_paths(index)
        seed = sample_seed(self.seed, epoch, index)
        left = apply_seeded(self.transform, self._load(left_path, index), derive_seed(seed, "augment_left"))
        right = apply_seeded(self.transform, self._load(right_path, index), derive_seed(seed, "augment_right"))
        return {"image_left": left, "image_right": right, "sentence": self.sentences[index],
                "label": self.records[index]["_label"], "index": index}


class NLVR2Collator:
    """Stack both images, tokenise the sentences (``padding="longest"``, truncation to
    ``max_length``), and batch the labels and example indices."""

    def __init__(self, tokenizer, max_length: int = 30) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, samples: list[dict]) -> dict:
        enc = self.tokenizer([s["sentence"] for s in samples], padding="longest", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {
            "image_left": torch.stack([s["image_left"] for s in samples]),
            "image_right": torch.stack([s["image_right"] for s in samples]),
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        }
