"""Generative VQA (ALBEF): fine-tune the fusion encoder + answer decoder, rank or generate answers.

    python run_finetune.py --task vqa_shapes --checkpoint output/demo_pretrain/checkpoint_last.pth
    python run_finetune.py --task vqa --checkpoint output/pretrain/checkpoint_best.pth
    python run_finetune.py --task vqa --checkpoint output/vqa/checkpoint_last.pth --evaluate
    torchrun --nproc_per_node=8 run_finetune.py --task vqa --checkpoint CKPT

Protocol (ALBEF's): train with the answer-weighted LM loss on the training questions (VQA v2
train + val and Visual Genome QA at paper scale, ``dataset: vg`` records weighted by
``loss.vg_answer_weight``); predict by ranking the closed answer list (``eval.inference: rank``:
``eval.k_test`` candidates pre-selected by the decoder's first-token probability, re-ranked by
the full answer likelihood) or by open generation (``eval.inference: generate``). Splits with
answers are scored with the official VQA accuracy (``tasks/vqa_metrics.py``: answer
normalisation, min(1, matches / 3) averaged over the 10 leave-one-annotator-out subsets), overall
and per answer type. VQA v2 test-dev / test-std have no public answers: the written
``vqa_test_result.json`` ``[{"question_id", "answer"}]`` is what the evaluation server
(EvalAI) takes. With a val split the checkpoint with the best val accuracy is tested, else the
last one (ALBEF trains on train + val and submits the last epoch).

Written to ``train.output_dir``: ``vqa_{val,test}_result.json`` and ``results.json`` (accuracies in
%, inference settings, checkpoint, protocol).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Optional

from datasets.transforms import TransformConfig, build_transform, decode_min_side
from datasets.vqa_data import (VQA_HINT, VQAEvalDataset, VQATrainCollator, VQATrainDataset, extend_tokenizer,
                               read_answer_list, read_vqa)
from engine.config import opt
from engine.trainer import TrainState
from models.decoder import DecoderConfig, GenerationConfig
from models.vqa import VQAModel, pad_vocab_rows
from tasks import finetune
from tasks.finetune_config import FinetuneConfig
from tasks.spec import Run, TaskSpec, init_encoders, load_weights, show_report
from tasks.train_data import BadImageCheck, ImageChecks, SampledTrainData, require_fraction, require_positive
from tasks.vqa_eval import VQARunEvaluator, eval_sets

log = logging.getLogger("vqa")


# ---------------------------------------------------------------------- config
@dataclass
class VQADataConfig(ImageChecks):
    train_files: list[str] = opt(["data/vqa/vqa_train.json", "data/vqa/vqa_val.json", "data/vqa/vg_qa.json"],
                                 "training JSONs [{question_id, question, answer: [...], image, dataset}] (concatenated)")
    val_file: Optional[str] = opt(None, "a split with answers scored after every epoch (selects checkpoint_best.pth); null = none")
    test_file: Optional[str] = opt("data/vqa/vqa_test.json", "test questions (answers optional); the result JSON for the evaluation server is written for it")
    test_gt_file: Optional[str] = opt(None, "the test questions with answers, for local scoring (e.g. the shapes world's vqa_test_gt.json); null = none")
    answer_list: str = opt("data/vqa/answer_list.json", "JSON list of the candidate answers ranked at inference (ALBEF: 3,128)")
    image_root: str = opt("data/coco/images", "directory the 'image' paths of 'vqa' records are relative to")
    vg_image_root: Optional[str] = opt(None, "directory the 'image' paths of 'vg' records are relative to; null = image_root")
    max_words: int = opt(35, "questions are cut to this many words after cleaning (ALBEF's pre_question)")
    max_answer_tokens: int = opt(10, "answers are truncated to this many tokens ([CLS] and [SEP] included)")
    extend_vocab: bool = opt(True, "add characters of the questions/answers that the (checkpoint's) vocabulary lacks, so no answer becomes [UNK]; new embedding rows start at N(0, 0.02)")
    transform: TransformConfig = opt(TransformConfig, "training image augmentation")
    num_workers: int = opt(4, "data-loading worker processes per process")
    eval_batch_size: int = opt(32, "questions per evaluation batch (per process)")

    def validate(self) -> None:
        super().validate()
        require_positive("data.eval_batch_size", self.eval_batch_size)
        if self.max_answer_tokens < 3:
            raise ValueError(f"data.max_answer_tokens must be >= 3 ([CLS], a token, [SEP]); got {self.max_answer_tokens}")


@dataclass
class VQALossConfig:
    vg_answer_weight: float = opt(0.5, "weight of a Visual Genome answer (ALBEF: 0.5); VQA answers weigh their share of the annotators")
    label_smoothing: float = opt(0.0, "label smoothing of the answer LM loss (ALBEF: none)")

    def validate(self) -> None:
        require_fraction("loss.label_smoothing", self.label_smoothing)


@dataclass
class VQAEvalConfig:
    inference: Literal["rank", "generate"] = opt("rank", "rank: choose from data.answer_list (ALBEF); generate: open-ended answers (generation section)")
    k_test: int = opt(128, "rank: answers pre-selected by the first-token probability, then re-ranked by the full likelihood (ALBEF: 128)")
    rank_chunk: int = opt(2048, "rank: candidate answers scored per decoder pass (bounds memory)")
    suppress_tokens: list[str] = opt(["[PAD]", "[CLS]", "[MASK]", "[UNK]"], "generate: tokens never generated")

    def validate(self) -> None:
        if self.k_test < 1 or self.rank_chunk < 1:
            raise ValueError("eval.k_test and eval.rank_chunk must be >= 1")


@dataclass
class AnswerGenerationConfig(GenerationConfig):
    """Generation settings with defaults for short answers."""

    max_length: int = opt(8, "most tokens generated for an answer, EOS included")
    min_length: int = opt(1, "EOS is forbidden before this many answer tokens were generated")


@dataclass
class VQAConfig(FinetuneConfig):
    decoder: DecoderConfig = opt(DecoderConfig, "answer decoder and its initialisation from the base model")
    generation: AnswerGenerationConfig = opt(AnswerGenerationConfig, "open answer generation (eval.inference=generate)")
    data: VQADataConfig = opt(VQADataConfig, "VQA data")
    loss: VQALossConfig = opt(VQALossConfig, "answer LM loss")
    eval: VQAEvalConfig = opt(VQAEvalConfig, "inference")


# ---------------------------------------------------------------------- data
@dataclass
class VQAData:
    answer_list: list[str]
    train: Optional[VQATrainDataset]  # fine-tuning only
    eval_sets: dict[str, VQAEvalDataset]


def annotation_files(cfg: VQAConfig, training: bool) -> list[str]:
    d = cfg.data
    return ((list(d.train_files) if training else []) + [f for f in (d.val_file, d.test_file, d.test_gt_file) if f]
            + [d.answer_list])


def load_data(run: Run) -> VQAData:
    cfg, d = run.cfg, run.cfg.data
    img = cfg.model.vision.img_size
    train = None
    if run.training:
        train = VQATrainDataset(read_vqa(d.train_files, require_answers=True), d.image_root,
                                build_transform(img, True, d.transform), d.max_words, cfg.train.seed,
                                cfg.loss.vg_answer_weight, d.vg_image_root, d.max_bad_fraction, d.max_image_pixels,
                                decode_min_side(img, True, d.transform))
    return VQAData(read_answer_list(d.answer_list), train, eval_sets(cfg))


def adapt_tokenizer(run: Run, data: VQAData, tokenizer, source: Optional[dict]):
    """A pre-training checkpoint's tokenizer extended by the pieces the questions and answers need
    (``data.extend_vocab``), so that no answer becomes [UNK]."""
    d = run.cfg.data
    if d.extend_vocab and source is not None and not is_vqa_state(source["model"]):
        texts = data.answer_list + (data.train.texts() if data.train else []) + [
            q for s in data.eval_sets.values() for q in s.questions]
        tokenizer, added = extend_tokenizer(tokenizer, texts)
        if added and run.dist.is_main:
            print(f"vocabulary extended by {len(added)} pieces the checkpoint's tokenizer lacks: {added[:20]}"
                  f"{' ...' if len(added) > 20 else ''} (new embedding rows start at N(0, 0.02))", flush=True)
    unk = [a for a in data.answer_list if tokenizer.unk_token_id in tokenizer(a)["input_ids"]]
    if unk and run.dist.is_main:
        log.warning("%d answers of %s contain [UNK] tokens (first: %s); set data.extend_vocab=true",
                    len(unk), d.answer_list, unk[:5])
    return tokenizer


# ---------------------------------------------------------------------- model and training
def is_vqa_state(state: dict) -> bool:
    """True for a fine-tuned VQA state dict (it has the answer decoder)."""
    return any(k.startswith("decoder.") for k in state)


def build_model(run: Run, ckpt: Optional[dict]) -> VQAModel:
    """A VQA model from a fine-tuned VQA checkpoint (loaded as it is), a pre-training checkpoint
    (into ``model.base``; the decoder initialised from it), or from scratch. Vocabulary-sized
    tensors are extended first when the tokenizer was extended."""
    cfg = run.cfg
    model = VQAModel(cfg.model, cfg.decoder)
    if ckpt is None:
        init_encoders(run, model.base)
    else:
        state = dict(ckpt["model"])
        resized = tuple(pad_vocab_rows(state, cfg.model.text.vocab_size))
        if is_vqa_state(state):
            load_weights(run, model, state, resized=resized)
            return model
        load_weights(run, model, state, prefix="base.", resized=resized,
                     expected_missing={"decoder.": "answer decoder: initialised from the base model"})
    show_report(run, model.init_decoder_from_base(),
                f"decoder initialised from the base model ({cfg.decoder.init_from})")
    return model


def train_data(run: Run, data: VQAData) -> SampledTrainData:
    cfg = run.cfg
    collator = VQATrainCollator(run.tokenizer, cfg.tokenizer.max_length, cfg.data.max_answer_tokens)
    return SampledTrainData(data.train, collator, cfg.train, run.dist, cfg.data.num_workers,
                            BadImageCheck.from_data(cfg.data, "question_ids", data.train.num_images))


def train_step(run: Run, model: VQAModel, batch: dict, state: TrainState) -> dict:
    loss = model(batch["image"], batch["question_ids"], batch["question_mask"], batch["answer_ids"],
                 batch["answer_mask"], batch["weights"], batch["n_answers"], run.cfg.loss.label_smoothing)
    return {"loss": loss, "_pairs": batch["question_ids"].shape[0]}


def describe(run: Run, data: VQAData, model: VQAModel) -> Optional[str]:
    if not run.training:
        return None
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_vg = sum(r["dataset"] == "vg" for r in data.train.records)
    return (f"VQA fine-tuning: {len(data.train)} training questions ({n_vg} from VG), "
            + ", ".join(f"{len(v)} {k}" for k, v in data.eval_sets.items())
            + f"; {len(data.answer_list)} candidate answers; {n_params / 1e6:.2f}M trainable parameters, decoder "
            f"{model.decoder.num_layers} layers (init {run.cfg.decoder.init_from}); {run.dist.world_size} process(es) on "
            f"{run.dist.device}, output in {run.out_dir}")


SPEC = TaskSpec(
    name="vqa", title="VQA", config_cls=VQAConfig, files=annotation_files,
    files_hint=VQA_HINT + " The synthetic VQA demo: python run_finetune.py --task vqa_shapes.",
    data=load_data, texts=lambda data: data.train.texts() + data.answer_list, build_model=build_model,
    train_data=train_data, train_step=train_step, evaluator=VQARunEvaluator, metric=lambda cfg: ("overall", "accuracy"),
    best_key="best_val_accuracy", task_part="answer decoder", is_task_state=is_vqa_state,
    adapt_tokenizer=adapt_tokenizer, describe=describe)


def run(cfg: VQAConfig, checkpoint: Optional[str] = None, evaluate: bool = False,
        resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Fine-tune (or with ``evaluate`` only evaluate) VQA (``tasks/finetune.py``); returns the results dict."""
    return finetune.run(SPEC, cfg, "evaluate" if evaluate else "finetune", checkpoint, resume, overwrite)


def main(args) -> int:
    """``run_finetune.py --task vqa | vqa_shapes``."""
    return finetune.main(SPEC, args)


__all__ = ["VQAConfig", "VQADataConfig", "VQALossConfig", "VQAEvalConfig", "SPEC", "build_model", "run", "main"]
