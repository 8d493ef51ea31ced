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
from typing import Literal, Optional


from datasets.nlvr2_data import NLVR2Collator, NLVR2Dataset
from datasets.transforms import TransformConfig
from engine.config import opt
from engine.trainer import TrainState
from models.loading import LoadReport
from models.nlvr2 import NLVR2HeadConfig, NLVR2Model
from tasks import classify_data, finetune, predict
from tasks.classify_data import ClassifierData
from tasks.classify_eval import classifier_step, describe_classifier
from tasks.finetune_config import FinetuneConfig
from tasks.nlvr2_eval import DATA_HINT, NLVR2RunEvaluator
from tasks.spec import Run, TaskSpec, init_encoders, load_state, show_report
from tasks.train_data import SampledTrainData, require_positive

log = logging.getLogger("nlvr2")


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
class NLVR2Config(FinetuneConfig):
    head: NLVR2HeadConfig = opt(NLVR2HeadConfig, "NLVR2 head: twin cross-attention merge and classifier")
    data: NLVR2DataConfig = opt(NLVR2DataConfig, "NLVR2 data")


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
    state = ckpt["model"]
    if is_nlvr2_state(state):
        return load_state(model, state, source)
    expected = {"cross_right.": "right-image cross-attention: copied from the pre-trained cross-attention",
                "merge.": "new merge layer (initialised to the average)",
                "cls_head.": "new NLVR2 classifier"}
    report = load_state(model, state, source, prefix="base.", expected_missing=expected)
    model.init_right_from_left()
    return report


def build_model(run: Run, ckpt: Optional[dict]) -> NLVR2Model:
    model = NLVR2Model(run.cfg.model, run.cfg.head)
    if ckpt is not None:
        show_report(run, load_nlvr2_weights(model, ckpt, str(run.checkpoint)), f"checkpoint {run.checkpoint}")
    elif init_encoders(run, model.base):
        model.init_right_from_left()
    return model


# ---------------------------------------------------------------------- data and training
def load_data(run: Run) -> ClassifierData:
    return classify_data.load_data(run, NLVR2Dataset, DATA_HINT)


def train_data(run: Run, data: ClassifierData) -> SampledTrainData:
    return classify_data.train_data(run, data, NLVR2Collator)


def train_step(run: Run, model: NLVR2Model, batch: dict, state: TrainState) -> dict:
    logits = model(batch["image_left"], batch["image_right"], batch["input_ids"], batch["attention_mask"])
    return classifier_step(logits, batch["label"])


def describe(run: Run, data: ClassifierData, model: NLVR2Model) -> Optional[str]:
    return describe_classifier(run, data, model, "NLVR2", "pairs", f"merge={run.cfg.head.merge}, ")


SPEC = TaskSpec(
    name="nlvr2", title="NLVR2", config_cls=NLVR2Config, files=classify_data.annotation_files, files_hint=DATA_HINT,
    data=load_data, texts=lambda data: list(data.train.sentences), build_model=build_model, train_data=train_data,
    train_step=train_step, evaluator=NLVR2RunEvaluator, metric=lambda cfg: ("dev_acc", "accuracy"),
    best_key="best_dev_acc", val_split="dev", task_part="NLVR2 classifier", is_task_state=is_nlvr2_state,
    describe=describe, predictor=predict.NLVR2)


def run(cfg: NLVR2Config, checkpoint: Optional[str] = None, evaluate: bool = False,
        resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Fine-tune (or with ``evaluate`` only evaluate) NLVR2 (``tasks/finetune.py``); returns the results dict."""
    return finetune.run(SPEC, cfg, "evaluate" if evaluate else "finetune", checkpoint, resume, overwrite)


def main(args) -> int:
    """``run_finetune.py --task nlvr2 | nlvr2_shapes``."""
    return finetune.main(SPEC, args)


__all__ = ["NLVR2Config", "NLVR2DataConfig", "SPEC", "load_nlvr2_weights", "build_model", "run", "main"]
