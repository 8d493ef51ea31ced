"""models/param_groups.py: one grouping rule for the four models, the same groups as each model's
own grouping had (kept below as the reference)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models.caption import CaptionModel
from models.decoder import DecoderConfig
from models.nlvr2 import NLVR2HeadConfig, NLVR2Model
from models.param_groups import param_groups
from models.text import TextConfig
from models.vision import VisionConfig
from models.vlp import VLPConfig, VLPModel
from objectives.pretrain import PretrainLossConfig, PretrainObjective
from models.vqa import VQAModel


def tiny_cfg() -> VLPConfig:
    return VLPConfig(vision=VisionConfig(img_size=16, patch_size=8, width=32, depth=1, num_heads=2),
                     text=TextConfig(vocab_size=50, hidden_size=32, num_text_layers=1, num_fusion_layers=1,
                                     num_heads=2, intermediate_size=64, max_position_embeddings=16),
                     embed_dim=16)


# ------------------------------------------------------------ the groupings the models had
def reference_vlp(model: nn.Module, lr, lr_vision, wd) -> list[dict]:
    groups = {(v, d): [] for v in (True, False) for d in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_vision = name.startswith("visual.")
        no_decay = p.ndim < 2 or name.endswith(("pos_embed", "cls_token")) or name == "temp"
        groups[(is_vision, not no_decay)].append(p)
    return [{"params": ps, "lr": lr_vision if v else lr, "weight_decay": wd if d else 0.0,
             "name": f"{'vision' if v else 'text'}_{'decay' if d else 'no_decay'}"}
            for (v, d), ps in groups.items() if ps]


def reference_with_head(model: nn.Module, parts: nn.Module, skip_base: bool, head: str, lr, lr_vision, wd):
    groups = reference_vlp(model.base, lr, lr_vision, wd)
    decay, no_decay = [], []
    for name, p in parts.named_parameters():
        if (skip_base and name.startswith("base.")) or not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return groups + [{"params": decay, "lr": lr, "weight_decay": wd, "name": f"{head}_decay"},
                     {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{head}_no_decay"}]


def as_names(model: nn.Module, groups: list[dict]) -> list[tuple]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["name"], g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in groups]


ARGS = (1e-4, 1e-5, 0.05)


@pytest.mark.parametrize("kind", ["vlp", "vlp_momentum", "vqa", "nlvr2", "nlvr2_linear", "caption"])
def test_groups_equal_each_models_former_grouping(kind):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    if kind == "vlp":
        model = VLPModel(cfg)
        expected = reference_vlp(model, *ARGS)
    elif kind == "vlp_momentum":  # the training objective trains its model's groups, never the momentum copy
        model = PretrainObjective(VLPModel(cfg), PretrainLossConfig(queue_size=8))
        expected = reference_vlp(model.model, *ARGS)
    elif kind == "vqa":
        model = VQAModel(cfg, DecoderConfig())
        expected = reference_with_head(model, model.decoder, False, "decoder", *ARGS)
    elif kind.startswith("nlvr2"):
        model = NLVR2Model(cfg, NLVR2HeadConfig(merge="linear" if kind.endswith("linear") else "mean"))
        expected = reference_with_head(model, model, True, "nlvr2", *ARGS)
    else:
        model, _ = CaptionModel.from_base(VLPModel(cfg), DecoderConfig())
        expected = reference_vlp(model, *ARGS)  # the caption model has no temperature: the same rule
    got = model.param_groups(*ARGS)
    assert as_names(model, got) == as_names(model, expected)
    assert {id(p) for g in got for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}


def test_rule_on_a_toy_model():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Module()
            self.base.visual = nn.Linear(2, 2)
            self.base.visual.pos_embed = nn.Parameter(torch.zeros(1, 3, 2))
            self.base.text = nn.Linear(2, 2)
            self.base.frozen = nn.Linear(2, 2).requires_grad_(False)
            self.head = nn.Linear(2, 2)

    toy = Toy()
    got = as_names(toy, param_groups(toy, 1.0, 0.5, 0.1, base="base.", head="extra"))
    assert got == [("vision_decay", 0.5, 0.1, ["base.visual.weight"]),
                   ("vision_no_decay", 0.5, 0.0, ["base.visual.bias", "base.visual.pos_embed"]),
                   ("text_decay", 1.0, 0.1, ["base.text.weight"]), ("text_no_decay", 1.0, 0.0, ["base.text.bias"]),
                   ("extra_decay", 1.0, 0.1, ["head.weight"]), ("extra_no_decay", 1.0, 0.0, ["head.bias"])]
    # without a head every parameter belongs to the base model
    assert [g[0] for g in as_names(toy, param_groups(toy, 1.0, 0.5, 0.1, base="base."))] == [
        "vision_decay", "vision_no_decay", "text_decay", "text_no_decay"]
