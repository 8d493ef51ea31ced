"""Zero-shot image-text retrieval with the contrastive (ITC) similarity of a pre-trained model.

Compact on purpose: the SRCL study (``benchmarks/srcl_study.py``) and notebooks use it to score a
pre-training checkpoint without fine-tuning and without ITM re-ranking (the full retrieval task with
re-ranking is ``tasks/retrieval.py``). On the synthetic shapes world it reports recall two ways:

* standard R@K: only the paired items count (an image's own captions; a caption's own image), as
  in ALBEF's ``itm_eval``;
* semantic R@K: every item the caption is true of counts (``ShapesWorld.truth_matrix``), so a
  partial caption ("there is a red circle") retrieved for any image with a red circle is a hit;
  plus the semantic mean average precision over the whole ranking (``txt_map``, ``img_map``);

each beside its chance level, the R@K of a random ranking (``tasks.retrieval_ranking.chance_recall``).
:func:`format_table` prints them.

Names follow ALBEF: ``txt_r*`` is image-to-text retrieval, ``img_r*`` text-to-image, ``r_mean``
the mean of the six recalls (in percent).

    from tasks.zero_shot import load_vlp_checkpoint, zero_shot_retrieval
    model, tokenizer, cfg = load_vlp_checkpoint("output/demo_pretrain/checkpoint_last.pth")
    print(format_table(zero_shot_retrieval(model, tokenizer, "data/shapes", split="test")))
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

from datasets.formats import load_image, read_annotations
from datasets.text import pre_caption, tokenizer_from_state
from datasets.transforms import TransformConfig, build_transform
from engine.checkpoint import load_checkpoint
from models.loading import load_checkpoint_into
from models.vision import vit_tokens
from models.vlp import VLPModel
from objectives.pretrain import PretrainObjective
from tasks.common import saved_run_config
from tasks.pretrain_config import PretrainConfig
from tasks.retrieval_ranking import chance_note, chance_recall

__all__ = ["load_vlp_checkpoint", "itc_features", "retrieval_metrics", "read_retrieval_split", "zero_shot_retrieval",
           "format_table"]

KS = (1, 5, 10)


def load_vlp_checkpoint(path: str, device: str | torch.device = "cpu", objective: bool = False):
    """Build the model of one of our pre-training checkpoints and load its weights.

    Returns ``(model, tokenizer, cfg)`` with ``model`` in eval mode on ``device`` and ``cfg`` the
    checkpoint's ``PretrainConfig``. With ``objective``, ``model`` is the checkpoint's
    ``PretrainObjective`` holding the model, with the checkpoint's momentum encoders (its queues
    empty). Raises ``ValueError`` naming the file when it is not a pre-training checkpoint (or has
    no momentum encoders, with ``objective``).
    """
    ckpt = load_checkpoint(path)
    missing = [k for k in ("model", "config", "tokenizer") if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a pre-training checkpoint of this project (no {missing} entries)")
    cfg = saved_run_config(PretrainConfig, ckpt["config"])
    model = VLPModel(cfg.model)
    objective_state = load_checkpoint_into(model, ckpt, source=path).objective
    if objective:
        if not any(k.startswith("visual_m.") for k in objective_state):
            raise ValueError(f"{path} has no momentum encoders: use similarity_source='online'")
        model = PretrainObjective(model, cfg.loss)
        model.load_momentum(objective_state)
    return model.to(device).eval(), tokenizer_from_state(ckpt["tokenizer"]), cfg


@torch.no_grad()
def itc_features(model: VLPModel | PretrainObjective, tokenizer, image_paths: Sequence[str], captions: Sequence[str],
                 img_size: int, batch_size: int = 64, max_length: int = 30, momentum: bool = False,
                 device: Optional[torch.device] = None, progress: bool = True,
                 transform_cfg: Optional[TransformConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ITC features ``(N_images, D)`` and ``(N_captions, D)`` (float32, CPU).

    Images are read from ``image_paths`` (eval transform: resize to ``img_size``); captions are used
    as given (clean them first). ``momentum=True`` uses the momentum encoders of ``model``, a
    ``PretrainObjective`` (the similarity that the SRCL weights use by default); otherwise the model's
    (an objective's: its model's) encoders. ``transform_cfg``: the normalisation of the training run
    (``cfg.data.transform``; default ``TransformConfig()``)."""
    objective = model if isinstance(model, PretrainObjective) else None
    if momentum and objective is None:
        raise ValueError("momentum features need the objective's momentum encoders: pass a PretrainObjective "
                         "(load_vlp_checkpoint(..., objective=True))")
    base = objective.model if objective is not None else model
    device = device or next(model.parameters()).device
    transform = build_transform(img_size, False, transform_cfg)
    was_training = model.training
    model.eval()
    img_feats, txt_feats = [], []
    for lo in tqdm(range(0, len(image_paths), batch_size), desc="zero-shot: images", disable=not progress,
                   leave=False):
        batch = torch.stack([transform(load_image(p)) for p in image_paths[lo:lo + batch_size]]).to(device)
        if momentum:
            tokens = vit_tokens(objective.visual_m, batch)
            img_feats.append(torch.nn.functional.normalize(objective.vision_proj_m(tokens[:, 0]).float(), dim=-1).cpu())
        else:
            img_feats.append(base.image_feat(base.encode_image(batch)).cpu())
    for lo in tqdm(range(0, len(captions), batch_size), desc="zero-shot: texts", disable=not progress, leave=False):
        enc = tokenizer(list(captions[lo:lo + batch_size]), padding="longest", truncation=True,
                        max_length=max_length, return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        if momentum:
            hidden = objective.text_m.forward_text(ids, mask)
            txt_feats.append(torch.nn.functional.normalize(objective.text_proj_m(hidden[:, 0]).float(), dim=-1).cpu())
        else:
            txt_feats.append(base.text_feat(base.encode_text(ids, mask)).cpu())
    model.train(was_training)
    dim = base.cfg.embed_dim
    return (torch.cat(img_feats) if img_feats else torch.zeros(0, dim),
            torch.cat(txt_feats) if txt_feats else torch.zeros(0, dim))


def _best_rank(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """For each row, the 0-based rank of its best-scoring relevant column (ties: optimistic);
    rows without a relevant column get rank ``K`` (never a hit)."""
    best = scores.masked_fill(~relevant, float("-inf")).max(dim=1, keepdim=True).values
    rank = (scores > best).sum(dim=1)
    return torch.where(relevant.any(dim=1), rank, torch.full_like(rank, scores.shape[1]))


def _mean_average_precision(scores: torch.Tensor, relevant: torch.Tensor) -> float:
    """Mean over rows (with at least one relevant column) of the average precision of the ranking."""
    order = scores.argsort(dim=1, descending=True)
    rel = relevant.gather(1, order).double()
    hits = rel.cumsum(dim=1)
    ranks = torch.arange(1, scores.shape[1] + 1, dtype=torch.float64)
    n_rel = rel.sum(dim=1)
    ap = (rel * hits / ranks).sum(dim=1) / n_rel.clamp_min(1)
    keep = n_rel > 0
    return float(ap[keep].mean()) if bool(keep.any()) else float("nan")


def retrieval_metrics(sim: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = KS,
                      with_map: bool = False) -> dict[str, float]:
    """Recall@K in percent for image->text (``txt_r{k}``) and text->image (``img_r{k}``), and their
    mean ``r_mean``.

    Args:
        sim: (N_images, N_texts) similarities.
        relevant: (N_images, N_texts) bool, True where the text counts as a correct answer for the
            image (and vice versa).
        with_map: also the mean average precision of both directions (``txt_map``, ``img_map``).
    """
    if sim.shape != relevant.shape:
        raise ValueError(f"sim {tuple(sim.shape)} and relevant {tuple(relevant.shape)} differ in shape")
    sim, relevant = sim.double(), relevant.bool()
    out: dict[str, float] = {}
    r_i2t, r_t2i = _best_rank(sim, relevant), _best_rank(sim.T, relevant.T)
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * float((r_i2t < k).double().mean())
    for k in ks:
        out[f"img_r{k}"] = 100.0 * float((r_t2i < k).double().mean())
    out["r_mean"] = sum(out[f"{d}_r{k}"] for d in ("txt", "img") for k in ks) / (2 * len(ks))
    if with_map:
        out["txt_map"] = 100.0 * _mean_average_precision(sim, relevant)
        out["img_map"] = 100.0 * _mean_average_precision(sim.T, relevant.T)
    return out


def read_retrieval_split(data_root: str, split: str = "test", ann_file: Optional[str] = None,
                         max_words: int = 30, clean_style: str = "albef") -> tuple[list[str], list[str], list[int]]:
    """Images (paths relative to ``data_root``), cleaned captions and each caption's image index from
    an ALBEF retrieval file ``[{"image": str, "caption": [str, ...]}]`` (default
    ``<data_root>/retrieval_<split>.json``)."""
    path = ann_file or os.path.join(data_root, f"retrieval_{split}.json")
    records = read_annotations(path, {"image": str, "caption": (str, list)}, "retrieval evaluation",
                               "The synthetic shapes world writes retrieval_{val,test}.json.")
    images, captions, owner = [], [], []
    for i, rec in enumerate(records):
        raw = rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
        images.append(rec["image"])
        for c in raw:
            if not isinstance(c, str):
                raise ValueError(f"{path!r} record {i}: every caption must be a string, got {c!r}")
            captions.append(pre_caption(c, max_words, clean_style))
            owner.append(i)
    return images, captions, owner


def zero_shot_retrieval(model: VLPModel, tokenizer, data_root: str, split: str = "test",
                        ann_file: Optional[str] = None, world: Any = None, batch_size: int = 64,
                        max_words: int = 30, clean_style: str = "albef", max_length: int = 30,
                        transform_cfg: Optional[TransformConfig] = None, progress: bool = True) -> dict[str, Any]:
    """Zero-shot ITC retrieval on ``retrieval_<split>.json``.

    Returns ``{"standard": {...}, "standard_chance": {...}, "semantic": {...}, "semantic_chance": {...},
    "n_images", "n_captions", "semantic_relevant_per_caption"}``; the ``*_chance`` entries are the
    recalls of a random ranking (``tasks.retrieval_ranking.chance_recall``); the semantic entries are
    present when the data is a shapes world (``world`` given, or ``<data_root>/scenes.json`` exists);
    "semantic" holds ``txt_map`` / ``img_map`` besides the recalls.
    """
    from shapesworld.truth import ShapesWorld

    images, captions, owner = read_retrieval_split(data_root, split, ann_file, max_words, clean_style)
    img_feat, txt_feat = itc_features(model, tokenizer, [os.path.join(data_root, p) for p in images], captions,
                                      model.cfg.vision.img_size, batch_size, max_length, progress=progress,
                                      transform_cfg=transform_cfg)
    sim = img_feat @ txt_feat.T
    own = torch.zeros(len(images), len(captions), dtype=torch.bool)
    own[torch.as_tensor(owner), torch.arange(len(captions))] = True
    out: dict[str, Any] = {"n_images": len(images), "n_captions": len(captions),
                           "standard": retrieval_metrics(sim, own), "standard_chance": chance_recall(own)}
    if world is None and os.path.isfile(os.path.join(data_root, "scenes.json")):
        world = ShapesWorld.load(data_root)
    if world is not None:
        truth = torch.as_tensor(world.truth_matrix(captions, images)).T  # (image, caption)
        if not bool(truth[own].all()):
            raise ValueError(f"{data_root}: some captions are not true of their own image by the shapes "
                             "oracle; is scenes.json from another world?")
        out["semantic"] = retrieval_metrics(sim, truth, with_map=True)
        out["semantic_chance"] = chance_recall(truth)
        out["semantic_relevant_per_caption"] = float(truth.sum(0).double().mean())
    return out


def format_table(result: dict[str, Any], ks: Sequence[int] = KS) -> str:
    """The recalls of :func:`zero_shot_retrieval` as a text table (ITC only, no re-ranking): each
    kind of recall followed by its chance level (a random ranking), and a note on the recalls that
    are 100 by construction (a split with too few candidates for K)."""
    head = f"{'':36s}" + "".join(f"{'R@' + str(k):>8s}" for k in ks) + f"{'mean':>8s}"
    lines = [f"zero-shot ITC retrieval (no re-ranking): {result['n_images']} images, {result['n_captions']} captions",
             head]
    means = []
    for kind in ("standard", "semantic"):
        if kind not in result:
            continue
        for label, m in ((kind, result[kind]), (f"{kind}, random ranking", result[f"{kind}_chance"])):
            for name, prefix in (("image->text", "txt"), ("text->image", "img")):
                values = [m[f"{prefix}_r{k}"] for k in ks]
                lines.append(f"{label + ' ' + name:36s}" + "".join(f"{v:8.2f}" for v in values)
                             + f"{sum(values) / len(values):8.2f}")
        means.append(f"{kind} r_mean {result[kind]['r_mean']:.2f} (random ranking {result[kind + '_chance']['r_mean']:.2f})")
    note = chance_note(result["standard_chance"], result["n_images"], result["n_captions"])
    return "\n".join(lines + ["; ".join(means)] + ([note] if note else []))
