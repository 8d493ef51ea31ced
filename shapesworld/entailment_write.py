"""Writing the SNLI-VE part of a world (``shapesworld/entailment.py``) beside the rest of it::

    images/snli_ve/{train,val,test}/NNNNNN.png   each scene's image with one cell covered
    snli_ve_{train,dev,test}.json                 [{"image", "sentence", "label", "covered", "kind"}]
    snli_ve_manifest.json                         config, version, counts by label (written last)

ALBEF's ``ve_*.json`` format (``label``: entailment / neutral / contradiction); ``covered`` (the
hidden cell) and ``kind`` (object / empty) are extra keys the readers keep. The part is generated
from the world's ``scenes.json`` (one seeded stream per split), recorded in the generator's record
of written files like the rest, and regenerated when the world's config changes.
"""
from __future__ import annotations

import io
import json
import os
import re
from typing import Any, Dict, List, Optional

import numpy as np

from shapesworld.config import GENERATOR, ShapesConfig
from shapesworld.entailment import LABELS, make_entailment, render_covered
from shapesworld.record import check_not_foreign, is_ours, read_written, save_written, write_bytes, write_json
from shapesworld.scene import SPLITS, Scene

__all__ = ["VERSION", "MANIFEST", "SPLIT_NAMES", "covered_image_path", "ensure_entailment"]

VERSION = "snli-ve-1.0"
MANIFEST = "snli_ve_manifest.json"
SPLIT_NAMES = {"train": "train", "val": "dev", "test": "test"}  # SNLI-VE's split names
_STREAM = 17  # the seed stream of this part (write.py uses 1-5)
_IMAGE_RE = re.compile(r"images/snli_ve/(train|val|test)/\d{6}\.(png|jpg)")


def covered_image_path(split: str, image_id: int, image_format: str = "png") -> str:
    """The relative path of a scene's covered image."""
    return f"images/snli_ve/{split}/{image_id:06d}.{image_format}"


def _complete(out_dir: str, cfg: ShapesConfig) -> bool:
    man = _manifest(out_dir)
    if not man or man.get("version") != VERSION or man.get("config") != cfg.to_json():
        return False
    return all(os.path.exists(os.path.join(out_dir, f)) for f in [*man.get("files", {}), *man.get("images", [])])


def _manifest(out_dir: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(out_dir, MANIFEST), "r", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def ensure_entailment(out_dir: str, cfg: ShapesConfig, force: bool = False) -> Optional[Dict[str, Any]]:
    """Write the SNLI-VE part into the complete world in ``out_dir`` (held locked by the caller)
    unless it is there for ``cfg``; its manifest (None for a world without positions)."""
    if not cfg.use_positions:
        return None
    if not force and _complete(out_dir, cfg):
        return _manifest(out_dir)
    with open(os.path.join(out_dir, "scenes.json"), "r", encoding="utf-8") as fh:
        scenes = {p: Scene.from_dict(d) for p, d in json.load(fh).items()}
    fmt = cfg.image_format
    records: Dict[str, List[Dict[str, Any]]] = {}
    covers: Dict[str, Any] = {}
    for k, split in enumerate(SPLITS):
        part = [(p, sc) for p, sc in scenes.items() if sc.split == split]
        rng = np.random.default_rng([cfg.seed, _STREAM, k])
        records[split], split_covers = make_entailment(part, rng, lambda sc: covered_image_path(sc.split, sc.image_id, fmt))
        covers.update(split_covers)
    files = [f"snli_ve_{SPLIT_NAMES[s]}.json" for s in SPLITS]
    written = read_written(out_dir)
    check_not_foreign(out_dir, [MANIFEST, *files, *covers], written)
    stale = [rel for rel in written if _IMAGE_RE.fullmatch(rel) and rel not in covers
             and os.path.isfile(os.path.join(out_dir, rel)) and is_ours(out_dir, rel, written)]
    written.update({rel: {"pending": True} for rel in [MANIFEST, *files, *covers]})
    save_written(out_dir, written)
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        os.remove(os.path.join(out_dir, MANIFEST))
    for rel in stale:
        os.remove(os.path.join(out_dir, rel))
        del written[rel]
    for rel, (cover, sc) in covers.items():
        os.makedirs(os.path.dirname(os.path.join(out_dir, rel)), exist_ok=True)
        img = render_covered(sc, cover, cfg.image_size)
        buf = io.BytesIO()
        img.save(buf, format="PNG" if fmt == "png" else "JPEG", **({} if fmt == "png" else {"quality": 95}))
        written[rel] = write_bytes(os.path.join(out_dir, rel), buf.getvalue())
    counts = {}
    for split, name in zip(SPLITS, files):
        written[name] = write_json(os.path.join(out_dir, name), records[split])
        counts[name] = {label: sum(r["label"] == label for r in records[split]) for label in LABELS}
    manifest = {"generator": GENERATOR, "version": VERSION, "config": cfg.to_json(), "files": counts,
                "images": sorted(covers), "complete": True}
    written[MANIFEST] = write_json(os.path.join(out_dir, MANIFEST), manifest, indent=1)
    save_written(out_dir, written)
    return manifest
