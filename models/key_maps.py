"""The key tables of ``models/loading.py``: ALBEF / BLIP names -> ours, HF BERT names, and what has no place.

``ours``: ``visual.*``, ``text.*``, ``vision_proj``, ``text_proj``, ``temp``, ``itm_head``, ``mlm_head`` (see
``models/vlp.py``); the training objective's momentum encoders ``visual_m.*``, ``text_m.*``, ``vision_proj_m.*``,
``text_proj_m.*`` and queues ``image_queue`` / ``text_queue`` ``(embed_dim, Q)``, ``idx_queue`` ``(Q,)`` (-1 =
empty), ``queue_ptr`` ``()``.
``albef`` (salesforce/ALBEF): ``visual_encoder.*`` (timm ViT names), ``text_encoder.bert.*`` (pre-training,
``BertForMaskedLM``, MLM head ``text_encoder.cls.predictions.*``) or ``text_encoder.*`` (task checkpoints,
``BertModel``); BERT layers ``0 .. fusion_layer-1`` are text layers, the later ones carry cross-attention (our
fusion layers); momentum copies ``*_m`` (whole BERTs: we keep their text layers); ``idx_queue`` ``(1, Q)``
(negative = empty), ``queue_ptr`` ``(1,)``.
``blip`` (salesforce/BLIP): the same ViT names, ``text_encoder.*`` (``BertModel`` without ``bert.``) with
cross-attention in *every* layer and no token-type table, ``ptr_queue`` (retrieval) or ``queue_ptr``, and
``text_decoder.{bert,cls}.*`` (the captioning decoder; a captioning checkpoint has only that).

ALBEF's architecture is ours: an ALBEF checkpoint reproduces ALBEF's features and ITM scores. BLIP's unimodal
text encoder runs all its layers and its fusion puts cross-attention in all of them; ours runs
``num_text_layers`` text layers, then ``num_fusion_layers`` fusion layers: a BLIP checkpoint is an
initialisation (fine-tune before evaluating).
"""
from __future__ import annotations

import re
from typing import List, Optional, Tuple

Rule = Tuple[str, Optional[str], str]  # (their prefix ending in "." or whole key, our prefix / key or None, why unused)

_HEAD = "ViT classifier head (unused)"
_SAME = [(k, k, "") for k in ("vision_proj.", "text_proj.", "vision_proj_m.", "text_proj_m.", "itm_head.", "temp",
                              "image_queue", "text_queue", "idx_queue", "queue_ptr")]
_VISUAL = [("visual_encoder.head.", None, _HEAD), ("visual_encoder_m.head.", None, _HEAD),
           ("visual_encoder.", "visual.", ""), ("visual_encoder_m.", "visual_m.", "")]

ALBEF: List[Rule] = _VISUAL + [  # the first rule that matches a key decides
    ("text_encoder.cls.predictions.decoder.bias", None, "alias of cls.predictions.bias"),
    ("text_encoder.cls.predictions.", "mlm_head.", ""),
    ("text_encoder.cls.", None, "BERT NSP head (unused)"),
    ("text_encoder_m.cls.", None, "momentum MLM head (our momentum model has none)"),
    ("text_encoder.bert.", "text.", ""), ("text_encoder.", "text.", ""),
    ("text_encoder_m.bert.", "text_m.", ""), ("text_encoder_m.", "text_m.", ""),
    *[(p, None, "ALBEF answer decoder of a VQA checkpoint (not part of the base model)")
      for p in ("text_decoder.", "text_decoder_m.")],
    *[(p, None, "ALBEF NLVR2 classifier (a task head, not part of the base model)") for p in ("cls_head.", "cls_head_m.")],
] + _SAME

BLIP: List[Rule] = _VISUAL + [
    ("text_decoder.cls.predictions.decoder.bias", None, "alias of cls.predictions.bias"),
    ("text_decoder.cls.predictions.", "mlm_head.", ""),  # BLIP's LM head initialises our MLM head
    ("text_encoder.", "text.", ""), ("text_encoder_m.", "text_m.", ""),
    ("text_decoder.bert.", "text.", ""),  # only for a captioning checkpoint (no text_encoder)
    ("text_decoder.", None, "BLIP captioning decoder (separate weights; our captioning head reuses the base "
                            "model's text layers)"),
    ("ptr_queue", "queue_ptr", ""),
] + _SAME

_LAYER = re.compile(r"(text|text_m)\.encoder\.layer\.(\d+)\.(crossattention\.)?")


def bert_reason(key: str, layout: str, n_text: Optional[int]) -> str:
    """Why our BERT key ``key`` (``text.*`` / ``text_m.*``, converted from ``layout``) has no place in a model
    with ``n_text`` text layers (``""``: it has one; ``n_text`` None: keep every layer)."""
    sub = key.split(".", 1)[1]
    if sub == "embeddings.position_ids":
        return "position_ids buffer (recomputed)"
    if sub.startswith("pooler."):
        return "BERT pooler (unused)"
    m = _LAYER.match(key)
    if m is None or n_text is None:
        return ""
    momentum, i = m.group(1) == "text_m", int(m.group(2))
    if momentum and i >= n_text:
        return (f"{layout.upper()} momentum {'fusion ' if layout == 'albef' else ''}layers beyond the text layers "
                "(our momentum model keeps only the text layers)")
    if layout == "blip" and m.group(3) and i < n_text:
        return (f"BLIP {'momentum ' if momentum else ''}cross-attention in a layer that our model runs as a text-only "
                "layer (BLIP puts cross-attention in every layer)")
    return ""


QUEUE_WITHOUT_IDS = ("queue without idx_queue (a pre-training checkpoint): its features cannot be matched to image "
                     "ids, so our queue restarts empty")
BLIP_CAVEAT = ("BLIP runs all text layers for unimodal text and cross-attention in every layer; this model splits "
               "them into text and fusion layers, so outputs differ from BLIP's: fine-tune before evaluating")
VOCAB_KEYS = ("word_embeddings.weight", "mlm_head.decoder.weight", "mlm_head.bias")  # first dimension: vocabulary
_NO_PROJECTION = "contrastive projection not in this checkpoint (e.g. an ALBEF VQA/NLVR2 checkpoint): fresh initialisation"
OPTIONAL = {  # our component -> why an ALBEF/BLIP checkpoint may lack it
    "vision_proj.": _NO_PROJECTION,
    "text_proj.": _NO_PROJECTION,
    "temp": "temperature not in this checkpoint: config value",
    "itm_head.": "ITM head not in this checkpoint: fresh initialisation",
    "mlm_head.": "MLM head not in this checkpoint (ALBEF task checkpoints, BLIP without its decoder): fresh initialisation",
}
# the training objective's feature queues (keys); its momentum encoders are the first names ending in "_m"
QUEUES = ("image_queue", "text_queue", "idx_queue", "queue_ptr", "image_queue_h", "text_queue_h", "length_queue",
          "ptr_queue")
OBJECTIVE_REASON = "training objective's state (momentum encoder / feature queue): not part of this model"
# the base-model config keys one of our checkpoints must match (the image size and dropout may differ)
ARCH_KEYS = {"vision": ("patch_size", "width", "depth", "num_heads", "mlp_ratio", "pre_norm", "act"),
             "text": ("hidden_size", "num_text_layers", "num_fusion_layers", "num_heads", "intermediate_size",
                      "max_position_embeddings", "type_vocab_size"),
             "": ("embed_dim",)}
# ViT width -> heads: ALBEF builds only ViT-B/16, BLIP ViT-B/16 and ViT-L/16 (64-dim heads); both bert-base (12)
FOREIGN_HEADS = {768: 12, 1024: 16}

BERT_CONFIG = (("hidden_size", "hidden_size"), ("num_heads", "num_attention_heads"),  # (TextConfig, config.json)
               ("intermediate_size", "intermediate_size"), ("vocab_size", "vocab_size"))


def bert_file_reason(key: str, num_layers: int, has_mlm_head: bool) -> str:
    """Why a HF BERT key (``bert.`` removed) is not used by a model with ``num_layers`` layers (``""``: used)."""
    m = re.match(r"encoder\.layer\.(\d+)\.", key)
    return ("BERT pooler (unused)" if key.startswith("pooler.") else
            "NSP head (unused)" if key.startswith("cls.seq_relationship.") else
            "position_ids buffer (recomputed)" if key == "embeddings.position_ids" else
            f"BERT layers beyond the model's {num_layers} layers (unused)" if m and int(m.group(1)) >= num_layers else
            "MLM head weights (no MLM head given)" if key.startswith("cls.") and not has_mlm_head else
            "alias of cls.predictions.bias" if key == "cls.predictions.decoder.bias" else "")
