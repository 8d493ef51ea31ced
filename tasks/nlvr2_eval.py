"""NLVR2 evaluation: the dev and test splits, P(True) for every example, accuracy, and the run's
files (``results.json``, ``predictions_{dev,test}.json``); the run's evaluator for the driver."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from datasets.nlvr2_data import NLVR2Collator, NLVR2Dataset, int_to_label
from datasets.transforms import build_transform
from engine import distributed as D
from engine.loader import SafeDataLoader
from models.nlvr2 import NLVR2Model
from tasks.common import to_device
from tasks.spec import Run, autocast_for, write_json

if TYPE_CHECKING:
    from tasks.nlvr2 import NLVR2Config, NLVR2Data

__all__ = ["DATA_HINT", "PROTOCOL", "eval_sets", "predict", "accuracy", "prediction_records", "evaluate_and_write",
           "NLVR2RunEvaluator"]

DATA_HINT = ("NLVR2 annotations in the ALBEF format (nlvr_train.json, nlvr_dev.json, nlvr_test.json) come "
             "with ALBEF's released data files; the images are distributed by the NLVR2 authors (request "
             "form on the NLVR2 project page). Set data.image_root to the folder the 'images' paths are relative to. "
             "The synthetic NLVR2 demo needs no download: python run_finetune.py --task nlvr2_shapes.")
PROTOCOL = ("NLVR2: fine-tuned on train, checkpoint selected by dev accuracy, then evaluated on dev and test "
            "(test = test-P for real NLVR2). Accuracy in %.")


def eval_sets(cfg: NLVR2Config) -> dict[str, NLVR2Dataset]:
    """The dev and test splits that have files."""
    d = cfg.data
    transform = build_transform(cfg.model.vision.img_size, False, d.transform)
    out = {}
    for split, files in (("dev", d.dev_files), ("test", d.test_files)):
        if files:
            out[split] = NLVR2Dataset(files, d.image_root, transform, d.max_words, d.clean_style, cfg.train.seed, DATA_HINT)
    return out


@torch.no_grad()
def predict(model: NLVR2Model, dataset: NLVR2Dataset, collator: NLVR2Collator, dist: D.DistInfo,
            batch_size: int, num_workers: int = 0, precision: str = "fp32", progress: bool = True,
            desc: str = "eval") -> dict[int, tuple[int, float]]:
    """``{example index: (predicted class, P(True))}`` for every example of ``dataset``; each process
    scores every ``world_size``-th example and the results are gathered to all processes."""
    was_training = model.training
    model.eval()
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    loader = SafeDataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, collate_fn=collator,
                            num_workers=num_workers, pin_memory=dist.device.type == "cuda")
    autocast = autocast_for(precision, dist.device)
    local: list[tuple[int, int, float]] = []
    for batch in tqdm(loader, desc=desc, disable=not (progress and dist.is_main), dynamic_ncols=True, leave=False):
        b = to_device(batch, dist.device)
        with autocast():
            logits = model(b["image_left"], b["image_right"], b["input_ids"], b["attention_mask"]).float()
        pred = logits.argmax(dim=1).cpu().tolist()
        prob = logits.softmax(dim=1)[:, 1].cpu().tolist()
        local.extend(zip(batch["index"].tolist(), pred, prob))
    model.train(was_training)
    out: dict[int, tuple[int, float]] = {}
    for part in D.all_gather_object(local):
        for i, p, q in part:
            out[int(i)] = (int(p), float(q))
    if len(out) != len(dataset):
        raise RuntimeError(f"evaluation covered {len(out)} of {len(dataset)} examples")
    return out


def accuracy(preds: dict[int, tuple[int, float]], labels: list[int]) -> float:
    """Accuracy in % of ``preds`` (from :func:`predict`) against ``labels`` (0/1 by index)."""
    return 100.0 * sum(preds[i][0] == y for i, y in enumerate(labels)) / len(labels)


def prediction_records(dataset: NLVR2Dataset, preds: dict[int, tuple[int, float]]) -> list[dict]:
    """One record per example: the annotation's own keys plus prediction, P(True) and correctness."""
    out = []
    for i, rec in enumerate(dataset.records):
        p, prob = preds[i]
        item = {k: v for k, v in rec.items() if not k.startswith("_")}
        item.update({"index": i, "prediction": int_to_label(p), "prob_true": round(prob, 6),
                     "correct": p == rec["_label"]})
        out.append(item)
    return out


def evaluate_and_write(model: NLVR2Model, sets: dict[str, NLVR2Dataset], cfg: NLVR2Config, dist: D.DistInfo,
                       tokenizer, checkpoint: str, extra: Optional[dict] = None) -> dict:
    """Accuracy on every split of ``sets``; the main process writes results.json and the predictions."""
    collator = NLVR2Collator(tokenizer, cfg.tokenizer.max_length)
    out_dir = Path(cfg.train.output_dir)
    results: dict = {"task": "nlvr2", "checkpoint": checkpoint, "protocol": PROTOCOL, **(extra or {})}
    for split, ds in sets.items():
        preds = predict(model, ds, collator, dist, cfg.data.eval_batch_size, cfg.data.num_workers,
                        cfg.train.precision, cfg.train.progress, desc=split)
        acc = accuracy(preds, ds.labels())
        results[split] = {"accuracy": acc, "n": len(ds), "files": list(getattr(cfg.data, f"{split}_files")),
                          "predictions": str(out_dir / f"predictions_{split}.json")}
        if dist.is_main:
            write_json(prediction_records(ds, preds), out_dir / f"predictions_{split}.json")
    if dist.is_main:
        write_json(results, out_dir / "results.json")
        lines = [f"  {split:5s} accuracy {results[split]['accuracy']:.2f}%  ({results[split]['n']} examples)"
                 for split in sets]
        print(f"NLVR2 results ({checkpoint}):\n" + "\n".join(lines)
              + f"\n  {PROTOCOL}\n  written: {out_dir / 'results.json'}", flush=True)
    D.barrier()
    return results


class NLVR2RunEvaluator:
    """An NLVR2 run's evaluation (``tasks.spec.Evaluator``): dev accuracy after every epoch, then
    the accuracy of every split and the predictions written."""

    def __init__(self, run: Run, data: NLVR2Data) -> None:
        self.run, self.sets = run, data.eval_sets
        self.collator = NLVR2Collator(run.tokenizer, run.cfg.tokenizer.max_length)

    def validate(self, model: NLVR2Model, epoch: int) -> Optional[dict]:
        dev = self.sets.get("dev")
        if dev is None:
            return None
        r, d = self.run, self.run.cfg.data
        preds = predict(model, dev, self.collator, r.dist, d.eval_batch_size, d.num_workers, r.cfg.train.precision,
                        r.cfg.train.progress, desc=f"dev (epoch {epoch})")
        acc = accuracy(preds, dev.labels())
        if r.dist.is_main:
            print(f"epoch {epoch}: dev accuracy {acc:.2f}%", flush=True)
        return {"dev_acc": acc}

    def test(self, model: NLVR2Model, checkpoint: Optional[str], extra: dict) -> dict:
        return evaluate_and_write(model, self.sets, self.run.cfg, self.run.dist, self.run.tokenizer, checkpoint, extra)
