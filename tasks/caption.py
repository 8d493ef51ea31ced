"""Image captioning: fine-tune the image encoder + text decoder with the LM loss, generate, score.

    python run_finetune.py --task caption_shapes --checkpoint output/demo_pretrain/checkpoint_last.pth
    python run_finetune.py --task caption_coco --checkpoint output/pretrain/checkpoint_best.pth
    python run_finetune.py --task caption_coco --checkpoint output/caption_coco/checkpoint_best.pth --evaluate
    python run_finetune.py --task caption_coco --checkpoint output/caption_coco/checkpoint_best.pth \\
        --predict img1.jpg img2.png
    torchrun --nproc_per_node=8 run_finetune.py --task caption_coco --checkpoint CKPT

Protocol (BLIP's, the reference for this head; the SRCL paper reports no captioning): train on the
Karpathy train split with the LM loss (label smoothing 0.1) on ``prompt + caption`` with the
prompt ("a picture of ") excluded from the loss; after every epoch generate captions for the val
split (beam search, 3 beams, 5-20 tokens) and score them; the checkpoint with the best val
``eval.select_metric`` (CIDEr) is evaluated on test. Scores: BLEU-1..4, METEOR, ROUGE-L, CIDEr from
pycocoevalcap with the PTB tokenizer; SPICE only with local Stanford CoreNLP jars
(``eval.spice_models_dir``), otherwise reported as skipped with the reason.

Written to ``train.output_dir``: ``captions_{val,test}.json`` in the COCO results format
``[{"image_id", "caption", "image"}]`` (image ids: ``datasets/caption_data.py``) and ``results.json`` (metrics on pycocoevalcap's 0-1 scale and x100,
generation settings, checkpoint, protocol). ``--predict`` prints one caption per image file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Optional

from datasets.caption_data import CAPTION_HINT, CaptionSplit, CaptionTrainCollator
from datasets.formats import PretrainDataset
from datasets.transforms import TransformConfig, build_transform, decode_min_side
from engine.config import opt
from engine.trainer import TrainState
from models.caption import CaptionModel
from models.decoder import DecoderConfig, GenerationConfig
from models.vlp import VLPModel
from tasks import finetune
from tasks.caption_eval import METRIC_KEYS, METRICS
from tasks.caption_generate import CaptionRunEvaluator, check_image_files, load_splits, predict_captions
from tasks.finetune_config import FinetuneConfig
from tasks.spec import Predictor, Run, TaskSpec, init_encoders, load_weights, show_report
from tasks.train_data import BadImageCheck, ImageChecks, SampledTrainData, require_fraction, require_positive

log = logging.getLogger("caption")


# ---------------------------------------------------------------------- config
@dataclass
class CaptionDataConfig(ImageChecks):
    train_files: list[str] = opt(["data/coco/annotation/coco_karpathy_train.json"], "training JSONs [{image, caption, image_id}] (one record per caption)")
    val_file: Optional[str] = opt("data/coco/annotation/coco_karpathy_val.json", "val JSON [{image, caption: [...], image_id?}] for checkpoint selection; null = none (the last checkpoint is tested)")
    test_file: Optional[str] = opt("data/coco/annotation/coco_karpathy_test.json", "test JSON [{image, caption: [...], image_id?}] (records without an integer image_id are numbered by their order, see datasets/caption_data.py); null = none")
    val_gt_file: Optional[str] = opt(None, "COCO-format ground truth of val for scoring (BLIP's coco_karpathy_val_gt.json); null = the captions of val_file")
    test_gt_file: Optional[str] = opt(None, "COCO-format ground truth of test for scoring (BLIP's coco_karpathy_test_gt.json); null = the captions of test_file")
    image_root: str = opt("data/coco/images", "directory the 'image' paths are relative to")
    max_words: int = opt(30, "training captions are cut to this many words after cleaning")
    clean_style: Literal["albef", "blip"] = opt("albef", "caption cleaning rules (training captions)")
    prompt: str = opt("a picture of ", "text before every caption (BLIP); its tokens are excluded from the loss and removed from the output")
    transform: TransformConfig = opt(TransformConfig, "training image augmentation")
    num_workers: int = opt(4, "data-loading worker processes per process")
    eval_batch_size: int = opt(64, "images per generation batch (per process)")

    def validate(self) -> None:
        super().validate()
        require_positive("data.eval_batch_size", self.eval_batch_size)


@dataclass
class CaptionLossConfig:
    label_smoothing: float = opt(0.1, "label smoothing of the LM loss (BLIP: 0.1)")

    def validate(self) -> None:
        require_fraction("loss.label_smoothing", self.label_smoothing)


@dataclass
class CaptionEvalConfig:
    val_metrics: list[str] = opt(["bleu", "meteor", "rouge", "cider"], f"metrics computed on val after every epoch (of {', '.join(METRICS)})")
    test_metrics: list[str] = opt(["bleu", "meteor", "rouge", "cider", "spice"], "metrics computed on the final test (and val) evaluation")
    select_metric: str = opt("CIDEr", "val metric that selects checkpoint_best.pth (a key such as CIDEr, Bleu_4, METEOR)")
    spice_models_dir: Optional[str] = opt(None, "local directory with stanford-corenlp-3.6.0.jar and stanford-corenlp-3.6.0-models.jar; null = SPICE skipped (it would download them)")
    java_mem: str = opt("8G", "Java heap for SPICE")
    suppress_tokens: list[str] = opt(["[PAD]", "[CLS]", "[MASK]", "[UNK]"], "tokens never generated")

    def validate(self) -> None:
        for key in ("val_metrics", "test_metrics"):
            bad = [m for m in getattr(self, key) if m not in METRICS]
            if bad:
                raise ValueError(f"eval.{key}: unknown metric(s) {bad}; valid: {list(METRICS)}")
        produced = [k for m in self.val_metrics if m != "spice" for k in METRIC_KEYS[m]]
        if self.select_metric not in produced:
            raise ValueError(f"eval.select_metric={self.select_metric!r} is not computed on val; eval.val_metrics "
                             f"{self.val_metrics} give {produced}")


@dataclass
class CaptionConfig(FinetuneConfig):
    decoder: DecoderConfig = opt(DecoderConfig, "text decoder and its initialisation from the base model")
    generation: GenerationConfig = opt(GenerationConfig, "caption generation (beam search / nucleus sampling)")
    data: CaptionDataConfig = opt(CaptionDataConfig, "captioning data")
    loss: CaptionLossConfig = opt(CaptionLossConfig, "LM loss")
    eval: CaptionEvalConfig = opt(CaptionEvalConfig, "scoring and checkpoint selection")


# ---------------------------------------------------------------------- data
@dataclass
class CaptionData:
    train: Optional[PretrainDataset]  # fine-tuning only
    splits: dict[str, tuple[CaptionSplit, dict]]  # val / test with their scoring references
    prompt: str  # a new vocabulary is trained on the training captions and the prompt


def annotation_files(cfg: CaptionConfig, training: bool) -> list[str]:
    d = cfg.data
    return ((list(d.train_files) if training else [])
            + [f for f in (d.val_file, d.val_gt_file, d.test_file, d.test_gt_file) if f])


def load_data(run: Run) -> CaptionData:
    cfg, d = run.cfg, run.cfg.data
    img = cfg.model.vision.img_size
    train = None
    if run.training:
        train = PretrainDataset(d.train_files, d.image_root, build_transform(img, True, d.transform), d.max_words,
                                d.clean_style, cfg.train.seed, d.max_bad_fraction, hint=CAPTION_HINT,
                                max_image_pixels=d.max_image_pixels,
                                decode_min_side=decode_min_side(img, True, d.transform))
    return CaptionData(train, load_splits(cfg), d.prompt)


# ---------------------------------------------------------------------- model and training
def is_caption_state(state: dict) -> bool:
    """True for a fine-tuned caption model's state dict (it has the decoder)."""
    return any(k.startswith("decoder.") for k in state)


def build_model(run: Run, ckpt: Optional[dict]) -> CaptionModel:
    """A caption model from a fine-tuned caption checkpoint (loaded as it is), from a pre-training
    checkpoint (the decoder initialised from its text weights), or from scratch."""
    cfg = run.cfg
    if ckpt is not None and is_caption_state(ckpt["model"]):
        model = CaptionModel(cfg.model, cfg.decoder)
        load_weights(run, model, ckpt["model"])
        return model
    base = VLPModel(cfg.model)
    if ckpt is not None:
        load_weights(run, base, ckpt["model"])
    else:
        init_encoders(run, base)
    model, report = CaptionModel.from_base(base, cfg.decoder)
    show_report(run, report, f"decoder initialised from the base model ({cfg.decoder.init_from})")
    return model


def train_data(run: Run, data: CaptionData) -> SampledTrainData:
    cfg = run.cfg
    collator = CaptionTrainCollator(run.tokenizer, cfg.data.prompt, cfg.tokenizer.max_length)
    return SampledTrainData(data.train, collator, cfg.train, run.dist, cfg.data.num_workers,
                            BadImageCheck.from_data(cfg.data, "input_ids", len(data.train.image_ids)))


def train_step(run: Run, model: CaptionModel, batch: dict, state: TrainState) -> dict:
    loss = model(batch["image"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                 run.cfg.loss.label_smoothing)
    return {"loss": loss, "_pairs": batch["input_ids"].shape[0]}


def describe(run: Run, data: CaptionData, model: CaptionModel) -> Optional[str]:
    if not run.training:
        return None
    cfg = run.cfg
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"captioning fine-tuning: {len(data.train)} training captions, "
            + ", ".join(f"{len(s)} {k} images" for k, (s, _) in data.splits.items())
            + f"; {n_params / 1e6:.2f}M trainable parameters, decoder {model.decoder.num_layers} layers "
            f"(init {cfg.decoder.init_from}), prompt {cfg.data.prompt!r}, {run.dist.world_size} process(es) on "
            f"{run.dist.device}, output in {run.out_dir}")


PREDICTOR = Predictor(help="print {\"image\", \"caption\"} (JSON) for each image file with a fine-tuned --checkpoint",
                      metavar="IMAGE",
                      predict=predict_captions, check=check_image_files)

SPEC = TaskSpec(
    name="caption", title="captioning", config_cls=CaptionConfig, files=annotation_files,
    files_hint=CAPTION_HINT + " The synthetic captioning demo: python run_finetune.py --task caption_shapes.",
    data=load_data, texts=lambda data: data.train.all_captions() + [data.prompt],
    build_model=build_model, train_data=train_data, train_step=train_step, evaluator=CaptionRunEvaluator,
    metric=lambda cfg: (cfg.eval.select_metric, cfg.eval.select_metric), best_key="best_val",
    task_part="caption decoder", is_task_state=is_caption_state, describe=describe, predictor=PREDICTOR)


def run(cfg: CaptionConfig, checkpoint: Optional[str] = None, evaluate: bool = False,
        resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Fine-tune (or with ``evaluate`` only evaluate) captioning (``tasks/finetune.py``); returns the
    metrics per split."""
    return finetune.run(SPEC, cfg, "evaluate" if evaluate else "finetune", checkpoint, resume, overwrite)


def predict_files(cfg: CaptionConfig, checkpoint: str, files: list[str]) -> list[str]:
    """Captions for image files with a fine-tuned caption checkpoint (one process)."""
    return [r["caption"] for r in finetune.predict(SPEC, cfg, checkpoint, files)]


def main(args) -> int:
    """``run_finetune.py --task caption_coco | caption_shapes``."""
    return finetune.main(SPEC, args)


__all__ = ["CaptionConfig", "CaptionDataConfig", "CaptionEvalConfig", "CaptionLossConfig", "SPEC", "build_model",
           "run", "main", "predict_files"]
