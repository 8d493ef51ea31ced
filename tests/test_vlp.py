"""Base model: parameter groups and encoder weights from local files (the pre-training objective's
momentum copy and queues: tests/test_objective.py)."""
from __future__ import annotations

import dataclasses

import torch

from models.text import TextConfig
from models.vision import VisionConfig
from models.vlp import VLPConfig, VLPModel


def tiny_cfg() -> VLPConfig:
    return VLPConfig(
        vision=VisionConfig(img_size=16, patch_size=8, width=32, depth=1, num_heads=2),
        text=TextConfig(vocab_size=50, hidden_size=32, num_text_layers=1, num_fusion_layers=1, num_heads=2,
                        intermediate_size=64, max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0),
        embed_dim=16)


def test_param_groups_split_vision_lr():
    model = VLPModel(tiny_cfg())
    groups = model.param_groups(lr=1e-4, lr_vision=1e-5, weight_decay=0.02)
    seen = set()
    for g in groups:
        for p in g["params"]:
            seen.add(id(p))
        if g["name"].startswith("vision"):
            assert g["lr"] == 1e-5
        else:
            assert g["lr"] == 1e-4
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert seen == trainable


def test_pretrained_encoders_load(tmp_path):
    """model.text_weights (a local HF BERT directory) and model.vision_weights (a timm/DeiT file)
    initialise the encoders (and a pre-training objective built on the model copies them into its
    momentum encoders)."""
    import timm
    from transformers import BertConfig, BertForPreTraining

    from models.loading import load_encoder_weights
    from objectives.pretrain import PretrainLossConfig, PretrainObjective

    torch.manual_seed(1)
    bert = BertForPreTraining(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=16))
    bert.save_pretrained(tmp_path / "bert")
    vit = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1,
                                                           num_heads=2, num_classes=5)
    torch.save({"model": vit.state_dict()}, tmp_path / "deit.pth")
    cfg = dataclasses.replace(tiny_cfg(), text_weights=str(tmp_path / "bert"),
                              vision_weights=str(tmp_path / "deit.pth"), vision_weights_format="deit")
    model = VLPModel(cfg)
    reports = load_encoder_weights(model)
    assert len(reports) == 2
    for r in reports:
        r.raise_if_unexpected()
    w = bert.bert.encoder.layer[1].attention.self.query.weight
    torch.testing.assert_close(model.text.encoder.layer[1].attention.self.query.weight, w)
    torch.testing.assert_close(model.visual.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    objective = PretrainObjective(model, PretrainLossConfig(queue_size=8))
    torch.testing.assert_close(objective.text_m.encoder.layer[0].attention.self.query.weight,
                               bert.bert.encoder.layer[0].attention.self.query.weight)
    torch.testing.assert_close(objective.visual_m.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    # the MLM decoder stays tied to the (loaded) word embeddings
    assert model.mlm_head.decoder.weight.data_ptr() == model.text.embeddings.word_embeddings.weight.data_ptr()
    torch.testing.assert_close(model.text.embeddings.word_embeddings.weight, bert.bert.embeddings.word_embeddings.weight)
