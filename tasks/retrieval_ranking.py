"""The building blocks of retrieval evaluation (``tasks/retrieval_eval.py`` describes the protocol):
ITC candidates, the ITM score of image-caption pairs, the re-ranking score and order, final ranks
and Recall@K: functions on tensors (and, for the ITM score, the model); and what one evaluation
produced (:class:`RetrievalResult`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["SCORE_RULES", "stable_order", "itc_candidates", "combine_scores", "rerank", "final_ranks", "query_ranks",
           "recall_metrics", "itm_match_scores", "ranks_from_score_matrix", "RetrievalResult"]

SCORE_RULES: dict[str, str] = {
    "albef": "ITM score alone for the re-ranked candidates, as fine-tuned ALBEF",
    "blip": "ITM score + ITC cosine for the re-ranked candidates, as BLIP",
}


def stable_order(scores: Tensor) -> Tensor:
    """Indices that sort each row by descending score; equal scores keep the lower index first."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def itc_candidates(query: Tensor, cands: Tensor, k: int, pos_query: Tensor, pos_cand: Tensor,
                   chunk: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` candidates of every query by ITC similarity ``query @ cands.T``.

    ``(pos_query[p], pos_cand[p])`` are the ground-truth pairs. Returns ``topk_sim (Q, k)``,
    ``topk_idx (Q, k)`` (stable descending order) and ``pos_rank (P,)``: the 0-based ITC position of
    each ground-truth candidate in its query's full ranking. Works on blocks of ``chunk`` queries."""
    n_q, n_c = query.shape[0], cands.shape[0]
    k = min(k, n_c)
    topk_sim = torch.empty(n_q, k, dtype=torch.float32, device=query.device)
    topk_idx = torch.empty(n_q, k, dtype=torch.long, device=query.device)
    pos_rank = torch.full((pos_query.shape[0],), -1, dtype=torch.long, device=query.device)
    pos_query, pos_cand = pos_query.to(query.device), pos_cand.to(query.device)
    arange = torch.arange(n_c, device=query.device)
    for a in range(0, n_q, chunk):
        b = min(a + chunk, n_q)
        sims = query[a:b].float() @ cands.float().T
        order = stable_order(sims)
        topk_idx[a:b] = order[:, :k]
        topk_sim[a:b] = sims.gather(1, order[:, :k])
        position = torch.empty_like(order)
        position.scatter_(1, order, arange.expand(b - a, n_c))
        sel = (pos_query >= a) & (pos_query < b)
        pos_rank[sel] = position[pos_query[sel] - a, pos_cand[sel]]
    return topk_sim, topk_idx, pos_rank


def combine_scores(itm: Tensor, itc: Tensor, rule: str) -> Tensor:
    """The re-ranking score of a candidate: ``albef`` = ITM logit; ``blip`` = ITM logit + ITC cosine."""
    if rule == "albef":
        return itm.float()
    if rule == "blip":
        return itm.float() + itc.float()
    raise ValueError(f"unknown score rule {rule!r}; valid: {sorted(SCORE_RULES)}")


def rerank(topk_idx: Tensor, topk_sim: Tensor, itm: Tensor, rule: str) -> tuple[Tensor, Tensor]:
    """Re-sort each query's ``k`` ITC candidates by the rule's score (ties keep the ITC order).
    Returns ``(ranked_idx (Q, k), ranked_score (Q, k))``: the same candidates, new order."""
    score = combine_scores(itm, topk_sim, rule)
    perm = stable_order(score)
    return topk_idx.gather(1, perm), score.gather(1, perm)


def final_ranks(ranked_idx: Tensor, pos_query: Tensor, pos_cand: Tensor, pos_itc_rank: Tensor) -> Tensor:
    """0-based final rank of each ground-truth pair: its position among the re-ranked ``k`` when it
    is one of them, else its ITC position (all re-ranked candidates come first, the rest keep the ITC
    order, so a candidate at ITC position ``p >= k`` stays at ``p``)."""
    k = ranked_idx.shape[1]
    rows = ranked_idx[pos_query.to(ranked_idx.device)]
    hit = rows == pos_cand.to(ranked_idx.device)[:, None]
    inside = pos_itc_rank.to(ranked_idx.device) < k
    return torch.where(inside, hit.to(torch.int8).argmax(1), pos_itc_rank.to(ranked_idx.device))


def query_ranks(pos_rank: Tensor, pos_query: Tensor, num_queries: int) -> Tensor:
    """Best (smallest) rank over each query's ground-truth candidates: image-to-text counts a hit when
    any caption of the image is in the top K."""
    big = torch.iinfo(torch.long).max
    out = torch.full((num_queries,), big, dtype=torch.long, device=pos_rank.device)
    out.scatter_reduce_(0, pos_query.to(pos_rank.device), pos_rank.long(), reduce="amin")
    if bool((out == big).any()):
        raise ValueError("every query needs at least one ground-truth candidate")
    return out


def recall_metrics(i2t_ranks: Tensor, t2i_ranks: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K in percent (ALBEF's names): ``txt_r{K}`` image-to-text (one rank per image),
    ``img_r{K}`` text-to-image (one rank per caption), their means and ``r_mean`` over all of them."""
    out: dict[str, float] = {}
    for prefix, ranks in (("txt", i2t_ranks), ("img", t2i_ranks)):
        values = [100.0 * float((ranks < k).double().mean()) for k in ks]
        out.update({f"{prefix}_r{k}": v for k, v in zip(ks, values)})
        out[f"{prefix}_r_mean"] = sum(values) / len(values)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def itm_match_scores(model, text_states: Tensor, text_mask: Tensor, image_tokens: Tensor,
                     image_index: Tensor) -> Tensor:
    """ITM logit of "match" (float32, one per pair) for pairs ``(image_index[p], caption p)``.

    ``text_states`` (P, L, H) and ``text_mask`` (P, L) are the captions' unimodal states, one row per
    pair; ``image_tokens`` (M, N, W) the images the pairs read. The fusion encoder gets each distinct
    image of ``image_index`` once and an index into them (``VLPModel.fuse(..., image_index=...)``),
    so the cross-attention keys and values are projected once per distinct image instead of once
    per pair: the same scores as fusing ``image_tokens[image_index]`` (up to float rounding)."""
    images, inverse = torch.unique(image_index, return_inverse=True)
    fused = model.fuse(text_states, text_mask, image_tokens[images], image_index=inverse)
    return model.itm_logits(fused)[:, 1].float()


def ranks_from_score_matrix(score_i2t: Tensor, txt2img: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
    """Ranks from a full ``(images, captions)`` score matrix (the same score ranks both directions),
    ties broken by the lower index: ``(best rank per image over its captions, rank per caption)``."""
    txt2img = torch.as_tensor(txt2img, dtype=torch.long)
    n_i, n_t = score_i2t.shape
    order_i2t = stable_order(score_i2t)
    pos_i2t = torch.empty_like(order_i2t).scatter_(1, order_i2t, torch.arange(n_t).expand(n_i, n_t))
    i2t = query_ranks(pos_i2t[txt2img, torch.arange(n_t)], txt2img, n_i)
    order_t2i = stable_order(score_i2t.T)
    pos_t2i = torch.empty_like(order_t2i).scatter_(1, order_t2i, torch.arange(n_i).expand(n_t, n_i))
    return i2t, pos_t2i[torch.arange(n_t), txt2img]


@dataclass
class RetrievalResult:
    """What one evaluation produced. ``*_ranked`` hold the re-ranked top-k candidate indices of every
    query (into the split's captions for image queries, into its images for caption queries)."""

    metrics: dict[str, float]
    itc_metrics: dict[str, float]
    i2t_ranked: Tensor
    t2i_ranked: Tensor
    i2t_scores: Tensor
    t2i_scores: Tensor
    score_rule: str
    k_test: int
    timings: dict[str, float] = field(default_factory=dict)
    num_pairs: int = 0

    def flat(self) -> dict[str, float]:
        """Metrics plus ``itc_*`` (no re-ranking) and the evaluation time, for logs."""
        return {**self.metrics, **{f"itc_{k}": v for k, v in self.itc_metrics.items()},
                "eval_seconds": self.timings.get("total", 0.0)}
