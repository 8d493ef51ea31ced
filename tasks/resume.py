"""Which config keys a ``--resume`` may change, for pre-training and every fine-tuning task, in one
place; and the check that compares a run's config with the config its checkpoint was trained with
before anything is written.

An allow-list: a key that is not named here may not change on resume (a key added to a schema later
is protected until someone decides otherwise). What may change is what the resumed run can continue
with exactly, or where the new value is the user's intent and is applied from the next step:

- how long the run is (``train.epochs``, ``train.max_steps``) and the learning-rate schedule
  (``schedule.*``: a function of the step, recomputed), the optimiser hyperparameters (``optim.lr``,
  ``optim.lr_vision``, ``optim.weight_decay``, ``optim.betas``, ``optim.eps``: the trainer applies
  them over the resumed optimiser state), gradient clipping;
- logging, saving, progress bars, the output folder;
- where and how fast it runs: threads, device, ``torch.compile``, sharding (checkpoints are written
  unsharded), loader workers (data order, augmentation and masking are seeded per sample),
  gradient checkpointing (same numbers), fp32 <-> bf16 autocast (fp16 has a gradient-scaler state:
  changes to or from fp16 are refused);
- the reaction to non-finite losses and bad images;
- settings a resume does not use: the initial weight files (the checkpoint's weights are loaded),
  the tokenizer source (the checkpoint's tokenizer is used), the test split (evaluated after
  training), evaluation batch sizes and caches.

Everything else is refused: the model (architecture, dropout), the training data
(files, shards, transforms, caption length and cleaning, the synthetic world's config), the batch
(``train.batch_size``, ``train.grad_accum``), ``train.seed``, the objective (losses, momentum, queue),
and whatever decides the validation metric behind ``checkpoint_best.pth`` (val files, evaluation protocol, generation).
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Callable, Optional

from engine import distributed as D
from engine.config import ConfigError, to_dict
from objectives.pretrain import moved_config_keys

log = logging.getLogger("tasks")

# every task: pattern -> why it may change
COMMON: dict[str, str] = {
    "train.output_dir": "where the resumed run writes",
    "train.epochs": "run length (the schedule follows)",
    "train.max_steps": "run length (the schedule follows)",
    "train.log_every": "logging", "train.save_every": "saving",
    "train.keep_epoch_checkpoints": "saving", "train.progress": "progress bar",
    "train.num_threads": "speed", "train.device": "where it runs", "train.compile": "speed",
    "train.sharding": "memory (checkpoints are unsharded)", "train.fsdp_blocks": "memory",
    "train.nan_policy": "reaction to non-finite losses", "train.max_nan_skips": "reaction to non-finite losses",
    "optim.lr": "applied from the next step", "optim.lr_vision": "applied from the next step",
    "optim.weight_decay": "applied from the next step", "optim.betas": "applied from the next step",
    "optim.eps": "applied from the next step", "optim.grad_clip": "applied from the next step",
    "schedule.*": "the schedule is recomputed from the step",
    "data.num_workers": "data order is seeded per sample",
    "data.image_root": "where the images are (the annotation files may not change)",
    "data.vg_image_root": "where the images are",
    "data.max_bad_fraction": "bad-image tolerance", "data.bad_check_after": "bad-image tolerance",
    "data.check_images": "a check at start", "data.eval_batch_size": "speed",
    "data.test_file": "evaluated after training", "data.test_files": "evaluated after training",
    "data.test_gt_file": "evaluated after training",
    "model.vision_weights": "initial weights (the checkpoint's are loaded)",
    "model.text_weights": "initial weights (the checkpoint's are loaded)",
    "model.vision_weights_format": "initial weights (the checkpoint's are loaded)",
    "model.vision.grad_checkpointing": "memory (same numbers)",
    "model.text.grad_checkpointing": "memory (same numbers)",
    "tokenizer.path": "the checkpoint's tokenizer is used", "tokenizer.vocab_size": "the checkpoint's tokenizer is used",
}
# per task (the keys of its own sections)
TASK_EXTRA: dict[str, dict[str, str]] = {
    "pretrain": {"diagnostics.*": "diagnostics only"},
    "retrieval": {"data.name": "a name in the results", "eval.batch_size": "speed", "eval.itm_batch_size": "speed",
                  "eval.itc_chunk": "speed", "eval.cache_image_tokens": "speed", "eval.cache_text_states": "speed",
                  "eval.progress": "progress bar", "eval.save_ranked": "output files", "eval.save_scores": "output files"},
    "vqa": {"eval.rank_chunk": "speed", "generation.use_cache": "speed (same output)"},
    "nlvr2": {},
    "snli_ve": {},
    "caption": {"eval.test_metrics": "evaluated after training", "eval.java_mem": "metric tool memory",
                "eval.spice_models_dir": "metric tool files", "eval.val_metrics": "what is reported (eval.select_metric may not change)",
                "generation.use_cache": "speed (same output)"},
}
# set from other values by the run: not compared (the vocabulary size is the tokenizer's, which a
# resume takes from the checkpoint)
DERIVED = ("model.text.vocab_size",)


def _precision_ok(old: Any, new: Any) -> bool:
    return "fp16" not in (old, new)


# keys that may change under a condition: pattern -> (test(old, new), what is refused)
CONDITIONAL: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "train.precision": (_precision_ok, "fp16 has a gradient-scaler state"),
}


def _normal(v: Any) -> Any:
    """Tuples and lists compare equal (YAML has lists only)."""
    if isinstance(v, (list, tuple)):
        return [_normal(x) for x in v]
    return v


def config_diff(saved: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, new value)`` for every leaf that differs; a key the saved config
    lacks (a checkpoint older than the key) is not a difference; a section replaced by a value (or
    null) is one difference at the section's key."""
    if isinstance(saved, dict) and isinstance(new, dict):
        out = []
        for k, v in saved.items():
            if k in new:
                out += config_diff(v, new[k], f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if _normal(saved) == _normal(new) else [(prefix, saved, new)]


def _matches(key: str, patterns) -> Optional[str]:
    for p in patterns:
        if fnmatch.fnmatchcase(key, p):
            return p
    return None


def resume_changes(saved: dict, new: dict, task: str) -> tuple[list[str], list[str]]:
    """Compare the config a checkpoint was trained with (``saved``, nested dict) with the resumed run's
    (``new``); returns (accepted, refused) as ``"key: old -> new"`` strings. A key the saved config lacks
    (an older checkpoint) counts as unchanged."""
    allowed = {**COMMON, **TASK_EXTRA[task]}
    accepted, refused = [], []
    for key, old, value in config_diff(saved, new):
        if _matches(key, DERIVED):
            continue
        change = f"{key}: {old!r} -> {value!r}"
        cond = _matches(key, CONDITIONAL)
        if cond is not None:
            test, why = CONDITIONAL[cond]
            if test(old, value):
                accepted.append(change)
            else:
                refused.append(f"{change} ({why})")
        elif _matches(key, allowed):
            accepted.append(change)
        else:
            refused.append(change)
    return accepted, refused


def check_resume_config(cfg: Any, ckpt: dict, path: str, task: str, dist: Optional[D.DistInfo] = None) -> list[str]:
    """Before a resumed run writes anything: ``ConfigError`` (one line naming every refused key) when
    ``cfg`` differs from the config the checkpoint ``ckpt`` (read from ``path``) was trained with in a
    key that may not change (:data:`COMMON`, :data:`TASK_EXTRA`); otherwise the main process prints
    the accepted changes. Returns them. A checkpoint without a config (foreign) is not checked."""
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        return []
    saved = moved_config_keys(saved)
    accepted, refused = resume_changes(saved, to_dict(cfg), task)
    if refused:
        raise ConfigError(
            f"cannot resume {path} with this config: {'; '.join(refused)}. A resumed run would not continue exactly "
            "with these keys changed (tasks/resume.py lists the keys that may change); resume with the checkpoint's "
            "values (the config.yaml beside it) or start a new run in another train.output_dir")
    if accepted and (dist.is_main if dist is not None else D.is_main()):
        print(f"resuming {path} with changed settings: {'; '.join(accepted)}", flush=True)
    return accepted
