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
from pathlib import Path
from typing import Literal, Optional

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from datasets.text import tokenizer_state
from datasets.formats import DEFAULT_MAX_IMAGE_PIXELS, DataError
from datasets.transforms import TransformConfig, build_transform, decode_min_side
from datasets.vqa_data import (VQA_HINT, VQAEvalCollator, VQAEvalDataset, VQATrainCollator, VQATrainDataset,
                               extend_tokenizer, read_answer_list, read_vqa, tokenize_answers)
from engine import distributed as D
from engine.checkpoint import find_resume, load_checkpoint
from engine.config import ConfigError, load_config, opt, save_config, to_dict
from engine.loader import SafeDataLoader
from engine.trainer import OptimConfig, ScheduleConfig, TrainConfig, TrainState
from models.decoder import DecoderConfig, GenerationConfig, decode_texts
from models.vqa import VQAModel, pad_vocab_rows
from models.vlp import VLPConfig
from models.loading import load_checkpoint_into, load_encoder_weights
from tasks.caption import token_ids
from tasks.common import (BadImageCheck, SampledTrainData, SampledTrainTask, TokenizerConfig, autocast_for,
                          build_trainer, load_selected_checkpoint, make_tokenizer, print_reports, require_files,
                          with_vocab, require_fraction, require_image_root, require_positive, start_run, to_device, validate_image_data,
                          write_json)
from engine.rundir import OutputDir
from tasks.resume import check_resume_config
from tasks.vqa_metrics import evaluate_vqa

log = logging.getLogger("vqa")

PROTOCOL = ("VQA: fine-tuned with ALBEF's answer-weighted LM loss; answers {how}; accuracy = official VQA "
            "accuracy (tasks/vqa_metrics.py) in %, only for splits with answers (VQA v2 test-dev/test-std: "
            "submit vqa_test_result.json to the evaluation server)")


# ---------------------------------------------------------------------- config
@dataclass
class VQADataConfig:
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
    max_bad_fraction: float = opt(0.01, "stop when more than this fraction of the training images tried are distinct images that fail to load (an unreadable image is replaced by a random other record and counted once; logged as data/bad_images)")
    bad_check_after: int = opt(500, "training images tried before the bad-image fraction is checked (bad images beyond max_bad_fraction of the whole training set stop the run at once)")
    max_image_pixels: Optional[int] = opt(DEFAULT_MAX_IMAGE_PIXELS, "an image that would decode to more pixels is skipped and counted as bad (a JPEG much larger than the training crop is first decoded reduced, 1/2 to 1/8, which counts); default: PIL's decompression-bomb warning limit; PIL itself refuses twice as many; null = no bound of ours")

    def validate(self) -> None:
        require_positive("data.eval_batch_size", self.eval_batch_size)
        validate_image_data(self)
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
class VQAConfig:
    model: VLPConfig = opt(VLPConfig, "base model (must match the checkpoint's; vision.img_size may differ: position embeddings are interpolated)")
    decoder: DecoderConfig = opt(DecoderConfig, "answer decoder and its initialisation from the base model")
    generation: AnswerGenerationConfig = opt(AnswerGenerationConfig, "open answer generation (eval.inference=generate)")
    tokenizer: TokenizerConfig = opt(TokenizerConfig, "tokenizer (a checkpoint's own tokenizer takes precedence); max_length bounds questions")
    data: VQADataConfig = opt(VQADataConfig, "VQA data")
    loss: VQALossConfig = opt(VQALossConfig, "answer LM loss")
    eval: VQAEvalConfig = opt(VQAEvalConfig, "inference")
    optim: OptimConfig = opt(OptimConfig, "optimiser")
    schedule: ScheduleConfig = opt(ScheduleConfig, "learning-rate schedule")
    train: TrainConfig = opt(TrainConfig, "training loop")


CONFIG_CLASS = VQAConfig


# ---------------------------------------------------------------------- prediction
class VQAPredictor:
    """Answers for the questions of a dataset (batched, split over processes, gathered to all)."""

    def __init__(self, cfg: VQAConfig, tokenizer, answer_list: list[str], dist: D.DistInfo) -> None:
        self.cfg, self.tokenizer, self.answer_list, self.dist = cfg, tokenizer, answer_list, dist
        self.collator = VQAEvalCollator(tokenizer, cfg.tokenizer.max_length)
        ids, mask = tokenize_answers(tokenizer, answer_list, cfg.data.max_answer_tokens)
        self.answer_ids, self.answer_mask = ids.to(dist.device), mask.to(dist.device)
        self.suppress = token_ids(tokenizer, cfg.eval.suppress_tokens)
        self.autocast = autocast_for(cfg.train.precision, dist.device)

    @torch.no_grad()
    def predict(self, model: VQAModel, dataset: VQAEvalDataset, desc: str = "vqa") -> dict[int, str]:
        """``{question_id: answer}`` for every question of ``dataset`` (on every process)."""
        dist, e = self.dist, self.cfg.eval
        was_training = model.training
        model.eval()
        indices = list(range(dist.rank, len(dataset), dist.world_size))
        loader = SafeDataLoader(Subset(dataset, indices), batch_size=self.cfg.data.eval_batch_size, shuffle=False,
                                collate_fn=self.collator, num_workers=min(self.cfg.data.num_workers, 2),
                                pin_memory=dist.device.type == "cuda")
        local: list[tuple[int, str]] = []
        for batch in tqdm(loader, desc=desc, disable=not (self.cfg.train.progress and dist.is_main),
                          dynamic_ncols=True, leave=False):
            b = to_device(batch, dist.device)
            with self.autocast():
                fused = model.encode(b["image"], b["question_ids"], b["question_mask"])
                if e.inference == "rank":
                    idx, _ = model.rank_answers(fused, b["question_mask"], self.answer_ids, self.answer_mask,
                                                e.k_test, e.rank_chunk)
                    answers = [self.answer_list[int(i)] for i in idx[:, 0]]
                else:
                    out = model.generate(fused, b["question_mask"], self.tokenizer.cls_token_id, self.cfg.generation,
                                         self.tokenizer.sep_token_id, self.tokenizer.pad_token_id, self.suppress)
                    answers = decode_texts(self.tokenizer, out)
            local.extend(zip(batch["qid"].tolist(), answers))
        model.train(was_training)
        result: dict[int, str] = {}
        for part in D.all_gather_object(local):
            result.update(part)
        if len(result) != len(dataset):
            raise RuntimeError(f"prediction covered {len(result)} of {len(dataset)} questions (repeated question ids?)")
        return result


def result_records(preds: dict[int, str]) -> list[dict]:
    """The evaluation-server format ``[{"question_id": int, "answer": str}]`` sorted by question id."""
    return [{"question_id": q, "answer": preds[q]} for q in sorted(preds)]


# ---------------------------------------------------------------------- the task
class VQATask(SampledTrainTask):
    """Data + answer-weighted LM step + val accuracy for the trainer (see ``engine.trainer.Task``)."""

    def __init__(self, cfg: VQAConfig, dist: D.DistInfo, dataset: VQATrainDataset, tokenizer,
                 predictor: VQAPredictor, val: Optional[VQAEvalDataset]) -> None:
        self.cfg, self.dist, self.dataset, self.tokenizer = cfg, dist, dataset, tokenizer
        self.predictor, self.val = predictor, val
        self.collator = VQATrainCollator(tokenizer, cfg.tokenizer.max_length, cfg.data.max_answer_tokens)
        self.train_data = SampledTrainData(dataset, self.collator, cfg.train, dist, cfg.data.num_workers,
                                           BadImageCheck.from_data(cfg.data, "question_ids", dataset.num_images))

    def train_step(self, model, batch: dict, state: TrainState) -> dict:
        loss = model(batch["image"], batch["question_ids"], batch["question_mask"], batch["answer_ids"],
                     batch["answer_mask"], batch["weights"], batch["n_answers"], self.cfg.loss.label_smoothing)
        return {"loss": loss, "_pairs": batch["question_ids"].shape[0]}

    def evaluate(self, model, epoch: int) -> Optional[dict]:
        if self.val is None:
            return None
        preds = self.predictor.predict(model, self.val, desc=f"val (epoch {epoch})")
        acc = evaluate_vqa(preds, self.val.records)
        metrics = {"overall": acc["overall"], **{f"acc_{t}": v for t, v in acc["per_answer_type"].items()}}
        if self.dist.is_main:
            print(f"epoch {epoch}: val VQA accuracy {acc['overall']:.2f}% ("
                  + ", ".join(f"{t} {v:.2f}" for t, v in acc["per_answer_type"].items()) + ")", flush=True)
        return metrics

    def checkpoint_extra(self) -> dict:
        return {"tokenizer": tokenizer_state(self.tokenizer), "task": "vqa"}


# ---------------------------------------------------------------------- building a run
def is_vqa_state(state: dict) -> bool:
    """True for a fine-tuned VQA state dict (it has the answer decoder)."""
    return any(k.startswith("decoder.") for k in state)


def load_weights(model: VQAModel, ckpt: dict, source: str) -> list:
    """Load a fine-tuned VQA checkpoint as it is, or a pre-training checkpoint into ``model.base``
    (momentum encoders and queues ignored with that reason) and initialise the decoder from it.
    Vocabulary-sized tensors are extended first when the tokenizer was extended. Returns the reports."""
    state = dict(ckpt["model"])
    extended = pad_vocab_rows(state, model.cfg.text.vocab_size)
    if is_vqa_state(state):
        reports = [load_checkpoint_into(model, {**ckpt, "model": state}, source=source)]
    else:
        reports = [load_checkpoint_into(model, {**ckpt, "model": state}, source=source, prefix="base.",
                                        expected_missing={"decoder.": "answer decoder: initialised from the base model"}),
                   model.init_decoder_from_base()]
        reports[1].source = f"the answer decoder initialised from {source}"
    if extended:
        reports[0].interpolated.extend(k for k in extended if k in reports[0].loaded or "base." + k in reports[0].loaded)
    return reports


def build_model(cfg: VQAConfig, ckpt: Optional[dict], path: Optional[str], dist: D.DistInfo,
                warn_scratch: bool = True) -> VQAModel:
    """A VQA model from a fine-tuned VQA checkpoint, a pre-training checkpoint, or from scratch."""
    model = VQAModel(cfg.model, cfg.decoder)
    if ckpt is not None:
        for r in print_reports(dist, load_weights(model, ckpt, str(path)), str(path)):
            r.raise_if_unexpected()
        return model
    print_reports(dist, load_encoder_weights(model.base))
    r = model.init_decoder_from_base()
    if dist.is_main:
        print(f"decoder initialised from the base model ({cfg.decoder.init_from}): {r.summary()}", flush=True)
        if warn_scratch:
            log.warning("no --checkpoint: fine-tuning a model that was not pre-trained on image-text pairs")
    return model


def _eval_sets(cfg: VQAConfig) -> dict[str, VQAEvalDataset]:
    d = cfg.data
    tf = build_transform(cfg.model.vision.img_size, False, d.transform)
    out = {}
    if d.val_file:
        out["val"] = VQAEvalDataset(read_vqa(d.val_file, require_answers=True), d.image_root, tf, d.max_words,
                                    d.vg_image_root, d.max_image_pixels)
    if d.test_file:
        records = read_vqa(d.test_file, require_answers=False)
        if d.test_gt_file:
            gt = {r["question_id"]: r for r in read_vqa(d.test_gt_file, require_answers=True)}
            missing = [r["question_id"] for r in records if r["question_id"] not in gt]
            if missing:
                raise DataError(f"{d.test_gt_file} has no answers for {len(missing)} test questions "
                                 f"(first ids: {missing[:5]})")
            for r in records:
                r["answer"] = gt[r["question_id"]]["answer"]
                r.setdefault("answer_type", gt[r["question_id"]].get("answer_type"))
        out["test"] = VQAEvalDataset(records, d.image_root, tf, d.max_words, d.vg_image_root, d.max_image_pixels)
    return out


def evaluate_and_write(model: VQAModel, predictor: VQAPredictor, sets: dict[str, VQAEvalDataset], cfg: VQAConfig,
                       dist: D.DistInfo, checkpoint: Optional[str], extra: Optional[dict] = None) -> dict:
    """Answer every split; write ``vqa_<split>_result.json``; score the splits with answers; the main
    process writes results.json and prints the accuracies. Returns the results dict."""
    out_dir = Path(cfg.train.output_dir)
    how = (f"ranked from {cfg.data.answer_list} ({len(predictor.answer_list)} answers, k_test {cfg.eval.k_test})"
           if cfg.eval.inference == "rank" else "generated (open-ended, see 'generation')")
    results: dict = {"task": "vqa", "checkpoint": checkpoint, "protocol": PROTOCOL.format(how=how),
                     "inference": cfg.eval.inference, "k_test": cfg.eval.k_test,
                     **({"generation": to_dict(cfg.generation)} if cfg.eval.inference == "generate" else {}),
                     **(extra or {}), "splits": {}}
    lines = []
    for split, ds in sets.items():
        preds = predictor.predict(model, ds, desc=split)
        path = out_dir / f"vqa_{split}_result.json"
        entry: dict = {"n_questions": len(ds), "result_file": str(path)}
        if all(r.get("answer") for r in ds.records):
            acc = evaluate_vqa(preds, ds.records)
            entry.update({"accuracy": acc["overall"], "per_answer_type": acc["per_answer_type"]})
            lines.append(f"  {split:5s} accuracy {acc['overall']:.2f}%  ("
                         + ", ".join(f"{t} {v:.2f}" for t, v in acc["per_answer_type"].items())
                         + f"; {len(ds)} questions)")
        else:
            lines.append(f"  {split:5s} {len(ds)} questions answered, no answers to score: submit {path} "
                         "to the evaluation server")
        results["splits"][split] = entry
        if dist.is_main:
            write_json(result_records(preds), path, indent=None)
    if dist.is_main:
        write_json(results, out_dir / "results.json")
        print(f"VQA results ({checkpoint or 'no checkpoint'}):\n" + "\n".join(lines)
              + f"\n  {results['protocol']}\n  written: {out_dir / 'results.json'}", flush=True)
    D.barrier()
    return results


def run(cfg: VQAConfig, checkpoint: Optional[str] = None, evaluate: bool = False,
        resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Fine-tune (or with ``evaluate`` only evaluate) VQA; returns the results dict. ``train.output_dir``
    is claimed for the run (``engine/rundir.py``: fine-tuning refuses another run's checkpoints unless
    ``resume`` or ``overwrite``; evaluation writes no checkpoint and is not refused because of one)."""
    with OutputDir(cfg.train.output_dir, training=not evaluate, resume=resume, overwrite=overwrite) as out:
        return _run(cfg, checkpoint, evaluate, resume, out)


def _run(cfg: VQAConfig, checkpoint: Optional[str], evaluate: bool, resume: Optional[str], out: OutputDir) -> dict:
    if evaluate and not checkpoint:
        raise ConfigError("--evaluate needs --checkpoint (a fine-tuned VQA checkpoint)")
    d = cfg.data
    dist = start_run(cfg.train, out)
    resume_ckpt = load_checkpoint(find_resume(resume)) if resume and not evaluate else None
    if resume_ckpt is not None:  # before anything is written
        check_resume_config(cfg, resume_ckpt, resume, "vqa", dist)
    require_files(([] if evaluate else list(d.train_files)) + [f for f in (d.val_file, d.test_file, d.test_gt_file) if f]
                  + [d.answer_list], "VQA annotation",
                  VQA_HINT + " The synthetic VQA demo: python run_finetune.py --task vqa_shapes.")
    require_image_root(d.image_root)
    ckpt = load_checkpoint(checkpoint) if checkpoint else None
    if evaluate and not is_vqa_state(ckpt["model"]):
        raise ConfigError(f"{checkpoint} has no answer decoder (it is a pre-training checkpoint): fine-tune it "
                          "first (run without --evaluate)")
    answer_list = read_answer_list(d.answer_list)
    train_set = None
    if not evaluate:
        train_set = VQATrainDataset(read_vqa(d.train_files, require_answers=True), d.image_root,
                                    build_transform(cfg.model.vision.img_size, True, d.transform), d.max_words,
                                    cfg.train.seed, cfg.loss.vg_answer_weight, d.vg_image_root, d.max_bad_fraction,
                                    d.max_image_pixels, decode_min_side(cfg.model.vision.img_size, True, d.transform))
    eval_sets = _eval_sets(cfg)
    tok_source = resume_ckpt or ckpt
    tokenizer = make_tokenizer(cfg.tokenizer, lambda: train_set.texts() + answer_list, tok_source)
    del resume_ckpt
    if d.extend_vocab and tok_source is not None and not is_vqa_state(tok_source["model"]):
        texts = answer_list + (train_set.texts() if train_set else []) + [q for s in eval_sets.values() for q in s.questions]
        tokenizer, added = extend_tokenizer(tokenizer, texts)
        if added and dist.is_main:
            print(f"vocabulary extended by {len(added)} pieces the checkpoint's tokenizer lacks: {added[:20]}"
                  f"{' ...' if len(added) > 20 else ''} (new embedding rows start at N(0, 0.02))", flush=True)
    unk = [a for a in answer_list if tokenizer.unk_token_id in tokenizer(a)["input_ids"]]
    if unk and dist.is_main:
        log.warning("%d answers of %s contain [UNK] tokens (first: %s); set data.extend_vocab=true",
                    len(unk), d.answer_list, unk[:5])
    cfg = with_vocab(cfg, tokenizer)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, ckpt, checkpoint, dist, warn_scratch=not resume)
    del ckpt
    model.to(dist.device)
    predictor = VQAPredictor(cfg, tokenizer, answer_list, dist)
    out_dir = Path(cfg.train.output_dir)

    if evaluate:
        return evaluate_and_write(model, predictor, eval_sets, cfg, dist, checkpoint, {"mode": "evaluate"})

    if dist.is_main:
        save_config(cfg, out_dir / "config.yaml")
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_vg = sum(r["dataset"] == "vg" for r in train_set.records)
        print(f"VQA fine-tuning: {len(train_set)} training questions ({n_vg} from VG), "
              + ", ".join(f"{len(v)} {k}" for k, v in eval_sets.items())
              + f"; {len(answer_list)} candidate answers; {n_params / 1e6:.2f}M trainable parameters, decoder "
              f"{model.decoder.num_layers} layers (init {cfg.decoder.init_from}); {dist.world_size} process(es) on "
              f"{dist.device}, output in {out_dir}", flush=True)
    torch.manual_seed(cfg.train.seed + dist.rank)
    trainer = build_trainer(cfg, model, dist)
    task = VQATask(cfg, dist, train_set, tokenizer, predictor, eval_sets.get("val"))
    state = trainer.fit(task, resume=resume, metric_key="overall")
    if state.global_step < state.total_steps:
        if dist.is_main:
            print("training stopped before the end: no test evaluation", flush=True)
        return {"stopped_at_step": state.global_step}
    chosen, final, is_best = load_selected_checkpoint(model, out_dir)
    extra = {"mode": "finetune", "from_checkpoint": checkpoint,
             "selected_by": "val accuracy" if is_best else "last checkpoint (no val split)",
             "selected_step": final["state"]["global_step"], "best_val_accuracy": state.best_metric}
    del final
    return evaluate_and_write(model, predictor, eval_sets, cfg, dist, str(chosen), extra)


def main(args) -> int:
    """``run_finetune.py --task vqa | vqa_shapes`` entry point."""
    if getattr(args, "zero_shot", False):
        raise ConfigError("VQA has no zero-shot protocol: the answer decoder is trained by fine-tuning")
    if getattr(args, "predict", None):
        raise ConfigError("--predict is for the caption tasks; VQA writes vqa_<split>_result.json")
    cfg = load_config(VQAConfig, args.config, args.set)
    result = run(cfg, checkpoint=args.checkpoint, evaluate=args.evaluate, resume=args.resume,
                 overwrite=getattr(args, "overwrite", False))
    return 0 if result else 1


__all__ = ["VQAConfig", "VQADataConfig", "VQALossConfig", "VQAEvalConfig", "VQATask", "VQAPredictor",
           "build_model", "run", "main", "result_records"]
