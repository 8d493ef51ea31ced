"""Pre-training: SRCL (or InfoNCE) + ITM with hard negatives + MLM on image-caption pairs.

``PretrainConfig`` (``tasks/pretrain_config.py``) is the whole run's schema; ``run(cfg)`` builds
data, tokenizer, model and objective (``objectives/pretrain.py``: momentum copy, queues, the
losses) and the trainer, and trains. The training loop itself lives in ``engine/trainer.py``.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import torch

from datasets.formats import PretrainCollator, PretrainDataset
from datasets.shards import ShardPretrainDataset
from datasets.text import tokenizer_state
from engine import distributed as D
from engine.checkpoint import find_resume, load_checkpoint
from engine.config import save_config
from engine.loader import SafeDataLoader
from engine.rundir import OutputDir
from engine.batching import EpochBatchSampler, grouped
from engine.trainer import Trainer, TrainState, setup_logging
from models import losses as L
from models.loading import load_checkpoint_into, load_encoder_weights
from models.vlp import VLPModel
from shapesworld.truth import ShapesWorld
from objectives.pretrain import PretrainObjective, load_objective_from_checkpoint
from tasks.common import check_vocab_coverage, make_tokenizer, to_device
from tasks.pretrain_config import PretrainConfig
from tasks.pretrain_data import build_dataset, prepare_data
from tasks.train_data import BadImageCheck, EpochLoader
from tasks.resume import check_resume_config
from tasks.srcl_measures import QueueTexts, training_diagnostics
from tasks.zero_shot import load_vlp_checkpoint

log = logging.getLogger("pretrain")


class PretrainTask:
    """Data + step for pre-training (see ``engine.trainer.Task``)."""

    def __init__(self, cfg: PretrainConfig, dist: D.DistInfo, dataset: PretrainDataset, tokenizer,
                 helper: Optional[VLPModel] = None, world: Optional[ShapesWorld] = None) -> None:
        self.cfg, self.dist, self.dataset, self.tokenizer = cfg, dist, dataset, tokenizer
        self.helper, self.world = helper, world
        self.sampler: Optional[EpochBatchSampler] = None
        self.collator = PretrainCollator(tokenizer, cfg.tokenizer.max_length, cfg.loss.mlm_prob)
        if isinstance(dataset, ShardPretrainDataset):  # streamed: the dataset plans its own batches
            dataset.configure(cfg.train.batch_size, cfg.train.grad_accum, dist.rank, dist.world_size)
        else:
            self.sampler = EpochBatchSampler(len(dataset), cfg.train.batch_size, cfg.train.grad_accum,
                                             dist.rank, dist.world_size, cfg.train.seed)
            self.loader = EpochLoader(dataset, self.sampler, self.collator, cfg.data.num_workers,
                                      cfg.train.persistent_workers, dist, torch.Generator().manual_seed(0))
        # diagnostics of the queue: the captions behind the model's text queue
        self.queue_texts = QueueTexts(cfg.loss.queue_size) if cfg.diagnostics.every and world is not None else None
        n_images = len(dataset.image_ids) if isinstance(dataset, PretrainDataset) else len(dataset)
        self.bad_images = BadImageCheck.from_data(cfg.data, "input_ids", n_images)

    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch() if self.sampler is not None else self.dataset.steps_per_epoch()

    def train_batches(self, epoch: int, start_step: int):
        if self.sampler is None:  # a streamed dataset: its iteration state lives in the workers' copies
            self.dataset.set_epoch(epoch)
            self.dataset.set_position(epoch, start_step)
            loader = SafeDataLoader(self.dataset, collate_fn=self.collator, batch_size=self.dataset.micro_batch(),
                                    num_workers=self.cfg.data.num_workers, pin_memory=self.dist.device.type == "cuda",
                                    generator=torch.Generator().manual_seed(0), persistent_workers=False)
        else:
            loader = self.loader.epoch(epoch, start_step)
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
        out = model(batch, alpha, helper_feats, step=state.global_step)
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
                    "loss.momentum, as configs/demo/pretrain.yaml does (README, 'What the demo does').",
                    step, name, cos)

    def diagnostics(self, batch: dict, out: dict, helper_feats=None) -> dict:
        """The SRCL diagnostics of this step (``tasks/srcl_measures.py``); none while the similarities
        are not finite (a diverging run, which the trainer stops)."""
        if not bool(torch.isfinite(out["sim_i2t_model"]).all()):
            return {}
        images = [self.dataset.image_path(int(i)) for i in batch["index"]]
        return training_diagnostics(self.world, batch["captions"], images, self.cfg.data.image_root, out,
                                    self.dist.rank, self.dist.world_size, helper_feats, self.queue_texts)

    def evaluate(self, model, epoch: int):
        return None

    def checkpoint_extra(self) -> dict:
        return {"tokenizer": tokenizer_state(self.tokenizer)}


def _queue_ptr(model) -> Optional[int]:
    """The queue pointer of a (possibly DDP- or compile-wrapped) objective, None without a queue."""
    for _ in range(4):
        if hasattr(model, "queue_ptr"):
            return int(model.queue_ptr)
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            break
    return None


# ---------------------------------------------------------------------- building a run
def load_helper(path: str, tokenizer, device: torch.device) -> VLPModel:
    """A frozen earlier checkpoint of this project, used for the helper similarity."""
    helper, helper_tokenizer, _ = load_vlp_checkpoint(path, device)
    if tokenizer_state(tokenizer)["vocab"] != tokenizer_state(helper_tokenizer)["vocab"]:
        raise ValueError(f"helper checkpoint {path} uses a different tokenizer vocabulary than this run; "
                         "set tokenizer.path to the helper's tokenizer or train the helper with this one")
    return helper.requires_grad_(False)


def init_from_checkpoint(objective: PretrainObjective, ckpt: dict, path: str):
    """Continued pre-training: copy the model and momentum weights of one of our checkpoints into
    ``objective``; the queues start empty (their features belong to the other run), and the
    optimiser, schedule and step count start afresh. Returns the model's load report; raises
    ``models.loading.LoadError`` on another architecture (the checkpoint's saved config, head counts
    included) or any unexplained key."""
    report = load_checkpoint_into(objective.model, ckpt, source=path)
    for note in load_objective_from_checkpoint(objective, ckpt):
        log.info("%s", note)
    return report


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
    dataset = build_dataset(cfg)
    init_ckpt = load_checkpoint(init_from) if init_from and not resume else None
    tokenizer = make_tokenizer(cfg.tokenizer, dataset.all_captions, resume_ckpt or init_ckpt)
    if init_ckpt is not None or cfg.tokenizer.path:  # a vocabulary not trained on these captions
        if cfg.data.format == "json" and dist.is_main:
            check_vocab_coverage(tokenizer, dataset.all_captions(), cfg.tokenizer, "the pre-training captions")
    del resume_ckpt
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, text=dataclasses.replace(cfg.model.text, vocab_size=len(tokenizer))))

    helper = None
    if cfg.loss.contrastive.kind == "srcl" and cfg.loss.contrastive.helper_checkpoint:
        helper = load_helper(cfg.loss.contrastive.helper_checkpoint, tokenizer, dist.device)
    torch.manual_seed(cfg.train.seed)
    model = VLPModel(cfg.model)
    for report in load_encoder_weights(model):
        if dist.is_main:
            print(report.summary(), flush=True)
    objective = PretrainObjective(model, cfg.loss, helper_dim=helper.cfg.embed_dim if helper else None)
    if init_ckpt is not None:
        report = init_from_checkpoint(objective, init_ckpt, init_from)
        if dist.is_main:
            print(f"initialised from {init_from}: {report.summary()}", flush=True)
        del init_ckpt
    objective.to(dist.device)
    torch.manual_seed(cfg.train.seed + dist.rank)

    if dist.is_main:
        save_config(cfg, Path(cfg.train.output_dir) / "config.yaml")
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"pre-training: {len(dataset)} pairs, {n_params / 1e6:.2f}M trainable parameters, "
              f"contrastive={cfg.loss.contrastive.kind}, {dist.world_size} process(es) on {dist.device}, "
              f"output in {cfg.train.output_dir}", flush=True)
    lw = cfg.loss
    trainer = Trainer(cfg.train, cfg.optim, cfg.schedule, objective,
                      objective.param_groups(cfg.optim.lr, cfg.optim.lr_vision, cfg.optim.weight_decay),
                      dist, cfg, find_unused=(lw.itm == 0 or lw.mlm == 0))
    task = PretrainTask(cfg, dist, dataset, tokenizer, helper, world if cfg.diagnostics.every else None)
    state = trainer.fit(task, resume=resume)
    if dist.is_main:
        print(f"done: {state.global_step} steps; checkpoints in {cfg.train.output_dir}", flush=True)
    return state
