"""Captions for images and their scores: the generator (batched, split over processes), the
scoring references of a split, ``captions_<split>.json`` in the COCO results format and
``results.json``; the run's evaluator for the fine-tuning driver, and ``--predict``."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from tqdm import tqdm

from datasets.caption_data import CaptionSplit, load_coco_references, read_caption_split
from datasets.formats import DataError
from datasets.retrieval_data import ImageListDataset
from datasets.transforms import build_transform
from engine import distributed as D
from engine.config import to_dict
from engine.loader import SafeDataLoader
from models.caption import CaptionModel
from models.decoder import decode_texts
from tasks.caption_eval import CaptionScores, format_table, predictions_to_results, score_captions
from tasks.spec import Run, autocast_for, write_json

if TYPE_CHECKING:
    from tasks.caption import CaptionConfig, CaptionData

log = logging.getLogger("caption")

__all__ = ["PROTOCOL", "token_ids", "CaptionGenerator", "references_for", "load_splits", "evaluate_split",
           "evaluate_and_write", "CaptionRunEvaluator", "check_image_files", "predict_captions"]

PROTOCOL = ("captioning: fine-tuned with the LM loss on the training captions (prompt excluded from the loss); "
            "the checkpoint with the best val {metric} is evaluated on test; beam search as configured under "
            "'generation'; pycocoevalcap metrics with the PTB tokenizer (0-1 scale, tables x100)")
def token_ids(tokenizer, tokens: list[str]) -> list[int]:
    """Ids of the named special tokens that exist in the vocabulary."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in tokens if t in vocab]


class CaptionGenerator:
    """Generates captions for image files (batched, split over processes, gathered to all)."""

    def __init__(self, cfg: CaptionConfig, tokenizer, dist: D.DistInfo) -> None:
        self.cfg, self.tokenizer, self.dist = cfg, tokenizer, dist
        self.transform = build_transform(cfg.model.vision.img_size, False, cfg.data.transform)
        ids = tokenizer(cfg.data.prompt, add_special_tokens=True)["input_ids"][:-1]  # [CLS] + prompt, no [SEP]
        if tokenizer.unk_token_id in ids:
            log.warning("the prompt %r has words outside the vocabulary ([UNK]); set data.prompt", cfg.data.prompt)
        self.prompt_ids = torch.tensor(ids, dtype=torch.long)
        self.suppress = token_ids(tokenizer, cfg.eval.suppress_tokens)
        self.autocast = autocast_for(cfg.train.precision, dist.device)

    @torch.no_grad()
    def captions(self, model: CaptionModel, files: list[str], source: str = "", desc: str = "generate") -> list[str]:
        """One caption per file, in order (every process returns all of them)."""
        dist, g = self.dist, self.cfg.generation
        was_training = model.training
        model.eval()
        mine = list(range(dist.rank, len(files), dist.world_size))
        ds = ImageListDataset([files[i] for i in mine], self.transform, source)
        loader = SafeDataLoader(ds, batch_size=self.cfg.data.eval_batch_size, shuffle=False, collate_fn=ImageListDataset.collate,
                                num_workers=min(self.cfg.data.num_workers, 2), pin_memory=dist.device.type == "cuda")
        gen = torch.Generator(device=dist.device).manual_seed(g.seed + dist.rank) if g.strategy == "nucleus" else None
        local: list[tuple[int, str]] = []
        prompt = self.prompt_ids.to(dist.device)
        for idx, images in tqdm(loader, desc=desc, disable=not (self.cfg.train.progress and dist.is_main),
                                dynamic_ncols=True, leave=False):
            with self.autocast():
                out = model.generate(images.to(dist.device), prompt, g, self.tokenizer.sep_token_id,
                                     self.tokenizer.pad_token_id, self.suppress, gen)
            texts = decode_texts(self.tokenizer, out)
            local.extend((mine[int(i)], t) for i, t in zip(idx, texts))
        model.train(was_training)
        result: dict[int, str] = {}
        for part in D.all_gather_object(local):
            result.update(part)
        return [result[i] for i in range(len(files))]


def references_for(split: CaptionSplit, gt_file: Optional[str]) -> dict[int, list[str]]:
    """The scoring references: the COCO ground-truth file when given (restricted to the split's
    images, all of which it must cover), else the split file's own captions."""
    if gt_file is None:
        empty = [i for i, r in split.references.items() if not r]
        if empty:
            raise DataError(f"{split.source}: {len(empty)} images have no reference captions (first ids: "
                            f"{empty[:5]}); add captions or set the ground-truth file")
        return split.references
    refs = load_coco_references(gt_file)
    missing = [i for i in split.image_ids if i not in refs]
    if missing:
        raise DataError(f"ground truth {gt_file} has no captions for {len(missing)} images of {split.source} "
                        f"(first ids: {missing[:5]}); the image ids must match (a split file without integer "
                        "image_id numbers its records 0, 1, 2, ... in order: datasets/caption_data.py)")
    return {i: refs[i] for i in split.image_ids}


def load_splits(cfg: CaptionConfig,
                which: tuple[str, ...] = ("val", "test")) -> dict[str, tuple[CaptionSplit, dict]]:
    """The evaluation splits that have a file, with their scoring references."""
    d = cfg.data
    out = {}
    for name in which:
        f = getattr(d, f"{name}_file")
        if f:
            split = read_caption_split(f, d.image_root)
            out[name] = (split, references_for(split, getattr(d, f"{name}_gt_file")))
    return out


def evaluate_split(model: CaptionModel, generator: CaptionGenerator, split: CaptionSplit,
                   refs: dict[int, list[str]], metrics: list[str], cfg: CaptionConfig, dist: D.DistInfo,
                   name: str) -> tuple[Optional[CaptionScores], list[dict]]:
    """Generate captions for ``split`` and score them (main process; others get None)."""
    caps = generator.captions(model, split.image_files, split.source, desc=f"captions {name}")
    results = predictions_to_results(split.image_ids, caps, split.image_names)
    scores = None
    if dist.is_main:
        scores = score_captions(results, refs, metrics, cfg.eval.spice_models_dir, cfg.eval.java_mem)
    return scores, results


def evaluate_and_write(model: CaptionModel, generator: CaptionGenerator, splits: dict, cfg: CaptionConfig,
                       dist: D.DistInfo, checkpoint: Optional[str], extra: Optional[dict] = None) -> dict:
    """Generate + score every split; the main process writes captions_<split>.json, results.json and
    prints the table. Returns ``{split: {metric: value (0-1)}}`` on every process."""
    out_dir = Path(cfg.train.output_dir)
    table: dict[str, CaptionScores] = {}
    payload: dict = {"task": "caption", "checkpoint": checkpoint,
                     "protocol": PROTOCOL.format(metric=cfg.eval.select_metric),
                     "prompt": cfg.data.prompt, "generation": to_dict(cfg.generation), **(extra or {}), "splits": {}}
    for name, (split, refs) in splits.items():
        scores, results = evaluate_split(model, generator, split, refs, cfg.eval.test_metrics, cfg, dist, name)
        if dist.is_main:
            table[name] = scores
            cap_file = out_dir / f"captions_{name}.json"
            write_json(results, cap_file)
            payload["splits"][name] = {**scores.to_json(), "captions_file": str(cap_file),
                                       "annotation_file": split.source,
                                       "gt_file": getattr(cfg.data, f"{name}_gt_file")}
    if dist.is_main:
        write_json(payload, out_dir / "results.json")
        print(f"captioning results ({checkpoint or 'no checkpoint'}), x100:\n{format_table(table)}\n"
              f"  {payload['protocol']}\n  written: {out_dir / 'results.json'}", flush=True)
    metrics = D.broadcast_object({k: v.scores for k, v in table.items()} if dist.is_main else None)
    D.barrier()
    return metrics


class CaptionRunEvaluator:
    """A captioning run's evaluation (``tasks.spec.Evaluator``): val captions scored after every
    epoch (written as ``captions_val_epochNN.json``), then every split generated, scored and written."""

    def __init__(self, run: Run, data: CaptionData) -> None:
        self.run, self.splits = run, data.splits
        self.generator = CaptionGenerator(run.cfg, run.tokenizer, run.dist)

    def validate(self, model: CaptionModel, epoch: int) -> Optional[dict]:
        if "val" not in self.splits:
            return None
        r, (split, refs) = self.run, self.splits["val"]
        scores, results = evaluate_split(model, self.generator, split, refs, r.cfg.eval.val_metrics, r.cfg, r.dist,
                                         f"val (epoch {epoch})")
        metrics = D.broadcast_object(scores.scores if scores is not None else None)
        if r.dist.is_main:
            write_json(results, r.out_dir / f"captions_val_epoch{epoch:02d}.json")
            print(f"epoch {epoch}: val " + ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()), flush=True)
        return metrics

    def test(self, model: CaptionModel, checkpoint: Optional[str], extra: dict) -> dict:
        return evaluate_and_write(model, self.generator, self.splits, self.run.cfg, self.run.dist, checkpoint, extra)


def check_image_files(files: list[str], args=None) -> None:
    """``FileNotFoundError`` naming the image files that do not exist."""
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {missing}")


def predict_captions(pipeline, files: list[str], args=None) -> list[dict]:
    """``{"image", "caption"}`` per image file (``--predict``)."""
    return [{"image": f, "caption": c} for f, c in zip(files, pipeline.caption(files))]
