"""What the generator keeps in a world's folder besides the world: the record of every file it wrote
(:data:`WRITTEN_RECORD`: name -> size and SHA-256), the check that it never writes over a file it did
not write, the manifest (written last: a world without one is incomplete) and the folder lock."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from shapesworld.config import GENERATOR, GENERATOR_VERSION, ShapesConfig
from shapesworld.scene import image_path

# the record of every file the generator wrote into a folder (name -> size and SHA-256); the
# generator never writes over a file that this record does not name or that changed since
WRITTEN_RECORD = ".shapes_written.json"
# the generator name in the manifests of worlds written before the generator kept its record
FIRST_GENERATOR = "datasets.shapes"

ANNOTATION_FILES = (
    "scenes.json", "pretrain.json", "retrieval_train.json", "retrieval_val.json",
    "retrieval_test.json", "vqa_train.json", "vqa_val.json", "vqa_test.json", "vqa_test_gt.json",
    "answer_list.json", "nlvr2_train.json", "nlvr2_dev.json", "nlvr2_test.json",
    "caption_train.json", "caption_val.json", "caption_test.json", "caption_val_gt.json",
    "caption_test_gt.json",
)


def write_bytes(path: str, data: bytes) -> Dict[str, Any]:
    """Write ``data`` to ``path`` (a temporary file, then rename); its entry of the written record."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_json(path: str, obj: Any, indent: Optional[int] = None) -> Dict[str, Any]:
    """Write ``obj`` as ASCII JSON (one trailing newline); its entry of the written record."""
    text = json.dumps(obj, indent=indent, ensure_ascii=True) + "\n"
    return write_bytes(path, text.encode("utf-8"))


def file_entry(path: str) -> Dict[str, Any]:
    """An existing file's entry of the written record: size and SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def read_written(out_dir: Union[str, os.PathLike]) -> Dict[str, Dict[str, Any]]:
    """The record of the files the generator wrote into ``out_dir`` (relative path -> entry: size and
    sha256, or ``pending`` while a generation that was about to write it has not finished).

    A folder generated before this record existed: the files its manifest names, untested."""
    out_dir = os.fspath(out_dir)
    try:
        with open(os.path.join(out_dir, WRITTEN_RECORD), "r", encoding="utf-8") as fh:
            rec = json.load(fh)
        if isinstance(rec, dict) and isinstance(rec.get("files"), dict):
            return dict(rec["files"])
    except (OSError, ValueError):
        pass
    man = read_manifest(out_dir)
    if not isinstance(man, dict) or man.get("generator") not in (GENERATOR, FIRST_GENERATOR):
        return {}
    legacy = {name: {"legacy": True} for name in man.get("files", {})}
    legacy["manifest.json"] = {"legacy": True}
    try:
        cfg = ShapesConfig.from_dict(man.get("config", {}))
    except (TypeError, ValueError):
        return legacy
    for split, iid in _all_image_paths(cfg):
        legacy[image_path(split, iid, cfg.image_format)] = {"legacy": True}
    return legacy


def save_written(out_dir: str, files: Dict[str, Dict[str, Any]]) -> None:
    """Write the record of the generator's files (:data:`WRITTEN_RECORD`)."""
    write_json(os.path.join(out_dir, WRITTEN_RECORD),
                {"generator": GENERATOR, "version": GENERATOR_VERSION,
                 "files": dict(sorted(files.items()))}, indent=0)


def is_ours(out_dir: str, rel: str, written: Dict[str, Dict[str, Any]]) -> bool:
    """Whether the existing file ``rel`` is one the generator wrote and nobody changed since."""
    entry = written.get(rel)
    if entry is None:
        return False
    if entry.get("pending") or entry.get("legacy"):
        return True
    path = os.path.join(out_dir, rel)
    return os.path.getsize(path) == entry.get("size") and file_entry(path)["sha256"] == entry.get("sha256")


def check_not_foreign(out_dir: str, targets: Sequence[str], written: Dict[str, Dict[str, Any]]) -> None:
    """``FileExistsError`` naming the first of ``targets`` that exists but is not the generator's own."""
    for rel in targets:
        path = os.path.join(out_dir, rel)
        if os.path.lexists(path) and not (os.path.isfile(path) and is_ours(out_dir, rel, written)):
            raise FileExistsError(
                f"refusing to write the shapes world over {path}: the shapes generator did not write this file "
                f"(or it was changed since; see {os.path.join(out_dir, WRITTEN_RECORD)}); move it away or "
                "generate the world into another folder")


def read_manifest(out_dir: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """``out_dir/manifest.json``, or None when it is missing or unreadable."""
    path = os.path.join(os.fspath(out_dir), "manifest.json")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _all_image_paths(cfg: ShapesConfig) -> List[Tuple[str, int]]:
    """(split, image id) of every image of a world generated for ``cfg``."""
    out, next_id = [], 0
    for split, n in cfg.split_sizes().items():
        for _ in range(n):
            out.append((split, next_id))
            next_id += 1
    return out


def is_complete(out_dir: Union[str, os.PathLike], cfg: ShapesConfig) -> Optional[Dict[str, Any]]:
    """The manifest if ``out_dir`` holds a complete world generated for ``cfg``, else None."""
    out_dir = os.fspath(out_dir)
    man = read_manifest(out_dir)
    if not man or man.get("version") != GENERATOR_VERSION or man.get("config") != cfg.to_json():
        return None
    if not all(os.path.exists(os.path.join(out_dir, f)) for f in man.get("files", {})):
        return None
    for split, iid in _all_image_paths(cfg):
        if not os.path.exists(os.path.join(out_dir, image_path(split, iid, cfg.image_format))):
            return None
    return man


@contextlib.contextmanager
def locked(out_dir: str):
    """Hold the folder's generator lock (``.shapes.lock``): concurrent generators take turns."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(os.path.join(out_dir, ".shapes.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
