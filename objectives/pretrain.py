"""The pre-training objective: SRCL (or InfoNCE) against a momentum model and feature queues, ITM
with hard negatives, MLM.

``PretrainObjective(model, cfg)`` holds the ``VLPModel`` being trained (``self.model``) and what
only training needs: a momentum (EMA) copy of the unimodal encoders and projections
(``visual_m``, ``text_m``, ``vision_proj_m``, ``text_proj_m``), queues of momentum features
(``image_queue``, ``text_queue``) with an index queue (``idx_queue``: the image id of every queued
feature, so that captions of one image are never negatives) and their pointer (``queue_ptr``),
with a helper model also the helper's features (``image_queue_h``, ``text_queue_h``). Its
``forward`` is one pre-training step's losses. Retrieval fine-tuning uses it with MLM off
(``AlignmentLossConfig``).

Checkpoints keep the two apart (``engine/trainer.py``): ``ckpt["model"]`` is the model's own state,
``ckpt["objective"]`` this module's (the keys above). :func:`checkpoint_states` reads both layouts,
also checkpoints whose ``model`` entry still holds the momentum and queue keys
(``models.loading.split_objective_state``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import opt
from engine.distributed import all_gather_nograd, all_reduce_mean
from models import losses as L
from models.loading import checkpoint_filter_fn, split_objective_state
from models.text import TextTransformer
from models.vlp import VLPModel, vit_class_token

__all__ = ["ContrastiveConfig", "AlignmentLossConfig", "PretrainLossConfig", "PretrainObjective", "regulation_evidence",
           "checkpoint_states", "load_objective_from_checkpoint", "moved_config_keys"]


@dataclass
class ContrastiveConfig:
    kind: Literal["srcl", "infonce"] = opt("srcl", "srcl: similarity-regulated negatives; infonce: plain InfoNCE")
    delta: float = opt(1.0, "SRCL power: w = s^-delta / mean(s^-delta); 0 gives InfoNCE exactly")
    alpha_start: float = opt(1.0, "weight of the helper similarity at the start of training")
    alpha_end: float = opt(0.0, "weight of the helper similarity at the end of training")
    alpha_schedule: Literal["linear", "cosine", "constant"] = opt("linear", "how alpha moves from alpha_start to alpha_end")
    helper_checkpoint: Optional[str] = opt(None, "frozen helper model (an earlier checkpoint of this project); without it alpha is 0")
    similarity_source: Literal["momentum", "online"] = opt("momentum", "model similarity used for the weights: momentum (EMA) model or the online model (detached)")
    evidence: Literal["cross", "intra", "cross+intra"] = opt("cross", "what the weights are computed from (models.losses.regulation_evidence): cross: the anchor's image-text similarity to the negative (the paper's form); intra: the negative's similarity to the anchor's own item of the same modality (an image anchor: its caption vs the negative caption; a caption anchor: its image vs the negative image); cross+intra: cross + intra_weight * intra")
    intra_weight: float = opt(1.0, "factor of the intra-modal similarity in evidence cross+intra")
    generality_weight: float = opt(0.0, "add this factor times the negative's mean similarity to all the anchors it is a negative of (a candidate close to many anchors, e.g. a caption that describes little, is a likely false negative of each); 0 = off")
    pair_weight: float = opt(0.0, "subtract this factor times the negative's similarity to its own pair (a negative caption's own image, a negative image's own caption): a negative that the anchor matches about as well as its own pair does is a likely false negative; 0 = off")
    length_weight: float = opt(0.0, "image anchors: subtract this factor times the negative caption's length in tokens, standardised over the candidate captions, after standardise (a short caption describes little and is true of many images: a likely false negative of each); the text anchors' negative images have no length; 0 = off")
    standardise: bool = opt(False, "divide each anchor's evidence by its standard deviation over the anchor's negatives (after centring), so that delta is in units of that spread for every anchor")
    use_queue: bool = opt(True, "queued momentum features also serve as (weighted) negatives")
    queue_start_step: int = opt(0, "optimiser step from which the queued features join the loss (the queue fills from step 0); "
                                   "a model trained from random weights needs in-batch negatives first: while its text features "
                                   "are still collapsed, a queue of them drives the image features to collapse too")
    distill: bool = opt(False, "ALBEF momentum distillation of the contrastive targets")
    distill_alpha: float = opt(0.4, "weight of the momentum soft targets when distill is on")

    @property
    def reads_caption_length(self) -> bool:
        """Whether the regulation reads the candidate captions' lengths (``length_weight``)."""
        return self.kind == "srcl" and self.length_weight != 0.0

    def alpha_at(self, progress: float) -> float:
        """Alpha at training progress in [0, 1]; 0 throughout without a helper model."""
        if self.kind != "srcl" or self.helper_checkpoint is None:
            return 0.0
        p = min(max(progress, 0.0), 1.0)
        if self.alpha_schedule == "constant":
            return self.alpha_start
        if self.alpha_schedule == "cosine":
            p = 0.5 * (1.0 - math.cos(math.pi * p))
        return self.alpha_start + (self.alpha_end - self.alpha_start) * p

    def validate(self) -> None:
        for name in ("alpha_start", "alpha_end", "distill_alpha"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"loss.contrastive.{name} must be in [0, 1]; got {v}")
        if self.delta < 0:
            raise ValueError(f"loss.contrastive.delta must be >= 0; got {self.delta}")
        for name in ("intra_weight", "generality_weight", "pair_weight", "length_weight"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"loss.contrastive.{name} must be a finite number; got {getattr(self, name)}")
        if self.queue_start_step < 0:
            raise ValueError(f"loss.contrastive.queue_start_step must be >= 0; got {self.queue_start_step}")


@dataclass
class AlignmentLossConfig:
    """The contrastive and ITM losses with their momentum model and queue (retrieval fine-tuning)."""

    contrastive: ContrastiveConfig = opt(ContrastiveConfig, "contrastive (SRCL / InfoNCE) loss")
    itc: float = opt(1.0, "weight of the contrastive loss")
    itm: float = opt(1.0, "weight of the image-text matching loss (hard negatives)")
    momentum: float = opt(0.995, "EMA coefficient of the momentum encoders")
    queue_size: int = opt(65536, "number of momentum features kept as extra negatives (0 = in-batch only)")
    mlm: ClassVar[float] = 0.0  # no masked language modelling; PretrainLossConfig makes it a setting

    def validate(self) -> None:
        for key in ("itc", "itm", "mlm"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"loss.{key} must be a finite number >= 0; got {value}")
        if self.queue_size < 0:
            raise ValueError(f"loss.queue_size must be >= 0; got {self.queue_size}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"loss.momentum must be in [0, 1); got {self.momentum}")


@dataclass
class PretrainLossConfig(AlignmentLossConfig):
    mlm: float = opt(1.0, "weight of the masked language modelling loss")
    mlm_prob: float = opt(0.15, "fraction of tokens masked for MLM (80/10/10 mask/random/keep)")

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.mlm_prob < 1.0:
            raise ValueError(f"loss.mlm_prob must be in (0, 1) (the fraction of tokens masked); got {self.mlm_prob}")


def moved_config_keys(data: dict) -> dict:
    """A saved run config (nested dict) with the momentum coefficient and queue size under ``loss``
    (configs saved with them under ``model`` are read this way)."""
    model = data.get("model")
    if not isinstance(model, dict) or not any(k in model for k in ("momentum", "queue_size")):
        return data
    model = dict(model)
    loss = dict(data.get("loss") or {})
    for key in ("momentum", "queue_size"):
        if key in model:
            loss.setdefault(key, model.pop(key))
    return {**data, "model": model, "loss": loss}


# ---------------------------------------------------------------------------------- checkpoints
# (momentum part, the online part it copies)
COPY_OF = (("visual_m", "visual"), ("text_m", "text"), ("vision_proj_m", "vision_proj"), ("text_proj_m", "text_proj"))


def checkpoint_states(ckpt: dict) -> tuple[dict, dict]:
    """The model's and the objective's state in a checkpoint: ``ckpt["model"]`` and
    ``ckpt["objective"]``, or both split from ``ckpt["model"]`` (checkpoints written before the
    objective had its own entry, and ALBEF/BLIP checkpoints)."""
    model, objective = split_objective_state(ckpt["model"])
    return model, {**objective, **ckpt.get("objective", {})}


def load_objective_from_checkpoint(objective: "PretrainObjective", ckpt: dict) -> list[str]:
    """Start ``objective`` (built on the already loaded model) from a checkpoint: its momentum copy
    when it has one (ours, or ALBEF/BLIP's: ``models.loading.checkpoint_filter_fn`` converts the names
    with its key tables and fits the sizes to the model), else the online weights; empty queues
    (queued features carry another run's image ids). Returns the notes of
    :meth:`PretrainObjective.load_momentum`."""
    state = checkpoint_filter_fn({**ckpt["model"], **ckpt.get("objective", {})}, objective.model)
    return objective.load_momentum(split_objective_state(state)[1])


def regulation_evidence(ccfg: ContrastiveConfig, neg: torch.Tensor, feats: tuple, cross: tuple,
                        text_length: Optional[torch.Tensor] = None) -> tuple:
    """The evidence of both directions (``models.losses.regulation_evidence``) that the SRCL weights
    are computed from. ``feats``: the anchors' normalised (image, text) features and the candidate
    columns' (image, text) features; ``cross``: the (image-to-text, text-to-image) similarities of
    the anchors to the candidates. The intra-modal similarity of an image anchor is its own
    caption's similarity to the candidate captions; of a caption anchor, its own image's to the
    candidate images. Column ``j``'s image and text are a pair (the batch's and the queue's), so
    ``image_all[j] . text_all[j]`` is candidate ``j``'s similarity to its own pair, in both directions.
    ``text_length``: the candidate captions' lengths in tokens (``loss.contrastive.length_weight``;
    image-to-text only: the text anchors' candidates are images)."""
    image_a, text_a, image_all, text_all = feats
    intra = (None, None) if ccfg.evidence == "cross" else (text_a @ text_all.T, image_a @ image_all.T)
    pair = (image_all * text_all).sum(-1) if ccfg.pair_weight != 0.0 else None
    lengths = ((text_length, ccfg.length_weight), (None, 0.0))
    return tuple(L.regulation_evidence(c, neg, ccfg.evidence, i, ccfg.intra_weight, ccfg.standardise,
                                       ccfg.generality_weight, pair, ccfg.pair_weight, n, w)
                 for c, i, (n, w) in zip(cross, intra, lengths))


# ---------------------------------------------------------------------------------- the objective
class PretrainObjective(nn.Module):
    """``model`` plus its momentum copy and feature queues; ``forward`` computes the losses.

    ``model_key`` names the submodule that is the model: the trainer saves its state as
    ``ckpt["model"]`` and the rest of this module's state as ``ckpt["objective"]``, and reads them
    back with :func:`checkpoint_states`."""

    model_key: ClassVar[str] = "model"
    checkpoint_states = staticmethod(checkpoint_states)  # how the trainer reads them back (older layouts too)

    def __init__(self, model: VLPModel, cfg: AlignmentLossConfig, helper_dim: Optional[int] = None) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        # forward() starts with the EMA update; a trainer that shards the parameters (FSDP) sets
        # this False and calls momentum_update() itself before each forward, outside it.
        self.momentum_in_forward = True
        self.visual_m = copy.deepcopy(model.visual)
        # The momentum text model only needs the text layers (no fusion layers).
        self.text_m = TextTransformer(dataclasses.replace(model.cfg.text, num_fusion_layers=0))
        self.vision_proj_m = copy.deepcopy(model.vision_proj)
        self.text_proj_m = copy.deepcopy(model.text_proj)
        for p in self.momentum_parameters():
            p.requires_grad_(False)
        self.copy_params_to_momentum()
        q, dim = cfg.queue_size, model.cfg.embed_dim
        self.register_buffer("image_queue", torch.zeros(dim, q))
        self.register_buffer("text_queue", torch.zeros(dim, q))
        self.register_buffer("idx_queue", torch.full((q,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        if helper_dim is not None:
            self.register_buffer("image_queue_h", torch.zeros(helper_dim, q))
            self.register_buffer("text_queue_h", torch.zeros(helper_dim, q))
        if cfg.contrastive.reads_caption_length:  # the queued captions' lengths in tokens
            self.register_buffer("length_queue", torch.zeros(q, dtype=torch.long))

    def param_groups(self, lr: float, lr_vision: float, weight_decay: float) -> list[dict]:
        """The model's AdamW groups (the momentum copy is not trained)."""
        return self.model.param_groups(lr, lr_vision, weight_decay)

    # ------------------------------------------------------------------ momentum
    def _momentum_pairs(self, parts=COPY_OF):
        pairs = []
        for mom, online in parts:
            src = dict(getattr(self.model, online).named_parameters())
            pairs += [(src[name], p_m) for name, p_m in getattr(self, mom).named_parameters()]
        return pairs

    def momentum_parameters(self):
        for mod in (self.visual_m, self.text_m, self.vision_proj_m, self.text_proj_m):
            yield from mod.parameters()

    @torch.no_grad()
    def copy_params_to_momentum(self, parts=COPY_OF) -> None:
        for p, p_m in self._momentum_pairs(parts):
            p_m.copy_(p)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """p_m <- m * p_m + (1 - m) * p for every momentum parameter."""
        m = self.cfg.momentum
        pairs = self._momentum_pairs()
        online = [p.detach() for p, _ in pairs]
        moment = [p_m for _, p_m in pairs]
        torch._foreach_mul_(moment, m)
        torch._foreach_add_(moment, online, alpha=1.0 - m)

    @torch.no_grad()
    def load_momentum(self, state: dict) -> list[str]:
        """Copy the momentum encoders and projections of an objective state in our names
        (``visual_m.*``, ...; :func:`load_objective_from_checkpoint` converts ALBEF/BLIP names) into
        this objective, sized to the model by ``models.loading.checkpoint_filter_fn`` (a ViT position
        embedding of another image size interpolated); the queues are left as they are. A part the
        state lacks is copied from the online model; a part it has must fit whole (``ValueError``
        naming the keys otherwise). Returns one note per part copied from the online model."""
        state = checkpoint_filter_fn({k: v for k, v in state.items() if k.split(".")[0] in dict(COPY_OF)}, self.model)
        notes, own = [], self.state_dict()
        for mom, online in COPY_OF:
            keys = [k for k in own if k.startswith(mom + ".")]
            given = {k: v for k, v in state.items() if k.startswith(mom + ".")}
            if not given:
                self.copy_params_to_momentum([(mom, online)])
                notes.append(f"no momentum copy {mom} in the checkpoint: copied from {online}")
                continue
            bad = ([f"missing {k}" for k in keys if k not in given] + [f"unexpected {k}" for k in given if k not in own]
                   + [f"{k}: {tuple(v.shape)} -> {tuple(own[k].shape)}" for k, v in given.items()
                      if k in own and v.shape != own[k].shape])
            if bad:
                raise ValueError(f"the momentum copy {mom} does not fit this model: {'; '.join(bad[:10])}")
            for k in keys:
                own[k].copy_(given[k])
        return notes

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor,
                image_feat_h: Optional[torch.Tensor] = None, text_feat_h: Optional[torch.Tensor] = None,
                text_length: Optional[torch.Tensor] = None) -> None:
        """Write (already gathered) momentum features at the queue pointer, wrapping around. A row with
        a non-finite feature leaves its queue slot as it was (empty or older), so that a step the
        trainer skips for a non-finite loss does not poison the following ones. ``text_length``: the
        captions' lengths, kept when the regulation reads them (``ContrastiveConfig.reads_caption_length``)."""
        q = self.image_queue.shape[1]
        if q == 0:
            return
        n = image_feat.shape[0]
        if n > q:  # keep the newest q entries
            image_feat, text_feat, idx = image_feat[-q:], text_feat[-q:], idx[-q:]
            if text_length is not None:
                text_length = text_length[-q:]
            if image_feat_h is not None:
                image_feat_h, text_feat_h = image_feat_h[-q:], text_feat_h[-q:]
            n = q
        pos = (torch.arange(n, device=idx.device) + self.queue_ptr) % q  # on the device: no host sync
        finite = torch.isfinite(image_feat).all(1) & torch.isfinite(text_feat).all(1)
        with_h = image_feat_h is not None and hasattr(self, "image_queue_h")
        if with_h:
            finite &= torch.isfinite(image_feat_h).all(1) & torch.isfinite(text_feat_h).all(1)

        def write(queue: torch.Tensor, feats: torch.Tensor) -> None:
            queue[:, pos] = torch.where(finite[None, :], feats.T.to(queue.dtype), queue[:, pos])

        write(self.image_queue, image_feat)
        write(self.text_queue, text_feat)
        self.idx_queue[pos] = torch.where(finite, idx, self.idx_queue[pos])
        if text_length is not None and hasattr(self, "length_queue"):
            self.length_queue[pos] = torch.where(finite, text_length.to(self.length_queue.dtype), self.length_queue[pos])
        if with_h:
            write(self.image_queue_h, image_feat_h)
            write(self.text_queue_h, text_feat_h)
        self.queue_ptr.copy_((self.queue_ptr + n) % q)

    # ------------------------------------------------------------------ the losses
    def forward(self, batch: dict, alpha: float = 0.0,
                helper_feats: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                generator: Optional[torch.Generator] = None, step: Optional[int] = None) -> dict:
        """One pre-training forward; returns a dict with ``loss`` (weighted total), the parts and
        detached statistics. ``helper_feats`` are the frozen helper's normalised (image, text)
        features of this batch, needed when ``alpha > 0``. ``step`` (the optimiser step) decides
        whether the queue is used yet (``loss.contrastive.queue_start_step``); None counts as
        past the start."""
        loss_cfg, model = self.cfg, self.model
        ccfg = loss_cfg.contrastive
        image, ids, mask, idx = batch["image"], batch["input_ids"], batch["attention_mask"], batch["image_idx"]
        with torch.no_grad():
            model.temp.clamp_(model.cfg.temp_min, model.cfg.temp_max)

        image_embeds = model.encode_image(image)
        text_embeds = model.encode_text(ids, mask)
        image_feat = model.image_feat(image_embeds)
        text_feat = model.text_feat(text_embeds)
        temp = model.temp
        out: dict = {}

        # ---------------- contrastive (SRCL / InfoNCE) against momentum batch + queue
        with torch.no_grad():
            if self.momentum_in_forward:
                self.momentum_update()
            # the momentum encoders' last blocks compute the class token only (all the features need)
            image_feat_m = F.normalize(self.vision_proj_m(vit_class_token(self.visual_m, image)).float(), dim=-1)
            cls = torch.zeros_like(ids, dtype=torch.bool)
            cls[:, 0] = True
            text_feat_m = F.normalize(self.text_proj_m(self.text_m.forward_text(ids, mask, select=cls)).float(), dim=-1)
            image_m_g, text_m_g, idx_g = (all_gather_nograd(t) for t in (image_feat_m, text_feat_m, idx))
            length_g = all_gather_nograd(mask.sum(1)) if ccfg.reads_caption_length else None
            use_queue = (ccfg.use_queue and self.image_queue.shape[1] > 0
                         and (step is None or step >= ccfg.queue_start_step))
            if use_queue:
                q_valid = self.idx_queue >= 0
                image_all = torch.cat([image_m_g, self.image_queue.T.float()])
                text_all = torch.cat([text_m_g, self.text_queue.T.float()])
                idx_all = torch.cat([idx_g, self.idx_queue])
                valid = torch.cat([torch.ones_like(idx_g, dtype=torch.bool), q_valid])
                length_all = torch.cat([length_g, self.length_queue]) if length_g is not None else None
            else:
                length_all = length_g
                image_all, text_all, idx_all = image_m_g, text_m_g, idx_g
                valid = torch.ones_like(idx_g, dtype=torch.bool)
            pos = idx[:, None] == idx_all[None, :]
            valid = valid[None, :].expand_as(pos)
            neg = valid & ~pos
            helper_i2t = helper_t2i = None
            if helper_feats is not None:
                image_h, text_h = (f.float() for f in helper_feats)
                image_h_g, text_h_g = all_gather_nograd(image_h), all_gather_nograd(text_h)
                if use_queue:
                    image_h_all = torch.cat([image_h_g, self.image_queue_h.T.float()])
                    text_h_all = torch.cat([text_h_g, self.text_queue_h.T.float()])
                else:
                    image_h_all, text_h_all = image_h_g, text_h_g
                helper_i2t, helper_t2i = image_h @ text_h_all.T, text_h @ image_h_all.T
            elif alpha > 0:
                raise ValueError("alpha > 0 needs helper features (loss.contrastive.helper_checkpoint)")
            if ccfg.similarity_source == "momentum":
                image_a, text_a = image_feat_m, text_feat_m
            else:
                image_a, text_a = image_feat.detach(), text_feat.detach()
            sim_i2t_model, sim_t2i_model = image_a @ text_all.T, text_a @ image_all.T
            w_i2t = w_t2i = None
            if ccfg.kind == "srcl":
                e_i2t, e_t2i = regulation_evidence(ccfg, neg, (image_a, text_a, image_all, text_all),
                                                   (sim_i2t_model, sim_t2i_model), length_all)
                if helper_feats is not None:
                    helper_i2t, helper_t2i = regulation_evidence(ccfg, neg, (image_h, text_h, image_h_all, text_h_all),
                                                                 (helper_i2t, helper_t2i), length_all)
                w_i2t = L.regulation_weights(e_i2t, neg, ccfg.delta, helper_i2t, alpha)
                w_t2i = L.regulation_weights(e_t2i, neg, ccfg.delta, helper_t2i, alpha)
            soft_i2t = soft_t2i = None
            if ccfg.distill:
                targets = pos.float() / pos.float().sum(1, keepdim=True)
                a = ccfg.distill_alpha
                big_neg = torch.finfo(torch.float32).min
                soft_i2t = a * F.softmax((image_feat_m @ text_all.T / temp).masked_fill(~valid, big_neg), 1) + (1 - a) * targets
                soft_t2i = a * F.softmax((text_feat_m @ image_all.T / temp).masked_fill(~valid, big_neg), 1) + (1 - a) * targets

        logits_i2t = image_feat @ text_all.T / temp
        logits_t2i = text_feat @ image_all.T / temp
        loss_i2t = L.contrastive_loss(logits_i2t, pos, valid, w_i2t, soft_i2t).mean()
        loss_t2i = L.contrastive_loss(logits_t2i, pos, valid, w_t2i, soft_t2i).mean()
        out["loss_itc"] = (loss_i2t + loss_t2i) / 2
        out["temp"] = temp.detach()
        # mean cosine between different items of the batch: near 1 = collapsed features
        out["image_cos"], out["text_cos"] = L.mean_offdiag_cosine(image_feat), L.mean_offdiag_cosine(text_feat)
        if w_i2t is not None:
            out["weights_i2t"] = w_i2t
            out["weights_t2i"] = w_t2i
        out["sim_i2t_model"] = sim_i2t_model
        out["neg_mask"] = neg

        with torch.no_grad():
            self.enqueue(image_m_g, text_m_g, idx_g,
                         *( (image_h_g, text_h_g) if helper_feats is not None else (None, None) ), text_length=length_g)

        # ---------------- ITM with hard negatives and MLM in one fusion pass. Rows: the positive
        # pairs, (text, hard negative image), (hard negative text, image), (masked text, image).
        # Per fusion layer the cross-attention keys/values of each image are projected once for
        # all its rows; the first layer's self-attention runs once per distinct text (the unmasked
        # and the masked captions); the last layer computes only the tokens a loss reads (the
        # class token of the ITM rows, the masked positions of the MLM rows).
        b = image.shape[0]
        own = torch.arange(b, device=image.device)
        texts, text_masks, text_index, image_index, select = [], [], [], [], []
        if loss_cfg.itm > 0:
            with torch.no_grad():
                pos_local = idx[:, None] == idx[None, :]
                # Non-finite features (a diverging run) make the loss non-finite as well, and the trainer
                # applies train.nan_policy to the step; until then the sampling must go on (no host sync).
                sim_i2t_local = torch.nan_to_num(image_feat @ text_feat.T, nan=0.0, posinf=0.0, neginf=0.0)
                neg_text = L.sample_hard_negatives(sim_i2t_local, pos_local, generator).to(image.device)
                neg_image = L.sample_hard_negatives(sim_i2t_local.T, pos_local.T, generator).to(image.device)
            texts.append(text_embeds)
            text_masks.append(mask)
            text_index += [own, own, neg_text]
            image_index += [own, neg_image, own]
            cls = torch.zeros(3 * b, ids.shape[1], dtype=torch.bool, device=image.device)
            cls[:, 0] = True
            select.append(cls)
        if loss_cfg.mlm > 0:
            mlm_labels = batch["mlm_labels"]
            sel = mlm_labels != -100
            text_index.append(own + b * len(texts))
            texts.append(model.encode_text(batch["mlm_input_ids"], mask))
            text_masks.append(mask)
            image_index.append(own)
            select.append(sel)
        if texts:
            states = model.fuse(torch.cat(texts), torch.cat(text_masks), image_embeds,
                                image_index=torch.cat(image_index), text_index=torch.cat(text_index),
                                select=torch.cat(select))
        if loss_cfg.itm > 0:
            itm_logits = model.itm_head(states[:3 * b])
            labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(image.device)
            out["loss_itm"] = F.cross_entropy(itm_logits.float(), labels)
            out["itm_acc"] = (itm_logits.argmax(1) == labels).float().mean().detach()
        if loss_cfg.mlm > 0:
            # Normalise by the mean masked-token count per process, so that the DDP gradient
            # average equals the single-process token mean over the global batch (on the device:
            # the count is exact in float32, so this equals dividing by the number itself).
            n_local = sel.sum().to(torch.float64)
            n_mean = all_reduce_mean(n_local).clamp_min(1.0)
            logits = model.mlm_head(states[3 * b if loss_cfg.itm > 0 else 0:])
            loss_sum = F.cross_entropy(logits.float(), mlm_labels[sel], reduction="sum")
            out["loss_mlm"] = loss_sum / n_mean.to(loss_sum.dtype)

        out["loss"] = (loss_cfg.itc * out["loss_itc"]
                       + loss_cfg.itm * out.get("loss_itm", 0.0)
                       + loss_cfg.mlm * out.get("loss_mlm", 0.0))
        return out
