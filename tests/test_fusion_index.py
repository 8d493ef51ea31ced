"""Fusion with an image index (``image_index``): row b cross-attends to ``image_embeds[image_index[b]]``
with the keys/values projected once per image. Same outputs and gradients as gathering the image
tokens per pair, and exactly the analytic number of FLOPs fewer (the ITM step of pre-training fuses
3 pairs per image; retrieval re-ranking fuses k_test captions per image)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.text import TextConfig, TextTransformer, TransformerLayer


def _inputs(m: int = 3, b: int = 7, n: int = 5, length: int = 4, hidden: int = 16, width: int = 24):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(m, n, width, generator=g, requires_grad=True)
    text = torch.randn(b, length, hidden, generator=g, requires_grad=True)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, -1] = 0
    image_mask = torch.ones(m, n, dtype=torch.long)
    image_mask[2, -2:] = 0
    index = torch.tensor([0, 1, 2, 2, 0, 1, 1])
    return image, text, mask, image_mask, index


def _grads(*tensors_and_modules):
    out = []
    for x in tensors_and_modules:
        if isinstance(x, torch.nn.Module):
            out += [p.grad.clone() for p in x.parameters() if p.grad is not None]
        else:
            out.append(x.grad.clone())
    return out


def test_layer_with_index_equals_gathered_inputs():
    torch.manual_seed(0)
    layer = TransformerLayer(16, 2, 32, cross_attention=True, encoder_width=24, hidden_dropout=0.0,
                             attention_dropout=0.0)
    image, text, mask, image_mask, index = _inputs()
    ref = layer(text, mask, image[index], image_mask[index])
    ref.square().sum().backward()
    g_ref = _grads(image, text, layer)
    for t in (image, text, *layer.parameters()):
        t.grad = None
    out = layer(text, mask, image, image_mask, encoder_index=index)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    for a, b in zip(_grads(image, text, layer), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fusion_with_index_saves_exactly_the_repeated_projections(checkpointing):
    cfg = TextConfig(vocab_size=40, hidden_size=16, num_text_layers=1, num_fusion_layers=2, num_heads=2,
                     intermediate_size=32, max_position_embeddings=8, hidden_dropout=0.0, attention_dropout=0.0,
                     encoder_width=24, grad_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = TextTransformer(cfg).train()
    image, text, mask, _, index = _inputs()
    with FlopCounterMode(display=False) as fc_ref:
        ref = model.forward_fusion(text, mask, image[index])
        ref.sum().backward()
    g_ref = _grads(image, text, model)
    for t in (image, text, *model.parameters()):
        t.grad = None
    with FlopCounterMode(display=False) as fc:
        out = model.forward_fusion(text, mask, image, image_index=index)
        out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(image, text, model), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # keys + values: 2 projections of n x width -> hidden per image and layer; forward + backward
    # (weight and input gradients) = 3x; with checkpointing the forward runs once more
    m, b, n, width, hidden = 3, 7, 5, 24, 16
    per_image = 2 * 2 * n * width * hidden * cfg.num_fusion_layers
    saved = (b - m) * per_image * (4 if checkpointing else 3)
    assert fc_ref.get_total_flops() - fc.get_total_flops() == saved
