"""VQA evaluation: the val and test splits, answers for the questions of a split (ranked from the
answer list or generated), the official accuracy of the splits with answers,
``vqa_<split>_result.json`` in the evaluation server's format and ``results.json``; the run's
evaluator for the fine-tuning driver."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from datasets.formats import DataError
from datasets.transforms import build_transform
from datasets.vqa_data import VQAEvalCollator, VQAEvalDataset, read_vqa, tokenize_answers
from engine import distributed as D
from engine.config import to_dict
from engine.loader import SafeDataLoader
from models.decoder import decode_texts
from models.vqa import VQAModel
from tasks.caption_generate import token_ids
from tasks.common import to_device
from tasks.spec import Run, autocast_for, write_json
from tasks.vqa_metrics import evaluate_vqa

if TYPE_CHECKING:
    from tasks.vqa import VQAConfig, VQAData

__all__ = ["PROTOCOL", "eval_sets", "VQAPredictor", "result_records", "evaluate_and_write", "VQARunEvaluator"]

PROTOCOL = ("VQA: fine-tuned with ALBEF's answer-weighted LM loss; answers {how}; accuracy = official VQA "
            "accuracy (tasks/vqa_metrics.py) in %, only for splits with answers (VQA v2 test-dev/test-std: "
            "submit vqa_test_result.json to the evaluation server)")


def eval_sets(cfg: VQAConfig) -> dict[str, VQAEvalDataset]:
    """The val split (with answers) and the test split (answers from ``test_gt_file`` when given)."""
    d = cfg.data
    tf = build_transform(cfg.model.vision.img_size, False, d.transform)
    out = {}
    if d.val_file:
        out["val"] = VQAEvalDataset(read_vqa(d.val_file, require_answers=True), d.image_root, tf, d.max_words,
                                    d.vg_image_root, d.max_image_pixels)
    if d.test_file:
        records = read_vqa(d.test_file, require_answers=False)
        if d.test_gt_file:
            gt = {r["question_id"]: r for r in read_vqa(d.test_gt_file, require_answers=True)}
            missing = [r["question_id"] for r in records if r["question_id"] not in gt]
            if missing:
                raise DataError(f"{d.test_gt_file} has no answers for {len(missing)} test questions "
                                 f"(first ids: {missing[:5]})")
            for r in records:
                r["answer"] = gt[r["question_id"]]["answer"]
                r.setdefault("answer_type", gt[r["question_id"]].get("answer_type"))
        out["test"] = VQAEvalDataset(records, d.image_root, tf, d.max_words, d.vg_image_root, d.max_image_pixels)
    return out


class VQAPredictor:
    """Answers for the questions of a dataset (batched, split over processes, gathered to all)."""

    def __init__(self, cfg: VQAConfig, tokenizer, answer_list: list[str], dist: D.DistInfo) -> None:
        self.cfg, self.tokenizer, self.answer_list, self.dist = cfg, tokenizer, answer_list, dist
        self.collator = VQAEvalCollator(tokenizer, cfg.tokenizer.max_length)
        ids, mask = tokenize_answers(tokenizer, answer_list, cfg.data.max_answer_tokens)
        self.answer_ids, self.answer_mask = ids.to(dist.device), mask.to(dist.device)
        self.suppress = token_ids(tokenizer, cfg.eval.suppress_tokens)
        self.autocast = autocast_for(cfg.train.precision, dist.device)

    @torch.no_grad()
    def predict(self, model: VQAModel, dataset: VQAEvalDataset, desc: str = "vqa") -> dict[int, str]:
        """``{question_id: answer}`` for every question of ``dataset`` (on every process)."""
        dist, e = self.dist, self.cfg.eval
        was_training = model.training
        model.eval()
        indices = list(range(dist.rank, len(dataset), dist.world_size))
        loader = SafeDataLoader(Subset(dataset, indices), batch_size=self.cfg.data.eval_batch_size, shuffle=False,
                                collate_fn=self.collator, num_workers=min(self.cfg.data.num_workers, 2),
                                pin_memory=dist.device.type == "cuda")
        local: list[tuple[int, str]] = []
        for batch in tqdm(loader, desc=desc, disable=not (self.cfg.train.progress and dist.is_main),
                          dynamic_ncols=True, leave=False):
            b = to_device(batch, dist.device)
            with self.autocast():
                fused = model.encode(b["image"], b["question_ids"], b["question_mask"])
                if e.inference == "rank":
                    idx, _ = model.rank_answers(fused, b["question_mask"], self.answer_ids, self.answer_mask,
                                                e.k_test, e.rank_chunk)
                    answers = [self.answer_list[int(i)] for i in idx[:, 0]]
                else:
                    out = model.generate(fused, b["question_mask"], self.tokenizer.cls_token_id, self.cfg.generation,
                                         self.tokenizer.sep_token_id, self.tokenizer.pad_token_id, self.suppress)
                    answers = decode_texts(self.tokenizer, out)
            local.extend(zip(batch["qid"].tolist(), answers))
        model.train(was_training)
        result: dict[int, str] = {}
        for part in D.all_gather_object(local):
            result.update(part)
        if len(result) != len(dataset):
            raise RuntimeError(f"prediction covered {len(result)} of {len(dataset)} questions (repeated question ids?)")
        return result


def result_records(preds: dict[int, str]) -> list[dict]:
    """The evaluation-server format ``[{"question_id": int, "answer": str}]`` sorted by question id."""
    return [{"question_id": q, "answer": preds[q]} for q in sorted(preds)]


def evaluate_and_write(model: VQAModel, predictor: VQAPredictor, sets: dict[str, VQAEvalDataset], cfg: VQAConfig,
                       dist: D.DistInfo, checkpoint: Optional[str], extra: Optional[dict] = None) -> dict:
    """Answer every split; write ``vqa_<split>_result.json``; score the splits with answers; the main
    process writes results.json and prints the accuracies. Returns the results dict."""
    out_dir = Path(cfg.train.output_dir)
    how = (f"ranked from {cfg.data.answer_list} ({len(predictor.answer_list)} answers, k_test {cfg.eval.k_test})"
           if cfg.eval.inference == "rank" else "generated (open-ended, see 'generation')")
    results: dict = {"task": "vqa", "checkpoint": checkpoint, "protocol": PROTOCOL.format(how=how),
                     "inference": cfg.eval.inference, "k_test": cfg.eval.k_test,
                     **({"generation": to_dict(cfg.generation)} if cfg.eval.inference == "generate" else {}),
                     **(extra or {}), "splits": {}}
    lines = []
    for split, ds in sets.items():
        preds = predictor.predict(model, ds, desc=split)
        path = out_dir / f"vqa_{split}_result.json"
        entry: dict = {"n_questions": len(ds), "result_file": str(path)}
        if all(r.get("answer") for r in ds.records):
            acc = evaluate_vqa(preds, ds.records)
            entry.update({"accuracy": acc["overall"], "per_answer_type": acc["per_answer_type"]})
            lines.append(f"  {split:5s} accuracy {acc['overall']:.2f}%  ("
                         + ", ".join(f"{t} {v:.2f}" for t, v in acc["per_answer_type"].items())
                         + f"; {len(ds)} questions)")
        else:
            lines.append(f"  {split:5s} {len(ds)} questions answered, no answers to score: submit {path} "
                         "to the evaluation server")
        results["splits"][split] = entry
        if dist.is_main:
            write_json(result_records(preds), path, indent=None)
    if dist.is_main:
        write_json(results, out_dir / "results.json")
        print(f"VQA results ({checkpoint or 'no checkpoint'}):\n" + "\n".join(lines)
              + f"\n  {results['protocol']}\n  written: {out_dir / 'results.json'}", flush=True)
    D.barrier()
    return results


class VQARunEvaluator:
    """A VQA run's evaluation (``tasks.spec.Evaluator``): val accuracy after every epoch, then every
    split answered, scored where it has answers, and written."""

    def __init__(self, run: Run, data: VQAData) -> None:
        self.run, self.sets = run, data.eval_sets
        self.predictor = VQAPredictor(run.cfg, run.tokenizer, data.answer_list, run.dist)

    def validate(self, model: VQAModel, epoch: int) -> Optional[dict]:
        val = self.sets.get("val")
        if val is None:
            return None
        acc = evaluate_vqa(self.predictor.predict(model, val, desc=f"val (epoch {epoch})"), val.records)
        if self.run.dist.is_main:
            print(f"epoch {epoch}: val VQA accuracy {acc['overall']:.2f}% ("
                  + ", ".join(f"{t} {v:.2f}" for t, v in acc["per_answer_type"].items()) + ")", flush=True)
        return {"overall": acc["overall"], **{f"acc_{t}": v for t, v in acc["per_answer_type"].items()}}

    def test(self, model: VQAModel, checkpoint: Optional[str], extra: dict) -> dict:
        return evaluate_and_write(model, self.predictor, self.sets, self.run.cfg, self.run.dist, checkpoint, extra)
