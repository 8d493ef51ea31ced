"""Pieces every task shares: tokenizer set-up, synthetic data on first use, loading a pre-trained
checkpoint into a (possibly differently sized) model, and moving batches to the device."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from datasets.shapes import ShapesConfig, ensure_shapes
from datasets.text import load_tokenizer, tokenizer_from_state, tokenizer_state, train_wordpiece_tokenizer
from engine import distributed as D
from engine.checkpoint import load_checkpoint
from engine.config import opt
from models.vision import interpolate_pos_embed
from models.weights import LoadReport

log = logging.getLogger("tasks")

SYNTHETIC_HINT = ("To try the project without downloading data, run the synthetic demo: "
                  "python run_pretrain.py --config configs/demo/pretrain.yaml")


@dataclass
class TokenizerConfig:
    path: Optional[str] = opt(None, "local directory with vocab.txt (e.g. bert-base-uncased); null = train a WordPiece vocabulary on the training captions (fine-tuning takes the checkpoint's tokenizer)")
    vocab_size: int = opt(2000, "vocabulary size when training one from the captions")
    max_length: int = opt(30, "maximum tokens per text (longer ones are truncated)")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def ensure_synthetic(image_root: str, shapes: Optional[ShapesConfig], dist: D.DistInfo) -> None:
    """Generate the shapes world into ``image_root`` on first use (main process), then sync."""
    if shapes is None:
        return
    if dist.is_main:
        t0 = time.time()
        _, created = ensure_shapes(image_root, shapes)
        if created:
            print(f"created the synthetic shapes data in {image_root} ({time.time() - t0:.1f} s)", flush=True)
    D.barrier()


def require_files(paths: list[str], what: str, how_to_get: str) -> None:
    """A clear error naming the first missing annotation file, how to get it, and the demo."""
    for f in paths:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{what} file not found: {f}. {how_to_get} {SYNTHETIC_HINT}")


def make_tokenizer(cfg: TokenizerConfig, texts: Callable[[], list[str]], checkpoint: Optional[dict] = None):
    """The checkpoint's tokenizer when there is one, else a local vocab.txt directory, else a
    WordPiece vocabulary trained on ``texts()`` (main process; broadcast to the others)."""
    if checkpoint is not None and "tokenizer" in checkpoint:
        return tokenizer_from_state(checkpoint["tokenizer"])
    if cfg.path:
        return load_tokenizer(cfg.path)
    state = tokenizer_state(train_wordpiece_tokenizer(texts(), cfg.vocab_size)) if D.is_main() else None
    return tokenizer_from_state(D.broadcast_object(state))


QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr", "image_queue_h", "text_queue_h")


def load_model_state(model: torch.nn.Module, state: dict, source: str = "checkpoint",
                     expected_missing: Optional[dict[str, str]] = None) -> LoadReport:
    """Copy ``state`` (our key names) into ``model`` with an explicit report:
    position embeddings are interpolated when the image size changed; queues of another size are
    re-initialised; keys the model lacks are reported as unexpected, keys the checkpoint lacks as
    missing (with the reason from ``expected_missing``, matched by key prefix).

    A state with ALBEF/BLIP names (``visual_encoder.*``, under any prefix) is first converted by the
    explicit key maps of ``models/convert.py``; the report then also lists what was dropped and why,
    and architecture mismatches (naming the config keys to set) as ``mismatched``."""
    from models.convert import convert_in_place
    state, foreign = convert_in_place(model, state)
    own = model.state_dict()
    report = LoadReport()
    fixed = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key]
        if key.endswith("pos_embed") and value.shape != target.shape:
            n_new = target.shape[1] - 1
            grid = int(round(n_new ** 0.5))
            value = interpolate_pos_embed(value, grid)
            report.interpolated.append(key)
        if key.split(".")[-1] in QUEUE_KEYS and value.shape != target.shape:
            report.expected_missing[key] = "queue of another size: re-initialised (empty)"
            report.missing.append(key)
            continue
        if value.shape != target.shape:
            report.mismatched.append(key)
            continue
        fixed[key] = value
        report.loaded.append(key)
    for key in own:
        if key not in state:
            report.missing.append(key)
            for prefix, why in (expected_missing or {}).items():
                if key.startswith(prefix):
                    report.expected_missing[key] = why
                    break
    # tied MLM decoder: shares the word embeddings
    model.load_state_dict({**own, **fixed}, strict=True)
    log.info("loaded %s: %d tensors", source, len(report.loaded))
    return foreign.finish(report) if foreign is not None else report


def load_pretrained(model: torch.nn.Module, path: str, expected_missing: Optional[dict[str, str]] = None,
                    prefix: str = "", allow_mismatch: bool = False) -> tuple[LoadReport, dict]:
    """Load one of our checkpoints (pre-training or a task's) into ``model`` (keys under ``prefix``);
    returns the report and the checkpoint dict (for its tokenizer and config).

    ALBEF and BLIP checkpoints are recognised by their key names and loaded through the explicit key
    maps of ``models/convert.py`` (which raise on anything unexplained unless ``allow_mismatch``); the
    returned dict then holds ``model`` (our names), ``layout`` and ``source_config`` (their config),
    and no ``config`` / ``tokenizer`` (those always mean ours)."""
    ckpt = load_checkpoint(path)
    if any(k.startswith("visual_encoder.") for k in ckpt["model"]):  # ALBEF / BLIP names
        from models.convert import detect_layout, load_foreign_state
        layout = detect_layout(ckpt["model"])
        report = load_foreign_state(model, ckpt["model"], source=str(path), allow_mismatch=allow_mismatch,
                                    prefix=prefix or None, expected_missing=expected_missing)
        own = model.state_dict()
        state = {k[len(prefix):]: own[k] for k in report.loaded if k.startswith(prefix)}
        return report, {"model": state, "layout": layout, "source_config": ckpt.get("config")}
    state = {prefix + k: v for k, v in ckpt["model"].items()}
    report = load_model_state(model, state, source=path, expected_missing=expected_missing)
    return report, ckpt
