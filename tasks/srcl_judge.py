"""How good a judge of false negatives is a checkpoint? (synthetic shapes data)

The SRCL weights can only find the false negatives that the similarity they are computed from can
tell apart. This module scores every (image, caption) pair of a shapes split with a checkpoint's
two judges, the momentum ITC cosine (what the weights use) and, when the run trained one, the ITM
head of the fusion layers (match logit minus no-match logit), and measures each against the
world's truth:

* ``row_auc``: mean over images of the ROC AUC with which the judge ranks the captions true of the
  image above the others (an image anchor's view);
* ``col_auc``: mean over captions of the AUC with which it ranks the images the caption is true of
  above the others (how well it knows what a caption says);
* ``pooled_auc``: all pairs at once;

and, in batches of the diagnostics (``tasks.srcl_diagnostics``: the split's pairs shuffled, image
anchors, delta 1), the weight AUC of evidence made from each judge: the standardised ITC cosine
(``cross z``), the standardised ITM score (``itm z``), their sum, and the ITC evidence with each
anchor's ``k`` most similar negatives re-judged by adding their ITM evidence (``k`` fusion
passes per anchor and direction in training).

    from tasks.srcl_judge import judge_checkpoint
    judge_checkpoint("output/srcl_study/runs/p1.00_srcl_s0/checkpoint_last.pth", "output/srcl_study/worlds/p1.00")
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from datasets.formats import load_image
from datasets.transforms import build_transform
from models import losses as L
from tasks.srcl_diagnostics import _pairs
from tasks.srcl_measures import batch_diagnostics
from tasks.zero_shot import itc_features, load_vlp_checkpoint

__all__ = ["itm_scores", "judge_checkpoint", "mean_auc"]


@torch.no_grad()
def itm_scores(model, tokenizer, image_paths: Sequence[str], captions: Sequence[str], img_size: int,
               max_length: int, transform_cfg=None, batch_size: int = 64) -> Tensor:
    """(N_images, N_captions) ITM scores (match minus no-match logit) of a ``VLPModel``; each image's
    cross-attention keys/values are computed once for all captions (``fuse(..., image_index=)``)."""
    was_training = model.training
    model.eval()
    transform = build_transform(img_size, False, transform_cfg)
    enc = tokenizer(list(captions), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    text = torch.cat([model.encode_text(ids[i:i + batch_size], mask[i:i + batch_size])
                      for i in range(0, len(captions), batch_size)])
    out = torch.zeros(len(image_paths), len(captions))
    for lo in range(0, len(image_paths), batch_size):
        images = torch.stack([transform(load_image(p)) for p in image_paths[lo:lo + batch_size]])
        tokens = model.encode_image(images)
        for k in range(tokens.shape[0]):
            logits = model.itm_logits(model.fuse(text, mask, tokens[k:k + 1], image_index=torch.zeros(len(captions), dtype=torch.long)))
            out[lo + k] = (logits[:, 1] - logits[:, 0]).float()
    model.train(was_training)
    return out


def mean_auc(scores: Tensor, truth: Tensor, dim: int) -> float:
    """Mean ROC AUC over the rows (``dim=0``: one per index of dim 0) or columns (``dim=1``) that have
    both classes."""
    aucs = [L.roc_auc(scores.select(dim, k), truth.select(dim, k)) for k in range(scores.shape[dim])
            if 0 < int(truth.select(dim, k).sum()) < truth.shape[1 - dim]]
    return sum(aucs) / len(aucs) if aucs else float("nan")


def _evidence(sim: Tensor, itm: Optional[Tensor], neg: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    z = lambda e: L.regulation_evidence(e, neg, standardise=True)  # noqa: E731
    zs = z(sim)
    out = {"cross z": zs}
    if itm is not None:
        zm = z(itm)
        out.update({"itm z": zm, "cross z + itm z": zs + zm})
        for k in ks:
            top = sim.masked_fill(~neg, float("-inf")).topk(min(k, sim.shape[1]), dim=1).indices
            chosen = torch.zeros_like(neg).scatter(1, top, True) & neg
            out[f"cross z, top {k} re-judged by itm"] = torch.where(chosen, zs + zm, zs)
    return out


def judge_checkpoint(checkpoint_path: str, data_root: str, split: str = "test", batch_size: int = 64,
                     rejudge_k: Sequence[int] = (4, 8), seed: int = 0) -> dict[str, Any]:
    """The judges of a pre-training checkpoint on a split of a shapes world (module docstring).
    ITM is judged only when the checkpoint's run trained it (``loss.itm > 0``)."""
    from shapesworld.truth import ShapesWorld

    objective, tokenizer, cfg = load_vlp_checkpoint(checkpoint_path, "cpu", objective=True)
    world = ShapesWorld.load(data_root)
    d = cfg.data
    pairs = _pairs(world, split, d.max_words, d.clean_style, seed)
    if len(pairs) < 2:
        raise ValueError(f"split {split!r} of {data_root} has {len(pairs)} image-caption pairs; need >= 2")
    images, captions = sorted({p for p, _ in pairs}), sorted({c for _, c in pairs})
    paths = [os.path.join(data_root, p) for p in images]
    img, txt = itc_features(objective, tokenizer, paths, captions, cfg.model.vision.img_size, batch_size,
                            cfg.tokenizer.max_length, momentum=True, progress=False, transform_cfg=d.transform)
    sim_all = img @ txt.T
    truth_all = torch.as_tensor(world.truth_matrix(captions, images)).T.bool()
    itm_all = None
    if cfg.loss.itm > 0:
        itm_all = itm_scores(objective.model, tokenizer, paths, captions, cfg.model.vision.img_size,
                             cfg.tokenizer.max_length, d.transform, batch_size)
    res: dict[str, Any] = {"checkpoint": checkpoint_path, "split": split, "n_images": len(images),
                           "n_captions": len(captions), "itm_trained": itm_all is not None, "judges": {}}
    for name, scores in (("itc", sim_all), ("itm", itm_all)):
        if scores is not None:
            res["judges"][name] = {"row_auc": mean_auc(scores, truth_all, 0), "col_auc": mean_auc(scores, truth_all, 1),
                                   "pooled_auc": L.roc_auc(scores.flatten(), truth_all.flatten())}
    ir, cr = {p: i for i, p in enumerate(images)}, {c: i for i, c in enumerate(captions)}
    blocks: dict[str, list[tuple[Tensor, ...]]] = {}
    for lo in range(0, len(pairs) - batch_size + 1, batch_size):  # full batches, as in training
        chunk = pairs[lo:lo + batch_size]
        ii, cc = torch.tensor([ir[p] for p, _ in chunk]), torch.tensor([cr[c] for _, c in chunk])
        sim, truth = sim_all[ii][:, cc], truth_all[ii][:, cc]
        neg = ii[:, None] != ii[None, :]
        itm = itm_all[ii][:, cc] if itm_all is not None else None
        for name, e in _evidence(sim, itm, neg, rejudge_k).items():
            blocks.setdefault(name, []).append((neg, truth, sim, L.regulation_weights(e, neg, 1.0)))
    res["weight_auc"] = {name: batch_diagnostics(*(torch.cat([b[i] for b in bs]) for i in range(4)))["weight_auc"]
                         for name, bs in blocks.items()}
    return res
