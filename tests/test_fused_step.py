"""The pre-training step's one fusion pass: ITM (positive, hard-negative image, hard-negative text)
and MLM rows share each image's cross-attention keys/values per layer, the first fusion layer's
self-attention runs once per distinct text, the last layer computes only the tokens a loss reads,
and the momentum encoders' last blocks compute only the class token. Checked against independent
re-computations of the unshared path (float64): outputs, losses and gradients equal, and exactly
the analytic number of FLOPs fewer."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models import losses as L
from models.text import QueryLayout, TextConfig, TextTransformer
from models.vision import VisionConfig, build_vit, vit_tokens
from models.vlp import VLPConfig, VLPModel, vit_class_token
from objectives.pretrain import PretrainLossConfig, PretrainObjective

HIDDEN, WIDTH, INTER, N_IMG, LENGTH = 16, 24, 32, 5, 6


def _text_model(checkpointing: bool = False, fusion_layers: int = 2) -> TextTransformer:
    cfg = TextConfig(vocab_size=40, hidden_size=HIDDEN, num_text_layers=1, num_fusion_layers=fusion_layers,
                     num_heads=2, intermediate_size=INTER, max_position_embeddings=8, hidden_dropout=0.0,
                     attention_dropout=0.0, encoder_width=WIDTH, grad_checkpointing=checkpointing)
    torch.manual_seed(0)
    return TextTransformer(cfg).double().train()


def _fusion_inputs():
    """3 distinct images, 2 distinct texts (padding in both), 7 rows mapping to them, a selection
    with 1 token in some rows, several in others and none in one."""
    g = torch.Generator().manual_seed(1)
    image = torch.randn(3, N_IMG, WIDTH, generator=g, dtype=torch.float64, requires_grad=True)
    image_mask = torch.ones(3, N_IMG, dtype=torch.long)
    image_mask[2, -2:] = 0
    text = torch.randn(2, LENGTH, HIDDEN, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, -2:] = 0
    text_index = torch.tensor([0, 0, 1, 1, 0, 1, 0])
    image_index = torch.tensor([0, 1, 2, 0, 2, 1, 1])
    select = torch.zeros(7, LENGTH, dtype=torch.bool)
    select[:4, 0] = True
    select[4, [1, 3, 4]] = True
    select[6, [0, 2]] = True  # row 5: nothing selected
    return image, image_mask, text, mask, text_index, image_index, select


def _grads(tensors, module):
    return [t.grad.clone() for t in tensors] + [p.grad.clone() for p in module.parameters() if p.grad is not None]


def _zero(tensors, module):
    for t in (*tensors, *module.parameters()):
        t.grad = None


def test_query_layout_pads_and_unpads_in_select_order():
    select = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.bool)
    lay = QueryLayout.from_select(select)
    assert lay.rows.tolist() == [0, 2] and lay.width == 2
    assert lay.row.tolist() == [0, 0, 1] and lay.pos.tolist() == [0, 2, 1] and lay.slot.tolist() == [0, 1, 0]
    x = torch.arange(6.0).view(3, 2)
    padded = lay.pad(x)
    assert padded.tolist() == [[[0, 1], [2, 3]], [[4, 5], [0, 0]]]
    assert torch.equal(lay.unpad(padded), x)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("fusion_layers", [1, 2])
def test_shared_fusion_equals_gathered_fusion(checkpointing, fusion_layers):
    model = _text_model(checkpointing, fusion_layers)
    image, image_mask, text, mask, text_index, image_index, select = _fusion_inputs()
    ref = model.forward_fusion(text[text_index], mask[text_index], image[image_index], image_mask[image_index])[select]
    ref.square().sum().backward()
    g_ref = _grads((image, text), model)
    _zero((image, text), model)
    out = model.forward_fusion(text, mask, image, image_mask, image_index=image_index, text_index=text_index,
                               select=select)
    assert out.shape == (int(select.sum()), HIDDEN)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    for a, b in zip(_grads((image, text), model), g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_shared_fusion_saves_exactly_the_analytic_flops():
    """What disappears: per fusion layer the repeated image keys/values (7 rows read 3 images), in
    the first layer the self-attention projections of the repeated texts (7 rows, 2 texts), in the
    last layer the query / output / cross-attention query and output / FFN of the unselected
    tokens. (The CPU attention kernel is not counted by the FLOP counter, so only projections
    differ.) Forward + backward = 3x the forward, the inputs requiring gradients."""
    model = _text_model(fusion_layers=2)
    image, image_mask, text, mask, text_index, image_index, select = _fusion_inputs()
    with FlopCounterMode(display=False) as fc_ref:
        model.forward_fusion(text[text_index], mask[text_index], image[image_index])[select].sum().backward()
    _zero((image, text), model)
    with FlopCounterMode(display=False) as fc:
        model.forward_fusion(text, mask, image, image_index=image_index, text_index=text_index,
                             select=select).sum().backward()
    rows, distinct_images, distinct_texts, n_sel = 7, 3, 2, int(select.sum())
    used_rows = int(select.any(1).sum())
    h, w, i, n, length = HIDDEN, WIDTH, INTER, N_IMG, LENGTH
    kv_image = 2 * 2 * n * w * h                      # keys + values of one image, one layer
    self_attn = 4 * 2 * length * h * h                # q, k, v, output of one text, one layer
    per_token_last = 2 * h * h * 4 + 2 * 2 * h * i    # q, output, cross q, cross output, FFN
    kv_text_last = 2 * 2 * length * h * h             # last layer's self keys + values per row
    saved_fwd = (2 * (rows - distinct_images) * kv_image          # both layers; last layer reads used rows only
                 + (rows - distinct_texts) * self_attn             # first layer
                 + (rows * length - n_sel) * per_token_last        # last layer, unselected tokens
                 + (rows - used_rows) * kv_text_last)              # last layer: a row with nothing selected
    assert fc_ref.get_total_flops() - fc.get_total_flops() == 3 * saved_fwd


def _vlp_cfg(checkpointing: bool = False) -> VLPConfig:
    return VLPConfig(
        vision=VisionConfig(img_size=16, patch_size=8, width=32, depth=2, num_heads=2,
                            grad_checkpointing=checkpointing),
        text=TextConfig(vocab_size=50, hidden_size=32, num_text_layers=1, num_fusion_layers=2, num_heads=2,
                        intermediate_size=64, max_position_embeddings=16, hidden_dropout=0.0,
                        attention_dropout=0.0, grad_checkpointing=checkpointing),
        embed_dim=16)


def _objective(cfg: VLPConfig, **loss) -> PretrainObjective:
    return PretrainObjective(VLPModel(cfg), PretrainLossConfig(queue_size=8, momentum=0.9, **loss)).double().train()


def _batch(b: int = 5, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (b, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, -2:] = 0
    mask[3, -1:] = 0
    masked = (torch.rand(b, length, generator=g) < 0.3) & mask.bool()
    masked[:, 0] = False
    masked[1, 2] = True
    masked[2] = False  # a caption without masked tokens
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    return {"image": torch.randn(b, 3, 16, 16, generator=g, dtype=torch.float64), "input_ids": ids,
            "attention_mask": mask, "mlm_input_ids": torch.where(masked, torch.full_like(ids, 4), ids),
            "mlm_labels": labels, "image_idx": torch.tensor([0, 1, 1, 2, 3])}


def _reference_losses(obj: PretrainObjective, batch: dict, generator) -> dict:
    """The pre-training losses computed the unshared way: full momentum encoders, ITM on the
    gathered (text, image) pairs, MLM in its own full fusion pass, states selected afterwards."""
    image, ids, mask, idx = batch["image"], batch["input_ids"], batch["attention_mask"], batch["image_idx"]
    model, loss_cfg = obj.model, obj.cfg
    ccfg = loss_cfg.contrastive
    image_embeds = vit_tokens(model.visual, image)
    text_embeds = model.text.forward_text(ids, mask)
    # features, ITM and MLM logits in float32 as the model computes them (the rest in float64)
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]).float(), dim=-1)
    text_feat = F.normalize(model.text_proj(text_embeds[:, 0]).float(), dim=-1)
    with torch.no_grad():
        obj.momentum_update()
        image_feat_m = F.normalize(obj.vision_proj_m(vit_tokens(obj.visual_m, image)[:, 0]).float(), dim=-1)
        text_feat_m = F.normalize(obj.text_proj_m(obj.text_m.forward_text(ids, mask)[:, 0]).float(), dim=-1)
        valid_q = obj.idx_queue >= 0
        image_all = torch.cat([image_feat_m, obj.image_queue.T.float()])
        text_all = torch.cat([text_feat_m, obj.text_queue.T.float()])
        idx_all = torch.cat([idx, obj.idx_queue])
        pos = idx[:, None] == idx_all[None, :]
        valid = torch.cat([torch.ones_like(idx, dtype=torch.bool), valid_q])[None, :].expand_as(pos)
        neg = valid & ~pos
        w_i2t = L.regulation_weights(image_feat_m @ text_all.T, neg, ccfg.delta)
        w_t2i = L.regulation_weights(text_feat_m @ image_all.T, neg, ccfg.delta)
    loss_itc = (L.contrastive_loss(image_feat @ text_all.T / model.temp, pos, valid, w_i2t).mean()
                + L.contrastive_loss(text_feat @ image_all.T / model.temp, pos, valid, w_t2i).mean()) / 2
    with torch.no_grad():
        pos_local = idx[:, None] == idx[None, :]
        sim = image_feat @ text_feat.T
        neg_text = L.sample_hard_negatives(sim, pos_local, generator)
        neg_image = L.sample_hard_negatives(sim.T, pos_local.T, generator)
    text_in = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]])
    mask_in = torch.cat([mask, mask, mask[neg_text]])
    image_in = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])
    itm_logits = model.itm_head(model.text.forward_fusion(text_in, mask_in, image_in)[:, 0])
    b = ids.shape[0]
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)])
    loss_itm = F.cross_entropy(itm_logits.float(), labels)
    mlm_states = model.text.forward_fusion(model.text.forward_text(batch["mlm_input_ids"], mask), mask, image_embeds)
    sel = batch["mlm_labels"] != -100
    loss_mlm = F.cross_entropy(model.mlm_head(mlm_states[sel]).float(), batch["mlm_labels"][sel], reduction="sum") / sel.sum()
    return {"loss_itc": loss_itc, "loss_itm": loss_itm, "loss_mlm": loss_mlm,
            "image_feat_m": image_feat_m, "text_feat_m": text_feat_m,
            "loss": loss_cfg.itc * loss_itc + loss_cfg.itm * loss_itm + loss_cfg.mlm * loss_mlm}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_pretrain_losses_and_gradients_equal_the_unshared_path(checkpointing):
    torch.manual_seed(0)
    model = _objective(_vlp_cfg(checkpointing))
    ref_model = copy.deepcopy(model)
    with torch.no_grad():  # a momentum copy that differs from the online model, and a filled queue part
        for p in model.momentum_parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.enqueue(F.normalize(torch.randn(3, 16, dtype=torch.float64), dim=-1),
                      F.normalize(torch.randn(3, 16, dtype=torch.float64), dim=-1), torch.tensor([1, 7, 8]))
    ref_model.load_state_dict(model.state_dict())
    batch = _batch()
    out = model(batch, generator=torch.Generator().manual_seed(3))
    ref = _reference_losses(ref_model, batch, torch.Generator().manual_seed(3))
    for k in ("loss_itc", "loss_itm", "loss_mlm", "loss"):
        torch.testing.assert_close(out[k], ref[k], rtol=1e-12, atol=1e-12, msg=k)
    out["loss"].backward()
    ref["loss"].backward()
    n = 0
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
        n += 1
    assert n > 40
    # the queues received the same momentum features (the class tokens of the full momentum encoders)
    ref_model.enqueue(ref["image_feat_m"], ref["text_feat_m"], batch["image_idx"])
    for name in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
        torch.testing.assert_close(getattr(model, name), getattr(ref_model, name), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("itm, mlm", [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_pretrain_with_itm_or_mlm_off_equals_the_unshared_path(itm, mlm):
    torch.manual_seed(0)
    model = _objective(_vlp_cfg(), itm=itm, mlm=mlm)
    ref_model = copy.deepcopy(model)
    batch = _batch()
    out = model(batch, generator=torch.Generator().manual_seed(3))
    ref = _reference_losses(ref_model, batch, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-12, atol=1e-12)
    assert ("loss_itm" in out) == (itm > 0) and ("loss_mlm" in out) == (mlm > 0)
    for k in ("loss_itm", "loss_mlm"):
        if k in out:
            torch.testing.assert_close(out[k], ref[k], rtol=1e-12, atol=1e-12)


def test_pretrain_step_with_dropout_runs():
    cfg = _vlp_cfg()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, hidden_dropout=0.1, attention_dropout=0.1))
    torch.manual_seed(0)
    model = _objective(cfg)
    out = model(_batch())
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.model.text.encoder.layer[-1].crossattention.self.key.weight.grad is not None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_vit_class_token_equals_the_full_forward(checkpointing):
    torch.manual_seed(0)
    vit = build_vit(VisionConfig(img_size=16, patch_size=8, width=32, depth=2, num_heads=4,
                                 grad_checkpointing=checkpointing)).double().train()
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    ref = vit_tokens(vit, images)[:, 0]
    ref.square().sum().backward()
    g_ref = [p.grad.clone() for p in vit.parameters()]
    vit.zero_grad(set_to_none=True)
    out = vit_class_token(vit, images)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    for a, b in zip([p.grad for p in vit.parameters()], g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the last block's MLP ran on the class token only: a third of the tokens' FLOPs of it
    with FlopCounterMode(display=False) as fc_ref, torch.no_grad():
        vit_tokens(vit, images)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        vit_class_token(vit, images)
    n, w = 1 + (16 // 8) ** 2, 32
    saved = (n - 1) * 3 * (2 * w * w + 2 * w * w + 2 * 2 * w * 4 * w)  # q, proj, MLP of 4 of 5 tokens, 3 images
    assert fc_ref.get_total_flops() - fc.get_total_flops() == saved


def test_momentum_text_class_token_equals_the_full_forward():
    model = _text_model()
    ids = torch.randint(5, 40, (3, LENGTH))
    mask = torch.ones(3, LENGTH, dtype=torch.long)
    mask[1, -3:] = 0
    cls = torch.zeros(3, LENGTH, dtype=torch.bool)
    cls[:, 0] = True
    torch.testing.assert_close(model.forward_text(ids, mask, select=cls), model.forward_text(ids, mask)[:, 0],
                               rtol=1e-12, atol=1e-12)
