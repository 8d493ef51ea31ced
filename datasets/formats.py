"""Annotation readers (the ALBEF/BLIP JSON formats), robust image loading, the pre-training dataset
and its collator.

Reproducibility: every random choice for a sample (caption pick, augmentation, MLM masking) comes from
``sample_seed(seed, epoch, index)``, so a run gives the same samples whatever the number of loader
workers or processes, the order of access, or a resume in the middle of an epoch.

Bad images: ``PretrainDataset`` skips an image that cannot be loaded (warning once per path and
process on the ``"datasets"`` logger), substitutes the next record and reports the count in the
sample's ``n_bad`` (summed by the collator). Deciding when too many images are bad is the trainer's
job: it sums ``n_bad`` over the run and stops past its own threshold.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from .text import mask_tokens, pre_caption
from .transforms import apply_seeded

__all__ = ["sample_seed", "derive_seed", "read_json", "read_annotations", "ImageLoadError", "load_image",
           "load_image_or_next", "PretrainDataset", "PretrainCollator"]

logger = logging.getLogger("datasets")
PathLike = str | os.PathLike


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """A stable 63-bit seed for sample ``index`` of ``epoch`` (BLAKE2b of the three integers): the same
    on every machine, process and Python version."""
    digest = hashlib.blake2b(f"{int(base_seed)}/{int(epoch)}/{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def derive_seed(seed: int, purpose: str) -> int:
    """An independent 63-bit seed for one use (``"caption"``, ``"augment"``, ``"mask"``) of a sample
    seed, so the random streams of the different uses are not correlated."""
    digest = hashlib.blake2b(f"{int(seed)}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _type_ok(value: Any, types: type | tuple[type, ...]) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true/false is not an int here
    return isinstance(value, types)


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def read_json(path: PathLike, what: str, hint: str = "") -> Any:
    """The parsed content of the JSON file ``path``; ``what`` names the file in the errors
    (``"VQA answer list"``, ...). Raises ``FileNotFoundError`` ("<what> not found: <path>", followed by
    ``hint`` when given, e.g. where to get the data) and ``ValueError`` for invalid JSON."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}" + (f". {hint}" if hint else ""))
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {path!r} is not valid JSON: {e}") from e


def read_annotations(paths: PathLike | Sequence[PathLike], required: dict[str, type | tuple[type, ...]],
                     kind: str, hint: str = "") -> list[dict]:
    """Read one or several JSON list files (concatenated in order) and validate every record.

    ``required`` maps each key every record must have to its allowed type(s). Raises
    ``FileNotFoundError`` naming the file (followed by ``hint``, e.g. where to get the data), and
    ``ValueError`` naming the file (and the record index and key) for invalid JSON, a file that is
    not a JSON list, a record that is not an object, a missing key or a value of the wrong type.
    Each returned record gains ``"_source"``: the path of its file.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    records: list[dict] = []
    for path in map(os.fspath, paths):
        data = read_json(path, f"{kind} annotation file", hint)
        if not isinstance(data, list):
            raise ValueError(f"{kind} annotation file {path!r} must hold a JSON list of records, "
                             f"found a JSON {type(data).__name__}")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise ValueError(f"{path!r} record {i}: expected a JSON object, found {type(rec).__name__}")
            for key, types in required.items():
                if key not in rec:
                    raise ValueError(f"{path!r} record {i}: missing key {key!r} (a {kind} record needs "
                                     f"{sorted(required)})")
                if not _type_ok(rec[key], types):
                    raise ValueError(f"{path!r} record {i}: key {key!r} must be {_type_names(types)}, "
                                     f"found {type(rec[key]).__name__}")
            rec["_source"] = path
            records.append(rec)
    return records


class ImageLoadError(OSError):
    """An image file that is missing, truncated or cannot be decoded."""

    def __init__(self, path: PathLike, reason: str):
        super().__init__(f"cannot load image {os.fspath(path)!r}: {reason}")
        self.path, self.reason = os.fspath(path), reason

    def __reduce__(self):  # picklable across DataLoader worker processes
        return type(self), (self.path, self.reason)


def load_image(path: PathLike) -> Image.Image:
    """Open and fully decode an image as RGB; raise :class:`ImageLoadError` if that fails."""
    try:
        with Image.open(path) as img:
            img.load()  # force a full decode so truncated files fail here, not in a transform
            return img.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(path, f"{type(e).__name__}: {e}") from e


def load_image_or_next(index: int, count: int, path_of: Callable[[int], str], max_bad_retries: int,
                       warned: set[str]) -> tuple[Image.Image, int, int]:
    """Load the image of record ``index`` of ``count`` records (``path_of(record)`` is its file); when it
    cannot be loaded, try the next records (wrapping around), at most ``max_bad_retries`` more times.

    Each unreadable file is warned about once (on the ``"datasets"`` logger) per ``warned`` set, which
    the caller keeps (one per dataset and process). Returns ``(image, record used, images skipped)``;
    raises ``RuntimeError`` naming the files when every try failed."""
    tried: list[str] = []
    for attempt in range(max_bad_retries + 1):
        used = (index + attempt) % count
        path = path_of(used)
        try:
            return load_image(path), used, len(tried)
        except ImageLoadError as e:
            tried.append(path)
            if path not in warned:
                warned.add(path)
                logger.warning("skipping unreadable image %s (%s)", path, e.reason)
    raise RuntimeError(f"{len(tried)} images in a row failed to load from index {index}: {tried}")


class PretrainDataset(Dataset):
    """Image-text pairs from pre-training files ``[{"image": str, "caption": str | [str, ...]}, ...]``.

    Captions are cleaned at load time (``clean_style`` ``"albef"`` or ``"blip"``, ``max_words``);
    records whose captions are all empty afterwards are dropped with one warning per file. Every
    unique image path gets an ``image_idx`` (captions of one image are never each other's negatives).
    ``__getitem__`` returns ``image`` (tensor), ``caption`` (str), ``image_idx``, ``index`` (the
    record actually used), ``seed`` (the sample seed, for the collator's masking) and ``n_bad``.
    A list caption picks one caption from the sample seed; the transform runs under
    :func:`apply_seeded`. A failing image is replaced by the next record, at most ``max_bad_retries``
    times, then ``RuntimeError``; see the module docstring for who decides when there are too many.
    """

    def __init__(self, files: PathLike | Sequence[PathLike], image_root: PathLike, transform: Callable,
                 max_words: int = 30, clean_style: str = "albef", seed: int = 0, max_bad_retries: int = 10,
                 hint: str = ""):
        records = read_annotations(files, {"image": str, "caption": (str, list)}, "pre-training", hint)
        self.transform, self.seed, self.max_bad_retries, self.epoch = transform, seed, max_bad_retries, 0
        self.items: list[tuple[str, list[str], int]] = []  # (image path, cleaned captions, image_idx)
        self.image_ids: dict[str, int] = {}
        dropped: dict[str, list[int]] = {}  # file -> [records dropped, empty captions removed from lists]
        for rec in records:
            raw = rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
            if not all(isinstance(c, str) for c in raw):
                raise ValueError(f"{rec['_source']!r}, record of image {rec['image']!r}: key 'caption' must be a "
                                 "string or a list of strings")
            captions = [c for c in (pre_caption(c, max_words, clean_style) for c in raw) if c]
            counts = dropped.setdefault(rec["_source"], [0, 0])
            if not captions:
                counts[0] += 1
                continue
            counts[1] += len(raw) - len(captions)
            path = os.path.normpath(os.path.join(os.fspath(image_root), rec["image"]))
            self.items.append((path, captions, self.image_ids.setdefault(path, len(self.image_ids))))
        for source, (n_rec, n_cap) in dropped.items():
            if n_rec or n_cap:
                logger.warning("%s: dropped %d record(s) whose caption is empty after %s cleaning and %d empty "
                               "caption(s) from caption lists", source, n_rec, clean_style, n_cap)
        if not self.items:
            raise ValueError(f"no usable pre-training records in {files!r}")
        self._warned: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation, caption choice and masking ``__getitem__`` produces."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def image_path(self, index: int) -> str:
        """The image file of record ``index`` (``image_root`` joined, normalised)."""
        return self.items[index][0]

    def all_captions(self) -> list[str]:
        """Every cleaned caption, in record order (e.g. to train a tokenizer)."""
        return [c for _, captions, _ in self.items for c in captions]

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} records")
        image, used, n_bad = load_image_or_next(index, len(self.items), self.image_path, self.max_bad_retries,
                                                self._warned)
        _, captions, image_idx = self.items[used]
        seed = sample_seed(self.seed, self.epoch, used)
        caption = captions[random.Random(derive_seed(seed, "caption")).randrange(len(captions))]
        return {"image": apply_seeded(self.transform, image, derive_seed(seed, "augment")), "caption": caption,
                "image_idx": image_idx, "index": used, "seed": seed, "n_bad": n_bad}


class PretrainCollator:
    """Batch pre-training samples: stacks images, tokenises captions (``padding="longest"``,
    truncation to ``max_length``) and masks them for MLM. Each sample is masked on its own
    (unpadded) tokens with a generator seeded from its seed, so its masks do not depend on the batch."""

    def __init__(self, tokenizer, max_length: int = 30, mlm_prob: float = 0.15):
        self.tokenizer, self.max_length, self.mlm_prob = tokenizer, max_length, mlm_prob
        self.special_ids = sorted(set(tokenizer.all_special_ids))

    def __call__(self, samples: list[dict]) -> dict:
        captions = [s["caption"] for s in samples]
        enc = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        mlm_input_ids, mlm_labels = input_ids.clone(), torch.full_like(input_ids, -100)
        special = torch.tensor(self.special_ids)
        for i, sample in enumerate(samples):
            keep = attention_mask[i].bool()
            ids = input_ids[i, keep].unsqueeze(0)
            gen = torch.Generator().manual_seed(derive_seed(sample["seed"], "mask"))
            masked, labels = mask_tokens(ids, torch.isin(ids, special), self.tokenizer.mask_token_id,
                                         len(self.tokenizer), self.mlm_prob, gen, self.special_ids)
            mlm_input_ids[i, keep], mlm_labels[i, keep] = masked[0], labels[0]
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mlm_input_ids": mlm_input_ids,
            "mlm_labels": mlm_labels,
            "image_idx": torch.tensor([s["image_idx"] for s in samples], dtype=torch.long),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
            "n_bad": sum(int(s["n_bad"]) for s in samples),
            "captions": captions,
        }
