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
``[{"image_id", "caption"}]`` and ``results.json`` (metrics on pycocoevalcap's 0-1 scale and x100,
generation settings, checkpoint, protocol). ``--predict`` prints one caption per image file.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from tqdm import tqdm

from datasets.caption_data import (CAPTION_HINT, CaptionSplit, CaptionTrainCollator, load_coco_references,
                                   read_caption_split)
from datasets.formats import PretrainDataset
from datasets.retrieval_data import ImageListDataset
from datasets.text import tokenizer_state
from datasets.formats import DEFAULT_MAX_IMAGE_PIXELS
from datasets.transforms import TransformConfig, build_transform, decode_min_side
from engine import distributed as D
from engine.checkpoint import find_resume, load_checkpoint
from engine.config import ConfigError, load_config, opt, save_config, to_dict
from engine.loader import SafeDataLoader
from engine.trainer import OptimConfig, ScheduleConfig, TrainConfig, TrainState
from models.caption import CaptionModel
from models.decoder import DecoderConfig, GenerationConfig, decode_texts
from models.loading import load_checkpoint_into, load_encoder_weights
from models.vlp import VLPConfig, VLPModel
from tasks.caption_eval import METRIC_KEYS, METRICS, CaptionScores, format_table, predictions_to_results, score_captions
from tasks.common import (BadImageCheck, SampledTrainData, SampledTrainTask, TokenizerConfig, autocast_for,
                          build_trainer, load_selected_checkpoint, make_tokenizer, print_reports, require_files,
                          with_vocab, require_fraction, require_image_root, require_positive, start_run, validate_image_data,
                          write_json)
from engine.rundir import OutputDir
from tasks.resume import check_resume_config

log = logging.getLogger("caption")

PROTOCOL = ("captioning: fine-tuned with the LM loss on the training captions (prompt excluded from the loss); "
            "the checkpoint with the best val {metric} is evaluated on test; beam search as configured under "
            "'generation'; pycocoevalcap metrics with the PTB tokenizer (0-1 scale, tables x100)")
NOT_USED_REASON = "base-model part not used by the task"


# ---------------------------------------------------------------------- config
@dataclass
class CaptionDataConfig:
    train_files: list[str] = opt(["data/coco/annotation/coco_karpathy_train.json"], "training JSONs [{image, caption, image_id}] (one record per caption)")
    val_file: Optional[str] = opt("data/coco/annotation/coco_karpathy_val.json", "val JSON [{image, caption: [...]}] for checkpoint selection; null = none (the last checkpoint is tested)")
    test_file: Optional[str] = opt("data/coco/annotation/coco_karpathy_test.json", "test JSON [{image, caption: [...]}]; null = none")
    val_gt_file: Optional[str] = opt("data/coco/annotation/coco_karpathy_val_gt.json", "COCO-format ground truth of val for scoring; null = the captions of val_file")
    test_gt_file: Optional[str] = opt("data/coco/annotation/coco_karpathy_test_gt.json", "COCO-format ground truth of test for scoring; null = the captions of test_file")
    image_root: str = opt("data/coco/images", "directory the 'image' paths are relative to")
    max_words: int = opt(30, "training captions are cut to this many words after cleaning")
    clean_style: Literal["albef", "blip"] = opt("albef", "caption cleaning rules (training captions)")
    prompt: str = opt("a picture of ", "text before every caption (BLIP); its tokens are excluded from the loss and removed from the output")
    transform: TransformConfig = opt(TransformConfig, "training image augmentation")
    num_workers: int = opt(4, "data-loading worker processes per process")
    eval_batch_size: int = opt(64, "images per generation batch (per process)")
    max_bad_fraction: float = opt(0.01, "stop when more than this fraction of the training images tried are distinct images that fail to load (an unreadable image is replaced by a random other record and counted once; logged as data/bad_images)")
    bad_check_after: int = opt(500, "training images tried before the bad-image fraction is checked (bad images beyond max_bad_fraction of the whole training set stop the run at once)")
    max_image_pixels: Optional[int] = opt(DEFAULT_MAX_IMAGE_PIXELS, "an image that would decode to more pixels is skipped and counted as bad (a JPEG much larger than the training crop is first decoded reduced, 1/2 to 1/8, which counts); default: PIL's decompression-bomb warning limit; PIL itself refuses twice as many; null = no bound of ours")

    def validate(self) -> None:
        require_positive("data.eval_batch_size", self.eval_batch_size)
        validate_image_data(self)


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
class CaptionConfig:
    model: VLPConfig = opt(VLPConfig, "base model (must match the checkpoint's; vision.img_size may differ: position embeddings are interpolated)")
    decoder: DecoderConfig = opt(DecoderConfig, "text decoder and its initialisation from the base model")
    generation: GenerationConfig = opt(GenerationConfig, "caption generation (beam search / nucleus sampling)")
    tokenizer: TokenizerConfig = opt(TokenizerConfig, "tokenizer (a checkpoint's own tokenizer takes precedence)")
    data: CaptionDataConfig = opt(CaptionDataConfig, "captioning data")
    loss: CaptionLossConfig = opt(CaptionLossConfig, "LM loss")
    eval: CaptionEvalConfig = opt(CaptionEvalConfig, "scoring and checkpoint selection")
    optim: OptimConfig = opt(OptimConfig, "optimiser")
    schedule: ScheduleConfig = opt(ScheduleConfig, "learning-rate schedule")
    train: TrainConfig = opt(TrainConfig, "training loop")


CONFIG_CLASS = CaptionConfig


# ---------------------------------------------------------------------- helpers shared with VQA
def load_base_model(cfg: VLPConfig, ckpt: Optional[dict], path: Optional[str], dist: D.DistInfo,
                    warn_scratch: bool = True) -> VLPModel:
    """A ``VLPModel`` (no momentum copy) from a pre-training checkpoint (ours, or ALBEF/BLIP names:
    ``models.loading.load_checkpoint_into``), or initialised from the local weight files named in
    ``cfg`` when there is no checkpoint. Prints the load report; unexplained problems raise."""
    base = VLPModel(cfg, momentum=False)
    if ckpt is not None:
        print_reports(dist, [load_checkpoint_into(base, ckpt, source=str(path))], f"checkpoint {path}")
        return base
    print_reports(dist, load_encoder_weights(base))
    if warn_scratch and dist.is_main:
        log.warning("no --checkpoint: fine-tuning a model that was not pre-trained on image-text pairs%s",
                    " (except the weight files named in model.*_weights)" if (cfg.vision_weights or cfg.text_weights) else "")
    return base


def token_ids(tokenizer, tokens: list[str]) -> list[int]:
    """Ids of the named special tokens that exist in the vocabulary."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in tokens if t in vocab]


# ---------------------------------------------------------------------- generation and scoring
def is_caption_state(state: dict) -> bool:
    """True for a fine-tuned caption model's state dict (it has the decoder)."""
    return any(k.startswith("decoder.") for k in state)


class CaptionGenerator:
    """Generates captions for image files (batched, split over processes, gathered to all)."""

    def __init__(self, cfg: CaptionConfig, tokenizer, dist: D.DistInfo) -> None:
        self.cfg, self.tokenizer, self.dist = cfg, tokenizer, dist
        self.transform = build_transform(cfg.model.vision.img_size, False, cfg.data.transform)
        ids = tokenizer(cfg.data.prompt, add_special_tokens=True)["input_ids"][:-1]  # [CLS] + prompt, no [SEP]
        if tokenizer.unk_token_id in ids:
            log.warning("the prompt %r has words outside the vocabulary ([UNK]); set data.prompt", cfg.data.prompt)
        self.prompt_ids = torch.tensor(ids, dtype=torch.long)
        self.suppress = token_ids(tokenizer, cfg.eval.suppress_tokens)
        self.autocast = autocast_for(cfg.train.precision, dist.device)

    @torch.no_grad()
    def captions(self, model: CaptionModel, files: list[str], source: str = "", desc: str = "generate") -> list[str]:
        """One caption per file, in order (every process returns all of them)."""
        dist, g = self.dist, self.cfg.generation
        was_training = model.training
        model.eval()
        mine = list(range(dist.rank, len(files), dist.world_size))
        ds = ImageListDataset([files[i] for i in mine], self.transform, source)
        loader = SafeDataLoader(ds, batch_size=self.cfg.data.eval_batch_size, shuffle=False, collate_fn=ImageListDataset.collate,
                                num_workers=min(self.cfg.data.num_workers, 2), pin_memory=dist.device.type == "cuda")
        gen = torch.Generator(device=dist.device).manual_seed(g.seed + dist.rank) if g.strategy == "nucleus" else None
        local: list[tuple[int, str]] = []
        prompt = self.prompt_ids.to(dist.device)
        for idx, images in tqdm(loader, desc=desc, disable=not (self.cfg.train.progress and dist.is_main),
                                dynamic_ncols=True, leave=False):
            with self.autocast():
                out = model.generate(images.to(dist.device), prompt, g, self.tokenizer.sep_token_id,
                                     self.tokenizer.pad_token_id, self.suppress, gen)
            texts = decode_texts(self.tokenizer, out)
            local.extend((mine[int(i)], t) for i, t in zip(idx, texts))
        model.train(was_training)
        result: dict[int, str] = {}
        for part in D.all_gather_object(local):
            result.update(part)
        return [result[i] for i in range(len(files))]


def references_for(split: CaptionSplit, gt_file: Optional[str]) -> dict[int, list[str]]:
    """The scoring references: the COCO ground-truth file when given (restricted to the split's
    images, all of which it must cover), else the split file's own captions."""
    if gt_file is None:
        empty = [i for i, r in split.references.items() if not r]
        if empty:
            raise ValueError(f"{split.source}: {len(empty)} images have no reference captions (first ids: "
                             f"{empty[:5]}); add captions or set the ground-truth file")
        return split.references
    refs = load_coco_references(gt_file)
    missing = [i for i in split.image_ids if i not in refs]
    if missing:
        raise ValueError(f"ground truth {gt_file} has no captions for {len(missing)} images of {split.source} "
                         f"(first ids: {missing[:5]}); the image ids must match")
    return {i: refs[i] for i in split.image_ids}


def evaluate_split(model: CaptionModel, generator: CaptionGenerator, split: CaptionSplit,
                   refs: dict[int, list[str]], metrics: list[str], cfg: CaptionConfig, dist: D.DistInfo,
                   name: str) -> tuple[Optional[CaptionScores], list[dict]]:
    """Generate captions for ``split`` and score them (main process; others get None)."""
    caps = generator.captions(model, split.image_files, split.source, desc=f"captions {name}")
    results = predictions_to_results(split.image_ids, caps)
    scores = None
    if dist.is_main:
        scores = score_captions(results, refs, metrics, cfg.eval.spice_models_dir, cfg.eval.java_mem)
    return scores, results


# ---------------------------------------------------------------------- the task
class CaptionTask(SampledTrainTask):
    """Data + LM step + val evaluation for the trainer (see ``engine.trainer.Task``)."""

    def __init__(self, cfg: CaptionConfig, dist: D.DistInfo, dataset: PretrainDataset, tokenizer,
                 generator: CaptionGenerator, val: Optional[tuple[CaptionSplit, dict]]) -> None:
        self.cfg, self.dist, self.dataset, self.tokenizer = cfg, dist, dataset, tokenizer
        self.generator, self.val = generator, val
        self.collator = CaptionTrainCollator(tokenizer, cfg.data.prompt, cfg.tokenizer.max_length)
        self.train_data = SampledTrainData(dataset, self.collator, cfg.train, dist, cfg.data.num_workers,
                                           BadImageCheck.from_data(cfg.data, "input_ids", len(dataset.image_ids)))

    def train_step(self, model, batch: dict, state: TrainState) -> dict:
        loss = model(batch["image"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                     self.cfg.loss.label_smoothing)
        return {"loss": loss, "_pairs": batch["input_ids"].shape[0]}

    def evaluate(self, model, epoch: int) -> Optional[dict]:
        if self.val is None:
            return None
        split, refs = self.val
        scores, results = evaluate_split(model, self.generator, split, refs, self.cfg.eval.val_metrics, self.cfg,
                                         self.dist, f"val (epoch {epoch})")
        metrics = D.broadcast_object(scores.scores if scores is not None else None)
        if self.dist.is_main:
            write_json(results, Path(self.cfg.train.output_dir) / f"captions_val_epoch{epoch:02d}.json")
            print(f"epoch {epoch}: val " + ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()), flush=True)
        return metrics

    def checkpoint_extra(self) -> dict:
        return {"tokenizer": tokenizer_state(self.tokenizer), "task": "caption"}


# ---------------------------------------------------------------------- building a run
def build_model(cfg: CaptionConfig, ckpt: Optional[dict], path: Optional[str], dist: D.DistInfo,
                warn_scratch: bool = True) -> CaptionModel:
    """A caption model from a fine-tuned caption checkpoint, from a pre-training checkpoint (decoder
    initialised from its text weights), or from scratch."""
    if ckpt is not None and is_caption_state(ckpt["model"]):
        model = CaptionModel(cfg.model, cfg.decoder)
        print_reports(dist, [load_checkpoint_into(model, ckpt, source=str(path))], f"caption checkpoint {path}")
        return model
    base = load_base_model(cfg.model, ckpt, path, dist, warn_scratch)
    model, report = CaptionModel.from_base(base, cfg.decoder)
    if dist.is_main:
        print(f"decoder initialised from the base model ({cfg.decoder.init_from}): {report.summary()}", flush=True)
    report.raise_if_unexpected()
    return model


def _splits(cfg: CaptionConfig, which: tuple[str, ...]) -> dict[str, tuple[CaptionSplit, dict]]:
    d = cfg.data
    out = {}
    for name in which:
        f = getattr(d, f"{name}_file")
        if f:
            split = read_caption_split(f, d.image_root)
            out[name] = (split, references_for(split, getattr(d, f"{name}_gt_file")))
    return out


def evaluate_and_write(model: CaptionModel, generator: CaptionGenerator, splits: dict, cfg: CaptionConfig,
                       dist: D.DistInfo, checkpoint: Optional[str], extra: Optional[dict] = None) -> dict:
    """Generate + score every split; the main process writes captions_<split>.json, results.json and
    prints the table. Returns ``{split: {metric: value (0-1)}}`` on every process."""
    out_dir = Path(cfg.train.output_dir)
    table: dict[str, CaptionScores] = {}
    payload: dict = {"task": "caption", "checkpoint": checkpoint,
                     "protocol": PROTOCOL.format(metric=cfg.eval.select_metric),
                     "prompt": cfg.data.prompt, "generation": to_dict(cfg.generation), **(extra or {}), "splits": {}}
    for name, (split, refs) in splits.items():
        scores, results = evaluate_split(model, generator, split, refs, cfg.eval.test_metrics, cfg, dist, name)
        if dist.is_main:
            table[name] = scores
            cap_file = out_dir / f"captions_{name}.json"
            write_json(results, cap_file)
            payload["splits"][name] = {**scores.to_json(), "captions_file": str(cap_file),
                                       "annotation_file": split.source,
                                       "gt_file": getattr(cfg.data, f"{name}_gt_file")}
    if dist.is_main:
        write_json(payload, out_dir / "results.json")
        print(f"captioning results ({checkpoint or 'no checkpoint'}), x100:\n{format_table(table)}\n"
              f"  {payload['protocol']}\n  written: {out_dir / 'results.json'}", flush=True)
    metrics = D.broadcast_object({k: v.scores for k, v in table.items()} if dist.is_main else None)
    D.barrier()
    return metrics


def predict_files(cfg: CaptionConfig, checkpoint: str, files: list[str]) -> list[str]:
    """Captions for image files with a fine-tuned caption checkpoint (one process)."""
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {missing}")
    dist = D.DistInfo(device=D.resolve_device(cfg.train.device))
    ckpt = load_checkpoint(checkpoint)
    if not is_caption_state(ckpt["model"]):
        raise ConfigError(f"{checkpoint} has no caption decoder (it is a pre-training checkpoint): fine-tune it "
                          "first (run without --predict), then pass the fine-tuned checkpoint")
    tokenizer = make_tokenizer(cfg.tokenizer, list, ckpt)
    cfg = with_vocab(cfg, tokenizer)
    model = build_model(cfg, ckpt, checkpoint, dist).to(dist.device)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))
    return CaptionGenerator(cfg, tokenizer, dist).captions(model, [os.path.abspath(f) for f in files], "--predict")


def run(cfg: CaptionConfig, checkpoint: Optional[str] = None, evaluate: bool = False,
        resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Fine-tune (or with ``evaluate`` only evaluate) captioning; returns the metrics per split.
    ``train.output_dir`` is claimed for the run (``engine/rundir.py``: fine-tuning refuses another run's
    checkpoints unless ``resume`` or ``overwrite``; evaluation writes no checkpoint and is not refused
    because of one)."""
    with OutputDir(cfg.train.output_dir, training=not evaluate, resume=resume, overwrite=overwrite) as out:
        return _run(cfg, checkpoint, evaluate, resume, out)


def _run(cfg: CaptionConfig, checkpoint: Optional[str], evaluate: bool, resume: Optional[str], out: OutputDir) -> dict:
    if evaluate and not checkpoint:
        raise ConfigError("--evaluate needs --checkpoint (a fine-tuned caption checkpoint)")
    d = cfg.data
    dist = start_run(cfg.train, out)
    resume_ckpt = load_checkpoint(find_resume(resume)) if resume and not evaluate else None
    if resume_ckpt is not None:  # before anything is written
        check_resume_config(cfg, resume_ckpt, resume, "caption", dist)
    files = [f for f in (d.val_file, d.val_gt_file, d.test_file, d.test_gt_file) if f]
    require_files(([] if evaluate else list(d.train_files)) + files, "captioning annotation",
                  CAPTION_HINT + " The synthetic captioning demo: python run_finetune.py --task caption_shapes.")
    require_image_root(d.image_root)
    ckpt = load_checkpoint(checkpoint) if checkpoint else None
    if evaluate and not is_caption_state(ckpt["model"]):
        raise ConfigError(f"{checkpoint} has no caption decoder (it is a pre-training checkpoint): fine-tune it "
                          "first (run without --evaluate)")
    train_set = None
    if not evaluate:
        train_set = PretrainDataset(d.train_files, d.image_root,
                                    build_transform(cfg.model.vision.img_size, True, d.transform),
                                    d.max_words, d.clean_style, cfg.train.seed, d.max_bad_fraction, hint=CAPTION_HINT,
                                    max_image_pixels=d.max_image_pixels,
                                    decode_min_side=decode_min_side(cfg.model.vision.img_size, True, d.transform))
    tokenizer = make_tokenizer(cfg.tokenizer, lambda: train_set.all_captions() + [d.prompt], resume_ckpt or ckpt)
    del resume_ckpt
    cfg = with_vocab(cfg, tokenizer)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, ckpt, checkpoint, dist, warn_scratch=not resume)
    del ckpt
    model.to(dist.device)
    generator = CaptionGenerator(cfg, tokenizer, dist)
    out_dir = Path(cfg.train.output_dir)

    if evaluate:
        return evaluate_and_write(model, generator, _splits(cfg, ("val", "test")), cfg, dist, checkpoint,
                                  {"mode": "evaluate"})

    splits = _splits(cfg, ("val", "test"))
    if dist.is_main:
        save_config(cfg, out_dir / "config.yaml")
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"captioning fine-tuning: {len(train_set)} training captions, "
              + ", ".join(f"{len(s)} {k} images" for k, (s, _) in splits.items())
              + f"; {n_params / 1e6:.2f}M trainable parameters, decoder {model.decoder.num_layers} layers "
              f"(init {cfg.decoder.init_from}), prompt {d.prompt!r}, {dist.world_size} process(es) on {dist.device}, "
              f"output in {out_dir}", flush=True)
    torch.manual_seed(cfg.train.seed + dist.rank)
    trainer = build_trainer(cfg, model, dist)
    task = CaptionTask(cfg, dist, train_set, tokenizer, generator, splits.get("val"))
    state = trainer.fit(task, resume=resume, metric_key=cfg.eval.select_metric)
    if state.global_step < state.total_steps:
        if dist.is_main:
            print("training stopped before the end: no test evaluation", flush=True)
        return {}
    chosen, final, is_best = load_selected_checkpoint(model, out_dir)
    extra = {"mode": "finetune", "from_checkpoint": checkpoint,
             "selected_by": f"val {cfg.eval.select_metric}" if is_best else "last checkpoint (no val split)",
             "selected_step": final["state"]["global_step"], "best_val": state.best_metric}
    del final
    return evaluate_and_write(model, generator, splits, cfg, dist, str(chosen), extra)


def main(args) -> int:
    """``run_finetune.py --task caption_coco | caption_shapes`` entry point."""
    if getattr(args, "zero_shot", False):
        raise ConfigError("captioning has no zero-shot protocol: the decoder is trained by fine-tuning")
    cfg = load_config(CaptionConfig, args.config, args.set)
    if getattr(args, "predict", None):
        if not args.checkpoint:
            raise ConfigError("--predict needs --checkpoint (a fine-tuned caption checkpoint)")
        for f, caption in zip(args.predict, predict_files(cfg, args.checkpoint, list(args.predict))):
            print(f"{f}\t{caption}", flush=True)
        return 0
    result = run(cfg, checkpoint=args.checkpoint, evaluate=args.evaluate, resume=args.resume,
                 overwrite=getattr(args, "overwrite", False))
    return 0 if result is not None else 1


__all__ = ["CaptionConfig", "CaptionDataConfig", "CaptionEvalConfig", "CaptionLossConfig", "CaptionTask",
           "CaptionGenerator", "build_model", "run", "main", "predict_files"]
