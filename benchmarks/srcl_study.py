"""SRCL vs InfoNCE where the false negatives are known: the synthetic shapes world.

The shapes generator's ``partial_caption_prob`` sets how many captions describe only part of a
scene ("there is a red circle"), i.e. how many (partial) false negatives a contrastive batch holds.
For each probability, the same tiny model is pre-trained (ITC only: the contrastive loss is what
differs) with ``infonce``, ``srcl`` and ``srcl`` with a helper model, same seeds, data and steps,
and evaluated by zero-shot ITC retrieval on that world's ``retrieval_test.json``, two ways:
standard R@K (only the paired item counts) and semantic R@K (every item the caption is true of
counts), plus the semantic mean average precision; and on the clean test captions (probability 0).

Stages (all under ``--work-dir``; finished stages are reused when their settings are unchanged):

1. worlds: one shapes world per probability (same scenes and images, other captions);
2. a tokenizer trained on all worlds' captions (shared, so that every checkpoint can serve as a
   helper or an initialisation of every other);
3. the *base* model: InfoNCE on clean full-scene captions (probability 0), ``--base-steps`` steps.
   It is the helper of the ``srcl_helper`` runs (as the paper uses a COCO-trained helper) and, unless
   ``--from-scratch``, the initialisation of every study run: the paper starts from pre-trained
   encoders (CLIP ViT, BERT), and the tiny model from random weights spends its first few hundred
   steps escaping a collapsed state in which every feature is the same (docs/srcl_study.md);
4. the grid: probability x method x seed, ``--steps`` steps each, ``--jobs`` runs in parallel;
5. results: JSON with every number, PNG plots, a Markdown table.

    python benchmarks/srcl_study.py                       # the default study (23 min on 2 idle cores)
    python benchmarks/srcl_study.py --quick               # smoke run of the whole pipeline (a few minutes)
    python benchmarks/srcl_study.py --probs 1.0 --seeds 0 1 --methods srcl \\
        --variant srcl_d4:loss.contrastive.delta=4 --out benchmarks/results/srcl_sweep_delta.json

``--variant NAME:key=value,...`` adds a method given by config overrides (``@base`` stands for the
base checkpoint). Results: ``--out`` (JSON), ``<out stem>_recall.png``, ``<out stem>_diagnostics.png``,
``<out stem>_table.md`` (recall, the trained checkpoints' weight AUC, and the paired differences to
``--reference``, default ``srcl``), with ``--heatmap METHOD ...`` ``<out stem>_heatmap.png`` (one test
batch's weights beside the ground truth, the paper's App. F).
``--finished-only`` trains nothing and summarises the runs of the grid that have a result (runs
made in parts, e.g. on a shared machine). The study with the generality evidence (docs/srcl_study.md):

    python benchmarks/srcl_study.py --base-threads 1 --methods infonce srcl srcl_g \
        --variant srcl_g:loss.contrastive.generality_weight=1.5,loss.contrastive.standardise=true,loss.contrastive.delta=1 \
        --keep-checkpoints --heatmap srcl srcl_g
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO_CONFIG = ROOT / "configs/demo/pretrain.yaml"

# The study's training settings on top of configs/demo/pretrain.yaml (the demo model).
STUDY_OVERRIDES = {
    "loss.itm": 0.0, "loss.mlm": 0.0,              # ITC only: the contrastive loss is the variable
    "model.text.hidden_dropout": 0.0, "model.text.attention_dropout": 0.0,
    "data.num_workers": 0, "x-synthetic": "null",
    "train.batch_size": 32, "train.epochs": 100000, "train.log_every": 10, "train.save_every": 100000,
    "train.keep_epoch_checkpoints": "false", "train.progress": "false",
    "diagnostics.every": 10,
}
# the base run (from random weights) has to escape the collapsed start, in which every feature is
# the same (docs/srcl_study.md): in-batch negatives against the current features (momentum 0, no
# queue: ALBEF's lagging momentum keys stall the escape) and a low ViT learning rate
BASE_OVERRIDES = {"optim.lr": 5e-4, "optim.lr_vision": 5e-5, "schedule.warmup_steps": 50,
                  "loss.momentum": 0.0, "loss.contrastive.use_queue": "false",
                  "loss.contrastive.kind": "infonce"}
# the study runs, continuing from the base
# (the demo delays the queue until its features have escaped the collapsed start; the base has escaped)
RUN_OVERRIDES = {"optim.lr": 2e-4, "optim.lr_vision": 1e-4, "schedule.warmup_steps": 20,
                 "loss.contrastive.queue_start_step": 0}
# --from-scratch study runs use the base run's optimiser settings (with the demo's momentum and queue)
SCRATCH_OVERRIDES = {k: v for k, v in BASE_OVERRIDES.items() if k.startswith(("optim.", "schedule."))}
# --quick: a tiny model on a tiny world
QUICK_MODEL = {
    "model.vision.img_size": 32, "model.vision.patch_size": 8, "model.vision.width": 32, "model.vision.depth": 1,
    "model.vision.num_heads": 2, "model.text.hidden_size": 32, "model.text.num_text_layers": 1,
    "model.text.num_fusion_layers": 1, "model.text.num_heads": 2, "model.text.intermediate_size": 64,
    "model.embed_dim": 16, "loss.queue_size": 64, "tokenizer.vocab_size": 200, "train.batch_size": 16,
    "diagnostics.every": 2, "train.log_every": 2,
}
QUICK_WORLD = {"image_size": 32, "num_train_images": 96, "num_val_images": 8, "num_test_images": 24,
               "captions_per_image": 3, "vqa_questions_per_image": 1, "nlvr2_pairs": (4, 2, 2)}

METHODS = {
    "infonce": {"loss.contrastive.kind": "infonce"},
    "srcl": {"loss.contrastive.kind": "srcl"},
    "srcl_helper": {"loss.contrastive.kind": "srcl", "loss.contrastive.helper_checkpoint": "@base"},
}
METHOD_LABELS = {"infonce": "InfoNCE", "srcl": "SRCL", "srcl_helper": "SRCL + helper"}
CURVE_KEYS = ("loss_itc", "temp", "alpha", "srcl/w_top1", "srcl/w_std", "diag/false_negative_rate",
              "diag/weight_auc", "diag/weight_w_false_neg", "diag/weight_w_true_neg", "diag/sim_auc",
              "diag/sim_centred_auc", "diag/helper_sim_auc", "diag/queue_weight_auc", "diag/queue_sim_auc",
              "diag/queue_sim_centred_auc", "diag/queue_helper_sim_auc", "diag/queue_weight_w_false_neg",
              "diag/queue_weight_w_true_neg", "diag/queue_false_negative_rate")


# ----------------------------------------------------------------------------------- helpers
def _fmt_prob(p: float) -> str:
    return f"{p:.2f}"


def _overrides(d: dict) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


def _load_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _newer(path: Path, than: str) -> Optional[bool]:
    """Whether ``path`` was written after ``than`` (None when either is missing)."""
    if not path.is_file() or not os.path.exists(than):
        return None
    return os.path.getmtime(path) >= os.path.getmtime(than)


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:key=value,key=value`` -> (name, overrides)."""
    if ":" not in text:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:key=value[,key=value...]")
    name, rest = text.split(":", 1)
    over = {}
    for item in filter(None, rest.split(",")):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {item!r} is not key=value")
        k, v = item.split("=", 1)
        over[k.strip()] = v.strip()
    return name.strip(), over


# ------------------------------------------------------------------------------- stages 1-2
def make_worlds(work: Path, probs: list[float], quick: bool, seed: int) -> dict[str, Path]:
    """One shapes world per caption probability (+ 0.0 for the base), same scenes and images."""
    from shapesworld.config import ShapesConfig
    from shapesworld.write import ensure_shapes
    worlds = {}
    for p in sorted(set(probs) | {0.0}):
        extra = QUICK_WORLD if quick else {}
        cfg = ShapesConfig(seed=seed, partial_caption_prob=p, **extra)
        root = work / "worlds" / f"p{_fmt_prob(p)}"
        t0 = time.time()
        _, created = ensure_shapes(root, cfg, workers=2)
        if created:
            print(f"[study] world partial_caption_prob={p}: generated in {time.time() - t0:.0f} s ({root})", flush=True)
        worlds[_fmt_prob(p)] = root
    return worlds


def make_tokenizer_dir(work: Path, worlds: dict[str, Path], vocab_size: int) -> Path:
    """A WordPiece vocabulary trained on the training captions of every world, saved once."""
    from datasets.text import pre_caption, save_tokenizer, train_wordpiece_tokenizer
    out = work / "tokenizer"
    stamp = {"worlds": sorted(worlds), "vocab_size": vocab_size}
    if (out / "vocab.txt").is_file() and _load_json(out / "study_stamp.json") == stamp:
        return out
    texts = []
    for root in worlds.values():
        for rec in json.loads((root / "pretrain.json").read_text(encoding="utf-8")):
            texts += [pre_caption(c) for c in rec["caption"]]
    save_tokenizer(train_wordpiece_tokenizer(texts, vocab_size), out)
    _write_json(out / "study_stamp.json", stamp)
    return out


# ---------------------------------------------------------------------------------- a run
def run_spec(name: str, world: Path, out_dir: Path, seed: int, steps: int, threads: int, overrides: dict,
             init_from: Optional[str], evals: dict[str, str], model_overrides: dict) -> dict:
    """Everything a worker needs for one training run + evaluation (also its reuse key)."""
    over = {**STUDY_OVERRIDES, **model_overrides, **overrides,
            "data.train_files": f"[{world / 'pretrain.json'}]", "data.image_root": str(world),
            "train.output_dir": str(out_dir), "train.seed": seed, "train.max_steps": steps,
            "train.num_threads": threads}
    # the demo config's text is part of the reuse key: a changed demo recipe invalidates old results
    demo = hashlib.sha256(DEMO_CONFIG.read_bytes()).hexdigest()[:16]
    return {"name": name, "overrides": _overrides(over), "init_from": init_from, "evals": evals,
            "out_dir": str(out_dir), "demo_config_sha256": demo}


def final_diagnostics(ckpt: str, world: str, run_cfg=None, batch_size: int = 64, **kwargs) -> dict:
    """The SRCL diagnostics of a run's last checkpoint on ``world``'s test split, with the weights its
    last steps trained with: its own similarity mixed with its helper's at the schedule's final alpha
    (``loss.contrastive.alpha_at(1.0)``; 0, the helper left out, for the default linear decay).
    ``run_cfg`` is the run's ``PretrainConfig`` (default: the one saved in ``ckpt``); ``kwargs`` go
    to ``tasks.srcl_diagnostics.diagnose_checkpoint``."""
    from tasks.srcl_diagnostics import diagnose_checkpoint

    if run_cfg is None:
        from engine.checkpoint import load_checkpoint
        from tasks.common import saved_run_config
        from tasks.pretrain import PretrainConfig
        run_cfg = saved_run_config(PretrainConfig, load_checkpoint(ckpt)["config"])
    c = run_cfg.loss.contrastive
    alpha = c.alpha_at(1.0)
    helper = c.helper_checkpoint if alpha > 0 else None
    return diagnose_checkpoint(ckpt, world, "test", batch_size=batch_size, progress=False, helper=helper,
                               alpha=alpha if helper else None, **kwargs)


def method_overrides(method: str, variants: dict[str, dict], prob_key: str, base_ckpt: str,
                     from_scratch: bool) -> dict:
    """The config overrides of ``method``'s runs on the world ``prob_key`` (e.g. ``"0.50"``): the run
    settings, the built-in method's and then its ``--variant``'s; ``@base`` stands for the base
    checkpoint, and ``{prob}`` in a value for the world (one helper per world, say)."""
    over = {**METHODS.get(method, {}), **variants.get(method, {})}
    over = {k: base_ckpt if v == "@base" else (v.replace("{prob}", prob_key) if isinstance(v, str) else v)
            for k, v in over.items()}
    return {**(SCRATCH_OVERRIDES if from_scratch else RUN_OVERRIDES), **over}


def worker(spec: dict, keep_checkpoint: bool) -> dict:
    """Train one run (in this process) and evaluate it; writes and returns ``result.json``."""
    import torch
    from engine.config import load_config
    from tasks.pretrain import PretrainConfig, run
    from tasks.zero_shot import load_vlp_checkpoint, zero_shot_retrieval

    out = Path(spec["out_dir"])
    for stale in ("log.jsonl", "result.json", "checkpoint_last.pth"):  # a fresh run; keep spec.json, worker.log
        (out / stale).unlink(missing_ok=True)
    cfg = load_config(PretrainConfig, DEMO_CONFIG, spec["overrides"])
    t0, c0 = time.time(), time.process_time()
    state = run(cfg, init_from=spec["init_from"])
    train_s, train_cpu = time.time() - t0, time.process_time() - c0
    ckpt = out / "checkpoint_last.pth"
    model, tok, ccfg = load_vlp_checkpoint(str(ckpt))
    torch.set_num_threads(max(1, cfg.train.num_threads))
    # CPU seconds: with one thread per run they estimate the wall time on an idle machine
    res: dict[str, Any] = {"spec": spec, "steps": state.global_step, "train_seconds": train_s,
                           "train_cpu_seconds": train_cpu, "eval": {}}
    c1 = time.process_time()
    for label, root in spec["evals"].items():
        res["eval"][label] = zero_shot_retrieval(model, tok, root, "test", transform_cfg=ccfg.data.transform,
                                                 progress=False)
    own = spec["evals"]["own"]
    res["final_diagnostics"] = final_diagnostics(str(ckpt), own, ccfg)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    res["curves"] = {k: [(r["step"], r[k]) for r in log if k in r and r[k] is not None] for k in CURVE_KEYS}
    res["curves"] = {k: v for k, v in res["curves"].items() if v}
    res["eval_cpu_seconds"] = time.process_time() - c1
    res["process_cpu_seconds"] = time.process_time()  # all of this worker, start-up included
    speeds = [r["pairs_per_s"] for r in log if "pairs_per_s" in r]
    res["pairs_per_s"] = statistics.median(speeds) if speeds else float("nan")
    if not keep_checkpoint:
        ckpt.unlink(missing_ok=True)
    _write_json(out / "result.json", res)
    return res


def launch(spec: dict, keep_checkpoint: bool, reuse: bool, finished_only: bool = False) -> Optional[dict]:
    """Run ``spec`` in a subprocess (a crash or hang stays contained) unless a result for the same
    spec exists; returns the result (None with ``finished_only`` when there is none yet)."""
    out = Path(spec["out_dir"])
    done = _load_json(out / "result.json")
    # a result is stale when a checkpoint it started from or used as helper is newer
    deps = [spec["init_from"]] + [o.split("=", 1)[1] for o in spec["overrides"]
                                  if o.startswith("loss.contrastive.helper_checkpoint=")]
    fresh = done is not None and all(
        not d or d == "null" or not os.path.exists(d) or os.path.getmtime(d) <= os.path.getmtime(out / "result.json")
        for d in deps)
    # --finished-only trains nothing, so a result for the same spec counts even when a checkpoint it
    # started from was re-made since (the report's runs[].from_current_base says which did)
    fresh = fresh or (finished_only and done is not None)
    if reuse and fresh and done.get("spec") == spec and (not keep_checkpoint or (out / "checkpoint_last.pth").is_file()):
        print(f"[study] {spec['name']}: reused", flush=True)
        return {**done, "reused": True}
    if finished_only:
        print(f"[study] {spec['name']}: not finished, left out", flush=True)
        return None
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.json"
    _write_json(spec_path, spec)
    t0 = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)]
    if keep_checkpoint:
        cmd.append("--keep-checkpoint")
    with open(out / "worker.log", "w", encoding="utf-8") as logf:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = (out / "worker.log").read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"study run {spec['name']} failed (exit {proc.returncode}); {out / 'worker.log'}:\n"
                           + "\n".join(tail))
    res = _load_json(out / "result.json")
    print(f"[study] {spec['name']}: {res['steps']} steps in {time.time() - t0:.0f} s "
          f"({res['pairs_per_s']:.0f} pairs/s); semantic r_mean {res['eval']['own'].get('semantic', {}).get('r_mean', float('nan')):.1f}",
          flush=True)
    return res


# ------------------------------------------------------------------------------- aggregation
RECALL_KEYS = ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean")


def _paired_diffs(by: dict, pk: str, runs: list[dict], reference: str, key: str) -> Optional[dict]:
    """``key`` (``<eval>/<kind>/<metric>``) of ``runs`` minus the ``reference`` run of the same seed
    (seeds without one left out): mean, std, per seed, and on how many seeds the run is higher."""
    ev_label, kind, name = key.split("/", 2)
    diffs = []
    for r in runs:
        b = by.get((pk, reference, r["seed"]))
        bv = b["eval"].get(ev_label, {}).get(kind, {}).get(name) if b is not None else None
        rv = r["eval"].get(ev_label, {}).get(kind, {}).get(name)
        if bv is not None and rv is not None:
            diffs.append(rv - bv)
    if not diffs:
        return None
    mu, sd = _mean_std(diffs)
    return {"mean": mu, "std": sd, "per_seed": diffs, "wins": sum(d > 0 for d in diffs), "n": len(diffs)}


def summarise(results: list[dict], methods: list[str], probs: list[float], seeds: list[int],
              reference: Optional[str] = None) -> dict:
    """Mean, std and per-seed values of every metric per (probability, method), and paired
    differences (same seed) to InfoNCE (``diff_vs_infonce``) and to ``reference``
    (``diff_vs_reference``; not for InfoNCE and the reference itself)."""
    by = {(r["prob"], r["method"], r["seed"]): r for r in results}
    table: dict[str, Any] = {}
    for p in probs:
        pk = _fmt_prob(p)
        table[pk] = {}
        for m in methods:
            entry: dict[str, Any] = {}
            runs = [by.get((pk, m, s)) for s in seeds]
            runs = [r for r in runs if r is not None]
            if not runs:
                continue
            metrics: dict[str, list[float]] = {}
            for r in runs:
                for ev_label, ev in r["eval"].items():
                    for kind in ("standard", "semantic"):
                        for k, v in ev.get(kind, {}).items():
                            metrics.setdefault(f"{ev_label}/{kind}/{k}", []).append(v)
                for k, v in r["final_diagnostics"].items():
                    if isinstance(v, float):
                        metrics.setdefault(f"final_diag/{k}", []).append(v)
            for k, vals in metrics.items():
                mu, sd = _mean_std(vals)
                entry[k] = {"mean": mu, "std": sd, "per_seed": vals}
            for k in [k for k in metrics if not k.startswith("final_diag/")]:
                for field, ref in (("diff_vs_infonce", "infonce"), ("diff_vs_reference", reference)):
                    d = _paired_diffs(by, pk, runs, ref, k) if ref and m not in ("infonce", ref) else None
                    if d is not None:
                        entry[k][field] = d
            table[pk][m] = entry
    return table


def _cell(entry: dict, key: str, diff: bool = False) -> str:
    e = entry.get(key)
    if e is None:
        return "-"
    s = f"{e['mean']:.1f} ± {e['std']:.1f}"
    if diff and "diff_vs_infonce" in e:
        d = e["diff_vs_infonce"]
        s += f" ({d['mean']:+.1f}, {d['wins']}/{d['n']})"
    return s


def markdown_table(summary: dict, methods: list[str], fn_rates: dict[str, float], chance: dict[str, dict],
                   test_size: tuple[int, int] = (0, 0)) -> str:
    """The README table: zero-shot retrieval on each world's own test split."""
    cols = [("own/standard/r_mean", "standard R_mean"), ("own/standard/txt_r1", "std i2t R@1"),
            ("own/standard/img_r1", "std t2i R@1"), ("own/semantic/r_mean", "semantic R_mean"),
            ("own/semantic/txt_r1", "sem i2t R@1"), ("own/semantic/img_r1", "sem t2i R@1"),
            ("own/semantic/img_map", "sem t2i mAP"), ("clean/standard/r_mean", "clean-caption std R_mean")]
    lines = ["| partial captions | FN per 32-batch negative | method | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for pk, per_method in summary.items():
        for m in methods:
            entry = per_method.get(m)
            if not entry:
                continue
            cells = [_cell(entry, k, diff=True) for k, _ in cols]
            lines.append(f"| {pk} | {fn_rates.get(pk, float('nan')):.3f} | {METHOD_LABELS.get(m, m)} | "
                         + " | ".join(cells) + " |")
        ch = chance.get(pk)
        if ch:
            cells = ["-", "-", "-", f"{ch['r_mean']:.1f}", f"{ch['txt_r1']:.1f}", f"{ch['img_r1']:.1f}", "-", "-"]
            lines.append(f"| {pk} | | (random ranking) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Mean ± std over seeds; in brackets the mean paired difference to InfoNCE (same seed) and "
                 "on how many seeds the method is better. Recalls in %, on each world's own "
                 f"retrieval_test.json ({test_size[0]} images, {test_size[1]} captions), 'clean-caption' on the full-scene "
                 "test captions (partial probability 0).")
    return "\n".join(lines)


def auc_table(summary: dict, methods: list[str]) -> str:
    """How well the trained checkpoints' weights find the false negatives (``final_diagnostics``)."""
    cols = [("final_diag/weight_auc", "weight AUC"), ("final_diag/weight_w_false_neg", "mean w of false negatives"),
            ("final_diag/weight_w_true_neg", "of true negatives"), ("final_diag/w_top1", "of the most similar negative")]
    lines = ["| partial captions | method | " + " | ".join(c[1] for c in cols) + " | lowest AUC of a seed |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    for pk, per_method in summary.items():
        for m in methods:
            entry = per_method.get(m)
            if not entry or "final_diag/weight_auc" not in entry:
                continue
            cells = [f"{entry[k]['mean']:.3f} ± {entry[k]['std']:.3f}" if k in entry else "-" for k, _ in cols]
            lines.append(f"| {pk} | {METHOD_LABELS.get(m, m)} | " + " | ".join(cells)
                         + f" | {min(entry['final_diag/weight_auc']['per_seed']):.3f} |")
    lines.append("")
    lines.append("The trained checkpoints on each world's test split (tasks/srcl_diagnostics.py, batches of 64 pairs, "
                 "image anchors): the ROC AUC with which a low weight picks out the true false negatives among the "
                 "negatives, and the mean weights; mean ± std over seeds.")
    return "\n".join(lines)


REFERENCE_COLS = (("own/standard/r_mean", "standard R_mean"), ("own/semantic/r_mean", "semantic R_mean"),
                  ("clean/standard/r_mean", "clean-caption R_mean"))


def reference_table(summary: dict, methods: list[str], reference: str) -> str:
    """Each method's R_mean minus ``reference``'s, paired by seed (``summarise(..., reference)``'s
    ``diff_vs_reference``: mean and on how many seeds it is higher): the study's comparison with the
    paper's delta 1 beside the one with InfoNCE."""
    label = METHOD_LABELS.get(reference, reference)
    lines = ["| partial captions | method | " + " | ".join(f"{c[1]} vs {label}" for c in REFERENCE_COLS) + " |",
             "|---|---|" + "---|" * len(REFERENCE_COLS)]
    for pk, per_method in summary.items():
        for m in methods:
            diffs = [per_method.get(m, {}).get(k, {}).get("diff_vs_reference") for k, _ in REFERENCE_COLS]
            if all(d is None for d in diffs):
                continue
            cells = ["-" if d is None else f"{d['mean']:+.1f} ({d['wins']}/{d['n']})" for d in diffs]
            lines.append(f"| {pk} | {METHOD_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- plots
def _smooth(points: list[tuple[int, float]], window: int) -> tuple[list[int], list[float]]:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    out = []
    for i in range(len(ys)):
        seg = [y for y in ys[max(0, i - window + 1):i + 1] if y is not None and not math.isnan(y)]
        out.append(statistics.fmean(seg) if seg else float("nan"))
    return xs, out


def plot_recall(summary: dict, methods: list[str], path: Path, fn_rates: dict[str, float],
                chance: dict[str, dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("own/standard/r_mean", "standard R_mean (paired only)"),
              ("own/semantic/r_mean", "semantic R_mean (any true item)"),
              ("own/semantic/img_map", "semantic t2i mAP")]
    probs = sorted(summary, key=float)
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(15, 3.6))
    colors = {"infonce": "tab:gray", "srcl": "tab:blue", "srcl_helper": "tab:orange"}
    spare = iter(["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"] * 10)
    colors.update({m: next(spare) for m in methods if m not in colors})  # --variant methods
    for ax, (key, title) in zip(axes, panels):
        for j, m in enumerate(methods):
            xs, mus = [], []
            for pk in probs:
                e = summary[pk].get(m, {}).get(key)
                if e is None:
                    continue
                x = float(pk) + (j - (len(methods) - 1) / 2) * 0.015
                xs.append(x)
                mus.append(e["mean"])
                ax.scatter([x] * len(e["per_seed"]), e["per_seed"], s=12, alpha=0.6,
                           color=colors.get(m), edgecolors="none")
            ax.plot(xs, mus, marker="o", ms=4, lw=1.5, label=METHOD_LABELS.get(m, m), color=colors.get(m))
        if key.startswith("own/semantic/r_mean"):
            ax.plot([float(pk) for pk in probs if pk in chance], [chance[pk]["r_mean"] for pk in probs if pk in chance],
                    ls=":", color="k", lw=1, label="random ranking")
        ax.set_title(title, fontsize=10)
    # paired differences to InfoNCE (same seed) of the semantic R_mean
    ax = axes[-1]
    for j, m in enumerate(methods):
        if m == "infonce":
            continue
        xs, mus = [], []
        for pk in probs:
            d = summary[pk].get(m, {}).get("own/semantic/r_mean", {}).get("diff_vs_infonce")
            if d is None:
                continue
            x = float(pk) + (j - (len(methods) - 1) / 2) * 0.015
            xs.append(x)
            mus.append(d["mean"])
            ax.scatter([x] * len(d["per_seed"]), d["per_seed"], s=12, alpha=0.6, color=colors.get(m), edgecolors="none")
        ax.plot(xs, mus, marker="o", ms=4, lw=1.5, color=colors.get(m), label=METHOD_LABELS.get(m, m))
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_title("semantic R_mean minus InfoNCE (same seed)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("partial-caption probability")
        ax.set_xticks([float(p) for p in probs])
        ax.set_xticklabels([f"{p}\n(FN {fn_rates.get(p, float('nan')):.3f})" for p in probs], fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[1].legend(fontsize=8)
    fig.suptitle("Zero-shot ITC retrieval after pre-training (dots: seeds; FN = false-negative rate of a 32-batch)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_diagnostics(results: list[dict], probs: list[float], path: Path, window: int = 5) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [("srcl", "diag/weight_auc", "SRCL weight (low = FN)", "tab:blue", "-"),
             ("srcl_helper", "diag/weight_auc", "SRCL + helper weight", "tab:orange", "-"),
             ("srcl", "diag/sim_auc", "momentum similarity, raw", "tab:green", ":"),
             ("srcl", "diag/sim_centred_auc", "momentum similarity, centred per anchor", "tab:green", "--"),
             ("srcl_helper", "diag/helper_sim_auc", "helper similarity, raw", "tab:red", ":")]
    spare = iter(["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"] * 10)
    lines += [(m, "diag/weight_auc", f"{m} weight", next(spare), "-")  # --variant methods
              for m in sorted({r["method"] for r in results} - set(METHODS))]
    rows = [("in-batch negatives", ""), ("queued negatives", "queue_")]
    pks = [_fmt_prob(p) for p in sorted(probs)]
    fig, axes = plt.subplots(len(rows), len(pks), figsize=(4 * len(pks), 3.2 * len(rows)), squeeze=False)
    for r, (row_title, prefix) in enumerate(rows):
        for c, pk in enumerate(pks):
            ax = axes[r][c]
            for method, key, label, color, ls in lines:
                key = key.replace("diag/", f"diag/{prefix}")
                runs = [x for x in results if x["prob"] == pk and x["method"] == method and key in x["curves"]]
                if not runs:
                    continue
                curves = [_smooth(x["curves"][key], window) for x in runs]
                steps = curves[0][0]
                n = min(len(cv[1]) for cv in curves)
                mean = [statistics.fmean([cv[1][i] for cv in curves]) for i in range(n)]
                lo = [min(cv[1][i] for cv in curves) for i in range(n)]
                hi = [max(cv[1][i] for cv in curves) for i in range(n)]
                ax.plot(steps[:n], mean, color=color, ls=ls, lw=1.4, label=label)
                ax.fill_between(steps[:n], lo, hi, color=color, alpha=0.12, lw=0)
            ax.axhline(0.5, color="k", lw=0.6, ls=":")
            ax.set_ylim(0.2, 1.0)
            ax.set_title(f"partial p={pk}: {row_title}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel("AUC for the true false negatives")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        if len(h) > len(handles):
            handles, labels = h, lab
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"SRCL diagnostics during pre-training (mean over seeds, band = min..max, moving mean of {window})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=70)
    plt.close(fig)


HEATMAP_VMAX = 2.0  # one colour scale for every panel (the weights average 1 per anchor)


def plot_heatmaps(ckpts: dict[str, str], world: str, path: Path, batch_size: int = 32, seed: int = 0) -> dict:
    """The paper's App. F figure: for one batch of ``world``'s test pairs (``batch_size`` pairs,
    shuffled with ``seed``), the ground truth (captions true of each anchor image; the false
    negatives marked) beside each checkpoint's SRCL weights (``tasks.srcl_diagnostics``). Returns
    the weight AUC of that batch per label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    # each run's weights as its last steps computed them (with its helper, if it kept one)
    batches = {label: final_diagnostics(ck, world, batch_size=batch_size, seed=seed, keep_batch=True)["batch"]
               for label, ck in ckpts.items()}
    first = next(iter(batches.values()))
    truth, neg = np.array(first["truth"], dtype=bool), np.array(first["neg"], dtype=bool)
    fn = truth & neg
    fig, axes = plt.subplots(1, 1 + len(batches), figsize=(4.2 * (1 + len(batches)), 4.4))
    axes[0].imshow(np.where(~neg, 1.0, np.where(truth, 0.5, 0.0)), cmap="Greys", vmin=0, vmax=1)
    axes[0].set_title("ground truth: positives (black),\nfalse negatives (grey, x)", fontsize=9)
    ys, xs = np.nonzero(fn)
    aucs = {}
    from models.losses import roc_auc
    for ax, (label, b) in zip(axes[1:], batches.items()):
        w = np.array(b["weights"], dtype=float)
        im = ax.imshow(np.where(neg, w, np.nan), cmap="viridis", vmin=0.0, vmax=HEATMAP_VMAX)
        ax.scatter(xs, ys, marker="x", s=14, c="red", linewidths=0.8)
        aucs[label] = roc_auc(-w[neg], truth[neg])
        ax.set_title(f"{label}: weights (positives blank, colours clipped at {HEATMAP_VMAX:g})\nFN mean w {w[fn].mean():.2f}, TN {w[neg & ~truth].mean():.2f}, "
                     f"AUC {aucs[label]:.2f}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes:
        ax.set_xlabel("caption of the batch")
        ax.set_ylabel("anchor image (row = pair)")
    axes[0].scatter(xs, ys, marker="x", s=14, c="red", linewidths=0.8)
    fig.suptitle(f"One {batch_size}-pair test batch of {Path(world).name}: SRCL weights vs the true false negatives (red x)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return aucs


# --------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny world and model, few steps, seed 0, p in {0, 1}")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2)")
    p.add_argument("--probs", type=float, nargs="+", default=None,
                   help="partial_caption_prob values of the worlds (default 0.0 0.5 1.0)")
    p.add_argument("--methods", nargs="+", default=None, help=f"of {sorted(METHODS)} (default: all)")
    p.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME:key=value,...",
                   help="an extra method given by config overrides; @base = the base checkpoint, {prob} in a "
                        "value = the world's partial-caption probability (0.50)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per study run (default 300)")
    p.add_argument("--base-steps", type=int, default=None, help="steps of the base InfoNCE run (default 1200)")
    p.add_argument("--from-scratch", action="store_true", help="study runs start from random weights, not the base")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--base-threads", type=int, default=None,
                   help="torch threads of the base run, which runs alone (default: jobs x threads; use 1 on a "
                        "busy machine, where waiting threads burn CPU)")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the shapes worlds")
    p.add_argument("--work-dir", default=None, help="worlds, runs and checkpoints (default output/srcl_study[_quick])")
    p.add_argument("--out", default=None,
                   help="results JSON (default benchmarks/results/srcl_study.json; quick: <work-dir>/srcl_study.json)")
    p.add_argument("--no-reuse", action="store_true", help="redo finished runs")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: summarise the runs of the grid that have finished (the others are left out)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every study run's checkpoint_last.pth")
    p.add_argument("--heatmap", nargs="+", default=None, metavar="METHOD",
                   help="also draw one test batch's weights of these methods (seed = the first, world = --heatmap-prob) "
                        "beside the ground truth: <out stem>_heatmap.png (implies --keep-checkpoints)")
    p.add_argument("--reference", default=None, metavar="METHOD",
                   help="a second reference for paired differences (default srcl when studied; '' for none)")
    p.add_argument("--heatmap-prob", type=float, default=0.5, help="the world of the heat-map (default 0.5)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--keep-checkpoint", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text(encoding="utf-8")), args.keep_checkpoint)
        return 0
    quick = args.quick
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    probs = args.probs or ([0.0, 1.0] if quick else [0.0, 0.5, 1.0])
    methods = args.methods or list(METHODS)
    variants = dict(args.variant)
    unknown = [m for m in methods if m not in METHODS and m not in variants]
    if unknown:
        print(f"error: unknown methods {unknown}; built in: {sorted(METHODS)} (add others with --variant)",
              file=sys.stderr)
        return 2
    methods += [v for v in variants if v not in methods]
    if args.heatmap:
        missing = [m for m in args.heatmap if m not in methods]
        if missing or args.heatmap_prob not in (args.probs or ([0.0, 1.0] if quick else [0.0, 0.5, 1.0])):
            print(f"error: --heatmap {args.heatmap} at --heatmap-prob {args.heatmap_prob}: every method must be one "
                  "of the study's methods and the probability one of its worlds", file=sys.stderr)
            return 2
        args.keep_checkpoints = True
    if args.reference and args.reference not in methods:
        print(f"error: --reference {args.reference} is not one of the study's methods {methods}", file=sys.stderr)
        return 2
    steps = args.steps or (20 if quick else 300)
    base_steps = args.base_steps or (40 if quick else 1200)
    work = Path(args.work_dir or ("output/srcl_study_quick" if quick else "output/srcl_study"))
    out_json = Path(args.out or (work / "srcl_study.json" if quick else "benchmarks/results/srcl_study.json"))
    model_over = QUICK_MODEL if quick else {}
    reuse = not args.no_reuse
    base_ckpt = str(work / "base" / "checkpoint_last.pth")
    if not args.finished_only:  # a helper that is not there would fail its runs only after the base has trained
        for p in probs:
            for m in methods:
                h = method_overrides(m, variants, _fmt_prob(p), base_ckpt, args.from_scratch).get(
                    "loss.contrastive.helper_checkpoint")
                if h and h != base_ckpt and not Path(h).is_file():
                    print(f"error: method {m} on the world {_fmt_prob(p)}: loss.contrastive.helper_checkpoint {h} "
                          "is not a file", file=sys.stderr)
                    return 2
    t_start = time.time()

    from engine.config import load_config
    from tasks.pretrain import PretrainConfig
    vocab = load_config(PretrainConfig, DEMO_CONFIG, _overrides(model_over)).tokenizer.vocab_size
    worlds = make_worlds(work, probs, quick, args.world_seed)
    tok_dir = make_tokenizer_dir(work, worlds, vocab)
    clean = str(worlds[_fmt_prob(0.0)])

    # stage 3: the base (helper) model
    base_dir = work / "base"
    base_spec = run_spec("base", worlds[_fmt_prob(0.0)], base_dir, 0, base_steps,
                         args.base_threads or args.threads * args.jobs,
                         {**BASE_OVERRIDES, "tokenizer.path": str(tok_dir)}, None, {"own": clean}, model_over)
    print(f"[study] base model: InfoNCE on clean captions, {base_steps} steps", flush=True)
    base = launch(base_spec, keep_checkpoint=True, reuse=reuse, finished_only=args.finished_only)
    if base is None:
        print("[study] --finished-only: the base run has no result for these settings; the report has none",
              flush=True)

    # stage 4: the grid
    specs = []
    for p in probs:
        pk = _fmt_prob(p)
        for m in methods:
            over = method_overrides(m, variants, pk, base_ckpt, args.from_scratch)
            if args.from_scratch:
                over["tokenizer.path"] = str(tok_dir)
            for s in seeds:
                name = f"p{pk}_{m}_s{s}"
                evals = {"own": str(worlds[pk]), "clean": clean}
                spec = run_spec(name, worlds[pk], work / "runs" / name, s, steps, args.threads, over,
                                None if args.from_scratch else base_ckpt, evals, model_over)
                specs.append((pk, m, s, spec))
    print(f"[study] {len(specs)} runs of {steps} steps, {args.jobs} at a time", flush=True)
    results = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [(pk, m, s, pool.submit(launch, spec, args.keep_checkpoints, reuse, args.finished_only))
                   for pk, m, s, spec in specs]
        for pk, m, s, fut in futures:
            res = fut.result()
            if res is not None:
                results.append({"prob": pk, "method": m, "seed": s, **res})

    # stage 5: results
    fn_rates, chance, manifests = {}, {}, {}
    for pk, root in worlds.items():
        man = _load_json(root / "manifest.json") or {}
        manifests[pk] = man.get("false_negatives", {})
    for pk in {_fmt_prob(p) for p in probs}:
        rates = [v for r in results if r["prob"] == pk for _, v in r["curves"].get("diag/false_negative_rate", [])]
        fn_rates[pk] = statistics.fmean(rates) if rates else float("nan")
        ev = next((r["eval"]["own"] for r in results if r["prob"] == pk), {})
        if "semantic_chance" in ev:
            chance[pk] = ev["semantic_chance"]
    reference = args.reference if args.reference is not None else ("srcl" if "srcl" in methods else "")
    summary = summarise(results, methods, probs, seeds, reference or None)
    own0 = results[0]["eval"]["own"] if results else {}
    table = markdown_table(summary, methods, fn_rates, chance, (own0.get("n_images", 0), own0.get("n_captions", 0)))
    stem = out_json.with_suffix("")
    plots = {"recall": str(stem) + "_recall.png", "diagnostics": str(stem) + "_diagnostics.png"}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    plot_recall(summary, methods, Path(plots["recall"]), fn_rates, chance)
    plot_diagnostics(results, probs, Path(plots["diagnostics"]))
    aucs = auc_table(summary, methods)
    vs_reference = reference_table(summary, methods, reference) if reference else None
    Path(str(stem) + "_table.md").write_text(
        "\n\n".join(t for t in (table, aucs, vs_reference) if t) + "\n", encoding="utf-8")
    heatmap = None
    if args.heatmap:
        hk = _fmt_prob(args.heatmap_prob)
        plots["heatmap"] = str(stem) + "_heatmap.png"
        ck = {METHOD_LABELS.get(m, m): str(work / "runs" / f"p{hk}_{m}_s{seeds[0]}" / "checkpoint_last.pth")
              for m in args.heatmap}
        heatmap = {"prob": hk, "seed": seeds[0], "batch_auc": plot_heatmaps(ck, str(worlds[hk]), Path(plots["heatmap"]))}
    report = {
        "command": "python benchmarks/srcl_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"seeds": seeds, "finished_only": args.finished_only, "probs": probs, "methods": methods, "variants": variants, "steps": steps,
                     "base_steps": base_steps, "from_scratch": args.from_scratch, "jobs": args.jobs,
                     "threads": args.threads, "quick": quick, "study_overrides": STUDY_OVERRIDES,
                     "base_overrides": BASE_OVERRIDES,
                     "run_overrides": SCRATCH_OVERRIDES if args.from_scratch else RUN_OVERRIDES,
                     "model_overrides": model_over, "config": str(DEMO_CONFIG.relative_to(ROOT))},
        "wall_seconds": time.time() - t_start,
        # runs taken from an earlier invocation (their own times: runs[].train_seconds)
        "reused_runs": sum(bool(r.get("reused")) for r in results),
        "false_negatives": {"in_batch_rate": fn_rates, "generator_statistics": manifests},
        "semantic_chance": chance,
        "base": {k: base[k] for k in ("eval", "final_diagnostics", "steps", "train_seconds", "pairs_per_s")} if base else None,
        "summary": summary,
        "runs": [{**{k: r[k] for k in ("prob", "method", "seed", "steps", "train_seconds", "pairs_per_s", "eval",
                                       "final_diagnostics", "curves")},
                  "from_current_base": _newer(Path(r["spec"]["out_dir"]) / "result.json", base_ckpt)}
                 for r in results],
        "table_markdown": table,
        "auc_table_markdown": aucs,
        "reference": reference or None,
        "reference_table_markdown": vs_reference,
        "plots": plots,
        "heatmap": heatmap,
    }
    _write_json(out_json, report)
    print(table)
    print(f"[study] done in {time.time() - t_start:.0f} s: {out_json}, {plots['recall']}, {plots['diagnostics']}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
