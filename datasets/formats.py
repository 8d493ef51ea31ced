"""Annotation readers (the ALBEF/BLIP JSON formats), robust image loading, the pre-training dataset
and its collator.

Reproducibility: every random choice for a sample (caption pick, augmentation, MLM masking) comes from
``sample_seed(seed, epoch, index)``, so a run gives the same samples whatever the number of loader
workers or processes, the order of access, or a resume in the middle of an epoch.

Bad images: ``PretrainDataset`` skips an image that cannot be loaded (missing, truncated, undecodable,
or more pixels than ``max_image_pixels``) and substitutes another record (see
:func:`load_image_or_substitute`); the sample's ``bad_images`` lists the ``(path, reason)`` of every
failed try, and ``n_bad`` their number (the collator concatenates and sums them). Deciding when too
many images are bad, and warning once per image, is the training loop's job (``tasks.common.BadImageCheck``
counts the distinct paths in the main process, whatever the number of loader workers).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import warnings
from typing import IO, Any, Callable, NamedTuple, Optional, Sequence

import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset

from .text import mask_tokens, pre_caption
from .transforms import apply_seeded

__all__ = ["sample_seed", "EpochIndex", "epoch_and_index", "derive_seed", "DataError", "TooManyBadImagesError", "read_json", "read_annotations",
           "DEFAULT_MAX_IMAGE_PIXELS", "ImageLoadError", "load_image", "load_image_or_substitute", "placeholder_image",
           "PretrainDataset", "PretrainCollator"]

logger = logging.getLogger("datasets")
PathLike = str | os.PathLike


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """A stable 63-bit seed for sample ``index`` of ``epoch`` (BLAKE2b of the three integers): the same
    on every machine, process and Python version."""
    digest = hashlib.blake2b(f"{int(base_seed)}/{int(epoch)}/{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class EpochIndex(NamedTuple):
    """A training sample's index with the epoch whose augmentation, caption choice and masking it
    gets: what the training batch sampler (``engine.batching.EpochBatchSampler``) yields, so that
    loader workers that live on from one epoch to the next (``train.persistent_workers``), each with
    its own copy of the dataset made when it started, still produce the current epoch's samples."""

    epoch: int
    index: int


def epoch_and_index(index: "int | EpochIndex", default_epoch: int) -> tuple[int, int]:
    """``(epoch, index)`` of a training dataset's ``__getitem__`` argument: an :class:`EpochIndex`
    names both; a plain index is of ``default_epoch`` (the dataset's ``set_epoch``)."""
    if isinstance(index, EpochIndex):
        return int(index.epoch), int(index.index)
    return int(default_epoch), int(index)


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


class DataError(ValueError):
    """Bad training or evaluation data: an annotation file or record that cannot be used, or too many
    images that cannot be loaded. The message is one line naming the file and the record (or the
    config key to check); the command-line entry points print it and exit with status 2."""


class TooManyBadImagesError(DataError, RuntimeError):
    """More images failed to load than ``data.max_bad_fraction`` allows (a ``RuntimeError`` too: the
    run stops)."""


_JSON_TYPES = {dict: "object", list: "list", str: "string", int: "integer", float: "number", bool: "boolean",
               type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _record_at(text: str, pos: int) -> Optional[int]:
    """The index of the element of the top-level JSON list ``text`` that spans character ``pos`` (or
    the first that does not parse before it); None when ``text`` is not a list."""
    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        return None
    decoder, n, i = json.JSONDecoder(), 0, i + 1
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ","):
            i += 1
        if i >= len(text) or text[i] == "]":
            return n
        try:
            _, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return n
        if end > pos:
            return n
        i, n = end, n + 1


def read_json(path: PathLike, what: str, hint: str = "") -> Any:
    """The parsed content of the JSON file ``path``; ``what`` names the file in the errors
    (``"VQA answer list"``, ...). Raises ``FileNotFoundError`` ("<what> not found: <path>", followed by
    ``hint`` when given, e.g. where to get the data) and :class:`DataError` (a ``ValueError``) for a
    file that is not UTF-8 (e.g. Latin-1 bytes) or not valid JSON (e.g. truncated), naming the byte or
    line and, for a JSON list, the record. A UTF-8 byte-order mark is accepted."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}" + (f". {hint}" if hint else ""))
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        record = _record_at(raw.decode("utf-8", "replace"), len(raw[:e.start].decode("utf-8", "replace")))
        where = f", record {record}" if record is not None else ""
        raise DataError(f"{what} {path!r} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} "
                        f"(line {line}{where}); JSON files must be UTF-8 (convert it, e.g. with "
                        "iconv -f latin1 -t utf-8)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        record = _record_at(text, e.pos)
        where = f" (record {record} does not parse)" if record is not None else ""
        raise DataError(f"{what} {path!r} is not valid JSON{where}: {e}; a truncated or partly written file?") from None


def read_annotations(paths: PathLike | Sequence[PathLike], required: dict[str, type | tuple[type, ...]],
                     kind: str, hint: str = "") -> list[dict]:
    """Read one or several JSON list files (concatenated in order) and validate every record.

    ``required`` maps each key every record must have to its allowed type(s). Raises
    ``FileNotFoundError`` naming the file (followed by ``hint``, e.g. where to get the data), and
    :class:`DataError` (a ``ValueError``) naming the file (and the record index and key) for a file
    that is not UTF-8 or not valid JSON, a file that is not a JSON list, a record that is not an object,
    a missing key or a value of the wrong type (``null`` included).
    Each returned record gains ``"_source"``: the path of its file.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    records: list[dict] = []
    for path in map(os.fspath, paths):
        data = read_json(path, f"{kind} annotation file", hint)
        if not isinstance(data, list):
            raise DataError(f"{kind} annotation file {path!r} must hold a JSON list of records, "
                            f"found a JSON {_json_type(data)}")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise DataError(f"{path!r} record {i}: expected a JSON object, found a {_json_type(rec)}")
            for key, types in required.items():
                if key not in rec:
                    raise DataError(f"{path!r} record {i}: missing key {key!r} (a {kind} record needs "
                                    f"{sorted(required)})")
                if not _type_ok(rec[key], types):
                    raise DataError(f"{path!r} record {i}: key {key!r} must be {_type_names(types)}, "
                                    f"found {_json_type(rec[key])}")
            rec["_source"] = path
            records.append(rec)
    return records


# PIL's decompression-bomb warning limit (Image.MAX_IMAGE_PIXELS, about 89 MP, 0.27 GB as RGB);
# PIL itself refuses images over twice as many pixels.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageLoadError(OSError):
    """An image file that is missing, truncated, too large or cannot be decoded."""

    def __init__(self, path: PathLike, reason: str):
        super().__init__(f"cannot load image {os.fspath(path)!r}: {reason}")
        self.path, self.reason = os.fspath(path), reason

    def __reduce__(self):  # picklable across DataLoader worker processes
        return type(self), (self.path, self.reason)


def _reduce_on_open(img: Image.Image, min_side: int) -> None:
    """JPEG only: decode at the largest DCT scale (1/2, 1/4, 1/8) whose shorter side stays >= ``min_side``
    (``Image.draft``). Images that are not at least twice that large are left alone."""
    if img.format != "JPEG":
        return
    w, h = img.size
    short = min(w, h)
    if short >= 2 * min_side:
        scale = min_side / short
        img.draft(img.mode, (math.ceil(w * scale), math.ceil(h * scale)))


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit (and 32-bit integer) grayscale is scaled to 8 bits rather than clipped."""
    if img.mode in _SIXTEEN_BIT_MODES:
        img = img.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
    return img.convert("RGB")


def load_image(path: PathLike | IO[bytes], max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
               min_side: Optional[int] = None, name: Optional[str] = None) -> Image.Image:
    """Open and fully decode an image as upright 8-bit RGB; raise :class:`ImageLoadError` if that fails.

    ``path``: a file, or a binary file object (then ``name`` names it in errors). The EXIF orientation
    is applied (``ImageOps.exif_transpose``); 16-bit grayscale (PNG mode ``I;16``, ``I``) is scaled to
    8 bits. ``min_side``: a JPEG whose shorter side is at least twice this is decoded reduced (1/2,
    1/4 or 1/8) to the smallest size whose shorter side stays >= ``min_side`` (other images decode
    unchanged). ``max_pixels``: an image that would still decode to more pixels is refused before
    decoding (``None`` = no bound beyond PIL's own)."""
    label = name if name is not None else os.fspath(path)
    try:
        with warnings.catch_warnings():  # the bound below decides, not PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if min_side:
                _reduce_on_open(img, min_side)
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageLoadError(label, f"{w} x {h} = {w * h} pixels to decode, more than "
                                            f"data.max_image_pixels={max_pixels}")
            img.load()  # force a full decode so truncated files fail here, not in a transform
            if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(label, "file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(label, f"{type(e).__name__}: {e}") from e


def _coprime_stride(count: int, rng: random.Random) -> int:
    stride = rng.randrange(1, count)
    while math.gcd(stride, count) != 1:
        stride = stride % (count - 1) + 1
    return stride


def load_image_or_substitute(index: int, count: int, path_of: Callable[[int], str], seed: int,
                             max_failures: Optional[int] = None, **load_kwargs: Any
                             ) -> tuple[Optional[Image.Image], int, list[tuple[str, str]]]:
    """Load the image of record ``index`` of ``count`` records (``path_of(record)`` is its file); when it
    cannot be loaded, try substitute records until one loads. ``load_kwargs`` go to :func:`load_image`.

    The substitutes follow a walk through all records with a stride coprime to ``count``, both drawn
    from ``seed`` (the sample seed): deterministic, each record at most once, and scattered, so that
    a run of adjacent bad files is not tried in a row (each try is bad with about the dataset's
    bad fraction, which keeps the count of failures an unbiased sample of it).

    Returns ``(image, record used, failures)``, ``failures`` the ``(path, reason)`` of every failed try.
    Gives up, returning ``(None, index, failures)``, once every record was tried or more than
    ``max_failures`` distinct files failed in this call. Logs nothing: the caller counts and warns."""
    failures: list[tuple[str, str]] = []
    distinct: set[str] = set()
    used, stride = index, 0
    for attempt in range(count):
        if attempt == 1:
            stride = _coprime_stride(count, random.Random(derive_seed(seed, "substitute")))
        used = (index + attempt * stride) % count
        path = path_of(used)
        try:
            return load_image(path, **load_kwargs), used, failures
        except ImageLoadError as e:
            failures.append((path, e.reason))
            distinct.add(path)
            if max_failures is not None and len(distinct) > max_failures:
                break
    return None, index, failures


def placeholder_image(size: int) -> Image.Image:
    """A black square that stands in for a sample whose image and substitutes all failed: the
    bad-image check stops the run before such a batch is used."""
    return Image.new("RGB", (max(1, size), max(1, size)))


class PretrainDataset(Dataset):
    """Image-text pairs from pre-training files ``[{"image": str, "caption": str | [str, ...]}, ...]``.

    Captions are cleaned at load time (``clean_style`` ``"albef"`` or ``"blip"``, ``max_words``);
    records whose captions are all empty afterwards are dropped with one warning per file. Every
    unique image path gets an ``image_idx`` (captions of one image are never each other's negatives).
    ``__getitem__`` returns ``image`` (tensor), ``caption`` (str), ``image_idx``, ``index`` (the
    record actually used), ``seed`` (the sample seed, for the collator's masking), ``bad_images`` and
    ``n_bad`` (the failed tries). A list caption picks one caption from the sample seed; the transform
    runs under :func:`apply_seeded`. A failing image is replaced by a substitute record
    (:func:`load_image_or_substitute`); when more than ``max_bad_fraction`` of all images failed
    within one sample (or every record), the sample is a black placeholder with ``failed`` True,
    which the bad-image check stops on. ``max_image_pixels`` and ``decode_min_side`` bound the decode
    (see :func:`load_image`).
    """

    def __init__(self, files: PathLike | Sequence[PathLike], image_root: PathLike, transform: Callable,
                 max_words: int = 30, clean_style: str = "albef", seed: int = 0, max_bad_fraction: float = 1.0,
                 hint: str = "", max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 decode_min_side: Optional[int] = None):
        records = read_annotations(files, {"image": str, "caption": (str, list)}, "pre-training", hint)
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.load_kwargs = {"max_pixels": max_image_pixels, "min_side": decode_min_side}
        self.items: list[tuple[str, list[str], int]] = []  # (image path, cleaned captions, image_idx)
        self.image_ids: dict[str, int] = {}
        dropped: dict[str, list[int]] = {}  # file -> [records dropped, empty captions removed from lists]
        counters: dict[str, int] = {}
        for rec in records:
            src = rec["_source"]
            i = counters[src] = counters.get(src, -1) + 1
            raw = rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
            bad = next((j for j, c in enumerate(raw) if not isinstance(c, str)), None)
            if bad is not None:
                raise DataError(f"{src!r} record {i} (image {rec['image']!r}): key 'caption' must be a string or "
                                f"a list of strings; caption {bad} is a {_json_type(raw[bad])}")
            captions = [c for c in (pre_caption(c, max_words, clean_style) for c in raw) if c]
            counts = dropped.setdefault(src, [0, 0])
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
            raise DataError(f"no usable pre-training records in {files!r}")
        # one sample gives up when its failed tries alone exceed the allowed bad fraction of all images
        self.max_failures = int(max_bad_fraction * len(self.image_ids))
        self.placeholder_size = decode_min_side or 1

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

    def __getitem__(self, index: "int | EpochIndex") -> dict:
        epoch, index = epoch_and_index(index, self.epoch)
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} records")
        image, used, failures = load_image_or_substitute(index, len(self.items), self.image_path,
                                                         sample_seed(self.seed, epoch, index),
                                                         self.max_failures, **self.load_kwargs)
        _, captions, image_idx = self.items[used]
        seed = sample_seed(self.seed, epoch, used)
        caption = captions[random.Random(derive_seed(seed, "caption")).randrange(len(captions))]
        failed = image is None
        if failed:
            image = placeholder_image(self.placeholder_size)
        return {"image": apply_seeded(self.transform, image, derive_seed(seed, "augment")), "caption": caption,
                "image_idx": image_idx, "index": used, "seed": seed, "bad_images": failures, "n_bad": len(failures),
                "failed": failed}


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
            "bad_images": [f for s in samples for f in s.get("bad_images", ())],
            "failed": any(s.get("failed", False) for s in samples),
            "captions": captions,
        }
