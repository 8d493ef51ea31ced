"""Pieces every task shares (pre-training and fine-tuning): tokenizer set-up, the data files a run
needs, moving batches to the device, loading a checkpoint into a (possibly differently sized) model
with its load report, and the checkpoint a fine-tuning run selected at its end. The fine-tuning flow
itself is ``tasks/finetune.py``."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from datasets.text import load_tokenizer, tokenizer_from_state, tokenizer_state, train_wordpiece_tokenizer
from engine import distributed as D
from engine.checkpoint import load_checkpoint
from engine.config import ConfigError, opt
from models.vision import interpolate_pos_embed
from models.weights import LoadReport
from objectives.pretrain import checkpoint_states, moved_config_keys

log = logging.getLogger("tasks")

SYNTHETIC_HINT = ("To try the project without downloading data, run the synthetic demo: "
                  "python run_pretrain.py --config configs/demo/pretrain.yaml")


@dataclass
class TokenizerConfig:
    path: Optional[str] = opt(None, "local directory with vocab.txt (e.g. bert-base-uncased); null = train a WordPiece vocabulary on the training captions (fine-tuning takes the checkpoint's tokenizer)")
    vocab_size: int = opt(2000, "vocabulary size when training one from the captions")
    max_length: int = opt(30, "maximum tokens per text (longer ones are truncated)")
    warn_unknown_fraction: float = opt(0.02, "warn at start when more than this fraction of the training texts' words hold [UNK] (datasets/vocab_check.py)")
    warn_split_fraction: float = opt(0.1, "warn at start when more than this fraction of the training texts' words (3+ letters) are spelled out in single letters")


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


def check_vocab_coverage(tokenizer, texts: list[str], cfg: TokenizerConfig, source: str) -> Optional[str]:
    """Warn (and return the warning) when ``tokenizer`` reads ``texts`` poorly: words holding [UNK] or
    spelled out letter by letter, above ``cfg``'s thresholds (a vocabulary from another dataset, e.g. the
    demo's, on real captions)."""
    from datasets.vocab_check import coverage_warning, vocab_coverage
    message = coverage_warning(vocab_coverage(tokenizer, texts), cfg.warn_unknown_fraction, cfg.warn_split_fraction,
                               source)
    if message:
        log.warning("%s", message)
    return message


def load_model_state(model: torch.nn.Module, state: dict, source: str = "checkpoint",
                     expected_missing: Optional[dict[str, str]] = None) -> LoadReport:
    """Copy ``state`` (our key names) into ``model`` with an explicit report:
    position embeddings are interpolated when the image size changed; keys the model lacks are
    reported as unexpected, keys the checkpoint lacks as missing (with the reason from
    ``expected_missing``, matched by key prefix).

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
    """Load one of our checkpoints (pre-training or a task's) into ``model`` (keys under ``prefix``):
    the checkpoint's model, without its training objective's state (momentum copy, queues); returns
    the report and the checkpoint dict (for its tokenizer and config).

    ALBEF and BLIP checkpoints are recognised by their key names and loaded through the explicit key
    maps of ``models/convert.py`` (which raise on anything unexplained unless ``allow_mismatch``); the
    returned dict then holds ``model`` (our names), ``layout`` and ``source_config`` (their config),
    and no ``config`` / ``tokenizer`` (those always mean ours)."""
    ckpt = load_checkpoint(path)
    model_state, _ = checkpoint_states(ckpt)
    if any(k.startswith("visual_encoder.") for k in model_state):  # ALBEF / BLIP names
        from models.convert import detect_layout, load_foreign_state
        layout = detect_layout(ckpt["model"])
        report = load_foreign_state(model, model_state, source=str(path), allow_mismatch=allow_mismatch,
                                    prefix=prefix or None, expected_missing=expected_missing)
        own = model.state_dict()
        state = {k[len(prefix):]: own[k] for k in report.loaded if k.startswith(prefix)}
        return report, {"model": state, "layout": layout, "source_config": ckpt.get("config")}
    state = {prefix + k: v for k, v in model_state.items()}
    report = load_model_state(model, state, source=path, expected_missing=expected_missing)
    return report, ckpt




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


# ---------------------------------------------------------------------- weights and load reports
def raise_on_report(report: LoadReport, path: str, sections: str = "'model' section") -> None:
    """Raise ``ConfigError`` for unexplained missing/unexpected/mismatched keys of ``report``, adding
    that the config's ``sections`` must describe the model of the checkpoint ``path``."""
    try:
        report.raise_if_unexpected()
    except ValueError as err:
        raise ConfigError(f"{err}\nThe config's {sections} must describe the checkpoint's model "
                          f"(see the config.yaml beside {path}).") from None


def load_encoder_weights(model: torch.nn.Module, dist: D.DistInfo) -> list[LoadReport]:
    """Initialise a ``VLPModel``'s encoders from the local weight files its config names
    (``model.vision_weights``, ``model.text_weights``); prints each report (main process) and raises
    on unexplained keys. Returns the reports (none when no file is named)."""
    from models.vlp import load_pretrained_encoders
    reports = load_pretrained_encoders(model)
    for r in reports:
        if dist.is_main:
            print(r.summary(), flush=True)
        r.raise_if_unexpected()
    return reports


def load_selected_checkpoint(model: torch.nn.Module, out_dir: Path) -> tuple[Path, dict, bool]:
    """Load into ``model`` the checkpoint a fine-tuning run selected: ``checkpoint_best.pth`` (best
    val metric) when the run wrote one, else ``checkpoint_last.pth``. Returns the path, the
    checkpoint dict and whether it is the best one."""
    best = out_dir / "checkpoint_best.pth"
    chosen = best if best.is_file() else out_dir / "checkpoint_last.pth"
    ckpt = load_checkpoint(chosen)
    model.load_state_dict(ckpt["model"], strict=True)
    return chosen, ckpt, chosen == best
