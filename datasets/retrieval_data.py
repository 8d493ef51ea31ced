"""Image-text retrieval data in the Karpathy-split format that ALBEF and BLIP users already have.

* train: ``[{"image": str, "caption": str, "image_id": str | int}, ...]`` (one record per caption;
  all captions of one ``image_id`` are positives of each other in the contrastive loss);
* val / test: ``[{"image": str, "caption": [str, ...]}, ...]`` (one record per image, usually 5
  captions; a single string is accepted as a one-caption list).

``image`` paths are relative to ``image_root``. Captions are cleaned with ``pre_caption`` (ALBEF's
rules by default). Bad input is an error that names the file and the record: a missing image file,
an evaluation record without captions, a caption that is not a string.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from .formats import EpochIndex, ImageLoadError, epoch_and_index, load_image, read_annotations, sample_seed
from .text import pre_caption
from .transforms import apply_seeded

__all__ = ["RETRIEVAL_HINT", "RetrievalEvalData", "read_eval_split", "RetrievalTrainDataset",
           "RetrievalTrainCollator", "ImageListDataset", "tokenize_texts"]

logger = logging.getLogger("datasets")
PathLike = str | os.PathLike

RETRIEVAL_HINT = ("Flickr30K and COCO retrieval annotations are the Karpathy-split JSON lists used by ALBEF "
                  "and BLIP (train: [{image, caption, image_id}], val/test: [{image, caption: [...]}]); "
                  "see docs/datasets.md.")


def _image_file(image_root: PathLike, rel: str) -> str:
    return os.path.normpath(os.path.join(os.fspath(image_root), rel))


def _require_image(path: str, source: str, index: int, rel: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source!r} record {index}: image {rel!r} not found (looked for {path}); "
                                "check data.image_root or remove the record")


@dataclass
class RetrievalEvalData:
    """One evaluation split, flattened: every image once, every caption once.

    ``texts[t]`` is a caption of image ``txt2img[t]``; ``img2txt[i]`` lists the captions of image ``i``
    (in file order). ``image_files`` are full paths, ``image_names`` the paths as written in the file."""

    source: str
    image_files: list[str]
    image_names: list[str]
    texts: list[str]
    txt2img: list[int]
    img2txt: list[list[int]] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.image_files)

    @property
    def num_texts(self) -> int:
        return len(self.texts)


def read_eval_split(path: PathLike, image_root: PathLike, max_words: int = 30, clean_style: str = "albef",
                    check_images: bool = True, hint: str = RETRIEVAL_HINT) -> RetrievalEvalData:
    """Read a val/test file ``[{"image", "caption": [str, ...]}]``.

    Raises ``FileNotFoundError`` for a missing annotation file or (``check_images``) a missing image,
    and ``ValueError`` for a record without captions or with a caption that is not a string; both name
    the file and the record index. A caption that is empty after cleaning is kept (so every image keeps
    its caption count, as the standard protocol does) with a warning."""
    records = read_annotations(path, {"image": str, "caption": (str, list)}, "retrieval evaluation", hint)
    source = os.fspath(path)
    data = RetrievalEvalData(source, [], [], [], [], [])
    n_empty = 0
    for i, rec in enumerate(records):
        raw = [rec["caption"]] if isinstance(rec["caption"], str) else rec["caption"]
        if not raw:
            raise ValueError(f"{source!r} record {i} (image {rec['image']!r}): no captions (key 'caption' is an "
                             "empty list); every evaluation image needs at least one caption")
        for j, c in enumerate(raw):
            if not isinstance(c, str):
                raise ValueError(f"{source!r} record {i} (image {rec['image']!r}): caption {j} must be a string, "
                                 f"found {type(c).__name__}")
        full = _image_file(image_root, rec["image"])
        if check_images:
            _require_image(full, source, i, rec["image"])
        img = len(data.image_files)
        data.image_files.append(full)
        data.image_names.append(rec["image"])
        data.img2txt.append([])
        for c in raw:
            clean = pre_caption(c, max_words, clean_style)
            n_empty += not clean
            data.img2txt[img].append(len(data.texts))
            data.texts.append(clean)
            data.txt2img.append(img)
    if not data.image_files:
        raise ValueError(f"retrieval evaluation file {source!r} holds no records")
    if n_empty:
        logger.warning("%s: %d caption(s) are empty after %s cleaning (kept, as empty texts)", source, n_empty,
                       clean_style)
    return data


class ImageListDataset(Dataset):
    """Images of an evaluation split, transformed without augmentation; items ``(index, tensor)``.
    A file that cannot be decoded raises ``ValueError`` naming the split file and record."""

    def __init__(self, files: Sequence[str], transform: Callable, source: str = "") -> None:
        self.files, self.transform, self.source = list(files), transform, source

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        try:
            image = load_image(self.files[index])
        except ImageLoadError as e:
            raise ValueError(f"{self.source!r} record {index}: {e}") from None
        return index, self.transform(image)

    @staticmethod
    def collate(items: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([i for i, _ in items], dtype=torch.long), torch.stack([t for _, t in items])


class RetrievalTrainDataset(Dataset):
    """Training pairs ``[{"image", "caption": str, "image_id"}]`` from one or several files.

    ``image_id`` values (strings or integers; equal values in different files are the same image) are
    mapped to contiguous integers ``image_idx`` in order of first appearance: the model's notion of
    "same image" for positives and for the queue. Image files are checked at construction
    (``check_images``); a file that cannot be decoded later raises ``ValueError`` naming the record.
    Augmentation is seeded per sample (``sample_seed(seed, epoch, index)``)."""

    def __init__(self, files: PathLike | Sequence[PathLike], image_root: PathLike, transform: Callable,
                 max_words: int = 30, clean_style: str = "albef", seed: int = 0, check_images: bool = True,
                 hint: str = RETRIEVAL_HINT) -> None:
        records = read_annotations(files, {"image": str, "caption": str, "image_id": (str, int)},
                                   "retrieval training", hint)
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.items: list[tuple[str, str, int, str, int]] = []  # path, caption, image_idx, source, record
        self.image_ids: dict[str | int, int] = {}
        counters: dict[str, int] = {}
        checked: set[str] = set()
        for rec in records:
            src = rec["_source"]
            i = counters[src] = counters.get(src, -1) + 1
            full = _image_file(image_root, rec["image"])
            if check_images and full not in checked:
                _require_image(full, src, i, rec["image"])
                checked.add(full)
            idx = self.image_ids.setdefault(rec["image_id"], len(self.image_ids))
            self.items.append((full, pre_caption(rec["caption"], max_words, clean_style), idx, src, i))
        if not self.items:
            raise ValueError(f"no retrieval training records in {files!r}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def all_captions(self) -> list[str]:
        """Every cleaned caption in record order (e.g. to train a tokenizer)."""
        return [c for _, c, _, _, _ in self.items]

    def __getitem__(self, index: "int | EpochIndex") -> dict:
        epoch, index = epoch_and_index(index, self.epoch)
        path, caption, image_idx, src, rec = self.items[index]
        try:
            image = load_image(path)
        except ImageLoadError as e:
            raise ValueError(f"{src!r} record {rec}: {e}") from None
        seed = sample_seed(self.seed, epoch, index)
        return {"image": apply_seeded(self.transform, image, seed), "caption": caption, "image_idx": image_idx,
                "index": index}


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` padded to the longest text, truncated to ``max_length`` tokens."""
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


class RetrievalTrainCollator:
    """Stack images, tokenise captions (truncated to ``max_length``); no MLM inputs."""

    def __init__(self, tokenizer, max_length: int = 30) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, samples: list[dict]) -> dict:
        captions = [s["caption"] for s in samples]
        ids, mask = tokenize_texts(self.tokenizer, captions, self.max_length)
        return {"image": torch.stack([s["image"] for s in samples]), "input_ids": ids, "attention_mask": mask,
                "image_idx": torch.tensor([s["image_idx"] for s in samples], dtype=torch.long),
                "index": torch.tensor([s["index"] for s in samples], dtype=torch.long), "captions": captions}
