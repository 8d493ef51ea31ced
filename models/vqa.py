"""Generative VQA (ALBEF): the fusion encoder reads image + question, an answer decoder generates
or scores answers by cross-attending to the fusion output.

* :class:`VQAModel` holds a :class:`~models.vlp.VLPModel` (``self.base``) and reuses
  its ViT, text layers and fusion layers as they are: ``encode(image, question)`` =
  ``base.fuse(base.encode_text(question), base.encode_image(image))``. Base parts that VQA does not
  use (contrastive projections, temperature, ITM head, MLM transform and bias) stay in the state dict
  under their pre-training names but are frozen, so DDP needs no ``find_unused_parameters``.
* ``self.decoder`` is the shared :class:`~models.decoder.TextDecoder`, reading the fusion states
  (width = text hidden size); ALBEF initialises it from the fusion layers (``decoder.init_from:
  fusion``): decoder layer ``i`` = fusion layer ``i`` (self-attention made causal, cross-attention,
  FFN), embeddings and LM head from the base's embeddings and MLM head.
* Training (:meth:`VQAModel.forward`): ALBEF's answer-weighted LM loss: for every question, each
  unique annotator answer ``[CLS] answer [SEP]`` is a target whose summed token loss is weighted
  by the answer's share of the annotators; the loss is the weighted sum divided by the number of
  questions.
* Inference, closed set (:meth:`VQAModel.rank_answers`, ALBEF's ``rank_answer``): the decoder's
  first-token distribution after ``[CLS]`` pre-selects the ``k`` candidates of the answer list
  whose first token is most probable; those are re-ranked by their full likelihood
  ``log P(answer tokens + [SEP] | question, image)``. (ALBEF adds the first-token log-probability
  a second time to that likelihood; here each token counts once, so the ranking is the answers'
  likelihood order.) Open generation: :meth:`VQAModel.generate` (beam search from ``[CLS]``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.decoder import DecoderConfig, GenerationConfig, Generated, TextDecoder, init_decoder_from_base
from models.param_groups import param_groups
from models.vlp import VLPConfig, VLPModel
from models.loading import LoadReport

__all__ = ["VQAModel", "UNUSED_BASE_PREFIXES", "VOCAB_KEY_SUFFIXES", "pad_vocab_rows"]

UNUSED_BASE_PREFIXES = ("vision_proj.", "text_proj.", "temp", "itm_head.", "mlm_head.transform.", "mlm_head.bias")
# state-dict tensors whose first dimension is the vocabulary (extended by pad_vocab_rows)
VOCAB_KEY_SUFFIXES = ("word_embeddings.weight", "mlm_head.decoder.weight", "mlm_head.bias", "lm_head.decoder.weight",
                      "lm_head.bias")


class VQAModel(nn.Module):
    """Base model (ViT + text + fusion) + answer decoder; see the module docstring."""

    def __init__(self, cfg: VLPConfig, decoder_cfg: DecoderConfig) -> None:
        super().__init__()
        self.decoder_cfg = decoder_cfg
        self.base = VLPModel(cfg)
        self.cfg = self.base.cfg
        n_layers = decoder_cfg.num_layers or self.cfg.text.num_fusion_layers
        if n_layers < 1:
            raise ValueError("the answer decoder needs at least one layer: set decoder.num_layers")
        self.decoder = TextDecoder(self.cfg.text, n_layers, encoder_width=self.cfg.text.hidden_size)
        for name, p in self.base.named_parameters():
            if name.startswith(UNUSED_BASE_PREFIXES):
                p.requires_grad_(False)

    def init_decoder_from_base(self) -> LoadReport:
        """Initialise the decoder from the (loaded) base model (``decoder_cfg.init_from``)."""
        return init_decoder_from_base(self.decoder, self.base.text, self.base.mlm_head, self.decoder_cfg.init_from)

    # ------------------------------------------------------------------ encoding
    def encode(self, image: Tensor, question_ids: Tensor, question_mask: Tensor) -> Tensor:
        """Fusion states ``(B, L, H)`` of the question attending to the image."""
        image_embeds = self.base.encode_image(image)
        text = self.base.encode_text(question_ids, question_mask)
        return self.base.fuse(text, question_mask, image_embeds)

    # ------------------------------------------------------------------ training
    def forward(self, image: Tensor, question_ids: Tensor, question_mask: Tensor, answer_ids: Tensor,
                answer_mask: Tensor, weights: Tensor, n_answers: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """ALBEF's loss: ``sum_q sum_a w_qa * loss(answer a | q) / B`` (per-answer summed token loss).

        ``answer_ids``/``answer_mask`` hold the ``sum(n_answers)`` answers (``[CLS] answer [SEP]``) of
        the B questions in order; ``weights`` their weights; ``n_answers`` (B,) answers per question."""
        fused = self.encode(image, question_ids, question_mask)
        states = fused.repeat_interleave(n_answers, dim=0)
        masks = question_mask.repeat_interleave(n_answers, dim=0)
        labels = answer_ids.masked_fill(answer_mask == 0, -100)
        per_answer = self.decoder.lm_loss(answer_ids, answer_mask, states, masks, labels, label_smoothing, "sequence")
        return (weights.to(per_answer.dtype) * per_answer).sum() / image.shape[0]

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def rank_answers(self, fused: Tensor, question_mask: Tensor, answer_ids: Tensor, answer_mask: Tensor,
                     k: int, chunk: int = 2048) -> tuple[Tensor, Tensor]:
        """Rank a closed answer list for each question (ALBEF's two stages, see the module docstring).

        Args:
            fused: (B, L, H) fusion states; question_mask: (B, L).
            answer_ids, answer_mask: (A, La) the tokenised answer list (``[CLS] answer [SEP]``, padded).
            k: candidates kept after the first-token stage (clamped to A).
            chunk: candidate sequences scored per decoder pass (bounds the memory of the LM logits).

        Returns:
            ``(indices, log_likelihoods)``, both (B, k): answer-list indices sorted by decreasing full
            log-likelihood, and those log-likelihoods.
        """
        B, A = fused.shape[0], answer_ids.shape[0]
        k = min(k, A)
        start = answer_ids[:1, :1].expand(B, 1)  # [CLS]
        first_logp = F.log_softmax(self.decoder(start, None, fused, question_mask)[:, 0].float(), dim=-1)
        first = first_logp.index_select(1, answer_ids[:, 1])  # (B, A): log P(first answer token)
        _, top = first.topk(k, dim=1)
        ids = answer_ids[top].view(B * k, -1)
        mask = answer_mask[top].view(B * k, -1)
        states, smask = fused.repeat_interleave(k, dim=0), question_mask.repeat_interleave(k, dim=0)
        ll = torch.cat([self.decoder.sequence_log_prob(ids[i:i + chunk], mask[i:i + chunk], states[i:i + chunk],
                                                       smask[i:i + chunk]) for i in range(0, B * k, chunk)]).view(B, k)
        ll, order = ll.sort(dim=1, descending=True)
        return top.gather(1, order), ll

    @torch.no_grad()
    def generate(self, fused: Tensor, question_mask: Tensor, start_id: int, gen: GenerationConfig,
                 eos_token_id: int, pad_token_id: int, suppress_ids: Sequence[int] = ()) -> Generated:
        """Open-ended answers generated from ``[CLS]`` (beam search / nucleus sampling)."""
        prompt = torch.tensor([start_id], dtype=torch.long, device=fused.device)
        return self.decoder.generate(fused, question_mask, prompt, gen, eos_token_id, pad_token_id, suppress_ids)

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, lr: float, lr_vision: float, weight_decay: float) -> list[dict]:
        """The base model's AdamW groups (frozen parts left out) plus the decoder at ``lr`` (no decay
        on its biases and LayerNorms; ``models/param_groups.py``)."""
        return param_groups(self, lr, lr_vision, weight_decay, base="base.", head="decoder")


@torch.no_grad()
def pad_vocab_rows(state: dict, vocab_size: int, std: float = 0.02, seed: int = 0) -> list[str]:
    """Extend the vocabulary-sized tensors of ``state`` (in place) to ``vocab_size`` rows: new
    embedding/output rows ~ N(0, std) (BERT's initialisation; seeded), new biases 0. Tied tensors that
    share storage stay shared. Returns the keys that were extended."""
    gen = torch.Generator().manual_seed(seed)
    done: dict[int, Tensor] = {}
    changed = []
    for key in sorted(state):
        t = state[key]
        if not key.endswith(VOCAB_KEY_SUFFIXES) or not torch.is_tensor(t) or t.shape[0] >= vocab_size:
            continue
        ptr = t.data_ptr()
        if ptr not in done:
            extra = vocab_size - t.shape[0]
            if t.dim() == 1:
                new = torch.zeros(extra, dtype=t.dtype)
            else:
                new = (torch.randn((extra, *t.shape[1:]), generator=gen) * std).to(t.dtype)
            done[ptr] = torch.cat([t, new.to(t.device)])
        state[key] = done[ptr]
        changed.append(key)
    return changed
