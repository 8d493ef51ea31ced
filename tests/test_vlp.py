"""Base model: momentum update, queue wrap-around, pre-training forward on a tiny model."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from models.text import TextConfig
from models.vision import VisionConfig
from models.vlp import ContrastiveConfig, PretrainLossConfig, VLPConfig, VLPModel


def tiny_cfg(queue: int = 8, momentum: float = 0.9) -> VLPConfig:
    return VLPConfig(
        vision=VisionConfig(img_size=16, patch_size=8, width=32, depth=1, num_heads=2),
        text=TextConfig(vocab_size=50, hidden_size=32, num_text_layers=1, num_fusion_layers=1, num_heads=2,
                        intermediate_size=64, max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0),
        embed_dim=16, queue_size=queue, momentum=momentum)


def tiny_batch(b: int = 4, length: int = 6, idx=None) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (b, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, -2:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    mlm_ids = ids.clone()
    mlm_ids[:, 2] = 4
    return {"image": torch.randn(b, 3, 16, 16, generator=g), "input_ids": ids, "attention_mask": mask,
            "mlm_input_ids": mlm_ids, "mlm_labels": labels,
            "image_idx": torch.tensor(idx if idx is not None else list(range(b)))}


def test_momentum_update_is_exact_ema():
    torch.manual_seed(0)
    model = VLPModel(tiny_cfg(momentum=0.9))
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.momentum_update()
    after = dict(model.named_parameters())
    checked = 0
    for name, p_m in after.items():
        for online_prefix, mom_prefix in (("visual.", "visual_m."), ("text.", "text_m."),
                                          ("vision_proj.", "vision_proj_m."), ("text_proj.", "text_proj_m.")):
            if name.startswith(mom_prefix):
                online = before[online_prefix + name[len(mom_prefix):]].double()
                expect = 0.9 * before[name].double() + 0.1 * online
                torch.testing.assert_close(p_m.detach().double(), expect, rtol=0, atol=1e-6)
                checked += 1
    assert checked > 10
    # momentum text model has no fusion layers
    assert len(model.text_m.encoder.layer) == 1 and len(model.text.encoder.layer) == 2


def test_queue_enqueue_and_wrap_around():
    model = VLPModel(tiny_cfg(queue=5))
    feats = [torch.full((3, 16), float(k)) for k in range(3)]
    for k, f in enumerate(feats):
        model.enqueue(f, -f, torch.tensor([10 * k, 10 * k + 1, 10 * k + 2]))
    # 9 entries into a queue of 5: slots hold the newest ones, written at ptr modulo 5
    # writes: k0 -> 0,1,2 ; k1 -> 3,4,0 ; k2 -> 1,2,3
    assert model.idx_queue.tolist() == [12, 20, 21, 22, 11]
    assert model.queue_ptr.item() == 4
    assert model.image_queue[0].tolist() == [1.0, 2.0, 2.0, 2.0, 1.0]
    assert model.text_queue[0].tolist() == [-1.0, -2.0, -2.0, -2.0, -1.0]


def test_pretrain_forward_backward_and_queue_positives():
    torch.manual_seed(0)
    model = VLPModel(tiny_cfg(queue=8))
    loss_cfg = PretrainLossConfig()
    batch = tiny_batch(4, idx=[0, 0, 1, 2])  # two captions of image 0: positives of each other
    out = model(batch, loss_cfg)
    for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
        assert torch.isfinite(out[k]), k
    out["loss"].backward()
    assert model.visual.patch_embed.proj.weight.grad is not None
    assert model.itm_head.weight.grad is not None
    # positives (same image id) are never negatives, including the queued copies
    assert model.idx_queue[:4].tolist() == [0, 0, 1, 2]
    out2 = model(batch, loss_cfg)
    neg = out2["neg_mask"]
    idx_all = torch.cat([batch["image_idx"], model.idx_queue.new_tensor([0, 0, 1, 2, -1, -1, -1, -1])])
    same = batch["image_idx"][:, None] == idx_all[None, :]
    assert not (neg & same).any()
    assert not neg[:, -4:].any()  # unfilled queue slots are never negatives
    w = out2["weights_i2t"]
    assert torch.allclose((w * neg).sum(1) / neg.sum(1), torch.ones(4), atol=1e-5)


def test_queue_joins_the_loss_at_queue_start_step():
    torch.manual_seed(0)
    model = VLPModel(tiny_cfg(queue=8, momentum=0.0))
    model.eval()  # deterministic forward
    batch = tiny_batch(4)
    model(batch, PretrainLossConfig(itm=0.0, mlm=0.0))  # fill half of the queue
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def run(step, **contrastive):
        model.load_state_dict(state)
        cfg = PretrainLossConfig(itm=0.0, mlm=0.0, contrastive=ContrastiveConfig(kind="infonce", **contrastive))
        return model(batch, cfg, step=step)

    without = run(None, use_queue=False)
    before = run(4, queue_start_step=5)
    after = run(5, queue_start_step=5)
    assert before["neg_mask"].shape[1] == 4 and after["neg_mask"].shape[1] == 12
    torch.testing.assert_close(before["loss_itc"], without["loss_itc"])
    assert not torch.allclose(after["loss_itc"], without["loss_itc"])
    # the queue is written either way
    model.load_state_dict(state)
    run(4, queue_start_step=5)
    assert int(model.queue_ptr) == 0 and model.idx_queue.tolist() == [0, 1, 2, 3] * 2
    with pytest.raises(ValueError, match="queue_start_step"):
        ContrastiveConfig(queue_start_step=-1).validate()


def test_infonce_kind_has_no_weights_and_srcl_delta0_equals_infonce():
    torch.manual_seed(0)
    model = VLPModel(tiny_cfg(queue=0))
    batch = tiny_batch(4)
    no_extra = dict(itm=0.0, mlm=0.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = model(batch, PretrainLossConfig(contrastive=ContrastiveConfig(kind="infonce"), **no_extra))
    model.load_state_dict(state)
    b = model(batch, PretrainLossConfig(contrastive=ContrastiveConfig(kind="srcl", delta=0.0), **no_extra))
    model.load_state_dict(state)
    c = model(batch, PretrainLossConfig(contrastive=ContrastiveConfig(kind="srcl", delta=2.0), **no_extra))
    assert "weights_i2t" not in a
    torch.testing.assert_close(a["loss_itc"], b["loss_itc"])
    assert not torch.allclose(a["loss_itc"], c["loss_itc"])


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
    assert not any(id(p) in seen for p in model.momentum_parameters())


def test_pretrained_encoders_load_into_online_and_momentum(tmp_path):
    """model.text_weights (a local HF BERT directory) and model.vision_weights (a timm/DeiT file)
    initialise the encoders, and the momentum copies start from the same weights."""
    import timm
    from transformers import BertConfig, BertForPreTraining

    from tasks.common import load_vlp

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
    reports = load_vlp(model)
    assert len(reports) == 2
    for r in reports:
        r.raise_if_unexpected()
    w = bert.bert.encoder.layer[1].attention.self.query.weight
    torch.testing.assert_close(model.text.encoder.layer[1].attention.self.query.weight, w)
    torch.testing.assert_close(model.text_m.encoder.layer[0].attention.self.query.weight,
                               bert.bert.encoder.layer[0].attention.self.query.weight)
    torch.testing.assert_close(model.visual.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(model.visual_m.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    # the MLM decoder stays tied to the (loaded) word embeddings
    assert model.mlm_head.decoder.weight.data_ptr() == model.text.embeddings.word_embeddings.weight.data_ptr()
    torch.testing.assert_close(model.text.embeddings.word_embeddings.weight, bert.bert.embeddings.word_embeddings.weight)
