"""NLVR2 evaluation: the dev and test splits, P(True) for every example, accuracy, and the run's
files (``results.json``, ``predictions_{dev,test}.json``); the run's evaluator for the driver."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from datasets.nlvr2_data import NLVR2Collator, NLVR2Dataset, int_to_label
from engine import distributed as D
from models.nlvr2 import NLVR2Model
from tasks import classify_data
from tasks.classify_data import ClassifierData
from tasks.classify_eval import ClassifierRunEvaluator, class_probabilities, write_classifier_results
from tasks.spec import Run

if TYPE_CHECKING:
    from tasks.nlvr2 import NLVR2Config

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
    return classify_data.eval_sets(cfg, NLVR2Dataset, DATA_HINT)


def predict(model: NLVR2Model, dataset: NLVR2Dataset, collator: NLVR2Collator, dist: D.DistInfo,
            batch_size: int, num_workers: int = 0, precision: str = "fp32", progress: bool = True,
            desc: str = "eval") -> dict[int, tuple[int, float]]:
    """``{example index: (predicted class, P(True))}`` for every example of ``dataset``, gathered from
    all processes (``tasks.classify_eval.class_probabilities``)."""
    probs = class_probabilities(model, lambda m, b: m(b["image_left"], b["image_right"], b["input_ids"],
                                                      b["attention_mask"]),
                                dataset, collator, dist, batch_size, num_workers, precision, progress, desc)
    return {i: (int(p[1] > p[0]), p[1]) for i, p in probs.items()}


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
    return write_classifier_results(
        model, sets, cfg, dist, checkpoint, extra, task="nlvr2", title="NLVR2", protocol=PROTOCOL,
        collator=NLVR2Collator(tokenizer, cfg.tokenizer.max_length), predict=predict,
        metrics=lambda preds, labels: {"accuracy": accuracy(preds, labels)}, records=prediction_records,
        summary=lambda r: f"{r['n']} examples")


def NLVR2RunEvaluator(run: Run, data: ClassifierData) -> ClassifierRunEvaluator:  # noqa: N802 - the spec's evaluator
    """An NLVR2 run's evaluation: dev accuracy after every epoch, then the accuracy of every split and
    the predictions written."""
    return ClassifierRunEvaluator(run, data.eval_sets, NLVR2Collator(run.tokenizer, run.cfg.tokenizer.max_length),
                                  predict, accuracy, evaluate_and_write)
