"""``Pipeline.gradcam``: ALBEF's Grad-CAM of the ITM score per word of a text over an image (the maths
in ``models/gradcam.py``), for pre-training and retrieval checkpoints. A mixin of
``tasks.pipeline.Pipeline``, kept apart so that each module stays small."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from datasets.text import pre_caption
from models.gradcam import GradCAMConfig, itm_gradcam, upsample


@dataclass
class GradCAM:
    """The maps of one (image, text) pair, on the patch grid: ``tokens`` and ``token_maps`` (L, gh, gw)
    for every token with [CLS] and [SEP]; ``words`` and ``word_maps`` (W, gh, gw), each word's map the
    mean of its word pieces' maps; ``phrase_map`` (gh, gw), the mean over every token (ALBEF's map of a
    whole phrase for grounding); ``score``, the ITM match probability; ``text``, the cleaned text."""

    text: str
    score: float
    tokens: list[str]
    token_maps: Tensor
    words: list[str]
    word_maps: Tensor
    phrase_map: Tensor

    def at_size(self, maps: Tensor, size: tuple[int, int], mode: str = "bicubic") -> Tensor:
        """``maps`` (any of the above) interpolated to ``size`` = (height, width) of the image."""
        return upsample(maps, size, mode)


class GradCAMMethods:
    """The Grad-CAM method of :class:`tasks.pipeline.Pipeline`."""

    def gradcam(self, image, text: str, gradcam: Optional[GradCAMConfig] = None) -> GradCAM:
        """Grad-CAM of the ITM match score of ``image`` (a PIL image or a path) and ``text`` per word
        (:class:`GradCAM`); ``gradcam`` chooses the fusion layer (default: :class:`GradCAMConfig`)."""
        self._require("gradcam")
        cfg = gradcam or GradCAMConfig()
        cfg.validate()
        clean = pre_caption(text, self.cfg.data.max_words, getattr(self.cfg.data, "clean_style", "albef"))
        enc = self.tokenizer([clean], truncation=True, max_length=self.cfg.tokenizer.max_length, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        model = self.base
        with self._autocast():
            maps, score = itm_gradcam(model, self.images([image]), ids, mask, cfg.layer)
        maps = maps[0].float().cpu()
        tokens = self.tokenizer.convert_ids_to_tokens(ids[0].tolist())
        word_ids = enc.word_ids(0)
        words, word_maps = [], []
        for w in sorted({i for i in word_ids if i is not None}):
            at = [j for j, i in enumerate(word_ids) if i == w]
            words.append(self.tokenizer.convert_tokens_to_string([tokens[j] for j in at]).replace(" ", ""))
            word_maps.append(maps[at].mean(0))
        return GradCAM(clean, float(score[0]), tokens, maps, words,
                       torch.stack(word_maps) if word_maps else maps[:0], maps.mean(0))
