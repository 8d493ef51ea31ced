"""The inference pipeline of a loaded checkpoint (``Pipeline``): the model, its image transform and its
tokenizer, and what the model can do on PIL images or files (``caption``, ``answer``, ``rank``, ``retrieve``,
``nlvr2``, ``encode_image``, ``encode_text``; ``gradcam`` from tasks/pipeline_gradcam.py, ``entail`` from
tasks/snli_ve_eval.py). Users get one from ``inference.load_model_and_preprocess``; ``run_finetune.py
--predict`` builds one over the model the fine-tuning driver loaded (:func:`from_run`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partialmethod
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image

from datasets.formats import ImageLoadError, load_image
from datasets.text import pre_caption, pre_question
from datasets.transforms import build_transform
from engine import distributed as D
from engine.config import ConfigError
from tasks.pipeline_gradcam import GradCAMMethods
from tasks.snli_ve_eval import entail as _entail

ImageLike = Union[str, os.PathLike, Image.Image]
# what each kind of checkpoint can do (the methods of Pipeline)
ABILITIES = {"retrieval": ("rank", "retrieve", "encode_image", "encode_text", "gradcam"),
             "vqa": ("answer", "encode_image", "encode_text"),
             "nlvr2": ("nlvr2", "encode_image", "encode_text"), "snli_ve": ("entail", "encode_image", "encode_text"),
             "caption": ("caption", "encode_image")}


class InferenceError(ConfigError):
    """A request the checkpoint cannot serve (the message names the checkpoint and what it can do)."""


@dataclass
class Pipeline(GradCAMMethods):
    """A loaded checkpoint: ``model`` (eval mode, on ``device``), ``transform`` (PIL image -> tensor),
    ``tokenizer``, and ``cfg`` (the run config the checkpoint was trained with, or the task's
    defaults with the checkpoint's model for a pre-training checkpoint)."""

    task: str
    model: torch.nn.Module
    transform: Any
    tokenizer: Any
    cfg: Any
    device: torch.device
    checkpoint: str
    answer_list: Optional[list[str]] = None
    batch_size: int = 32

    def _require(self, ability: str) -> None:
        if ability not in ABILITIES[self.task]:
            can = ", ".join(ABILITIES[self.task])
            raise InferenceError(f"{self.checkpoint} is a {self.task} checkpoint: it cannot {ability} (it can: {can})")

    def images(self, images: Iterable[ImageLike]) -> torch.Tensor:
        """The model's input tensor ``(N, 3, H, W)`` for PIL images or image files."""
        out = []
        for img in images:
            if not isinstance(img, Image.Image):
                path = os.fspath(img)
                try:
                    img = load_image(path)
                except ImageLoadError as err:
                    raise InferenceError(f"image {path}: {err.reason}") from None
            out.append(self.transform(img.convert("RGB")))
        if not out:
            raise InferenceError("no images given")
        return torch.stack(out).to(self.device)

    def _texts(self, texts: Sequence[str], question: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        data = self.cfg.data
        clean = [pre_question(t, data.max_words) if question
                 else pre_caption(t, data.max_words, getattr(data, "clean_style", "albef")) for t in texts]
        enc = self.tokenizer(clean, padding="longest", truncation=True, max_length=self.cfg.tokenizer.max_length,
                             return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _chunks(self, n: int):
        return [(a, min(a + self.batch_size, n)) for a in range(0, n, self.batch_size)]

    def _autocast(self):
        from tasks.spec import autocast_for
        return autocast_for(self.cfg.train.precision, self.device)()

    @property
    def base(self):
        """The base model (encoders, projections, ITM head) inside the task model."""
        return getattr(self.model, "base", self.model)

    # ------------------------------------------------------------------ embeddings
    @torch.no_grad()
    def encode_image(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """L2-normalised image embeddings ``(N, embed_dim)`` (the contrastive space), on the CPU."""
        self._require("encode_image")
        if self.task == "caption":
            raise InferenceError(f"{self.checkpoint} is a caption checkpoint: its image encoder has no contrastive "
                                 "projection; use a pre-training or retrieval checkpoint for embeddings")
        images = list(images)
        out = []
        for a, b in self._chunks(len(images)):
            with self._autocast():
                out.append(self.base.image_feat(self.base.encode_image(self.images(images[a:b]))).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``(N, embed_dim)``, on the CPU."""
        self._require("encode_text")
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for a, b in self._chunks(len(texts)):
            ids, mask = self._texts(texts[a:b])
            with self._autocast():
                out.append(self.base.text_feat(self.base.encode_text(ids, mask)).float().cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ retrieval
    @torch.no_grad()
    def _itm(self, image_embeds: torch.Tensor, image_index: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """ITM match probabilities of text ``i`` with image ``image_index[i]`` (one key/value projection
        per image)."""
        out = []
        for a, b in self._chunks(len(texts)):
            ids, mask = self._texts(texts[a:b])
            with self._autocast():
                states = self.base.encode_text(ids, mask)
                fused = self.base.fuse(states, mask, image_embeds, image_index=image_index[a:b].to(self.device))
                out.append(F.softmax(self.base.itm_logits(fused).float(), dim=-1)[:, 1].cpu())
        return torch.cat(out)

    @torch.no_grad()
    def rank(self, image: ImageLike, texts: Sequence[str]) -> list[dict]:
        """Each text's ITC cosine and ITM match probability with ``image``, best first (by ITM, the
        re-ranking score of evaluation)."""
        self._require("rank")
        texts = [texts] if isinstance(texts, str) else list(texts)
        with self._autocast():
            embeds = self.base.encode_image(self.images([image]))
        itc = (self.base.image_feat(embeds).float().cpu() @ self.encode_text(texts).T)[0]
        itm = self._itm(embeds, torch.zeros(len(texts), dtype=torch.long), texts)
        rows = [{"text": t, "score": float(s), "itc": float(c)} for t, s, c in zip(texts, itm, itc)]
        return sorted(rows, key=lambda r: -r["score"])

    @torch.no_grad()
    def retrieve(self, texts: Sequence[str], images: Sequence[ImageLike], k: int = 5) -> list[list[dict]]:
        """For each text, the ``k`` best of ``images`` (a gallery): the ITC top ``k`` re-ranked by ITM, as
        evaluation ranks (``{"index", "score", "itc"}``, best first)."""
        self._require("retrieve")
        texts = [texts] if isinstance(texts, str) else list(texts)
        images = list(images)
        k = min(k, len(images))
        embeds, feats = [], []
        for a, b in self._chunks(len(images)):
            with self._autocast():
                e = self.base.encode_image(self.images(images[a:b]))
            embeds.append(e)
            feats.append(self.base.image_feat(e).float().cpu())
        embeds, feats = torch.cat(embeds), torch.cat(feats)
        sims = self.encode_text(texts) @ feats.T
        out = []
        for i, text in enumerate(texts):
            top = sims[i].topk(k).indices
            itm = self._itm(embeds, top, [text] * k)
            order = itm.argsort(descending=True)
            out.append([{"index": int(top[j]), "score": float(itm[j]), "itc": float(sims[i, top[j]])} for j in order])
        return out

    # ------------------------------------------------------------------ task heads
    @torch.no_grad()
    def caption(self, images: Sequence[ImageLike]) -> list[str]:
        """One caption per image (the checkpoint's generation settings: ``cfg.generation``)."""
        self._require("caption")
        from models.decoder import decode_texts
        from tasks.caption_generate import CaptionGenerator
        gen = CaptionGenerator(self.cfg, self.tokenizer, D.DistInfo(device=self.device))
        images, out = list(images), []
        g = self.cfg.generation
        rng = torch.Generator(device=self.device).manual_seed(g.seed) if g.strategy == "nucleus" else None
        for a, b in self._chunks(len(images)):
            with self._autocast():
                ids = self.model.generate(self.images(images[a:b]), gen.prompt_ids.to(self.device), g,
                                          self.tokenizer.sep_token_id, self.tokenizer.pad_token_id, gen.suppress, rng)
            out += decode_texts(self.tokenizer, ids)
        return out

    @torch.no_grad()
    def answer(self, images: Sequence[ImageLike], questions: Sequence[str], open_ended: bool = False) -> list[str]:
        """One answer per (image, question) pair: ranked over the checkpoint's answer list (ALBEF's
        inference), or generated with ``open_ended``."""
        self._require("answer")
        from models.decoder import decode_texts
        from tasks.vqa_eval import VQAPredictor
        images, questions = list(images), [questions] if isinstance(questions, str) else list(questions)
        if len(images) != len(questions):
            raise InferenceError(f"answer(): {len(images)} images but {len(questions)} questions (one per image)")
        if not open_ended and not self.answer_list:
            raise InferenceError(f"{self.checkpoint} holds no answer list to rank: pass open_ended=True or use a "
                                 "checkpoint fine-tuned by this version")
        pred = VQAPredictor(self.cfg, self.tokenizer, self.answer_list or [""], D.DistInfo(device=self.device))
        e, out = self.cfg.eval, []
        for a, b in self._chunks(len(images)):
            ids, mask = self._texts(questions[a:b], question=True)
            with self._autocast():
                fused = self.model.encode(self.images(images[a:b]), ids, mask)
                if open_ended:
                    gen = self.model.generate(fused, mask, self.tokenizer.cls_token_id, self.cfg.generation,
                                              self.tokenizer.sep_token_id, self.tokenizer.pad_token_id, pred.suppress)
                    out += decode_texts(self.tokenizer, gen)
                else:
                    idx, _ = self.model.rank_answers(fused, mask, pred.answer_ids, pred.answer_mask,
                                                     min(e.k_test, len(self.answer_list)), e.rank_chunk)
                    out += [self.answer_list[int(i)] for i in idx[:, 0]]
        return out

    @torch.no_grad()
    def nlvr2(self, lefts: Sequence[ImageLike], rights: Sequence[ImageLike], texts: Sequence[str]) -> list[tuple[str, float]]:
        """``(label, probability of True)`` per (left image, right image, statement)."""
        self._require("nlvr2")
        from datasets.nlvr2_data import int_to_label
        lefts, rights = list(lefts), list(rights)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not len(lefts) == len(rights) == len(texts):
            raise InferenceError(f"nlvr2(): {len(lefts)} left images, {len(rights)} right images and {len(texts)} "
                                 "statements (one of each per example)")
        out = []
        for a, b in self._chunks(len(texts)):
            ids, mask = self._texts(texts[a:b])
            with self._autocast():
                logits = self.model(self.images(lefts[a:b]), self.images(rights[a:b]), ids, mask)
            for p in F.softmax(logits.float(), dim=-1)[:, 1].cpu():
                out.append((int_to_label(int(p >= 0.5)), float(p)))
        return out

    entail = partialmethod(_entail, error=InferenceError)  # SNLI-VE: tasks/snli_ve_eval.py


def from_run(task: str, run, model: torch.nn.Module, checkpoint: str, answer_list: Optional[list[str]] = None) -> Pipeline:
    """A :class:`Pipeline` over a model the fine-tuning driver built (``run_finetune.py --predict``)."""
    model.eval()
    transform = build_transform(run.cfg.model.vision.img_size, False, run.cfg.data.transform)
    return Pipeline(task, model, transform, run.tokenizer, run.cfg, run.dist.device, checkpoint, answer_list,
                    batch_size=run.cfg.eval.batch_size if task == "retrieval" else run.cfg.data.eval_batch_size)


__all__ = ["Pipeline", "InferenceError", "ABILITIES", "from_run"]
