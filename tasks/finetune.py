"""The fine-tuning driver: one flow for every downstream task (retrieval, VQA, NLVR2, captioning),
each described by a ``tasks.spec.TaskSpec``. :func:`run` holds the flow once:

1. ``train.output_dir`` is claimed (``engine/rundir.py``: fine-tuning refuses another run's
   checkpoints unless resuming or ``--overwrite``), processes and logging start;
2. ``--checkpoint`` is read (evaluating or predicting needs the task's own fine-tuned one), and
   on ``--resume`` the checkpoint resumed;
3. the model section comes from that checkpoint (``tasks/finetune_config.py``); a resume is
   checked against the config it was trained with (``tasks/resume.py``);
4. the annotation files and the image folder are checked; the datasets are built;
5. the tokenizer: the checkpoint's, a local vocabulary, or one trained on the training texts;
6. the model, from the checkpoint or from scratch (the weight files the config names);
7. evaluation only: the evaluator's test; fine-tuning: the trainer over the task's batches and
   step, the val metric selecting ``checkpoint_best.pth``, then the test of the selected checkpoint.

:func:`predict` runs a task's predictor; :func:`main` is a task's command line (``run_finetune.py``):
``--evaluate`` for every task, ``--zero-shot`` where ``TaskSpec.zero_shot``, ``--predict`` where a
predictor exists.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import time
from typing import Any, Optional

import torch
from torch import nn

from datasets.text import tokenizer_state
from engine import distributed as D
from engine.checkpoint import find_resume, load_checkpoint
from engine.config import ConfigError, load_config_data, save_config
from engine.rundir import OutputDir
from engine.trainer import Trainer, TrainConfig, TrainState, setup_logging
from objectives.pretrain import moved_config_keys
from tasks.common import check_vocab_coverage, load_selected_checkpoint, make_tokenizer, require_files, require_image_root
from tasks.finetune_config import load_task_config, model_from_checkpoint, with_vocab
from tasks.resume import check_resume_config
from tasks.spec import MODE_FLAGS, Evaluator, Run, TaskSpec
from tasks.train_data import SampledTrainData

log = logging.getLogger("tasks")


def start_run(train: TrainConfig, out: Optional[OutputDir] = None) -> D.DistInfo:
    """The start of a fine-tuning run: processes (``train.device``, ``train.dist_timeout_s``), logging, ``train.num_threads``,
    and the output directory claimed (``out``, see :class:`engine.rundir.OutputDir`)."""
    dist = D.init_distributed(train.device, timeout_s=train.dist_timeout_s)
    setup_logging(dist.is_main)
    if train.num_threads > 0:
        torch.set_num_threads(train.num_threads)
    if out is not None:
        out.open(dist)
    return dist


# ---------------------------------------------------------------------- the flow
class TrainerTask:
    """The task the trainer runs (``engine.trainer.Task``): the spec's batches, step and val metrics."""

    def __init__(self, spec: TaskSpec, run: Run, train_data: SampledTrainData, evaluator: Evaluator,
                 extra: Optional[dict] = None) -> None:
        self.spec, self.run, self.train_data, self.evaluator, self.extra = spec, run, train_data, evaluator, extra or {}

    def steps_per_epoch(self) -> int:
        return self.train_data.steps_per_epoch()

    def train_batches(self, epoch: int, start_step: int):
        return self.train_data.batches(epoch, start_step)

    def train_step(self, model: nn.Module, batch: dict, state: TrainState) -> dict:
        return self.spec.train_step(self.run, model, batch, state)

    def evaluate(self, model: nn.Module, epoch: int) -> Optional[dict]:
        return self.evaluator.validate(self.spec.evaluated_model(model), epoch)

    def checkpoint_extra(self) -> dict:
        return {"tokenizer": tokenizer_state(self.run.tokenizer), "task": self.spec.name, **self.extra}

    def log_state(self) -> dict:
        """The bad-image counts for log.jsonl, when the task checks them."""
        check = self.train_data.bad_images
        return check.log_state() if check is not None else {}


def _checkpoint(spec: TaskSpec, run: Run) -> Optional[dict]:
    """``--checkpoint`` read and checked against the mode (None without one)."""
    if run.checkpoint is None:
        if not run.training:
            raise ConfigError(f"--{MODE_FLAGS[run.mode]} needs --checkpoint"
                              + (f" (a fine-tuned {spec.title} checkpoint)" if spec.task_part else ""))
        return None
    return _check_checkpoint(spec, run, load_checkpoint(run.checkpoint))


def _check_checkpoint(spec: TaskSpec, run: Run, ckpt: dict) -> dict:
    """``ckpt`` checked against the mode: evaluating or predicting needs the task's own fine-tuned part."""
    trained_for = ckpt.get("task")
    if trained_for not in (None, "pretrain", spec.name):
        raise ConfigError(f"{run.checkpoint} is a {trained_for} checkpoint, not one for {spec.name}: pass a "
                          f"{spec.name} checkpoint" + ("" if run.training else " (or a pre-training one to fine-tune)"))
    if not run.training and spec.is_task_state is not None and not spec.is_task_state(ckpt["model"]):
        raise ConfigError(f"{run.checkpoint} has no {spec.task_part} (it is a pre-training checkpoint): fine-tune it "
                          f"first (run without --{MODE_FLAGS[run.mode]}), then pass the fine-tuned checkpoint")
    if not run.training and "tokenizer" not in ckpt and not run.cfg.tokenizer.path:
        raise ConfigError(f"checkpoint {run.checkpoint} holds no tokenizer: set tokenizer.path to its vocabulary")
    return ckpt


def _model_from(run: Run, source: Optional[dict], path: Optional[str], given: Optional[dict]) -> None:
    saved = source.get("config") if source is not None else None
    saved = moved_config_keys(saved) if isinstance(saved, dict) else None  # an older checkpoint's layout
    model = model_from_checkpoint(run.cfg.model, saved.get("model") if isinstance(saved, dict) else None, str(path),
                                  given)
    run.cfg = dataclasses.replace(run.cfg, model=model)


def run(spec: TaskSpec, cfg: Any, mode: str = "finetune", checkpoint: Optional[str] = None,
        resume: Optional[str] = None, overwrite: bool = False, model_given: Optional[dict] = None) -> dict:
    """Fine-tune (``mode="finetune"``) or only evaluate (``"evaluate"``, ``"zero_shot"``) one task;
    returns its results on every process. ``model_given``: the model keys the user set (see
    ``tasks.finetune_config.model_from_checkpoint``; None = all of ``cfg.model``)."""
    training = mode == "finetune"
    with OutputDir(cfg.train.output_dir, training=training, resume=resume, overwrite=overwrite) as out:
        r = Run(cfg, start_run(cfg.train, out), mode, checkpoint, resume if training else None)
        ckpt = _checkpoint(spec, r)
        resume_ckpt = load_checkpoint(find_resume(r.resume)) if r.resume else None
        _model_from(r, resume_ckpt or ckpt, r.resume or checkpoint, model_given)
        if resume_ckpt is not None:  # before anything is written
            check_resume_config(r.cfg, resume_ckpt, r.resume, spec.name, r.dist)
        require_files(spec.files(r.cfg, training), f"{spec.title} annotation", spec.files_hint)
        require_image_root(r.cfg.data.image_root)
        data = spec.data(r)
        tok_source = resume_ckpt or ckpt
        r.tokenizer = make_tokenizer(r.cfg.tokenizer, lambda: spec.texts(data), tok_source)
        if spec.adapt_tokenizer is not None:
            r.tokenizer = spec.adapt_tokenizer(r, data, r.tokenizer, tok_source)
        if training and r.dist.is_main and (tok_source is not None or r.cfg.tokenizer.path):
            check_vocab_coverage(r.tokenizer, spec.texts(data), r.cfg.tokenizer, f"the {spec.title} training texts")
        del resume_ckpt, tok_source
        r.cfg = with_vocab(r.cfg, r.tokenizer)
        torch.manual_seed(r.cfg.train.seed)
        if ckpt is None and training and not r.resume and r.dist.is_main:
            weights = r.cfg.model.vision_weights or r.cfg.model.text_weights
            log.warning("no --checkpoint: fine-tuning from scratch, a model not pre-trained on image-text pairs (%s); "
                        "results will be far below a pre-trained model's",
                        "encoders from the files of model.*_weights" if weights else "random initialisation")
        model = spec.build_model(r, ckpt).to(r.dist.device)
        del ckpt
        evaluator = spec.evaluator(r, data)
        if r.dist.is_main:
            save_config(r.cfg, r.out_dir / ("config.yaml" if training else f"config_{mode}.yaml"))
            text = spec.describe(r, data, model) if spec.describe is not None else None
            if text:
                print(text, flush=True)
        if not training:
            return evaluator.test(spec.evaluated_model(model), checkpoint, {"mode": mode})
        extra = spec.extra_state(r, data) if spec.extra_state is not None else None
        return _finetune(spec, r, model, spec.train_data(r, data), evaluator, extra)


def _finetune(spec: TaskSpec, r: Run, model: nn.Module, train_data: SampledTrainData, evaluator: Evaluator,
              extra: Optional[dict] = None) -> dict:
    cfg, o = r.cfg, r.cfg.optim
    torch.manual_seed(cfg.train.seed + r.dist.rank)
    trainer = Trainer(cfg.train, o, cfg.schedule, model, model.param_groups(o.lr, o.lr_vision, o.weight_decay),
                      r.dist, cfg, find_unused=spec.find_unused(cfg))
    key, name = spec.metric(cfg)
    t0 = time.perf_counter()
    state = trainer.fit(TrainerTask(spec, r, train_data, evaluator, extra), resume=r.resume, metric_key=key)
    seconds = time.perf_counter() - t0
    if state.global_step < state.total_steps:  # stopped by a signal: the trainer said how to resume
        if r.dist.is_main:
            print("training stopped before the end: no test evaluation", flush=True)
        return {"stopped_at_step": state.global_step}
    model = spec.evaluated_model(model)  # the checkpoint's "model" section: the model without its objective
    chosen, final, is_best = load_selected_checkpoint(model, r.out_dir)
    extra = {"mode": "finetune", "from_checkpoint": r.checkpoint, "evaluated_checkpoint": str(chosen),
             "selected_by": f"{spec.val_split} {name}" if is_best else f"last checkpoint (no {spec.val_split} split)",
             "selected_step": final["state"]["global_step"], spec.best_key: state.best_metric,
             "steps": state.global_step, "train_seconds": seconds}
    del final
    return evaluator.test(model, str(chosen), extra)


def load_for_inference(spec: TaskSpec, cfg: Any, checkpoint: str, ckpt: Optional[dict] = None,
                       model_given: Optional[dict] = None) -> tuple[Run, nn.Module]:
    """The run (one process, ``cfg.train.device``) and the model of ``checkpoint`` for prediction: the
    architecture and the tokenizer from the checkpoint, the model in eval mode."""
    r = Run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False)),
            D.DistInfo(device=D.resolve_device(cfg.train.device)), "predict", checkpoint)
    ckpt = _checkpoint(spec, r) if ckpt is None else _check_checkpoint(spec, r, ckpt)
    _model_from(r, ckpt, checkpoint, model_given)
    r.tokenizer = make_tokenizer(r.cfg.tokenizer, list, ckpt)
    r.cfg = with_vocab(r.cfg, r.tokenizer)
    model = spec.evaluated_model(spec.build_model(r, ckpt)).to(r.dist.device).eval()
    return r, model


def predict(spec: TaskSpec, cfg: Any, checkpoint: Optional[str], inputs: list[str], args: Any = None,
            model_given: Optional[dict] = None) -> list[dict]:
    """The predictor's JSON records for ``inputs`` with ``checkpoint`` (one process)."""
    from tasks.pipeline import from_run
    if spec.predictor.check is not None:
        spec.predictor.check(inputs, args)
    if checkpoint is None:
        raise ConfigError("--predict needs --checkpoint")
    ckpt = load_checkpoint(checkpoint)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the predictions (load reports to stderr)
        r, model = load_for_inference(spec, cfg, checkpoint, ckpt, model_given)
    pipeline = from_run(spec.name, r, model, checkpoint, ckpt.get("answer_list"))
    del ckpt
    return spec.predictor.predict(pipeline, inputs, args)


# ---------------------------------------------------------------------- the command line
def main(spec: TaskSpec, args) -> int:
    """``run_finetune.py --task ...`` for one task: ``args`` has ``config``, ``set``, ``checkpoint``,
    ``resume``, the mode flags of :func:`tasks.spec.mode_flags` and optionally ``overwrite``."""
    chosen = [m for m in MODE_FLAGS if getattr(args, m, None)]
    for m in chosen:
        if m not in spec.modes:
            raise ConfigError(f"--{MODE_FLAGS[m]}: the {spec.name} tasks have no such mode (their modes: "
                              + ", ".join(spec.modes) + ")")
    if len(chosen) > 1:
        raise ConfigError(f"--{MODE_FLAGS[chosen[0]]} and --{MODE_FLAGS[chosen[1]]} are exclusive")
    mode = chosen[0] if chosen else "finetune"
    cfg, given = load_task_config(spec, args.config, args.set)
    if mode == "predict":  # the model is the checkpoint's: only what --set changes of it (e.g. the image size)
        given = load_config_data(None, args.set).get("model") or {}
        for record in predict(spec, cfg, args.checkpoint, list(args.predict), args, given):
            print(json.dumps(record), flush=True)
        return 0
    run(spec, cfg, mode, args.checkpoint, args.resume, getattr(args, "overwrite", False), given)
    return 0
