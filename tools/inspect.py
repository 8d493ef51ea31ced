"""Show what a checkpoint holds (ours, ALBEF or BLIP) and which of our configs it fits.

    python -m tools.inspect output/demo_pretrain/checkpoint_last.pth
    python -m tools.inspect ALBEF_4M.pth --json report.json
    python -m tools.inspect model_base_retrieval_coco.pth --config configs/retrieval_coco.yaml

Prints: the file's entries, the key layout, parameter counts per component, the image encoder (width,
depth, patch size, position-embedding grid and so the image size it was trained at), the text
transformer (layers, which have cross-attention, vocabulary, positions), the contrastive size and
queue, the embedded config and tokenizer (our checkpoints), the config overrides that match it, and
for each YAML under configs/ (or the ones given) whether it fits and what the loader would adapt.
The file is read with ``torch.load(weights_only=True)``: no pickled code runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from models.loading import architecture, detect_layout, fit_problems, ours_prefix, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["describe", "suggested_overrides", "config_fits", "main"]


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e4 else str(n)


def _components(sd: dict, layout: str) -> dict[str, tuple[int, int]]:
    """component -> (tensors, parameters): keys grouped by their first name (after a task prefix)."""
    prefix = ours_prefix(sd) if layout == "ours" else ""
    out: dict[str, list[int]] = {}
    seen: set = set()
    for k, v in sd.items():
        name = k[len(prefix):] if prefix and k.startswith(prefix) else k
        comp = (prefix + name.split(".")[0]) if prefix and k.startswith(prefix) else name.split(".")[0]
        if layout == "albef" and name.startswith(("text_encoder.cls.", "text_encoder_m.cls.")):
            comp = name.split(".")[0] + ".cls (MLM head)"
        entry = out.setdefault(comp, [0, 0])
        entry[0] += 1
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ident not in seen:  # a tied tensor (MLM decoder = word embeddings) is counted once
            seen.add(ident)
            entry[1] += v.numel()
    return {k: (a, b) for k, (a, b) in out.items()}


def suggested_overrides(arch: dict) -> list[str]:
    """``--set`` overrides that give a model of the checkpoint's architecture (what the weights tell)."""
    v, t = arch["vision"], arch["text"]
    out = []
    for key, val in (("model.vision.img_size", v["img_size"]), ("model.vision.patch_size", v["patch_size"]),
                     ("model.vision.width", v["width"]), ("model.vision.depth", v["depth"]),
                     ("model.vision.mlp_ratio", v["mlp_ratio"]), ("model.vision.pre_norm", v["pre_norm"]),
                     ("model.text.hidden_size", t["hidden_size"]),
                     ("model.text.intermediate_size", t["intermediate_size"]),
                     ("model.text.max_position_embeddings", t["max_position_embeddings"]),
                     ("model.embed_dim", arch["embed_dim"]), ("loss.queue_size", arch["queue_size"])):
        if isinstance(val, bool):
            out.append(f"{key}={str(val).lower()}")
        elif val is not None:
            out.append(f"{key}={val:g}" if isinstance(val, float) else f"{key}={val}")
    if arch["layout"] != "ours" and v["width"] is not None:
        out += ["model.vision.act=gelu", "model.vision.layer_norm_eps=1e-6"]
    n, cross = t["num_layers"], t["cross_attention_layers"]
    if n:
        if arch["layout"] == "blip" or (cross and cross[0] == 0):
            out += [f"model.text.num_text_layers={n // 2}", f"model.text.num_fusion_layers={n - n // 2}"]
        else:
            n_text = cross[0] if cross else n
            out += [f"model.text.num_text_layers={n_text}", f"model.text.num_fusion_layers={n - n_text}"]
    return out


def _find_vlp_config(cfg: Any, depth: int = 0) -> Any:
    """The ``VLPConfig`` inside a run config (``cfg.model`` usually), or None."""
    from models.vlp import VLPConfig

    if isinstance(cfg, VLPConfig):
        return cfg
    if depth > 2 or not hasattr(cfg, "__dataclass_fields__"):
        return None
    for name in cfg.__dataclass_fields__:
        found = _find_vlp_config(getattr(cfg, name), depth + 1)
        if found is not None:
            return found
    return None


def _schemas() -> list[type]:
    from tools.config_docs import discover

    entries, _ = discover()
    return [e.cls for e in entries]


def _with_vocab(model_cfg: Any, arch: dict) -> Any:
    """A run's vocabulary size is set from its tokenizer (the checkpoint's own, or tokenizer.path), not
    from the YAML: compare with the checkpoint's."""
    vocab = arch["text"]["vocab_size"]
    if vocab is None:
        return model_cfg
    return dataclasses.replace(model_cfg, text=dataclasses.replace(model_cfg.text, vocab_size=vocab))


def config_fits(arch: dict, paths: list[Path]) -> list[dict]:
    """For each YAML config: ``{"config", "schema", "fits", "problems", "adaptations"}`` (or an ``error``)."""
    from engine.config import load_config

    schemas = _schemas()
    results = []
    for path in paths:
        if not Path(path).is_file():
            results.append({"config": str(path), "error": "file not found"})
            continue
        model_cfg, schema, errors = None, None, []
        for cls in schemas:
            try:
                run_cfg = load_config(cls, path)
                model_cfg = _find_vlp_config(run_cfg)
            except Exception as e:  # noqa: BLE001 - the YAML belongs to another schema
                errors.append(f"{cls.__name__}: {e}")
                continue
            if model_cfg is not None:
                schema = cls.__name__
                break
        if model_cfg is None:
            results.append({"config": str(path), "error": "not readable with any known run-config schema"})
            continue
        problems, adapt = fit_problems(arch, _with_vocab(model_cfg, arch))
        tok = getattr(run_cfg, "tokenizer", None)
        if arch["layout"] != "ours" and tok is not None and not getattr(tok, "path", None):
            problems.append("tokenizer.path is null: set it to a local bert-base-uncased directory (vocab.txt); "
                            "ALBEF/BLIP checkpoints embed no tokenizer")
        results.append({"config": str(path), "schema": schema, "fits": not problems, "problems": problems,
                        "adaptations": adapt})
    return results


def describe(path: str | os.PathLike, configs: Optional[list[Path]] = None) -> dict:
    """Everything :func:`main` prints, as a JSON-ready dict."""
    ckpt = read_checkpoint(path)
    sd = {**ckpt["model"], **ckpt.get("objective", {})}  # ours: the model and its training objective's state
    layout = detect_layout(sd)
    arch = architecture(sd, layout)
    info: dict[str, Any] = {
        "file": str(path), "size_mb": round(os.path.getsize(path) / 2 ** 20, 1),
        "entries": sorted(ckpt), "layout": layout, "tensors": len(sd),
        "parameters": sum(c[1] for c in _components(sd, layout).values()),
        "components": {k: {"tensors": a, "parameters": b} for k, (a, b) in _components(sd, layout).items()},
        "architecture": arch, "suggested_overrides": suggested_overrides(arch),
    }
    if "epoch" in ckpt:
        info["epoch"] = ckpt["epoch"]
    queue_ptr = sd.get("queue_ptr", sd.get("ptr_queue"))
    if queue_ptr is not None:
        info["queue_ptr"] = int(queue_ptr.reshape(-1)[0])
    info["idx_queue"] = "idx_queue" in sd
    cfg = ckpt.get("config")
    if isinstance(cfg, dict):
        info["config"] = cfg.get("model", cfg) if layout == "ours" else cfg
    tok = ckpt.get("tokenizer")
    if isinstance(tok, dict) and "vocab" in tok:
        info["tokenizer"] = {"kind": tok.get("kind"), "vocab_size": len(tok["vocab"]),
                             "lowercase": tok.get("do_lower_case"), "max_length": tok.get("model_max_length")}
    if configs is None:
        configs = sorted((ROOT / "configs").rglob("*.yaml"))
    info["fits"] = config_fits(arch, configs)
    return info


def _format(info: dict) -> str:
    a, v, t = info["architecture"], info["architecture"]["vision"], info["architecture"]["text"]
    lines = [f"{info['file']}  ({info['size_mb']} MB; entries: {', '.join(info['entries'])})",
             f"layout: {info['layout']}  ({info['tensors']} tensors, {_millions(info['parameters'])} values)"]
    if "epoch" in info:
        lines.append(f"epoch: {info['epoch']}")
    lines.append("components:")
    for name, c in info["components"].items():
        lines.append(f"  {name:32s} {_millions(c['parameters']):>9s}  ({c['tensors']} tensors)")
    if v["width"]:
        grid = f"{v['grid']}x{v['grid']}" if v["grid"] else "not square"
        lines.append(f"image encoder: ViT width {v['width']}, depth {v['depth']}, patch {v['patch_size']}, "
                     f"MLP ratio {v['mlp_ratio']:g}; pos_embed grid {grid} -> trained at "
                     f"{v['img_size'] or '?'} px")
    if t["num_layers"]:
        cross = t["cross_attention_layers"]
        where = ("none" if not cross else f"layers {cross[0]}-{cross[-1]}" if cross == list(range(cross[0], cross[-1] + 1))
                 else str(cross))
        lines.append(f"text transformer ({t['prefix']}): {t['num_layers']} layers, hidden {t['hidden_size']}, "
                     f"FFN {t['intermediate_size']}, vocabulary {t['vocab_size']}, {t['max_position_embeddings']} "
                     f"positions, {t['token_types']} token types; cross-attention: {where}")
        if info["layout"] == "blip":
            lines.append("  (BLIP: every layer has cross-attention; this project splits them into text and fusion "
                         "layers, so a BLIP checkpoint is an initialisation, not BLIP's model)")
    q = a["queue_size"]
    lines.append(f"contrastive: embed_dim {a['embed_dim']}; queue {q if q is not None else 'none'}"
                 + (f" (idx_queue {'yes' if info['idx_queue'] else 'no'}, pointer {info.get('queue_ptr')})"
                    if q is not None else ""))
    lines.append(f"heads: ITM {'yes' if a['itm_head'] else 'no'}, MLM {'yes' if a['mlm_head'] else 'no'}, "
                 f"momentum copy {'yes' if a['momentum'] else 'no'}, decoder layers {a['decoder_layers']}")
    if "tokenizer" in info:
        tk = info["tokenizer"]
        lines.append(f"tokenizer (embedded): {tk['kind']}, {tk['vocab_size']} tokens, lowercase {tk['lowercase']}")
    elif info["layout"] != "ours":
        lines.append("tokenizer: not embedded; ALBEF/BLIP use bert-base-uncased's vocabulary: set tokenizer.path to "
                     "a local bert-base-uncased directory (vocab.txt)")
    if "config" in info:
        lines.append("embedded config" + (" (model section)" if info["layout"] == "ours" else "") + ":")
        lines.append("  " + json.dumps(info["config"], sort_keys=True, default=str)[:2000])
    lines.append("matching overrides: --set " + " ".join(info["suggested_overrides"]))
    lines.append("fits:")
    for r in info["fits"]:
        rel = os.path.relpath(r["config"], ROOT) if os.path.isabs(r["config"]) else r["config"]
        if "error" in r:
            lines.append(f"  {rel}: ? ({r['error']})")
        elif r["fits"]:
            lines.append(f"  {rel}: YES" + (f" ({'; '.join(r['adaptations'])})" if r["adaptations"] else ""))
        else:
            lines.append(f"  {rel}: no")
            lines += [f"      - {p}" for p in r["problems"]]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint file (.pth/.pt/.bin/.safetensors)")
    p.add_argument("--config", nargs="+", type=Path, default=None,
                   help="YAML configs to test the fit against (default: every YAML under configs/)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the information as JSON")
    args = p.parse_args(argv)
    try:
        info = describe(args.checkpoint, args.config)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_format(info))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
