"""Pre-training: SRCL (or InfoNCE) + ITM with hard negatives + MLM on image-caption pairs.

``PretrainConfig`` is the whole run's schema; ``run(cfg)`` builds data, tokenizer, model and the
trainer and trains. The training loop itself lives in ``engine/trainer.py``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from datasets.formats import DEFAULT_MAX_IMAGE_PIXELS, PretrainCollator, PretrainDataset
from datasets.shards import ShardPretrainDataset
from datasets.text import tokenizer_state
from datasets.transforms import TransformConfig, build_transform, decode_min_side
from engine import distributed as D
from engine.checkpoint import find_resume, load_checkpoint
from engine.config import opt, save_config
from engine.loader import SafeDataLoader
from engine.rundir import OutputDir
from engine.trainer import (EpochBatchSampler, OptimConfig, ScheduleConfig, Trainer, TrainConfig, TrainState,
                            grouped, setup_logging)
from models import losses as L
from models.loading import load_checkpoint_into
from shapesworld.truth import ShapesWorld
from tasks.common import (BadImageCheck, TokenizerConfig, load_vlp, make_tokenizer, print_reports, require_files,
                          require_image_root, saved_run_config, to_device,
                          validate_image_data)
from models.vlp import PretrainLossConfig, VLPConfig, VLPModel
from tasks.resume import check_resume_config
from tasks.srcl_diagnostics import QueueTexts, batch_diagnostics

log = logging.getLogger("pretrain")

@dataclass
class PretrainDataConfig:
    format: Literal["json", "shards"] = opt("json", "json: annotation JSONs (train_files) + image files; shards: WebDataset-style tar shards (shards), streamed")
    train_files: list[str] = opt(["data/shapes/pretrain.json"], "annotation JSONs [{image, caption}], concatenated")
    shards: list[str] = opt([], "with format=shards: tar shards as brace patterns (data/shards/shard-{000000..000099}.tar), globs, or the index.json that python -m datasets.shards writes; local paths or URLs (https://, s3://, gs://, any fsspec protocol; docs/datasets.md)")
    shards_num_samples: Optional[int] = opt(None, "with format=shards: samples per epoch (default: all samples the shards' index.json lists)")
    shards_shuffle_buffer: int = opt(1000, "with format=shards: samples in each loader worker's shuffle buffer (1 = shard order)")
    image_root: str = opt("data/shapes", "directory the 'image' paths are relative to")
    max_words: int = opt(30, "captions are cut to this many words after cleaning")
    clean_style: Literal["albef", "blip"] = opt("albef", "caption cleaning rules")
    transform: TransformConfig = opt(TransformConfig, "training image augmentation")
    num_workers: int = opt(2, "data-loading worker processes per training process")
    max_bad_fraction: float = opt(0.01, "stop when more than this fraction of the images tried are distinct images that fail to load (an unreadable image is replaced by a random other record and counted once; the count is logged as data/bad_images)")
    bad_check_after: int = opt(500, "images tried before the bad-image fraction is checked (bad images beyond max_bad_fraction of the whole training set stop the run at once)")
    max_image_pixels: Optional[int] = opt(DEFAULT_MAX_IMAGE_PIXELS, "an image that would decode to more pixels is skipped and counted as bad (a JPEG much larger than the training crop is first decoded reduced, 1/2 to 1/8, which counts); default: PIL's decompression-bomb warning limit; PIL itself refuses twice as many; null = no bound of ours")

    def validate(self) -> None:
        validate_image_data(self)


@dataclass
class DiagnosticsConfig:
    every: int = opt(0, "optimiser steps between SRCL diagnostics (needs shapes data; 0 = off)")
    collapse_check_step: int = opt(300, "at this optimiser step, warn when the image or text features of the batch are "
                                        "still collapsed (mean pairwise cosine above collapse_threshold; logged every step "
                                        "as feat/image_cos, feat/text_cos); 0 = off")
    collapse_threshold: float = opt(0.98, "mean pairwise cosine above which features count as collapsed")


@dataclass
class PretrainConfig:
    model: VLPConfig = opt(VLPConfig, "model")
    tokenizer: TokenizerConfig = opt(TokenizerConfig, "tokenizer")
    data: PretrainDataConfig = opt(PretrainDataConfig, "pre-training data")
    loss: PretrainLossConfig = opt(PretrainLossConfig, "losses")
    optim: OptimConfig = opt(OptimConfig, "optimiser")
    schedule: ScheduleConfig = opt(ScheduleConfig, "learning-rate schedule")
    train: TrainConfig = opt(TrainConfig, "training loop")
    diagnostics: DiagnosticsConfig = opt(DiagnosticsConfig, "SRCL diagnostics on synthetic data")


class PretrainTask:
    """Data + step for pre-training (see ``engine.trainer.Task``)."""

    def __init__(self, cfg: PretrainConfig, dist: D.DistInfo, dataset: PretrainDataset, tokenizer,
                 helper: Optional[VLPModel] = None, world: Optional[ShapesWorld] = None) -> None:
        self.cfg, self.dist, self.dataset, self.tokenizer = cfg, dist, dataset, tokenizer
        self.helper, self.world = helper, world
        self.sampler: Optional[EpochBatchSampler] = None
        if isinstance(dataset, ShardPretrainDataset):  # streamed: the dataset plans its own batches
            dataset.configure(cfg.train.batch_size, cfg.train.grad_accum, dist.rank, dist.world_size)
        else:
            self.sampler = EpochBatchSampler(len(dataset), cfg.train.batch_size, cfg.train.grad_accum,
                                             dist.rank, dist.world_size, cfg.train.seed)
        self.collator = PretrainCollator(tokenizer, cfg.tokenizer.max_length, cfg.loss.mlm_prob)
        # diagnostics of the queue: the captions behind the model's text queue
        self.queue_texts = QueueTexts(cfg.model.queue_size) if cfg.diagnostics.every and world is not None else None
        n_images = len(dataset.image_ids) if isinstance(dataset, PretrainDataset) else len(dataset)
        self.bad_images = BadImageCheck.from_data(cfg.data, "input_ids", n_images)

    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch() if self.sampler is not None else self.dataset.steps_per_epoch()

    def train_batches(self, epoch: int, start_step: int):
        self.dataset.set_epoch(epoch)
        if self.sampler is None:
            self.dataset.set_position(epoch, start_step)
            batching = {"batch_size": self.dataset.micro_batch()}
        else:
            self.sampler.set_position(epoch, start_step)
            batching = {"batch_sampler": self.sampler}
        loader = SafeDataLoader(self.dataset, collate_fn=self.collator, **batching,
                                num_workers=self.cfg.data.num_workers, pin_memory=self.dist.device.type == "cuda",
                                generator=torch.Generator().manual_seed(0),
                                persistent_workers=False)
        for group in grouped(loader, self.cfg.train.grad_accum):
            for b in group:
                self._count_bad(b)
            yield [to_device(b, self.dist.device) for b in group]

    def _count_bad(self, batch: dict) -> None:
        self.bad_images(batch)

    def log_state(self) -> dict:
        """Counters for log.jsonl (see ``engine.trainer.Task``): the bad-image counts."""
        return self.bad_images.log_state()

    def _helper_feats(self, batch: dict):
        if self.helper is None:
            return None
        self.helper.eval()
        return self.helper.unimodal_features(batch["image"], batch["input_ids"], batch["attention_mask"])

    def train_step(self, model, batch: dict, state: TrainState) -> dict:
        ccfg = self.cfg.loss.contrastive
        alpha = ccfg.alpha_at(state.progress)
        queue_ptr = _queue_ptr(model) if self.queue_texts is not None else None
        helper_feats = self._helper_feats(batch)
        out = model(batch, self.cfg.loss, alpha, helper_feats, step=state.global_step)
        logs = {k: v for k, v in out.items() if k.startswith("loss") or k in ("itm_acc", "temp")}
        logs["feat/image_cos"], logs["feat/text_cos"] = out["image_cos"], out["text_cos"]
        self._check_collapse(state.global_step + 1, out)
        logs["alpha"] = alpha
        logs["_pairs"] = batch["image"].shape[0]
        if "weights_i2t" in out:
            for k, v in L.regulation_summary(out["weights_i2t"], out["neg_mask"], out["sim_i2t_model"]).items():
                logs[f"srcl/{k}"] = v
        every = self.cfg.diagnostics.every
        if every and self.world is not None and (state.global_step + 1) % every == 0:
            logs.update(self.diagnostics(batch, out, helper_feats))
        if self.queue_texts is not None and queue_ptr is not None:
            texts = batch["captions"]
            if self.dist.world_size > 1:  # the queue holds every process's batch, in rank order
                texts = [c for part in D.all_gather_object(list(texts)) for c in part]
            self.queue_texts.write(queue_ptr, texts)
        return logs

    def _check_collapse(self, step: int, out: dict) -> None:
        d = self.cfg.diagnostics
        if not d.collapse_check_step or step != d.collapse_check_step or not self.dist.is_main:
            return
        for name in ("image", "text"):
            cos = float(out[f"{name}_cos"])
            if cos > d.collapse_threshold:
                log.warning(
                    "step %d: the %s features are still collapsed (mean cosine between batch items %.3f): the "
                    "contrastive loss cannot learn from them. From random weights this is the usual start; if it "
                    "persists, turn text dropout off, delay the queue (loss.contrastive.queue_start_step) or lower "
                    "model.momentum, as configs/demo/pretrain.yaml does (README, 'What the demo does').",
                    step, name, cos)

    def diagnostics(self, batch: dict, out: dict, helper_feats=None) -> dict:
        """How well low weight (and high raw similarity) finds the true false negatives among the
        negatives of the local images (anchors): the local batch's captions (``diag/*``) and the
        queued captions (``diag/queue_*``); see ``tasks/srcl_diagnostics.py``."""
        b = batch["image"].shape[0]
        lo = self.dist.rank * b
        n_batch = b * self.dist.world_size
        root = self.cfg.data.image_root
        images = [os.path.relpath(self.dataset.image_path(int(i)), root) for i in batch["index"]]
        truth = torch.as_tensor(self.world.truth_matrix(batch["captions"], images)).T  # (image, caption)
        neg, sim, w = out["neg_mask"].cpu(), out["sim_i2t_model"].float().cpu(), out.get("weights_i2t")
        w = w.float().cpu() if w is not None else None
        res = batch_diagnostics(neg[:, lo:lo + b], truth, sim[:, lo:lo + b], None if w is None else w[:, lo:lo + b])
        if helper_feats is not None:
            sim_h = (helper_feats[0].float() @ helper_feats[1].float().T).cpu()
            res["helper_sim_auc"] = L.roc_auc(sim_h[neg[:, lo:lo + b]], truth[neg[:, lo:lo + b]])
        q = neg.shape[1] - n_batch
        if self.queue_texts is not None and q == self.queue_texts.size and q > 0:
            known = self.queue_texts.known()
            if bool(known.any()):
                cols = torch.nonzero(known).flatten()
                texts = [self.queue_texts.texts[int(k)] for k in cols]
                truth_q = torch.zeros(b, q, dtype=torch.bool)
                truth_q[:, cols] = torch.as_tensor(self.world.truth_matrix(texts, images)).T
                neg_q = neg[:, n_batch:] & known[None, :]
                res.update(batch_diagnostics(neg_q, truth_q, sim[:, n_batch:],
                                             None if w is None else w[:, n_batch:], prefix="queue_"))
        return {f"diag/{k}": v for k, v in res.items()}

    def evaluate(self, model, epoch: int):
        return None

    def checkpoint_extra(self) -> dict:
        return {"tokenizer": tokenizer_state(self.tokenizer)}


def _queue_ptr(model) -> Optional[int]:
    """The queue pointer of a (possibly DDP- or compile-wrapped) VLPModel, None without a queue."""
    for _ in range(4):
        if hasattr(model, "queue_ptr"):
            return int(model.queue_ptr)
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            break
    return None


# ---------------------------------------------------------------------- building a run
def prepare_data(cfg: PretrainConfig, dist: D.DistInfo) -> Optional[ShapesWorld]:
    """Check that the files exist; the shapes world (for diagnostics) when the data is synthetic."""
    d = cfg.data
    if d.format == "json":
        require_files(d.train_files, "pre-training annotation",
                      "Real data (CC3M, SBU, COCO, VG) comes as ALBEF-format JSON lists; see docs/datasets.md.")
    if not cfg.diagnostics.every:
        return None
    if d.format == "shards":
        if dist.is_main:
            log.warning("diagnostics.every is set but data.format=shards: diagnostics need the JSON reader; off")
        return None
    if (Path(d.image_root) / "scenes.json").is_file():
        return ShapesWorld.load(d.image_root)
    if dist.is_main:
        log.warning("diagnostics.every is set but %s holds no shapes world (scenes.json): diagnostics off", d.image_root)
    return None


def load_helper(path: str, tokenizer, device: torch.device) -> VLPModel:
    """A frozen earlier checkpoint of this project, used for the helper similarity."""
    ckpt = load_checkpoint(path)
    hcfg = saved_run_config(PretrainConfig, ckpt["config"]).model
    if tokenizer_state(tokenizer)["vocab"] != ckpt["tokenizer"]["vocab"]:
        raise ValueError(f"helper checkpoint {path} uses a different tokenizer vocabulary than this run; "
                         "set tokenizer.path to the helper's tokenizer or train the helper with this one")
    helper = VLPModel(hcfg, momentum=False)
    load_checkpoint_into(helper, ckpt, source=path)
    helper.requires_grad_(False).eval()
    return helper.to(device)


def init_from_checkpoint(model: VLPModel, ckpt: dict, path: str):
    """Continued pre-training: copy the model weights of one of our checkpoints into ``model``;
    the queues start empty (their features belong to the other run), and the optimiser, schedule
    and step count start afresh. Returns the load report; raises ``models.loading.LoadError`` on another
    architecture (the checkpoint's saved config) or any unexplained key."""
    return load_vlp(model, ckpt, source=path, fresh_queues=True)[0]


def run(cfg: PretrainConfig, resume: Optional[str] = None, init_from: Optional[str] = None,
        overwrite: bool = False) -> TrainState:
    """Pre-train. ``resume``: continue a run exactly (checkpoint or output folder; the config may
    differ from the checkpoint's only where ``tasks/resume.py`` allows); ``init_from``: start a new run
    (fresh optimiser and schedule) from the weights and tokenizer of a pre-training checkpoint
    (ignored when resuming). ``train.output_dir`` is locked for the run; a new run refuses a folder
    that holds another run's checkpoints or log unless ``overwrite`` (see ``engine/rundir.py``)."""
    with OutputDir(cfg.train.output_dir, training=True, resume=resume, overwrite=overwrite) as out:
        return _run(cfg, resume, init_from, out)


def _run(cfg: PretrainConfig, resume: Optional[str], init_from: Optional[str], out: OutputDir) -> TrainState:
    dist = D.init_distributed(cfg.train.device, timeout_s=cfg.train.dist_timeout_s)
    setup_logging(dist.is_main)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    out.open(dist)
    resume_ckpt = load_checkpoint(find_resume(resume)) if resume else None
    if resume_ckpt is not None:  # before anything is written
        check_resume_config(cfg, resume_ckpt, resume, "pretrain", dist)
    world = prepare_data(cfg, dist)
    d = cfg.data
    transform = build_transform(cfg.model.vision.img_size, True, d.transform)
    if d.format == "shards":
        dataset = ShardPretrainDataset(d.shards, transform, d.max_words, d.clean_style, cfg.train.seed,
                                       d.shards_shuffle_buffer, d.shards_num_samples, d.max_image_pixels,
                                       decode_min_side(cfg.model.vision.img_size, True, d.transform))
    else:
        dataset = PretrainDataset(d.train_files, d.image_root, transform, d.max_words, d.clean_style, cfg.train.seed,
                                  d.max_bad_fraction, max_image_pixels=d.max_image_pixels,
                                  decode_min_side=decode_min_side(cfg.model.vision.img_size, True, d.transform))
        require_image_root(d.image_root, [dataset.image_path(i) for i in range(min(16, len(dataset)))])
    init_ckpt = load_checkpoint(init_from) if init_from and not resume else None
    tokenizer = make_tokenizer(cfg.tokenizer, dataset.all_captions, resume_ckpt or init_ckpt)
    del resume_ckpt
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, text=dataclasses.replace(cfg.model.text, vocab_size=len(tokenizer))))

    helper = None
    if cfg.loss.contrastive.kind == "srcl" and cfg.loss.contrastive.helper_checkpoint:
        helper = load_helper(cfg.loss.contrastive.helper_checkpoint, tokenizer, dist.device)
    torch.manual_seed(cfg.train.seed)
    model = VLPModel(cfg.model, momentum=True, helper_dim=helper.cfg.embed_dim if helper else None)
    print_reports(dist, load_vlp(model))
    if init_ckpt is not None:
        report = init_from_checkpoint(model, init_ckpt, init_from)
        if dist.is_main:
            print(f"initialised from {init_from}: {report.summary()}", flush=True)
        del init_ckpt
    model.to(dist.device)
    torch.manual_seed(cfg.train.seed + dist.rank)

    if dist.is_main:
        save_config(cfg, Path(cfg.train.output_dir) / "config.yaml")
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"pre-training: {len(dataset)} pairs, {n_params / 1e6:.2f}M trainable parameters, "
              f"contrastive={cfg.loss.contrastive.kind}, {dist.world_size} process(es) on {dist.device}, "
              f"output in {cfg.train.output_dir}", flush=True)
    lw = cfg.loss
    trainer = Trainer(cfg.train, cfg.optim, cfg.schedule, model,
                      model.param_groups(cfg.optim.lr, cfg.optim.lr_vision, cfg.optim.weight_decay),
                      dist, cfg, find_unused=(lw.itm == 0 or lw.mlm == 0))
    task = PretrainTask(cfg, dist, dataset, tokenizer, helper, world if cfg.diagnostics.every else None)
    state = trainer.fit(task, resume=resume)
    if dist.is_main:
        print(f"done: {state.global_step} steps; checkpoints in {cfg.train.output_dir}", flush=True)
    return state
