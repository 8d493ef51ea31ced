"""Vision Transformer (timm) built from :class:`VisionConfig`, with CLIP's QuickGELU.

CLIP / DeiT / timm weight files load through ``models/loading.py`` (``load_vision_weights``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

__all__ = ["VisionConfig", "ViT", "build_vit", "vit_tokens"]


_QUICK_GELU_SCALE = 1.702  # CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)


class _QuickGELUFn(torch.autograd.Function):
    """x * sigmoid(a x) computed as silu(a x) / a (the same function): 3 elementwise passes forward
    and 1 backward (``aten.silu_backward``: d/dx silu(a x) / a = silu'(a x)), saving one tensor,
    instead of 3 + 5 passes and two saved tensors for the composed operators."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        t = x * _QUICK_GELU_SCALE
        ctx.save_for_backward(t)
        return F.silu(t).div_(_QUICK_GELU_SCALE)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (t,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad, t)


class QuickGELU(nn.Module):
    """CLIP's activation ``x * sigmoid(1.702 x)`` (timm's ``QuickGELU``), with a fused backward."""

    def forward(self, x: Tensor) -> Tensor:
        return _QuickGELUFn.apply(x)


@dataclass
class VisionConfig:
    """ViT configuration (defaults: ViT-B/16 at 256 px, DeiT/timm style).

    For OpenAI CLIP weights set ``pre_norm=True``, ``act="quick_gelu"``, ``layer_norm_eps=1e-5``.
    """

    img_size: int = field(default=256, metadata={"help": "input resolution (square)"})
    patch_size: int = field(default=16, metadata={"help": "patch size"})
    width: int = field(default=768, metadata={"help": "ViT width"})
    depth: int = field(default=12, metadata={"help": "number of blocks"})
    num_heads: int = field(default=12, metadata={"help": "attention heads (CLIP: width / 64)"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP width / ViT width"})
    drop_path: float = field(default=0.0, metadata={"help": "stochastic depth rate"})
    pre_norm: bool = field(default=False, metadata={"help": "LayerNorm before the blocks (CLIP: true)"})
    act: str = field(default="gelu", metadata={"help": "MLP activation: gelu or quick_gelu (CLIP)"})
    layer_norm_eps: float = field(default=1e-6, metadata={"help": "LayerNorm epsilon (timm/DeiT: 1e-6, CLIP: 1e-5)"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward (saves memory)"})

    def validate(self) -> None:
        for key in ("img_size", "patch_size", "width", "depth", "num_heads"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.vision.{key} must be positive; got {getattr(self, key)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"model.vision.patch_size={self.patch_size} must divide model.vision.img_size="
                             f"{self.img_size} (the image is cut into whole patches)")
        if self.width % self.num_heads:
            raise ValueError(f"model.vision.num_heads={self.num_heads} must divide model.vision.width={self.width}")
        if self.act not in ("gelu", "quick_gelu"):
            raise ValueError(f"model.vision.act must be 'gelu' or 'quick_gelu'; got {self.act!r}")


class ViT(VisionTransformer):
    """timm ``VisionTransformer`` that keeps its :class:`VisionConfig` and returns all tokens."""

    def __init__(self, cfg: VisionConfig) -> None:
        if cfg.act not in ("gelu", "quick_gelu"):
            raise ValueError(f"VisionConfig.act must be 'gelu' or 'quick_gelu', got {cfg.act!r}")
        super().__init__(
            img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
            num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, num_classes=0,
            global_pool="", class_token=True, pre_norm=cfg.pre_norm, dynamic_img_size=False,
            norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
            act_layer=QuickGELU if cfg.act == "quick_gelu" else nn.GELU, drop_path_rate=cfg.drop_path)
        self.cfg = cfg
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def forward_tokens(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1 + N, width): class token first, final LayerNorm applied."""
        return self.forward_features(images)


def build_vit(cfg: VisionConfig) -> ViT:
    """Build the image encoder (a timm ``VisionTransformer`` subclass) from ``cfg``."""
    return ViT(cfg)


def vit_tokens(vit: VisionTransformer, images: Tensor) -> Tensor:
    """All tokens ``(B, 1 + N, width)`` of any timm ViT (``forward_features``: class token first)."""
    return vit.forward_features(images)
