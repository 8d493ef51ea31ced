"""Pre-training pairs in WebDataset-style tar shards: a writer, and a streaming reader for training.

Why: 4M-14M pairs as one JSON list cost gigabytes of Python objects in every loader process, and as
as many small image files they strain the file system. Shards are a few hundred tar files read
sequentially; only a small ``index.json`` (one sample count per shard) is loaded up front.

Format (what :func:`write_shards` writes and :class:`ShardPretrainDataset` reads)::

    out_dir/shard-000000.tar   members, grouped by key (the file name up to its first dot):
        000000000.png          the image bytes, copied unchanged (.jpg, .png, .webp, ...)
        000000000.json         {"caption": str | [str, ...], "image": "<path relative to image_root>",
                                "image_idx": int}
        000000001.jpg ...
    out_dir/index.json         {"format": "srcl-shards-v1", "num_samples": N,
                                "shards": [{"name": "shard-000000.tar", "num_samples": n}, ...]}

Shards from other tools work too: a caption in ``<key>.txt`` (one caption) or ``<key>.json``
(``"caption"`` a string or a list); without ``image_idx`` every sample counts as its own image.
img2dataset's layout (``00000.tar`` with ``{key}.jpg``/``.txt``/``.json``, and ``00000.parquet`` and
``00000_stats.json`` beside it) reads as it is: the count comes from the stats file's
``successes``. Without an ``index.json`` or stats file beside a shard its samples are counted by
scanning the tar once. Shards may live on a web server or an object store (``data.shards`` URLs:
``https://``, ``s3://``, ``gs://``, ...; ``datasets/shard_io.py``).

Reading one epoch (see :class:`ShardPretrainDataset`): the shard order is permuted from
``(seed, epoch)``; the concatenated sample sequence is cut to the epoch length (a multiple of the
global batch) and split into equal contiguous ranges, one per (process, loader worker); each range
is shuffled by a seeded buffer of ``shuffle_buffer`` samples. The order of every sample is therefore
planned from the index alone, before any image is read, which makes a resume in the middle of an
epoch exact (the skipped samples are not decoded). Per-sample randomness (caption choice,
augmentation, MLM masking) comes from ``sample_seed(seed, epoch, index)`` with ``index`` the
sample's position in the shards, exactly as :class:`~datasets.formats.PretrainDataset` does: shards
written from a JSON file in its order give the same samples, with the same augmentation, as the JSON
reader. What is *not* invariant (unlike the JSON reader): which samples share a step depends on the
number of processes and loader workers, so resume with the same ones for an exact continuation.

CLI::

    python -m datasets.shards --ann data/shapes/pretrain.json --image-root data/shapes --out data/shards
"""
from __future__ import annotations

import argparse
import bisect
import glob
import io
import json
import logging
import os
import random
import re
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from engine.batching import check_batch_size

from . import shard_io
from .shard_io import is_url
from .formats import (DEFAULT_MAX_IMAGE_PIXELS, ImageLoadError, derive_seed, load_image, placeholder_image,
                      read_annotations, sample_seed)
from .text import pre_caption
from .transforms import apply_seeded

__all__ = ["INDEX_NAME", "IMAGE_EXTENSIONS", "write_shards", "expand_shard_patterns", "ShardInfo",
           "read_shard_infos", "iter_tar_samples", "plan_epoch", "ShardPretrainDataset", "main"]

logger = logging.getLogger("datasets")

INDEX_NAME = "index.json"
INDEX_FORMAT = "srcl-shards-v1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_TEXT_EXTENSIONS = ("json", "txt")


# ----------------------------------------------------------------------------- writer
def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one member with fixed metadata (reproducible archives)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def write_shards(records: Sequence[dict], image_root: str | os.PathLike, out_dir: str | os.PathLike,
                 samples_per_shard: int = 1000, prefix: str = "shard", shuffle_seed: Optional[int] = None,
                 skip_missing: bool = False) -> dict:
    """Write pre-training ``records`` (``[{"image": relative path, "caption": str | [str, ...]}]``, the
    JSON format) as tar shards plus ``index.json`` into ``out_dir``; return the index.

    Records keep their order (or are shuffled by ``shuffle_seed``: recommended for real data so that
    every shard is a random sample of the whole set). Image bytes are copied unchanged. Every unique
    image path gets an ``image_idx`` (first appearance order, as the JSON reader assigns it), so
    captions of one image are still never each other's negatives. A missing image file raises
    ``FileNotFoundError`` naming the record, or is skipped and counted with ``skip_missing``.
    Shards are written to a temporary name and renamed when complete; the index is written last.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive; got {samples_per_shard}")
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    order = list(range(len(records)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    image_ids: dict[str, int] = {}
    shards: list[dict] = []
    skipped: list[str] = []
    tar: Optional[tarfile.TarFile] = None
    tmp = ""
    count = 0

    def close() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            os.replace(tmp, os.path.join(out, shards[-1]["name"]))
            tar = None

    for i in order:
        rec = records[i]
        for key in ("image", "caption"):
            if key not in rec:
                raise ValueError(f"pre-training record {i}: missing key {key!r}")
        path = os.path.normpath(os.path.join(os.fspath(image_root), rec["image"]))
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            if not skip_missing:
                raise FileNotFoundError(f"record {i}: cannot read image {path!r} ({e}); "
                                        "pass skip_missing=True (--skip-missing) to leave it out") from e
            skipped.append(rec["image"])
            continue
        if tar is None or shards[-1]["num_samples"] >= samples_per_shard:
            close()
            shards.append({"name": f"{prefix}-{len(shards):06d}.tar", "num_samples": 0})
            tmp = os.path.join(out, shards[-1]["name"] + ".tmp")
            tar = tarfile.open(tmp, "w")
        ext = os.path.splitext(path)[1].lower().lstrip(".") or "jpg"
        if ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"record {i}: image {path!r} has an unsupported extension; use one of {IMAGE_EXTENSIONS}")
        key = f"{count:09d}"
        meta = {"caption": rec["caption"], "image": rec["image"], "image_idx": image_ids.setdefault(path, len(image_ids))}
        _tar_add(tar, f"{key}.{ext}", data)
        _tar_add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        shards[-1]["num_samples"] += 1
        count += 1
    close()
    if skipped:
        logger.warning("left out %d record(s) whose image could not be read, e.g. %s", len(skipped), skipped[:3])
    index = {"format": INDEX_FORMAT, "num_samples": count, "num_images": len(image_ids),
             "samples_per_shard": samples_per_shard, "shuffle_seed": shuffle_seed,
             "skipped_missing": len(skipped), "shards": shards}
    tmp_index = os.path.join(out, INDEX_NAME + ".tmp")
    with open(tmp_index, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp_index, os.path.join(out, INDEX_NAME))
    return index


# ----------------------------------------------------------------------------- shard lists
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def _brace_expand(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> 3 names (zero padding kept); ``{a,b}`` alternatives; nested left to right."""
    m = _RANGE.search(pattern)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        if hi < lo:
            raise ValueError(f"shard pattern {pattern!r}: empty range {m.group(0)}")
        return [x for n in range(lo, hi + 1)
                for x in _brace_expand(pattern[:m.start()] + f"{n:0{width}d}" + pattern[m.end():])]
    m = _LIST.search(pattern)
    if m:
        return [x for alt in m.group(1).split(",") for x in _brace_expand(pattern[:m.start()] + alt + pattern[m.end():])]
    return [pattern]


def _glob(pattern: str) -> list[str]:
    if not is_url(pattern):
        return sorted(glob.glob(pattern))
    if pattern.startswith(("http://", "https://")):
        raise ValueError(f"shard pattern {pattern!r}: a web server cannot be listed; name the shards with a brace "
                         "range (shard-{000000..000099}.tar) or their index.json")
    fs, inner = shard_io._fsspec(pattern)
    scheme = pattern.partition("://")[0]
    return sorted(f"{scheme}://{p}" for p in fs.glob(inner))


def expand_shard_patterns(patterns: str | Sequence[str]) -> list[str]:
    """Shard file list from patterns: brace ranges (``data/shards/shard-{000000..000099}.tar``),
    ``{a,b}`` lists, globs (``data/shards/*.tar``), an ``index.json`` (its shards), or a directory
    holding one; local paths or URLs (``http(s)://``, ``s3://``, ``gs://``, any fsspec protocol: see
    ``datasets/shard_io.py``). Order is kept, duplicates are removed. A named local file that does not
    exist, or a pattern that matches nothing, raises ``FileNotFoundError`` naming it (a remote shard is
    found missing when it is first read, with the same error)."""
    patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    if not patterns:
        raise ValueError("no shards given (data.shards is empty)")
    out: list[str] = []
    for pattern in map(os.fspath, patterns):
        if not is_url(pattern) and os.path.isdir(pattern):
            pattern = os.path.join(pattern, INDEX_NAME)
        if pattern.endswith(".json"):
            index = _read_index(pattern)
            if index is None:
                raise FileNotFoundError(f"shard index not found: {pattern!r} (write shards with python -m datasets.shards)")
            out += [shard_io.join(shard_io.dirname(pattern), s["name"]) for s in index["shards"]]
            continue
        for name in _brace_expand(pattern):
            if any(c in name for c in "*?["):
                found = _glob(name)
                if not found:
                    raise FileNotFoundError(f"no shard matches {name!r}")
                out += found
            elif not is_url(name) and not os.path.isfile(name):
                raise FileNotFoundError(f"shard not found: {name!r} (from pattern {pattern!r})")
            else:
                out.append(name)
    return list(dict.fromkeys(shard_io.normalize(p) for p in out))


def _read_index(path: str) -> Optional[dict]:
    try:
        index = shard_io.read_json(path)
    except ValueError as e:
        raise ValueError(f"shard index {e}") from None
    if index is None:
        return None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise ValueError(f"shard index {path!r} has no 'shards' list (is it an index written by datasets.shards?)")
    for i, s in enumerate(index["shards"]):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("num_samples"), int):
            raise ValueError(f"shard index {path!r} entry {i}: needs 'name' (str) and 'num_samples' (int)")
    return index


def _stats_count(path: str) -> Optional[int]:
    """The sample count img2dataset writes beside its shard ``NAME.tar``: ``NAME_stats.json``'s
    ``successes`` (None when there is no such file)."""
    stem = path[:-len(".tar")] if path.endswith(".tar") else None
    stats = shard_io.read_json(stem + "_stats.json") if stem else None
    count = stats.get("successes") if isinstance(stats, dict) else None
    return count if isinstance(count, int) else None


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its path, its sample count and the global index of its first sample."""
    path: str
    num_samples: int
    first: int


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = member path up to the first dot of the file name; ext = the rest."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(d, stem), ext.lower()


def iter_tar_samples(path: str, want_images: bool = True,
                     keep: Optional[Callable[[int], bool]] = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` for each sample of one tar, in member order. With ``want_images=False``
    image data is skipped (seeked over), e.g. to count samples or read captions only; samples whose
    position ``i`` in the tar has ``keep(i)`` false are not read at all (their parts are empty). A
    damaged tar stops with a ``tarfile.TarError`` / ``OSError`` after the samples before the damage."""
    key, parts = None, {}
    ordinal = -1
    if is_url(path):  # a forward stream: members are read (or passed over) in order
        stream = shard_io.open_stream(path)
        tar_cm = tarfile.open(fileobj=stream, mode="r|")
    else:
        stream, tar_cm = None, tarfile.open(path, "r:")
    with tar_cm as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _split_key(member.name)
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
                ordinal += 1
                wanted = keep is None or keep(ordinal)
            if wanted and (want_images or ext not in IMAGE_EXTENSIONS):
                f = tar.extractfile(member)
                parts[ext] = f.read() if f is not None else b""
            else:
                parts[ext] = b""
    if key is not None:
        yield key, parts
    if stream is not None:
        stream.close()


def read_shard_infos(paths: Sequence[str]) -> list[ShardInfo]:
    """Sample counts of ``paths`` from the ``index.json`` beside each shard, else img2dataset's
    ``NAME_stats.json`` beside ``NAME.tar``, else by one scan of the tar."""
    infos: list[ShardInfo] = []
    indexes: dict[str, Optional[dict[str, int]]] = {}
    first = 0
    for path in paths:
        d = shard_io.dirname(path)
        if d not in indexes:
            index = _read_index(shard_io.join(d, INDEX_NAME))
            indexes[d] = None if index is None else {s["name"]: s["num_samples"] for s in index["shards"]}
        counts = indexes[d]
        n = counts.get(shard_io.basename(path)) if counts is not None else None
        if n is None:
            n = _stats_count(path)
        if n is None:
            logger.warning("shard %s is not listed in an %s beside it: counting its samples by scanning it", path, INDEX_NAME)
            n = sum(1 for _ in iter_tar_samples(path, want_images=False))
        infos.append(ShardInfo(path, n, first))
        first += n
    if first == 0:
        raise ValueError(f"the shards {list(paths)[:3]}... hold no samples")
    return infos


# ----------------------------------------------------------------------------- epoch plan
def _buffer_shuffle(items: list[int], size: int, rng: random.Random) -> list[int]:
    """The order a streaming shuffle buffer of ``size`` items yields ``items`` in (size <= 1: unchanged)."""
    if size <= 1:
        return list(items)
    buf: list[int] = []
    out: list[int] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        out.append(buf[j])
        buf[j] = x
    rng.shuffle(buf)
    return out + buf


def plan_epoch(infos: Sequence[ShardInfo], epoch: int, seed: int, num_samples: int, global_batch: int,
               grad_accum: int, rank: int, world: int, worker: int, num_workers: int,
               shuffle_buffer: int) -> list[int]:
    """Global sample indices that loader ``worker`` of process ``rank`` yields in ``epoch``, in order.

    The shards are permuted from ``(seed, epoch)``; their concatenated samples are cut to
    ``steps * global_batch`` (``steps = num_samples // global_batch``); process ``rank`` takes the
    ``rank``-th of ``world`` equal contiguous ranges, which is split among the loader workers in
    whole micro-batches in the order the DataLoader interleaves them (worker ``t % W`` delivers the
    process's ``t``-th micro-batch); each worker's range is shuffled by a seeded buffer. The plans
    of all (rank, worker) pairs are disjoint and together cover the cut sequence exactly.
    """
    steps = num_samples // global_batch
    per_rank = steps * global_batch // world
    micro = global_batch // (world * grad_accum)
    batches = per_rank // micro  # micro-batches per process and epoch
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(infos), generator=g).tolist()
    # per-worker counts in whole micro-batches; worker w gets batches w, w + W, w + 2W, ...
    counts = [len(range(w, batches, num_workers)) * micro for w in range(num_workers)]
    start = rank * per_rank + sum(counts[:worker])
    stop = start + counts[worker]
    sizes = [infos[s].num_samples for s in perm]
    out: list[int] = []
    pos = 0
    for s, n in zip(perm, sizes):  # positions [start, stop) of the concatenated permuted shards
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            first = infos[s].first
            out.extend(range(first + lo - pos, first + hi - pos))
        pos += n
        if pos >= stop:
            break
    rng = random.Random(f"{seed}/{epoch}/{rank}/{worker}/shuffle")
    return _buffer_shuffle(out, shuffle_buffer, rng)


# ----------------------------------------------------------------------------- reader
def _decode_image(data: bytes, name: str, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                  min_side: Optional[int] = None) -> Image.Image:
    """Fully decode image bytes as RGB, with ``load_image``'s bound (``max_pixels``) and reduced JPEG
    decode (``min_side``), as for files."""
    return load_image(io.BytesIO(data), max_pixels=max_pixels, min_side=min_side, name=name)


class ShardPretrainDataset(IterableDataset):
    """Streaming pre-training pairs from tar shards; yields the sample dict of
    :class:`~datasets.formats.PretrainDataset` (``image``, ``caption``, ``image_idx``, ``index``,
    ``seed``, ``n_bad``) plus ``image_name`` (the original relative image path, when recorded), so
    :class:`~datasets.formats.PretrainCollator` batches it.

    Call :meth:`configure` (global batch, accumulation, rank, world) once and :meth:`set_position`
    before each epoch; then iterate it through a ``DataLoader`` with ``batch_size`` = the micro-batch
    (``global_batch // (world * grad_accum)``): every process yields exactly
    ``steps_per_epoch() * grad_accum`` micro-batches per epoch, whatever the shard sizes.

    ``max_image_pixels`` and ``decode_min_side`` bound and reduce the decode as for the JSON reader
    (:func:`~datasets.formats.load_image`): a JPEG much larger than the crop decodes at 1/2 to 1/8.

    A sample whose image is missing, cannot be decoded, or whose captions are all empty after
    cleaning is skipped and replaced by the worker's previous good sample (or the next one, at the
    start), which carries ``n_bad = 1`` and ``bad_images = [(sample name, reason)]``, as the JSON
    reader's samples do: the training loop's bad-image check counts and warns (once per sample). When
    every sample of a loader worker is bad, its samples are black placeholders with ``failed`` True,
    which the check stops on. A damaged tar counts its unreadable rest as bad samples.
    """

    def __init__(self, shards: str | Sequence[str], transform: Callable, max_words: int = 30,
                 clean_style: str = "albef", seed: int = 0, shuffle_buffer: int = 1000,
                 num_samples: Optional[int] = None, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 decode_min_side: Optional[int] = None) -> None:
        self.paths = expand_shard_patterns(shards)
        self.infos = read_shard_infos(self.paths)
        self.total = self.infos[-1].first + self.infos[-1].num_samples
        self.num_samples = self.total if num_samples is None else int(num_samples)
        if not 0 < self.num_samples <= self.total:
            raise ValueError(f"data.shards_num_samples={num_samples} must be in [1, {self.total}] "
                             f"(the shards hold {self.total} samples)")
        self.transform, self.max_words, self.clean_style, self.seed = transform, max_words, clean_style, seed
        self.shuffle_buffer = shuffle_buffer
        self.max_image_pixels, self.decode_min_side = max_image_pixels, decode_min_side
        self.global_batch, self.grad_accum, self.rank, self.world = 0, 1, 0, 1
        self.epoch, self.start_step = 0, 0
        self._firsts = [i.first for i in self.infos]

    # -- setup --------------------------------------------------------------------------------
    def configure(self, global_batch: int, grad_accum: int, rank: int, world: int) -> None:
        """Set the batch geometry (the checks of ``EpochBatchSampler``: a ``ConfigError`` naming the sizes
        and the ``--set train.batch_size=N`` that fixes them)."""
        check_batch_size(self.num_samples, global_batch, grad_accum, world,
                         "an epoch of the shards (data.shards, data.shards_num_samples)")
        self.global_batch, self.grad_accum, self.rank, self.world = global_batch, grad_accum, rank, world

    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def micro_batch(self) -> int:
        return self.global_batch // (self.world * self.grad_accum)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_position(self, epoch: int, start_step: int) -> None:
        """The next iteration yields ``epoch`` from optimiser step ``start_step`` on (exact resume)."""
        self.epoch, self.start_step = int(epoch), int(start_step)

    def __len__(self) -> int:
        return self.total

    def all_captions(self) -> list[str]:
        """Every cleaned caption in shard order (reads only the text members), e.g. to train a tokenizer."""
        out: list[str] = []
        for info in self.infos:
            for key, parts in iter_tar_samples(info.path, want_images=False):
                try:
                    out += self._captions(parts)[0]
                except ValueError:
                    pass
        return out

    # -- iteration ----------------------------------------------------------------------------
    def plan(self, worker: int, num_workers: int) -> list[int]:
        """This process's and ``worker``'s sample order for the current epoch, from ``start_step`` on."""
        if not self.global_batch:
            raise RuntimeError("ShardPretrainDataset.configure(...) was not called")
        consumed = self.start_step * self.grad_accum  # micro-batches this process already used
        # The DataLoader takes batches from its workers round-robin starting at worker 0, and
        # logical worker w delivers the process's micro-batches w, w + W, ...: after a resume at
        # micro-batch c, loader worker j serves logical worker (c + j) % W to keep that order.
        logical = (worker + consumed) % num_workers
        order = plan_epoch(self.infos, self.epoch, self.seed, self.num_samples, self.global_batch, self.grad_accum,
                           self.rank, self.world, logical, num_workers, self.shuffle_buffer)
        return order[len(range(logical, consumed, num_workers)) * self.micro_batch():]

    def _captions(self, parts: dict[str, bytes]) -> tuple[list[str], dict]:
        meta: dict = {}
        if "json" in parts:
            meta = json.loads(parts["json"].decode("utf-8"))
            raw = meta.get("caption", meta.get("text"))
            if raw is None:
                raise ValueError("its .json has no 'caption'")
        elif "txt" in parts:
            raw = parts["txt"].decode("utf-8")
        else:
            raise ValueError("no caption member (.txt or .json)")
        raw = raw if isinstance(raw, list) else [raw]
        if not all(isinstance(c, str) for c in raw):
            raise ValueError("'caption' must be a string or a list of strings")
        captions = [c for c in (pre_caption(c, self.max_words, self.clean_style) for c in raw) if c]
        if not captions:
            raise ValueError(f"caption empty after {self.clean_style} cleaning")
        return captions, meta

    def _sample(self, index: int, name: str, parts: dict[str, bytes]) -> dict:
        """Decode one sample (raises ``ImageLoadError`` / ``ValueError`` for a bad one)."""
        captions, meta = self._captions(parts)
        ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
        if ext is None:
            raise ImageLoadError(name, "no image member")
        image = _decode_image(parts[ext], f"{name}.{ext}", self.max_image_pixels, self.decode_min_side)
        seed = sample_seed(self.seed, self.epoch, index)
        caption = captions[random.Random(derive_seed(seed, "caption")).randrange(len(captions))]
        image_idx = meta.get("image_idx", index)
        return {"image": apply_seeded(self.transform, image, derive_seed(seed, "augment")), "caption": caption,
                "image_idx": int(image_idx), "index": index, "seed": seed, "n_bad": 0,
                "image_name": meta.get("image", name)}

    def _raw_stream(self, plan: list[int], needed: set[int]) -> Iterator[tuple[int, str, Optional[dict[str, bytes]]]]:
        """``(global index, name, parts)`` of the needed samples in shard-read order; ``parts`` None
        for samples lost in a damaged tar. Shards are read in the order the plan first needs them,
        so that read-ahead stays within about one shuffle buffer; unneeded samples are not kept."""
        order: dict[int, None] = {}
        for idx in plan:
            order.setdefault(bisect.bisect_right(self._firsts, idx) - 1)
        for s in order:
            info = self.infos[s]
            local_needed = [i for i in range(info.first, info.first + info.num_samples) if i in needed]
            if not local_needed:
                continue
            last = local_needed[-1]
            got: set[int] = set()
            try:
                keep = (lambda i, first=info.first: first + i in needed)
                for local, (key, parts) in enumerate(iter_tar_samples(info.path, keep=keep)):
                    idx = info.first + local
                    if idx in needed:
                        got.add(idx)
                        yield idx, f"{info.path}:{key}", parts
                    if idx >= last:
                        break
            except FileNotFoundError:
                raise  # a missing shard is a configuration error, not damage
            except (tarfile.TarError, OSError, EOFError) as e:
                logger.warning("shard %s is damaged after %d readable sample(s): %s", info.path, len(got), e)
            for idx in local_needed:
                if idx not in got:
                    yield idx, f"{info.path}:#{idx - info.first}", None

    def __iter__(self) -> Iterator[dict]:
        wi = get_worker_info()
        worker, num_workers = (0, 1) if wi is None else (wi.id, wi.num_workers)
        plan = self.plan(worker, num_workers)
        if not plan:
            return
        needed = set(plan)
        pending: dict[int, tuple[str, Optional[dict[str, bytes]]]] = {}
        stream = self._raw_stream(plan, needed)
        last_good: Optional[dict] = None
        owed: list[tuple[int, tuple[str, str]]] = []  # bad samples not yet replaced (at the start of the stream)
        for idx in plan:
            while idx not in pending:
                try:
                    i, name, parts = next(stream)
                except StopIteration:
                    raise RuntimeError(f"shard sample {idx} was planned but not found in the shards") from None
                pending[i] = (name, parts)
            name, parts = pending.pop(idx)
            try:
                if parts is None:
                    raise ImageLoadError(name, "unreadable (damaged tar)")
                sample = self._sample(idx, name, parts)
            except (ImageLoadError, ValueError, UnicodeDecodeError) as e:
                failure = (name, e.reason if isinstance(e, ImageLoadError) else f"{type(e).__name__}: {e}")
                if last_good is None:
                    owed.append((idx, failure))
                else:
                    yield {**last_good, "n_bad": 1, "bad_images": [failure]}
                continue
            yield sample
            for _, failure in owed:
                yield {**sample, "n_bad": 1, "bad_images": [failure]}
            owed = []
            last_good = sample
        for idx, failure in owed:  # every sample of this worker was bad
            seed = sample_seed(self.seed, self.epoch, idx)
            yield {"image": apply_seeded(self.transform, placeholder_image(1), derive_seed(seed, "augment")),
                   "caption": "", "image_idx": idx, "index": idx, "seed": seed, "n_bad": 1,
                   "bad_images": [failure], "failed": True, "image_name": failure[0]}


# ----------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m datasets.shards --ann a.json [b.json ...] --image-root ROOT --out DIR``."""
    ap = argparse.ArgumentParser(description="Write pre-training annotation JSONs and their images as tar shards.")
    ap.add_argument("--ann", nargs="+", required=True, help="pre-training annotation JSON(s) [{image, caption}]")
    ap.add_argument("--image-root", required=True, help="directory the 'image' paths are relative to")
    ap.add_argument("--out", required=True, help="output directory for shard-*.tar and index.json")
    ap.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar file (default 1000)")
    ap.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    ap.add_argument("--shuffle-seed", type=int, default=None, help="shuffle the records with this seed before writing")
    ap.add_argument("--skip-missing", action="store_true", help="leave out records whose image cannot be read")
    args = ap.parse_args(argv)
    try:
        records = read_annotations(args.ann, {"image": str, "caption": (str, list)}, "pre-training")
        index = write_shards(records, args.image_root, args.out, args.samples_per_shard, args.prefix,
                             args.shuffle_seed, args.skip_missing)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", flush=True)
        return 2
    print(f"wrote {index['num_samples']} samples ({index['num_images']} images) in {len(index['shards'])} shard(s) "
          f"to {args.out}; use data.format=shards data.shards=[{os.path.join(args.out, INDEX_NAME)}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
