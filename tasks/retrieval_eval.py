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

The building blocks (``itc_candidates``, ``rerank``, ``final_ranks``, ``query_ranks``,
``recall_metrics``) are pure functions on tensors in ``tasks/retrieval_ranking.py``; results are
reported by ``tasks/retrieval_report.py``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Literal, Optional

import torch
from torch import Tensor
from tqdm import tqdm

from datasets.retrieval_data import ImageListDataset, RetrievalEvalData, tokenize_texts
from engine import distributed as D
from engine.config import opt
from engine.loader import SafeDataLoader
from tasks.retrieval_ranking import (RetrievalResult, final_ranks, itc_candidates, itm_match_scores, query_ranks,
                                     recall_metrics, rerank)

log = logging.getLogger("retrieval")

# itm_match_scores is looked up in this module by the evaluator (a benchmark swaps it for another path)
__all__ = ["RetrievalEvalConfig", "RetrievalEvaluator", "itm_match_scores"]


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
