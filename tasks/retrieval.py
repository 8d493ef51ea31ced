"""Image-text retrieval (Flickr30K, COCO, the synthetic shapes data): fine-tuning and evaluation.

    python run_finetune.py --task retrieval_shapes --checkpoint output/demo_pretrain/checkpoint_last.pth
    python run_finetune.py --task retrieval_flickr --checkpoint output/pretrain/checkpoint_best.pth
    python run_finetune.py --task retrieval_flickr --checkpoint CKPT --zero-shot   # no fine-tuning
    python run_finetune.py --task retrieval_coco --checkpoint FINETUNED --evaluate  # test split only
    torchrun --nproc_per_node=8 run_finetune.py --task retrieval_coco --checkpoint CKPT

Training reuses the pre-training forward (``VLPModel.forward``) with MLM off: the SRCL (or InfoNCE)
contrastive loss against the momentum batch and queue, where every caption of one image is a
positive (the train file's ``image_id`` is the model's ``image_idx``), plus ITM with hard negatives.
At fine-tuning SRCL's similarity comes from the fine-tuned model alone (no helper model), as in the
paper. After every epoch the val split is evaluated; the checkpoint with the best val ``r_mean`` is
kept (``checkpoint_best.pth``) and the test split is evaluated with it at the end.
Evaluation is described in ``tasks/retrieval_eval.py``.

Protocols (printed with every result): ``fine-tuned`` (train on this task, test the best-val
checkpoint), ``zero-shot`` (``--zero-shot``: the given checkpoint, no training; note that ALBEF's
"zero-shot Flickr30K" evaluates the COCO-fine-tuned model, so pass that checkpoint to follow it) and
``evaluate`` (``--evaluate``: a checkpoint, typically fine-tuned, on the test split).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from datasets.retrieval_data import RETRIEVAL_HINT, RetrievalTrainCollator, RetrievalTrainDataset, read_eval_split
from datasets.text import tokenizer_state
from datasets.transforms import TransformConfig, build_transform
from engine import distributed as D
from engine.checkpoint import find_resume, load_checkpoint
from engine.config import ConfigError, load_config, opt, save_config
from engine.trainer import OptimConfig, ScheduleConfig, TrainConfig, TrainState
from models import losses as L
from models.vlp import ContrastiveConfig, PretrainLossConfig, VLPConfig, VLPModel
from tasks.common import (SampledTrainData, SampledTrainTask, TokenizerConfig, autocast_for, build_trainer, load_vlp,
                          load_selected_checkpoint, make_tokenizer, print_reports, require_files, require_image_root,
                          start_run, with_vocab)
from engine.rundir import OutputDir
from tasks.resume import check_resume_config
from tasks.retrieval_eval import RetrievalEvalConfig, RetrievalEvaluator, RetrievalResult, format_table, \
    memory_estimate, ranked_json

log = logging.getLogger("retrieval")

Mode = Literal["finetune", "zero_shot", "evaluate"]


@dataclass
class RetrievalDataConfig:
    name: str = opt("shapes", "dataset name printed with the results (flickr30k, coco, shapes, ...)")
    train_files: list[str] = opt(["data/shapes/retrieval_train.json"], "training JSONs [{image, caption, image_id}], concatenated")
    val_file: str = opt("data/shapes/retrieval_val.json", "validation JSON [{image, caption: [...]}] (best checkpoint by its r_mean)")
    test_file: str = opt("data/shapes/retrieval_test.json", "test JSON [{image, caption: [...]}]")
    image_root: str = opt("data/shapes", "directory the 'image' paths are relative to")
    max_words: int = opt(30, "captions are cut to this many words after cleaning")
    clean_style: Literal["albef", "blip"] = opt("albef", "caption cleaning rules")
    transform: TransformConfig = opt(TransformConfig, "training augmentation (evaluation uses its mean/std/interpolation only)")
    num_workers: int = opt(2, "data-loading worker processes per process")
    check_images: bool = opt(True, "check at start that every image file exists (errors name the record)")


@dataclass
class RetrievalLossConfig:
    contrastive: ContrastiveConfig = opt(ContrastiveConfig, "contrastive (SRCL / InfoNCE) loss; captions of one image_id are positives")
    itc: float = opt(1.0, "weight of the contrastive loss")
    itm: float = opt(1.0, "weight of the image-text matching loss (hard negatives)")

    def validate(self) -> None:
        if self.contrastive.helper_checkpoint is not None:
            raise ConfigError("loss.contrastive.helper_checkpoint: fine-tuning uses the fine-tuned model's own "
                              "similarity for SRCL (as the paper does); set it to null")

    def pretrain_loss(self) -> PretrainLossConfig:
        """The pre-training loss settings with MLM off (``VLPModel.forward`` serves fine-tuning)."""
        return PretrainLossConfig(contrastive=self.contrastive, itc=self.itc, itm=self.itm, mlm=0.0)


@dataclass
class RetrievalConfig:
    model: VLPConfig = opt(VLPConfig, "model (must match the checkpoint's architecture; the image size may differ)")
    tokenizer: TokenizerConfig = opt(TokenizerConfig, "tokenizer (the checkpoint's when it has one)")
    data: RetrievalDataConfig = opt(RetrievalDataConfig, "retrieval data")
    loss: RetrievalLossConfig = opt(RetrievalLossConfig, "fine-tuning losses")
    eval: RetrievalEvalConfig = opt(RetrievalEvalConfig, "evaluation: ITC top-k_test re-ranked by ITM")
    optim: OptimConfig = opt(OptimConfig, "optimiser")
    schedule: ScheduleConfig = opt(ScheduleConfig, "learning-rate schedule")
    train: TrainConfig = opt(TrainConfig, "training loop")


# ------------------------------------------------------------------------------------------- task
class RetrievalTask(SampledTrainTask):
    """Data + step + validation for fine-tuning (see ``engine.trainer.Task``)."""

    def __init__(self, cfg: RetrievalConfig, dist: D.DistInfo, dataset: RetrievalTrainDataset, tokenizer,
                 val: RetrievalEvaluator, reporter: "Reporter") -> None:
        self.cfg, self.dist, self.dataset, self.tokenizer, self.val, self.reporter = cfg, dist, dataset, tokenizer, val, reporter
        self.collator = RetrievalTrainCollator(tokenizer, cfg.tokenizer.max_length)
        self.train_data = SampledTrainData(dataset, self.collator, cfg.train, dist, cfg.data.num_workers,
                                           loader_seed=0)  # the loader's own generator leaves the global RNG alone
        self.loss_cfg = cfg.loss.pretrain_loss()

    def train_step(self, model, batch: dict, state: TrainState) -> dict:
        out = model(batch, self.loss_cfg, 0.0)
        logs = {k: v for k, v in out.items() if k.startswith("loss") or k in ("itm_acc", "temp")}
        logs["_pairs"] = batch["image"].shape[0]
        if "weights_i2t" in out:
            for k, v in L.regulation_summary(out["weights_i2t"], out["neg_mask"], out["sim_i2t_model"]).items():
                logs[f"srcl/{k}"] = v
        return logs

    def evaluate(self, model, epoch: int) -> dict:
        result = self.val.run(model)
        self.reporter.report(result, "val", f"epoch {epoch}", write_ranked=False, suffix=f"_epoch{epoch:02d}")
        return result.flat()

    def checkpoint_extra(self) -> dict:
        return {"tokenizer": tokenizer_state(self.tokenizer)}


class Reporter:
    """Prints result tables (main process) and writes the results JSON and the ranked results file."""

    def __init__(self, cfg: RetrievalConfig, out_dir: Path, tag: str, protocol: str, checkpoint: Optional[str],
                 splits: dict) -> None:
        self.cfg, self.out_dir, self.tag, self.protocol, self.checkpoint, self.splits = cfg, out_dir, tag, protocol, checkpoint, splits

    def report(self, result: RetrievalResult, split: str, when: str = "", write_ranked: bool = True,
               suffix: str = "", extra: Optional[dict] = None) -> None:
        if not D.is_main():
            return
        data = self.splits[split]
        title = (f"retrieval {self.cfg.data.name} {split}{' (' + when + ')' if when else ''}: {data.num_images} images, "
                 f"{data.num_texts} captions | protocol: {self.protocol}")
        print(format_table(result, title), flush=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"task": "retrieval", "dataset": self.cfg.data.name, "split": split, "split_file": data.source,
                  "protocol": self.tag, "protocol_text": self.protocol, "checkpoint": self.checkpoint,
                  "score_rule": result.score_rule, "k_test": result.k_test, "num_images": data.num_images,
                  "num_captions": data.num_texts, "metrics": result.metrics, "itc_only_metrics": result.itc_metrics,
                  "itm_pairs": result.num_pairs, "seconds": result.timings, "processes": D.world_size(), **(extra or {})}
        path = self.out_dir / f"results_{self.tag}_{split}{suffix}.json"
        path.write_text(json.dumps(record, indent=1), encoding="utf-8")
        if write_ranked and self.cfg.eval.save_ranked:
            rpath = self.out_dir / f"ranked_{self.tag}_{split}{suffix}.json"
            rpath.write_text(json.dumps(ranked_json(result, data, self.cfg.eval.save_scores)), encoding="utf-8")
            print(f"wrote {path} and {rpath}", flush=True)
        else:
            print(f"wrote {path}", flush=True)


# ------------------------------------------------------------------------------------ building
def freeze_mlm_only(model: VLPModel) -> None:
    """The MLM transform and bias get no gradient at fine-tuning (MLM is off); the decoder weight is
    the word embeddings and stays trainable."""
    for name, p in model.mlm_head.named_parameters():
        if name.startswith("transform.") or name == "bias":
            p.requires_grad_(False)


def protocol_text(mode: Mode, checkpoint: Optional[str], cfg: RetrievalConfig) -> str:
    ck = checkpoint or "a randomly initialised model (no checkpoint)"
    if mode == "zero_shot":
        return (f"zero-shot: {ck} evaluated without fine-tuning on {cfg.data.name}. (ALBEF's 'zero-shot "
                "Flickr30K' numbers evaluate the COCO-fine-tuned model: pass that checkpoint to follow it.)")
    if mode == "evaluate":
        return f"evaluation only: {ck}, no training"
    return (f"fine-tuned on {cfg.data.name} ({', '.join(cfg.data.train_files)}) from {ck}; "
            "the checkpoint with the best val r_mean is evaluated on test")


def run(cfg: RetrievalConfig, mode: Mode = "finetune", checkpoint: Optional[str] = None,
        resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Fine-tune and/or evaluate; returns the test metrics (on every process). ``train.output_dir`` is
    claimed for the run (``engine/rundir.py``: fine-tuning refuses another run's checkpoints unless
    ``resume`` or ``overwrite``; evaluation writes no checkpoint and is not refused because of one)."""
    with OutputDir(cfg.train.output_dir, training=mode == "finetune", resume=resume, overwrite=overwrite) as out:
        return _run(cfg, mode, checkpoint, resume, out)


def _run(cfg: RetrievalConfig, mode: Mode, checkpoint: Optional[str], resume: Optional[str], out: OutputDir) -> dict:
    finetune = mode == "finetune"
    if not finetune and not checkpoint:
        raise ConfigError(f"--{mode.replace('_', '-')} evaluates a checkpoint: pass --checkpoint")
    d = cfg.data
    dist = start_run(cfg.train, out)
    resume_ckpt = load_checkpoint(find_resume(resume)) if resume and finetune else None
    if resume_ckpt is not None:  # before anything is written
        check_resume_config(cfg, resume_ckpt, resume, "retrieval", dist)
    require_files(([*d.train_files, d.val_file] if finetune else []) + [d.test_file], "retrieval annotation",
                  RETRIEVAL_HINT + " The synthetic retrieval demo: python run_finetune.py --task retrieval_shapes "
                  "--checkpoint <demo pre-training checkpoint>.")
    require_image_root(d.image_root)
    img = cfg.model.vision.img_size
    train_set = None
    try:  # bad records: the CLI prints the message (it names the file and record) and exits with 2
        if finetune:
            train_set = RetrievalTrainDataset(d.train_files, d.image_root, build_transform(img, True, d.transform),
                                              d.max_words, d.clean_style, cfg.train.seed, d.check_images)
        splits = {"test": read_eval_split(d.test_file, d.image_root, d.max_words, d.clean_style, d.check_images)}
        if finetune:
            splits["val"] = read_eval_split(d.val_file, d.image_root, d.max_words, d.clean_style, d.check_images)
    except ValueError as err:
        raise ConfigError(f"bad retrieval data: {err}") from err

    ckpt = load_checkpoint(checkpoint) if checkpoint else None
    tok_source = ckpt if ckpt is not None else resume_ckpt
    if not finetune and "tokenizer" not in ckpt and not cfg.tokenizer.path:
        raise ConfigError(f"checkpoint {checkpoint} holds no tokenizer: set tokenizer.path to its vocabulary")
    tokenizer = make_tokenizer(cfg.tokenizer, train_set.all_captions if train_set else list, tok_source)
    del tok_source, resume_ckpt
    cfg = with_vocab(cfg, tokenizer)

    torch.manual_seed(cfg.train.seed)
    model = VLPModel(cfg.model, momentum=finetune)
    if ckpt is not None:  # fine-tuning starts with empty queues: pre-training image ids would collide with ours
        print_reports(dist, load_vlp(model, ckpt, source=checkpoint, fresh_queues=True), f"checkpoint {checkpoint}")
        del ckpt
    else:
        if finetune and not resume and dist.is_main:
            log.warning("no --checkpoint: fine-tuning from scratch (random initialisation%s); retrieval "
                        "results will be far below a pre-trained model's",
                        " except the weight files named in model.*_weights" if (cfg.model.vision_weights or cfg.model.text_weights) else "")
        print_reports(dist, load_vlp(model))
    freeze_mlm_only(model)
    model.to(dist.device)
    torch.manual_seed(cfg.train.seed + dist.rank)

    out_dir = Path(cfg.train.output_dir)
    tag = {"finetune": "finetuned", "zero_shot": "zero_shot", "evaluate": "evaluate"}[mode]
    protocol = protocol_text(mode, checkpoint, cfg)
    reporter = Reporter(cfg, out_dir, tag, protocol, checkpoint, splits)
    eval_tf = build_transform(img, False, d.transform)
    autocast = autocast_for(cfg.train.precision, dist.device)

    def evaluator(split: str) -> RetrievalEvaluator:
        return RetrievalEvaluator(splits[split], tokenizer, cfg.eval, eval_tf, cfg.tokenizer.max_length,
                                  dist.device, d.num_workers, autocast, name=split)

    if dist.is_main:
        save_config(cfg, out_dir / ("config.yaml" if finetune else f"config_{tag}.yaml"))
        n_tokens = (img // cfg.model.vision.patch_size) ** 2 + 1
        mem = memory_estimate(splits["test"], cfg.eval, n_tokens, cfg.model.vision.width, cfg.model.text.hidden_size,
                              cfg.tokenizer.max_length)
        print(f"retrieval ({mode}) on {d.name}: protocol: {protocol}\n  score rule {cfg.eval.score_rule}, "
              f"k_test {cfg.eval.k_test}, {dist.world_size} process(es) on {dist.device}; evaluation keeps about "
              + ", ".join(f"{k} {v:.2f} GiB" for k, v in mem.items()) + f"; output in {out_dir}", flush=True)

    if not finetune:
        result = evaluator("test").run(model)
        reporter.report(result, "test")
        return result.flat()

    lw = cfg.loss
    trainer = build_trainer(cfg, model, dist, find_unused=lw.itm == 0)
    task = RetrievalTask(cfg, dist, train_set, tokenizer, evaluator("val"), reporter)
    t0 = time.perf_counter()
    state = trainer.fit(task, resume=resume, metric_key="r_mean")
    if state.global_step < state.total_steps:
        if dist.is_main:
            print("training stopped before the end: no test evaluation", flush=True)
        return {}
    path = load_selected_checkpoint(model, out_dir)[0]
    result = evaluator("test").run(model)
    reporter.report(result, "test", f"checkpoint {path.name}",
                    extra={"evaluated_checkpoint": str(path), "best_val_r_mean": state.best_metric,
                           "train_seconds": time.perf_counter() - t0, "steps": state.global_step})
    return result.flat()


def main(args) -> int:
    """``run_finetune.py --task retrieval_{flickr,coco,shapes}`` entry point."""
    if getattr(args, "predict", None):
        raise ConfigError("--predict is for the caption tasks; retrieval has --evaluate and --zero-shot")
    if args.zero_shot and args.evaluate:
        raise ConfigError("--zero-shot and --evaluate are exclusive (both evaluate --checkpoint without training)")
    try:
        cfg = load_config(RetrievalConfig, args.config, args.set)
    except ValueError as err:  # a validate() message names the key
        raise ConfigError(str(err)) from err
    mode: Mode = "zero_shot" if args.zero_shot else "evaluate" if args.evaluate else "finetune"
    run(cfg, mode, checkpoint=args.checkpoint, resume=args.resume, overwrite=getattr(args, "overwrite", False))
    return 0


__all__ = ["RetrievalConfig", "RetrievalDataConfig", "RetrievalLossConfig", "RetrievalTask", "run", "main",
           "load_into"]
