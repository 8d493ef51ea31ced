"""Writing a world: the images, the annotation JSONs in the ALBEF/BLIP formats, ``scenes.json`` and
the manifest, into one folder (the ``image_root``; every ``image`` path is relative to it)::

    images/{train,val,test}/NNNNNN.png    NNNNNN = the global integer image id
    scenes.json                           {image_path: scene}, with the captions and their kinds and
                                          each object's box in pixels ([x0, y0, x1, y1], ends exclusive)
    pretrain.json                         [{"image", "caption": [captions]}]           (train)
    retrieval_train.json                  [{"image", "caption": str, "image_id": int}] (train)
    retrieval_{val,test}.json             [{"image", "caption": [captions]}]
    vqa_{train,val}.json                  [{"question_id", "question", "answer": [10], "image",
                                            "dataset": "vqa", "answer_type"}]
    vqa_test.json                         the same without "answer"
    vqa_test_gt.json                      vqa_test.json with the answers, for local scoring
    answer_list.json                      every answer that can occur (most frequent first)
    nlvr2_{train,dev,test}.json           [{"images": [left, right], "sentence", "label"}]
    snli_ve_{train,dev,test}.json, images/snli_ve/   visual entailment (shapesworld/entailment_write.py)
    caption_train.json                    [{"image", "caption": str, "image_id": int}]
    caption_{val,test}.json               [{"image", "caption": [refs], "image_id": int}]
    caption_{val,test}_gt.json            COCO ground truth that pycocotools reads
    manifest.json                         config, counts, version, false-negative statistics
    .shapes_written.json                  every file written: size and SHA-256

The same config gives byte-identical files. :func:`ensure_shapes` skips all work when the folder
holds a complete world for the same config (``manifest.json`` is written last, so an interrupted
generation is detected and redone), and never writes over a file the generator did not write itself
(or that was changed since): ``FileExistsError`` names it and nothing is written.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from shapesworld.annotate import (CAPTION_KINDS, CaptionSample, annotate_answers, false_negative_stats, make_captions,
                                  make_nlvr2, make_questions)
from shapesworld.config import GENERATOR, GENERATOR_VERSION, ShapesConfig
from shapesworld.entailment_write import ensure_entailment
from shapesworld.record import (ANNOTATION_FILES, check_not_foreign, file_entry, is_complete, is_ours, locked,
                                read_written, save_written, write_json)
from shapesworld.scene import (BACKGROUNDS, COLOR_NAMES, COLS, ROWS, SHAPES, SIZES, SPLITS, Scene, image_path,
                               render_job, sample_scene)
from shapesworld.truth import ShapesWorld

NLVR2_SPLIT_NAMES = {"train": "train", "val": "dev", "test": "test"}


def _rng(cfg: ShapesConfig, stream: int, sub: int = 0) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, stream, sub])


def _generate(out_dir: str, cfg: ShapesConfig, workers: int,
              progress: Optional[bool]) -> Dict[str, Any]:
    """Write the world for ``cfg`` into ``out_dir`` (held locked by the caller); its manifest."""
    fmt = cfg.image_format
    man_path = os.path.join(out_dir, "manifest.json")
    # 1. scenes (one stream per split: val/test do not change with the number of train images)
    scenes: Dict[str, Scene] = {}
    by_split: Dict[str, List[Tuple[str, Scene]]] = {s: [] for s in SPLITS}
    next_id = 0
    for k, split in enumerate(SPLITS):
        rng = _rng(cfg, 1, k)
        for _ in range(cfg.split_sizes()[split]):
            sc = sample_scene(rng, cfg, next_id, split)
            p = image_path(split, next_id, fmt)
            scenes[p] = sc
            by_split[split].append((p, sc))
            next_id += 1
    # 2. captions
    rng = _rng(cfg, 2)
    captions: Dict[str, List[CaptionSample]] = {p: make_captions(sc, cfg, rng)
                                                for p, sc in scenes.items()}
    # the files this generation writes: refused before anything is touched when one of them exists
    # and is not the generator's own; then all are recorded as about to be written, so that an
    # interrupted generation can be redone
    written = read_written(out_dir)
    targets = ["manifest.json", *ANNOTATION_FILES, *scenes]
    check_not_foreign(out_dir, targets, written)
    stale = [rel for rel in written if rel not in scenes and re.fullmatch(r"images/(train|val|test)/\d{6}\.(png|jpg)", rel)
             and os.path.isfile(os.path.join(out_dir, rel)) and is_ours(out_dir, rel, written)]
    written.update({rel: {"pending": True} for rel in targets})
    save_written(out_dir, written)
    if os.path.exists(man_path):
        os.remove(man_path)  # an interrupted regeneration must not look complete
    # 3. images
    for rel in stale:  # the generator's images of an earlier, different config
        os.remove(os.path.join(out_dir, rel))
        del written[rel]
    for split in SPLITS:
        d = os.path.join(out_dir, "images", split)
        os.makedirs(d, exist_ok=True)
        for name in os.listdir(d):  # temporary files of an interrupted generation
            if re.fullmatch(r"\d{6}\.(png|jpg)\.tmp", name):
                os.remove(os.path.join(d, name))
    jobs = [(os.path.join(out_dir, p), sc.to_dict(), cfg.image_size, fmt)
            for p, sc in scenes.items()]
    show = progress if progress is not None else (len(jobs) >= 5000)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in requirements.txt
        show = False

        class tqdm:  # type: ignore[no-redef]
            def __init__(self, *a, **k): pass
            def update(self, n=1): pass
            def close(self): pass
    bar = tqdm(total=len(jobs), desc="shapes: rendering", unit="img", disable=not show,
               file=sys.stderr)
    if workers > 1 and len(jobs) >= 200:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(render_job, jobs, chunksize=64):
                bar.update(1)
    else:
        for job in jobs:
            render_job(job)
            bar.update(1)
    bar.close()
    for rel in scenes:
        written[rel] = file_entry(os.path.join(out_dir, rel))

    files: Dict[str, Any] = {}

    def write(name: str, obj: Any, indent: Optional[int] = None) -> None:
        written[name] = write_json(os.path.join(out_dir, name), obj, indent)
        files[name] = len(obj)

    # 4. scenes.json
    scene_json = {}
    for p, sc in scenes.items():
        d = sc.to_dict()
        d["captions"] = [c.text for c in captions[p]]
        d["caption_kinds"] = [c.kind for c in captions[p]]
        scene_json[p] = d
    write("scenes.json", scene_json)
    # 5. pre-training, retrieval, captioning
    train = by_split["train"]
    write("pretrain.json",
          [{"image": p, "caption": [c.text for c in captions[p]]} for p, _ in train])
    per_caption_train = [{"image": p, "caption": c.text, "image_id": sc.image_id}
                         for p, sc in train for c in captions[p]]
    write("retrieval_train.json", per_caption_train)
    write("caption_train.json", [dict(r) for r in per_caption_train])
    for split in ("val", "test"):
        recs = by_split[split]
        write(f"retrieval_{split}.json",
              [{"image": p, "caption": [c.text for c in captions[p]]} for p, _ in recs])
        write(f"caption_{split}.json",
              [{"image": p, "caption": [c.text for c in captions[p]], "image_id": sc.image_id}
               for p, sc in recs])
        anns, ann_id = [], 0
        for p, sc in recs:
            for c in captions[p]:
                anns.append({"image_id": sc.image_id, "caption": c.text, "id": ann_id})
                ann_id += 1
        gt = {"images": [{"id": sc.image_id} for _, sc in recs], "annotations": anns,
              "info": {"description": "shapes world captions, " + split},
              "licenses": [], "type": "captions"}
        written[f"caption_{split}_gt.json"] = write_json(os.path.join(out_dir, f"caption_{split}_gt.json"), gt)
        files[f"caption_{split}_gt.json"] = len(anns)
    # 6. VQA
    qid = 0
    vqa: Dict[str, List[Dict[str, Any]]] = {}
    for k, split in enumerate(SPLITS):
        rng = _rng(cfg, 3, k)
        recs = []
        for p, sc in by_split[split]:
            for q, ans, atype in make_questions(sc, cfg, rng):
                recs.append({"question_id": qid, "question": q,
                             "answer": annotate_answers(ans, atype, rng, cfg), "image": p,
                             "dataset": "vqa", "answer_type": atype})
                qid += 1
        vqa[split] = recs
    write("vqa_train.json", vqa["train"])
    write("vqa_val.json", vqa["val"])
    write("vqa_test.json", [{k: v for k, v in r.items() if k != "answer"} for r in vqa["test"]])
    write("vqa_test_gt.json", vqa["test"])
    freq: Dict[str, int] = {}
    for split in SPLITS:
        for r in vqa[split]:
            for a in r["answer"]:
                freq[a] = freq.get(a, 0) + (1 if split == "train" else 0)
    vocab = (["yes", "no"] + [str(i) for i in range(cfg.max_objects + 1)] + list(COLOR_NAMES)
             + list(SHAPES) + list(SIZES))
    for a in vocab:
        freq.setdefault(a, 0)
    write("answer_list.json", sorted(freq, key=lambda a: (-freq[a], a)))
    # 7. NLVR2
    for k, split in enumerate(SPLITS):
        rng = _rng(cfg, 4, k)
        write(f"nlvr2_{NLVR2_SPLIT_NAMES[split]}.json",
              make_nlvr2(by_split[split], cfg.nlvr2_pairs[k], rng, cfg))
    # 8. statistics and manifest (last)
    world = ShapesWorld(scenes)
    samples = [(c.text, c.kind, p) for p, _ in train for c in captions[p]]
    n_caps = sum(len(v) for v in captions.values())
    kinds: Dict[str, int] = {}
    for v in captions.values():
        for c in v:
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
    fn = false_negative_stats(world, samples, _rng(cfg, 5))
    fn["caption_kinds"] = {k: kinds[k] for k in CAPTION_KINDS if k in kinds}
    fn["partial_fraction"] = round(1 - kinds.get("full", 0) / max(1, n_caps), 6)
    manifest = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "config": cfg.to_json(),
        "image_root": ".",
        "images": {s: len(by_split[s]) for s in SPLITS},
        "files": files,
        "vocabulary": {"shapes": list(SHAPES), "colors": list(COLOR_NAMES), "sizes": list(SIZES),
                       "rows": list(ROWS), "cols": list(COLS), "backgrounds": list(BACKGROUNDS)},
        "false_negatives": fn,
        "complete": True,
    }
    written["manifest.json"] = write_json(man_path, manifest, indent=2)
    save_written(out_dir, written)
    return manifest


def ensure_shapes(out_dir: Union[str, os.PathLike], cfg: Optional[ShapesConfig] = None, *,
                  force: bool = False, workers: int = 1,
                  progress: Optional[bool] = None) -> Tuple[Dict[str, Any], bool]:
    """Generate the world into ``out_dir`` unless a complete one for ``cfg`` is there.

    Returns (manifest, created). Safe against concurrent callers (a file lock serialises them).
    Never writes over a file the generator did not write (or that changed since it wrote it):
    ``FileExistsError`` names the file (see :data:`WRITTEN_RECORD`)."""
    cfg = cfg or ShapesConfig()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with locked(out_dir):
        if not force:
            man = is_complete(out_dir, cfg)
            if man is not None:
                ensure_entailment(out_dir, cfg)  # the SNLI-VE part, also into a world written before it existed
                return man, False
        man = _generate(out_dir, cfg, max(1, int(workers)), progress)
        ensure_entailment(out_dir, cfg, force=True)
        return man, True


def generate_shapes(out_dir: Union[str, os.PathLike], cfg: Optional[ShapesConfig] = None, *,
                    force: bool = False, workers: int = 1,
                    progress: Optional[bool] = None) -> Dict[str, Any]:
    """Write the shapes world to ``out_dir`` and return its manifest (skips an up-to-date one)."""
    return ensure_shapes(out_dir, cfg, force=force, workers=workers, progress=progress)[0]
