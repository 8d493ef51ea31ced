"""Downstream transfer of the SRCL study's pre-training: fine-tune each study checkpoint on the four
shapes tasks (retrieval, VQA, NLVR2, captioning), as the paper's downstream tables do.

The pre-trained checkpoints are the study's own runs (``benchmarks/srcl_study.py --keep-checkpoints``:
the same base, steps and seeds for every method) on one partial-caption world (``--prob``, default
0.5); every fine-tuning run uses the demo config of its task (``configs/demo/*.yaml``) on that
world, with the fine-tuning budget in ``TASKS`` (the demo budgets of VQA, NLVR2 and captioning;
retrieval 60 steps: its demo fine-tuning over-fits after the first epoch) and the run's seed.
NLVR2 runs on a copy of the world generated with a larger test split (``NLVR2_PAIRS``): its
200-pair test split cannot tell two points apart.

    python benchmarks/srcl_study.py --probs 0.5 --keep-checkpoints ...      # the checkpoints first
    python benchmarks/srcl_transfer.py --methods infonce srcl srcl_d8      # then the transfer
    python benchmarks/srcl_transfer.py --quick                              # tiny smoke run (< 1 min)

Results: ``--out`` (JSON: ``{"rows": [{"method", "task", "seed", "metric", "value"}, ...], ...}``) and
``<out stem>_table.md`` (mean +- std over seeds, paired difference to the first method and wins).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # the study beside this file (not an installed "benchmarks" package)

from srcl_study import (METHOD_LABELS, METHODS, QUICK_MODEL, QUICK_WORLD, STUDY_OVERRIDES, _fmt_prob,  # noqa: E402
                        _load_json, _mean_std, _overrides, _write_json, make_tokenizer_dir, make_worlds)

NLVR2_PAIRS = (1000, 200, 4000)  # train / dev / test pairs of the NLVR2 world (the default test split: 200)


def _retrieval(res: dict) -> float:
    return float(res["metrics"]["r_mean"])


def _vqa(res: dict) -> float:
    return float(res["splits"]["test"]["accuracy"])


def _nlvr2(res: dict) -> float:
    return float(res["test"]["accuracy"])


def _caption(res: dict) -> float:
    return float(res["splits"]["test"]["metrics_x100"]["CIDEr"])


# task -> (run_finetune task, demo config, data overrides (relative to the world), budget, metric name,
#          the results file in the run's output folder, the metric in it)
TASKS: dict[str, tuple[str, str, dict, dict, str, str, Callable[[dict], float]]] = {
    "retrieval": ("retrieval_shapes", "configs/demo/retrieval.yaml",
                  {"data.train_files": "[{w}/retrieval_train.json]", "data.val_file": "{w}/retrieval_val.json",
                   "data.test_file": "{w}/retrieval_test.json"},
                  {"train.max_steps": 60}, "test R_mean (ITM re-ranked)", "results_finetuned_test.json", _retrieval),
    "vqa": ("vqa_shapes", "configs/demo/vqa.yaml",
            {"data.train_files": "[{w}/vqa_train.json]", "data.val_file": "{w}/vqa_val.json",
             "data.test_file": "{w}/vqa_test_gt.json", "data.answer_list": "{w}/answer_list.json"},
            {"train.epochs": 5}, "test accuracy", "results.json", _vqa),
    "nlvr2": ("nlvr2_shapes", "configs/demo/nlvr2.yaml",
              {"data.train_files": "[{w}/nlvr2_train.json]", "data.dev_files": "[{w}/nlvr2_dev.json]",
               "data.test_files": "[{w}/nlvr2_test.json]"},
              {"train.epochs": 6}, "test accuracy", "results.json", _nlvr2),
    "caption": ("caption_shapes", "configs/demo/caption.yaml",
                {"data.train_files": "[{w}/caption_train.json]", "data.val_file": "{w}/caption_val.json",
                 "data.test_file": "{w}/caption_test.json", "eval.test_metrics": "[bleu,rouge,cider]"},
                {"train.epochs": 3, "generation.num_beams": 1}, "test CIDEr", "results.json", _caption),
}
COMMON = {"x-synthetic": "null", "data.num_workers": 0, "train.progress": "false", "train.log_every": 50,
          "train.save_every": 100000}
QUICK_FINETUNE = {"train.max_steps": 2, "train.batch_size": 8}
QUICK_TASK = {"retrieval": {"eval.k_test": 4, "eval.batch_size": 16, "eval.itm_batch_size": 16},
              "vqa": {"eval.k_test": 4, "data.eval_batch_size": 16}, "nlvr2": {"data.eval_batch_size": 16},
              "caption": {"generation.num_beams": 1, "generation.max_length": 8, "generation.min_length": 1,
                          "data.eval_batch_size": 16}}


def finetune_args(task: str, ckpt: str, world: Path, out_dir: Path, seed: int, threads: int, quick: bool) -> list[str]:
    """The ``run_finetune.py`` arguments of one fine-tuning run."""
    name, config, data, budget = TASKS[task][:4]
    over = {**COMMON, **{k: v.format(w=world) for k, v in data.items()}, "data.image_root": str(world),
            **budget, "train.seed": seed, "train.num_threads": threads, "train.output_dir": str(out_dir)}
    if quick:
        over.update({**QUICK_FINETUNE, **QUICK_TASK[task]})
    return ["--task", name, "--config", config, "--checkpoint", ckpt, "--overwrite", "--set", *_overrides(over)]


def finetune(task: str, ckpt: str, world: Path, out_dir: Path, seed: int, threads: int, quick: bool,
             reuse: bool) -> dict:
    """Fine-tune and test one checkpoint on one task (a subprocess; in this process with ``quick``);
    returns the task's results file (``results`` in the returned dict) with the run's ``wall_seconds``."""
    argv = finetune_args(task, ckpt, world, out_dir, seed, threads, quick)
    stamp = {"argv": argv, "checkpoint_mtime": os.path.getmtime(ckpt)}
    done = _load_json(out_dir / "transfer_result.json")
    if reuse and done is not None and done.get("stamp") == stamp:
        return done
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if quick:
        import run_finetune
        rc = run_finetune.main(argv)
    else:
        with open(out_dir.parent / f"{out_dir.name}.log", "w", encoding="utf-8") as logf:
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
            rc = subprocess.run([sys.executable, "run_finetune.py", *argv], cwd=ROOT, stdout=logf,
                                stderr=subprocess.STDOUT, env=env).returncode
    res = _load_json(out_dir / TASKS[task][5])
    if rc != 0 or res is None:
        raise RuntimeError(f"fine-tuning {task} from {ckpt} failed (exit {rc}); see {out_dir.parent / (out_dir.name + '.log')}")
    res = {"results": res, "wall_seconds": time.time() - t0, "stamp": stamp}
    _write_json(out_dir / "transfer_result.json", res)
    return res


# --------------------------------------------------------------------------------- the checkpoints
def quick_checkpoints(work: Path, methods: dict[str, dict], seeds: list[int]) -> tuple[Path, dict]:
    """--quick: a tiny world and a few steps of tiny pre-training per method and seed (in this process)."""
    from engine.config import load_config
    from tasks.pretrain import PretrainConfig, run
    world = make_worlds(work, [0.5], True, 0)[_fmt_prob(0.5)]
    tok = make_tokenizer_dir(work, {"q": world}, QUICK_MODEL["tokenizer.vocab_size"])
    ckpts = {}
    for m, over in methods.items():
        for s in seeds:
            out = work / "runs" / f"{m}_s{s}"
            ckpt = out / "checkpoint_last.pth"
            if not ckpt.is_file():
                cfg_over = {**STUDY_OVERRIDES, **QUICK_MODEL, **over, "tokenizer.path": str(tok),
                            "data.train_files": f"[{world / 'pretrain.json'}]", "data.image_root": str(world),
                            "train.output_dir": str(out), "train.seed": s, "train.max_steps": 3,
                            "train.num_threads": 1, "diagnostics.every": 0}
                run(load_config(PretrainConfig, ROOT / "configs/demo/pretrain.yaml", _overrides(cfg_over)))
            ckpts[(m, s)] = str(ckpt)
    return world, ckpts


def study_checkpoints(study_dir: Path, prob: float, methods: list[str], seeds: list[int]) -> tuple[Path, dict]:
    world = study_dir / "worlds" / f"p{_fmt_prob(prob)}"
    ckpts, missing = {}, []
    for m in methods:
        for s in seeds:
            path = study_dir / "runs" / f"p{_fmt_prob(prob)}_{m}_s{s}" / "checkpoint_last.pth"
            (ckpts.__setitem__((m, s), str(path)) if path.is_file() else missing.append(str(path)))
    if missing or not (world / "scenes.json").is_file():
        raise SystemExit(f"error: no study checkpoint {missing[0] if missing else world}: run benchmarks/srcl_study.py "
                         f"--probs {prob} --methods ... --keep-checkpoints --work-dir {study_dir} first")
    return world, ckpts


def nlvr2_world(work: Path, prob: float, quick: bool) -> Path:
    """The world with the larger NLVR2 test split (same generator seed, scenes and captions)."""
    from shapesworld.config import ShapesConfig
    from shapesworld.write import ensure_shapes
    extra = {**QUICK_WORLD, "nlvr2_pairs": (16, 4, 16)} if quick else {"nlvr2_pairs": NLVR2_PAIRS}
    root = work / "worlds" / f"p{_fmt_prob(prob)}_nlvr2"
    ensure_shapes(root, ShapesConfig(seed=0, partial_caption_prob=prob, **extra), workers=2)
    return root


# ------------------------------------------------------------------------------------------ results
def summarise(rows: list[dict], methods: list[str], tasks: list[str]) -> list[dict]:
    """Mean, std and per-seed values per (task, method) and paired differences to the first method."""
    ref = methods[0]
    val = {(r["method"], r["task"], r["seed"]): r["value"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    out = []
    for t in tasks:
        for m in methods:
            vals = [val.get((m, t, s)) for s in seeds]
            mean, std = _mean_std([v for v in vals if v is not None])
            entry = {"task": t, "method": m, "mean": mean, "std": std, "per_seed": vals}
            if m != ref:
                diffs = [val[(m, t, s)] - val[(ref, t, s)] for s in seeds if (m, t, s) in val and (ref, t, s) in val]
                entry["diff_vs_" + ref] = {"mean": _mean_std(diffs)[0], "wins": sum(d > 0 for d in diffs), "n": len(diffs)}
            out.append(entry)
    return out


def markdown_table(summary: list[dict], methods: list[str], tasks: list[str]) -> str:
    ref = methods[0]
    head = "| method | " + " | ".join(f"{t}: {TASKS[t][4]}" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 1)]
    by = {(e["task"], e["method"]): e for e in summary}
    for m in methods:
        cells = []
        for t in tasks:
            e = by[(t, m)]
            cell = f"{e['mean']:.1f} ± {e['std']:.1f}"
            d = e.get("diff_vs_" + ref)
            if d:
                cell += f" ({d['mean']:+.1f}, {d['wins']}/{d['n']})"
            cells.append(cell)
        lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Mean ± std over seeds; in brackets the mean paired difference to {METHOD_LABELS.get(ref, ref)} "
                 "(same seed) and on how many seeds the method is better.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny world, model and budgets, in this process (smoke test)")
    p.add_argument("--study-dir", default="output/srcl_study", help="the study's --work-dir (its kept checkpoints)")
    p.add_argument("--prob", type=float, default=0.5, help="the partial-caption world the checkpoints were trained on")
    p.add_argument("--methods", nargs="+", default=None, help="study methods (default infonce srcl); the first is the reference")
    p.add_argument("--tasks", nargs="+", default=None, choices=sorted(TASKS), help="default: all four")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    p.add_argument("--jobs", type=int, default=2, help="fine-tuning runs in parallel")
    p.add_argument("--work-dir", default=None, help="fine-tuning runs (default <study-dir>/transfer; quick: output/srcl_transfer_quick)")
    p.add_argument("--out", default=None, help="default benchmarks/results/srcl_transfer.json (quick: <work-dir>/srcl_transfer.json)")
    p.add_argument("--no-reuse", action="store_true", help="redo finished fine-tuning runs")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    methods = args.methods or ["infonce", "srcl"]
    tasks = args.tasks or list(TASKS)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if args.quick:
        work = Path(args.work_dir or "output/srcl_transfer_quick")
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            print(f"error: --quick knows the built-in methods {sorted(METHODS)}, not {unknown}", file=sys.stderr)
            return 2
        world, ckpts = quick_checkpoints(work, {m: METHODS[m] for m in methods}, seeds)
    else:
        work = Path(args.work_dir or Path(args.study_dir) / "transfer")
        world, ckpts = study_checkpoints(Path(args.study_dir), args.prob, methods, seeds)
    world_nlvr2 = nlvr2_world(work, args.prob, args.quick)
    out_json = Path(args.out or (work / "srcl_transfer.json" if args.quick else "benchmarks/results/srcl_transfer.json"))
    jobs = [(m, t, s) for s in seeds for m in methods for t in tasks]

    def one(job):
        m, t, s = job
        return finetune(t, ckpts[(m, s)], world_nlvr2 if t == "nlvr2" else world, work / "runs" / f"{t}_{m}_s{s}", s,
                        1, args.quick, not args.no_reuse)

    if args.quick:
        results = [one(j) for j in jobs]
    else:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(one, jobs))
    rows, seconds = [], {}
    for (m, t, s), res in zip(jobs, results):
        rows.append({"method": m, "task": t, "seed": s, "metric": TASKS[t][4], "value": TASKS[t][6](res["results"])})
        seconds[f"{t}_{m}_s{s}"] = res["wall_seconds"]
    summary = summarise(rows, methods, tasks)
    table = markdown_table(summary, methods, tasks)
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    report: dict[str, Any] = {
        "command": f"python benchmarks/srcl_transfer.py {argv_text}".strip(),
        "settings": {"prob": args.prob, "methods": methods, "tasks": tasks, "seeds": seeds, "quick": args.quick,
                     "study_dir": args.study_dir, "jobs": args.jobs, "nlvr2_pairs": list(NLVR2_PAIRS),
                     "budgets": {t: TASKS[t][3] for t in tasks}, "common_overrides": COMMON},
        "wall_seconds": time.time() - t0, "run_wall_seconds": seconds,
        "rows": rows, "summary": summary, "table_markdown": table,
    }
    _write_json(out_json, report)
    out_json.with_name(out_json.stem + "_table.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"[transfer] done in {time.time() - t0:.0f} s: {out_json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
