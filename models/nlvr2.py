"""NLVR2 head: one sentence, two images, a True/False answer.

Design (a "twin cross-attention" fusion encoder, as BLIP does for NLVR2):

* :class:`NLVR2Model` holds a :class:`~models.vlp.VLPModel` (``self.base``) and reuses its ViT, its text
  layers and its fusion layers as they are.
* Both images go through the same ViT (one batched pass). In every fusion layer the text runs
  the layer's own self-attention (``TransformerLayer.self_attend``), then attends to the **left**
  image through the layer's pre-trained ``crossattention`` and to the **right** image through a
  second cross-attention module of the same shape (``cross_right[i]``); the two results are
  merged, and the merged states go through the layer's own FFN (``TransformerLayer.feed_forward``).
  ``cross_right[i]`` is a copy of the pre-trained cross-attention: :meth:`NLVR2Model.init_right_from_left`
  copies it after a pre-training checkpoint is loaded.
* Merge (``NLVR2HeadConfig.merge``): ``mean`` averages the two results (no parameters); ``linear``
  is a learned ``Linear(2H, H)`` per layer initialised to exactly that average, so it starts where
  ``mean`` starts and can learn to weigh or mix the two images.
* A classifier MLP (``Linear(H, H') - ReLU - Linear(H', 2)``, as ALBEF's ``cls_head``) reads the
  fused [CLS] state; logit 1 = "True".

Why not ALBEF's layout: ALBEF turns each of the 6 fusion layers into two consecutive blocks (18
BERT layers in all), the first attending to one image and the second to the other, with shared
key/value projections, and adds a text-assignment pre-training stage to teach that layout. The twin
design keeps the pre-trained fusion layers (and their parameter names) untouched, adds only one
cross-attention per layer, needs no extra pre-training stage, and with equal images and the
initial merge it computes exactly the pre-trained fusion (a test checks this).

With both cross-attentions equal and the ``mean`` (or initial ``linear``) merge the model is
symmetric in the two images at initialisation; the training signal ("the left image ...")
differs for the two modules and breaks the symmetry.

Parts of the base model that NLVR2 does not use (the contrastive projections, temperature, ITM head
and the MLM head's transform) stay in the state dict, so that pre-training keys keep their names,
but are frozen (``requires_grad=False``), so DDP needs no ``find_unused_parameters``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from engine.config import opt
from models.param_groups import param_groups
from models.text import TextTransformer, TransformerLayer, attention_mask_4d
from models.vlp import VLPConfig, VLPModel

__all__ = ["NLVR2HeadConfig", "PairMerge", "NLVR2Model", "UNUSED_BASE_PREFIXES"]

# Base-model parts that NLVR2 does not use (frozen; kept for the key names).
UNUSED_BASE_PREFIXES = ("vision_proj.", "text_proj.", "temp", "itm_head.", "mlm_head.transform.", "mlm_head.bias")


@dataclass
class NLVR2HeadConfig:
    merge: Literal["mean", "linear"] = opt("mean", "how each fusion layer merges its left- and right-image cross-attention results: mean (average) or linear (learned Linear(2H, H) initialised to the average)")
    classifier_hidden: int = opt(0, "hidden width of the True/False classifier MLP (0 = the text hidden size, as ALBEF)")

    def validate(self) -> None:
        if self.classifier_hidden < 0:
            raise ValueError(f"head.classifier_hidden must be >= 0; got {self.classifier_hidden}")


class PairMerge(nn.Module):
    """Learned merge of the left- and right-image results: ``Linear([a; b])``, initialised to the
    average ``(a + b) / 2`` (weight ``[I/2, I/2]``, zero bias)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * hidden, hidden)
        with torch.no_grad():
            eye = torch.eye(hidden) * 0.5
            self.proj.weight.copy_(torch.cat([eye, eye], dim=1))
            self.proj.bias.zero_()

    def forward(self, left: Tensor, right: Tensor) -> Tensor:
        return self.proj(torch.cat([left, right], dim=-1))


class NLVR2Model(nn.Module):
    """The base model with twin cross-attention in its fusion layers and a True/False classifier
    (see the module docstring). ``forward(image_left, image_right, input_ids, attention_mask)``
    returns ``(B, 2)`` logits."""

    def __init__(self, cfg: VLPConfig, head: Optional[NLVR2HeadConfig] = None) -> None:
        super().__init__()
        self.head_cfg = head or NLVR2HeadConfig()
        self.base = VLPModel(cfg)
        self.cfg = self.base.cfg
        hidden = self.cfg.text.hidden_size
        layers = self.fusion_layers()
        if not layers:
            raise ValueError("NLVR2 needs at least one fusion layer (model.text.num_fusion_layers >= 1)")
        self.cross_right = nn.ModuleList(copy.deepcopy(layer.crossattention) for layer in layers)
        self.merge = nn.ModuleList(PairMerge(hidden) for _ in layers) if self.head_cfg.merge == "linear" else None
        inner = self.head_cfg.classifier_hidden or hidden
        self.cls_head = nn.Sequential(nn.Linear(hidden, inner), nn.ReLU(), nn.Linear(inner, 2))
        self.cls_head.apply(TextTransformer._init_weights)
        for name, p in self.base.named_parameters():
            if name.startswith(UNUSED_BASE_PREFIXES):
                p.requires_grad_(False)

    # ------------------------------------------------------------------ structure
    def fusion_layers(self) -> list[TransformerLayer]:
        """The base model's fusion layers (those with cross-attention), in order."""
        n = self.cfg.text.num_text_layers
        return list(self.base.text.encoder.layer[n:n + self.cfg.text.num_fusion_layers])

    @torch.no_grad()
    def init_right_from_left(self) -> None:
        """Copy each fusion layer's (pre-trained) cross-attention into its right-image twin."""
        for layer, right in zip(self.fusion_layers(), self.cross_right):
            right.load_state_dict(layer.crossattention.state_dict())

    # ------------------------------------------------------------------ forward
    def _fusion_layer(self, i: int, hidden: Tensor, attention_mask: Optional[Tensor], left: Tensor,
                      right: Tensor, left_mask: Optional[Tensor], right_mask: Optional[Tensor]) -> Tensor:
        layer = self.fusion_layers()[i]
        x = layer.self_attend(hidden, attention_mask, causal=False)
        a = layer.crossattention(x, left, left_mask)
        b = self.cross_right[i](x, right, right_mask)
        x = (a + b) * 0.5 if self.merge is None else self.merge[i](a, b)
        return layer.feed_forward(x)

    def fuse_pair(self, text_embeds: Tensor, attention_mask: Optional[Tensor], left_embeds: Tensor,
                  right_embeds: Tensor, left_atts: Optional[Tensor] = None,
                  right_atts: Optional[Tensor] = None) -> Tensor:
        """Fusion states ``(B, L, H)``: the text attends to the left image tokens ``(B, N, W)``
        through the pre-trained cross-attention and to the right ones through its twin."""
        q = text_embeds.shape[1]
        left_mask = attention_mask_4d(left_atts, q, False)
        right_mask = attention_mask_4d(right_atts, q, False)
        hidden = text_embeds
        use_ckpt = self.cfg.text.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i in range(len(self.cross_right)):
            args = (i, hidden, attention_mask, left_embeds, right_embeds, left_mask, right_mask)
            hidden = checkpoint(self._fusion_layer, *args, use_reentrant=False) if use_ckpt else self._fusion_layer(*args)
        return hidden

    def fused_cls(self, image_left: Tensor, image_right: Tensor, input_ids: Tensor,
                  attention_mask: Tensor) -> Tensor:
        """The fused [CLS] state ``(B, H)`` that the classifier reads."""
        b = image_left.shape[0]
        if image_right.shape[0] != b or input_ids.shape[0] != b:
            raise ValueError(f"batch sizes differ: left {b}, right {image_right.shape[0]}, text {input_ids.shape[0]}")
        image_embeds = self.base.encode_image(torch.cat([image_left, image_right]))
        left, right = image_embeds[:b], image_embeds[b:]
        text = self.base.encode_text(input_ids, attention_mask)
        return self.fuse_pair(text, attention_mask, left, right)[:, 0]

    def forward(self, image_left: Tensor, image_right: Tensor, input_ids: Tensor,
                attention_mask: Tensor) -> Tensor:
        """``(B, 2)`` logits; index 1 is "True" (see ``datasets.nlvr2_data.LABELS``)."""
        return self.cls_head(self.fused_cls(image_left, image_right, input_ids, attention_mask))

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, lr: float, lr_vision: float, weight_decay: float) -> list[dict]:
        """The base model's AdamW groups (ViT at ``lr_vision``, the rest at ``lr``; frozen parts
        left out) plus the NLVR2 parts (twin cross-attention, merge, classifier) at ``lr``
        (``models/param_groups.py``)."""
        return param_groups(self, lr, lr_vision, weight_decay, base="base.", head="nlvr2")
