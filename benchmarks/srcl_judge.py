"""Is the ITM head a better judge of the false negatives than the ITC cosine? The study's runs judged
by ``tasks.srcl_judge.judge_checkpoint`` on their world's test split: the AUCs of each judge against
the world's truth, and the weight AUC of evidence made from them (ITC, ITM, both, and the ITC
evidence with each anchor's top-k negatives re-judged by ITM).

The study trains ITC only; the runs judged here add ITM (hard negatives, as pre-training) to the
SRCL runs, 300 steps as the study and 1,200 steps:

    python benchmarks/srcl_study.py --probs 1.0 0.5 --seeds 0 --methods srcl srcl_itm \
        --variant srcl_itm:loss.itm=1 --keep-checkpoints --out output/srcl_judge_runs.json
    python benchmarks/srcl_study.py --probs 1.0 --seeds 0 --steps 1200 --jobs 1 --threads 2 --methods srcl_itm12 \
        --variant srcl_itm12:loss.itm=1 --keep-checkpoints --out output/srcl_judge_runs12.json
    python benchmarks/srcl_judge.py            # the runs below; --runs to judge others

Results: ``--out`` (JSON) and ``<out stem>_table.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = ["output/srcl_study/runs/p0.50_srcl_s0", "output/srcl_study/runs/p0.50_srcl_itm_s0",
        "output/srcl_study/runs/p1.00_srcl_s0", "output/srcl_study/runs/p1.00_srcl_itm_s0",
        "output/srcl_study/runs/p1.00_srcl_itm12_s0"]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=RUNS, help="study run folders (checkpoint_last.pth + spec.json)")
    p.add_argument("--out", default="benchmarks/results/srcl_judge.json")
    args = p.parse_args(argv)
    from tasks.srcl_diagnostics import study_runs
    from tasks.srcl_judge import judge_checkpoint
    try:
        runs = study_runs(args.runs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = []
    for folder, (ckpt, world, spec) in zip(args.runs, runs):
        run = Path(folder)
        t = time.time()
        res = judge_checkpoint(ckpt, world)
        steps = next((int(o.split("=", 1)[1]) for o in spec["overrides"] if o.startswith("train.max_steps=")), None)
        res.update({"run": run.name, "steps": steps, "seconds": time.time() - t})
        rows.append(res)
        print(f"{run.name}: {json.dumps(res['weight_auc'])}", flush=True)
    names = list(dict.fromkeys(k for r in rows for k in r["weight_auc"]))
    lines = ["| run | steps | ITC row / col / pooled AUC | ITM row / col / pooled AUC | "
             + " | ".join(f"weight AUC: {n}" for n in names) + " |", "|" + "---|" * (4 + len(names))]
    for r in rows:
        judge = lambda k: " / ".join(f"{r['judges'][k][m]:.3f}" for m in ("row_auc", "col_auc", "pooled_auc")) \
            if k in r["judges"] else "-"  # noqa: E731
        cells = [f"{r['weight_auc'][n]:.3f}" if n in r["weight_auc"] else "-" for n in names]
        lines.append(f"| {r['run']} | {r['steps']} | {judge('itc')} | {judge('itm')} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/srcl_judge.py " + " ".join(argv or sys.argv[1:]),
                               "date": time.strftime("%Y-%m-%d"), "wall_seconds": time.time() - t0, "rows": rows,
                               "table_markdown": table}, indent=1) + "\n", encoding="utf-8")
    out.with_name(out.stem + "_table.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
