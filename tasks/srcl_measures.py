"""The measures of the SRCL diagnostics (``tasks/srcl_diagnostics.py`` explains them): how well the
weights and similarities of a block of anchors x candidates find the true false negatives; the
captions behind the objective's text queue; and the diagnostics of one pre-training step
(``diagnostics.every``), on the local batch's captions and the queued ones.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from models import losses as L

__all__ = ["batch_diagnostics", "QueueTexts", "training_diagnostics"]


def batch_diagnostics(neg_mask: Tensor, truth: Tensor, sim: Tensor, weights: Optional[Tensor] = None,
                      prefix: str = "") -> dict[str, float]:
    """Diagnostics of one block of anchors x candidates.

    Args:
        neg_mask: (B, K) bool, the entries the loss treats as negatives.
        truth: (B, K) bool, True where the candidate is actually true of the anchor.
        sim: (B, K) the model similarity the weights were computed from.
        weights: (B, K) SRCL weights, or None (InfoNCE: only the similarity numbers).
        prefix: put before every key (e.g. ``"queue_"``).

    Returns (NaN where a class is absent): ``{prefix}weight_auc``, ``{prefix}weight_w_false_neg``,
    ``{prefix}weight_w_true_neg``, ``{prefix}weight_n_false_neg``, ``{prefix}weight_n_true_neg``
    (only with weights), ``{prefix}sim_auc``, ``{prefix}sim_centred_auc`` (the similarity minus its
    anchor's mean over the negatives: as the weights, which are normalised per anchor, see the
    module docstring), ``{prefix}sim_false_neg``, ``{prefix}sim_true_neg``,
    ``{prefix}false_negative_rate``.
    """
    neg, truth = neg_mask.detach().cpu().bool(), truth.detach().cpu().bool()
    s = sim.detach().cpu().double()[neg]
    t = truth[neg]
    nan = float("nan")
    res: dict[str, float] = {}
    if weights is not None:
        fn = L.false_negative_auc(weights.detach().cpu().double(), neg, truth)
        res.update({f"{prefix}weight_{k}": v for k, v in fn.items()})
    res[f"{prefix}sim_auc"] = L.roc_auc(s, t)
    # the weights are normalised per anchor; the same for the similarity: minus the anchor's mean
    sd = torch.where(neg, sim.detach().cpu().double(), torch.zeros((), dtype=torch.float64))
    row_mean = sd.sum(dim=1, keepdim=True) / neg.sum(dim=1, keepdim=True).clamp_min(1)
    res[f"{prefix}sim_centred_auc"] = L.roc_auc((sd - row_mean)[neg], t)
    res[f"{prefix}sim_false_neg"] = float(s[t].mean()) if bool(t.any()) else nan
    res[f"{prefix}sim_true_neg"] = float(s[~t].mean()) if bool((~t).any()) else nan
    res[f"{prefix}false_negative_rate"] = float(t.double().mean()) if t.numel() else nan
    return res


class QueueTexts:
    """The captions behind the model's text queue, for the queue diagnostics.

    The model's queue holds only features; this ring buffer of the same size holds the caption of
    every slot. Call :meth:`write` with the queue pointer read *before* the forward that enqueues
    and the (all-process) captions of that step, exactly as ``PretrainObjective.enqueue`` writes them.
    Slots never written in this process (e.g. queued before a resume) are ``None`` and are left out.
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.texts: list[Optional[str]] = [None] * self.size

    def write(self, ptr: int, texts: Sequence[str]) -> None:
        """Mirror ``enqueue``: ``texts`` go to slots ``ptr, ptr + 1, ...`` modulo the size (only the
        newest ``size`` when there are more)."""
        if self.size == 0:
            return
        texts = list(texts)[-self.size:]
        for k, text in enumerate(texts):
            self.texts[(int(ptr) + k) % self.size] = text

    def known(self) -> Tensor:
        """(size,) bool: slots whose caption is known."""
        return torch.tensor([t is not None for t in self.texts], dtype=torch.bool)


def training_diagnostics(world, captions: Sequence[str], image_paths: Sequence[str], image_root: str, out: dict,
                         rank: int = 0, world_size: int = 1, helper_feats=None,
                         queue_texts: Optional[QueueTexts] = None) -> dict[str, float]:
    """How well low weight (and high raw similarity) finds the true false negatives among the
    negatives of the local images (anchors) of one pre-training step: the local batch's captions
    (``diag/*``) and the queued captions (``diag/queue_*``, with ``queue_texts``).

    ``world``: the shapes world; ``captions`` / ``image_paths``: the local batch (image paths under
    ``image_root``); ``out``: the objective's outputs (``neg_mask``, ``sim_i2t_model``, ``weights_i2t``);
    ``rank`` / ``world_size``: where the local batch sits among the gathered columns;
    ``helper_feats``: the helper's (image, text) features of the batch."""
    b = len(captions)
    lo = rank * b
    n_batch = b * world_size
    images = [os.path.relpath(p, image_root) for p in image_paths]
    truth = torch.as_tensor(world.truth_matrix(captions, images)).T  # (image, caption)
    neg, sim, w = out["neg_mask"].cpu(), out["sim_i2t_model"].float().cpu(), out.get("weights_i2t")
    w = w.float().cpu() if w is not None else None
    res = batch_diagnostics(neg[:, lo:lo + b], truth, sim[:, lo:lo + b], None if w is None else w[:, lo:lo + b])
    if helper_feats is not None:
        sim_h = (helper_feats[0].float() @ helper_feats[1].float().T).cpu()
        res["helper_sim_auc"] = L.roc_auc(sim_h[neg[:, lo:lo + b]], truth[neg[:, lo:lo + b]])
    q = neg.shape[1] - n_batch
    if queue_texts is not None and q == queue_texts.size and q > 0:
        known = queue_texts.known()
        if bool(known.any()):
            cols = torch.nonzero(known).flatten()
            texts = [queue_texts.texts[int(k)] for k in cols]
            truth_q = torch.zeros(b, q, dtype=torch.bool)
            truth_q[:, cols] = torch.as_tensor(world.truth_matrix(texts, images)).T
            neg_q = neg[:, n_batch:] & known[None, :]
            res.update(batch_diagnostics(neg_q, truth_q, sim[:, n_batch:],
                                         None if w is None else w[:, n_batch:], prefix="queue_"))
    return {f"diag/{k}": v for k, v in res.items()}
