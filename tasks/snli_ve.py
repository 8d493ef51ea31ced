"""SNLI-VE fine-tuning and evaluation: does the image entail, leave open, or contradict the sentence?

    python run_finetune.py --task snli_ve_shapes --checkpoint output/demo_pretrain/checkpoint_last.pth
    python run_finetune.py --task snli_ve --checkpoint output/pretrain/checkpoint_best.pth
    python run_finetune.py --task snli_ve --checkpoint output/snli_ve/checkpoint_best.pth --evaluate
    python run_finetune.py --task snli_ve --checkpoint output/snli_ve/checkpoint_best.pth --predict IMAGE:SENTENCE
    torchrun --nproc_per_node=8 run_finetune.py --task snli_ve --checkpoint CKPT

Protocol (ALBEF's ``VE.py``): cross-entropy on a 3-way classifier over the fused [CLS]
(``models/snli_ve.py``); after every epoch the dev accuracy is computed and the best one kept
(``checkpoint_best.pth``); at the end the best-dev checkpoint is evaluated on dev and test. Written to
``train.output_dir``: ``results.json`` (accuracy overall and by class, the confusion matrix, the
checkpoint and the protocol) and ``predictions_{dev,test}.json`` (one record per example: prediction,
the three probabilities, label).

Difference from ALBEF: no momentum distillation (ALBEF: ``distill: True``, alpha 0.4); no task of
this project distils while fine-tuning. ALBEF's other settings are ``configs/snli_ve.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


from datasets.snli_ve_data import SNLIVECollator, SNLIVEDataset
from datasets.transforms import TransformConfig
from engine.config import opt
from engine.trainer import TrainState
from models.loading import LoadReport
from models.snli_ve import NUM_CLASSES, VEHeadConfig, VEModel
from tasks import classify_data, finetune, predict
from tasks.classify_data import ClassifierData
from tasks.classify_eval import classifier_step, describe_classifier
from tasks.finetune_config import FinetuneConfig
from tasks.snli_ve_eval import DATA_HINT, SNLIVERunEvaluator
from tasks.spec import Run, TaskSpec, init_encoders, load_state, show_report
from tasks.train_data import SampledTrainData, require_positive


@dataclass
class SNLIVEDataConfig:
    train_files: list[str] = opt(["data/snli_ve/ve_train.json"], "training annotation JSONs [{image, sentence, label: entailment | neutral | contradiction}]")
    dev_files: list[str] = opt(["data/snli_ve/ve_dev.json"], "dev annotation JSONs (checkpoint selection); [] = none (the last checkpoint is evaluated)")
    test_files: list[str] = opt(["data/snli_ve/ve_test.json"], "test annotation JSONs; [] = none")
    image_root: str = opt("data/images/flickr30k/flickr30k-images", "directory the 'image' names are relative to (a name without an extension gets .jpg, ALBEF's Flickr30K ids)")
    max_words: int = opt(30, "sentences are cut to this many words after cleaning")
    clean_style: Literal["albef", "blip"] = opt("albef", "sentence cleaning rules")
    transform: TransformConfig = opt(TransformConfig, "training image augmentation")
    num_workers: int = opt(4, "data-loading worker processes per process")
    eval_batch_size: int = opt(64, "examples per evaluation batch (per process)")

    def validate(self) -> None:
        require_positive("data.eval_batch_size", self.eval_batch_size)


@dataclass
class SNLIVEConfig(FinetuneConfig):
    head: VEHeadConfig = opt(VEHeadConfig, "SNLI-VE head: the 3-way classifier on the fused [CLS]")
    data: SNLIVEDataConfig = opt(SNLIVEDataConfig, "SNLI-VE data")


# ---------------------------------------------------------------------- checkpoint loading
def is_snli_ve_state(state: dict) -> bool:
    """True for a fine-tuned SNLI-VE state dict (a 3-way classifier on the base model), False otherwise."""
    w = state.get("cls_head.2.weight")
    return w is not None and w.shape[0] == NUM_CLASSES


def load_snli_ve_weights(model: VEModel, ckpt: dict, source: str) -> LoadReport:
    """A fine-tuned SNLI-VE checkpoint loads as it is; a pre-training one (``VLPModel`` keys) into
    ``model.base``, the classifier new."""
    state = ckpt["model"]
    if is_snli_ve_state(state):
        return load_state(model, state, source)
    return load_state(model, state, source, prefix="base.", expected_missing={"cls_head.": "new SNLI-VE classifier"})


def build_model(run: Run, ckpt: Optional[dict]) -> VEModel:
    model = VEModel(run.cfg.model, run.cfg.head)
    if ckpt is not None:
        show_report(run, load_snli_ve_weights(model, ckpt, str(run.checkpoint)), f"checkpoint {run.checkpoint}")
    else:
        init_encoders(run, model.base)
    return model


# ---------------------------------------------------------------------- data and training
def load_data(run: Run) -> ClassifierData:
    return classify_data.load_data(run, SNLIVEDataset, DATA_HINT)


def train_data(run: Run, data: ClassifierData) -> SampledTrainData:
    return classify_data.train_data(run, data, SNLIVECollator)


def train_step(run: Run, model: VEModel, batch: dict, state: TrainState) -> dict:
    return classifier_step(model(batch["image"], batch["input_ids"], batch["attention_mask"]), batch["label"])


def describe(run: Run, data: ClassifierData, model: VEModel) -> Optional[str]:
    return describe_classifier(run, data, model, "SNLI-VE", "examples")


SPEC = TaskSpec(
    name="snli_ve", title="SNLI-VE", config_cls=SNLIVEConfig, files=classify_data.annotation_files, files_hint=DATA_HINT,
    data=load_data, texts=lambda data: list(data.train.sentences), build_model=build_model, train_data=train_data,
    train_step=train_step, evaluator=SNLIVERunEvaluator, metric=lambda cfg: ("dev_acc", "accuracy"),
    best_key="best_dev_acc", val_split="dev", task_part="SNLI-VE classifier", is_task_state=is_snli_ve_state,
    describe=describe, predictor=predict.SNLI_VE)


def run(cfg: SNLIVEConfig, checkpoint: Optional[str] = None, evaluate: bool = False,
        resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Fine-tune (or with ``evaluate`` only evaluate) SNLI-VE (``tasks/finetune.py``); returns the results dict."""
    return finetune.run(SPEC, cfg, "evaluate" if evaluate else "finetune", checkpoint, resume, overwrite)


def main(args) -> int:
    """``run_finetune.py --task snli_ve | snli_ve_shapes``."""
    return finetune.main(SPEC, args)


__all__ = ["SNLIVEConfig", "SNLIVEDataConfig", "SPEC", "is_snli_ve_state", "load_snli_ve_weights", "build_model",
           "run", "main"]
