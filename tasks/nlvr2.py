"""NLVR2 fine-tuning and evaluation: is the sentence true of the (left, right) image pair?

    python run_finetune.py --task nlvr2_shapes --checkpoint output/demo_pretrain/checkpoint_last.pth
    python run_finetune.py --task nlvr2 --checkpoint output/pretrain/checkpoint_best.pth
    python run_finetune.py --task nlvr2 --checkpoint output/nlvr2/checkpoint_best.pth --evaluate
    torchrun --nproc_per_node=8 run_finetune.py --task nlvr2 --checkpoint CKPT

Protocol: train on the train split with cross-entropy on the True/False classifier; after every
epoch the dev accuracy is computed and the best one kept (``checkpoint_best.pth``); at the end the
best-dev checkpoint is evaluated on dev and test (test-P for real NLVR2, whose labels are public).
Written to ``train.output_dir``: ``results.json`` (accuracies in %, the checkpoint and the protocol)
and ``predictions_{dev,test}.json`` (one record per example: prediction, label, P(True)).

Differences from ALBEF (documented in README): ALBEF's NLVR2 model replicates every fusion layer
into two blocks and runs an extra "text-assignment" pre-training epoch on the 4M data before
fine-tuning; this project uses twin cross-attention (``models/nlvr2.py``), initialised from the
pre-trained one, and fine-tunes directly. The paper's fine-tuning setting (lr 5e-5, batch 256,
15 epochs, AdamW wd 0.05, cosine, RandAugment, 384 px) is ``configs/nlvr2.yaml``; ALBEF used lr 2e-5,
batch 16 x 8 GPUs and 10 epochs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from tqdm import tqdm

from datasets.nlvr2_data import NLVR2Collator, NLVR2Dataset, int_to_label
from datasets.text import tokenizer_state
from datasets.transforms import TransformConfig, build_transform
from engine import distributed as D
from engine.checkpoint import find_resume, load_checkpoint
from engine.config import ConfigError, load_config, opt, save_config
from engine.loader import SafeDataLoader
from engine.trainer import OptimConfig, ScheduleConfig, TrainConfig, TrainState
from models.loading import LoadReport, load_checkpoint_into, load_encoder_weights
from models.nlvr2 import NLVR2HeadConfig, NLVR2Model
from models.vlp import VLPConfig
from tasks.common import (SampledTrainData, SampledTrainTask, TokenizerConfig, autocast_for, build_trainer,
                          load_selected_checkpoint, make_tokenizer, print_reports, require_files, require_positive,
                          start_run, to_device, with_vocab, require_image_root, write_json)
from engine.rundir import OutputDir
from tasks.resume import check_resume_config

log = logging.getLogger("nlvr2")

DATA_HINT = ("NLVR2 annotations in the ALBEF format (nlvr_train.json, nlvr_dev.json, nlvr_test.json) come "
             "with ALBEF's released data files; the images are distributed by the NLVR2 authors (request "
             "form on the NLVR2 project page). Set data.image_root to the folder the 'images' paths are relative to. "
             "The synthetic NLVR2 demo needs no download: python run_finetune.py --task nlvr2_shapes.")
PROTOCOL = ("NLVR2: fine-tuned on train, checkpoint selected by dev accuracy, then evaluated on dev and test "
            "(test = test-P for real NLVR2). Accuracy in %.")


@dataclass
class NLVR2DataConfig:
    train_files: list[str] = opt(["data/nlvr2/nlvr_train.json"], "training annotation JSONs [{images: [left, right], sentence, label}]")
    dev_files: list[str] = opt(["data/nlvr2/nlvr_dev.json"], "dev annotation JSONs (checkpoint selection); [] = none (the last checkpoint is evaluated)")
    test_files: list[str] = opt(["data/nlvr2/nlvr_test.json"], "test annotation JSONs (test-P for real NLVR2); [] = none")
    image_root: str = opt("data/nlvr2/images", "directory the 'images' paths are relative to")
    max_words: int = opt(30, "sentences are cut to this many words after cleaning")
    clean_style: Literal["albef", "blip"] = opt("albef", "sentence cleaning rules")
    transform: TransformConfig = opt(TransformConfig, "training image augmentation (each image of a pair augmented independently)")
    num_workers: int = opt(4, "data-loading worker processes per process")
    eval_batch_size: int = opt(64, "examples per evaluation batch (per process)")

    def validate(self) -> None:
        require_positive("data.eval_batch_size", self.eval_batch_size)


@dataclass
class NLVR2Config:
    model: VLPConfig = opt(VLPConfig, "model (must match the pre-training checkpoint's; vision.img_size may differ: position embeddings are interpolated)")
    head: NLVR2HeadConfig = opt(NLVR2HeadConfig, "NLVR2 head: twin cross-attention merge and classifier")
    tokenizer: TokenizerConfig = opt(TokenizerConfig, "tokenizer (a checkpoint's own tokenizer takes precedence)")
    data: NLVR2DataConfig = opt(NLVR2DataConfig, "NLVR2 data")
    optim: OptimConfig = opt(OptimConfig, "optimiser")
    schedule: ScheduleConfig = opt(ScheduleConfig, "learning-rate schedule")
    train: TrainConfig = opt(TrainConfig, "training loop")


# ---------------------------------------------------------------------- checkpoint loading
def is_nlvr2_state(state: dict) -> bool:
    """True for a fine-tuned NLVR2 state dict (it has the classifier), False for pre-training."""
    return any(k.startswith("cls_head.") for k in state)


def load_nlvr2_weights(model: NLVR2Model, ckpt: dict, source: str) -> LoadReport:
    """Load a checkpoint into ``model`` with an explicit report.

    * A fine-tuned NLVR2 checkpoint loads as it is.
    * A pre-training checkpoint (``VLPModel`` keys) loads into ``model.base``: its momentum encoders
      and queues are reported as ignored, the right-image cross-attention of every fusion layer is
      initialised as a copy of the pre-trained cross-attention, the merge layers (if any) and the
      classifier are new.
    """
    if is_nlvr2_state(ckpt["model"]):
        return load_checkpoint_into(model, ckpt, source=source)
    expected = {"cross_right.": "right-image cross-attention: copied from the pre-trained cross-attention",
                "merge.": "new merge layer (initialised to the average)",
                "cls_head.": "new NLVR2 classifier"}
    report = load_checkpoint_into(model, ckpt, source=source, prefix="base.", expected_missing=expected)
    model.init_right_from_left()
    return report


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: NLVR2Model, dataset: NLVR2Dataset, collator: NLVR2Collator, dist: D.DistInfo,
            batch_size: int, num_workers: int = 0, precision: str = "fp32", progress: bool = True,
            desc: str = "eval") -> dict[int, tuple[int, float]]:
    """``{example index: (predicted class, P(True))}`` for every example of ``dataset``; each process
    scores every ``world_size``-th example and the results are gathered to all processes."""
    was_training = model.training
    model.eval()
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    loader = SafeDataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, collate_fn=collator,
                            num_workers=num_workers, pin_memory=dist.device.type == "cuda")
    autocast = autocast_for(precision, dist.device)
    local: list[tuple[int, int, float]] = []
    for batch in tqdm(loader, desc=desc, disable=not (progress and dist.is_main), dynamic_ncols=True, leave=False):
        b = to_device(batch, dist.device)
        with autocast():
            logits = model(b["image_left"], b["image_right"], b["input_ids"], b["attention_mask"]).float()
        pred = logits.argmax(dim=1).cpu().tolist()
        prob = logits.softmax(dim=1)[:, 1].cpu().tolist()
        local.extend(zip(batch["index"].tolist(), pred, prob))
    model.train(was_training)
    out: dict[int, tuple[int, float]] = {}
    for part in D.all_gather_object(local):
        for i, p, q in part:
            out[int(i)] = (int(p), float(q))
    if len(out) != len(dataset):
        raise RuntimeError(f"evaluation covered {len(out)} of {len(dataset)} examples")
    return out


def accuracy(preds: dict[int, tuple[int, float]], labels: list[int]) -> float:
    """Accuracy in % of ``preds`` (from :func:`predict`) against ``labels`` (0/1 by index)."""
    return 100.0 * sum(preds[i][0] == y for i, y in enumerate(labels)) / len(labels)


def prediction_records(dataset: NLVR2Dataset, preds: dict[int, tuple[int, float]]) -> list[dict]:
    """One record per example: the annotation's own keys plus prediction, P(True) and correctness."""
    out = []
    for i, rec in enumerate(dataset.records):
        p, prob = preds[i]
        item = {k: v for k, v in rec.items() if not k.startswith("_")}
        item.update({"index": i, "prediction": int_to_label(p), "prob_true": round(prob, 6),
                     "correct": p == rec["_label"]})
        out.append(item)
    return out


# ---------------------------------------------------------------------- the task
class NLVR2Task(SampledTrainTask):
    """Data + step + dev evaluation for the trainer (see ``engine.trainer.Task``)."""

    def __init__(self, cfg: NLVR2Config, dist: D.DistInfo, train_set: NLVR2Dataset, dev_set: Optional[NLVR2Dataset],
                 tokenizer) -> None:
        self.cfg, self.dist, self.train_set, self.dev_set, self.tokenizer = cfg, dist, train_set, dev_set, tokenizer
        self.collator = NLVR2Collator(tokenizer, cfg.tokenizer.max_length)
        self.train_data = SampledTrainData(train_set, self.collator, cfg.train, dist, cfg.data.num_workers)

    def train_step(self, model, batch: dict, state: TrainState) -> dict:
        logits = model(batch["image_left"], batch["image_right"], batch["input_ids"], batch["attention_mask"])
        labels = batch["label"]
        loss = F.cross_entropy(logits.float(), labels)
        return {"loss": loss, "acc": (logits.argmax(1) == labels).float().mean().detach(),
                "_pairs": labels.shape[0]}

    def evaluate(self, model, epoch: int) -> Optional[dict]:
        if self.dev_set is None:
            return None
        preds = predict(model, self.dev_set, self.collator, self.dist, self.cfg.data.eval_batch_size,
                        self.cfg.data.num_workers, self.cfg.train.precision, self.cfg.train.progress,
                        desc=f"dev (epoch {epoch})")
        acc = accuracy(preds, self.dev_set.labels())
        if self.dist.is_main:
            print(f"epoch {epoch}: dev accuracy {acc:.2f}%", flush=True)
        return {"dev_acc": acc}

    def checkpoint_extra(self) -> dict:
        return {"tokenizer": tokenizer_state(self.tokenizer), "task": "nlvr2"}


# ---------------------------------------------------------------------- building a run
def _eval_sets(cfg: NLVR2Config) -> dict[str, NLVR2Dataset]:
    d = cfg.data
    transform = build_transform(cfg.model.vision.img_size, False, d.transform)
    out = {}
    for split, files in (("dev", d.dev_files), ("test", d.test_files)):
        if files:
            out[split] = NLVR2Dataset(files, d.image_root, transform, d.max_words, d.clean_style, cfg.train.seed, DATA_HINT)
    return out


def evaluate_and_write(model: NLVR2Model, sets: dict[str, NLVR2Dataset], cfg: NLVR2Config, dist: D.DistInfo,
                       tokenizer, checkpoint: str, extra: Optional[dict] = None) -> dict:
    """Accuracy on every split of ``sets``; the main process writes results.json and the predictions."""
    collator = NLVR2Collator(tokenizer, cfg.tokenizer.max_length)
    out_dir = Path(cfg.train.output_dir)
    results: dict = {"task": "nlvr2", "checkpoint": checkpoint, "protocol": PROTOCOL, **(extra or {})}
    for split, ds in sets.items():
        preds = predict(model, ds, collator, dist, cfg.data.eval_batch_size, cfg.data.num_workers,
                        cfg.train.precision, cfg.train.progress, desc=split)
        acc = accuracy(preds, ds.labels())
        results[split] = {"accuracy": acc, "n": len(ds), "files": list(getattr(cfg.data, f"{split}_files")),
                          "predictions": str(out_dir / f"predictions_{split}.json")}
        if dist.is_main:
            write_json(prediction_records(ds, preds), out_dir / f"predictions_{split}.json")
    if dist.is_main:
        write_json(results, out_dir / "results.json")
        lines = [f"  {split:5s} accuracy {results[split]['accuracy']:.2f}%  ({results[split]['n']} examples)"
                 for split in sets]
        print(f"NLVR2 results ({checkpoint}):\n" + "\n".join(lines)
              + f"\n  {PROTOCOL}\n  written: {out_dir / 'results.json'}", flush=True)
    D.barrier()
    return results


def run(cfg: NLVR2Config, checkpoint: Optional[str] = None, evaluate: bool = False,
        resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Fine-tune (or with ``evaluate`` only evaluate) NLVR2; returns the results dict. ``train.output_dir``
    is claimed for the run (``engine/rundir.py``: fine-tuning refuses another run's checkpoints unless
    ``resume`` or ``overwrite``; evaluation writes no checkpoint and is not refused because of one)."""
    with OutputDir(cfg.train.output_dir, training=not evaluate, resume=resume, overwrite=overwrite) as out:
        return _run(cfg, checkpoint, evaluate, resume, out)


def _run(cfg: NLVR2Config, checkpoint: Optional[str], evaluate: bool, resume: Optional[str], out: OutputDir) -> dict:
    d = cfg.data
    dist = start_run(cfg.train, out)
    resume_ckpt = load_checkpoint(find_resume(resume)) if resume and not evaluate else None
    if resume_ckpt is not None:  # before anything is written
        check_resume_config(cfg, resume_ckpt, resume, "nlvr2", dist)
    require_files(([] if evaluate else d.train_files) + d.dev_files + d.test_files, "NLVR2 annotation", DATA_HINT)
    require_image_root(d.image_root)
    if evaluate and not checkpoint:
        raise ConfigError("--evaluate needs --checkpoint (a fine-tuned NLVR2 checkpoint)")

    ckpt = load_checkpoint(checkpoint) if checkpoint else None
    if evaluate and not is_nlvr2_state(ckpt["model"]):
        raise ConfigError(f"{checkpoint} has no NLVR2 classifier (it is a pre-training checkpoint): "
                          "fine-tune it first (run without --evaluate)")
    train_set = None
    if not evaluate:
        transform = build_transform(cfg.model.vision.img_size, True, d.transform)
        train_set = NLVR2Dataset(d.train_files, d.image_root, transform, d.max_words, d.clean_style,
                                 cfg.train.seed, DATA_HINT)
    tokenizer = make_tokenizer(cfg.tokenizer, lambda: list(train_set.sentences), resume_ckpt or ckpt)
    del resume_ckpt
    cfg = with_vocab(cfg, tokenizer)

    torch.manual_seed(cfg.train.seed)
    model = NLVR2Model(cfg.model, cfg.head)
    if ckpt is not None:
        print_reports(dist, [load_nlvr2_weights(model, ckpt, checkpoint)])
    else:
        if print_reports(dist, load_encoder_weights(model.base)):
            model.init_right_from_left()
        if dist.is_main and not resume:
            log.warning("no --checkpoint: fine-tuning a model that was not pre-trained on image-text pairs")
    del ckpt
    model.to(dist.device)
    eval_sets = _eval_sets(cfg)
    out_dir = Path(cfg.train.output_dir)

    if evaluate:
        return evaluate_and_write(model, eval_sets, cfg, dist, tokenizer, checkpoint)

    if dist.is_main:
        save_config(cfg, out_dir / "config.yaml")
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"NLVR2 fine-tuning: {len(train_set)} training pairs, "
              + ", ".join(f"{len(v)} {k}" for k, v in eval_sets.items())
              + f"; {n_params / 1e6:.2f}M trainable parameters, merge={cfg.head.merge}, "
              f"{dist.world_size} process(es) on {dist.device}, output in {out_dir}", flush=True)
    torch.manual_seed(cfg.train.seed + dist.rank)
    trainer = build_trainer(cfg, model, dist)
    task = NLVR2Task(cfg, dist, train_set, eval_sets.get("dev"), tokenizer)
    state = trainer.fit(task, resume=resume, metric_key="dev_acc")
    if state.global_step < state.total_steps:  # stopped by a signal: the trainer said how to resume
        return {"stopped_at_step": state.global_step}

    chosen, final, is_best = load_selected_checkpoint(model, out_dir)
    extra = {"selected_by": "dev accuracy" if is_best else "last checkpoint (no dev set)",
             "selected_step": final["state"]["global_step"], "best_dev_acc": state.best_metric,
             "from_checkpoint": checkpoint}
    del final
    return evaluate_and_write(model, eval_sets, cfg, dist, tokenizer, str(chosen), extra)


def main(args) -> int:
    """``run_finetune.py --task nlvr2 | nlvr2_shapes`` entry point."""
    if getattr(args, "zero_shot", False):
        raise ConfigError("NLVR2 has no zero-shot protocol: its True/False classifier is trained by fine-tuning")
    if getattr(args, "predict", None):
        raise ConfigError("--predict is for the caption tasks; NLVR2 writes predictions_{dev,test}.json")
    try:
        cfg = load_config(NLVR2Config, args.config, args.set)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    result = run(cfg, checkpoint=args.checkpoint, evaluate=args.evaluate, resume=args.resume,
                 overwrite=getattr(args, "overwrite", False))
    return 0 if result else 1
