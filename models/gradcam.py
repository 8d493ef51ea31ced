"""Grad-CAM of the ITM score over a fusion layer's cross-attention (ALBEF's visualisation).

For an image and a text, the fusion encoder's chosen layer keeps its cross-attention probabilities
``A`` (B, heads, L, 1 + N): text token ``l`` attending to the image's class token and its ``N``
patches. With ``s`` the ITM head's "match" logit, the map of token ``l`` is

    cam[l, p] = mean_h( clamp(dS/dA[h, l, p], min=0) * A[h, l, p] )      for the patches p (no class token)

reshaped to the patch grid; a padded token's map is zero. The gradient is taken with respect to the
probabilities only (``torch.autograd.grad``): no parameter's ``.grad`` is touched. The layer is a
fusion-layer index (:class:`GradCAMConfig`); ALBEF reads BERT block 8, the third of six fusion layers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import opt

__all__ = ["GradCAMConfig", "fusion_layer_index", "recording", "gradcam_maps", "itm_gradcam", "upsample"]


@dataclass
class GradCAMConfig:
    """Which cross-attention the maps read and how they are brought to the image's size."""

    layer: Optional[int] = opt(None, "fusion layer whose cross-attention is read (0 = the first fusion layer, "
                                     "negative counts from the last); null: the middle one, "
                                     "(num_fusion_layers - 1) // 2 (ALBEF's BERT block 8 of 6 + 6 layers)")
    upsample: str = opt("bicubic", "interpolation from the patch grid to the image: bicubic (ALBEF's "
                                   "grounding evaluation), bilinear or nearest")

    def validate(self) -> None:
        if self.upsample not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"gradcam.upsample must be bicubic, bilinear or nearest; got {self.upsample!r}")


def fusion_layer_index(num_fusion_layers: int, layer: Optional[int]) -> int:
    """The 0-based fusion layer that ``layer`` names (see :class:`GradCAMConfig`); ``ValueError`` when the
    model has no such layer."""
    if num_fusion_layers <= 0:
        raise ValueError("the model has no fusion layer: Grad-CAM needs cross-attention")
    if layer is None:
        return (num_fusion_layers - 1) // 2
    if not -num_fusion_layers <= layer < num_fusion_layers:
        raise ValueError(f"gradcam layer {layer} is not a fusion layer of this model "
                         f"(it has {num_fusion_layers}: 0..{num_fusion_layers - 1}, or negative from the last)")
    return layer % num_fusion_layers


@contextlib.contextmanager
def recording(attention) -> Iterator:
    """Make an ``models.text.Attention`` keep its probabilities (``attention.probs``) inside the block."""
    attention.record_probs, attention.probs = True, None
    try:
        yield attention
    finally:
        attention.record_probs, attention.probs = False, None


def gradcam_maps(probs: Tensor, grads: Tensor, text_mask: Optional[Tensor], grid: tuple[int, int]) -> Tensor:
    """ALBEF's Grad-CAM from cross-attention probabilities and their gradients, both (B, heads, L, 1 + N)
    with the image's class token first: (B, L, grid_h, grid_w), zero at padded tokens (``text_mask``
    (B, L), 1 = token)."""
    gh, gw = grid
    if probs.shape[-1] != 1 + gh * gw:
        raise ValueError(f"cross-attention over {probs.shape[-1]} image tokens; expected 1 + {gh} x {gw}")
    cam = (grads[..., 1:].clamp(min=0) * probs[..., 1:]).mean(dim=1)  # (B, L, N)
    if text_mask is not None:
        cam = cam * text_mask[:, :, None].to(cam.dtype)
    return cam.reshape(cam.shape[0], cam.shape[1], gh, gw)


def itm_gradcam(model, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                layer: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Grad-CAM maps of a ``models.vlp.VLPModel``'s ITM match logit, per text token: ``(maps (B, L, gh, gw),
    match probability (B,))`` for text row ``b`` with image row ``b``. ``layer``: see :class:`GradCAMConfig`."""
    tcfg, vcfg = model.cfg.text, model.cfg.vision
    index = tcfg.num_text_layers + fusion_layer_index(tcfg.num_fusion_layers, layer)
    attention = model.text.encoder.layer[index].crossattention
    grid = (vcfg.img_size // vcfg.patch_size, vcfg.img_size // vcfg.patch_size)
    with torch.enable_grad(), recording(attention):
        # the graph starts at the encoders' outputs: only the fusion pass is differentiated
        image_embeds = model.encode_image(images).detach().requires_grad_(True)
        text_embeds = model.encode_text(input_ids, attention_mask).detach()
        logits = model.itm_logits(model.fuse(text_embeds, attention_mask, image_embeds))
        probs = attention.probs
        (grads,) = torch.autograd.grad(logits[:, 1].sum(), probs)
    maps = gradcam_maps(probs.detach(), grads, attention_mask, grid)
    return maps, F.softmax(logits.detach().float(), dim=-1)[:, 1]


def upsample(maps: Tensor, size: tuple[int, int], mode: str = "bicubic") -> Tensor:
    """Maps (..., gh, gw) interpolated to ``size`` = (height, width)."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    out = F.interpolate(flat, size=size, mode=mode, **kwargs)
    return out.reshape(*lead, *size)
