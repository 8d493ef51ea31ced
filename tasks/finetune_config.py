"""The config sections every fine-tuning task shares, and where a fine-tuning run's model section
comes from.

Every task config is a :class:`FinetuneConfig`: ``model``, ``tokenizer``, ``optim``, ``schedule``
and ``train`` are defined here once; a task adds its own sections (``data``, ``loss``, ``eval``,
``decoder``, ...).

**The architecture travels with the checkpoint.** A run that starts from one of our checkpoints
(pre-training or a task's; on ``--resume`` the checkpoint resumed) takes its ``model`` section from
the config saved in that checkpoint (:func:`model_from_checkpoint`). The task config may set a
different value only for the keys of :data:`MODEL_MAY_DIFFER` (the one allow-list: image size,
dropout, grad checkpointing); any other key it sets must equal the checkpoint's, or the
run stops with one line naming the key. Keys the task config does not set are the checkpoint's,
but the initial weight files (:data:`MODEL_OWN`), which only a run from scratch reads.
From scratch (no checkpoint, or an ALBEF / BLIP file whose config is not ours) the task config's
model section is used as it is. The vocabulary size is always the tokenizer's (:func:`with_vocab`).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from engine.config import INCLUDE_KEY, ConfigError, apply_overrides, from_dict, load_config_data, opt, read_yaml, to_dict
from engine.trainer import OptimConfig, ScheduleConfig, TrainConfig
from models.vlp import VLPConfig
from tasks.common import TokenizerConfig

__all__ = ["FinetuneConfig", "MODEL_MAY_DIFFER", "MODEL_OWN", "MODEL_DERIVED", "model_from_checkpoint", "with_vocab",
           "load_task_config"]


@dataclass
class FinetuneConfig:
    """The sections every fine-tuning task config has."""

    model: VLPConfig = opt(VLPConfig, "base model: a run from a checkpoint takes it from the checkpoint's config; set only what may differ (tasks/finetune_config.py: MODEL_MAY_DIFFER, e.g. vision.img_size: position embeddings are interpolated)")
    tokenizer: TokenizerConfig = opt(TokenizerConfig, "tokenizer (a checkpoint's own tokenizer takes precedence)")
    optim: OptimConfig = opt(OptimConfig, "optimiser")
    schedule: ScheduleConfig = opt(ScheduleConfig, "learning-rate schedule")
    train: TrainConfig = opt(TrainConfig, "training loop")


# model keys (below ``model.``) a task config may set differently from its checkpoint -> why
MODEL_MAY_DIFFER: dict[str, str] = {
    "vision.img_size": "position embeddings are interpolated on load",
    "vision.drop_path": "regularisation", "text.hidden_dropout": "regularisation",
    "text.attention_dropout": "regularisation",
    "vision.grad_checkpointing": "memory (same numbers)", "text.grad_checkpointing": "memory (same numbers)",
}
# always the task config's value, never the checkpoint's: what a run from scratch starts from
MODEL_OWN: dict[str, str] = {
    "vision_weights": "initial weight files: a checkpoint's weights are loaded instead",
    "vision_weights_format": "initial weight files: a checkpoint's weights are loaded instead",
    "text_weights": "initial weight files: a checkpoint's weights are loaded instead",
}
# set by the run whatever the config says
MODEL_DERIVED: dict[str, str] = {"text.vocab_size": "the tokenizer's size"}


def _leaves(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _normal(value: Any) -> Any:
    return [_normal(v) for v in value] if isinstance(value, (list, tuple)) else value


def model_from_checkpoint(model: VLPConfig, saved: Optional[dict], source: str,
                          given: Optional[dict] = None) -> VLPConfig:
    """The model section of a run that starts from a checkpoint whose saved config has the model
    section ``saved`` (``None``: not ours, or from scratch: ``model`` as it is).

    ``model`` is the task config's section; ``given`` the keys the user set in it (the ``model``
    mapping of the YAML files and ``--set``), ``None`` = every key of ``model``. A given key keeps
    its value when it equals the checkpoint's, is in :data:`MODEL_MAY_DIFFER` or
    :data:`MODEL_DERIVED`, or the checkpoint predates it; any other difference is a
    ``ConfigError`` naming every such key. A key not given is the checkpoint's, but for the keys
    of :data:`MODEL_OWN` (the initial weight files), which are always the config's."""
    if not isinstance(saved, dict):
        return model
    ours = _leaves(to_dict(model))
    theirs = _leaves(saved)
    explicit = set(ours) if given is None else set(_leaves(given))
    merged: dict[str, Any] = {}
    diffs = []
    for key, value in ours.items():
        if key not in theirs or key in MODEL_OWN:  # a checkpoint older than the key; the config's own
            merged[key] = value
        elif key not in explicit:
            merged[key] = theirs[key]
        else:
            merged[key] = value
            if key not in MODEL_MAY_DIFFER and key not in MODEL_DERIVED and _normal(theirs[key]) != _normal(value):
                diffs.append(f"model.{key}: checkpoint {theirs[key]!r}, config {value!r}")
    if diffs:
        raise ConfigError(f"checkpoint {source} was trained with another architecture than the config: "
                          + "; ".join(diffs) + ". The model comes from the checkpoint: leave these keys out of the "
                          "config or give the checkpoint's values (tasks/finetune_config.py lists the keys that may "
                          "differ: " + ", ".join(f"model.{k}" for k in MODEL_MAY_DIFFER) + ")")
    nested: dict = {}
    for key, value in merged.items():
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = copy.deepcopy(value)
    return from_dict(VLPConfig, nested, prefix="model")


def with_vocab(cfg, tokenizer):
    """``cfg`` with ``model.text.vocab_size`` set to the tokenizer's size."""
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, text=dataclasses.replace(cfg.model.text, vocab_size=len(tokenizer))))


def load_task_config(spec: Any, path: Optional[str], overrides: list[str]) -> tuple[Any, dict]:
    """The run config of ``spec`` from a YAML file and ``--set`` overrides, and the model keys they set:
    the file's own and the overrides' (a model preset it includes describes the model of a run from
    scratch; a checkpoint's architecture comes before it)."""
    data = load_config_data(path, overrides)
    own = read_yaml(path) if path else {}
    given = apply_overrides({k: v for k, v in own.items() if k != INCLUDE_KEY}, overrides).get("model")
    return from_dict(spec.config_cls, data), given if isinstance(given, dict) else {}
