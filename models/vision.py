"""Vision Transformer (timm) built from :class:`VisionConfig`, with CLIP / DeiT / timm weight loading.

OpenAI CLIP checkpoints are mapped to timm names by an explicit key table (:func:`clip_key_to_timm`);
position embeddings are resized bicubically (align_corners=False, class position kept) when the
checkpoint's grid differs from the model's. Every load returns a :class:`~models.weights.LoadReport`.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from models.weights import LoadReport, copy_into, read_state_dict

__all__ = ["VisionConfig", "ViT", "build_vit", "vit_tokens", "interpolate_pos_embed",
           "clip_key_to_timm", "load_vision_weights"]


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


def interpolate_pos_embed(pos_embed: Tensor, new_grid: Union[int, Tuple[int, int]],
                          num_prefix_tokens: int = 1) -> Tensor:
    """Resize ``(1, P + N_old, C)`` position embeddings to a new patch grid (bicubic, align_corners=False).

    The ``P`` prefix (class token) positions are kept unchanged; the old grid must be square.
    Returns ``(1, P + new_h * new_w, C)`` in the input dtype.
    """
    new_h, new_w = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, c = grid.shape[1], grid.shape[2]
    old = math.isqrt(n)
    if old * old != n:
        raise ValueError(f"position embedding has {n} patch positions, not a square grid")
    grid = grid.reshape(1, old, old, c).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, c).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


# ----------------------------------------------------------------------------- key maps

_BLOCK = r"transformer\.resblocks\.(\d+)\."
_CLIP_TO_TIMM = [  # (OpenAI CLIP visual key without "visual.", timm key)
    (r"conv1\.weight", r"patch_embed.proj.weight"),
    (r"class_embedding", r"cls_token"),
    (r"positional_embedding", r"pos_embed"),
    (r"ln_pre\.(weight|bias)", r"norm_pre.\1"),
    (_BLOCK + r"ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_BLOCK + r"attn\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),  # q, k, v stacked the same way
    (_BLOCK + r"attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_BLOCK + r"ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_BLOCK + r"mlp\.c_fc\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_BLOCK + r"mlp\.c_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"ln_post\.(weight|bias)", r"norm.\1"),
]


def clip_key_to_timm(key: str) -> Optional[str]:
    """Map an OpenAI CLIP visual key (``visual.`` prefix already removed) to the timm name, or None."""
    for pattern, repl in _CLIP_TO_TIMM:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _from_clip(sd: Dict[str, Tensor], report: LoadReport) -> Dict[str, Tensor]:
    """OpenAI CLIP state dict (visual tower, with or without ``visual.``, or a full checkpoint) -> timm names."""
    has_prefix = any(k.startswith("visual.") for k in sd)
    out: Dict[str, Tensor] = {}
    for key, v in sd.items():
        if has_prefix and not key.startswith("visual."):
            reason = "CLIP text tower / logit scale (unused)"
        else:
            k = key[len("visual."):] if has_prefix else key
            target = clip_key_to_timm(k)
            if target is not None:
                if target == "cls_token":
                    v = v.reshape(1, 1, -1)
                elif target == "pos_embed":
                    v = v.unsqueeze(0)
                out[target] = v
                continue
            reason = "CLIP projection to the joint embedding (unused)" if k == "proj" else ""
        report.unexpected.append(key)
        if reason:
            report.expected_unexpected[key] = reason
    return out


def _from_timm(sd: Dict[str, Tensor], report: LoadReport) -> Dict[str, Tensor]:
    """timm / DeiT state dict: drop classifier heads and the DeiT distillation token."""
    out: Dict[str, Tensor] = {}
    for key, v in sd.items():
        if key.startswith(("head.", "head_dist.")):
            report.unexpected.append(key)
            report.expected_unexpected[key] = "classifier head (unused)"
        elif key == "dist_token":
            report.unexpected.append(key)
            report.expected_unexpected[key] = "DeiT distillation token (unused; its position slot is dropped)"
        else:
            out[key] = v
    if "dist_token" in sd and "pos_embed" in out:  # DeiT-distilled: [cls, dist, patches...]
        out["pos_embed"] = torch.cat([out["pos_embed"][:, :1], out["pos_embed"][:, 2:]], dim=1)
    return out


def _detect_format(sd: Dict[str, Tensor]) -> str:
    """'clip' or 'timm' from the key names."""
    if any(re.search(r"(^|\.)(conv1\.weight|class_embedding|transformer\.resblocks\.)", k) for k in sd):
        return "clip"
    if "patch_embed.proj.weight" in sd:
        return "timm"
    raise ValueError("cannot detect the vision checkpoint format (no 'visual.conv1.weight' or "
                     "'patch_embed.proj.weight'); pass fmt='clip' or fmt='timm'")


def _check_compat(vit: VisionTransformer, src: Dict[str, Tensor], fmt: str, path: str) -> None:
    """Raise a clear ``ValueError`` when the checkpoint's architecture does not fit the model."""
    problems = []
    w = src.get("patch_embed.proj.weight")
    if w is not None:
        width, patch = w.shape[0], tuple(w.shape[-2:])
        if width != vit.embed_dim:
            problems.append(f"width {width} (set vision.width={width}), model has {vit.embed_dim}")
        if patch != tuple(vit.patch_embed.patch_size):
            problems.append(f"patch size {patch[0]} (set vision.patch_size={patch[0]}), "
                            f"model has {vit.patch_embed.patch_size[0]}")
    depth = 1 + max((int(m.group(1)) for k in src if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth and depth != len(vit.blocks):
        problems.append(f"depth {depth} (set vision.depth={depth}), model has {len(vit.blocks)}")
    if fmt == "clip":
        pre_norm = isinstance(vit.norm_pre, nn.LayerNorm)
        quick = isinstance(vit.blocks[0].mlp.act, QuickGELU) if len(vit.blocks) else True
        eps = getattr(vit.norm, "eps", None)
        if not pre_norm or not quick or eps != 1e-5:
            problems.append("OpenAI CLIP layout: set vision.pre_norm=true, vision.act=quick_gelu, "
                            f"vision.layer_norm_eps=1e-5 (model has pre_norm={pre_norm}, "
                            f"act={'quick_gelu' if quick else 'gelu'}, layer_norm_eps={eps})")
        if w is not None and vit.embed_dim == w.shape[0] and w.shape[0] % 64 == 0 \
                and vit.blocks[0].attn.num_heads != w.shape[0] // 64:
            warnings.warn(f"OpenAI CLIP ViTs use 64-dim heads: expected vision.num_heads={w.shape[0] // 64}")
    if problems:
        raise ValueError(f"vision checkpoint {path} ({fmt}) does not match the model: " + "; ".join(problems))


@torch.no_grad()
def load_vision_weights(vit: VisionTransformer, path: str | os.PathLike, fmt: str = "auto") -> LoadReport:
    """Load ViT weights from a local CLIP, DeiT or timm checkpoint into ``vit``.

    Args:
        vit: the model from :func:`build_vit` (any timm ``VisionTransformer`` works).
        path: ``.safetensors``/``.pth``/``.bin``/``.pt`` file (``{"model": ...}`` wrappers accepted).
        fmt: ``"clip"`` (OpenAI layout: ``visual.conv1.weight``, ``visual.transformer.resblocks.*``;
            the ``visual.`` prefix is optional; text-tower keys are ignored), ``"deit"``/``"timm"``
            (timm names; heads and the distillation token are ignored) or ``"auto"`` (by keys).

    Position embeddings are interpolated when the patch grids differ (listed in ``interpolated``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown format, or the checkpoint's width / patch size / depth / CLIP-specific
            settings do not match the model (the message names the config keys to set).
    """
    path = os.fspath(path)
    sd = read_state_dict(path)
    if fmt == "auto":
        fmt = _detect_format(sd)
    if fmt not in ("clip", "deit", "timm"):
        raise ValueError(f"unknown vision checkpoint format {fmt!r}; use 'auto', 'clip', 'deit' or 'timm'")
    report = LoadReport()
    src = _from_clip(sd, report) if fmt == "clip" else _from_timm(sd, report)
    _check_compat(vit, src, fmt, path)

    pos = src.get("pos_embed")
    target = vit.state_dict()
    if pos is not None and "pos_embed" in target and pos.shape != target["pos_embed"].shape \
            and pos.shape[-1] == target["pos_embed"].shape[-1]:
        src["pos_embed"] = interpolate_pos_embed(pos, tuple(vit.patch_embed.grid_size), vit.num_prefix_tokens)
        report.interpolated.append("pos_embed")
    copy_into(target, src, report)
    return report
