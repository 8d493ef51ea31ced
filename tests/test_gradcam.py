"""Grad-CAM (models/gradcam.py) against an independent re-computation in float64: a hand-written
forward of the fusion layers into which the chosen layer's cross-attention probabilities enter as a
leaf tensor, its autograd gradient checked by finite differences; and the cross-attention's explicit
path against SDPA."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.gradcam import GradCAMConfig, fusion_layer_index, itm_gradcam, upsample
from models.text import Attention, TextConfig
from models.vision import VisionConfig
from models.vlp import VLPConfig, VLPModel

GRID = 3  # 24 px images, 8 px patches


def tiny_model() -> VLPModel:
    torch.manual_seed(0)
    cfg = VLPConfig(vision=VisionConfig(img_size=8 * GRID, patch_size=8, width=16, depth=1, num_heads=2),
                    text=TextConfig(vocab_size=40, hidden_size=16, num_text_layers=1, num_fusion_layers=2, num_heads=2,
                                    intermediate_size=32, max_position_embeddings=16, hidden_dropout=0.0,
                                    attention_dropout=0.0),
                    embed_dim=8)
    model = VLPModel(cfg).double().eval()
    with torch.no_grad():  # larger weights than BERT's 0.02 init, so the gradients are not tiny
        for p in model.text.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 8 * GRID, 8 * GRID, generator=g, dtype=torch.float64)
    ids = torch.randint(1, 40, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # the second text is padded
    return images, ids, mask


# ------------------------------------------------------------------ the independent re-computation
def _lin(x, m):
    return x @ m.weight.T + m.bias


def _ln(x, m):
    return F.layer_norm(x, x.shape[-1:], m.weight, m.bias, m.eps)


def _attend(att, x, kv, key_mask, probs=None):
    """Post-LN multi-head attention by hand; ``probs`` replaces the softmax when given."""
    B, Q, H = x.shape
    h, d = att.heads, H // att.heads
    q = _lin(x, att.self.query).view(B, Q, h, d).transpose(1, 2)
    k = _lin(kv, att.self.key).view(B, -1, h, d).transpose(1, 2)
    v = _lin(kv, att.self.value).view(B, -1, h, d).transpose(1, 2)
    if probs is None:
        s = q @ k.transpose(-1, -2) / math.sqrt(d)
        if key_mask is not None:
            s = s.masked_fill(key_mask[:, None, None, :] == 0, float("-inf"))
        probs = s.softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(B, Q, H)
    return _ln(x + _lin(out, att.output.dense), att.output.LayerNorm), probs


def _fusion(model, text, mask, image, at, probs_at=None):
    """The ITM match logits with fusion layer ``at``'s cross-attention probabilities ``probs_at``."""
    kept = None
    x = text
    for i, layer in enumerate(model.text.encoder.layer[model.cfg.text.num_text_layers:]):
        x, _ = _attend(layer.attention, x, x, mask)
        x, p = _attend(layer.crossattention, x, image, None, probs_at if i == at else None)
        kept = p if i == at else kept
        x = _ln(x + _lin(F.gelu(_lin(x, layer.intermediate.dense)), layer.output.dense), layer.output.LayerNorm)
    return _lin(x[:, 0], model.itm_head)[:, 1], kept


@pytest.mark.parametrize("layer", [0, 1])
def test_itm_gradcam_equals_a_hand_written_gradient_in_float64(layer):
    model = tiny_model()
    images, ids, mask = inputs()
    maps, score = itm_gradcam(model, images, ids, mask, layer)
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(ids, mask)
        logit, probs = _fusion(model, text, mask, image, layer)
    probs = probs.clone().requires_grad_(True)
    logit, _ = _fusion(model, text, mask, image, layer, probs)
    (grad,) = torch.autograd.grad(logit.sum(), probs)
    # the hand-written gradient itself, by central finite differences at a few entries
    for idx in [(0, 0, 0, 1), (0, 1, 3, 5), (1, 0, 2, 9), (1, 1, 0, 0)]:
        e = torch.zeros_like(probs)
        e[idx] = 1e-6
        with torch.no_grad():
            fd = (_fusion(model, text, mask, image, layer, probs + e)[0].sum()
                  - _fusion(model, text, mask, image, layer, probs - e)[0].sum()) / 2e-6
        assert abs(float(fd) - float(grad[idx])) < 1e-7 * max(1.0, abs(float(fd)))
    assert grad.abs().max() > 1e-3 and (grad < 0).any() and (grad > 0).any()
    expected = torch.zeros(2, 6, GRID, GRID, dtype=torch.float64)
    for b in range(2):
        for t in range(6):
            if mask[b, t]:
                heads = [grad[b, h, t, 1:].clamp(min=0) * probs[b, h, t, 1:] for h in range(2)]
                expected[b, t] = (sum(heads) / 2).view(GRID, GRID)
    assert maps.dtype == torch.float64
    torch.testing.assert_close(maps, expected.detach(), rtol=1e-9, atol=1e-12)
    assert maps[1, 4:].abs().sum() == 0 and maps[0].abs().sum() > 0
    with torch.no_grad():
        full = model.itm_logits(model.fuse(text, mask, image))
    torch.testing.assert_close(score, full.softmax(-1)[:, 1].float())
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient is touched
    assert model.text.encoder.layer[1 + layer].crossattention.probs is None  # nothing kept afterwards


def test_recorded_attention_equals_sdpa():
    torch.manual_seed(2)
    att = Attention(16, 4, 8, 0.0, 0.0, 1e-12).double().eval()
    x, kv = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 7, 8, dtype=torch.float64)
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False
    plain = att(x, kv, mask)
    att.record_probs = True
    recorded = att(x, kv, mask)
    torch.testing.assert_close(recorded, plain, rtol=1e-12, atol=1e-12)
    assert att.probs.shape == (3, 4, 5, 7)
    torch.testing.assert_close(att.probs.sum(-1), torch.ones(3, 4, 5, dtype=torch.float64))
    assert att.probs[1, ..., 5:].abs().max() == 0


def test_layer_index_and_config_errors():
    assert fusion_layer_index(6, None) == 2  # ALBEF's BERT block 8 of 6 + 6
    assert fusion_layer_index(2, None) == 0 and fusion_layer_index(2, -1) == 1
    with pytest.raises(ValueError, match="gradcam layer 2 is not a fusion layer"):
        fusion_layer_index(2, 2)
    with pytest.raises(ValueError, match="no fusion layer"):
        fusion_layer_index(0, None)
    with pytest.raises(ValueError, match="gradcam.upsample"):
        GradCAMConfig(upsample="cubic").validate()


def test_upsample_keeps_a_constant_map_and_the_layout():
    m = torch.zeros(2, 3, 3)
    m[1, 0, 2] = 1.0  # top right
    up = upsample(m, (30, 30), "bilinear")
    assert up.shape == (2, 30, 30) and up[0].abs().max() == 0
    assert up[1].flatten().argmax() // 30 < 10 and up[1].flatten().argmax() % 30 >= 20
    torch.testing.assert_close(upsample(torch.full((1, 3, 3), 0.5), (12, 12)), torch.full((1, 12, 12), 0.5))
