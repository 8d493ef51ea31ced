"""ALBEF / BLIP checkpoint import: exact key layouts at tiny sizes, full round trips, loud failures.

The ALBEF and BLIP state dicts are built here from one of our tiny models by inverse maps written
independently of ``models/key_maps.py`` (from the key names of salesforce/ALBEF models/model_pretrain.py,
model_retrieval.py, xbert.py, vit.py and salesforce/BLIP models/blip_pretrain.py, blip_retrieval.py,
med.py, vit.py). Loading them into a freshly initialised model must reproduce the source model's
features and ITM logits exactly (and, through the pre-training objective, its momentum features).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import ConfigError
from models.loading import (architecture, checkpoint_filter_fn, detect_layout, fit_problems, interpolate_pos_embed,
                            load_checkpoint_into, split_objective_state)
from models.text import TextConfig
from models.vision import VisionConfig
from models.vlp import VLPConfig, VLPModel
from objectives.pretrain import PretrainLossConfig, PretrainObjective, load_objective_from_checkpoint

V, H, W, E, Q, MAXPOS = 50, 32, 32, 16, 8, 40
ROOT_DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo" / "pretrain.yaml"
N_TEXT, N_FUSION = 2, 2


def tiny_cfg(**vision) -> VLPConfig:
    v = dict(img_size=32, patch_size=8, width=W, depth=2, num_heads=2)
    v.update(vision)
    return VLPConfig(vision=VisionConfig(**v),
                     text=TextConfig(vocab_size=V, hidden_size=H, num_text_layers=N_TEXT, num_fusion_layers=N_FUSION,
                                     num_heads=2, intermediate_size=64, max_position_embeddings=MAXPOS,
                                     hidden_dropout=0.0, attention_dropout=0.0),
                     embed_dim=E)


_MODELS: dict = {}


def make_model(seed: int, **vision) -> PretrainObjective:
    """A tiny model, in the pre-training objective with its momentum copy and queue, with seeded
    weights (built once per argument set, then copied: tests stay fast)."""
    key = (seed, tuple(sorted(vision.items())))
    if key not in _MODELS:
        _MODELS[key] = _build_model(seed, **vision)
    return copy.deepcopy(_MODELS[key])


def _build_model(seed: int, **vision) -> PretrainObjective:
    torch.manual_seed(seed)
    m = PretrainObjective(VLPModel(tiny_cfg(**vision)), PretrainLossConfig(queue_size=Q)).eval()
    with torch.no_grad():  # distinct online / momentum weights and a non-trivial queue
        for p in m.momentum_parameters():
            p.add_(0.01 * torch.randn_like(p))
        m.image_queue.copy_(torch.randn(E, Q))
        m.text_queue.copy_(torch.randn(E, Q))
        m.idx_queue.copy_(torch.tensor([3, 1, 4, 1, 5, -1, -1, -1]))
        m.queue_ptr.fill_(5)
        m.model.temp.fill_(0.05)
    return m


def state_of(m) -> dict:
    """The state in one dict, our names: a model's, or an objective's model and its momentum copy and
    queues side by side (as ALBEF/BLIP checkpoints hold them)."""
    if isinstance(m, PretrainObjective):
        return {**m.model.state_dict(), **{k: v for k, v in m.state_dict().items() if not k.startswith("model.")}}
    return m.state_dict()


def load_both(dst: PretrainObjective, sd: dict, **kwargs):
    """An ALBEF/BLIP state into the model (``load_checkpoint_into``) and its momentum copy into the
    objective, as fine-tuning does; the momentum notes join the report's."""
    return load_ckpt(dst, {"model": sd}, **kwargs)


def load_ckpt(dst: PretrainObjective, ckpt: dict, **kwargs):
    """A checkpoint (``model``, optionally ``objective``) into the model and the objective's momentum copy."""
    report = load_checkpoint_into(dst.model, ckpt, **kwargs)
    report.notes += load_objective_from_checkpoint(dst, ckpt)
    return report


def rand_like_layer(layer: int, cross: bool, width: int = W) -> dict:
    """Random tensors for one BERT layer in HF names (sub-keys after ``encoder.layer.<i>.``)."""
    g = torch.Generator().manual_seed(100 + layer)
    shapes = {"attention.self.query.weight": (H, H), "attention.self.query.bias": (H,),
              "attention.self.key.weight": (H, H), "attention.self.key.bias": (H,),
              "attention.self.value.weight": (H, H), "attention.self.value.bias": (H,),
              "attention.output.dense.weight": (H, H), "attention.output.dense.bias": (H,),
              "attention.output.LayerNorm.weight": (H,), "attention.output.LayerNorm.bias": (H,),
              "intermediate.dense.weight": (64, H), "intermediate.dense.bias": (64,),
              "output.dense.weight": (H, 64), "output.dense.bias": (H,),
              "output.LayerNorm.weight": (H,), "output.LayerNorm.bias": (H,)}
    if cross:
        shapes.update({"crossattention.self.query.weight": (H, H), "crossattention.self.query.bias": (H,),
                       "crossattention.self.key.weight": (H, width), "crossattention.self.key.bias": (H,),
                       "crossattention.self.value.weight": (H, width), "crossattention.self.value.bias": (H,),
                       "crossattention.output.dense.weight": (H, H), "crossattention.output.dense.bias": (H,),
                       "crossattention.output.LayerNorm.weight": (H,),
                       "crossattention.output.LayerNorm.bias": (H,)})
    return {f"encoder.layer.{layer}.{k}": torch.randn(s, generator=g) for k, s in shapes.items()}


def vision_key(key: str) -> str | None:
    """ALBEF's and BLIP's name of one of our (momentum) vision encoder's keys; None for the others."""
    for ours, theirs in (("visual.", "visual_encoder."), ("visual_m.", "visual_encoder_m.")):
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return None


def ours_to_albef(m: PretrainObjective, bert_prefix: bool = True, with_idx_queue: bool = False) -> dict:
    """Independent inverse map: our tiny model -> ALBEF's exact key layout.

    ``bert_prefix=True``: the pre-training layout (``BertForMaskedLM``: ``text_encoder.bert.*`` and the
    MLM head ``text_encoder.cls.predictions.*``); False: a retrieval task checkpoint (``BertModel``).
    ALBEF's momentum text encoder is a whole BERT (text + fusion layers, and an MLM head in
    pre-training); ours keeps only the text layers, so its fusion layers are random here.
    """
    sd = state_of(m)
    t = "text_encoder.bert." if bert_prefix else "text_encoder."
    tm = "text_encoder_m.bert." if bert_prefix else "text_encoder_m."
    out = {}
    for k, v in sd.items():
        v = v.clone()
        if vision_key(k):
            out[vision_key(k)] = v
        elif k.startswith("text."):
            out[t + k[len("text."):]] = v
        elif k.startswith("text_m."):
            out[tm + k[len("text_m."):]] = v
        elif k.startswith("mlm_head."):
            if bert_prefix:
                out["text_encoder.cls.predictions." + k[len("mlm_head."):]] = v
        elif k == "idx_queue":
            if with_idx_queue:
                out["idx_queue"] = torch.where(v < 0, torch.full_like(v, -100), v).reshape(1, Q)
        elif k == "queue_ptr":
            out["queue_ptr"] = v.reshape(1)
        else:  # temp, image_queue, text_queue, vision_proj(_m), text_proj(_m), itm_head
            out[k] = v
    out[t + "embeddings.position_ids"] = torch.arange(MAXPOS).expand(1, -1)
    out[tm + "embeddings.position_ids"] = torch.arange(MAXPOS).expand(1, -1)
    for i in range(N_TEXT, N_TEXT + N_FUSION):
        out.update({tm + k: v for k, v in rand_like_layer(i, cross=True).items()})
    if bert_prefix:
        out["text_encoder.cls.predictions.decoder.bias"] = out["text_encoder.cls.predictions.bias"].clone()
        for k in ("transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
                  "transform.LayerNorm.bias", "bias", "decoder.weight", "decoder.bias"):
            src = out["text_encoder.cls.predictions." + k]
            out["text_encoder_m.cls.predictions." + k] = src + 0.01
    return out


def ours_to_blip(m: PretrainObjective) -> dict:
    """Independent inverse map: our tiny model -> BLIP's retrieval layout (plus its captioning decoder).

    BLIP: ``text_encoder.*`` without ``bert.``, cross-attention in every layer (random in the layers
    that are text-only for us), no token-type table (our source model's table is zeroed before, so the
    round trip is exact), two extra vocabulary rows ([DEC], [ENC]), ``ptr_queue``, ``idx_queue (1, Q)``,
    ``text_decoder.{bert,cls}.*``.
    """
    with torch.no_grad():
        m.model.text.embeddings.token_type_embeddings.weight.zero_()
        m.text_m.embeddings.token_type_embeddings.weight.zero_()
    sd = state_of(m)
    out = {}
    g = torch.Generator().manual_seed(7)
    for k, v in sd.items():
        v = v.clone()
        if vision_key(k):
            out[vision_key(k)] = v
        elif k.startswith(("text.", "text_m.")):
            root = "text_encoder." if k.startswith("text.") else "text_encoder_m."
            sub = k.split(".", 1)[1]
            if "token_type_embeddings" in sub:
                continue
            if sub == "embeddings.word_embeddings.weight":
                v = torch.cat([v, torch.randn(2, H, generator=g)])
            out[root + sub] = v
        elif k.startswith("mlm_head."):
            sub = k[len("mlm_head."):]
            if sub in ("bias", "decoder.weight"):
                v = torch.cat([v, torch.randn(2, *v.shape[1:], generator=g)])
            out["text_decoder.cls.predictions." + sub] = v
        elif k == "idx_queue":
            out["idx_queue"] = torch.where(v < 0, torch.full_like(v, -100), v).reshape(1, Q)
        elif k == "queue_ptr":
            out["ptr_queue"] = v.reshape(1)
        else:
            out[k] = v
    out["text_decoder.cls.predictions.decoder.weight"] = out["text_encoder.embeddings.word_embeddings.weight"]
    out["text_decoder.cls.predictions.decoder.bias"] = out["text_decoder.cls.predictions.bias"]
    for i in range(N_TEXT):  # BLIP: cross-attention in every layer
        out.update({"text_encoder." + k: v for k, v in rand_like_layer(i, True).items() if "crossattention" in k})
    for i in range(N_TEXT + N_FUSION):  # momentum: the whole 4-layer encoder
        for k, v in rand_like_layer(i, True).items():
            out.setdefault("text_encoder_m." + k, v)
    out["text_encoder.embeddings.position_ids"] = torch.arange(MAXPOS).expand(1, -1)
    out["text_encoder_m.embeddings.position_ids"] = torch.arange(MAXPOS).expand(1, -1)
    out["text_decoder.bert.embeddings.word_embeddings.weight"] = torch.randn(V + 2, H, generator=g)
    out.update({"text_decoder.bert." + k: v for k, v in rand_like_layer(0, True).items()})
    return out


def outputs(obj) -> dict:
    """Everything the base model computes for a fixed batch (and the momentum encoders of an objective)."""
    m = obj.model if isinstance(obj, PretrainObjective) else obj
    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(1, V, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        img = m.encode_image(image)
        txt = m.encode_text(ids, mask)
        fused = m.fuse(txt, mask, img)
        out = {"image_feat": m.image_feat(img), "text_feat": m.text_feat(txt), "itm": m.itm_logits(fused),
               "mlm": m.mlm_head(fused[:, 1]), "temp": m.temp.detach().clone()}
        if obj is not m:
            out.update({"image_feat_m": obj.vision_proj_m(obj.visual_m.forward_features(image)[:, 0]),
                        "text_feat_m": obj.text_proj_m(obj.text_m.forward_text(ids, mask)[:, 0])})
        return out


def assert_same(a: dict, b: dict, keys=None) -> None:
    for k in keys or a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ----------------------------------------------------------------------------- layouts
def test_albef_key_layout_is_exact():
    sd = ours_to_albef(make_model(0))
    # a few names and shapes straight from ALBEF's modules
    assert sd["visual_encoder.patch_embed.proj.weight"].shape == (W, 3, 8, 8)
    assert sd["visual_encoder.blocks.1.attn.qkv.weight"].shape == (3 * W, W)
    assert sd["text_encoder.bert.encoder.layer.2.crossattention.self.key.weight"].shape == (H, W)
    assert "text_encoder.bert.encoder.layer.1.crossattention.self.key.weight" not in sd
    assert sd["text_encoder_m.bert.encoder.layer.3.crossattention.self.value.weight"].shape == (H, W)
    assert sd["text_encoder.cls.predictions.decoder.weight"].shape == (V, H)
    assert sd["image_queue"].shape == (E, Q) and sd["queue_ptr"].shape == (1,)
    assert sd["temp"].shape == ()


@pytest.mark.parametrize("builder,layout", [
    (lambda m: ours_to_albef(m), "albef"),
    (lambda m: ours_to_albef(m, bert_prefix=False, with_idx_queue=True), "albef"),
    (ours_to_blip, "blip"),
    (lambda m: {k: v for k, v in ours_to_blip(m).items() if k.startswith(("visual_encoder.", "text_decoder."))},
     "blip"),
    (lambda m: {("queue_ptr" if k == "ptr_queue" else k): v for k, v in ours_to_blip(m).items()}, "blip"),
    (state_of, "ours"),
])
def test_detect_layout(builder, layout):
    assert detect_layout(builder(make_model(0))) == layout


def test_detect_layout_unknown():
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        detect_layout({"encoder.weight": torch.zeros(2)})


# ----------------------------------------------------------------------------- round trips
def test_albef_pretrain_round_trip_identical_outputs():
    src = make_model(0)
    albef = ours_to_albef(src, with_idx_queue=True)
    dst = make_model(1)
    assert not torch.equal(outputs(src)["itm"], outputs(dst)["itm"])
    report = load_both(dst, albef, source="albef.pth")
    assert report.layout == "albef"
    assert_same(outputs(src), outputs(dst))
    assert not report.unexplained_missing() and not report.unexplained_unexpected() and not report.mismatched
    reasons = set(report.expected_unexpected.values())
    assert any("momentum fusion" in r for r in reasons)
    assert any("alias of cls.predictions.bias" in r for r in reasons)
    assert any("position_ids" in r for r in reasons)


def test_albef_retrieval_layout_queues_reshaped():
    src = make_model(0)
    albef = ours_to_albef(src, bert_prefix=False, with_idx_queue=True)
    sd = checkpoint_filter_fn(albef, make_model(1).model)
    assert sd["idx_queue"].shape == (Q,) and sd["idx_queue"].tolist() == [3, 1, 4, 1, 5, -1, -1, -1]
    assert sd["queue_ptr"].shape == () and int(sd["queue_ptr"]) == 5
    assert torch.equal(sd["image_queue"], src.image_queue) and torch.equal(sd["text_queue"], src.text_queue)
    dst = make_model(1)
    report = load_both(dst, albef)
    keys = ["image_feat", "text_feat", "itm", "image_feat_m", "text_feat_m"]
    assert_same(outputs(src), outputs(dst), keys)
    # the queues are the objective's: set aside, never loaded into the model (fine-tuning starts them empty)
    assert any("training objective" in r for r in report.expected_unexpected.values())
    assert not any("queue" in k for k in report.loaded)
    # BertModel task checkpoints have no MLM head: expected-missing, fresh initialisation
    assert all("MLM head" in report.expected_missing[k] for k in report.missing if k.startswith("mlm_head."))
    report.raise_if_unexpected()


def test_albef_pretrain_without_idx_queue_restarts_queue():
    src = make_model(0)
    albef = ours_to_albef(src)  # ALBEF pre-training: no idx_queue
    dst = make_model(1)
    with torch.no_grad():
        dst.idx_queue.fill_(-1)
    report = load_both(dst, albef)
    assert "image_queue" in report.expected_unexpected and "without idx_queue" in report.expected_unexpected["image_queue"]
    assert (dst.idx_queue == -1).all()
    assert_same(outputs(src), outputs(dst), ["image_feat", "text_feat", "itm", "mlm"])


def test_albef_vqa_checkpoint_base_keys():
    """An ALBEF VQA checkpoint: encoders + answer decoder, no projections / ITM / queues / proj_m."""
    src = make_model(0)
    albef = {k: v for k, v in ours_to_albef(src, bert_prefix=False).items()
             if not k.startswith(("vision_proj", "text_proj", "itm_head", "temp", "image_queue", "text_queue",
                                  "queue_ptr"))}
    albef.update({"text_decoder.bert." + k: v for k, v in rand_like_layer(0, True).items()})
    albef["text_decoder.cls.predictions.bias"] = torch.zeros(V)
    dst = make_model(1)
    report = load_both(dst, albef)
    report.raise_if_unexpected()
    out_s, out_d = outputs(src), outputs(dst)
    assert torch.equal(dst.model.visual.pos_embed, src.model.visual.pos_embed)
    assert torch.equal(dst.model.text.encoder.layer[3].crossattention.self.key.weight,
                       src.model.text.encoder.layer[3].crossattention.self.key.weight)
    assert not torch.equal(out_s["itm"], out_d["itm"])  # the ITM head is fresh
    assert "vision_proj.weight" in report.expected_missing
    assert any("answer decoder" in r for r in report.expected_unexpected.values())
    assert any("momentum copy vision_proj_m" in n for n in report.notes)
    assert torch.equal(dst.vision_proj_m.weight, dst.model.vision_proj.weight)


def test_blip_round_trip_identical_outputs():
    src = make_model(0)
    blip = ours_to_blip(src)
    dst = make_model(1)
    report = load_both(dst, blip, source="blip.pth")
    assert report.layout == "blip"
    assert_same(outputs(src), outputs(dst))
    report.raise_if_unexpected()
    reasons = set(report.expected_unexpected.values())
    assert any("BLIP cross-attention in a layer" in r for r in reasons)
    assert any("captioning decoder" in r for r in reasons)
    assert any("[DEC]/[ENC]" in n for n in report.notes)
    assert any("outputs differ from BLIP's" in n for n in report.notes)


def test_blip_converter_names():
    obj = make_model(1)
    sd = checkpoint_filter_fn(ours_to_blip(make_model(0)), obj.model)
    assert sd["queue_ptr"].shape == () and sd["idx_queue"].shape == (Q,)
    assert not sd["text.embeddings.token_type_embeddings.weight"].any()
    assert any(n.startswith("text.embeddings.token_type_embeddings.weight: BLIP has no token-type") for n in sd.notes)
    assert "text.encoder.layer.0.crossattention.self.key.weight" not in sd
    assert sd["text.encoder.layer.2.crossattention.self.key.weight"].shape == (H, W)
    model_part, objective_part = split_objective_state(sd)  # every key has a place (none unmapped)
    assert set(model_part) <= set(obj.model.state_dict()) and set(objective_part) <= set(obj.state_dict())


def test_blip_captioning_checkpoint_initialises_text_from_decoder():
    src = make_model(0)
    blip = {k: v for k, v in ours_to_blip(src).items() if k.startswith("visual_encoder.")}
    for k, v in ours_to_blip(src).items():  # a captioning checkpoint: the decoder carries the text weights
        if k.startswith("text_encoder.") and "position_ids" not in k:
            blip["text_decoder.bert." + k[len("text_encoder."):]] = v
        if k.startswith("text_decoder.cls."):
            blip[k] = v
    assert detect_layout(blip) == "blip"
    dst = make_model(1).model
    report = load_checkpoint_into(dst, {"model": blip})
    report.raise_if_unexpected()
    assert torch.equal(dst.text.encoder.layer[1].output.dense.weight,
                       src.model.text.encoder.layer[1].output.dense.weight)
    assert torch.equal(dst.mlm_head.transform.dense.weight, src.model.mlm_head.transform.dense.weight)
    assert any("captioning checkpoint" in n for n in report.notes)


# ----------------------------------------------------------------------------- adaptations
def test_position_embeddings_interpolated_and_queue_size_change():
    src = make_model(0, img_size=48)  # grid 6 -> model grid 4
    albef = ours_to_albef(src, bert_prefix=False, with_idx_queue=True)
    torch.manual_seed(1)
    dst = PretrainObjective(VLPModel(tiny_cfg()), PretrainLossConfig(queue_size=4)).eval()
    report = load_both(dst, albef)
    assert "visual.pos_embed" in report.interpolated
    assert torch.allclose(dst.model.visual.pos_embed, interpolate_pos_embed(src.model.visual.pos_embed.detach(), 4))
    assert torch.allclose(dst.visual_m.pos_embed, interpolate_pos_embed(src.visual_m.pos_embed.detach(), 4))
    # a queue of another size: the objective's, which starts empty
    assert dst.image_queue.shape == (E, 4) and int(dst.queue_ptr) == 0 and (dst.idx_queue == -1).all()
    report.raise_if_unexpected()


def test_longer_text_position_table_is_cut():
    src = make_model(0)
    albef = ours_to_albef(src)
    cfg = tiny_cfg()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, max_position_embeddings=20))
    dst = VLPModel(cfg).eval()
    load_checkpoint_into(dst, {"model": albef}).raise_if_unexpected()
    assert torch.equal(dst.text.embeddings.position_embeddings.weight,
                       src.model.text.embeddings.position_embeddings.weight[:20])


# ----------------------------------------------------------------------------- loud failures
def test_wrong_width_fails_naming_the_config_key():
    albef = ours_to_albef(make_model(0, width=48, num_heads=2))
    with pytest.raises(ValueError, match=r"model\.vision\.width=48"):
        load_checkpoint_into(make_model(1).model, {"model": albef})


def test_missing_block_fails_and_model_is_untouched():
    albef = {k: v for k, v in ours_to_albef(make_model(0)).items()
             if not k.startswith("text_encoder.bert.encoder.layer.3.")}
    dst = make_model(1).model
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing keys.*text\.encoder\.layer\.3\."):
        load_checkpoint_into(dst, {"model": albef})
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_missing_block_loads_partially_with_explicit_flag():
    src = make_model(0)
    albef = {k: v for k, v in ours_to_albef(src).items() if not k.startswith("visual_encoder.blocks.1.")}
    dst = make_model(1).model
    report = load_checkpoint_into(dst, {"model": albef}, allow_mismatch=True)
    assert any("PARTIAL LOAD" in n for n in report.notes)
    assert "visual.blocks.1.attn.qkv.weight" in report.unexplained_missing()
    assert torch.equal(dst.visual.blocks[0].attn.qkv.weight, src.model.visual.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError):
        report.raise_if_unexpected()


def test_unknown_key_and_vocab_mismatch_fail():
    albef = ours_to_albef(make_model(0))
    albef["mystery_head.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="mystery_head"):
        load_checkpoint_into(make_model(1).model, {"model": albef})
    cfg = tiny_cfg()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=V + 5))
    with pytest.raises(ValueError, match=r"tokenizer\.path"):
        load_checkpoint_into(VLPModel(cfg), {"model": ours_to_albef(make_model(0))})


def test_fusion_split_mismatch_names_num_text_layers():
    cfg = tiny_cfg()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_text_layers=1, num_fusion_layers=3))
    problems, _ = fit_problems(architecture(ours_to_albef(make_model(0))), cfg)
    assert any("model.text.num_text_layers=2" in p for p in problems)
    assert any("model.text.num_fusion_layers=2" in p for p in problems)


# ----------------------------------------------------------------------------- files and task models
class TaskModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = make_model(1).model
        self.head = nn.Linear(H, 3)


def test_load_checkpoint_into_accepts_albef_file_with_prefix(tmp_path):
    src = make_model(0)
    path = tmp_path / "albef.pth"
    torch.save({"model": ours_to_albef(src), "config": {"image_res": 32}, "epoch": 3}, path)
    task = TaskModel()
    with pytest.raises(ValueError, match=r"head\.weight"):
        load_checkpoint_into(task, path, prefix="base.")
    report = load_checkpoint_into(task, path, expected_missing={"head.": "new task head"}, prefix="base.")
    assert report.layout == "albef" and "base.visual.pos_embed" in report.loaded
    assert report.expected_missing["head.weight"] == "new task head"
    assert_same(outputs(src), outputs(task.base), ["image_feat", "text_feat", "itm"])


def test_load_checkpoint_into_reads_file_safely(tmp_path):
    src = make_model(0)
    path = tmp_path / "blip.pth"
    torch.save({"model": ours_to_blip(src), "config": {"vit": "base"}}, path)
    dst = make_model(1).model
    report = load_checkpoint_into(dst, path)
    assert "checkpoint layout: blip" in report.summary() and report.source == str(path)
    assert_same(outputs(src), outputs(dst), ["image_feat", "text_feat", "itm"])
    assert report.loaded


def test_task_models_load_foreign_names_without_the_objective_part():
    """The model (evaluation, task models) takes the model part; the objective part (momentum encoders,
    queues) comes back in ``report.objective`` (our names), listed as ignored, never loaded."""
    src = make_model(0)
    albef = ours_to_albef(src, bert_prefix=False, with_idx_queue=True)
    torch.manual_seed(1)
    evaluator = VLPModel(tiny_cfg()).eval()  # evaluation: the model alone
    report = load_checkpoint_into(evaluator, {"model": albef}, source="albef.pth")
    report.raise_if_unexpected()
    assert any("training objective" in r for r in report.expected_unexpected.values())
    assert not any("_m." in k or "queue" in k for k in report.loaded)
    assert set(report.objective) == set(split_objective_state(state_of(src))[1])
    assert torch.equal(report.objective["idx_queue"], src.idx_queue)
    assert_same(outputs(src), outputs(evaluator), ["image_feat", "text_feat", "itm"])

    task = TaskModel()
    report = load_checkpoint_into(task, {"model": albef}, source="albef.pth", prefix="base.",
                                  expected_missing={"head.": "new task head"})
    report.raise_if_unexpected()
    assert "base.text_encoder.bert.embeddings.position_ids" not in report.unexpected
    assert "base.text_encoder.embeddings.position_ids" in report.expected_unexpected

    wide = ours_to_albef(make_model(0, width=48))
    with pytest.raises(ValueError, match=r"model\.vision\.width=48"):
        load_checkpoint_into(TaskModel(), {"model": wide}, source="wide.pth", prefix="base.",
                             expected_missing={"head.": "new task head"})


def test_split_objective_state_and_new_checkpoint_layout():
    """``split_objective_state`` separates the objective's keys by name; a checkpoint that stores them under
    ``objective`` (not in ``model``) loads the same as one that holds them in ``model``."""
    src = make_model(0)
    model_part, objective = split_objective_state(state_of(src))
    assert set(objective) == {k for k in state_of(src) if k.split(".")[0] in (
        "visual_m", "text_m", "vision_proj_m", "text_proj_m", "image_queue", "text_queue", "idx_queue", "queue_ptr")}
    assert set(model_part) == set(src.model.state_dict())
    old, new = make_model(1), make_model(1)
    load_ckpt(old, {"model": state_of(src)}, source="old.pth").raise_if_unexpected()
    load_ckpt(new, {"model": model_part, "objective": objective}, source="new.pth").raise_if_unexpected()
    assert_same(outputs(src), outputs(old))
    assert_same(outputs(src), outputs(new))


# ----------------------------------------------------------------------------- architecture from the config
def test_head_count_mismatch_is_refused():
    """Loading a checkpoint trained with 2 heads into a model configured with 1 gives other features although
    every weight has the same shape: the checkpoint's saved config must make loading refuse, naming the key."""
    from tasks.pretrain import init_from_checkpoint

    src = make_model(0)
    ckpt = {"model": src.model.state_dict(), "objective": split_objective_state(state_of(src))[1],
            "config": {"model": dataclasses.asdict(tiny_cfg())}}
    for section in ("vision", "text"):
        cfg = tiny_cfg()
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), num_heads=1)})
        own = VLPModel(cfg).state_dict()
        assert all(v.shape == own[k].shape for k, v in ckpt["model"].items())  # the weights cannot tell
        key = f"model.{section}.num_heads: checkpoint 2, config 1"
        with pytest.raises(ConfigError, match=key):
            init_from_checkpoint(PretrainObjective(VLPModel(cfg), PretrainLossConfig(queue_size=Q)), ckpt,
                                 "ck.pth")  # --init-from
        with pytest.raises(ConfigError, match=key):
            load_checkpoint_into(VLPModel(cfg), ckpt, source="ck.pth")
        message = str(pytest.raises(ConfigError, load_checkpoint_into, VLPModel(cfg), ckpt).value)
        assert len(message.splitlines()) == 1
    load_checkpoint_into(VLPModel(tiny_cfg()), ckpt, source="ck.pth")  # the same heads load
    init_from_checkpoint(PretrainObjective(VLPModel(tiny_cfg()), PretrainLossConfig(queue_size=Q)), ckpt, "ck.pth")


def test_albef_blip_head_counts_are_known():
    """ALBEF and BLIP build ViT-B/16 (12 heads), BLIP also ViT-L/16 (16 heads), and bert-base text encoders
    (12 heads): a config with other head counts does not fit (the heads cannot be read from the weights)."""
    base = {"visual_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
            "text_encoder.embeddings.word_embeddings.weight": torch.zeros(V, 768)}
    cfg = VLPConfig(vision=VisionConfig(num_heads=6, pre_norm=False, act="gelu", layer_norm_eps=1e-6),
                    text=TextConfig(vocab_size=V, num_heads=8))
    problems = fit_problems(architecture(base, "albef"), cfg)[0]
    assert any("set model.vision.num_heads=12" in p for p in problems)
    assert any("set model.text.num_heads=12" in p for p in problems)
    large = {**base, "visual_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16)}
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, width=1024, num_heads=16),
                              text=dataclasses.replace(cfg.text, num_heads=12))
    assert not [p for p in fit_problems(architecture(large, "blip"), cfg)[0] if "heads" in p]


# ----------------------------------------------------------------------------- tools.inspect
def test_inspect_describes_albef_checkpoint_and_config_fit(tmp_path, capsys):
    from tools.inspect import describe, main

    path = tmp_path / "albef.pth"
    torch.save({"model": ours_to_albef(make_model(0, img_size=48), with_idx_queue=True),
                "config": {"image_res": 48}, "epoch": 2}, path)
    fitting = tmp_path / "fits.yaml"
    fitting.write_text(
        "model:\n  vision: {img_size: 32, patch_size: 8, width: 32, depth: 2, num_heads: 2}\n"
        "  text: {hidden_size: 32, num_text_layers: 2, num_fusion_layers: 2, num_heads: 2, intermediate_size: 64,\n"
        "         max_position_embeddings: 40}\n  embed_dim: 16\nloss: {queue_size: 8}\n"
        "tokenizer: {path: /models/bert-base-uncased}\n")
    info = describe(path, [fitting, tmp_path.parent.parent / "missing.yaml", ROOT_DEMO])
    assert info["layout"] == "albef" and info["epoch"] == 2
    v, t = info["architecture"]["vision"], info["architecture"]["text"]
    assert (v["width"], v["depth"], v["patch_size"], v["grid"], v["img_size"]) == (W, 2, 8, 6, 48)
    assert t["cross_attention_layers"] == [2, 3] and t["vocab_size"] == V
    assert "model.text.num_text_layers=2" in info["suggested_overrides"]
    ok, missing, demo = info["fits"]
    assert ok["fits"] and any("interpolated" in a for a in ok["adaptations"])
    assert missing["error"] == "file not found"
    assert not demo["fits"] and any("model.vision.width=32" in p for p in demo["problems"])
    assert any("tokenizer.path" in p for p in demo["problems"])
    assert main([str(path), "--config", str(fitting)]) == 0
    out = capsys.readouterr().out
    assert "layout: albef" in out and "pos_embed grid 6x6 -> trained at 48 px" in out and "YES" in out
    assert main([str(tmp_path / "nope.pth")]) == 2



def test_clip_layout_config_does_not_fit_albef_vit():
    """ALBEF/BLIP ViTs are DeiT-style: the paper config's CLIP layout must be switched off by name."""
    cfg = tiny_cfg()
    clip = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, pre_norm=True, act="quick_gelu",
                                                                   layer_norm_eps=1e-5))
    problems, _ = fit_problems(architecture(ours_to_albef(make_model(0))), clip)
    text = " ".join(problems)
    for key in ("model.vision.pre_norm=false", "model.vision.act=gelu", "model.vision.layer_norm_eps=1e-6"):
        assert key in text
    assert not fit_problems(architecture(ours_to_albef(make_model(0))), cfg)[0]
