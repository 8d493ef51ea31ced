"""Image-text retrieval evaluation: features once, ITC similarities, ITM re-ranking of the top
``k_test`` candidates, Recall@K.

How a split is evaluated (:class:`RetrievalEvaluator`):

1. Texts: every caption is tokenised once (padded to the longest, truncated to ``max_length``); the
   unimodal text states and features are computed in batches by every process (text encoding is a
   small fraction of the work). The states of all captions are kept when ``cache_text_states``
   (memory: captions x tokens x hidden; COCO 5k: 25k x 30 x 768 x 4 B = 2.3 GB in fp32), otherwise
   they are recomputed for each fusion batch.
2. Images: the split is cut into chunks of ``batch_size`` images in file order. Chunk ``c`` is
   encoded by process ``c mod W``; the features are gathered. Because the chunks do not depend on
   the number of processes, 1 or W processes compute the same numbers.
3. ITC: for every query (an image for image-to-text, a caption for text-to-image) the candidates
   are sorted by cosine similarity in blocks of ``itc_chunk`` queries (memory: block x candidates),
   ties broken by the lower candidate index (a stable sort); the first ``k_test`` are kept, and the
   ITC position of every ground-truth pair is recorded.
4. ITM: the (image, caption) pairs of all top-k lists of both directions are deduplicated and
   grouped by image chunk. Chunk ``c`` is re-ranked by process ``c mod W``: its image tokens are
   computed once (or taken from the cache of step 2 when ``cache_image_tokens``: memory images x
   tokens x width, COCO 5k at 384 px: 5k x 577 x 768 x 4 B = 8.9 GB, so off by default), and the
   fusion encoder scores ``itm_batch_size`` pairs per call (:func:`itm_match_scores`: the
   cross-attention keys/values of each image are projected once per call and read by all its
   pairs, the captions of its own top-k list and the captions whose top-k lists hold it; not once
   per pair). Scores are all-reduced. Without the
   cache every image goes through the ViT twice (features, then re-ranking): cheap next to the
   (images + captions) x k_test fusion passes, and memory stays one chunk of image tokens.
5. Score rule: ``albef`` ranks the re-ranked candidates by the ITM logit of "match" alone (as
   fine-tuned ALBEF); ``blip`` by ITM logit + ITC cosine (as BLIP). The ``k_test`` candidates are
   re-sorted (stable: ties keep their ITC order); every candidate outside them keeps a score below
   all of them, in ITC order.
6. Recall@K (as ALBEF's evaluation): image-to-text counts a hit when any caption of the image is in
   the top K (the best rank over its captions); text-to-image is per caption. ``r_mean`` is the
   mean of the six recalls. ITC-only recalls (no re-ranking) are reported beside them.

The building blocks (:func:`itc_candidates`, :func:`rerank`, :func:`final_ranks`,
:func:`query_ranks`, :func:`recall_metrics`, :func:`ranks_from_score_matrix`) are pure functions on
tensors.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Literal, Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from datasets.retrieval_data import ImageListDataset, RetrievalEvalData, tokenize_texts
from engine import distributed as D
from engine.config import opt
from engine.loader import SafeDataLoader

log = logging.getLogger("retrieval")

SCORE_RULES: dict[str, str] = {
    "albef": "ITM score alone for the re-ranked candidates, as fine-tuned ALBEF",
    "blip": "ITM score + ITC cosine for the re-ranked candidates, as BLIP",
}


@dataclass
class RetrievalEvalConfig:
    k_test: int = opt(128, "ITC candidates of each query re-ranked by ITM (ALBEF: 128 Flickr30K, 256 COCO)")
    score_rule: Literal["albef", "blip"] = opt("albef", "re-ranking score: albef = ITM alone; blip = ITM + ITC cosine")
    batch_size: int = opt(64, "images or captions per encoder batch; also the images per re-ranking chunk")
    itm_batch_size: int = opt(256, "image-caption pairs per fusion (ITM) call")
    itc_chunk: int = opt(1024, "queries per block of the ITC similarity sort (bounds its memory)")
    cache_image_tokens: bool = opt(False, "keep the ViT tokens of all images between the feature and re-ranking passes (memory: images x tokens x width; off = recompute per chunk)")
    cache_text_states: bool = opt(True, "keep the text-encoder states of all captions (memory: captions x tokens x hidden; off = recompute per fusion batch)")
    recall_ks: list[int] = opt([1, 5, 10], "K of the reported Recall@K (both directions)")
    progress: bool = opt(True, "tqdm progress bars with ETA on the main process")
    save_ranked: bool = opt(True, "write the ranked top-k_test candidates of every query (test split)")
    save_scores: bool = opt(False, "also write the re-ranking scores beside the ranked candidates")

    def validate(self) -> None:
        for name in ("k_test", "batch_size", "itm_batch_size", "itc_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1; got {getattr(self, name)}")
        if not self.recall_ks or min(self.recall_ks) < 1:
            raise ValueError(f"eval.recall_ks must be positive integers; got {self.recall_ks}")


# ---------------------------------------------------------------------------------------- pure parts
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


# ---------------------------------------------------------------------------------------- evaluator
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RetrievalEvaluator:
    """Evaluates a :class:`~models.vlp.VLPModel` on one split (see the module docstring). Every
    process of a run must call :meth:`run` (it gathers and reduces across processes)."""

    def __init__(self, data: RetrievalEvalData, tokenizer, cfg: RetrievalEvalConfig, transform: Callable,
                 max_length: int, device: torch.device, num_workers: int = 0,
                 autocast: Optional[Callable[[], ContextManager]] = None, name: str = "test") -> None:
        self.data, self.cfg, self.transform, self.device = data, cfg, transform, device
        self.num_workers, self.name = num_workers, name
        self.autocast = autocast or contextlib.nullcontext
        self.input_ids, self.attention_mask = tokenize_texts(tokenizer, data.texts, max_length)
        self.dataset = ImageListDataset(data.image_files, transform, data.source)
        b = cfg.batch_size
        self.chunks = [(a, min(a + b, data.num_images)) for a in range(0, data.num_images, b)]

    # ------------------------------------------------------------------ helpers
    def _bar(self, total: int, desc: str, unit: str):
        return tqdm(total=total, desc=f"{desc} [{self.name}]", unit=unit, dynamic_ncols=True, smoothing=0.05,
                    disable=not (self.cfg.progress and D.is_main()))

    def _my_chunks(self) -> list[int]:
        return [c for c in range(len(self.chunks)) if c % D.world_size() == D.rank()]

    def _image_batches(self, chunks: list[int]):
        """(chunk id, images on device) for each of ``chunks``, loaded in parallel."""
        if not chunks:
            return
        loader = SafeDataLoader(self.dataset, batch_sampler=[list(range(*self.chunks[c])) for c in chunks],
                                collate_fn=ImageListDataset.collate, num_workers=self.num_workers,
                                pin_memory=self.device.type == "cuda")
        for c, (_, images) in zip(chunks, loader):
            yield c, images.to(self.device, non_blocking=True)

    def _text_pass(self, model) -> tuple[Tensor, Optional[Tensor]]:
        n, b = self.data.num_texts, self.cfg.batch_size
        feats, states = [], []
        bar = self._bar(n, "text features", "caption")
        for a in range(0, n, b):
            ids = self.input_ids[a:a + b].to(self.device)
            mask = self.attention_mask[a:a + b].to(self.device)
            with self.autocast():
                s = model.encode_text(ids, mask)
                feats.append(model.text_feat(s).float())
            if self.cfg.cache_text_states:
                states.append(s)
            bar.update(ids.shape[0])
        bar.close()
        return torch.cat(feats), (torch.cat(states) if states else None)

    def _image_pass(self, model) -> tuple[Tensor, dict[int, Tensor]]:
        mine = self._my_chunks()
        local: dict[int, Tensor] = {}
        cache: dict[int, Tensor] = {}
        bar = self._bar(sum(self.chunks[c][1] - self.chunks[c][0] for c in mine), "image features", "image")
        for c, images in self._image_batches(mine):
            with self.autocast():
                tokens = model.encode_image(images)
                local[c] = model.image_feat(tokens).float().cpu()
            if self.cfg.cache_image_tokens:
                cache[c] = tokens
            bar.update(images.shape[0])
        bar.close()
        merged: dict[int, Tensor] = {}
        for part in D.all_gather_object(local):
            merged.update(part)
        feats = torch.cat([merged[c] for c in range(len(self.chunks))]).to(self.device)
        return feats, cache

    def _chunk_tokens(self, model, chunks: list[int], cache: dict[int, Tensor]):
        """(chunk id, image tokens) for each of ``chunks``: from the cache, or recomputed."""
        if self.cfg.cache_image_tokens:
            yield from ((c, cache[c]) for c in chunks)
            return
        for c, images in self._image_batches(chunks):
            with self.autocast():
                tokens = model.encode_image(images)
            yield c, tokens

    def _itm_pass(self, model, u_img: Tensor, u_txt: Tensor, text_states: Optional[Tensor],
                  token_cache: dict[int, Tensor]) -> Tensor:
        """ITM logit of "match" for every unique pair (sorted by image); chunks split over processes."""
        cfg = self.cfg
        n_chunks = len(self.chunks)
        bounds = torch.searchsorted(u_img // cfg.batch_size, torch.arange(n_chunks + 1)).tolist()
        mine = self._my_chunks()
        scores = torch.zeros(u_img.shape[0], dtype=torch.float32, device=self.device)
        bar = self._bar(sum(bounds[c + 1] - bounds[c] for c in mine), "ITM re-ranking", "pair")
        ids_all, mask_all = self.input_ids.to(self.device), self.attention_mask.to(self.device)
        for c, tokens in self._chunk_tokens(model, mine, token_cache):
            start = self.chunks[c][0]
            for a in range(bounds[c], bounds[c + 1], cfg.itm_batch_size):
                b = min(a + cfg.itm_batch_size, bounds[c + 1])
                img = (u_img[a:b] - start).to(self.device)
                txt = u_txt[a:b].to(self.device)
                mask = mask_all[txt]
                with self.autocast():
                    states = text_states[txt] if text_states is not None else model.encode_text(ids_all[txt], mask)
                    scores[a:b] = itm_match_scores(model, states, mask, tokens, img)
                bar.update(b - a)
        bar.close()
        return D.all_reduce_sum(scores)

    # ------------------------------------------------------------------ run
    @torch.no_grad()
    def run(self, model) -> RetrievalResult:
        """Evaluate ``model`` (put in eval mode for the duration) on the split."""
        cfg, data, dev = self.cfg, self.data, self.device
        was_training = model.training
        model.eval()
        try:
            t0 = time.perf_counter()
            txt_feat, text_states = self._text_pass(model)
            img_feat, token_cache = self._image_pass(model)
            _sync(dev)
            t1 = time.perf_counter()

            n_i, n_t = data.num_images, data.num_texts
            txt2img = torch.tensor(data.txt2img, dtype=torch.long, device=dev)
            ar_t = torch.arange(n_t, device=dev)
            k1, k2 = min(cfg.k_test, n_t), min(cfg.k_test, n_i)
            i2t_sim, i2t_idx, i2t_itc = itc_candidates(img_feat, txt_feat, k1, txt2img, ar_t, cfg.itc_chunk)
            t2i_sim, t2i_idx, t2i_itc = itc_candidates(txt_feat, img_feat, k2, ar_t, txt2img, cfg.itc_chunk)
            _sync(dev)
            t2 = time.perf_counter()

            pair_img = torch.cat([torch.arange(n_i, device=dev).repeat_interleave(k1), t2i_idx.flatten()])
            pair_txt = torch.cat([i2t_idx.flatten(), ar_t.repeat_interleave(k2)])
            uniq, inverse = torch.unique(pair_img * n_t + pair_txt, sorted=True, return_inverse=True)
            u_img, u_txt = (uniq // n_t).cpu(), (uniq % n_t).cpu()
            if D.is_main():
                log.info("%s: %d images, %d captions, k_test %d: %d ITM pairs (%d unique) on %d process(es)",
                         self.name, n_i, n_t, cfg.k_test, pair_img.numel(), uniq.numel(), D.world_size())
            scores = self._itm_pass(model, u_img, u_txt, text_states, token_cache)
            _sync(dev)
            t3 = time.perf_counter()

            i2t_itm = scores[inverse[:n_i * k1]].view(n_i, k1)
            t2i_itm = scores[inverse[n_i * k1:]].view(n_t, k2)
            i2t_ranked, i2t_score = rerank(i2t_idx, i2t_sim, i2t_itm, cfg.score_rule)
            t2i_ranked, t2i_score = rerank(t2i_idx, t2i_sim, t2i_itm, cfg.score_rule)
            i2t_rank = query_ranks(final_ranks(i2t_ranked, txt2img, ar_t, i2t_itc), txt2img, n_i)
            t2i_rank = final_ranks(t2i_ranked, ar_t, txt2img, t2i_itc)
            ks = cfg.recall_ks
            metrics = recall_metrics(i2t_rank.cpu(), t2i_rank.cpu(), ks)
            itc_metrics = recall_metrics(query_ranks(i2t_itc, txt2img, n_i).cpu(), t2i_itc.cpu(), ks)
            t4 = time.perf_counter()
        finally:
            model.train(was_training)
        timings = {"features": t1 - t0, "itc": t2 - t1, "itm": t3 - t2, "total": t4 - t0}
        return RetrievalResult(metrics, itc_metrics, i2t_ranked.cpu(), t2i_ranked.cpu(), i2t_score.cpu(),
                               t2i_score.cpu(), cfg.score_rule, cfg.k_test, timings, int(uniq.numel()))


# ---------------------------------------------------------------------------------------- reporting
def format_table(result: RetrievalResult, title: str) -> str:
    """A plain-text table of the recalls (re-ranked and ITC only), with the score rule."""
    ks = sorted({int(k[len("txt_r"):]) for k in result.metrics if k.startswith("txt_r") and k[5:].isdigit()})
    head = f"{'':22s}" + "".join(f"{'R@' + str(k):>8s}" for k in ks) + f"{'mean':>8s}"
    lines = [title, f"score rule: {result.score_rule} ({SCORE_RULES[result.score_rule]}), k_test {result.k_test}", head]
    for label, m in (("", result.metrics), ("ITC only, ", result.itc_metrics)):
        for name, prefix in (("image->text", "txt"), ("text->image", "img")):
            row = f"{label}{name}"
            lines.append(f"{row:22s}" + "".join(f"{m[f'{prefix}_r{k}']:8.2f}" for k in ks) + f"{m[f'{prefix}_r_mean']:8.2f}")
    lines.append(f"r_mean {result.metrics['r_mean']:.2f} (ITC only {result.itc_metrics['r_mean']:.2f}); "
                 f"evaluation {result.timings.get('total', 0.0):.1f} s")
    return "\n".join(lines)


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


__all__ = ["SCORE_RULES", "RetrievalEvalConfig", "RetrievalEvaluator", "RetrievalResult", "stable_order",
           "itc_candidates", "combine_scores", "rerank", "itm_match_scores", "final_ranks", "query_ranks",
           "recall_metrics", "ranks_from_score_matrix", "format_table", "ranked_json", "memory_estimate"]
