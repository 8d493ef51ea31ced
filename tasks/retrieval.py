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

import logging
from dataclasses import dataclass
from typing import Literal, Optional

from datasets.retrieval_data import (RETRIEVAL_HINT, RetrievalEvalData, RetrievalTrainCollator, RetrievalTrainDataset,
                                     read_eval_split)
from datasets.transforms import TransformConfig, build_transform
from engine.config import ConfigError, opt
from engine.trainer import TrainState
from models import losses as L
from models.vlp import VLPModel
from objectives.pretrain import AlignmentLossConfig, ContrastiveConfig, PretrainObjective, load_objective_from_checkpoint
from tasks import finetune, predict
from tasks.finetune_config import FinetuneConfig
from tasks.retrieval_eval import RetrievalEvalConfig
from tasks.retrieval_report import RetrievalRunEvaluator, memory_estimate, protocol_text
from tasks.spec import Run, TaskSpec, init_encoders, load_weights
from tasks.train_data import SampledTrainData

log = logging.getLogger("retrieval")

Mode = Literal["finetune", "zero_shot", "evaluate"]
@dataclass
class RetrievalDataConfig:
    name: str = opt("flickr30k", "dataset name printed with the results (flickr30k, coco, shapes, ...)")
    train_files: list[str] = opt(["data/retrieval/flickr30k_train.json"], "training JSONs [{image, caption, image_id}], concatenated")
    val_file: str = opt("data/retrieval/flickr30k_val.json", "validation JSON [{image, caption: [...]}] (best checkpoint by its r_mean)")
    test_file: str = opt("data/retrieval/flickr30k_test.json", "test JSON [{image, caption: [...]}]")
    image_root: str = opt("data/images/flickr30k", "directory the 'image' paths are relative to")
    max_words: int = opt(30, "captions are cut to this many words after cleaning")
    clean_style: Literal["albef", "blip"] = opt("albef", "caption cleaning rules")
    transform: TransformConfig = opt(TransformConfig, "training augmentation (evaluation uses its mean/std/interpolation only)")
    num_workers: int = opt(2, "data-loading worker processes per process")
    check_images: bool = opt(True, "check at start that every image file exists (errors name the record)")


@dataclass
class RetrievalLossConfig(AlignmentLossConfig):
    """The pre-training objective's losses without MLM, its momentum model and queue."""

    contrastive: ContrastiveConfig = opt(ContrastiveConfig, "contrastive (SRCL / InfoNCE) loss; captions of one image_id are positives")

    def validate(self) -> None:
        super().validate()
        if self.contrastive.helper_checkpoint is not None:
            raise ConfigError("loss.contrastive.helper_checkpoint: fine-tuning uses the fine-tuned model's own "
                              "similarity for SRCL (as the paper does); set it to null")


@dataclass
class RetrievalConfig(FinetuneConfig):
    data: RetrievalDataConfig = opt(RetrievalDataConfig, "retrieval data")
    loss: RetrievalLossConfig = opt(RetrievalLossConfig, "fine-tuning objective: losses, momentum model and queue")
    eval: RetrievalEvalConfig = opt(RetrievalEvalConfig, "evaluation: ITC top-k_test re-ranked by ITM")


# ------------------------------------------------------------------------------------------- data
@dataclass
class RetrievalData:
    train: Optional[RetrievalTrainDataset]  # fine-tuning only
    splits: dict[str, RetrievalEvalData]  # test, and val when fine-tuning


def annotation_files(cfg: RetrievalConfig, training: bool) -> list[str]:
    d = cfg.data
    return ([*d.train_files, d.val_file] if training else []) + [d.test_file]


def load_data(run: Run) -> RetrievalData:
    """The training pairs (fine-tuning) and the evaluation splits; a bad record is a ``ConfigError``
    naming the file and the record."""
    d, training = run.cfg.data, run.training
    try:
        train = None
        if training:
            train = RetrievalTrainDataset(d.train_files, d.image_root,
                                          build_transform(run.cfg.model.vision.img_size, True, d.transform),
                                          d.max_words, d.clean_style, run.cfg.train.seed, d.check_images)
        names = {"test": d.test_file, **({"val": d.val_file} if training else {})}
        splits = {k: read_eval_split(f, d.image_root, d.max_words, d.clean_style, d.check_images)
                  for k, f in names.items()}
    except ValueError as err:
        raise ConfigError(f"bad retrieval data: {err}") from err
    return RetrievalData(train, splits)


# ------------------------------------------------------------------------------------ the model
def build_trained_module(run: Run, model: VLPModel, ckpt: Optional[dict]) -> VLPModel | PretrainObjective:
    """What the run uses: for fine-tuning the objective on the loaded ``model`` (the checkpoint's
    momentum copy when it has one, else the online weights, and empty queues: queued pre-training
    features carry pre-training image ids, which would collide with this task's ``image_id``
    numbering); for evaluation the model alone."""
    if not run.training:
        return model
    objective = PretrainObjective(model, run.cfg.loss)
    if ckpt is not None:
        for note in load_objective_from_checkpoint(objective, ckpt):
            log.info("%s", note)
    return objective


def freeze_mlm_only(model: VLPModel) -> None:
    """The MLM transform and bias get no gradient at fine-tuning (MLM is off); the decoder weight is
    the word embeddings and stays trainable."""
    for name, p in model.mlm_head.named_parameters():
        if name.startswith("transform.") or name == "bias":
            p.requires_grad_(False)


def build_model(run: Run, ckpt: Optional[dict]) -> VLPModel | PretrainObjective:
    model = VLPModel(run.cfg.model)
    if ckpt is not None:  # the model's part (ours, pre-training or retrieval; or ALBEF/BLIP names, converted)
        load_weights(run, model, ckpt["model"])  # the objective's part: build_trained_module
    else:
        init_encoders(run, model)
    freeze_mlm_only(model)
    return build_trained_module(run, model, ckpt)


def evaluated_model(module: VLPModel | PretrainObjective) -> VLPModel:
    """The model inside what :func:`build_model` returns (evaluation and the selected checkpoint)."""
    return module.model if isinstance(module, PretrainObjective) else module


# ------------------------------------------------------------------------------------ training
def train_data(run: Run, data: RetrievalData) -> SampledTrainData:
    collator = RetrievalTrainCollator(run.tokenizer, run.cfg.tokenizer.max_length)
    # the loader's own generator leaves the global RNG alone
    return SampledTrainData(data.train, collator, run.cfg.train, run.dist, run.cfg.data.num_workers, loader_seed=0)


def train_step(run: Run, objective: PretrainObjective, batch: dict, state: TrainState) -> dict:
    out = objective(batch, 0.0)
    logs = {k: v for k, v in out.items() if k.startswith("loss") or k in ("itm_acc", "temp")}
    logs["_pairs"] = batch["image"].shape[0]
    if "weights_i2t" in out:
        for k, v in L.regulation_summary(out["weights_i2t"], out["neg_mask"], out["sim_i2t_model"]).items():
            logs[f"srcl/{k}"] = v
    return logs


def describe(run: Run, data: RetrievalData, model: VLPModel) -> str:
    cfg, d, dist = run.cfg, run.cfg.data, run.dist
    n_tokens = (cfg.model.vision.img_size // cfg.model.vision.patch_size) ** 2 + 1
    mem = memory_estimate(data.splits["test"], cfg.eval, n_tokens, cfg.model.vision.width, cfg.model.text.hidden_size,
                          cfg.tokenizer.max_length)
    protocol = protocol_text(run.mode, run.checkpoint, d.name, d.train_files)
    return (f"retrieval ({run.mode}) on {d.name}: protocol: {protocol}\n  score rule {cfg.eval.score_rule}, k_test {cfg.eval.k_test}, {dist.world_size} process(es) on "
            f"{dist.device}; evaluation keeps about " + ", ".join(f"{k} {v:.2f} GiB" for k, v in mem.items())
            + f"; output in {run.out_dir}")


SPEC = TaskSpec(
    name="retrieval", title="retrieval", config_cls=RetrievalConfig, files=annotation_files,
    files_hint=RETRIEVAL_HINT + " The synthetic retrieval demo: python run_finetune.py --task retrieval_shapes "
    "--checkpoint <demo pre-training checkpoint>.",
    data=load_data, texts=lambda data: data.train.all_captions(), build_model=build_model, train_data=train_data,
    train_step=train_step, evaluator=lambda run, data: RetrievalRunEvaluator(run, data.splits),
    metric=lambda cfg: ("r_mean", "r_mean"), best_key="best_val_r_mean", describe=describe,
    find_unused=lambda cfg: cfg.loss.itm == 0, zero_shot=True, evaluated_model=evaluated_model,
    predictor=predict.RETRIEVAL)


def run(cfg: RetrievalConfig, mode: Mode = "finetune", checkpoint: Optional[str] = None,
        resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Fine-tune and/or evaluate (``tasks/finetune.py``); returns the test metrics (every process)."""
    return finetune.run(SPEC, cfg, mode, checkpoint, resume, overwrite)


def main(args) -> int:
    """``run_finetune.py --task retrieval_{flickr,coco,shapes}``."""
    return finetune.main(SPEC, args)


__all__ = ["RetrievalConfig", "RetrievalDataConfig", "RetrievalLossConfig", "SPEC", "build_trained_module",
           "train_step", "run", "main"]
