"""models/vision.py and its weight files (models/loading.py): timm/DeiT and OpenAI-CLIP weight loading,
position-embedding interpolation (timm's functions, checked against the explicit reference)."""
import argparse
import math
import re
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models.loading import interpolate_pos_embed, load_vision_weights, read_checkpoint
from models.vision import VisionConfig, build_vit, vit_tokens

IMG, PATCH, WIDTH, DEPTH, HEADS = 32, 8, 128, 2, 2  # CLIP: 64-dim heads


def randomize(module: nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (LayerNorms, biases, tokens) so that every key matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_ln_scale = name.endswith("weight") and p.dim() == 1  # LayerNorm scales stay near 1
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if is_ln_scale else 0.0))


def test_timm_deit_checkpoint_roundtrip(tmp_path):
    cfg = VisionConfig(img_size=IMG, patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS)
    src = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                            num_classes=10).eval()
    randomize(src, 0)
    torch.save({"model": src.state_dict(), "epoch": 3}, tmp_path / "deit.pth")
    vit = build_vit(cfg).eval()
    report = load_vision_weights(vit, tmp_path / "deit.pth")
    assert set(report.unexpected) == {"head.weight", "head.bias"}
    assert all("head" in report.expected_unexpected[k] for k in report.unexpected)
    assert not report.missing and not report.mismatched and not report.interpolated
    report.raise_if_unexpected()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ours = vit.forward_tokens(x)
        assert ours.shape == (2, 1 + (IMG // PATCH) ** 2, WIDTH)
        torch.testing.assert_close(ours, src.forward_features(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(vit_tokens(vit, x), ours, atol=0, rtol=0)


def test_deit_distilled_and_resolution_change(tmp_path):
    """dist_token / head_dist are dropped with a reason; the dist position slot is removed; 4x4 -> 6x6."""
    n, c = (IMG // PATCH) ** 2, WIDTH
    sd = build_vit(VisionConfig(img_size=IMG, patch_size=PATCH, width=WIDTH, depth=DEPTH,
                                num_heads=HEADS)).state_dict()
    pos = torch.randn(1, 2 + n, c)
    sd.update(pos_embed=pos, dist_token=torch.randn(1, 1, c), **{"head_dist.weight": torch.randn(5, c)})
    save_file(sd, str(tmp_path / "deit_dist.safetensors"))
    vit = build_vit(VisionConfig(img_size=48, patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS))
    report = load_vision_weights(vit, tmp_path / "deit_dist.safetensors", fmt="deit")
    assert report.interpolated == ["pos_embed"] and not report.missing
    assert "dist_token" in report.expected_unexpected and "head_dist.weight" in report.expected_unexpected
    expected = interpolate_pos_embed(torch.cat([pos[:, :1], pos[:, 2:]], 1), 6)
    torch.testing.assert_close(vit.pos_embed.data, expected, atol=0, rtol=0)


def test_interpolate_pos_embed_matches_direct_recomputation():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 16, 8)
    out = interpolate_pos_embed(pos, 6)
    assert out.shape == (1, 1 + 36, 8)
    torch.testing.assert_close(out[:, 0], pos[:, 0], atol=0, rtol=0)  # class position kept
    grid = pos[0, 1:].T.reshape(1, 8, 4, 4)  # (C, N) -> (1, C, H, W), row-major patches
    ref = F.interpolate(grid.double(), size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[0, 1:].double(), ref.reshape(8, 36).T, atol=1e-5, rtol=0)
    assert interpolate_pos_embed(pos, (4, 6)).shape == (1, 1 + 24, 8)
    torch.testing.assert_close(interpolate_pos_embed(pos, 4), pos, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(pos[:, :-1], 6)


def reference_interpolate(pos_embed, new_h, new_w):
    """The explicit interpolation (ALBEF's interpolate_pos_embed): class position kept, the square grid
    resized bicubically, align_corners=False, no antialiasing, in float32."""
    prefix, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old, c = math.isqrt(grid.shape[1]), grid.shape[2]
    grid = grid.reshape(1, old, old, c).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, c).to(pos_embed.dtype)], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_timm_resample_equals_the_explicit_interpolation(dtype):
    """interpolate_pos_embed is timm's resample_abs_pos_embed with antialias=False: bit-identical to the
    explicit reference on random tensors (up- and downsampling); timm's default (antialias=True) is not."""
    from timm.layers import resample_abs_pos_embed

    g = torch.Generator().manual_seed(0)
    for old, (h, w) in ((4, (6, 6)), (6, (4, 4)), (16, (24, 24)), (24, (16, 16)), (4, (4, 6))):
        pos = torch.randn(1, 1 + old * old, 40, generator=g).to(dtype)
        out = interpolate_pos_embed(pos, (h, w))
        assert out.dtype == dtype and torch.equal(out, reference_interpolate(pos, h, w))
        if (h, w) != (old, old):
            assert not torch.equal(resample_abs_pos_embed(pos, [h, w], num_prefix_tokens=1), out)


# the explicit OpenAI-CLIP -> timm key table (checked against timm's _convert_openai_clip below)
_BLOCK = r"transformer\.resblocks\.(\d+)\."
CLIP_TO_TIMM = [(r"conv1\.weight", r"patch_embed.proj.weight"), (r"class_embedding", r"cls_token"),
                (r"positional_embedding", r"pos_embed"), (r"ln_pre\.(weight|bias)", r"norm_pre.\1"),
                (_BLOCK + r"ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
                (_BLOCK + r"attn\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
                (_BLOCK + r"attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
                (_BLOCK + r"ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
                (_BLOCK + r"mlp\.c_fc\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
                (_BLOCK + r"mlp\.c_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
                (r"ln_post\.(weight|bias)", r"norm.\1")]


def test_timm_clip_conversion_equals_the_explicit_table():
    """timm's _convert_openai_clip gives every visual key the name of the explicit table and the same
    tensor (class token reshaped to (1, 1, C), position embeddings to (1, N, C)); the projection becomes a
    classifier head, which the filter drops."""
    from timm.models.vision_transformer import _convert_openai_clip

    g = torch.Generator().manual_seed(0)
    ref = OpenAIVisionTransformer(IMG, PATCH, WIDTH, 3, HEADS, output_dim=16)
    sd = {"visual." + k: torch.randn(v.shape, generator=g) for k, v in ref.state_dict().items()}
    timm_sd = _convert_openai_clip(sd, build_vit(clip_cfg(depth=3)))
    expected = {}
    for key, v in sd.items():
        k = key[len("visual."):]
        rule = next(((p, r) for p, r in CLIP_TO_TIMM if re.fullmatch(p, k)), None)
        if rule is not None:
            name = re.sub(rule[0], rule[1], k)
            expected[name] = v.reshape(1, 1, -1) if name == "cls_token" else v.unsqueeze(0) if name == "pos_embed" else v
    assert set(timm_sd) == set(expected) | {"head.weight", "head.bias"}
    assert all(torch.equal(timm_sd[k], v) for k, v in expected.items())
    assert torch.equal(timm_sd["head.weight"], sd["visual.proj"].T)


# ----------------------------------------------------------------------------- OpenAI CLIP reference

class QuickGELURef(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """As in openai/CLIP model.py (LayerNorm eps 1e-5, nn.MultiheadAttention, quick_gelu MLP)."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", QuickGELURef()),
                                              ("c_proj", nn.Linear(d_model * 4, d_model))]))
        self.ln_2 = nn.LayerNorm(d_model)

    def forward(self, x):  # x: (L, B, D) as in OpenAI's code
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenAIVisionTransformer(nn.Module):
    """openai/CLIP VisionTransformer, returning the projected-free ln_post(CLS)."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)  # (B, N, D)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer.resblocks(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :])  # (B, D): CLS only, before the (unused) projection


def clip_cfg(**kw) -> VisionConfig:
    base = dict(img_size=IMG, patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS, pre_norm=True,
                act="quick_gelu", layer_norm_eps=1e-5)
    return VisionConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def openai_clip():
    torch.manual_seed(0)
    ref = OpenAIVisionTransformer(IMG, PATCH, WIDTH, DEPTH, HEADS, output_dim=16).eval()
    randomize(ref, 1)
    return ref


def full_clip_state_dict(ref: nn.Module) -> dict:
    """A full OpenAI-CLIP-style checkpoint: visual.* plus text-tower keys."""
    sd = {"visual." + k: v for k, v in ref.state_dict().items()}
    sd.update({"positional_embedding": torch.randn(77, 32), "token_embedding.weight": torch.randn(99, 32),
               "transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32),
               "ln_final.weight": torch.ones(32), "text_projection": torch.randn(32, 16),
               "logit_scale": torch.tensor(4.6)})
    return sd


def test_openai_clip_layout_matches_reference(openai_clip, tmp_path):
    sd = full_clip_state_dict(openai_clip)
    assert {"visual.conv1.weight", "visual.class_embedding", "visual.transformer.resblocks.1.mlp.c_proj.bias",
            "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.ln_post.bias"} <= set(sd)
    torch.save(sd, tmp_path / "clip.pt")
    vit = build_vit(clip_cfg()).eval()
    report = load_vision_weights(vit, tmp_path / "clip.pt")  # auto-detected as CLIP
    assert not report.missing and not report.mismatched, report.summary()
    assert report.expected_unexpected["visual.proj"].startswith("CLIP projection")
    assert "logit_scale" in report.unexpected and "token_embedding.weight" in report.expected_unexpected
    report.raise_if_unexpected()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_tokens(x)[:, 0], openai_clip(x), atol=1e-5, rtol=0)

    # the bare visual keys (no "visual." prefix) load the same, and a higher resolution interpolates
    bare = {k: v.contiguous() for k, v in openai_clip.state_dict().items()}
    save_file(bare, str(tmp_path / "visual.safetensors"))
    vit2 = build_vit(clip_cfg()).eval()
    rep2 = load_vision_weights(vit2, tmp_path / "visual.safetensors", fmt="clip")
    assert rep2.unexpected == ["proj"] and not rep2.missing
    torch.testing.assert_close(vit2.forward_tokens(x), vit.forward_tokens(x), atol=0, rtol=0)
    vit3 = build_vit(clip_cfg(img_size=48))
    rep3 = load_vision_weights(vit3, tmp_path / "visual.safetensors", fmt="clip")
    assert rep3.interpolated == ["pos_embed"] and vit3.pos_embed.shape == (1, 37, WIDTH)
    torch.testing.assert_close(vit3.cls_token.data.flatten(), bare["class_embedding"], atol=0, rtol=0)


def test_clip_mismatch_raises_clear_errors(openai_clip, tmp_path):
    torch.save(full_clip_state_dict(openai_clip), tmp_path / "clip.pt")
    with pytest.raises(ValueError, match=r"width 128 \(set model\.vision\.width=128\)"):
        load_vision_weights(build_vit(clip_cfg(width=32)), tmp_path / "clip.pt")
    with pytest.raises(ValueError, match="model.vision.pre_norm=true, model.vision.act=quick_gelu"):
        load_vision_weights(build_vit(clip_cfg(pre_norm=False, act="gelu")), tmp_path / "clip.pt")
    with pytest.raises(ValueError, match="patch size 8"):
        load_vision_weights(build_vit(clip_cfg(patch_size=16)), tmp_path / "clip.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_vision_weights(build_vit(clip_cfg()), tmp_path / "nope.pt")


def test_grad_checkpointing_flag():
    vit = build_vit(VisionConfig(img_size=IMG, patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS,
                                 grad_checkpointing=True))
    assert vit.grad_checkpointing
    out = vit.train().forward_tokens(torch.randn(1, 3, IMG, IMG))
    out.sum().backward()
    assert vit.blocks[0].attn.qkv.weight.grad is not None
    assert torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_read_checkpoint_wrappers_and_unsafe_files(tmp_path):
    def read_state_dict(path):
        return read_checkpoint(path)["model"]

    lin = nn.Linear(3, 4)
    torch.save({"state_dict": {"module." + k: v for k, v in lin.state_dict().items()}, "epoch": 1},
               tmp_path / "ddp.pth")
    assert set(read_state_dict(tmp_path / "ddp.pth")) == {"weight", "bias"}

    # arbitrary pickled objects (here argparse.Namespace, common in research checkpoints) are refused
    torch.save({"model": lin.state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match=r"it needs argparse\.Namespace.*nothing from the file was run"):
        read_state_dict(tmp_path / "pickled.pth")
    torch.jit.save(torch.jit.script(lin), str(tmp_path / "jit.pt"))  # TorchScript, as OpenAI ships CLIP
    torch.testing.assert_close(read_state_dict(tmp_path / "jit.pt")["weight"], lin.weight.detach())
