"""What the classification tasks (NLVR2, SNLI-VE) do alike: the loss of a training step
(:func:`classifier_step`), the run's one-line description (:func:`describe_classifier`), the class
probabilities of every example of a split, split over the processes and gathered
(:func:`class_probabilities`), the dev accuracy after every epoch (:class:`ClassifierRunEvaluator`), and
the metrics and predictions of every split written at the end (:func:`write_classifier_results`)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from engine import distributed as D
from engine.loader import SafeDataLoader
from tasks.common import to_device
from tasks.spec import Run, autocast_for, write_json

__all__ = ["class_probabilities", "classifier_step", "ClassifierRunEvaluator", "describe_classifier",
           "write_classifier_results"]


def classifier_step(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Cross-entropy of a training batch, its accuracy, and its size for the pairs/s meter."""
    loss = F.cross_entropy(logits.float(), labels)
    return {"loss": loss, "acc": (logits.argmax(1) == labels).float().mean().detach(), "_pairs": labels.shape[0]}


def describe_classifier(run: Run, data, model: nn.Module, title: str, unit: str, extra: str = "") -> Optional[str]:
    """``"<title> fine-tuning: N training <unit>, <eval splits>; M trainable parameters, <extra>..."``;
    None when only evaluating."""
    if not run.training:
        return None
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"{title} fine-tuning: {len(data.train)} training {unit}, "
            + ", ".join(f"{len(v)} {k}" for k, v in data.eval_sets.items())
            + f"; {n_params / 1e6:.2f}M trainable parameters, {extra}"
            f"{run.dist.world_size} process(es) on {run.dist.device}, output in {run.out_dir}")


@torch.no_grad()
def class_probabilities(model: nn.Module, forward: Callable[[nn.Module, dict], torch.Tensor], dataset: Dataset,
                        collator: Callable, dist: D.DistInfo, batch_size: int, num_workers: int = 0,
                        precision: str = "fp32", progress: bool = True, desc: str = "eval") -> dict[int, list[float]]:
    """``{example index: [P(class) for each class index]}`` for every example of ``dataset``
    (``forward(model, batch)`` gives the logits of a collated batch on the device; the batch has
    ``index``); each process scores every ``world_size``-th example and the results are gathered to all
    processes."""
    was_training = model.training
    model.eval()
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    loader = SafeDataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, collate_fn=collator,
                            num_workers=num_workers, pin_memory=dist.device.type == "cuda")
    autocast = autocast_for(precision, dist.device)
    local: list[tuple[int, list[float]]] = []
    for batch in tqdm(loader, desc=desc, disable=not (progress and dist.is_main), dynamic_ncols=True, leave=False):
        with autocast():
            logits = forward(model, to_device(batch, dist.device)).float()
        local.extend(zip(batch["index"].tolist(), logits.softmax(dim=1).cpu().tolist()))
    model.train(was_training)
    out = {int(i): [float(p) for p in probs] for part in D.all_gather_object(local) for i, probs in part}
    if len(out) != len(dataset):
        raise RuntimeError(f"evaluation covered {len(out)} of {len(dataset)} examples")
    return out


class ClassifierRunEvaluator:
    """A classification task's evaluation (``tasks.spec.Evaluator``): the accuracy of its ``dev``
    split after every epoch, ``{"dev_acc": %}`` (None without a dev split), then every split's metrics
    and predictions written by the task's ``write``. The task gives its ``predict`` (model, dataset,
    collator, dist, batch size, workers, precision, progress, desc -> predictions), ``accuracy``
    (predictions, labels -> %) and ``write`` (model, sets, cfg, dist, tokenizer, checkpoint, extra)."""

    def __init__(self, run: Run, sets: dict, collator: Callable, predict: Callable, accuracy: Callable,
                 write: Callable) -> None:
        self.run, self.sets, self.collator = run, sets, collator
        self.predict, self.score, self.write = predict, accuracy, write

    def accuracy(self, model: nn.Module, dataset: Dataset, desc: str) -> float:
        r, d = self.run, self.run.cfg.data
        preds = self.predict(model, dataset, self.collator, r.dist, d.eval_batch_size, d.num_workers,
                             r.cfg.train.precision, r.cfg.train.progress, desc=desc)
        return self.score(preds, dataset.labels())

    def validate(self, model: nn.Module, epoch: int) -> Optional[dict]:
        dev = self.sets.get("dev")
        if dev is None:
            return None
        acc = self.accuracy(model, dev, f"dev (epoch {epoch})")
        if self.run.dist.is_main:
            print(f"epoch {epoch}: dev accuracy {acc:.2f}%", flush=True)
        return {"dev_acc": acc}

    def test(self, model: nn.Module, checkpoint: Optional[str], extra: dict) -> dict:
        return self.write(model, self.sets, self.run.cfg, self.run.dist, self.run.tokenizer, checkpoint, extra)



def write_classifier_results(model: nn.Module, sets: dict, cfg, dist: D.DistInfo, checkpoint: str,
                             extra: Optional[dict], *, task: str, title: str, protocol: str, collator: Callable,
                             predict: Callable, metrics: Callable, records: Callable,
                             summary: Callable) -> dict:
    """The metrics of every split of ``sets``; the main process writes ``results.json`` and
    ``predictions_<split>.json`` to ``cfg.train.output_dir`` and prints one line per split.

    The task gives ``predict`` (model, dataset, collator, dist, batch size, workers, precision,
    progress, desc -> predictions), ``metrics`` (predictions, labels -> a dict with ``accuracy``),
    ``records`` (dataset, predictions -> one record per example) and ``summary`` (a split's results
    -> what its line says after the accuracy)."""
    out_dir = Path(cfg.train.output_dir)
    results: dict = {"task": task, "checkpoint": checkpoint, "protocol": protocol, **(extra or {})}
    for split, ds in sets.items():
        preds = predict(model, ds, collator, dist, cfg.data.eval_batch_size, cfg.data.num_workers,
                        cfg.train.precision, cfg.train.progress, desc=split)
        results[split] = {**metrics(preds, ds.labels()), "n": len(ds),
                          "files": list(getattr(cfg.data, f"{split}_files")),
                          "predictions": str(out_dir / f"predictions_{split}.json")}
        if dist.is_main:
            write_json(records(ds, preds), out_dir / f"predictions_{split}.json")
    if dist.is_main:
        write_json(results, out_dir / "results.json")
        lines = [f"  {split:5s} accuracy {results[split]['accuracy']:.2f}%  ({summary(results[split])})"
                 for split in sets]
        print(f"{title} results ({checkpoint}):\n" + "\n".join(lines)
              + f"\n  {protocol}\n  written: {out_dir / 'results.json'}", flush=True)
    D.barrier()
    return results
