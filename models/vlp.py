"""The base vision-language model (ALBEF-style).

Parts: a ViT image encoder, a BERT-style text transformer whose first layers encode text and
whose last layers fuse text with image tokens by cross-attention, projections to a shared
``embed_dim`` space, a learnable contrastive temperature, an ITM head and an MLM head tied to the
word embeddings.

The pre-training objective (momentum copy, feature queues, the losses) is
``objectives.pretrain.PretrainObjective``, which holds a ``VLPModel``; the task models
(``models/vqa.py``, ``models/nlvr2.py``, ``models/caption.py``) hold one and reuse its encoders.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import opt
from models.text import MLMHead, TextConfig, TextTransformer
from models.vision import VisionConfig, build_vit, vit_tokens


def _plain_timm_block(block) -> bool:
    """A timm ViT ``Block`` with timm's ``Attention`` and no extras (the layout vit_class_token knows)."""
    from timm.models.vision_transformer import Attention, Block

    return (type(block) is Block and type(block.attn) is Attention and getattr(block.attn, "gate", None) is None
            and not getattr(block.attn, "rotary", None))


def vit_class_token(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The class token ``(B, width)`` of ``vit_tokens(vit, images)``, with the last block computing
    only the class token's query, attention output and MLP (its keys and values still read every
    token; the other tokens' outputs are not needed for the features). Other block types run the
    full forward."""
    blocks = getattr(vit, "blocks", None)
    if blocks is None or len(blocks) == 0 or not _plain_timm_block(blocks[-1]):
        return vit_tokens(vit, images)[:, 0]
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    if getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled():
        from timm.models import checkpoint_seq
        x = checkpoint_seq(blocks[:-1], x)
    else:
        x = blocks[:-1](x)
    blk = blocks[-1]
    a = blk.attn
    bsz, n, _ = x.shape
    dim, heads, hd = a.num_heads * a.head_dim, a.num_heads, a.head_dim
    h = blk.norm1(x)
    w, bias = a.qkv.weight, a.qkv.bias
    q = F.linear(h[:, :1], w[:dim], None if bias is None else bias[:dim])
    kv = F.linear(h, w[dim:], None if bias is None else bias[dim:])
    q = q.reshape(bsz, 1, heads, hd).transpose(1, 2)
    k, v = kv.reshape(bsz, n, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if a.training else 0.0)
    o = a.proj_drop(a.proj(a.norm(o.transpose(1, 2).reshape(bsz, 1, dim))))
    y = x[:, :1] + blk.drop_path1(blk.ls1(o))
    y = y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))
    return vit.norm(y)[:, 0]


@dataclass
class VLPConfig:
    vision: VisionConfig = opt(VisionConfig, "image encoder (ViT)")
    text: TextConfig = opt(TextConfig, "text encoder + fusion encoder (BERT layers)")
    embed_dim: int = opt(256, "dimension of the shared contrastive space")
    temp: float = opt(0.07, "initial contrastive temperature (learnable)")
    temp_min: float = opt(0.001, "lower clamp of the temperature")
    temp_max: float = opt(0.5, "upper clamp of the temperature")
    vision_weights: Optional[str] = opt(None, "local CLIP / DeiT / timm ViT weights file to initialise the image encoder")
    vision_weights_format: Literal["auto", "clip", "deit", "timm"] = opt("auto", "key layout of vision_weights")
    text_weights: Optional[str] = opt(None, "local bert-base-uncased directory to initialise the text and fusion layers")

    def validate(self) -> None:
        if self.embed_dim <= 0:
            raise ValueError(f"model.embed_dim must be positive; got {self.embed_dim}")
        if not self.temp_min <= self.temp <= self.temp_max:
            raise ValueError("model.temp must lie within [model.temp_min, model.temp_max]")


class VLPModel(nn.Module):
    """ALBEF-style base model: encoders, projections, temperature, ITM and MLM heads (no ``forward``:
    the objective or the task model calls the methods it needs)."""

    def __init__(self, cfg: VLPConfig) -> None:
        super().__init__()
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, encoder_width=cfg.vision.width))
        self.cfg = cfg
        width, hidden = cfg.vision.width, cfg.text.hidden_size
        self.visual = build_vit(cfg.vision)
        self.text = TextTransformer(cfg.text)
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(hidden, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.itm_head = nn.Linear(hidden, 2)
        self.mlm_head = MLMHead(cfg.text)
        self.mlm_head.decoder.weight = self.text.embeddings.word_embeddings.weight

    # ------------------------------------------------------------------ encoders
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image tokens ``(B, 1 + N, width)``, class token first."""
        return vit_tokens(self.visual, image)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unimodal text states ``(B, L, hidden)`` from the text layers."""
        return self.text.forward_text(input_ids, attention_mask)

    def fuse(self, text_embeds, attention_mask, image_embeds, image_atts=None, image_index=None,
             text_index=None, select=None) -> torch.Tensor:
        """Fusion states ``(B, L, hidden)``: text attends to image tokens by cross-attention.
        ``image_index`` (B,): text row b reads ``image_embeds[image_index[b]]``, keys/values computed
        once per image (for many captions per image: ITM negatives, retrieval re-ranking).
        ``text_index`` (B,): the rows are ``text_embeds[text_index]`` (the first layer's
        self-attention runs once per distinct text); ``select`` (B, L) bool: only the selected
        tokens' states, ``(T, hidden)``, the last layer computing only those (ITM and MLM of
        pre-training share one such pass; see ``TextTransformer.forward_fusion``)."""
        return self.text.forward_fusion(text_embeds, attention_mask, image_embeds, image_atts, image_index,
                                        text_index=text_index, select=select)

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)

    def text_feat(self, text_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_embeds[:, 0, :]).float(), dim=-1)

    @torch.no_grad()
    def unimodal_features(self, image, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and text features (used for a frozen helper model)."""
        return self.image_feat(self.encode_image(image)), self.text_feat(self.encode_text(input_ids, attention_mask))

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        return self.itm_head(fused[:, 0, :])

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, lr: float, lr_vision: float, weight_decay: float) -> list[dict]:
        """AdamW groups: ViT at ``lr_vision``, everything else at ``lr``; no decay on biases,
        norms, embeddings of positions/class token and the temperature (``models/param_groups.py``)."""
        from models.param_groups import param_groups
        return param_groups(self, lr, lr_vision, weight_decay)
