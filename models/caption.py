"""Image captioning model: the base model's image encoder + the shared text decoder.

:class:`CaptionModel` holds the ViT of a :class:`~models.vlp.VLPModel` (``self.visual``: the very
module, so pre-trained weights and key names carry over) and a
:class:`~models.decoder.TextDecoder` that cross-attends to all image tokens. It is built from a
base model with :meth:`CaptionModel.from_base` (the decoder is initialised from the base's text
weights, see ``models/decoder.py``), or empty with ``CaptionModel(cfg, decoder_cfg)`` to load a
fine-tuned caption checkpoint (keys ``visual.*``, ``decoder.*``). The base model's text encoder,
projections and ITM head are not part of it (captioning does not use them).

Training: teacher-forced LM loss on ``[CLS] prompt caption [SEP]`` with label smoothing; the
prompt is excluded from the loss (labels -100). Generation: beam search or nucleus sampling from
``[CLS] prompt`` (``models/decoder.py``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from models.decoder import DecoderConfig, GenerationConfig, Generated, TextDecoder, init_decoder_from_base
from models.param_groups import param_groups
from models.vision import build_vit, vit_tokens
from models.vlp import VLPConfig, VLPModel
from models.loading import LoadReport

__all__ = ["CaptionModel"]


class CaptionModel(nn.Module):
    """ViT image encoder + causal text decoder (cross-attention to the image tokens)."""

    def __init__(self, cfg: VLPConfig, decoder_cfg: DecoderConfig, visual: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.cfg, self.decoder_cfg = cfg, decoder_cfg
        self.visual = visual if visual is not None else build_vit(cfg.vision)
        n_layers = decoder_cfg.num_layers or cfg.text.num_fusion_layers
        if n_layers < 1:
            raise ValueError("the caption decoder needs at least one layer: set decoder.num_layers "
                             "(the base model has no fusion layers)")
        self.decoder = TextDecoder(cfg.text, n_layers, encoder_width=cfg.vision.width)

    @classmethod
    def from_base(cls, base: VLPModel, decoder_cfg: DecoderConfig) -> tuple["CaptionModel", LoadReport]:
        """A caption model that takes over ``base.visual`` and initialises its decoder from the
        base's text embeddings, layers and MLM head (``decoder_cfg.init_from``)."""
        model = cls(base.cfg, decoder_cfg, visual=base.visual)
        report = init_decoder_from_base(model.decoder, base.text, base.mlm_head, decoder_cfg.init_from)
        return model, report

    def encode_image(self, image: Tensor) -> Tensor:
        """Image tokens ``(B, 1 + N, width)`` (as ``VLPModel.encode_image``)."""
        return vit_tokens(self.visual, image)

    def forward(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                label_smoothing: float = 0.0) -> Tensor:
        """Mean LM loss over the labelled tokens (labels -100 are ignored: prompt and padding)."""
        image_embeds = self.encode_image(image)
        return self.decoder.lm_loss(input_ids, attention_mask, image_embeds, None, labels, label_smoothing, "mean")

    @torch.no_grad()
    def generate(self, image: Tensor, prompt_ids: Tensor, gen: GenerationConfig, eos_token_id: int,
                 pad_token_id: int, suppress_ids: Sequence[int] = (),
                 generator: Optional[torch.Generator] = None) -> Generated:
        """Captions for a batch of images; ``prompt_ids`` = ``[CLS]`` + the prompt's tokens."""
        return self.decoder.generate(self.encode_image(image), None, prompt_ids, gen, eos_token_id, pad_token_id,
                                     suppress_ids, generator)

    def param_groups(self, lr: float, lr_vision: float, weight_decay: float) -> list[dict]:
        """AdamW groups: the ViT at ``lr_vision``, the decoder at ``lr``; no weight decay on biases,
        norms, position embeddings and the class token (``models/param_groups.py``)."""
        return param_groups(self, lr, lr_vision, weight_decay)
