"""Do the SRCL regulation weights find the real false negatives? (synthetic shapes data)

On the shapes world every caption can be checked against every image, so among the negatives
of a contrastive batch (captions of other images) we know which are *false* negatives: captions
that are true of the anchor image as well ("there is a red circle" for two images that both have
one). SRCL should give those a LOW weight. The numbers, for a batch or pooled over batches:

* ``weight_auc``: ROC AUC with which a low weight identifies the true false negatives among the
  negatives (1 = every false negative weighs less than every true negative, 0.5 = chance);
  ``weight_w_false_neg`` / ``weight_w_true_neg``: their mean weights (the weights average 1 per
  anchor, so a working regulation shows ``w_false_neg < 1 < w_true_neg``);
* ``sim_auc``: the same AUC for the raw model similarity (high similarity = false negative),
  ``sim_false_neg`` / ``sim_true_neg`` its means; ``helper_sim_auc`` for a helper model;
* ``sim_centred_auc``: the AUC of the similarity minus its anchor's mean similarity to the
  negatives. The weights are normalised per anchor (``w_ij = s_ij^-delta / mean_k s_ik^-delta``),
  so without a helper ``-log w_ij = delta * sim_ij + c_i``: ranking all negatives by weight is
  ranking them by *anchor-centred* similarity, and ``weight_auc`` is close to ``sim_centred_auc``
  (equal in the limit of small ``delta * spread``), not to ``sim_auc``, which pools raw similarities
  across anchors whose overall similarity levels differ. Within one anchor the three rank the
  negatives identically;
* ``false_negative_rate``: the fraction of negatives that are false negatives.

Used three ways:

* during pre-training (``diagnostics.every``): ``tasks/srcl_measures.py`` (``batch_diagnostics``
  on the local batch and, with the queue, on the queued captions, their texts kept by
  ``QueueTexts``, a ring buffer that mirrors the objective's queue);
* for any checkpoint on any split, e.g. in a notebook::

      from tasks.srcl_diagnostics import diagnose_checkpoint
      diagnose_checkpoint("output/demo_pretrain/checkpoint_last.pth", "data/shapes", split="test")

* from the command line::

      python -m tasks.srcl_diagnostics output/demo_pretrain/checkpoint_last.pth --data data/shapes
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from models import losses as L
from objectives.pretrain import PretrainObjective, regulation_evidence
from tasks.srcl_measures import batch_diagnostics
from tasks.zero_shot import itc_features, load_vlp_checkpoint

__all__ = ["SplitFeatures", "caption_lengths", "diagnose_checkpoint", "main", "pair_batches", "split_features", "study_runs"]


# ---------------------------------------------------------------------------------- checkpoints
def _pairs(world, split: str, max_words: int, clean_style: str, seed: int) -> list[tuple[str, str]]:
    from datasets.text import pre_caption
    pairs = []
    for path in world.images(split):
        for caption in world.captions.get(path, []):
            text = pre_caption(caption, max_words, clean_style)
            if text:
                pairs.append((path, text))
    random.Random(seed).shuffle(pairs)
    return pairs


@dataclasses.dataclass
class SplitFeatures:
    """A split's (image, caption) pairs in the diagnostics' order, its distinct images and captions
    (sorted; ``img_row`` / ``cap_row`` give their rows) and their normalised ITC features."""
    world: Any
    pairs: list[tuple[str, str]]
    images: list[str]
    captions: list[str]
    img_row: dict[str, int]
    cap_row: dict[str, int]
    image_feats: Tensor
    text_feats: Tensor


def split_features(model, tokenizer, cfg, data_root: str, split: str, batch_size: int, momentum: bool,
                   seed: int = 0, progress: bool = False) -> SplitFeatures:
    """The pairs of ``split`` of the shapes world at ``data_root`` (captions cleaned as the run
    ``cfg`` cleans them, shuffled with ``seed``) and the features of ``model`` (a loaded checkpoint;
    ``momentum``: its objective's momentum encoders). Raises ``ValueError`` for fewer than 2 pairs."""
    from shapesworld.truth import ShapesWorld

    world, d = ShapesWorld.load(data_root), cfg.data
    pairs = _pairs(world, split, d.max_words, d.clean_style, seed)
    if len(pairs) < 2:
        raise ValueError(f"split {split!r} of {data_root} has {len(pairs)} image-caption pairs; need >= 2")
    images, captions = sorted({p for p, _ in pairs}), sorted({c for _, c in pairs})
    fi, ft = itc_features(model, tokenizer, [os.path.join(data_root, p) for p in images], captions,
                          cfg.model.vision.img_size, batch_size, cfg.tokenizer.max_length, momentum=momentum,
                          progress=progress, transform_cfg=d.transform)[:2]
    return SplitFeatures(world, pairs, images, captions, {p: i for i, p in enumerate(images)},
                         {c: i for i, c in enumerate(captions)}, fi, ft)


def caption_lengths(tokenizer, captions: list[str], max_length: int) -> Tensor:
    """Each caption's length in tokens, as the objective counts them (``loss.contrastive.length_weight``)."""
    enc = tokenizer(captions, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["attention_mask"].sum(1)


def pair_batches(world, pairs: list[tuple[str, str]], img_row: dict[str, int], cap_row: dict[str, int],
                 batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The diagnostics' batches of ``pairs`` (``batch_size`` pairs each, the last possibly fewer, none
    of one pair): ``(ii, cc, neg, truth)``, the rows of each pair's image and caption (``img_row``,
    ``cap_row``), the (anchors x captions) negatives (another image) and the world's truth (the
    caption is true of the anchor image)."""
    for lo in range(0, len(pairs) - 1, batch_size):
        chunk = pairs[lo:lo + batch_size]
        if len(chunk) < 2:
            break
        ii = torch.tensor([img_row[p] for p, _ in chunk])
        cc = torch.tensor([cap_row[c] for _, c in chunk])
        truth = torch.as_tensor(world.truth_matrix([c for _, c in chunk], [p for p, _ in chunk])).T
        yield ii, cc, ii[:, None] != ii[None, :], truth


def study_runs(folders) -> list[tuple[str, str, dict]]:
    """``(checkpoint, world, spec)`` of study run folders (``benchmarks/srcl_study.py --keep-checkpoints``:
    ``checkpoint_last.pth`` and ``spec.json`` naming the run's world). Raises ``ValueError`` naming the
    first folder that is not one."""
    out = []
    for folder in map(str, folders):
        ckpt, spec = os.path.join(folder, "checkpoint_last.pth"), os.path.join(folder, "spec.json")
        if not (os.path.isfile(ckpt) and os.path.isfile(spec)):
            raise ValueError(f"{folder}: not a study run folder with spec.json and checkpoint_last.pth "
                             "(make it with benchmarks/srcl_study.py --keep-checkpoints)")
        with open(spec, encoding="utf-8") as f:
            spec_d = json.load(f)
        out.append((ckpt, spec_d["evals"]["own"], spec_d))
    return out


def diagnose_checkpoint(checkpoint_path: str, data_root: str, split: str = "test", batch_size: int = 64,
                        delta: Optional[float] = None, helper: Optional[str] = None, alpha: Optional[float] = None,
                        similarity_source: Optional[str] = None, seed: int = 0, device: str = "cpu",
                        progress: bool = True, keep_batch: bool = False,
                        regulation: Optional[dict] = None) -> dict[str, Any]:
    """The SRCL diagnostics of a pre-training checkpoint on a split of a shapes world.

    Every (image, caption) pair of ``split`` (from ``<data_root>/scenes.json``) is shuffled with
    ``seed`` and cut into batches of ``batch_size`` pairs, as pre-training sees them; in each batch
    the anchors are the images, the candidates the captions, captions of the same image are
    positives, the rest negatives. The weights are ``regulation_weights`` of the checkpoint's model
    similarity (its ``similarity_source``: momentum or online encoders) mixed with the helper's, made
    into evidence as the run's ``loss.contrastive`` says (``evidence``, ``intra_weight``,
    ``standardise``, ...: ``objectives.pretrain.regulation_evidence``; an anchor's own caption is its
    row's caption; a caption's length is its token count under the checkpoint's tokenizer).
    The AUCs and means are pooled over all negatives of all batches.

    Args:
        checkpoint_path: a pre-training checkpoint of this project.
        data_root: a shapes world (with ``scenes.json`` and the images).
        split: ``train``, ``val`` or ``test``.
        batch_size: pairs per batch (the candidates per anchor; 1024 mimics a queue).
        delta: SRCL power; default the checkpoint's ``loss.contrastive.delta``.
        helper: a checkpoint whose (online) similarity is mixed in with ``alpha``.
        alpha: helper weight in [0, 1]; default 1.0 with a helper (the start of training), else 0.
        similarity_source: ``momentum`` or ``online``; default the checkpoint's setting.
        seed: pair order.
        device: where to run the encoders.
        regulation: ``loss.contrastive`` settings that replace the checkpoint's for the weights
            (e.g. ``{"evidence": "intra", "standardise": True}``: what that regulation would make of
            this checkpoint's similarities).
        keep_batch: also return the first batch's matrices as ``batch`` (lists: ``truth``, ``neg``,
            ``weights``, ``sim``; rows = the anchors' images, columns = the batch's captions).

    Returns a dict of floats and settings: ``weight_auc``, ``weight_w_false_neg``,
    ``weight_w_true_neg``, ``weight_n_false_neg``, ``weight_n_true_neg``, ``w_top1`` (mean weight
    of each anchor's most similar negative), ``sim_auc``, ``sim_false_neg``, ``sim_true_neg``,
    ``false_negative_rate``, ``helper_sim_auc`` (with a helper), and ``n_pairs``, ``n_batches``,
    ``delta``, ``alpha``, ``similarity_source``, ``split``, ``checkpoint``, ``helper``.
    """
    if similarity_source not in (None, "momentum", "online"):
        raise ValueError(f"similarity_source must be 'momentum' or 'online', got {similarity_source!r}")
    # the momentum encoders are the checkpoint's objective's
    model, tokenizer, cfg = load_vlp_checkpoint(checkpoint_path, device, objective=similarity_source != "online")
    ccfg = dataclasses.replace(cfg.loss.contrastive, **(regulation or {}))
    ccfg.validate()
    delta = float(ccfg.delta if delta is None else delta)
    source = similarity_source or ccfg.similarity_source
    if source == "online" and isinstance(model, PretrainObjective):
        model = model.model
    alpha = float((1.0 if helper else 0.0) if alpha is None else alpha)
    if alpha > 0 and not helper:
        raise ValueError(f"alpha={alpha} mixes in a helper similarity: pass helper=<checkpoint>")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2, got {batch_size}")
    sf = split_features(model, tokenizer, cfg, data_root, split, batch_size, source == "momentum", seed, progress)
    world, pairs, captions, img_row, cap_row = sf.world, sf.pairs, sf.captions, sf.img_row, sf.cap_row
    feats = (sf.image_feats, sf.text_feats)
    # also for an InfoNCE run (kind infonce reads no lengths in training)
    lengths = caption_lengths(tokenizer, captions, cfg.tokenizer.max_length) if ccfg.length_weight != 0.0 else None
    h_feats = None
    if helper:
        h_model, h_tok, h_cfg = load_vlp_checkpoint(helper, device)
        h_feats = itc_features(h_model, h_tok, [os.path.join(data_root, p) for p in sf.images], captions,
                               h_cfg.model.vision.img_size, batch_size, h_cfg.tokenizer.max_length, progress=progress,
                               transform_cfg=h_cfg.data.transform)

    # every batch's anchors become rows of one (anchors, batch_size) block (the last batch padded
    # with non-negatives), so that the per-anchor quantities stay per anchor and all are pooled
    rows: dict[str, list[Tensor]] = {"neg": [], "truth": [], "sim": [], "w": [], "h": []}
    top1: list[float] = []
    first: Optional[dict] = None
    for ii, cc, neg, truth in pair_batches(world, pairs, img_row, cap_row, batch_size):
        sim = feats[0][ii] @ feats[1][cc].T
        # the evidence the checkpoint's run regulated by (image anchors: the row's own caption is its intra item)
        length = lengths[cc] if lengths is not None else None
        e = regulation_evidence(ccfg, neg, (feats[0][ii], feats[1][cc], feats[0][ii], feats[1][cc]), (sim, sim.T), length)[0]
        sim_h = None
        if h_feats is not None:
            sim_h = h_feats[0][ii] @ h_feats[1][cc].T
            sim_h = regulation_evidence(ccfg, neg, (h_feats[0][ii], h_feats[1][cc], h_feats[0][ii], h_feats[1][cc]),
                                        (sim_h, sim_h.T), length)[0]
        w = L.regulation_weights(e, neg, delta, sim_h, alpha)
        if keep_batch and first is None:
            first = {"truth": truth.tolist(), "neg": neg.tolist(), "weights": w.tolist(), "sim": sim.tolist()}
        if bool(neg.any()):
            top1.append(L.regulation_summary(w, neg, sim)["w_top1"])
        pad = batch_size - len(ii)
        for key, value in (("neg", neg), ("truth", truth), ("sim", sim), ("w", w), ("h", sim_h)):
            if value is not None:
                rows[key].append(torch.nn.functional.pad(value, (0, pad)))
    neg, truth, sim, w = (torch.cat(rows[k]) for k in ("neg", "truth", "sim", "w"))
    res: dict[str, Any] = batch_diagnostics(neg, truth, sim, w)
    res["w_top1"] = sum(top1) / len(top1) if top1 else float("nan")
    if rows["h"]:
        res["helper_sim_auc"] = L.roc_auc(torch.cat(rows["h"])[neg], truth[neg])
    n_batches = len(rows["neg"])
    res.update({"n_pairs": len(pairs), "n_batches": n_batches, "batch_size": batch_size, "delta": delta,
                "alpha": alpha, "similarity_source": source, "split": split, "checkpoint": checkpoint_path,
                "helper": helper, "evidence": ccfg.evidence, "intra_weight": ccfg.intra_weight,
                "standardise": ccfg.standardise, "generality_weight": ccfg.generality_weight,
                "pair_weight": ccfg.pair_weight, "length_weight": ccfg.length_weight})
    if keep_batch:
        res["batch"] = first
    return res


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tasks.srcl_diagnostics",
                                description="Do the SRCL weights of a checkpoint find the true false negatives "
                                            "of a synthetic shapes split?")
    p.add_argument("checkpoint", help="a pre-training checkpoint (.pth)")
    p.add_argument("--data", default="data/shapes", help="shapes world folder (scenes.json + images)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--batch-size", type=int, default=64, help="pairs per contrastive batch")
    p.add_argument("--delta", type=float, default=None, help="SRCL power (default: the checkpoint's)")
    p.add_argument("--helper", default=None, help="helper checkpoint mixed into the similarity")
    p.add_argument("--alpha", type=float, default=None, help="helper weight (default 1 with --helper)")
    p.add_argument("--similarity-source", choices=("momentum", "online"), default=None)
    p.add_argument("--seed", type=int, default=0, help="pair order")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = diagnose_checkpoint(args.checkpoint, args.data, args.split, args.batch_size, args.delta, args.helper,
                                  args.alpha, args.similarity_source, args.seed, args.device, progress=True)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key, value in res.items():
        print(f"{key:>24}: {value:.4f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
