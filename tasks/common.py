"""Pieces every task shares (pre-training and fine-tuning): tokenizer set-up, the data files a run
needs, moving batches to the device, a saved run config, and the checkpoint a fine-tuning run
selected at its end. The fine-tuning flow itself is ``tasks/finetune.py``; weights load through
``models/loading.py``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from datasets.text import load_tokenizer, tokenizer_from_state, tokenizer_state, train_wordpiece_tokenizer
from engine import distributed as D
from engine.checkpoint import load_checkpoint
from engine.config import opt
from models.loading import load_into
from objectives.pretrain import moved_config_keys

SYNTHETIC_HINT = ("To try the project without downloading data, run the synthetic demo: "
                  "python run_pretrain.py --config configs/demo/pretrain.yaml")


@dataclass
class TokenizerConfig:
    path: Optional[str] = opt(None, "local directory with vocab.txt (e.g. bert-base-uncased); null = train a WordPiece vocabulary on the training captions (fine-tuning takes the checkpoint's tokenizer)")
    vocab_size: int = opt(2000, "vocabulary size when training one from the captions")
    max_length: int = opt(30, "maximum tokens per text (longer ones are truncated)")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def require_files(paths: list[str], what: str, how_to_get: str) -> None:
    """A clear error naming the first missing annotation file, how to get it, and the demo."""
    for f in paths:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{what} file not found: {f}. {how_to_get} {SYNTHETIC_HINT}")


def require_image_root(image_root: str, samples: list[str] = (), key: str = "data.image_root") -> None:
    """A clear error naming ``key`` before any data loader starts: when the directory ``image_root``
    does not exist, or when none of ``samples`` (full paths of the first few images the annotations
    name) exists, so that every image would fail to load."""
    if not Path(image_root).is_dir():
        raise FileNotFoundError(f"{key}={image_root}: no such directory (the annotations' image paths are "
                                f"relative to it). {SYNTHETIC_HINT}")
    if samples and not any(os.path.isfile(f) for f in samples):
        raise FileNotFoundError(f"{key}={image_root}: none of the first {len(samples)} images of the annotations "
                                f"is there (the first: {samples[0]}); is it the folder their image paths are "
                                "relative to?")


def make_tokenizer(cfg: TokenizerConfig, texts: Callable[[], list[str]], checkpoint: Optional[dict] = None):
    """The checkpoint's tokenizer when there is one, else a local vocab.txt directory, else a
    WordPiece vocabulary trained on ``texts()`` (main process; broadcast to the others)."""
    if checkpoint is not None and "tokenizer" in checkpoint:
        return tokenizer_from_state(checkpoint["tokenizer"])
    if cfg.path:
        return load_tokenizer(cfg.path)
    state = tokenizer_state(train_wordpiece_tokenizer(texts(), cfg.vocab_size)) if D.is_main() else None
    return tokenizer_from_state(D.broadcast_object(state))


def saved_run_config(cls: type, data: dict):
    """The run config ``data`` saved in a checkpoint, as ``cls``. Its ``train.device`` describes the
    machine that trained, not this one: it is read as ``auto`` (so that a CUDA run's checkpoint
    loads on a machine without CUDA); keys that moved are read at their place now
    (``objectives.pretrain.moved_config_keys``)."""
    from engine.config import from_dict
    data = moved_config_keys(dict(data))
    if isinstance(data.get("train"), dict):
        data["train"] = {**data["train"], "device": "auto"}
    return from_dict(cls, data)


# ---------------------------------------------------------------------- the selected checkpoint
def load_selected_checkpoint(model: torch.nn.Module, out_dir: Path) -> tuple[Path, dict, bool]:
    """Load into ``model`` the checkpoint a fine-tuning run selected: ``checkpoint_best.pth`` (best
    val metric) when the run wrote one, else ``checkpoint_last.pth``. Returns the path, the
    checkpoint dict and whether it is the best one."""
    best = out_dir / "checkpoint_best.pth"
    chosen = best if best.is_file() else out_dir / "checkpoint_last.pth"
    ckpt = load_checkpoint(chosen)
    load_into(model, ckpt["model"], source=str(chosen))
    return chosen, ckpt, chosen == best
