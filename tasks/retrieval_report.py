"""Retrieval results: the table of one evaluation (with the chance level of the split, the recalls
of a random ranking), the ranked results file, the memory estimate for
the log, the protocol of a run (printed with every result), and the run's evaluator for the
fine-tuning driver (:class:`RetrievalRunEvaluator`: val after every epoch, the test split at the end,
results JSON and ranked lists in ``train.output_dir``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from datasets.retrieval_data import RetrievalEvalData
from datasets.transforms import build_transform
from engine import distributed as D
from tasks.retrieval_eval import RetrievalEvalConfig, RetrievalEvaluator
from tasks.retrieval_ranking import SCORE_RULES, RetrievalResult, chance_note, chance_recall_pairs
from tasks.spec import Run

__all__ = ["format_table", "split_chance", "ranked_json", "memory_estimate", "protocol_text", "RetrievalRunEvaluator"]

TAGS = {"finetune": "finetuned", "zero_shot": "zero_shot", "evaluate": "evaluate"}  # results_<tag>_<split>.json


def _ks(metrics: dict) -> list[int]:
    """The K of the ``txt_r{K}`` recalls in ``metrics``."""
    return sorted({int(k[len("txt_r"):]) for k in metrics if k.startswith("txt_r") and k[5:].isdigit()})


def format_table(result: RetrievalResult, title: str, chance: Optional[dict] = None, note: str = "") -> str:
    """A plain-text table of the recalls (re-ranked and ITC only), with the score rule; with ``chance``
    (:func:`split_chance`) also the recalls of a random ranking and its ``note``."""
    ks = _ks(result.metrics)
    head = f"{'':28s}" + "".join(f"{'R@' + str(k):>8s}" for k in ks) + f"{'mean':>8s}"
    lines = [title, f"score rule: {result.score_rule} ({SCORE_RULES[result.score_rule]}), k_test {result.k_test}", head]
    rows = [("", result.metrics), ("ITC only, ", result.itc_metrics)] + ([("random ranking, ", chance)] if chance else [])
    for label, m in rows:
        for name, prefix in (("image->text", "txt"), ("text->image", "img")):
            row = f"{label}{name}"
            lines.append(f"{row:28s}" + "".join(f"{m[f'{prefix}_r{k}']:8.2f}" for k in ks) + f"{m[f'{prefix}_r_mean']:8.2f}")
    lines.append(f"r_mean {result.metrics['r_mean']:.2f} (ITC only {result.itc_metrics['r_mean']:.2f}"
                 + (f", random ranking {chance['r_mean']:.2f}" if chance else "")
                 + f"); evaluation {result.timings.get('total', 0.0):.1f} s")
    if note:
        lines.append(note)
    return "\n".join(lines)


def split_chance(data: RetrievalEvalData, ks: Sequence[int]) -> tuple[dict[str, float], str]:
    """The chance level of a split (``tasks.retrieval_ranking.chance_recall_pairs``: text->image
    K / N for N images; image->text ``1 - C(T - c, K) / C(T, K)`` for an image with c of the T
    captions, averaged) and the note naming the recalls that are 100 by construction."""
    chance = chance_recall_pairs(data.txt2img, data.num_images, ks)
    return chance, chance_note(chance, data.num_images, data.num_texts)


def ranked_json(result: RetrievalResult, data: RetrievalEvalData, scores: bool = False) -> dict:
    """The ranked results file: top-k candidate indices per query (and the index tables to read them);
    with ``scores`` also the rule's score of every listed candidate."""
    extra = {"i2t_scores": result.i2t_scores.tolist(), "t2i_scores": result.t2i_scores.tolist()} if scores else {}
    return {
        "split_file": data.source, "score_rule": result.score_rule, "k_test": result.k_test,
        "images": data.image_names,
        "captions": [{"text": t, "image": i} for t, i in zip(data.texts, data.txt2img)],
        "i2t": result.i2t_ranked.tolist(), "t2i": result.t2i_ranked.tolist(),
        "note": "i2t[i]: caption indices ranked for image i; t2i[t]: image indices ranked for caption t; "
                "only the re-ranked top k_test of each query are listed",
        **extra,
    }


def memory_estimate(data: RetrievalEvalData, cfg: RetrievalEvalConfig, num_image_tokens: int, width: int,
                    hidden: int, max_length: int, bytes_per: int = 4) -> dict[str, float]:
    """Rough sizes in GiB of what the evaluation keeps (for the log)."""
    gib = 1024 ** 3
    return {
        "text_states": data.num_texts * max_length * hidden * bytes_per / gib if cfg.cache_text_states else 0.0,
        "image_tokens": (data.num_images if cfg.cache_image_tokens else min(cfg.batch_size, data.num_images))
        * num_image_tokens * width * bytes_per / gib,
        # similarities (4 B) + sort order (8 B) + positions (8 B) of one block of queries
        "itc_block": min(cfg.itc_chunk, data.num_texts) * max(data.num_images, data.num_texts) * 20 / gib,
    }


def protocol_text(mode: str, checkpoint: Optional[str], name: str, train_files: list[str]) -> str:
    """The protocol a run follows, in words (``fine-tuned``, ``zero-shot``, ``evaluation only``)."""
    ck = checkpoint or "a randomly initialised model (no checkpoint)"
    if mode == "zero_shot":
        return (f"zero-shot: {ck} evaluated without fine-tuning on {name}. (ALBEF's 'zero-shot "
                "Flickr30K' numbers evaluate the COCO-fine-tuned model: pass that checkpoint to follow it.)")
    if mode == "evaluate":
        return f"evaluation only: {ck}, no training"
    return (f"fine-tuned on {name} ({', '.join(train_files)}) from {ck}; "
            "the checkpoint with the best val r_mean is evaluated on test")


class RetrievalRunEvaluator:
    """A retrieval run's evaluation (``tasks.spec.Evaluator``): prints the result tables (main
    process) and writes ``results_<tag>_<split>[_epochNN].json`` and, for test, the ranked lists."""

    def __init__(self, run: Run, splits: dict[str, RetrievalEvalData]) -> None:
        cfg = run.cfg
        self.run, self.splits, self.tag = run, splits, TAGS[run.mode]
        self.protocol = protocol_text(run.mode, run.checkpoint, cfg.data.name, cfg.data.train_files)
        self.transform = build_transform(cfg.model.vision.img_size, False, cfg.data.transform)
        self.evaluators: dict[str, RetrievalEvaluator] = {}

    def evaluator(self, split: str) -> RetrievalEvaluator:
        """The evaluator of ``split`` (built once: it tokenises the split's captions)."""
        if split not in self.evaluators:
            r, cfg = self.run, self.run.cfg
            self.evaluators[split] = RetrievalEvaluator(self.splits[split], r.tokenizer, cfg.eval, self.transform,
                                                        cfg.tokenizer.max_length, r.dist.device, cfg.data.num_workers,
                                                        r.autocast(), name=split)
        return self.evaluators[split]

    def validate(self, model, epoch: int) -> dict:
        result = self.evaluator("val").run(model)
        self.report(result, "val", f"epoch {epoch}", write_ranked=False, suffix=f"_epoch{epoch:02d}")
        return result.flat()

    def test(self, model, checkpoint: Optional[str], extra: dict) -> dict:
        result = self.evaluator("test").run(model)
        self.report(result, "test", f"checkpoint {Path(checkpoint).name}" if self.run.training else "", extra=extra)
        return result.flat()

    def report(self, result: RetrievalResult, split: str, when: str = "", write_ranked: bool = True,
               suffix: str = "", extra: Optional[dict] = None) -> None:
        if not D.is_main():
            return
        cfg, data, out_dir = self.run.cfg, self.splits[split], self.run.out_dir
        title = (f"retrieval {cfg.data.name} {split}{' (' + when + ')' if when else ''}: {data.num_images} images, "
                 f"{data.num_texts} captions | protocol: {self.protocol}")
        chance, note = split_chance(data, _ks(result.metrics))
        print(format_table(result, title, chance, note), flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        record = {"task": "retrieval", "dataset": cfg.data.name, "split": split, "split_file": data.source,
                  "protocol": self.tag, "protocol_text": self.protocol, "checkpoint": self.run.checkpoint,
                  "score_rule": result.score_rule, "k_test": result.k_test, "num_images": data.num_images,
                  "num_captions": data.num_texts, "metrics": result.metrics, "itc_only_metrics": result.itc_metrics,
                  "chance_metrics": chance, "chance_note": note or None,
                  "itm_pairs": result.num_pairs, "seconds": result.timings, "processes": D.world_size(), **(extra or {})}
        path = out_dir / f"results_{self.tag}_{split}{suffix}.json"
        path.write_text(json.dumps(record, indent=1), encoding="utf-8")
        if write_ranked and cfg.eval.save_ranked:
            rpath = out_dir / f"ranked_{self.tag}_{split}{suffix}.json"
            rpath.write_text(json.dumps(ranked_json(result, data, cfg.eval.save_scores)), encoding="utf-8")
            print(f"wrote {path} and {rpath}", flush=True)
        else:
            print(f"wrote {path}", flush=True)
