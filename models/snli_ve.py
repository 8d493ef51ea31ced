"""Visual entailment (SNLI-VE) head: does the image entail, leave open, or contradict the sentence?

As ALBEF's ``model_ve``: the base model's fusion encoder reads the image and the sentence, and a
classifier MLP on the fused [CLS] state, ``Linear(H, H') - ReLU - Linear(H', 3)`` with ``H' = H`` by
default (``classifier_hidden``), gives three logits in ALBEF's class order (contradiction 0,
neutral 1, entailment 2; ``datasets.snli_ve_data.LABELS``).

Base parts SNLI-VE does not use (contrastive projections, temperature, ITM head, MLM transform and
bias) stay in the state dict under their pre-training names but are frozen, so DDP needs no
``find_unused_parameters``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn
from torch import Tensor

from engine.config import opt
from models.param_groups import param_groups
from models.text import TextTransformer
from models.vlp import VLPConfig, VLPModel
from models.vqa import UNUSED_BASE_PREFIXES

__all__ = ["NUM_CLASSES", "VEHeadConfig", "VEModel"]

NUM_CLASSES = 3


@dataclass
class VEHeadConfig:
    classifier_hidden: int = opt(0, "hidden width of the 3-way classifier MLP (0 = the text hidden size, as ALBEF)")

    def validate(self) -> None:
        if self.classifier_hidden < 0:
            raise ValueError(f"head.classifier_hidden must be >= 0; got {self.classifier_hidden}")


class VEModel(nn.Module):
    """The base model and a 3-way classifier on the fused [CLS] (see the module docstring).
    ``forward(image, input_ids, attention_mask)`` returns ``(B, 3)`` logits."""

    def __init__(self, cfg: VLPConfig, head: Optional[VEHeadConfig] = None) -> None:
        super().__init__()
        self.head_cfg = head or VEHeadConfig()
        self.base = VLPModel(cfg)
        self.cfg = self.base.cfg
        if self.cfg.text.num_fusion_layers < 1:
            raise ValueError("SNLI-VE needs at least one fusion layer (model.text.num_fusion_layers >= 1)")
        hidden = self.cfg.text.hidden_size
        inner = self.head_cfg.classifier_hidden or hidden
        self.cls_head = nn.Sequential(nn.Linear(hidden, inner), nn.ReLU(), nn.Linear(inner, NUM_CLASSES))
        self.cls_head.apply(TextTransformer._init_weights)
        for name, p in self.base.named_parameters():
            if name.startswith(UNUSED_BASE_PREFIXES):
                p.requires_grad_(False)

    def fused_cls(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The fused [CLS] state ``(B, H)`` that the classifier reads."""
        if image.shape[0] != input_ids.shape[0]:
            raise ValueError(f"batch sizes differ: images {image.shape[0]}, texts {input_ids.shape[0]}")
        text = self.base.encode_text(input_ids, attention_mask)
        return self.base.fuse(text, attention_mask, self.base.encode_image(image))[:, 0]

    def forward(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(B, 3)`` logits in ALBEF's class order (contradiction, neutral, entailment)."""
        return self.cls_head(self.fused_cls(image, input_ids, attention_mask))

    def param_groups(self, lr: float, lr_vision: float, weight_decay: float) -> list[dict]:
        """The base model's AdamW groups (ViT at ``lr_vision``, the rest at ``lr``; frozen parts left
        out) plus the classifier at ``lr`` (``models/param_groups.py``)."""
        return param_groups(self, lr, lr_vision, weight_decay, base="base.", head="ve")
