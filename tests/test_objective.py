"""The pre-training objective (objectives/pretrain.py): momentum update, queue wrap-around, the
pre-training forward on a tiny model, the checkpoint split into the model's and the objective's
state (older layouts and ALBEF/BLIP names included), the momentum copy of a checkpoint, and the
config keys that moved beside the losses."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from models.loading import interpolate_pos_embed, split_objective_state
from models.text import TextConfig
from models.vision import VisionConfig
from models.vlp import VLPConfig, VLPModel
from objectives.pretrain import (ContrastiveConfig, PretrainLossConfig, PretrainObjective, checkpoint_states,
                                 moved_config_keys)


def tiny_cfg(img_size: int = 16) -> VLPConfig:
    return VLPConfig(
        vision=VisionConfig(img_size=img_size, patch_size=8, width=32, depth=1, num_heads=2),
        text=TextConfig(vocab_size=50, hidden_size=32, num_text_layers=1, num_fusion_layers=1, num_heads=2,
                        intermediate_size=64, max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0),
        embed_dim=16)


def tiny(queue: int = 8, momentum: float = 0.9, img_size: int = 16, helper_dim=None, **loss) -> PretrainObjective:
    return PretrainObjective(VLPModel(tiny_cfg(img_size)), PretrainLossConfig(queue_size=queue, momentum=momentum, **loss),
                             helper_dim=helper_dim)


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
    obj = tiny(momentum=0.9)
    for p in obj.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in obj.named_parameters()}
    obj.momentum_update()
    after = dict(obj.named_parameters())
    checked = 0
    for name, p_m in after.items():
        for online_prefix, mom_prefix in (("model.visual.", "visual_m."), ("model.text.", "text_m."),
                                          ("model.vision_proj.", "vision_proj_m."), ("model.text_proj.", "text_proj_m.")):
            if name.startswith(mom_prefix):
                online = before[online_prefix + name[len(mom_prefix):]].double()
                expect = 0.9 * before[name].double() + 0.1 * online
                torch.testing.assert_close(p_m.detach().double(), expect, rtol=0, atol=1e-6)
                checked += 1
    assert checked > 10
    # momentum text model has no fusion layers
    assert len(obj.text_m.encoder.layer) == 1 and len(obj.model.text.encoder.layer) == 2


def test_queue_enqueue_and_wrap_around():
    obj = tiny(queue=5)
    feats = [torch.full((3, 16), float(k)) for k in range(3)]
    for k, f in enumerate(feats):
        obj.enqueue(f, -f, torch.tensor([10 * k, 10 * k + 1, 10 * k + 2]))
    # 9 entries into a queue of 5: slots hold the newest ones, written at ptr modulo 5
    # writes: k0 -> 0,1,2 ; k1 -> 3,4,0 ; k2 -> 1,2,3
    assert obj.idx_queue.tolist() == [12, 20, 21, 22, 11]
    assert obj.queue_ptr.item() == 4
    assert obj.image_queue[0].tolist() == [1.0, 2.0, 2.0, 2.0, 1.0]
    assert obj.text_queue[0].tolist() == [-1.0, -2.0, -2.0, -2.0, -1.0]


def test_pretrain_forward_backward_and_queue_positives():
    torch.manual_seed(0)
    obj = tiny(queue=8, momentum=0.995)
    batch = tiny_batch(4, idx=[0, 0, 1, 2])  # two captions of image 0: positives of each other
    out = obj(batch)
    for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
        assert torch.isfinite(out[k]), k
    out["loss"].backward()
    assert obj.model.visual.patch_embed.proj.weight.grad is not None
    assert obj.model.itm_head.weight.grad is not None
    # positives (same image id) are never negatives, including the queued copies
    assert obj.idx_queue[:4].tolist() == [0, 0, 1, 2]
    out2 = obj(batch)
    neg = out2["neg_mask"]
    idx_all = torch.cat([batch["image_idx"], obj.idx_queue.new_tensor([0, 0, 1, 2, -1, -1, -1, -1])])
    same = batch["image_idx"][:, None] == idx_all[None, :]
    assert not (neg & same).any()
    assert not neg[:, -4:].any()  # unfilled queue slots are never negatives
    w = out2["weights_i2t"]
    assert torch.allclose((w * neg).sum(1) / neg.sum(1), torch.ones(4), atol=1e-5)


def test_queue_joins_the_loss_at_queue_start_step():
    torch.manual_seed(0)
    obj = tiny(queue=8, momentum=0.0, itm=0.0, mlm=0.0)
    obj.eval()  # deterministic forward
    batch = tiny_batch(4)
    obj(batch)  # fill half of the queue
    state = {k: v.clone() for k, v in obj.state_dict().items()}

    def run(step, **contrastive):
        obj.load_state_dict(state)
        obj.cfg = PretrainLossConfig(itm=0.0, mlm=0.0, queue_size=8, momentum=0.0,
                                     contrastive=ContrastiveConfig(kind="infonce", **contrastive))
        return obj(batch, step=step)

    without = run(None, use_queue=False)
    before = run(4, queue_start_step=5)
    after = run(5, queue_start_step=5)
    assert before["neg_mask"].shape[1] == 4 and after["neg_mask"].shape[1] == 12
    torch.testing.assert_close(before["loss_itc"], without["loss_itc"])
    assert not torch.allclose(after["loss_itc"], without["loss_itc"])
    # the queue is written either way
    obj.load_state_dict(state)
    run(4, queue_start_step=5)
    assert int(obj.queue_ptr) == 0 and obj.idx_queue.tolist() == [0, 1, 2, 3] * 2
    with pytest.raises(ValueError, match="queue_start_step"):
        ContrastiveConfig(queue_start_step=-1).validate()


def test_infonce_kind_has_no_weights_and_srcl_delta0_equals_infonce():
    torch.manual_seed(0)
    obj = tiny(queue=0, momentum=0.995)
    batch = tiny_batch(4)
    state = {k: v.clone() for k, v in obj.state_dict().items()}
    outs = []
    for contrastive in (ContrastiveConfig(kind="infonce"), ContrastiveConfig(kind="srcl", delta=0.0),
                        ContrastiveConfig(kind="srcl", delta=2.0)):
        obj.load_state_dict(state)
        obj.cfg = PretrainLossConfig(contrastive=contrastive, itm=0.0, mlm=0.0, queue_size=0)
        outs.append(obj(batch))
    a, b, c = outs
    assert "weights_i2t" not in a
    torch.testing.assert_close(a["loss_itc"], b["loss_itc"])
    assert not torch.allclose(a["loss_itc"], c["loss_itc"])


def test_param_groups_are_the_models_without_the_momentum_copy():
    obj = tiny()
    groups = obj.param_groups(lr=1e-4, lr_vision=1e-5, weight_decay=0.02)
    assert [[id(p) for p in g["params"]] for g in groups] == \
        [[id(p) for p in g["params"]] for g in obj.model.param_groups(1e-4, 1e-5, 0.02)]
    seen = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in seen for p in obj.momentum_parameters())
    assert not any(p.requires_grad for p in obj.momentum_parameters())


# ------------------------------------------------------------------------------ checkpoint layout
def _flat(obj: PretrainObjective) -> dict:
    """The state as checkpoints held it before the objective had its own entry: one dict."""
    model, objective = split_objective_state({k[len("model."):] if k.startswith("model.") else k: v
                                              for k, v in obj.state_dict().items()})
    return {**model, **objective}


def test_split_objective_state_of_our_and_albef_names():
    obj = tiny(helper_dim=4)
    flat = _flat(obj)
    model, objective = split_objective_state(flat)
    assert set(model) == set(obj.model.state_dict())
    assert set(objective) == {k for k in obj.state_dict() if not k.startswith("model.")}
    assert {"image_queue", "text_queue", "idx_queue", "queue_ptr", "image_queue_h", "text_queue_h"} <= set(objective)
    assert any(k.startswith("visual_m.") for k in objective) and not any("_m." in k for k in model)
    # a model's own state comes back whole; ALBEF / BLIP names split the same way
    assert split_objective_state(model) == (model, {})
    albef = {"visual_encoder.cls_token": 1, "visual_encoder_m.cls_token": 2, "text_encoder_m.bert.x": 3,
             "vision_proj_m.weight": 4, "text_decoder_m.y": 5, "ptr_queue": 6, "idx_queue": 7, "temp": 8}
    m, o = split_objective_state(albef)
    assert m == {"visual_encoder.cls_token": 1, "temp": 8} and set(o) == set(albef) - set(m)
    # checkpoint_states: the new layout as it is, the old one split
    assert checkpoint_states({"model": model, "objective": objective}) == (model, objective)
    assert checkpoint_states({"model": flat}) == (model, objective)


def test_objective_state_of_another_image_size_and_absent_parts():
    """A momentum copy of a checkpoint at another image size loads with the position embeddings
    interpolated (as the model's are); a part the checkpoint lacks is copied from the online model;
    a part that does not fit is a clear error."""
    torch.manual_seed(0)
    src = tiny(img_size=32)
    with torch.no_grad():
        for p in src.momentum_parameters():
            p.add_(torch.randn_like(p))
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("model.")}
    torch.manual_seed(1)
    dst = tiny(img_size=16)
    notes = dst.load_momentum(state)
    assert notes == []
    torch.testing.assert_close(dst.visual_m.pos_embed, interpolate_pos_embed(src.visual_m.pos_embed.detach(), 2))
    assert torch.equal(dst.text_m.encoder.layer[0].attention.self.query.weight,
                       src.text_m.encoder.layer[0].attention.self.query.weight)
    assert (dst.idx_queue == -1).all() and int(dst.queue_ptr) == 0  # queues untouched (empty)
    partial = {k: v for k, v in state.items() if not k.startswith("vision_proj_m.")}
    notes = dst.load_momentum(partial)
    assert notes == ["no momentum copy vision_proj_m in the checkpoint: copied from vision_proj"]
    assert torch.equal(dst.vision_proj_m.weight, dst.model.vision_proj.weight)
    broken = {**state, "text_proj_m.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"text_proj_m.*text_proj_m\.weight: \(3, 3\)"):
        dst.load_momentum(broken)
    with pytest.raises(ValueError, match=r"missing text_m\."):
        dst.load_momentum({k: v for k, v in state.items() if not k.startswith("text_m.encoder.")})


def test_checkpoint_sections_and_resume_of_the_older_layout():
    """The trainer saves the model's own state and the objective's apart, and reads both layouts."""
    from engine.trainer import checkpoint_sections, trained_state

    torch.manual_seed(0)
    obj = tiny()
    obj(tiny_batch(4))  # a filled queue part
    full = obj.state_dict()
    sections = checkpoint_sections(obj, full)
    assert set(sections) == {"model", "objective"}
    assert set(sections["model"]) == set(obj.model.state_dict())
    assert all(not k.startswith("model.") for k in sections["objective"])
    assert "image_queue" in sections["objective"] and "visual_m.cls_token" in sections["objective"]
    for ckpt in (sections, {"model": _flat(obj)}):
        state = trained_state(obj, ckpt)
        assert set(state) == set(full) and all(torch.equal(state[k], full[k]) for k in full)
    plain = obj.model
    assert checkpoint_sections(plain, plain.state_dict()).keys() == {"model"}
    assert trained_state(plain, {"model": plain.state_dict()}) is not None


# ------------------------------------------------------------------------------ config
def test_loss_config_holds_momentum_and_queue_and_old_configs_are_read():
    with pytest.raises(ValueError, match=r"loss\.queue_size"):
        PretrainLossConfig(queue_size=-1).validate()
    with pytest.raises(ValueError, match=r"loss\.momentum"):
        PretrainLossConfig(momentum=1.0).validate()
    old = {"model": {"embed_dim": 16, "momentum": 0.9, "queue_size": 32}, "loss": {"itc": 1.0}, "train": {}}
    new = moved_config_keys(old)
    assert new["model"] == {"embed_dim": 16} and new["loss"] == {"itc": 1.0, "momentum": 0.9, "queue_size": 32}
    assert old["model"]["momentum"] == 0.9  # the input is left as it was
    assert moved_config_keys(new) == new
    from tasks.common import saved_run_config
    from tasks.pretrain_config import PretrainConfig
    cfg = saved_run_config(PretrainConfig, old)
    assert cfg.loss.momentum == 0.9 and cfg.loss.queue_size == 32 and cfg.model.embed_dim == 16
    # retrieval fine-tuning: no MLM
    from tasks.retrieval import RetrievalLossConfig
    assert RetrievalLossConfig().mlm == 0.0 and "mlm" not in {f.name for f in dataclasses.fields(RetrievalLossConfig)}


@pytest.mark.parametrize("evidence,standardise,generality,pair_weight", [("intra", False, 0.0, 0.0), ("cross+intra", True, 0.0, 0.0),
                                                                         ("cross", True, 1.5, 0.0), ("cross", True, 0.75, 1.0)])
def test_srcl_weights_from_the_intra_modal_evidence(evidence, standardise, generality, pair_weight):
    """The weights of both directions against a plain float64 re-computation from the momentum
    features: an image anchor's intra-modal evidence is its own caption's similarity to the
    candidate captions, a caption anchor's its own image's to the candidate images; the generality
    term a candidate's mean similarity to the anchors it is a negative of; the pair term a
    candidate's similarity to its own pair (column j's image with column j's caption)."""
    from models.vlp import vit_class_token
    from tests.test_losses import ref_evidence, ref_weights
    torch.manual_seed(0)
    obj = tiny(queue=0, momentum=0.5)
    obj.cfg = PretrainLossConfig(contrastive=ContrastiveConfig(kind="srcl", delta=2.0, evidence=evidence, intra_weight=0.5,
                                                               standardise=standardise, generality_weight=generality,
                                                               pair_weight=pair_weight), itm=0.0, mlm=0.0, queue_size=0)
    with torch.no_grad():  # spread the features of the random model apart
        for p in obj.model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    obj.copy_params_to_momentum()
    batch = tiny_batch(5, idx=[0, 1, 2, 0, 3])
    out = obj(batch)
    with torch.no_grad():  # the momentum encoders after the forward's EMA update
        img = torch.nn.functional.normalize(obj.vision_proj_m(vit_class_token(obj.visual_m, batch["image"])), dim=-1)
        cls = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        cls[:, 0] = True
        txt = torch.nn.functional.normalize(obj.text_proj_m(obj.text_m.forward_text(batch["input_ids"], batch["attention_mask"],
                                                                                    select=cls)), dim=-1)
    img, txt = img.double().tolist(), txt.double().tolist()
    idx = batch["image_idx"].tolist()
    neg = [[idx[i] != idx[j] for j in range(5)] for i in range(5)]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    for a, b, key in ((img, txt, "weights_i2t"), (txt, img, "weights_t2i")):
        cross = [[dot(a[i], b[j]) for j in range(5)] for i in range(5)]
        intra = [[dot(b[i], b[j]) for j in range(5)] for i in range(5)]
        pair = [dot(img[j], txt[j]) for j in range(5)]
        e = ref_evidence(cross, neg, evidence, intra, 0.5, standardise, generality, pair, pair_weight)
        ref = torch.tensor(ref_weights(e, neg, 2.0), dtype=torch.float64)
        torch.testing.assert_close(out[key].double(), ref, rtol=1e-4, atol=1e-5)
        assert float((ref - 1).abs().max()) > 0.05  # the weights regulate
    with pytest.raises(ValueError, match="intra_weight"):
        ContrastiveConfig(intra_weight=float("nan")).validate()


def test_length_evidence_reads_the_batch_and_queued_caption_lengths():
    """``length_weight``: the image anchors' evidence subtracts the candidate captions' standardised
    lengths, the batch's (attention-mask sums) and the queued ones (``length_queue``, written with the
    features); the caption anchors' evidence has no length term. Against a plain float64
    re-computation from the momentum features and the queue as it was before the forward."""
    from models.vlp import vit_class_token
    from tests.test_losses import ref_evidence, ref_weights
    torch.manual_seed(0)
    ccfg = ContrastiveConfig(kind="srcl", delta=2.0, standardise=True, length_weight=0.8)
    obj = tiny(queue=8, momentum=0.5, contrastive=ccfg, itm=0.0, mlm=0.0)
    assert obj.length_queue.shape == (8,) and "length_queue" in obj.state_dict()
    assert not hasattr(tiny(queue=8), "length_queue")  # only where the regulation reads it
    with torch.no_grad():
        for p in obj.model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    obj.copy_params_to_momentum()
    first, second = tiny_batch(5, length=8, idx=[0, 1, 2, 3, 4]), tiny_batch(5, length=8, idx=[5, 6, 2, 7, 8])
    for batch, lengths in ((first, [3, 8, 5, 6, 4]), (second, [8, 2, 7, 4, 6])):
        batch["attention_mask"] = (torch.arange(8)[None, :] < torch.tensor(lengths)[:, None]).long()
    obj(first)
    torch.testing.assert_close(obj.length_queue[:5], torch.tensor([3, 8, 5, 6, 4]))
    queue = [obj.text_queue.T.double().clone(), obj.image_queue.T.double().clone(), obj.idx_queue.clone(),
             obj.length_queue.clone()]
    out = obj(second)
    torch.testing.assert_close(obj.length_queue[5:8], torch.tensor([8, 2, 7]))  # the queue wraps after 8
    torch.testing.assert_close(obj.length_queue[:2], torch.tensor([4, 6]))
    with torch.no_grad():
        img = torch.nn.functional.normalize(obj.vision_proj_m(vit_class_token(obj.visual_m, second["image"])), dim=-1).double()
        cls = torch.zeros_like(second["input_ids"], dtype=torch.bool)
        cls[:, 0] = True
        txt = torch.nn.functional.normalize(obj.text_proj_m(obj.text_m.forward_text(
            second["input_ids"], second["attention_mask"], select=cls)), dim=-1).double()
    text_all, image_all = torch.cat([txt, queue[0]]), torch.cat([img, queue[1]])
    idx = second["image_idx"].tolist()
    idx_all = idx + queue[2].tolist()
    length_all = second["attention_mask"].sum(1).tolist() + queue[3].tolist()
    neg = [[idx_all[j] >= 0 and idx[i] != idx_all[j] for j in range(13)] for i in range(5)]
    assert sum(not neg[2][j] for j in range(5, 13)) == 3 + 1  # row 2: 3 empty slots and the queued caption of its image
    for anchors, cands, key, lw in ((img, text_all, "weights_i2t", 0.8), (txt, image_all, "weights_t2i", 0.0)):
        cross = (anchors @ cands.T).tolist()
        e = ref_evidence(cross, neg, "cross", None, 1.0, True, length=length_all, length_weight=lw)
        ref = torch.tensor(ref_weights(e, neg, 2.0), dtype=torch.float64)
        m = torch.tensor(neg)
        torch.testing.assert_close(out[key].double()[m], ref[m], rtol=1e-4, atol=1e-5)
    plain = ref_weights(ref_evidence((img @ text_all.T).tolist(), neg, "cross", None, 1.0, True), neg, 2.0)
    assert float((out["weights_i2t"].double() - torch.tensor(plain, dtype=torch.float64))[torch.tensor(neg)].abs().max()) > 0.05
    with pytest.raises(ValueError, match="length_weight"):
        ContrastiveConfig(length_weight=float("nan")).validate()
