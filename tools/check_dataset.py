"""Check annotation JSONs against an image root and write a cleaned copy.

    python -m tools.check_dataset --ann data/cc3m_train.json data/sbu.json --image-root /data/images \\
        --format pretrain --out data/pretrain_clean.json --report data/pretrain_report.json

For each record of the ALBEF/BLIP-format annotation files (docs/datasets.md) it checks that every
image exists and fully decodes (truncated and corrupt files are found by a complete decode, as the
training loader does), finds files with identical content under different paths and repeated records,
and cleans the text the way training will (ALBEF ``pre_caption`` / ``pre_question``) to find texts that
become empty or are longer than ``--max-words`` (they would be cut). It writes one cleaned JSON list
(all inputs concatenated; records with a missing/unreadable image, an empty text or an invalid
structure dropped; empty captions removed from caption lists; texts kept as they were, because the
loaders clean them) and prints a summary table. It never overwrites an input file.

Images are checked once each, in a thread pool, with a progress bar.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from PIL import Image

from datasets import nlvr2_data, snli_ve_data
from datasets.text import pre_caption, pre_question

__all__ = ["FORMATS", "ImageStatus", "check_image", "check_dataset", "main"]


@dataclass(frozen=True)
class FormatSpec:
    """What a record of one annotation format holds."""

    required: dict[str, tuple[type, ...]]
    image_key: str          # "image" (a path) or "images" (a list of paths)
    text_key: str           # caption / question / sentence
    text_kind: str          # "caption" (pre_caption) or "question" (pre_question)
    label: Optional[Callable[[Any], int]] = None  # the loader's label parser (raises ValueError)
    image_file: Callable[[str], str] = str        # the loader's rule from a record's path to the file


FORMATS: dict[str, FormatSpec] = {
    "pretrain": FormatSpec({"image": (str,), "caption": (str, list)}, "image", "caption", "caption"),
    "retrieval": FormatSpec({"image": (str,), "caption": (str, list)}, "image", "caption", "caption"),
    "caption": FormatSpec({"image": (str,), "caption": (str, list)}, "image", "caption", "caption"),
    "vqa": FormatSpec({"image": (str,), "question": (str,)}, "image", "question", "question"),
    "nlvr2": FormatSpec({"images": (list,), "sentence": (str,), "label": (str, bool, int)}, "images", "sentence",
                        "caption", label=nlvr2_data.label_to_int),
    "snli_ve": FormatSpec({"image": (str,), "sentence": (str,), "label": (str,)}, "image", "sentence", "caption",
                          label=snli_ve_data.label_to_int, image_file=snli_ve_data.image_file),
}


@dataclass
class ImageStatus:
    """Result of checking one image file: ``status`` is ``ok``, ``missing`` or ``unreadable``."""

    status: str
    reason: str = ""
    digest: str = ""
    size: tuple[int, int] = (0, 0)


def check_image(path: str) -> ImageStatus:
    """Read ``path``, hash its bytes and decode it completely (as ``datasets.formats.load_image``)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return ImageStatus("missing", "file not found")
    except IsADirectoryError:
        return ImageStatus("missing", "is a directory")
    except OSError as e:
        return ImageStatus("unreadable", f"{type(e).__name__}: {e}")
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if not data:
        return ImageStatus("unreadable", "empty file", digest)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            size = img.size
            img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return ImageStatus("unreadable", f"{type(e).__name__}: {e}", digest)
    return ImageStatus("ok", "", digest, size)


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _validate(rec: Any, spec: FormatSpec) -> str:
    """Why a record is structurally invalid, or ``""``."""
    if not isinstance(rec, dict):
        return f"not a JSON object ({type(rec).__name__})"
    for key, types in spec.required.items():
        if key not in rec:
            return f"missing key {key!r}"
        if not _type_ok(rec[key], types):
            return f"key {key!r} has type {type(rec[key]).__name__}"
    images = rec[spec.image_key]
    if spec.image_key == "images" and (len(images) != 2 or not all(isinstance(p, str) for p in images)):
        return "key 'images' must be a list of two paths"
    text = rec[spec.text_key]
    if isinstance(text, list) and not all(isinstance(t, str) for t in text):
        return f"key {spec.text_key!r} must hold strings"
    if spec.label is not None:
        try:
            spec.label(rec["label"])
        except ValueError as err:
            return f"key 'label': {err}"
    return ""


@dataclass
class FileStats:
    """Counts for one annotation file (columns of the summary table)."""

    records: int = 0
    kept: int = 0
    invalid: int = 0
    missing_image: int = 0
    unreadable_image: int = 0
    empty_text: int = 0
    long_text: int = 0
    duplicate_record: int = 0
    duplicate_image: int = 0
    empty_captions_removed: int = 0


@dataclass
class CheckResult:
    """Everything :func:`check_dataset` found."""

    cleaned: list[dict]
    stats: dict[str, FileStats]
    images: dict[str, ImageStatus]
    duplicate_groups: list[list[str]]
    dropped: list[dict] = field(default_factory=list)   # {"file", "index", "reason"}
    long_texts: list[dict] = field(default_factory=list)  # {"file", "index", "words"}


def _clean(text: str, kind: str, style: str) -> str:
    """Text as training will see it, without the word limit."""
    return pre_question(text, 10 ** 9) if kind == "question" else pre_caption(text, 10 ** 9, style)


def check_dataset(ann_files: list[str], image_root: str, fmt: str, max_words: int = 30, style: str = "albef",
                  drop_long: bool = False, drop_duplicate_images: bool = False, workers: int = 8,
                  progress: bool = True, replace_prefix: Optional[list[tuple[str, str]]] = None) -> CheckResult:
    """Scan ``ann_files`` (format ``fmt``) against ``image_root``; see the module docstring.

    ``replace_prefix``: ``(old, new)`` pairs applied to the start of every image path first (ALBEF's
    released pre-training JSONs hold the authors' absolute paths); the cleaned JSON has the new paths.

    Raises:
        FileNotFoundError: an annotation file or the image root does not exist.
        ValueError: an annotation file is not a JSON list.
    """
    spec = FORMATS[fmt]
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image root not found: {image_root}")
    data: dict[str, list] = {}
    for path in ann_files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"annotation file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"annotation file {path} is not valid JSON: {e}") from e
        if not isinstance(obj, list):
            raise ValueError(f"annotation file {path} must hold a JSON list of records, found a {type(obj).__name__}")
        if replace_prefix:
            for rec in obj:
                if isinstance(rec, dict) and spec.image_key in rec:
                    rec[spec.image_key] = _replace(rec[spec.image_key], replace_prefix)
        data[path] = obj

    def image_paths(rec: dict) -> list[str]:
        rel = rec[spec.image_key]
        return [os.path.normpath(os.path.join(image_root, spec.image_file(r)))
                for r in (rel if isinstance(rel, list) else [rel])]

    unique: dict[str, None] = {}
    for recs in data.values():
        for rec in recs:
            if not _validate(rec, spec):
                unique.update(dict.fromkeys(image_paths(rec)))
    images = _check_all(list(unique), workers, progress)

    by_digest: dict[str, list[str]] = defaultdict(list)
    for path, st in images.items():
        if st.status == "ok":
            by_digest[st.digest].append(path)
    groups = [g for g in by_digest.values() if len(g) > 1]  # in order of first use: the first file is kept
    later_duplicate = {p for g in groups for p in g[1:]}

    result = CheckResult([], {}, images, groups)
    seen: set = set()
    for path, recs in data.items():
        st = result.stats[path] = FileStats(records=len(recs))

        def drop(i: int, reason: str, counter: str) -> None:
            setattr(st, counter, getattr(st, counter) + 1)
            result.dropped.append({"file": path, "index": i, "reason": reason})

        for i, rec in enumerate(recs):
            why = _validate(rec, spec)
            if why:
                drop(i, f"invalid record: {why}", "invalid")
                continue
            paths = image_paths(rec)
            bad = [(p, images[p]) for p in paths if images[p].status != "ok"]
            if bad:
                p, s = bad[0]
                drop(i, f"{s.status} image {p}: {s.reason}", "missing_image" if s.status == "missing" else "unreadable_image")
                continue
            if drop_duplicate_images and any(p in later_duplicate for p in paths):
                drop(i, "image identical to another file (--drop-duplicate-images)", "duplicate_image")
                continue
            raw = rec[spec.text_key]
            texts = raw if isinstance(raw, list) else [raw]
            cleaned = [_clean(t, spec.text_kind, style) for t in texts]
            keep = [t for t, c in zip(texts, cleaned) if c]
            if not keep:
                drop(i, f"{spec.text_key} empty after cleaning", "empty_text")
                continue
            words = max(len(c.split()) for c in cleaned if c)
            if words > max_words:
                st.long_text += 1
                result.long_texts.append({"file": path, "index": i, "words": words})
                if drop_long:
                    result.dropped.append({"file": path, "index": i, "reason": f"{words} words > {max_words} (--drop-long)"})
                    continue
            identity = (tuple(paths), tuple(c for c in cleaned if c))
            if identity in seen:
                drop(i, "duplicate record (same image(s) and text)", "duplicate_record")
                continue
            seen.add(identity)
            out = dict(rec)
            if isinstance(raw, list) and len(keep) < len(raw):
                st.empty_captions_removed += len(raw) - len(keep)
                out[spec.text_key] = keep
            result.cleaned.append(out)
            st.kept += 1
    return result


def _replace(value: Any, pairs: list[tuple[str, str]]) -> Any:
    """Apply the first matching ``(old, new)`` prefix replacement to a path (or each path of a list)."""
    if isinstance(value, list):
        return [_replace(v, pairs) for v in value]
    if isinstance(value, str):
        for old, new in pairs:
            if value.startswith(old):
                return new + value[len(old):]
    return value


def _check_all(paths: list[str], workers: int, progress: bool) -> dict[str, ImageStatus]:
    """:func:`check_image` on every path in a thread pool (decoding releases the GIL)."""
    from tqdm import tqdm

    out: dict[str, ImageStatus] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress,
                 file=sys.stderr, mininterval=0.5) as bar:
        for path, status in zip(paths, pool.map(check_image, paths, chunksize=16)):
            out[path] = status
            bar.update(1)
    return out


COLUMNS = [("records", "records"), ("kept", "kept"), ("invalid", "invalid"), ("missing_image", "missing img"),
           ("unreadable_image", "unreadable img"), ("empty_text", "empty text"), ("long_text", "long text"),
           ("duplicate_record", "dup record"), ("duplicate_image", "dup image")]


def summary_table(result: CheckResult, max_words: int, drop_long: bool) -> str:
    """The per-file table plus the image-level findings."""
    rows = [[os.path.basename(p)] + [str(getattr(s, c)) for c, _ in COLUMNS] for p, s in result.stats.items()]
    if len(rows) > 1:
        rows.append(["TOTAL"] + [str(sum(getattr(s, c) for s in result.stats.values())) for c, _ in COLUMNS])
    header = ["file"] + [h for _, h in COLUMNS]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    counts = Counter(s.status for s in result.images.values())
    lines.append("")
    lines.append(f"images: {len(result.images)} unique, {counts['ok']} ok, {counts['missing']} missing, "
                 f"{counts['unreadable']} unreadable; {len(result.duplicate_groups)} group(s) of identical files "
                 f"({sum(len(g) - 1 for g in result.duplicate_groups)} redundant)")
    lines.append(f"long text: more than {max_words} words after cleaning ("
                 + ("dropped" if drop_long else "kept: training cuts them to max_words") + ")")
    for status in ("missing", "unreadable"):
        bad = [(p, s.reason) for p, s in result.images.items() if s.status == status]
        for p, reason in bad[:5]:
            lines.append(f"  {status}: {p} ({reason})")
        if len(bad) > 5:
            lines.append(f"  ... {len(bad) - 5} more {status} (see --report)")
    for g in result.duplicate_groups[:5]:
        lines.append(f"  identical: {', '.join(g)}")
    return "\n".join(lines)


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return Path(a).resolve() == Path(b).resolve()


def _write_json(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.check_dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ann", nargs="+", required=True, metavar="FILE", help="annotation JSON files (concatenated)")
    p.add_argument("--image-root", required=True, help="directory the 'image' paths are relative to")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="annotation format (docs/datasets.md)")
    p.add_argument("--out", required=True, help="cleaned JSON to write (never one of the inputs)")
    p.add_argument("--report", default=None, help="also write a JSON report with every finding")
    p.add_argument("--replace-prefix", nargs=2, action="append", metavar=("OLD", "NEW"), default=None,
                   help="rewrite image paths starting with OLD to start with NEW (repeatable); e.g. ALBEF's "
                        "absolute paths to paths relative to --image-root")
    p.add_argument("--max-words", type=int, default=30, help="texts longer than this after cleaning are reported")
    p.add_argument("--clean-style", choices=("albef", "blip"), default="albef", help="caption cleaning rules")
    p.add_argument("--drop-long", action="store_true", help="drop over-long texts instead of keeping them")
    p.add_argument("--drop-duplicate-images", action="store_true",
                   help="drop records whose image is byte-identical to an earlier file under another path")
    p.add_argument("--workers", type=int, default=min(32, 4 * (os.cpu_count() or 1)), help="image-checking threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any record was dropped")
    args = p.parse_args(argv)

    for target in [args.out] + ([args.report] if args.report else []):
        for ann in args.ann:
            if _same_file(target, ann):
                print(f"error: refusing to overwrite the input {ann} (output {target}); choose another path",
                      file=sys.stderr)
                return 2
    if args.report and _same_file(args.report, args.out):
        print("error: --report and --out name the same file", file=sys.stderr)
        return 2
    try:
        result = check_dataset(args.ann, args.image_root, args.format, args.max_words, args.clean_style,
                               args.drop_long, args.drop_duplicate_images, args.workers, not args.no_progress,
                               [tuple(r) for r in args.replace_prefix or []])
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _write_json(result.cleaned, args.out)
    print(summary_table(result, args.max_words, args.drop_long))
    print(f"wrote {args.out}: {len(result.cleaned)} of {sum(s.records for s in result.stats.values())} records")
    if args.report:
        report = {
            "format": args.format, "image_root": args.image_root, "max_words": args.max_words,
            "files": {p: vars(s) for p, s in result.stats.items()},
            "missing_images": sorted(p for p, s in result.images.items() if s.status == "missing"),
            "unreadable_images": {p: s.reason for p, s in sorted(result.images.items()) if s.status == "unreadable"},
            "duplicate_image_groups": result.duplicate_groups,
            "dropped_records": result.dropped, "long_texts": result.long_texts, "out": args.out,
        }
        _write_json(report, args.report)
        print(f"wrote {args.report}")
    return 1 if args.strict and result.dropped else 0


if __name__ == "__main__":
    sys.exit(main())
