"""Loading weights into this project's models: one path for every file.

:func:`load_into` loads a state dict into a module strictly. A foreign layout (ALBEF / BLIP names, detected by
their keys) is first converted by :func:`checkpoint_filter_fn` through the key tables of ``models/key_maps.py``
(timm-style: rename, then adapt to the model: position embeddings interpolated, ...). Every key the module
does not receive and every key the state holds in vain is listed in a :class:`LoadReport` with its reason;
anything unexplained raises one :class:`LoadError` before anything is loaded, naming the keys and, on an
architecture mismatch, the config keys to set (``allow_mismatch=True`` loads what fits).

:func:`load_checkpoint_into` loads one of our checkpoints or an ALBEF/BLIP file and compares the architecture
the checkpoint was trained with (its saved config; for ALBEF/BLIP what their code fixes) with the model's.
The training objective's part of a checkpoint (momentum encoders, feature queues: :func:`split_objective_state`)
is not the model's: it comes back in ``LoadReport.objective`` for the caller's objective. The encoder weight
files (OpenAI CLIP, DeiT / timm ViT, a local HF BERT directory) load through :func:`vit_filter_fn` /
:func:`bert_filter_fn` and the same :func:`load_into`. Files are read only by :func:`read_checkpoint`
(``engine.checkpoint.read_torch_file``: no pickled code runs).
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import _convert_openai_clip
from torch import Tensor, nn

from engine.checkpoint import read_torch_file
from engine.config import ConfigError
from models import key_maps as K

__all__ = ["LoadError", "LoadReport", "Converted", "read_checkpoint", "detect_layout", "checkpoint_filter_fn",
           "split_objective_state", "load_into", "load_checkpoint_into", "architecture", "fit_problems",
           "interpolate_pos_embed", "vit_filter_fn", "bert_filter_fn", "load_vision_weights", "load_bert_weights",
           "load_encoder_weights", "ours_prefix", "copy_into"]


class LoadError(ConfigError):
    """Weights that cannot be loaded (a file without a state dict, an unknown layout, weights that do not fit
    the model): one line naming the file and, for a misfit, the keys and the config keys to set."""


def _head(keys: List[str], n: int = 10, listed: bool = True) -> str:
    return (str(keys[:n]) if listed else ", ".join(keys[:n])) + (f" ... (+{len(keys) - n})" if len(keys) > n else "")


@dataclass
class LoadReport:
    """What a load did: ``loaded`` / ``missing`` / ``unexpected`` keys (the reasons of the expected ones in
    ``expected_missing`` / ``expected_unexpected``), ``mismatched`` (``"key: source shape -> target shape"``),
    ``interpolated`` (resized position embeddings), the source ``layout``, ``notes`` on adaptations, the
    architecture ``problems`` (each naming the config key to set) and the checkpoint's ``objective`` state."""

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)
    interpolated: List[str] = field(default_factory=list)
    expected_missing: Dict[str, str] = field(default_factory=dict)
    expected_unexpected: Dict[str, str] = field(default_factory=dict)
    layout: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    source: str = "the weights"
    objective: Dict[str, Tensor] = field(default_factory=dict, repr=False)

    def unexplained_missing(self) -> List[str]:
        return [k for k in self.missing if k not in self.expected_missing]

    def unexplained_unexpected(self) -> List[str]:
        return [k for k in self.unexpected if k not in self.expected_unexpected]

    def problem_list(self) -> List[str]:
        """Everything unexplained, one entry per kind."""
        out = [f"architecture: {p}" for p in self.problems]
        for what, keys in (("unexpected keys (no place in the model)", self.unexplained_unexpected()),
                           ("shape mismatches", self.mismatched),
                           ("missing keys (the checkpoint lacks them)", self.unexplained_missing())):
            out += [f"{what}: {_head(keys)}"] if keys else []
        return out

    def summary(self, max_keys: int = 10) -> str:
        """A short multi-line human-readable report (reasons counted, unexplained keys in capitals)."""
        def count(reasons: Dict[str, str], keys: List[str]) -> Dict[str, int]:
            out: Dict[str, int] = {}
            for k in keys:
                if k in reasons:
                    out[reasons[k]] = out.get(reasons[k], 0) + 1
            return out

        lines = [f"checkpoint layout: {self.layout}"] if self.layout else []
        lines += [f"note: {n}" for n in self.notes]
        interpolated = f" ({len(self.interpolated)} interpolated: {_head(self.interpolated, max_keys, False)})"
        lines.append(f"loaded {len(self.loaded)} tensors" + (interpolated if self.interpolated else ""))
        lines += [f"missing (expected, {r}): {n}" for r, n in count(self.expected_missing, self.missing).items()]
        lines += [f"ignored (expected, {r}): {n}" for r, n in count(self.expected_unexpected, self.unexpected).items()]
        for what, keys in (("ARCHITECTURE", self.problems), ("MISSING", self.unexplained_missing()),
                           ("UNEXPECTED", self.unexplained_unexpected()), ("SHAPE MISMATCH", self.mismatched)):
            lines += [f"{what}: {_head(keys, max_keys, False)}"] if keys else []
        return "\n".join(lines)

    def raise_if_unexpected(self, allow: bool = False) -> None:
        """Raise :class:`LoadError` (one line) on anything unexplained, unless ``allow``."""
        problems = [] if allow else self.problem_list()
        if problems:
            raise LoadError(f"{self.source} does not fit the model{f' ({self.layout} layout)' if self.layout else ''}: "
                            + "; ".join(problems) + ". The config's model sections must describe the checkpoint's "
                            "model (the image size and dropout may differ; `python -m tools.inspect FILE` "
                            "shows what a checkpoint holds); allow_mismatch=True loads only what fits")


class Converted(dict):
    """A state dict in a target module's key names (a filter function's result), with ``layout``, ``dropped``
    (source key -> why it is not used), ``expected_missing`` (target key prefix -> why its absence is fine),
    ``interpolated`` keys, ``notes`` and architecture ``problems``."""

    def __init__(self, state: Any = (), layout: Optional[str] = None) -> None:
        super().__init__(state)
        self.layout, self.dropped, self.expected_missing = layout, {}, {}
        self.interpolated: List[str] = []
        self.notes: List[str] = []
        self.problems: List[str] = []

    def derive(self, state: Dict[str, Tensor], prefix: str = "") -> "Converted":
        """``state`` under ``prefix`` with this conversion's reasons (their keys under ``prefix`` too)."""
        out = Converted({prefix + k: v for k, v in state.items()}, self.layout)
        out.dropped = {prefix + k: why for k, why in self.dropped.items()}
        out.expected_missing = {prefix + k: why for k, why in self.expected_missing.items()}
        out.interpolated = [prefix + k for k in self.interpolated if k in state]
        out.notes, out.problems = list(self.notes), list(self.problems)
        return out


# ----------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a weight file without running pickled code: a torch file (``engine.checkpoint.read_torch_file``), a
    ``.safetensors`` file or an OpenAI-CLIP TorchScript archive (its tensors). Returns the file's dict with
    ``model`` = its ``model`` or ``state_dict`` entry, or the file itself, as ``{name: tensor}`` (a DDP
    ``module.`` prefix removed). Raises ``FileNotFoundError``, ``CheckpointError`` or :class:`LoadError` (no tensors)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj: Any = {"model": load_file(path, device="cpu")}
    elif zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        with warnings.catch_warnings():  # TorchScript (how OpenAI ships CLIP): deprecated but readable
            warnings.simplefilter("ignore", FutureWarning)
            obj = {"model": dict(torch.jit.load(path, map_location="cpu").state_dict())}
    else:
        obj = read_torch_file(path)
    if isinstance(obj, dict) and not isinstance(obj.get("model"), dict):
        inner = obj.get("state_dict")
        obj = {**{k: v for k, v in obj.items() if k != "state_dict"}, "model": inner} if isinstance(inner, dict) \
            else {"model": obj}
    sd = {k: v for k, v in obj["model"].items() if isinstance(v, Tensor)} if isinstance(obj, dict) else {}
    if not sd:
        raise LoadError(f"{path} holds no state dict (expected a 'model' or 'state_dict' entry or a dict of tensors)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {**obj, "model": sd}


# ----------------------------------------------------------------------------- ALBEF / BLIP / ours
def _foreign_layout(state: Dict[str, Any]) -> Optional[str]:
    """``"albef"`` or ``"blip"`` for ALBEF/BLIP names (``visual_encoder.*``), else None. BLIP: ``ptr_queue``,
    cross-attention in text layer 0, or only a ``text_decoder`` (a captioning checkpoint)."""
    keys = [k for k, v in state.items() if isinstance(v, Tensor)]
    if not any(k.startswith("visual_encoder.") for k in keys):
        return None
    text = [k for k in keys if re.match(r"text_encoder\.(bert\.)?(embeddings|encoder\.layer)\.", k)]
    cross0 = re.compile(r"text_encoder\.(bert\.)?encoder\.layer\.0\.crossattention\.")
    if "ptr_queue" in state or any(cross0.match(k) for k in text):
        return "blip"
    return "blip" if not text and any(re.match(r"text_decoder\.(bert\.)?embeddings\.", k) for k in keys) else "albef"


def detect_layout(state: Dict[str, Any]) -> str:
    """``"ours"``, ``"albef"`` or ``"blip"`` from the key names; :class:`LoadError` for none of them."""
    keys = [k for k, v in state.items() if isinstance(v, Tensor)]
    if not keys:
        raise LoadError("the checkpoint holds no tensors")
    layout = _foreign_layout(state)
    if layout is None and not any(k.endswith("visual.patch_embed.proj.weight") or k.startswith("text.embeddings.")
                                  for k in keys):
        raise LoadError("unknown checkpoint layout (neither this project's 'visual.*' / 'text.*' names nor "
                         f"ALBEF/BLIP's 'visual_encoder.*'); first keys: {keys[:5]}")
    return layout or "ours"


def _rename(key: str, table: List[Tuple[str, Optional[str], str]]) -> Tuple[Optional[str], str]:
    """``(our key, "")``, ``(None, why it is not used)``, or the key itself when no rule knows it (unexpected)."""
    for src, dst, why in table:
        if key.startswith(src) if src.endswith(".") else key == src:
            return (None, why) if dst is None else (dst + key[len(src):] if src.endswith(".") else dst, "")
    return key, ""


def _convert(state: Dict[str, Any], layout: str, n_text: Optional[int] = None, type_rows: int = 0) -> Converted:
    """ALBEF/BLIP names -> ours (model and objective keys). ``n_text``: our text layers (what has no place in our
    model is dropped with the reason); None keeps every layer and queue (to describe the file)."""
    conv = Converted(layout=layout)
    table = K.ALBEF if layout == "albef" else K.BLIP
    if layout == "blip" and any(k.startswith("text_encoder.") for k in state):
        table = [r for r in table if r[0] != "text_decoder.bert."]
    elif layout == "blip" and any(k.startswith("text_decoder.bert.") for k in state):
        conv.notes.append("captioning checkpoint: the text transformer is initialised from BLIP's (causal) text decoder")
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        target, why = _rename(key.replace("_checkpoint_wrapped_module.", ""), table)
        if target is not None and target.startswith(("text.", "text_m.")):
            why = K.bert_reason(target, layout, n_text)
            target = None if why else target
        if target is None:
            conv.dropped[key] = why
        else:
            conv[target] = value
    if "idx_queue" in conv:  # (1, Q), negative = empty -> (Q,), -1 = empty
        idx = conv["idx_queue"].reshape(-1).long().clone()
        conv["idx_queue"] = idx.masked_fill_(idx < 0, -1)
    if "queue_ptr" in conv:
        conv["queue_ptr"] = conv["queue_ptr"].reshape(()).long()
    if n_text is not None and "image_queue" in conv and "idx_queue" not in conv:
        for ours, theirs in (("image_queue", "image_queue"), ("text_queue", "text_queue"),
                             ("queue_ptr", "ptr_queue" if "ptr_queue" in state else "queue_ptr")):
            if conv.pop(ours, None) is not None:
                conv.dropped[theirs] = K.QUEUE_WITHOUT_IDS
    for root in ("text.", "text_m.") if layout == "blip" and type_rows else ():
        word, tt = conv.get(root + "embeddings.word_embeddings.weight"), root + "embeddings.token_type_embeddings.weight"
        if word is not None and tt not in conv:
            conv[tt] = torch.zeros(type_rows, word.shape[1], dtype=word.dtype)
            conv.notes.append(f"{tt}: BLIP has no token-type embeddings: zeros (identical embeddings)")
    if layout == "blip" and any(k.startswith("text.encoder.layer.") for k in conv):
        conv.notes.append(K.BLIP_CAVEAT)
    return conv


def interpolate_pos_embed(pos_embed: Tensor, new_grid: int | Tuple[int, int], num_prefix_tokens: int = 1) -> Tensor:
    """``(1, P + N, C)`` position embeddings resized to a new patch grid, the ``P`` prefix (class) positions kept:
    timm's ``resample_abs_pos_embed``, bicubic without antialiasing (ALBEF's ``interpolate_pos_embed``; timm's
    default antialias=True gives other values). The old grid must be square."""
    n = pos_embed.shape[1] - num_prefix_tokens
    if math.isqrt(n) ** 2 != n:
        raise LoadError(f"position embedding has {n} patch positions, not a square grid")
    size = [new_grid, new_grid] if isinstance(new_grid, int) else list(new_grid)
    return resample_abs_pos_embed(pos_embed, size, num_prefix_tokens=num_prefix_tokens, interpolation="bicubic",
                                  antialias=False)


def _adapt(conv: Converted, own: Dict[str, Tensor]) -> None:
    """Lossless adaptations to the module's sizes (in place); a momentum key (``visual_m.*``) the module lacks
    is sized like its online counterpart (``visual.*``)."""
    foreign = conv.layout in ("albef", "blip")
    for k, v in list(conv.items()):
        ref = own.get(k, own.get(re.sub(r"^(\w+)_m\.", r"\1.", k)))
        if ref is None or v.shape == ref.shape or v.ndim != ref.ndim:
            continue
        if k.endswith("pos_embed") and v.shape[-1] == ref.shape[-1]:
            conv[k] = interpolate_pos_embed(v, math.isqrt(ref.shape[1] - 1))
            conv.interpolated.append(k)
        elif foreign and k.endswith("position_embeddings.weight") and v.shape[0] > ref.shape[0] \
                and v.shape[1:] == ref.shape[1:]:
            conv[k] = v[: ref.shape[0]]  # ALBEF/BLIP's 512 text positions: cut to the model's maximum length
        elif conv.layout == "blip" and k.endswith(K.VOCAB_KEYS) and v.shape[0] == ref.shape[0] + 2:
            conv[k] = v[: ref.shape[0]]  # BLIP's added [DEC] / [ENC] tokens


def checkpoint_filter_fn(state: Dict[str, Any], model: nn.Module) -> Converted:
    """A state dict of any layout (ours, ALBEF, BLIP: detected by its keys) in ``model``'s names and sizes.

    ALBEF/BLIP names go through the tables of ``models/key_maps.py`` (``model.cfg``'s text layers decide what
    has a place), components they lack are explained, and their architecture is compared with ``model.cfg``
    (``problems`` naming the config keys to set). Any layout: position embeddings interpolated to the model's
    grid; ALBEF/BLIP text position tables cut to the model's length and BLIP's two added vocabulary rows
    dropped; the MLM decoder tied to the word embeddings. Momentum / queue keys keep their objective names."""
    own, cfg, layout = model.state_dict(), getattr(model, "cfg", None), _foreign_layout(state)
    if layout is None:
        conv = Converted({k: v for k, v in state.items() if isinstance(v, Tensor)}, "ours")
    else:
        text, tt = getattr(cfg, "text", None), own.get("text.embeddings.token_type_embeddings.weight")
        conv = _convert(state, layout, text.num_text_layers if text else 6, tt.shape[0] if tt is not None else 2)
        for comp, why in K.OPTIONAL.items():
            if any(k.startswith(comp) for k in own) and not any(k.startswith(comp) for k in conv):
                conv.expected_missing[comp] = why
        if text is not None and hasattr(cfg, "vision"):
            problems, adapted = fit_problems(architecture(conv, layout), cfg)
            conv.problems += problems
            conv.notes += adapted
    _adapt(conv, own)
    word, dec = conv.get("text.embeddings.word_embeddings.weight"), "mlm_head.decoder.weight"
    if word is not None and dec in own:
        if dec in conv and not (conv[dec].shape == word.shape and torch.equal(conv[dec], word)):
            conv.notes.append("the checkpoint's MLM decoder is not tied to its word embeddings; ours is tied, so the "
                              "word embeddings are used")
        conv[dec] = word
    return conv


def split_objective_state(state: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(model part, objective part)`` of a state dict: the training objective's keys are those of the momentum
    encoders (a first name ending in ``_m``: ours ``visual_m.*``, ``text_m.*``, ``vision_proj_m.*``,
    ``text_proj_m.*``, ALBEF/BLIP's ``visual_encoder_m.*``, ...) and of the feature queues (``image_queue``,
    ``text_queue``, ``idx_queue``, ``queue_ptr``, ``image_queue_h``, ``text_queue_h``, ``length_queue``; BLIP's ``ptr_queue``). A
    model's own state comes back whole; the parts of a :class:`Converted` state keep the conversion's reasons."""
    objective = {k: v for k, v in state.items() if k.split(".")[0].endswith("_m") or k.split(".")[0] in K.QUEUES}
    model = {k: v for k, v in state.items() if k not in objective}
    return (state.derive(model), state.derive(objective)) if isinstance(state, Converted) else (model, objective)


# ----------------------------------------------------------------------------- loading
@torch.no_grad()
def load_into(module: nn.Module, state: Dict[str, Tensor], *, source: str,
              expected_missing: Optional[Dict[str, str]] = None, allow_mismatch: bool = False) -> LoadReport:
    """Load ``state`` into ``module`` strictly and return what happened.

    ``state``: a filter function's :class:`Converted` result, or a plain state dict (then converted by
    :func:`checkpoint_filter_fn`: ALBEF/BLIP names are recognised). ``expected_missing``: module key prefix
    -> why its absence is fine (a task's new parameters). Raises :class:`LoadError` (one line: the
    architecture problems, unexpected, mismatched and missing keys without a reason; nothing is loaded)
    unless ``allow_mismatch``, which loads what fits and keeps the rest at its initialisation."""
    conv = state if isinstance(state, Converted) else checkpoint_filter_fn(state, module)
    own = module.state_dict()
    report = LoadReport(layout=conv.layout, notes=list(conv.notes), problems=list(conv.problems), source=source,
                        unexpected=list(conv.dropped), expected_unexpected=dict(conv.dropped))
    fits = {}
    for k, v in conv.items():
        if k not in own:
            report.unexpected.append(k)
        elif v.shape != own[k].shape:
            report.mismatched.append(f"{k}: {tuple(v.shape)} -> {tuple(own[k].shape)}")
        else:
            fits[k] = v
    report.loaded, report.interpolated = list(fits), [k for k in conv.interpolated if k in fits]
    report.missing = [k for k in own if k not in conv]
    reasons = {**conv.expected_missing, **(expected_missing or {})}
    for k in report.missing:
        why = next((w for p, w in reasons.items() if k.startswith(p)), None)
        if why is not None:
            report.expected_missing[k] = why
    report.raise_if_unexpected(allow_mismatch)
    if report.problem_list():
        report.notes.append("PARTIAL LOAD (allow_mismatch): " + "; ".join(report.problem_list()))
    module.load_state_dict({**own, **fits}, strict=True)
    return report


def _config_problems(model_cfg: Any, config: Any) -> List[str]:
    """Where ``model_cfg`` differs from the architecture in one of our checkpoints' saved run ``config``."""
    saved = config.get("model") if isinstance(config, dict) else None
    out = []
    for section, keys in K.ARCH_KEYS.items() if isinstance(saved, dict) else ():
        ours, theirs = (getattr(model_cfg, section), saved.get(section)) if section else (model_cfg, saved)
        for key in keys if isinstance(theirs, dict) else ():
            if key in theirs and theirs[key] != getattr(ours, key):
                out.append(f"model.{section + '.' if section else ''}{key}: checkpoint {theirs[key]!r}, config "
                           f"{getattr(ours, key)!r}")
    return out


def load_checkpoint_into(module: nn.Module, checkpoint: str | os.PathLike | Dict[str, Any], *,
                         source: Optional[str] = None, prefix: str = "",
                         expected_missing: Optional[Dict[str, str]] = None, allow_mismatch: bool = False) -> LoadReport:
    """Load one of our checkpoints or an ALBEF/BLIP file into ``module`` (its base model at ``prefix``, e.g.
    ``"base."`` for a task model holding a pre-trained model).

    ``checkpoint``: a path (read by :func:`read_checkpoint`) or a dict read from one (``model``, optionally
    ``objective`` and ``config``). One of our checkpoints must have been trained with the architecture of
    ``module``'s ``cfg`` (its saved config; the image size and dropout may differ). The objective's
    keys (:func:`split_objective_state`) are not loaded: ``report.objective`` holds them (our names) for the
    caller's training objective, and the report lists them as ignored. Raises :class:`LoadError` as
    :func:`load_into` does."""
    path = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else None
    ckpt = read_checkpoint(path) if path is not None else checkpoint
    base = module.get_submodule(prefix.rstrip(".")) if prefix else module
    conv = checkpoint_filter_fn({**ckpt["model"], **ckpt.get("objective", {})}, base)
    cfg = getattr(base, "cfg", None)
    if conv.layout == "ours" and hasattr(cfg, "vision"):
        conv.problems += _config_problems(cfg, ckpt.get("config"))
    state, objective = split_objective_state(conv)
    state.dropped.update({k: K.OBJECTIVE_REASON for k in objective})
    report = load_into(module, state.derive(state, prefix), source=source or os.fspath(path or "checkpoint"),
                       expected_missing=expected_missing, allow_mismatch=allow_mismatch)
    report.objective = objective
    return report


# ----------------------------------------------------------------------------- inspecting a state dict
def ours_prefix(state: Dict[str, Any]) -> str:
    """Where the base model's keys start in one of our (possibly task) state dicts: ``""`` or e.g. ``"base."``."""
    found = [k[: -len("visual.patch_embed.proj.weight")] for k in state if k.endswith("visual.patch_embed.proj.weight")]
    return min(found, key=len) if found else ""


def _count(state: Dict[str, Any], prefix: str) -> int:
    """``1 + `` the largest ``i`` of the keys ``prefix + "<i>."`` (0 if none)."""
    idx = [int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def architecture(state: Dict[str, Any], layout: Optional[str] = None) -> Dict[str, Any]:
    """What a state dict (any layout) holds, read from tensor shapes: ``layout``, ``vision`` (``width``,
    ``patch_size``, ``depth``, ``mlp_ratio``, ``grid``, ``img_size``, ``pre_norm``), ``text`` (``prefix``,
    ``hidden_size``, ``num_layers``, ``cross_attention_layers``, ``intermediate_size``, ``vocab_size``,
    ``max_position_embeddings``, ``token_types``), ``embed_dim``, ``queue_size``, ``momentum``, ``itm_head``,
    ``mlm_head``, ``decoder_layers`` (an ALBEF/BLIP ``text_decoder``). Entries that cannot be read are None."""
    layout = layout or detect_layout(state)
    sd = state if layout == "ours" or isinstance(state, Converted) else _convert(state, layout)
    p = ours_prefix(sd)

    def dim(key: str, i: int) -> Optional[int]:
        v = sd.get(p + key)
        return int(v.shape[i]) if v is not None else None

    patch, word = "visual.patch_embed.proj.weight", "text.embeddings.word_embeddings.weight"
    pos, fc1, queue = (sd.get(p + k) for k in ("visual.pos_embed", "visual.blocks.0.mlp.fc1.weight", "image_queue"))
    n = pos.shape[1] - 1 if pos is not None else 0
    grid = math.isqrt(n) if n and math.isqrt(n) ** 2 == n else None
    cross = re.compile(re.escape(p) + r"text\.encoder\.layer\.(\d+)\.crossattention\.")
    text_src = p + "text." if layout == "ours" else next(
        (s for s in ("text_encoder.bert.", "text_encoder.", "text_decoder.bert.")
         if any(k.startswith(s + "embeddings.") for k in state)), "text.")
    return {"layout": layout,
            "vision": {"width": dim(patch, 0), "patch_size": dim(patch, -1),
                       "depth": _count(sd, p + "visual.blocks.") or None, "mlp_ratio": fc1.shape[0] / fc1.shape[1] if fc1 is not None else None, "grid": grid,
                       "img_size": grid * dim(patch, -1) if grid and dim(patch, -1) else None,
                       "pre_norm": p + "visual.norm_pre.weight" in sd},
            "text": {"prefix": text_src, "hidden_size": dim(word, 1), "num_layers": _count(sd, p + "text.encoder.layer."),
                     "cross_attention_layers": sorted({int(m.group(1)) for k in sd if (m := cross.match(k))}),
                     "intermediate_size": dim("text.encoder.layer.0.intermediate.dense.weight", 0),
                     "vocab_size": dim(word, 0),
                     "max_position_embeddings": dim("text.embeddings.position_embeddings.weight", 0),
                     "token_types": dim("text.embeddings.token_type_embeddings.weight", 0) or 0},
            "embed_dim": dim("vision_proj.weight", 0),
            "queue_size": int(queue.shape[1]) if queue is not None and queue.ndim == 2 else None,
            "momentum": any(k.startswith(p + "visual_m.") for k in sd), "itm_head": p + "itm_head.weight" in sd,
            "mlm_head": any(k.startswith(p + "mlm_head.") for k in sd),
            "decoder_layers": 0 if layout == "ours" else max(_count(state, "text_decoder.bert.encoder.layer."),
                                                             _count(state, "text_decoder.encoder.layer."))}


def _vision_fit(v: Dict[str, Any], vc: Any) -> List[str]:
    """The mismatches between a checkpoint's ViT (``architecture(...)["vision"]``) and a ``VisionConfig``."""
    out = [f"image encoder {what} {v[key]} (set model.vision.{key}={v[key]}); the model has {getattr(vc, key)}"
           for what, key in (("width", "width"), ("patch size", "patch_size"), ("depth", "depth"))
           if v[key] is not None and v[key] != getattr(vc, key)]
    if v["mlp_ratio"] is not None and abs(v["mlp_ratio"] - vc.mlp_ratio) > 1e-6:
        out.append(f"ViT MLP ratio {v['mlp_ratio']:g} (set model.vision.mlp_ratio={v['mlp_ratio']:g}); the model has "
                   f"{vc.mlp_ratio:g}")
    if v["width"] is not None and v["pre_norm"] != vc.pre_norm:
        out.append(f"ViT {'with' if v['pre_norm'] else 'without'} a LayerNorm before the blocks (set "
                   f"model.vision.pre_norm={str(v['pre_norm']).lower()})")
    return out


def fit_problems(arch: Dict[str, Any], cfg: Any) -> Tuple[List[str], List[str]]:
    """Compare a checkpoint's :func:`architecture` with a ``VLPConfig``: ``(problems, adaptations)``. Problems
    cannot be loaded and name the config key and value to set; adaptations are what the loader handles (image
    size, a longer text position table, BLIP's two added vocabulary rows)."""
    v, t, foreign = arch["vision"], arch["text"], arch["layout"] != "ours"
    problems, adapt = _vision_fit(v, cfg.vision), []

    def need(what: str, key: str, have: Any, want: Any) -> None:
        if have is not None and want is not None and have != want:
            problems.append(f"{what} {have} (set {key}={have}); the model has {want}")

    if foreign:  # DeiT-style ViT (GELU, LayerNorm eps 1e-6); 64-dim heads in the ViTs and BERT they build
        need("ALBEF/BLIP ViT attention heads", "model.vision.num_heads", K.FOREIGN_HEADS.get(v["width"]),
             cfg.vision.num_heads)
        need("bert-base attention heads", "model.text.num_heads", 12 if t["hidden_size"] == 768 else None,
             cfg.text.num_heads)
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
    n_model, cross = cfg.text.num_text_layers + cfg.text.num_fusion_layers, t["cross_attention_layers"]
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
    if arch["layout"] == "blip" and vocab == cfg.text.vocab_size + 2:
        adapt.append(f"vocabulary {vocab} -> {cfg.text.vocab_size}: BLIP's added [DEC]/[ENC] rows dropped")
    elif vocab is not None and vocab != cfg.text.vocab_size:
        hint = (" (the vocabulary size follows the tokenizer: ALBEF/BLIP use bert-base-uncased's, so set "
                "tokenizer.path to a local bert-base-uncased directory with vocab.txt)" if foreign else
                " (the vocabulary size follows the tokenizer: use the checkpoint's own tokenizer)")
        problems.append(f"vocabulary of {vocab} tokens; the model has {cfg.text.vocab_size}{hint}")
    mp = t["max_position_embeddings"]
    if mp is not None and mp > cfg.text.max_position_embeddings:
        adapt.append(f"text positions {mp} -> {cfg.text.max_position_embeddings}: table cut to the model's maximum length")
    else:
        need("text position table of", "model.text.max_position_embeddings", mp, cfg.text.max_position_embeddings)
    need("contrastive embedding size", "model.embed_dim", arch["embed_dim"], cfg.embed_dim)
    return problems, adapt


# ----------------------------------------------------------------------------- encoder weight files
def vit_filter_fn(state: Dict[str, Tensor], vit: nn.Module, fmt: str = "auto") -> Converted:
    """An OpenAI CLIP (``visual.conv1.weight``, ``visual.transformer.resblocks.*``; the ``visual.`` prefix is
    optional, text-tower keys are ignored; timm's ``_convert_openai_clip``), DeiT or timm ViT state dict (heads
    and the distillation token ignored) in the names and grid of the timm ViT ``vit``; ``fmt``: ``"clip"``,
    ``"deit"``, ``"timm"`` or ``"auto"`` (by the keys). Problems name the config keys to set."""
    if fmt == "auto":
        clip = any(re.search(r"(^|\.)(conv1\.weight|class_embedding|transformer\.resblocks\.)", k) for k in state)
        if not clip and "patch_embed.proj.weight" not in state:
            raise LoadError("cannot detect the vision checkpoint format (no 'visual.conv1.weight' or "
                             "'patch_embed.proj.weight'); set model.vision_weights_format to clip or timm")
        fmt = "clip" if clip else "timm"
    if fmt not in ("clip", "deit", "timm"):
        raise LoadError(f"unknown vision checkpoint format {fmt!r}; use 'auto', 'clip', 'deit' or 'timm'")
    conv = Converted(layout=fmt)
    if fmt == "clip":
        prefix = "visual." if any(k.startswith("visual.") for k in state) else ""
        conv.dropped.update({k: "CLIP text tower / logit scale (unused)" for k in state if not k.startswith(prefix)})
        conv.update(_convert_openai_clip(state, vit, prefix))
        if conv.pop("head.weight", None) is not None:  # timm turns the projection into a classifier head
            del conv["head.bias"]
            conv.dropped[prefix + "proj"] = "CLIP projection to the joint embedding (unused)"
    else:
        for k, v in state.items():
            if k.startswith(("head.", "head_dist.")) or k == "dist_token":
                conv.dropped[k] = ("classifier head (unused)" if k != "dist_token"
                                   else "DeiT distillation token (unused; its position slot is dropped)")
            else:
                conv[k] = v
        if "dist_token" in state and "pos_embed" in conv:  # DeiT-distilled: [cls, dist, patches...]
            conv["pos_embed"] = torch.cat([conv["pos_embed"][:, :1], conv["pos_embed"][:, 2:]], dim=1)
    vc = getattr(vit, "cfg", None)  # a ViT of build_vit (another timm ViT: only shapes are compared)
    if vc is not None:
        conv.problems += _vision_fit(architecture({"visual." + k: t for k, t in conv.items()}, "ours")["vision"], vc)
    if vc is not None and fmt == "clip" and (not vc.pre_norm or vc.act != "quick_gelu" or vc.layer_norm_eps != 1e-5):
        conv.problems.append("OpenAI CLIP layout: set model.vision.pre_norm=true, model.vision.act=quick_gelu, "
                             f"model.vision.layer_norm_eps=1e-5 (the model has {vc.pre_norm}, {vc.act}, "
                             f"{vc.layer_norm_eps})")
    if vc is not None and fmt == "clip" and vc.width % 64 == 0 and vc.num_heads != vc.width // 64:
        conv.problems.append(f"OpenAI CLIP ViTs have 64-dim heads (set model.vision.num_heads={vc.width // 64}); the "
                             f"model has {vc.num_heads}")
    _adapt(conv, vit.state_dict())
    return conv


def bert_filter_fn(state: Dict[str, Tensor], model: nn.Module, hf_config: Dict[str, Any]) -> Converted:
    """A HF BERT state dict (``BertModel`` / ``BertForPreTraining`` / ``BertForMaskedLM``; ``config.json`` as
    ``hf_config``) in the names of ``model``: a module with ``text`` (a ``TextTransformer``) and optionally
    ``mlm_head``. Text layer ``i`` and fusion layer ``num_text_layers + j`` take BERT layer ``i`` and
    ``num_text_layers + j`` (a 6 + 6 model takes all 12 layers of bert-base); cross-attention is new; the MLM
    decoder is the word embeddings when tied to them. Config mismatches are problems naming the config key."""
    text, head = model.text, getattr(model, "mlm_head", None)
    cfg, conv = text.cfg, Converted(layout="bert")
    n = cfg.num_text_layers + cfg.num_fusion_layers
    conv.problems += [f"{theirs}={hf_config[theirs]} (set model.text.{ours}={hf_config[theirs]}); the model has "
                      f"{getattr(cfg, ours)}" for ours, theirs in K.BERT_CONFIG
                      if theirs in hf_config and hf_config[theirs] != getattr(cfg, ours)]
    if hf_config.get("hidden_act", "gelu") != "gelu":
        conv.problems.append(f"hidden_act={hf_config['hidden_act']!r}: only 'gelu' is supported")
    if "cls.predictions.decoder.bias" in state and "cls.predictions.bias" not in state:
        state = {("cls.predictions.bias" if k == "cls.predictions.decoder.bias" else k): v for k, v in state.items()}
    for key, value in state.items():
        k = key[len("bert."):] if key.startswith("bert.") else key
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k))
        why = K.bert_file_reason(k, n, head is not None)
        if why:
            conv.dropped[key] = why
        else:
            conv["mlm_head." + k[len("cls.predictions."):] if k.startswith("cls.") else "text." + k] = value
    if head is not None:
        tied = head.decoder.weight is text.embeddings.word_embeddings.weight
        word, dec = conv.get("text.embeddings.word_embeddings.weight"), conv.pop("mlm_head.decoder.weight", None)
        if tied and dec is not None:
            conv.dropped["cls.predictions.decoder.weight"] = "tied to the word embeddings"
        value = word if tied or dec is None else dec
        if value is not None:
            conv["mlm_head.decoder.weight"] = value
    conv.expected_missing.update({f"text.encoder.layer.{i}.crossattention.": "new cross-attention" for i in range(n)})
    if head is not None and not any(k.startswith("cls.predictions.") for k in state):  # an encoder-only BertModel file
        conv.expected_missing.update({f"mlm_head.{k}": "the file has no MLM head (BertModel): initialised"
                                      for k in ("transform.", "bias")})
    return conv


def _read_bert_dir(path: str) -> Tuple[Dict[str, Any], Dict[str, Tensor]]:
    """``config.json`` and the weights of a local HF BERT directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"BERT directory not found: {path} (a local bert-base-uncased-style directory with "
                                "config.json and model.safetensors; nothing is downloaded)")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"BERT directory {path} has no config.json ({cfg_file} not found); pass a local "
                                "bert-base-uncased-style directory (nothing is downloaded)")
    with open(cfg_file) as f:
        hf_config = json.load(f)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return hf_config, read_checkpoint(os.path.join(path, name))["model"]
    raise FileNotFoundError(f"no weights in BERT directory {path}: expected {os.path.join(path, 'model.safetensors')} "
                            "or pytorch_model.bin")


def load_vision_weights(vit: nn.Module, path: str | os.PathLike, fmt: str = "auto",
                        allow_mismatch: bool = False) -> LoadReport:
    """A local CLIP / DeiT / timm ViT weight file (:func:`vit_filter_fn`) into the timm ViT ``vit``."""
    path = os.fspath(path)
    return load_into(vit, vit_filter_fn(read_checkpoint(path)["model"], vit, fmt), source=path,
                     allow_mismatch=allow_mismatch)


def load_bert_weights(text: nn.Module, mlm_head: Optional[nn.Module], path: str | os.PathLike,
                      allow_mismatch: bool = False) -> LoadReport:
    """A local HF BERT directory (:func:`bert_filter_fn`) into ``text`` and ``mlm_head`` (keys ``text.*``,
    ``mlm_head.*``)."""
    path = os.fspath(path)
    hf_config, state = _read_bert_dir(path)
    target = nn.ModuleDict({"text": text, **({"mlm_head": mlm_head} if mlm_head is not None else {})})
    return load_into(target, bert_filter_fn(state, target, hf_config), source=path, allow_mismatch=allow_mismatch)


def load_encoder_weights(model: nn.Module) -> List[LoadReport]:
    """The local encoder weight files a ``VLPModel``'s config names: ``model.vision_weights`` (format
    ``model.vision_weights_format``) into ``model.visual``, ``model.text_weights`` (a HF BERT directory) into
    ``model.text`` and ``model.mlm_head``. Returns their reports (none when no file is named)."""
    cfg = model.cfg
    out = [load_vision_weights(model.visual, cfg.vision_weights, cfg.vision_weights_format)] if cfg.vision_weights else []
    return out + ([load_bert_weights(model.text, model.mlm_head, cfg.text_weights)] if cfg.text_weights else [])


@torch.no_grad()
def copy_into(target: Dict[str, Tensor], source: Dict[str, Tensor], report: LoadReport) -> None:
    """Copy ``source[k]`` into ``target[k]`` (in place) where both exist with the same shape, recording loaded /
    mismatched / missing keys in ``report``; source keys absent from ``target`` go to ``report.unexpected``."""
    for k, t in target.items():
        if k not in source:
            report.missing.append(k)
        elif source[k].shape != t.shape:
            report.mismatched.append(f"{k}: {tuple(source[k].shape)} -> {tuple(t.shape)}")
        else:
            t.copy_(source[k].to(t.dtype))
            report.loaded.append(k)
    report.unexpected.extend(k for k in source if k not in target)
