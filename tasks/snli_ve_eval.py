"""SNLI-VE evaluation: the dev and test splits, the three class probabilities of every example,
accuracy overall and by class, the confusion matrix, and the run's files (``results.json``,
``predictions_{dev,test}.json``); the run's evaluator for the driver."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from datasets.snli_ve_data import CLASS_NAMES, SNLIVECollator, SNLIVEDataset
from engine import distributed as D
from models.snli_ve import VEModel
from tasks import classify_data
from tasks.classify_data import ClassifierData
from tasks.classify_eval import ClassifierRunEvaluator, class_probabilities, write_classifier_results
from tasks.spec import Run

if TYPE_CHECKING:
    from tasks.snli_ve import SNLIVEConfig

__all__ = ["DATA_HINT", "PROTOCOL", "eval_sets", "predict", "metrics", "prediction_records", "evaluate_and_write",
           "SNLIVERunEvaluator", "entail"]

DATA_HINT = ("SNLI-VE annotations in the ALBEF format (ve_train.json, ve_dev.json, ve_test.json) come with "
             "ALBEF's released data files; the images are Flickr30K's (docs/datasets.md). Set data.image_root to "
             "the folder of the Flickr30K images. The synthetic SNLI-VE demo needs no download: "
             "python run_finetune.py --task snli_ve_shapes.")
PROTOCOL = ("SNLI-VE: fine-tuned on train, checkpoint selected by dev accuracy, then evaluated on dev and test. "
            "Accuracy in %, overall and by class (the recall of each true class); confusion[true][predicted].")


def eval_sets(cfg: SNLIVEConfig) -> dict[str, SNLIVEDataset]:
    """The dev and test splits that have files."""
    return classify_data.eval_sets(cfg, SNLIVEDataset, DATA_HINT)


def predict(model: VEModel, dataset: SNLIVEDataset, collator: SNLIVECollator, dist: D.DistInfo, batch_size: int,
            num_workers: int = 0, precision: str = "fp32", progress: bool = True,
            desc: str = "eval") -> dict[int, list[float]]:
    """``{example index: [P(class) for each class index]}`` for every example of ``dataset``, gathered
    from all processes (``tasks.classify_eval.class_probabilities``)."""
    return class_probabilities(model, lambda m, b: m(b["image"], b["input_ids"], b["attention_mask"]), dataset,
                               collator, dist, batch_size, num_workers, precision, progress, desc)


def _argmax(probs: list[float]) -> int:
    return max(range(len(probs)), key=lambda k: probs[k])


def metrics(preds: dict[int, list[float]], labels: list[int]) -> dict:
    """Accuracy in % overall and by true class, and the confusion matrix ``{true: {predicted: n}}``
    (class names) of ``preds`` (from :func:`predict`) against ``labels`` (class indices by example)."""
    confusion = {t: {p: 0 for p in CLASS_NAMES} for t in CLASS_NAMES}
    for i, y in enumerate(labels):
        confusion[CLASS_NAMES[y]][CLASS_NAMES[_argmax(preds[i])]] += 1
    correct = sum(confusion[c][c] for c in CLASS_NAMES)
    by_class = {c: (100.0 * confusion[c][c] / sum(confusion[c].values()) if sum(confusion[c].values()) else None)
                for c in CLASS_NAMES}
    return {"accuracy": 100.0 * correct / len(labels), "accuracy_by_class": by_class, "confusion": confusion,
            "n_by_class": {c: sum(confusion[c].values()) for c in CLASS_NAMES}}


def prediction_records(dataset: SNLIVEDataset, preds: dict[int, list[float]]) -> list[dict]:
    """One record per example: the annotation's own keys plus prediction, the class probabilities and correctness."""
    out = []
    for i, rec in enumerate(dataset.records):
        probs = preds[i]
        item = {k: v for k, v in rec.items() if not k.startswith("_")}
        item.update({"index": i, "prediction": CLASS_NAMES[_argmax(probs)],
                     "probs": {c: round(p, 6) for c, p in zip(CLASS_NAMES, probs)},
                     "correct": _argmax(probs) == rec["_label"]})
        out.append(item)
    return out


def _summary(r: dict) -> str:
    by = ", ".join(f"{c} {v:.2f}" for c, v in r["accuracy_by_class"].items() if v is not None)
    return f"{r['n']} examples; by class: {by}"


def evaluate_and_write(model: VEModel, sets: dict[str, SNLIVEDataset], cfg: SNLIVEConfig, dist: D.DistInfo,
                       tokenizer, checkpoint: str, extra: Optional[dict] = None) -> dict:
    """The metrics of every split of ``sets``; the main process writes results.json and the predictions."""
    return write_classifier_results(
        model, sets, cfg, dist, checkpoint, extra, task="snli_ve", title="SNLI-VE", protocol=PROTOCOL,
        collator=SNLIVECollator(tokenizer, cfg.tokenizer.max_length), predict=predict, metrics=metrics,
        records=prediction_records, summary=_summary)


def SNLIVERunEvaluator(run: Run, data: ClassifierData) -> ClassifierRunEvaluator:  # noqa: N802 - the spec's evaluator
    """An SNLI-VE run's evaluation: dev accuracy after every epoch, then the metrics of every split and
    the predictions written."""
    return ClassifierRunEvaluator(run, data.eval_sets, SNLIVECollator(run.tokenizer, run.cfg.tokenizer.max_length),
                                  predict, lambda preds, labels: metrics(preds, labels)["accuracy"], evaluate_and_write)


@torch.no_grad()
def entail(pipeline, images, texts, error: type = ValueError) -> list[tuple[str, dict[str, float]]]:
    """``(label, {class: probability})`` per (image, statement) of an ``inference.Pipeline`` over a fine-tuned
    SNLI-VE checkpoint (its method ``entail(images, texts)``): entailment, neutral or contradiction. Images and
    statements of different numbers raise ``error`` (the pipeline's ``InferenceError``)."""
    pipeline._require("entail")
    images, texts = list(images), [texts] if isinstance(texts, str) else list(texts)
    if len(images) != len(texts):
        raise error(f"entail(): {len(images)} images but {len(texts)} statements (one per image)")
    out = []
    for a, b in pipeline._chunks(len(texts)):
        ids, mask = pipeline._texts(texts[a:b])
        with pipeline._autocast():
            logits = pipeline.model(pipeline.images(images[a:b]), ids, mask)
        for p in logits.float().softmax(dim=-1).cpu():
            out.append((CLASS_NAMES[int(p.argmax())], {c: float(v) for c, v in zip(CLASS_NAMES, p)}))
    return out
