"""The building blocks of retrieval evaluation (``tasks/retrieval_eval.py`` describes the protocol):
ITC candidates, the ITM score of image-caption pairs, the re-ranking score and order, final ranks,
Recall@K and the Recall@K of a random ranking (the chance level): functions on tensors (and, for
the ITM score, the model); and what one evaluation produced (:class:`RetrievalResult`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["SCORE_RULES", "stable_order", "itc_candidates", "combine_scores", "rerank", "final_ranks", "query_ranks",
           "recall_metrics", "chance_hit_probability", "chance_recall_counts", "chance_recall", "chance_recall_pairs",
           "by_construction", "chance_note", "itm_match_scores", "ranks_from_score_matrix", "RetrievalResult"]

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


def chance_hit_probability(num_items: int, num_relevant: Tensor, k: int) -> Tensor:
    """The probability that a uniformly random ranking of ``num_items`` candidates puts at least one
    of a query's ``num_relevant`` relevant ones in its top ``k``: ``1 - C(N - n, K) / C(N, K)``
    (float64, one value per query); 1 when ``K > N - n``, 0 when ``n = 0``."""
    n = torch.as_tensor(num_relevant, dtype=torch.float64)
    miss = torch.ones_like(n)  # C(N - n, K) / C(N, K) = prod_{i < K} (N - n - i) / (N - i)
    for i in range(min(k, num_items)):
        miss = miss * ((num_items - n - i).clamp_min(0) / (num_items - i))
    return 1.0 - miss


def chance_recall_counts(i2t_relevant: Sequence[int] | Tensor, num_texts: int, t2i_relevant: Sequence[int] | Tensor,
                         num_images: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """The expected Recall@K in percent of a random ranking (the chance level), with the keys of
    :func:`recall_metrics`: image-to-text for images with ``i2t_relevant[i]`` relevant captions
    among ``num_texts``, text-to-image for captions with ``t2i_relevant[t]`` relevant images among
    ``num_images``; each query's hit probability is :func:`chance_hit_probability`, averaged over
    the queries (one relevant image per caption: ``K / N``)."""
    out: dict[str, float] = {}
    for prefix, counts, n_items in (("txt", i2t_relevant, num_texts), ("img", t2i_relevant, num_images)):
        values = [100.0 * float(chance_hit_probability(n_items, counts, k).mean()) for k in ks]
        out.update({f"{prefix}_r{k}": v for k, v in zip(ks, values)})
        out[f"{prefix}_r_mean"] = sum(values) / len(values)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def chance_recall(relevant: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """:func:`chance_recall_counts` for a relevance matrix ``relevant`` (N_images, N_texts), True
    where the caption counts as a correct answer for the image (and vice versa)."""
    relevant = relevant.bool()
    n_images, n_texts = relevant.shape
    return chance_recall_counts(relevant.sum(1), n_texts, relevant.sum(0), n_images, ks)


def chance_recall_pairs(txt2img: Sequence[int] | Tensor, num_images: int,
                        ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """:func:`chance_recall_counts` of a retrieval split where caption ``t`` belongs to image
    ``txt2img[t]`` (an image's captions are its relevant texts; a caption's image is its one
    relevant image)."""
    owner = torch.as_tensor(txt2img, dtype=torch.long)
    return chance_recall_counts(torch.bincount(owner, minlength=num_images), len(owner),
                                torch.ones(len(owner)), num_images, ks)


def by_construction(chance: dict[str, float]) -> list[str]:
    """The recall keys (``txt_r10``, ...) whose chance level is 100: every ranking scores 100 there."""
    return [k for k, v in chance.items() if "_r" in k and not k.endswith("_mean") and v >= 100.0]


def chance_note(chance: dict[str, float], num_images: int, num_texts: int) -> str:
    """One line naming the recalls whose chance level is 100 (the split has too few candidates for
    K: with 6 images, text->image R@10 is 100 for any ranking), or ``""``."""
    direction = {"txt": "image->text", "img": "text->image"}
    keys = by_construction(chance)
    if not keys:
        return ""
    return ("100 by construction (any ranking scores it: the split has too few candidates for K): "
            + ", ".join(f"{direction[k.split('_r')[0]]} R@{k.split('_r')[1]}" for k in keys)
            + f" ({num_images} images, {num_texts} captions)")


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
