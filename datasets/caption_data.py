"""Image-captioning data in the Karpathy-split format that BLIP users already have (COCO captions).

* train: ``[{"image": str, "caption": str, "image_id": str | int}, ...]`` (one record per caption),
  read by :class:`~datasets.formats.PretrainDataset` (the same image-caption reader as
  pre-training: ALBEF/BLIP cleaning, ``max_words``, unreadable images skipped and counted);
* val / test: ``[{"image": str, "caption": [str, ...], "image_id"?: int}, ...]`` (one record per
  image), read by :func:`read_caption_split`; the generated captions are written with these ids
  (and the record's ``image``);
* ground truth for scoring: the COCO ``{"images": [...], "annotations": [{"image_id", "caption"}]}``
  file that pycocotools reads (BLIP's ``coco_karpathy_{val,test}_gt.json``), read by
  :func:`load_coco_references`; without one, the references are the raw captions of the split file.

The image ids of a val/test file, decided for the whole file (:func:`read_caption_split`):

1. every record has an integer ``image_id`` (an int or a string of digits): those;
2. no record has one, and every file name ends in a number, each a different one: that number (BLIP's
   rule, ``COCO_val2014_000000391895.jpg`` -> 391895), so that results match the COCO ground truth;
3. no record has one otherwise (a folder of your own photos, ``photos/cat.jpg``): the record's
   position in the file, 0, 1, 2, ... (a ground-truth file for such a split uses the same numbers;
   without one the references are the records' own captions).

Some records with an integer ``image_id`` and others without is an error naming the first without.

The training text is ``prompt + caption`` (BLIP: ``"a picture of " + caption``); the prompt tokens
(with ``[CLS]``) get label -100, so only the caption and its ``[SEP]`` end token are learned.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .formats import DataError, read_annotations, read_json

__all__ = ["CAPTION_HINT", "CaptionSplit", "coco_image_id", "split_image_ids", "read_caption_split", "load_coco_references",
           "CaptionTrainCollator", "prompt_length"]

PathLike = str | os.PathLike

CAPTION_HINT = ("COCO captioning uses the Karpathy-split JSON lists that BLIP distributes "
                "(coco_karpathy_{train,val,test}.json, and coco_karpathy_{val,test}_gt.json for scoring); "
                "the images are COCO 2014 train/val. See docs/datasets.md.")

_TRAILING_NUMBER = re.compile(r"(\d+)$")


def _integer_id(value) -> int | None:
    """An ``image_id`` value as an integer (an int, or a string of digits), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def split_image_ids(records: list[dict], source: str = "") -> list[int]:
    """The image ids of a val/test file's records, by the rules of the module docstring."""
    explicit = [_integer_id(r.get("image_id")) for r in records]
    if all(i is not None for i in explicit):
        return explicit  # type: ignore[return-value]
    given = [i for i, v in enumerate(explicit) if v is not None]
    if given:
        first = next(i for i, v in enumerate(explicit) if v is None)
        raise DataError(f"{source!r} record {first}: no integer 'image_id' (got {records[first].get('image_id')!r}) "
                        f"while record {given[0]} has one; give every record an integer 'image_id', or none (then "
                        "the records are numbered by their order)")
    try:
        by_name = [coco_image_id({"image": r.get("image")}, source, i) for i, r in enumerate(records)]
    except DataError:
        by_name = []
    if by_name and len(set(by_name)) == len(by_name):
        return by_name
    return list(range(len(records)))


def coco_image_id(record: dict, source: str = "", index: int = 0) -> int:
    """The integer image id of a val/test record: its ``image_id`` (an int or a string of digits),
    else BLIP's rule: the digits at the end of the file name without extension
    (``val2014/COCO_val2014_000000391895.jpg`` -> 391895).

    Raises:
        DataError: neither gives an integer (the message names the file and record).
    """
    value = record.get("image_id")
    explicit = _integer_id(value)
    if explicit is not None:
        return explicit
    stem = os.path.splitext(os.path.basename(str(record.get("image", ""))))[0]
    m = _TRAILING_NUMBER.search(stem)
    if value is None and m:
        return int(m.group(1))
    raise DataError(f"{source!r} record {index}: cannot derive an integer image id (image_id={value!r}, "
                    f"image={record.get('image')!r}); give each record an integer 'image_id' that matches "
                    "the ground-truth file")


@dataclass
class CaptionSplit:
    """One val/test split: every image once (its path under the image root and as the file names
    it), with its id and its raw reference captions."""

    source: str
    image_files: list[str] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    references: dict[int, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_files)


def read_caption_split(path: PathLike, image_root: PathLike, check_images: bool = True,
                       hint: str = CAPTION_HINT) -> CaptionSplit:
    """Read a val/test file ``[{"image", "caption": [str, ...] | str, "image_id"?}]`` (image ids:
    :func:`split_image_ids`).

    Raises ``FileNotFoundError`` for a missing annotation file or (``check_images``) image, and
    ``DataError`` for a record whose captions are not strings, image ids given for only some
    records, or an image id that repeats; each names the file and record."""
    records = read_annotations(path, {"image": str}, "captioning evaluation", hint)
    source = os.fspath(path)
    split = CaptionSplit(source)
    for i, (rec, image_id) in enumerate(zip(records, split_image_ids(records, source))):
        raw = rec.get("caption", [])
        raw = [raw] if isinstance(raw, str) else raw
        if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
            raise DataError(f"{source!r} record {i} (image {rec['image']!r}): key 'caption' must be a string or "
                            "a list of strings")
        if image_id in split.references:
            raise DataError(f"{source!r} record {i}: image id {image_id} appears twice (one record per image)")
        full = os.path.normpath(os.path.join(os.fspath(image_root), rec["image"]))
        if check_images and not os.path.isfile(full):
            raise FileNotFoundError(f"{source!r} record {i}: image {rec['image']!r} not found (looked for {full}); "
                                    "check data.image_root")
        split.image_files.append(full)
        split.image_names.append(rec["image"])
        split.image_ids.append(image_id)
        split.references[image_id] = list(raw)
    if not split.image_files:
        raise DataError(f"captioning evaluation file {source!r} holds no records")
    return split


def load_coco_references(path: PathLike, hint: str = CAPTION_HINT) -> dict[int, list[str]]:
    """``{image_id: [captions]}`` from a COCO-format ground-truth file (``annotations`` with
    ``image_id`` and ``caption``; the ``images`` list, when present, must all have captions).

    Raises ``FileNotFoundError`` / ``DataError`` naming the file and the offending entry."""
    path = os.fspath(path)
    gt = read_json(path, "captioning ground-truth file", hint)
    if not isinstance(gt, dict) or not isinstance(gt.get("annotations"), list):
        raise DataError(f"{path!r} must be a COCO captions file: an object with an 'annotations' list")
    refs: dict[int, list[str]] = {}
    for i, ann in enumerate(gt["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise DataError(f"{path!r} annotation {i}: needs 'image_id' and a string 'caption'; got {ann!r}")
        refs.setdefault(int(ann["image_id"]), []).append(ann["caption"])
    for i, img in enumerate(gt.get("images", [])):
        if int(img["id"]) not in refs:
            raise DataError(f"{path!r} image {i} (id {img['id']}) has no caption annotation")
    if not refs:
        raise DataError(f"{path!r} holds no caption annotations")
    return refs


def prompt_length(tokenizer, prompt: str) -> int:
    """Tokens of ``[CLS] + prompt`` (without the trailing ``[SEP]``): the positions excluded from the loss."""
    return len(tokenizer(prompt, add_special_tokens=True)["input_ids"]) - 1


class CaptionTrainCollator:
    """Stack images; tokenise ``prompt + caption`` (padding to the longest, truncation to
    ``max_length``); ``labels`` are the token ids with the prompt and padding set to -100."""

    def __init__(self, tokenizer, prompt: str = "", max_length: int = 40) -> None:
        self.tokenizer, self.prompt, self.max_length = tokenizer, prompt, max_length
        self.prompt_len = prompt_length(tokenizer, prompt)
        if self.prompt_len >= max_length:
            raise ValueError(f"the prompt {prompt!r} takes {self.prompt_len} tokens, not fewer than the maximum "
                             f"text length {max_length}; shorten it or raise tokenizer.max_length")

    def __call__(self, samples: Sequence[dict]) -> dict:
        texts = [self.prompt + s["caption"] for s in samples]
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :self.prompt_len] = -100
        return {"image": torch.stack([s["image"] for s in samples]), "input_ids": ids, "attention_mask": mask,
                "labels": labels, "n_bad": sum(int(s.get("n_bad", 0)) for s in samples),
                "bad_images": [f for s in samples for f in s.get("bad_images", ())],
                "failed": any(s.get("failed", False) for s in samples),
                "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)}
