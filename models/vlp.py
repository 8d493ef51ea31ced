"""The base vision-language model (ALBEF-style) and its pre-training forward.

Parts: a ViT image encoder, a BERT-style text transformer whose first layers encode text and
whose last layers fuse text with image tokens by cross-attention, projections to a shared
``embed_dim`` space, an ITM head, an MLM head tied to the word embeddings, and a momentum (EMA)
copy of the unimodal encoders and projections with queues of momentum features plus an index
queue (the image id of every queued feature, so that captions of one image are never negatives).

Task heads (``models/heads.py``) hold a ``VLPModel`` and reuse its encoders.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import opt
from engine.distributed import all_gather_nograd, all_reduce_mean
from models import losses as L
from models.text import MLMHead, TextConfig, TextTransformer
from models.vision import VisionConfig, build_vit, vit_tokens


def _plain_timm_block(block) -> bool:
    """A timm ViT ``Block`` with timm's ``Attention`` and no extras (the layout vit_class_token knows)."""
    from timm.models.vision_transformer import Attention, Block

    return (type(block) is Block and type(block.attn) is Attention and getattr(block.attn, "gate", None) is None
            and not getattr(block.attn, "rotary", None))


def vit_class_token(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The class token ``(B, width)`` of ``vit_tokens(vit, images)``, with the last block computing
    only the class token's query, attention output and MLP (its keys and values still read every
    token; the other tokens' outputs are not needed for the features). Other block types run the
    full forward."""
    blocks = getattr(vit, "blocks", None)
    if blocks is None or len(blocks) == 0 or not _plain_timm_block(blocks[-1]):
        return vit_tokens(vit, images)[:, 0]
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    if getattr(vit, "grad_checkpointing", False) and torch.is_grad_enabled():
        from timm.models import checkpoint_seq
        x = checkpoint_seq(blocks[:-1], x)
    else:
        x = blocks[:-1](x)
    blk = blocks[-1]
    a = blk.attn
    bsz, n, _ = x.shape
    dim, heads, hd = a.num_heads * a.head_dim, a.num_heads, a.head_dim
    h = blk.norm1(x)
    w, bias = a.qkv.weight, a.qkv.bias
    q = F.linear(h[:, :1], w[:dim], None if bias is None else bias[:dim])
    kv = F.linear(h, w[dim:], None if bias is None else bias[dim:])
    q = q.reshape(bsz, 1, heads, hd).transpose(1, 2)
    k, v = kv.reshape(bsz, n, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if a.training else 0.0)
    o = a.proj_drop(a.proj(a.norm(o.transpose(1, 2).reshape(bsz, 1, dim))))
    y = x[:, :1] + blk.drop_path1(blk.ls1(o))
    y = y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))
    return vit.norm(y)[:, 0]


@dataclass
class VLPConfig:
    vision: VisionConfig = opt(VisionConfig, "image encoder (ViT)")
    text: TextConfig = opt(TextConfig, "text encoder + fusion encoder (BERT layers)")
    embed_dim: int = opt(256, "dimension of the shared contrastive space")
    temp: float = opt(0.07, "initial contrastive temperature (learnable)")
    temp_min: float = opt(0.001, "lower clamp of the temperature")
    temp_max: float = opt(0.5, "upper clamp of the temperature")
    momentum: float = opt(0.995, "EMA coefficient of the momentum encoders")
    queue_size: int = opt(65536, "number of momentum features kept as extra negatives (0 = in-batch only)")
    vision_weights: Optional[str] = opt(None, "local CLIP / DeiT / timm ViT weights file to initialise the image encoder")
    vision_weights_format: Literal["auto", "clip", "deit", "timm"] = opt("auto", "key layout of vision_weights")
    text_weights: Optional[str] = opt(None, "local bert-base-uncased directory to initialise the text and fusion layers")

    def validate(self) -> None:
        if self.embed_dim <= 0:
            raise ValueError(f"model.embed_dim must be positive; got {self.embed_dim}")
        if self.queue_size < 0:
            raise ValueError(f"model.queue_size must be >= 0; got {self.queue_size}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"model.momentum must be in [0, 1); got {self.momentum}")
        if not self.temp_min <= self.temp <= self.temp_max:
            raise ValueError("model.temp must lie within [model.temp_min, model.temp_max]")


@dataclass
class ContrastiveConfig:
    kind: Literal["srcl", "infonce"] = opt("srcl", "srcl: similarity-regulated negatives; infonce: plain InfoNCE")
    delta: float = opt(1.0, "SRCL power: w = s^-delta / mean(s^-delta); 0 gives InfoNCE exactly")
    alpha_start: float = opt(1.0, "weight of the helper similarity at the start of training")
    alpha_end: float = opt(0.0, "weight of the helper similarity at the end of training")
    alpha_schedule: Literal["linear", "cosine", "constant"] = opt("linear", "how alpha moves from alpha_start to alpha_end")
    helper_checkpoint: Optional[str] = opt(None, "frozen helper model (an earlier checkpoint of this project); without it alpha is 0")
    similarity_source: Literal["momentum", "online"] = opt("momentum", "model similarity used for the weights: momentum (EMA) model or the online model (detached)")
    use_queue: bool = opt(True, "queued momentum features also serve as (weighted) negatives")
    queue_start_step: int = opt(0, "optimiser step from which the queued features join the loss (the queue fills from step 0); "
                                   "a model trained from random weights needs in-batch negatives first: while its text features "
                                   "are still collapsed, a queue of them drives the image features to collapse too")
    distill: bool = opt(False, "ALBEF momentum distillation of the contrastive targets")
    distill_alpha: float = opt(0.4, "weight of the momentum soft targets when distill is on")

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
        if self.queue_start_step < 0:
            raise ValueError(f"loss.contrastive.queue_start_step must be >= 0; got {self.queue_start_step}")


@dataclass
class PretrainLossConfig:
    contrastive: ContrastiveConfig = opt(ContrastiveConfig, "contrastive (SRCL / InfoNCE) loss")
    itc: float = opt(1.0, "weight of the contrastive loss")
    itm: float = opt(1.0, "weight of the image-text matching loss (hard negatives)")
    mlm: float = opt(1.0, "weight of the masked language modelling loss")
    mlm_prob: float = opt(0.15, "fraction of tokens masked for MLM (80/10/10 mask/random/keep)")

    def validate(self) -> None:
        for key in ("itc", "itm", "mlm"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"loss.{key} must be a finite number >= 0; got {value}")
        if not 0.0 < self.mlm_prob < 1.0:
            raise ValueError(f"loss.mlm_prob must be in (0, 1) (the fraction of tokens masked); got {self.mlm_prob}")


class VLPModel(nn.Module):
    """ALBEF-style base model; ``forward`` is the pre-training step (contrastive + ITM + MLM)."""

    def __init__(self, cfg: VLPConfig, momentum: bool = True, helper_dim: Optional[int] = None) -> None:
        super().__init__()
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, encoder_width=cfg.vision.width))
        self.cfg = cfg
        width, hidden = cfg.vision.width, cfg.text.hidden_size
        self.visual = build_vit(cfg.vision)
        self.text = TextTransformer(cfg.text)
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(hidden, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.itm_head = nn.Linear(hidden, 2)
        self.mlm_head = MLMHead(cfg.text)
        self.mlm_head.decoder.weight = self.text.embeddings.word_embeddings.weight
        self.has_momentum = momentum
        # forward() starts with the EMA update; a trainer that shards the parameters (FSDP) sets
        # this False and calls momentum_update() itself before each forward, outside it.
        self.momentum_in_forward = momentum
        if momentum:
            self.visual_m = copy.deepcopy(self.visual)
            # The momentum text model only needs the text layers (no fusion layers).
            self.text_m = TextTransformer(dataclasses.replace(cfg.text, num_fusion_layers=0))
            self.vision_proj_m = copy.deepcopy(self.vision_proj)
            self.text_proj_m = copy.deepcopy(self.text_proj)
            for p in self.momentum_parameters():
                p.requires_grad_(False)
            self.copy_params_to_momentum()
            q = cfg.queue_size
            self.register_buffer("image_queue", torch.zeros(cfg.embed_dim, q))
            self.register_buffer("text_queue", torch.zeros(cfg.embed_dim, q))
            self.register_buffer("idx_queue", torch.full((q,), -1, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
            if helper_dim is not None:
                self.register_buffer("image_queue_h", torch.zeros(helper_dim, q))
                self.register_buffer("text_queue_h", torch.zeros(helper_dim, q))

    # ------------------------------------------------------------------ encoders
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image tokens ``(B, 1 + N, width)``, class token first."""
        return vit_tokens(self.visual, image)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unimodal text states ``(B, L, hidden)`` from the text layers."""
        return self.text.forward_text(input_ids, attention_mask)

    def fuse(self, text_embeds, attention_mask, image_embeds, image_atts=None, image_index=None) -> torch.Tensor:
        """Fusion states ``(B, L, hidden)``: text attends to image tokens by cross-attention.
        ``image_index`` (B,): text row b reads ``image_embeds[image_index[b]]``, keys/values computed
        once per image (for many captions per image: ITM negatives, retrieval re-ranking)."""
        return self.text.forward_fusion(text_embeds, attention_mask, image_embeds, image_atts, image_index)

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)

    def text_feat(self, text_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_embeds[:, 0, :]).float(), dim=-1)

    @torch.no_grad()
    def unimodal_features(self, image, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and text features (used for a frozen helper model)."""
        return self.image_feat(self.encode_image(image)), self.text_feat(self.encode_text(input_ids, attention_mask))

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        return self.itm_head(fused[:, 0, :])

    # ------------------------------------------------------------------ momentum
    def _momentum_pairs(self):
        online = dict(self.visual.named_parameters(prefix="visual"))
        online.update(self.vision_proj.named_parameters(prefix="vision_proj"))
        online.update(self.text_proj.named_parameters(prefix="text_proj"))
        text_online = dict(self.text.named_parameters(prefix="text"))
        pairs = []
        for name, p_m in self.visual_m.named_parameters(prefix="visual"):
            pairs.append((online[name], p_m))
        for name, p_m in self.vision_proj_m.named_parameters(prefix="vision_proj"):
            pairs.append((online[name], p_m))
        for name, p_m in self.text_proj_m.named_parameters(prefix="text_proj"):
            pairs.append((online[name], p_m))
        for name, p_m in self.text_m.named_parameters(prefix="text"):
            pairs.append((text_online[name], p_m))
        return pairs

    def momentum_parameters(self):
        for mod in (self.visual_m, self.text_m, self.vision_proj_m, self.text_proj_m):
            yield from mod.parameters()

    @torch.no_grad()
    def copy_params_to_momentum(self) -> None:
        for p, p_m in self._momentum_pairs():
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
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor,
                image_feat_h: Optional[torch.Tensor] = None, text_feat_h: Optional[torch.Tensor] = None) -> None:
        """Write (already gathered) momentum features at the queue pointer, wrapping around. A row with
        a non-finite feature leaves its queue slot as it was (empty or older), so that a step the
        trainer skips for a non-finite loss does not poison the following ones."""
        q = self.image_queue.shape[1]
        if q == 0:
            return
        n = image_feat.shape[0]
        if n > q:  # keep the newest q entries
            image_feat, text_feat, idx = image_feat[-q:], text_feat[-q:], idx[-q:]
            if image_feat_h is not None:
                image_feat_h, text_feat_h = image_feat_h[-q:], text_feat_h[-q:]
            n = q
        ptr = int(self.queue_ptr)
        pos = (torch.arange(n, device=idx.device) + ptr) % q
        finite = torch.isfinite(image_feat).all(1) & torch.isfinite(text_feat).all(1)
        with_h = image_feat_h is not None and hasattr(self, "image_queue_h")
        if with_h:
            finite &= torch.isfinite(image_feat_h).all(1) & torch.isfinite(text_feat_h).all(1)

        def write(queue: torch.Tensor, feats: torch.Tensor) -> None:
            queue[:, pos] = torch.where(finite[None, :], feats.T.to(queue.dtype), queue[:, pos])

        write(self.image_queue, image_feat)
        write(self.text_queue, text_feat)
        self.idx_queue[pos] = torch.where(finite, idx, self.idx_queue[pos])
        if with_h:
            write(self.image_queue_h, image_feat_h)
            write(self.text_queue_h, text_feat_h)
        self.queue_ptr.fill_((ptr + n) % q)

    # ------------------------------------------------------------------ pre-training
    def forward(self, batch: dict, loss_cfg: PretrainLossConfig, alpha: float = 0.0,
                helper_feats: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                generator: Optional[torch.Generator] = None, step: Optional[int] = None) -> dict:
        """One pre-training forward; returns a dict with ``loss`` (weighted total), the parts and
        detached statistics. ``helper_feats`` are the frozen helper's normalised (image, text)
        features of this batch, needed when ``alpha > 0``. ``step`` (the optimiser step) decides
        whether the queue is used yet (``loss.contrastive.queue_start_step``); None counts as
        past the start."""
        if not self.has_momentum:
            raise RuntimeError("pre-training needs the momentum model (VLPModel(momentum=True))")
        ccfg = loss_cfg.contrastive
        image, ids, mask, idx = batch["image"], batch["input_ids"], batch["attention_mask"], batch["image_idx"]
        with torch.no_grad():
            self.temp.clamp_(self.cfg.temp_min, self.cfg.temp_max)

        image_embeds = self.encode_image(image)
        text_embeds = self.encode_text(ids, mask)
        image_feat = self.image_feat(image_embeds)
        text_feat = self.text_feat(text_embeds)
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
            use_queue = (ccfg.use_queue and self.image_queue.shape[1] > 0
                         and (step is None or step >= ccfg.queue_start_step))
            if use_queue:
                q_valid = self.idx_queue >= 0
                image_all = torch.cat([image_m_g, self.image_queue.T.float()])
                text_all = torch.cat([text_m_g, self.text_queue.T.float()])
                idx_all = torch.cat([idx_g, self.idx_queue])
                valid = torch.cat([torch.ones_like(idx_g, dtype=torch.bool), q_valid])
            else:
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
                sim_i2t_model, sim_t2i_model = image_feat_m @ text_all.T, text_feat_m @ image_all.T
            else:
                sim_i2t_model, sim_t2i_model = image_feat.detach() @ text_all.T, text_feat.detach() @ image_all.T
            w_i2t = w_t2i = None
            if ccfg.kind == "srcl":
                w_i2t = L.regulation_weights(sim_i2t_model, neg, ccfg.delta, helper_i2t, alpha)
                w_t2i = L.regulation_weights(sim_t2i_model, neg, ccfg.delta, helper_t2i, alpha)
            soft_i2t = soft_t2i = None
            if ccfg.distill:
                targets = pos.float() / pos.float().sum(1, keepdim=True)
                a = ccfg.distill_alpha
                big_neg = torch.finfo(torch.float32).min
                soft_i2t = a * F.softmax((image_feat_m @ text_all.T / self.temp).masked_fill(~valid, big_neg), 1) + (1 - a) * targets
                soft_t2i = a * F.softmax((text_feat_m @ image_all.T / self.temp).masked_fill(~valid, big_neg), 1) + (1 - a) * targets

        logits_i2t = image_feat @ text_all.T / self.temp
        logits_t2i = text_feat @ image_all.T / self.temp
        loss_i2t = L.contrastive_loss(logits_i2t, pos, valid, w_i2t, soft_i2t).mean()
        loss_t2i = L.contrastive_loss(logits_t2i, pos, valid, w_t2i, soft_t2i).mean()
        out["loss_itc"] = (loss_i2t + loss_t2i) / 2
        out["temp"] = self.temp.detach()
        # mean cosine between different items of the batch: near 1 = collapsed features
        out["image_cos"], out["text_cos"] = L.mean_offdiag_cosine(image_feat), L.mean_offdiag_cosine(text_feat)
        if w_i2t is not None:
            out["weights_i2t"] = w_i2t
            out["weights_t2i"] = w_t2i
        out["sim_i2t_model"] = sim_i2t_model
        out["neg_mask"] = neg

        with torch.no_grad():
            self.enqueue(image_m_g, text_m_g, idx_g,
                         *( (image_h_g, text_h_g) if helper_feats is not None else (None, None) ))

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
            texts.append(self.encode_text(batch["mlm_input_ids"], mask))
            text_masks.append(mask)
            image_index.append(own)
            select.append(sel)
        if texts:
            states = self.text.forward_fusion(torch.cat(texts), torch.cat(text_masks), image_embeds,
                                              image_index=torch.cat(image_index), text_index=torch.cat(text_index),
                                              select=torch.cat(select))
        if loss_cfg.itm > 0:
            itm_logits = self.itm_head(states[:3 * b])
            labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(image.device)
            out["loss_itm"] = F.cross_entropy(itm_logits.float(), labels)
            out["itm_acc"] = (itm_logits.argmax(1) == labels).float().mean().detach()
        if loss_cfg.mlm > 0:
            # Normalise by the mean masked-token count per process, so that the DDP gradient
            # average equals the single-process token mean over the global batch.
            n_local = sel.sum().to(torch.float64)
            n_mean = all_reduce_mean(n_local).clamp_min(1.0).item()
            logits = self.mlm_head(states[3 * b if loss_cfg.itm > 0 else 0:])
            out["loss_mlm"] = F.cross_entropy(logits.float(), mlm_labels[sel], reduction="sum") / n_mean

        out["loss"] = (loss_cfg.itc * out["loss_itc"]
                       + loss_cfg.itm * out.get("loss_itm", 0.0)
                       + loss_cfg.mlm * out.get("loss_mlm", 0.0))
        return out

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, lr: float, lr_vision: float, weight_decay: float) -> list[dict]:
        """AdamW groups: ViT at ``lr_vision``, everything else at ``lr``; no decay on biases,
        norms, embeddings of positions/class token and the temperature."""
        groups = {(v, d): [] for v in (True, False) for d in (True, False)}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_vision = name.startswith("visual.")
            no_decay = p.ndim < 2 or name.endswith(("pos_embed", "cls_token")) or name == "temp"
            groups[(is_vision, not no_decay)].append(p)
        out = []
        for (is_vision, decay), params in groups.items():
            if params:
                out.append({"params": params, "lr": lr_vision if is_vision else lr,
                            "weight_decay": weight_decay if decay else 0.0,
                            "name": f"{'vision' if is_vision else 'text'}_{'decay' if decay else 'no_decay'}"})
        return out
