"""The ViT's QuickGELU (CLIP's x * sigmoid(1.702 x)) computed as silu(1.702 x) / 1.702 with a fused
backward: the same values and gradients as the composed formula (float64), also under bf16 autocast
and in a ViT block."""
from __future__ import annotations

import torch

from models.vision import QuickGELU, VisionConfig, build_vit


def _reference(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def test_quick_gelu_values_and_gradients_float64():
    x = (torch.randn(5, 7, dtype=torch.float64) * 4).requires_grad_(True)
    g = torch.randn(5, 7, dtype=torch.float64)
    y = QuickGELU()(x)
    (gx,) = torch.autograd.grad(y, x, g)
    x2 = x.detach().requires_grad_(True)
    y2 = _reference(x2)
    (gx2,) = torch.autograd.grad(y2, x2, g)
    torch.testing.assert_close(y, y2, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(gx, gx2, rtol=1e-12, atol=1e-13)
    assert torch.autograd.gradcheck(QuickGELU(), (x[:2, :3].detach().requires_grad_(True),))


def test_quick_gelu_bf16_close_to_float64():
    x = torch.randn(64, 32) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = QuickGELU()(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), _reference(x.double()), rtol=2e-2, atol=2e-2)


def test_vit_uses_it_for_quick_gelu():
    vit = build_vit(VisionConfig(img_size=16, patch_size=8, width=32, depth=1, num_heads=2, act="quick_gelu"))
    assert isinstance(vit.blocks[0].mlp.act, QuickGELU)
    assert not isinstance(build_vit(VisionConfig(img_size=16, patch_size=8, width=32, depth=1, num_heads=2)).blocks[0].mlp.act,
                          QuickGELU)
