"""Import ALBEF and BLIP checkpoints into this project's models through explicit key maps.

Three checkpoint layouts are recognised by :func:`detect_layout`:

``ours``
    This project's names (``visual.*``, ``text.*``, ``vision_proj``, ... see ``models/vlp.py``).
``albef``
    salesforce/ALBEF: ``visual_encoder.*`` (timm ViT names), ``text_encoder.bert.*`` (pre-training,
    ``BertForMaskedLM``; the MLM head is ``text_encoder.cls.predictions.*``) or ``text_encoder.*``
    (retrieval / VQA / NLVR2 task checkpoints, ``BertModel``); BERT layers ``0 .. fusion_layer-1`` are
    text layers and the later ones carry cross-attention (our fusion layers); momentum copies ``*_m``;
    ``image_queue`` / ``text_queue`` ``(embed_dim, Q)``, ``idx_queue`` ``(1, Q)``, ``queue_ptr`` ``(1,)``.
``blip``
    salesforce/BLIP: ``visual_encoder.*`` (timm-like ViT, same names), ``text_encoder.*`` (``BertModel``
    without ``bert.``) whose *every* layer has cross-attention and whose embeddings have no token-type
    table, ``ptr_queue`` (retrieval) or ``queue_ptr`` (pre-training), ``idx_queue`` ``(1, Q)``, and
    ``text_decoder.{bert,cls}.*`` (captioning decoder; a captioning checkpoint has only that).

The converters (:func:`albef_to_ours`, :func:`blip_to_ours`) only rename and reshape; every source key
that is not used is listed with the reason (:class:`ConversionNotes`). :func:`load_foreign_state` /
:func:`load_foreign_checkpoint` then check the architecture against the model (the error names the
config keys to set), adapt what can be adapted losslessly (position embeddings interpolated, the text
position table cut to the model's maximum length, BLIP's two added ``[DEC]``/``[ENC]`` vocabulary rows
dropped), and load through ``tasks.common.load_model_state``. Anything unexplained (a missing block,
an unknown key, a shape mismatch) raises ``ValueError`` unless ``allow_mismatch=True``.

Momentum copies and queues are converted to our names (``visual_m.*``, ``image_queue``, ...) and
then set aside as the training objective's state (``PreparedState.objective``), never loaded into
the model; ``objectives.pretrain.PretrainObjective.load_momentum`` takes a momentum copy.

Architectural caveat for BLIP: BLIP's unimodal text encoder runs all 12 layers (cross-attention
skipped) and its fusion runs all 12 layers with cross-attention; ours runs ``num_text_layers`` text
layers and then ``num_fusion_layers`` fusion layers. A BLIP checkpoint therefore gives an
initialisation (fine-tune before evaluating), not BLIP's zero-shot numbers. ALBEF's architecture is
ours, so an ALBEF checkpoint reproduces ALBEF's features and ITM scores.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from engine.checkpoint import read_torch_file
from models.weights import LoadReport

__all__ = ["LAYOUTS", "ConversionNotes", "ForeignLoadReport", "PreparedState", "detect_layout", "albef_to_ours",
           "blip_to_ours", "convert_to_ours", "architecture", "fit_problems", "read_checkpoint", "base_prefix",
           "foreign_prefix", "prepare_foreign_state", "load_foreign_state", "load_foreign_checkpoint",
           "convert_in_place"]

LAYOUTS = ("ours", "albef", "blip")
QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.*)")


@dataclass
class ConversionNotes:
    """What a converter did besides renaming.

    Attributes:
        layout: the source layout (``"albef"`` or ``"blip"``).
        dropped: source key -> reason it is deliberately not used.
        unmapped: source keys no rule knows (reported as unexpected: an error unless allowed).
        synthesized: our key -> how it was made (e.g. BLIP's absent token-type table as zeros).
        messages: human-readable remarks for the load report.
    """

    layout: str
    dropped: Dict[str, str] = field(default_factory=dict)
    unmapped: List[str] = field(default_factory=list)
    synthesized: Dict[str, str] = field(default_factory=dict)
    messages: List[str] = field(default_factory=list)


@dataclass
class ForeignLoadReport(LoadReport):
    """A :class:`~models.weights.LoadReport` plus the source layout and the conversion remarks."""

    layout: str = "ours"
    notes: List[str] = field(default_factory=list)

    def summary(self, max_keys: int = 10) -> str:
        head = [f"checkpoint layout: {self.layout}"] + [f"note: {n}" for n in self.notes]
        return "\n".join(head + [super().summary(max_keys)])


# ----------------------------------------------------------------------------- layout detection
def _text_prefix(sd: Dict[str, Tensor], root: str) -> Optional[str]:
    """``root + ".bert."`` or ``root + "."`` when that prefix holds BERT embeddings/layers, else None."""
    for prefix in (f"{root}.bert.", f"{root}."):
        if any(k.startswith(prefix + "embeddings.") or k.startswith(prefix + "encoder.layer.") for k in sd):
            return prefix
    return None


def _cross_layers(sd: Dict[str, Tensor], prefix: str) -> List[int]:
    """Indices of the BERT layers under ``prefix`` that have cross-attention."""
    out = set()
    for k in sd:
        if k.startswith(prefix):
            m = _LAYER.fullmatch(k[len(prefix):])
            if m and m.group(2).startswith("crossattention."):
                out.add(int(m.group(1)))
    return sorted(out)


def _num_layers(sd: Dict[str, Tensor], prefix: str) -> int:
    idx = [int(m.group(1)) for k in sd if k.startswith(prefix) and (m := _LAYER.fullmatch(k[len(prefix):]))]
    return max(idx) + 1 if idx else 0


def detect_layout(state_dict: Dict[str, Tensor]) -> str:
    """``"ours"``, ``"albef"`` or ``"blip"`` from the key names.

    A foreign checkpoint always has ``visual_encoder.*``; it is BLIP when it has ``ptr_queue``, when its
    text encoder has cross-attention in layer 0, or when it has only a ``text_decoder`` (a BLIP
    captioning checkpoint); otherwise ALBEF.

    Raises:
        ValueError: no tensors, or a layout none of the rules knows (the message shows some keys).
    """
    keys = [k for k, v in state_dict.items() if isinstance(v, Tensor)]
    if not keys:
        raise ValueError("the checkpoint holds no tensors")
    if any(k.startswith("visual_encoder.") for k in keys):
        if "ptr_queue" in state_dict:
            return "blip"
        prefix = _text_prefix(state_dict, "text_encoder")
        if prefix is None:
            return "blip" if _text_prefix(state_dict, "text_decoder") else "albef"
        return "blip" if 0 in _cross_layers(state_dict, prefix) else "albef"
    if any(k.endswith("visual.patch_embed.proj.weight") or k.startswith("text.embeddings.") for k in keys):
        return "ours"
    raise ValueError("unknown checkpoint layout (neither this project's 'visual.*' / 'text.*' names nor "
                     f"ALBEF/BLIP's 'visual_encoder.*'); first keys: {keys[:5]}")


# ----------------------------------------------------------------------------- converters
def _fix_queues(out: Dict[str, Tensor], notes: ConversionNotes, source: Dict[str, Tensor]) -> None:
    """ALBEF/BLIP queue shapes -> ours: ``idx_queue (1, Q) -> (Q,)`` (negative = empty -> -1),
    ``queue_ptr (1,) -> ()``. Without ``idx_queue`` the queued features cannot be matched to image ids,
    so the whole queue is dropped (ours restarts empty)."""
    if "idx_queue" in out:
        idx = out["idx_queue"].reshape(-1).long().clone()
        idx[idx < 0] = -1
        out["idx_queue"] = idx
    if "queue_ptr" in out:
        out["queue_ptr"] = out["queue_ptr"].reshape(()).long()
    if "image_queue" in out and "idx_queue" not in out:
        reason = ("queue without idx_queue (a pre-training checkpoint): its features cannot be matched to "
                  "image ids, so our queue restarts empty")
        for ours_key, src_key in (("image_queue", "image_queue"), ("text_queue", "text_queue"),
                                  ("queue_ptr", "ptr_queue" if "ptr_queue" in source else "queue_ptr")):
            if ours_key in out:
                del out[ours_key]
                notes.dropped[src_key] = reason


def _tie_decoder(out: Dict[str, Tensor], notes: ConversionNotes, src_decoder_key: Optional[str]) -> None:
    """Our MLM decoder is tied to the word embeddings: give it the word embeddings (and say so if the
    source's decoder differed)."""
    emb = out.get("text.embeddings.word_embeddings.weight")
    if emb is None:
        return
    dec = out.get("mlm_head.decoder.weight")
    if dec is not None and (dec.shape != emb.shape or not torch.equal(dec, emb)):
        notes.messages.append(f"the checkpoint's MLM decoder ({src_decoder_key}) is not tied to its word "
                              "embeddings; ours is tied, so the word embeddings are used")
    if any(k.startswith("mlm_head.") for k in out):
        out["mlm_head.decoder.weight"] = emb


def _map_bert(sub: str, target: str, keep_layers: Optional[int], cross_from: int, momentum: bool,
              layout: str) -> Tuple[Optional[str], str]:
    """Map a BERT sub-key (after the encoder prefix) to ``target`` + our name, or ``(None, reason)``.

    ``keep_layers``: layers with index >= this are dropped (momentum models keep only text layers);
    ``cross_from``: cross-attention of layers below this index is dropped (BLIP's text layers).
    """
    if sub == "embeddings.position_ids":
        return None, "position_ids buffer (recomputed)"
    if sub.startswith("pooler."):
        return None, "BERT pooler (unused)"
    if sub.startswith("embeddings."):
        return target + sub, ""
    m = _LAYER.fullmatch(sub)
    if m is None:
        return target + sub, ""  # unknown sub-key: kept, so that the loader reports it as unexpected
    i, rest = int(m.group(1)), m.group(2)
    if keep_layers is not None and i >= keep_layers:
        return None, (f"{layout.upper()} momentum {'fusion ' if layout == 'albef' else ''}layers beyond the text "
                      "layers (our momentum model keeps only the text layers)")
    if rest.startswith("crossattention.") and i < cross_from:
        what = "momentum " if momentum else ""
        return None, (f"BLIP {what}cross-attention in a layer that our model runs as a text-only layer "
                      "(BLIP puts cross-attention in every layer)")
    return target + sub, ""


def _map_mlm(sub: str) -> Tuple[Optional[str], str]:
    """``cls.predictions.*`` sub-key (after ``cls.predictions.``) -> our ``mlm_head.*``."""
    if sub == "decoder.bias":
        return None, "alias of cls.predictions.bias"
    return "mlm_head." + sub, ""


def albef_to_ours(sd: Dict[str, Tensor], num_text_layers: int) -> Tuple[Dict[str, Tensor], ConversionNotes]:
    """Rename an ALBEF state dict (pre-training or a task checkpoint's base-model keys) to ours.

    Args:
        sd: the ALBEF ``model`` state dict.
        num_text_layers: our model's text layers; ALBEF's momentum text encoder keeps only these.

    Returns:
        ``(state dict with our names, notes)``. Unknown keys are listed in ``notes.unmapped``.
    """
    notes = ConversionNotes("albef")
    out: Dict[str, Tensor] = {}
    text_prefix = _text_prefix(sd, "text_encoder") or "text_encoder.bert."
    text_m_prefix = _text_prefix(sd, "text_encoder_m") or "text_encoder_m.bert."
    direct = ("vision_proj.", "text_proj.", "vision_proj_m.", "text_proj_m.", "itm_head.")
    decoder_key = None
    for key, value in sd.items():
        target, reason = None, ""
        if key.startswith("visual_encoder.") or key.startswith("visual_encoder_m."):
            root, sub = key.split(".", 1)
            if sub.startswith("head."):
                reason = "ViT classifier head (unused)"
            else:
                target = ("visual_m." if root.endswith("_m") else "visual.") + sub
        elif key.startswith("text_encoder.cls.predictions."):
            target, reason = _map_mlm(key[len("text_encoder.cls.predictions."):])
            if key.endswith("decoder.weight"):
                decoder_key = key
        elif key.startswith("text_encoder_m.cls."):
            reason = "momentum MLM head (our momentum model has none)"
        elif key.startswith("text_encoder.cls."):
            reason = "BERT NSP head (unused)"
        elif key.startswith(text_prefix):
            target, reason = _map_bert(key[len(text_prefix):], "text.", None, 0, False, "albef")
        elif key.startswith(text_m_prefix):
            target, reason = _map_bert(key[len(text_m_prefix):], "text_m.", num_text_layers, 0, True, "albef")
        elif key.startswith(direct) or key == "temp" or key in QUEUE_KEYS:
            target = key
        elif key.startswith(("text_decoder.", "text_decoder_m.")):
            reason = "ALBEF answer decoder of a VQA checkpoint (not part of the base model)"
        elif key.startswith(("cls_head.", "cls_head_m.")):
            reason = "ALBEF NLVR2 classifier (a task head, not part of the base model)"
        else:
            notes.unmapped.append(key)
            continue
        if target is None:
            notes.dropped[key] = reason
        else:
            out[target] = value
    _fix_queues(out, notes, sd)
    _tie_decoder(out, notes, decoder_key)
    return out, notes


def blip_to_ours(sd: Dict[str, Tensor], num_text_layers: int,
                 type_vocab_size: int = 2) -> Tuple[Dict[str, Tensor], ConversionNotes]:
    """Rename a BLIP state dict (pre-training, retrieval or captioning; ViT-B layout) to ours.

    BLIP layer ``i`` becomes our layer ``i``; the cross-attention of BLIP layers below
    ``num_text_layers`` is dropped (our text layers have none). BLIP's embeddings have no token-type
    table: a zero table of ``type_vocab_size`` rows is synthesised, which reproduces BLIP's embeddings
    exactly. A captioning checkpoint (``text_decoder`` only) initialises the text transformer from the
    decoder; BLIP's LM head (``text_decoder.cls.predictions``) initialises our MLM head.

    Returns:
        ``(state dict with our names, notes)``.
    """
    notes = ConversionNotes("blip")
    out: Dict[str, Tensor] = {}
    enc = _text_prefix(sd, "text_encoder")
    dec = _text_prefix(sd, "text_decoder")
    text_src = enc or dec
    if enc is None and dec is not None:
        notes.messages.append("captioning checkpoint: the text transformer is initialised from BLIP's "
                              "(causal) text decoder")
    decoder_key = None
    for key, value in sd.items():
        key_n = key.replace("_checkpoint_wrapped_module.", "")  # fairscale activation-checkpoint wrapper
        target, reason = None, ""
        if key_n.startswith("visual_encoder.") or key_n.startswith("visual_encoder_m."):
            root, sub = key_n.split(".", 1)
            if sub.startswith("head."):
                reason = "ViT classifier head (unused)"
            else:
                target = ("visual_m." if root.endswith("_m") else "visual.") + sub
        elif key_n.startswith("text_decoder.cls.predictions."):
            target, reason = _map_mlm(key_n[len("text_decoder.cls.predictions."):])
            if key_n.endswith("decoder.weight"):
                decoder_key = key
        elif text_src is not None and key_n.startswith(text_src):
            target, reason = _map_bert(key_n[len(text_src):], "text.", None, num_text_layers, False, "blip")
        elif key_n.startswith("text_decoder."):
            reason = ("BLIP captioning decoder (separate weights; our captioning head reuses the base model's "
                      "text layers)")
        elif key_n.startswith("text_encoder_m."):
            target, reason = _map_bert(key_n[len("text_encoder_m."):], "text_m.", num_text_layers,
                                       num_text_layers, True, "blip")
        elif key_n.startswith(("vision_proj.", "text_proj.", "vision_proj_m.", "text_proj_m.", "itm_head.")) \
                or key_n in ("temp", "image_queue", "text_queue", "idx_queue", "queue_ptr"):
            target = key_n
        elif key_n == "ptr_queue":
            target = "queue_ptr"
        else:
            notes.unmapped.append(key)
            continue
        if target is None:
            notes.dropped[key] = reason
        else:
            out[target] = value
    for root in ("text.", "text_m."):
        word = out.get(root + "embeddings.word_embeddings.weight")
        tt = root + "embeddings.token_type_embeddings.weight"
        if word is not None and tt not in out:
            out[tt] = torch.zeros(type_vocab_size, word.shape[1], dtype=word.dtype)
            notes.synthesized[tt] = "BLIP has no token-type embeddings: zeros (identical embeddings)"
    if any(k.startswith("text.encoder.layer.") for k in out):
        notes.messages.append(
            "BLIP runs all text layers for unimodal text and cross-attention in every layer; this model "
            "splits them into text and fusion layers, so outputs differ from BLIP's: fine-tune before evaluating")
    _fix_queues(out, notes, sd)
    _tie_decoder(out, notes, decoder_key)
    return out, notes


def convert_to_ours(sd: Dict[str, Tensor], num_text_layers: int, type_vocab_size: int = 2,
                    layout: Optional[str] = None) -> Tuple[Dict[str, Tensor], ConversionNotes]:
    """Any layout -> our names (``ours`` is returned unchanged)."""
    layout = layout or detect_layout(sd)
    if layout == "albef":
        return albef_to_ours(sd, num_text_layers)
    if layout == "blip":
        return blip_to_ours(sd, num_text_layers, type_vocab_size)
    if layout == "ours":
        return dict(sd), ConversionNotes("ours")
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


# ----------------------------------------------------------------------------- architecture
def _ours_prefix(sd: Dict[str, Tensor]) -> str:
    """The prefix before ``visual.`` in one of our (possibly task) checkpoints, e.g. ``""`` or ``"base."``."""
    cands = [k[: -len("visual.patch_embed.proj.weight")] for k in sd if k.endswith("visual.patch_embed.proj.weight")]
    cands = [c for c in cands if not c.endswith("_m.")]
    return min(cands, key=len) if cands else ""


def architecture(sd: Dict[str, Tensor], layout: Optional[str] = None) -> Dict[str, Any]:
    """What a state dict (any layout) holds, read from tensor shapes.

    Returns a dict with ``layout``, ``vision`` (``width``, ``patch_size``, ``depth``, ``mlp_ratio``,
    ``grid``, ``img_size``), ``text`` (``hidden_size``, ``num_layers``, ``cross_attention_layers``,
    ``intermediate_size``, ``vocab_size``, ``max_position_embeddings``, ``token_types``), ``embed_dim``,
    ``queue_size``, ``momentum`` (bool), ``mlm_head`` / ``itm_head`` (bool), ``decoder_layers`` (BLIP/ALBEF
    ``text_decoder``; 0 if none). Entries that cannot be read are None.
    """
    layout = layout or detect_layout(sd)
    if layout == "ours":
        p = _ours_prefix(sd)
        vis, txt, mom = p + "visual.", p + "text.", p + "visual_m."
        misc = p
    else:
        vis, mom, misc = "visual_encoder.", "visual_encoder_m.", ""
        txt = _text_prefix(sd, "text_encoder") or _text_prefix(sd, "text_decoder") or "text_encoder."
    arch: Dict[str, Any] = {"layout": layout}
    w = sd.get(vis + "patch_embed.proj.weight")
    pos = sd.get(vis + "pos_embed")
    depth = 1 + max((int(m.group(1)) for k in sd if k.startswith(vis)
                     and (m := re.match(r"blocks\.(\d+)\.", k[len(vis):]))), default=-1)
    fc1 = sd.get(vis + "blocks.0.mlp.fc1.weight")
    grid = None
    if pos is not None:
        n = pos.shape[1] - 1
        grid = math.isqrt(n) if math.isqrt(n) ** 2 == n else None
    arch["vision"] = {
        "width": int(w.shape[0]) if w is not None else None,
        "patch_size": int(w.shape[-1]) if w is not None else None,
        "depth": depth or None,
        "mlp_ratio": (fc1.shape[0] / fc1.shape[1]) if fc1 is not None else None,
        "grid": grid,
        "img_size": grid * int(w.shape[-1]) if (grid and w is not None) else None,
        "pre_norm": vis + "norm_pre.weight" in sd,
        "params": sum(v.numel() for k, v in sd.items() if k.startswith(vis)),
    }
    word = sd.get(txt + "embeddings.word_embeddings.weight")
    posemb = sd.get(txt + "embeddings.position_embeddings.weight")
    inter = sd.get(txt + "encoder.layer.0.intermediate.dense.weight")
    arch["text"] = {
        "prefix": txt,
        "hidden_size": int(word.shape[1]) if word is not None else None,
        "num_layers": _num_layers(sd, txt),
        "cross_attention_layers": _cross_layers(sd, txt),
        "intermediate_size": int(inter.shape[0]) if inter is not None else None,
        "vocab_size": int(word.shape[0]) if word is not None else None,
        "max_position_embeddings": int(posemb.shape[0]) if posemb is not None else None,
        "token_types": (int(sd[txt + "embeddings.token_type_embeddings.weight"].shape[0])
                        if txt + "embeddings.token_type_embeddings.weight" in sd else 0),
        "params": sum(v.numel() for k, v in sd.items() if k.startswith(txt)),
    }
    proj = sd.get(misc + "vision_proj.weight")
    queue = sd.get(misc + "image_queue")
    arch["embed_dim"] = int(proj.shape[0]) if proj is not None else None
    arch["queue_size"] = int(queue.shape[1]) if queue is not None and queue.ndim == 2 else None
    arch["momentum"] = any(k.startswith(mom) for k in sd)
    arch["itm_head"] = misc + "itm_head.weight" in sd
    mlm = {"ours": misc + "mlm_head.", "albef": "text_encoder.cls.predictions.",
           "blip": "text_decoder.cls.predictions."}[layout]
    arch["mlm_head"] = any(k.startswith(mlm) for k in sd)
    dec = _text_prefix(sd, "text_decoder") if layout != "ours" else None
    arch["decoder_layers"] = _num_layers(sd, dec) if dec else 0
    return arch


def fit_problems(arch: Dict[str, Any], cfg: Any) -> Tuple[List[str], List[str]]:
    """Compare a checkpoint's :func:`architecture` with a ``VLPConfig``.

    Returns ``(problems, adaptations)``: problems are mismatches that cannot be loaded, each naming the
    config key and value to set; adaptations are the differences the loader handles (image size,
    a shorter text position table, BLIP's two added vocabulary rows).
    """
    problems: List[str] = []
    adapt: List[str] = []
    v, t = arch["vision"], arch["text"]

    def need(what: str, key: str, have: Any, want: Any) -> None:
        if have is not None and want is not None and have != want:
            problems.append(f"{what} {have} (set {key}={have}); the model has {want}")

    need("image encoder width", "model.vision.width", v["width"], cfg.vision.width)
    need("patch size", "model.vision.patch_size", v["patch_size"], cfg.vision.patch_size)
    need("image encoder depth", "model.vision.depth", v["depth"], cfg.vision.depth)
    if v["mlp_ratio"] is not None and abs(v["mlp_ratio"] - cfg.vision.mlp_ratio) > 1e-6:
        problems.append(f"ViT MLP ratio {v['mlp_ratio']:g} (set model.vision.mlp_ratio={v['mlp_ratio']:g}); "
                        f"the model has {cfg.vision.mlp_ratio:g}")
    if v["width"] is not None and v["pre_norm"] != cfg.vision.pre_norm:
        problems.append(f"ViT {'with' if v['pre_norm'] else 'without'} a LayerNorm before the blocks (set "
                        f"model.vision.pre_norm={str(v['pre_norm']).lower()})")
    if arch["layout"] != "ours":  # ALBEF / BLIP: DeiT-style ViT (GELU, LayerNorm eps 1e-6)
        if cfg.vision.act != "gelu":
            problems.append(f"ALBEF/BLIP ViTs use GELU (set model.vision.act=gelu); the model has {cfg.vision.act}")
        if abs(cfg.vision.layer_norm_eps - 1e-6) > 1e-12:
            problems.append("ALBEF/BLIP ViTs use LayerNorm eps 1e-6 (set model.vision.layer_norm_eps=1e-6); the "
                            f"model has {cfg.vision.layer_norm_eps:g}")
    if v["img_size"] and v["img_size"] != cfg.vision.img_size:
        adapt.append(f"image size {v['img_size']} -> {cfg.vision.img_size}: position embeddings interpolated "
                     "(bicubic, class position kept)")
    need("text hidden size", "model.text.hidden_size", t["hidden_size"], cfg.text.hidden_size)
    need("text FFN width", "model.text.intermediate_size", t["intermediate_size"], cfg.text.intermediate_size)
    n_model = cfg.text.num_text_layers + cfg.text.num_fusion_layers
    cross = t["cross_attention_layers"]
    if arch["layout"] == "blip" or (cross and cross[0] == 0):
        if t["num_layers"] and t["num_layers"] != n_model:
            problems.append(f"{t['num_layers']} BERT layers (set model.text.num_text_layers + "
                            f"model.text.num_fusion_layers = {t['num_layers']}); the model has {n_model}")
    elif t["num_layers"]:
        n_text = cross[0] if cross else t["num_layers"]
        need("text layers (before the first cross-attention layer)", "model.text.num_text_layers", n_text,
             cfg.text.num_text_layers)
        need("fusion layers (with cross-attention)", "model.text.num_fusion_layers", t["num_layers"] - n_text,
             cfg.text.num_fusion_layers)
    vocab = t["vocab_size"]
    if vocab is not None and vocab != cfg.text.vocab_size:
        if arch["layout"] == "blip" and vocab == cfg.text.vocab_size + 2:
            adapt.append(f"vocabulary {vocab} -> {cfg.text.vocab_size}: BLIP's added [DEC]/[ENC] rows dropped")
        else:
            hint = (" (the vocabulary size follows the tokenizer: ALBEF/BLIP use bert-base-uncased's, so set "
                    "tokenizer.path to a local bert-base-uncased directory with vocab.txt)"
                    if arch["layout"] != "ours" else " (the vocabulary size follows the tokenizer: use the "
                    "checkpoint's own tokenizer)")
            problems.append(f"vocabulary of {vocab} tokens; the model has {cfg.text.vocab_size}{hint}")
    mp = t["max_position_embeddings"]
    if mp is not None and mp != cfg.text.max_position_embeddings:
        if mp > cfg.text.max_position_embeddings:
            adapt.append(f"text positions {mp} -> {cfg.text.max_position_embeddings}: table cut to the model's "
                         "maximum length")
        else:
            problems.append(f"text position table of {mp} (set model.text.max_position_embeddings={mp}); "
                            f"the model has {cfg.text.max_position_embeddings}")
    need("contrastive embedding size", "model.embed_dim", arch["embed_dim"], cfg.embed_dim)
    return problems, adapt


# ----------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a checkpoint file without running pickled code (:func:`engine.checkpoint.read_torch_file`). A
    bare state dict is wrapped as ``{"model": sd}``; a ``{"state_dict": ...}`` wrapper is renamed to
    ``model``; a DDP ``module.`` prefix is removed.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read safely (``CheckpointError``) or holds no state dict of tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return {"model": load_file(path, device="cpu")}
    obj = read_torch_file(path)
    if isinstance(obj, dict) and "model" not in obj and isinstance(obj.get("state_dict"), dict):
        obj = {**obj, "model": obj.pop("state_dict")}
    if isinstance(obj, dict) and "model" not in obj and any(isinstance(v, Tensor) for v in obj.values()):
        obj = {"model": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise ValueError(f"{path} holds no state dict (expected a 'model' entry or a dict of tensors)")
    sd = {k: v for k, v in obj["model"].items() if isinstance(v, Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    obj["model"] = sd
    return obj


# ----------------------------------------------------------------------------- loading
_OPTIONAL = {  # our component -> why its absence is fine
    "vision_proj.": "contrastive projection not in this checkpoint (e.g. an ALBEF VQA/NLVR2 checkpoint): fresh initialisation",
    "text_proj.": "contrastive projection not in this checkpoint (e.g. an ALBEF VQA/NLVR2 checkpoint): fresh initialisation",
    "temp": "temperature not in this checkpoint: config value",
    "itm_head.": "ITM head not in this checkpoint: fresh initialisation",
    "mlm_head.": "MLM head not in this checkpoint (ALBEF task checkpoints, BLIP without its decoder): fresh initialisation",
}
_PATCH = "patch_embed.proj.weight"


@dataclass
class PreparedState:
    """A foreign state dict converted to the model's key names and sizes, with every reason.

    Attributes:
        layout: ``"albef"`` or ``"blip"``.
        state: model key -> tensor (prefix applied, adapted to the model's sizes).
        expected_missing: model key -> why its absence is fine.
        dropped: source key -> why it is deliberately not used.
        unmapped: source keys no rule knows (unexpected, unexplained).
        messages: remarks for the report (adaptations, caveats).
        fit: architecture mismatches, each naming the config key to set.
        objective: the training objective's part (momentum copies, queues; our names, no prefix).
    """

    layout: str
    state: Dict[str, Tensor]
    expected_missing: Dict[str, str] = field(default_factory=dict)
    dropped: Dict[str, str] = field(default_factory=dict)
    unmapped: List[str] = field(default_factory=list)
    messages: List[str] = field(default_factory=list)
    fit: List[str] = field(default_factory=list)
    objective: Dict[str, Tensor] = field(default_factory=dict)

    def finish(self, report: LoadReport) -> ForeignLoadReport:
        """Turn ``load_model_state``'s report into a :class:`ForeignLoadReport` with the reasons; the
        architecture mismatches go to ``mismatched`` so that ``raise_if_unexpected`` raises on them."""
        out = ForeignLoadReport(**{f.name: getattr(report, f.name) for f in dataclasses.fields(LoadReport)},
                                layout=self.layout, notes=list(self.messages))
        for k in out.missing:
            if k in self.expected_missing:
                out.expected_missing.setdefault(k, self.expected_missing[k])
        for key, why in self.dropped.items():
            out.unexpected.append(key)
            out.expected_unexpected[key] = why
        out.unexpected += [k for k in self.unmapped if k not in out.unexpected]
        out.mismatched += [f"architecture: {p}" for p in self.fit if f"architecture: {p}" not in out.mismatched]
        return out


def base_prefix(model: nn.Module) -> str:
    """Where the base model sits in ``model``: the prefix of its ``visual.patch_embed.proj.weight``."""
    keys = [k for k in model.state_dict() if k.endswith("visual." + _PATCH) and not k.endswith("_m." + _PATCH)]
    if not keys:
        raise ValueError(f"{type(model).__name__} has no image encoder named 'visual' (not a VLPModel or a model "
                         "holding one)")
    return min(keys, key=len)[: -len("visual." + _PATCH)]


def foreign_prefix(state: Dict[str, Tensor]) -> Optional[str]:
    """The prefix before ``visual_encoder.`` when ``state`` has ALBEF/BLIP names (else None)."""
    keys = [k for k in state if k.endswith("visual_encoder." + _PATCH)]
    return min(keys, key=len)[: -len("visual_encoder." + _PATCH)] if keys else None


def prepare_foreign_state(model: nn.Module, state_dict: Dict[str, Tensor], prefix: Optional[str] = None,
                          source_prefix: str = "") -> PreparedState:
    """Convert an ALBEF/BLIP state dict (their names, no prefix) for ``model`` (base model at ``prefix``,
    found with :func:`base_prefix` when None): rename, check the architecture, adapt sizes losslessly,
    explain absent components, and set the momentum copies and queues aside (``objective``: the
    training objective's state, not the model's). ``source_prefix`` is put before the source key names
    in ``dropped`` / ``unmapped`` (the prefix they had in the caller's dict)."""
    p = base_prefix(model) if prefix is None else prefix
    base = model.get_submodule(p[:-1]) if p else model
    cfg = getattr(base, "cfg", None)
    layout = detect_layout(state_dict)
    if layout == "ours":
        raise ValueError("prepare_foreign_state expects ALBEF/BLIP names; this state dict has ours")
    n_text = cfg.text.num_text_layers if cfg is not None else 6
    n_types = cfg.text.type_vocab_size if cfg is not None else 2
    converted, notes = convert_to_ours(state_dict, n_text, n_types, layout)
    prep = PreparedState(layout, {p + k: v for k, v in converted.items()},
                         dropped={source_prefix + k: why for k, why in notes.dropped.items()},
                         unmapped=[source_prefix + k for k in notes.unmapped], messages=list(notes.messages))
    if cfg is not None and hasattr(cfg, "vision") and hasattr(cfg, "text"):
        prep.fit, adapt = fit_problems(architecture(state_dict, layout), cfg)
        prep.messages += adapt
    own = model.state_dict()
    for k in list(prep.state):  # the objective's side of the state (objectives/pretrain.py)
        first = k[len(p):].split(".")[0]
        if first.endswith("_m") or first in QUEUE_KEYS:
            prep.objective[k[len(p):]] = prep.state.pop(k)
    if prep.objective:
        prep.messages.append(f"{len(prep.objective)} tensors of the training objective (momentum copies, queues): "
                             "not part of the model")
    _adapt(prep.state, own, p, layout, prep.expected_missing)
    _component_reasons(prep.state, own, p, base, prep.expected_missing, prep.messages)
    for key, why in notes.synthesized.items():
        prep.messages.append(f"{p + key}: {why}")
    return prep


def _adapt(state: Dict[str, Tensor], own: Dict[str, Tensor], p: str, layout: str,
           expected: Dict[str, str]) -> None:
    """Lossless adaptations to the model's sizes (in place)."""
    for root in ("text.",):
        key = p + root + "embeddings.position_embeddings.weight"
        if key in state and key in own and state[key].shape[0] > own[key].shape[0] \
                and state[key].shape[1] == own[key].shape[1]:
            state[key] = state[key][: own[key].shape[0]]
        word = p + root + "embeddings.word_embeddings.weight"
        if layout == "blip" and word in state and word in own and state[word].shape[0] == own[word].shape[0] + 2:
            state[word] = state[word][: own[word].shape[0]]
        key = p + root + "embeddings.token_type_embeddings.weight"  # synthesised zeros: the model's row count
        if layout == "blip" and key in state and key in own and state[key].shape != own[key].shape \
                and not state[key].any():
            state[key] = torch.zeros_like(own[key])
    for key in (p + "mlm_head.decoder.weight", p + "mlm_head.bias"):
        if layout == "blip" and key in state and key in own and state[key].shape[0] == own[key].shape[0] + 2:
            state[key] = state[key][: own[key].shape[0]]


def _component_reasons(state: Dict[str, Tensor], own: Dict[str, Tensor], p: str, base: nn.Module,
                       expected: Dict[str, str], msgs: List[str]) -> None:
    """Expected-missing reasons for whole components the checkpoint lacks."""
    def keys_of(comp: str) -> List[str]:
        return [k for k in own if k.startswith(p + comp) and not k.endswith("mlm_head.decoder.weight")]

    for comp, why in _OPTIONAL.items():
        ks = keys_of(comp)
        if ks and not any(k in state for k in ks):
            for k in ks:
                expected[k] = why
    dec, word = p + "mlm_head.decoder.weight", p + "text.embeddings.word_embeddings.weight"
    if dec in own and dec not in state and word in state:
        state[dec] = state[word]  # tied to the word embeddings


def _fits(key: str, value: Tensor, own: Dict[str, Tensor]) -> bool:
    """Loadable as is, or a position embedding ``load_model_state`` interpolates."""
    return key in own and (value.shape == own[key].shape
                           or key.endswith("pos_embed") and value.shape[-1] == own[key].shape[-1])


def _plan_problems(prep: PreparedState, own: Dict[str, Tensor], expected: Dict[str, str]) -> List[str]:
    """What loading would leave unexplained, computed before touching the model."""
    def head(keys: List[str]) -> str:
        return str(keys[:10]) + (f" ... (+{len(keys) - 10})" if len(keys) > 10 else "")

    problems = [f"architecture: {p}" for p in prep.fit]
    unexpected = list(prep.unmapped) + [k for k in prep.state if k not in own]
    if unexpected:
        problems.append(f"unexpected keys (no place in the model): {head(unexpected)}")
    mism = [f"{k}: {tuple(v.shape)} -> {tuple(own[k].shape)}" for k, v in prep.state.items()
            if k in own and not _fits(k, v, own)]
    if mism:
        problems.append(f"shape mismatches: {head(mism)}")
    missing = [k for k in own if k not in prep.state and k not in expected]
    if missing:
        problems.append(f"missing keys (the checkpoint lacks them): {head(missing)}")
    return problems


def load_foreign_state(model: nn.Module, state_dict: Dict[str, Tensor], source: str = "checkpoint",
                       allow_mismatch: bool = False, prefix: Optional[str] = None,
                       expected_missing: Optional[Dict[str, str]] = None,
                       verbose: bool = True) -> ForeignLoadReport:
    """Load an ALBEF/BLIP (or our) state dict into ``model``, strictly.

    Args:
        model: a ``VLPModel`` or a task model holding one (at ``prefix``).
        state_dict: the checkpoint's ``model`` entry, keys without any prefix.
        source: a name for messages (the file path).
        allow_mismatch: load what fits and only report the rest instead of raising.
        prefix: where the base model sits in ``model`` (e.g. ``"base."``); None: found automatically.
        expected_missing: key prefix (including ``prefix``) -> reason, for the task's new parameters.
        verbose: print the report on the main process.

    Returns:
        A :class:`ForeignLoadReport` (``loaded`` / ``missing`` / ``unexpected`` / ``mismatched`` /
        ``interpolated`` with reasons, plus ``layout`` and ``notes``).

    Raises:
        ValueError: the architecture does not fit (the message names the config keys to set), or there
            are unexplained missing / unexpected / mismatched keys; unless ``allow_mismatch``. Nothing
            is loaded when it raises.
    """
    from tasks.common import load_model_state

    if detect_layout(state_dict) == "ours":
        p = base_prefix(model) if prefix is None else prefix
        report = load_model_state(model, {p + k: v for k, v in state_dict.items()}, source, expected_missing)
        out = PreparedState("ours", {}).finish(report)
    else:
        prep = prepare_foreign_state(model, state_dict, prefix)
        own = model.state_dict()
        expected = dict(prep.expected_missing)
        for pre, why in (expected_missing or {}).items():
            for k in own:
                if k.startswith(pre) and k not in prep.state:
                    expected.setdefault(k, why)
        problems = _plan_problems(prep, own, expected)
        if problems and not allow_mismatch:
            raise ValueError(
                f"{prep.layout} checkpoint {source} does not fit the model:\n  " + "\n  ".join(problems)
                + f"\nRun `python -m tools.inspect {source}` to see what it holds; pass allow_mismatch=True to "
                  "load only what fits (the rest keeps its initialisation).")
        fitting = {k: v for k, v in prep.state.items() if _fits(k, v, own)}
        for k, v in prep.state.items():
            if k in own and k not in fitting:
                expected[k] = "shape mismatch: not loaded, keeps its initialisation (allow_mismatch)"
        prep.expected_missing = expected
        out = prep.finish(load_model_state(model, fitting, source=source, expected_missing=expected))
        out.mismatched += [f"{k}: {tuple(v.shape)} -> {tuple(own[k].shape)}" for k, v in prep.state.items()
                           if k in own and k not in fitting]
        out.unexpected += [k for k in prep.state if k not in own]
        if problems:
            out.notes.append("PARTIAL LOAD (allow_mismatch): " + "; ".join(problems))
    if verbose:
        from engine.distributed import is_main

        if is_main():
            print(f"loaded {source}\n{out.summary()}", flush=True)
    return out


def load_foreign_checkpoint(model: nn.Module, path: str | os.PathLike, allow_mismatch: bool = False,
                            prefix: Optional[str] = None, expected_missing: Optional[Dict[str, str]] = None,
                            verbose: bool = True) -> ForeignLoadReport:
    """Read ``path`` safely (:func:`read_checkpoint`) and load it with :func:`load_foreign_state`.

    Works for ALBEF, BLIP and our own checkpoints alike; prints a short report (see
    ``docs/checkpoints.md``). Raises ``ValueError`` on anything unexplained unless ``allow_mismatch``.
    """
    ckpt = read_checkpoint(path)
    return load_foreign_state(model, ckpt["model"], source=os.fspath(path), allow_mismatch=allow_mismatch,
                              prefix=prefix, expected_missing=expected_missing, verbose=verbose)


def convert_in_place(model: nn.Module, state: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], Optional[PreparedState]]:
    """Hook for ``tasks.common.load_model_state``: when ``state`` (keys possibly under a task prefix)
    holds ALBEF/BLIP names, return it with those keys converted for ``model`` and the
    :class:`PreparedState` whose ``finish`` completes the report; otherwise ``(state, None)``."""
    fp = foreign_prefix(state)
    if fp is None:
        return state, None
    foreign = {k[len(fp):]: v for k, v in state.items() if k.startswith(fp)}
    rest = {k: v for k, v in state.items() if not k.startswith(fp)}
    prep = prepare_foreign_state(model, foreign, source_prefix=fp)
    return {**rest, **prep.state}, prep
