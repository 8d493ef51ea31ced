"""Caption scoring with pycocoevalcap, as the COCO caption evaluation (``COCOEvalCap``) does it.

Both the references and the generated captions go through the PTB tokenizer (Stanford CoreNLP,
Java), then BLEU-1..4, METEOR, ROUGE-L and CIDEr (CIDEr-D, with document frequencies from these
references) are computed by pycocoevalcap's own scorers; values are on pycocoevalcap's scale
(0-1; papers print them x100). This module does not use ``COCOEvalCap`` itself because its
``evaluate()`` always runs SPICE, which downloads Stanford CoreNLP 3.6.0 on first use.

SPICE needs ``stanford-corenlp-3.6.0.jar`` and ``stanford-corenlp-3.6.0-models.jar`` that
pycocoevalcap downloads (never here). It is computed only when the user names a local directory
holding both files (``spice_models_dir``); the SPICE jar shipped with pycocoevalcap then runs with
that directory on its class path. Otherwise SPICE is reported as skipped, with the reason.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from tasks.result_records import records_by_id

__all__ = ["METRICS", "METRIC_KEYS", "CaptionScores", "score_captions", "spice_command", "format_table",
           "predictions_to_results"]

METRICS = ("bleu", "meteor", "rouge", "cider", "spice")
METRIC_KEYS = {"bleu": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"), "meteor": ("METEOR",), "rouge": ("ROUGE_L",),
               "cider": ("CIDEr",), "spice": ("SPICE",)}
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
SPICE_SKIP_REASON = ("SPICE needs Stanford CoreNLP 3.6.0 ({}), which pycocoevalcap downloads on first use; this "
                     "project never downloads. To report SPICE, put both jars in a local directory and set "
                     "eval.spice_models_dir to it.").format(" and ".join(SPICE_JARS))


@dataclass
class CaptionScores:
    """Corpus scores (pycocoevalcap scale, 0-1), per-image scores, and skipped metrics with reasons."""

    scores: dict[str, float] = field(default_factory=dict)
    per_image: dict[int, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    num_images: int = 0

    def to_json(self) -> dict:
        return {"metrics": self.scores, "metrics_x100": {k: 100.0 * v for k, v in self.scores.items()},
                "skipped": self.skipped, "num_images": self.num_images}


def predictions_to_results(image_ids: Sequence[int], captions: Sequence[str],
                           images: Optional[Sequence[str]] = None) -> list[dict]:
    """COCO results format ``[{"image_id": int, "caption": str}]`` (sorted by image id), with each
    record's ``image`` (the annotation's path) when ``images`` are given."""
    rows = zip(image_ids, captions, images if images is not None else [None] * len(captions))
    return [{"image_id": int(i), "caption": c, **({"image": f} if f is not None else {})}
            for i, c, f in sorted(rows, key=lambda x: x[0])]


def spice_command(spice_dir: str, models_dir: str, in_file: str, out_file: str, cache_dir: str,
                  java_mem: str = "8G") -> list[str]:
    """The java command that runs pycocoevalcap's SPICE jar with the CoreNLP jars of ``models_dir``."""
    cp = os.pathsep.join([os.path.join(spice_dir, "spice-1.0.jar"),
                          *(os.path.join(models_dir, j) for j in SPICE_JARS),
                          os.path.join(spice_dir, "lib", "*")])
    return ["java", f"-Xmx{java_mem}", "-cp", cp, "edu.anu.spice.SpiceScorer", in_file, "-cache", cache_dir,
            "-out", out_file, "-subset", "-silent"]


def _spice(gts: dict, res: dict, models_dir: str, java_mem: str) -> tuple[float, list[float]]:
    """SPICE F-score as pycocoevalcap's ``Spice.compute_score`` computes it (same input and output)."""
    missing = [j for j in SPICE_JARS if not os.path.isfile(os.path.join(models_dir, j))]
    if missing:
        raise FileNotFoundError(f"eval.spice_models_dir={models_dir!r} lacks {missing}; it must hold "
                                f"{' and '.join(SPICE_JARS)} (from stanford-corenlp-full-2015-12-09)")
    import pycocoevalcap.spice as spice_pkg
    spice_dir = os.path.dirname(os.path.abspath(spice_pkg.__file__))
    ids = sorted(gts)
    data = [{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in ids]
    with tempfile.TemporaryDirectory(prefix="spice_") as tmp:
        in_file, out_file = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(in_file, "w") as f:
            json.dump(data, f)
        cache = os.path.join(tmp, "cache")
        os.makedirs(cache)
        subprocess.check_call(spice_command(spice_dir, models_dir, in_file, out_file, cache, java_mem), cwd=spice_dir)
        with open(out_file) as f:
            results = {r["image_id"]: float(r["scores"]["All"]["f"]) for r in json.load(f)}
    per = [results[i] for i in ids]
    return float(np.mean(per)), per


def score_captions(predictions: Sequence[Mapping] | Mapping[int, str], references: Mapping[int, Sequence[str]],
                   metrics: Sequence[str] = ("bleu", "meteor", "rouge", "cider", "spice"),
                   spice_models_dir: Optional[str] = None, java_mem: str = "8G") -> CaptionScores:
    """Score generated captions against references with pycocoevalcap.

    Args:
        predictions: ``[{"image_id", "caption"}]`` (COCO results format) or ``{image_id: caption}``.
        references: ``{image_id: [reference captions]}``; every one of these images is scored and
            needs a prediction (predictions for other images are ignored).
        metrics: any of :data:`METRICS`.
        spice_models_dir: local directory with the Stanford CoreNLP 3.6.0 jars; without it SPICE is
            skipped (see the module docstring).

    Raises:
        ValueError: an unknown metric, an image without a prediction, or an image without references.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; valid: {list(METRICS)}")
    preds = records_by_id(predictions, "image_id", "caption", string_value=True)
    ids = sorted(int(i) for i in references)
    missing = [i for i in ids if i not in preds]
    if missing:
        raise ValueError(f"{len(missing)} of {len(ids)} images have no generated caption (first ids: {missing[:5]})")
    empty = [i for i in ids if not references[i]]
    if empty:
        raise ValueError(f"{len(empty)} images have no reference caption (first ids: {empty[:5]})")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tok.tokenize({i: [{"caption": preds[i]}] for i in ids})
    out = CaptionScores(num_images=len(ids))
    per_image: dict[int, dict[str, float]] = {i: {} for i in ids}

    def record(names: Sequence[str], score, scores) -> None:
        if len(names) == 1:
            score, scores = [score], [scores]
        for name, s, per in zip(names, score, scores):
            out.scores[name] = float(s)
            for i, v in zip(ids, per):
                per_image[i][name] = float(v) if np.isscalar(v) else float(np.asarray(v).mean())

    for m in metrics:
        if m == "bleu":
            from pycocoevalcap.bleu.bleu import Bleu
            record(METRIC_KEYS[m], *Bleu(4).compute_score(gts, res, verbose=0))
        elif m == "meteor":
            from pycocoevalcap.meteor.meteor import Meteor
            scorer = Meteor()
            try:
                record(METRIC_KEYS[m], *scorer.compute_score(gts, res))
            finally:
                _close_meteor(scorer)
        elif m == "rouge":
            from pycocoevalcap.rouge.rouge import Rouge
            record(METRIC_KEYS[m], *Rouge().compute_score(gts, res))
        elif m == "cider":
            from pycocoevalcap.cider.cider import Cider
            record(METRIC_KEYS[m], *Cider().compute_score(gts, res))
        elif m == "spice":
            if spice_models_dir is None:
                out.skipped["SPICE"] = SPICE_SKIP_REASON
            else:
                record(METRIC_KEYS[m], *_spice(gts, res, spice_models_dir, java_mem))
    out.per_image = per_image
    return out


def _close_meteor(scorer) -> None:
    """Stop the METEOR Java subprocess (pycocoevalcap leaves it to ``__del__``)."""
    proc = getattr(scorer, "meteor_p", None)
    if proc is None or proc.poll() is not None:
        return
    lock = getattr(scorer, "lock", None)
    try:
        if lock is not None:
            lock.acquire()
        proc.stdin.close()
        proc.kill()
        proc.wait()
    finally:
        if lock is not None:
            lock.release()


def format_table(results: Mapping[str, CaptionScores]) -> str:
    """A text table: one row per split, one column per metric (x100, as papers print them)."""
    cols: list[str] = []
    for r in results.values():
        for k in r.scores:
            if k not in cols:
                cols.append(k)
    head = f"{'split':8s}" + "".join(f"{c:>9s}" for c in cols)
    lines = [head, "-" * len(head)]
    for split, r in results.items():
        lines.append(f"{split:8s}" + "".join(f"{100 * r.scores[c]:9.2f}" if c in r.scores else f"{'-':>9s}"
                                             for c in cols))
    skipped = {k: v for r in results.values() for k, v in r.skipped.items()}
    for k, why in skipped.items():
        lines.append(f"{k}: skipped ({why})")
    return "\n".join(lines)
