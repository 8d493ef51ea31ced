"""Which evidence finds the false negatives? The SRCL weights of trained study checkpoints recomputed
under other ``loss.contrastive`` regulation settings (``tasks.srcl_diagnostics.diagnose_checkpoint``
with ``regulation=``), on each checkpoint's own world's test split: the weight AUC for the true
false negatives and their mean weights. A screening that needs no training: the similarities are
the checkpoint's, only the regulation differs.

    python benchmarks/srcl_evidence.py                 # the study's p 0.5 / 1.0 SRCL seed-0 checkpoints
    python benchmarks/srcl_evidence.py --runs output/srcl_study/runs/p0.50_srcl_s0 ...

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

# name -> loss.contrastive settings (delta 1 throughout: the AUC hardly depends on delta)
SETTINGS = {
    "cross (paper)": {},
    "cross, standardised": {"standardise": True},
    "intra": {"evidence": "intra"},
    "intra, standardised": {"evidence": "intra", "standardise": True},
    "cross+intra": {"evidence": "cross+intra"},
    "cross+intra, standardised": {"evidence": "cross+intra", "standardise": True},
    "cross + 1.5 generality, standardised": {"generality_weight": 1.5, "standardise": True},
    "cross + 3 generality, standardised": {"generality_weight": 3.0, "standardise": True},
    "cross+intra + 1.5 generality, standardised": {"evidence": "cross+intra", "generality_weight": 1.5,
                                                   "standardise": True},
    "cross - pair": {"pair_weight": 1.0},
    "cross - pair, standardised": {"pair_weight": 1.0, "standardise": True},
    "cross - 0.5 pair + 0.75 generality, standardised": {"pair_weight": 0.5, "generality_weight": 0.75, "standardise": True},
    "cross - pair + 0.75 generality, standardised": {"pair_weight": 1.0, "generality_weight": 0.75, "standardise": True},
    "cross - 2 pair + 0.75 generality, standardised": {"pair_weight": 2.0, "generality_weight": 0.75, "standardise": True},
}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["output/srcl_study/runs/p0.50_srcl_s0", "output/srcl_study/runs/p1.00_srcl_s0"],
                   help="study run folders (checkpoint_last.pth + spec.json naming the world)")
    p.add_argument("--out", default="benchmarks/results/srcl_evidence.json")
    args = p.parse_args(argv)
    from tasks.srcl_diagnostics import diagnose_checkpoint, study_runs
    try:
        runs = study_runs(args.runs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = []
    for folder, (ckpt, world, _) in zip(args.runs, runs):
        run = Path(folder)
        for name, reg in SETTINGS.items():
            d = diagnose_checkpoint(ckpt, world, "test", batch_size=64, progress=False,
                                    regulation={"delta": 1.0, **reg})
            rows.append({"run": run.name, "world": Path(world).name, "setting": name, "regulation": reg,
                         "weight_auc": d["weight_auc"], "w_false_neg": d["weight_w_false_neg"],
                         "w_true_neg": d["weight_w_true_neg"], "false_negative_rate": d["false_negative_rate"]})
            print(f"{run.name} {name}: AUC {d['weight_auc']:.3f}", flush=True)
    runs = [r.name for r in map(Path, args.runs)]
    lines = ["| regulating evidence (delta 1) | " + " | ".join(f"{r}: AUC / w FN / w TN" for r in runs) + " |",
             "|" + "---|" * (len(runs) + 1)]
    for name in SETTINGS:
        cells = [next(f"{x['weight_auc']:.3f} / {x['w_false_neg']:.2f} / {x['w_true_neg']:.2f}"
                      for x in rows if x["run"] == r and x["setting"] == name) for r in runs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/srcl_evidence.py " + " ".join(argv or sys.argv[1:]),
                               "wall_seconds": time.time() - t0, "rows": rows, "table_markdown": table}, indent=1) + "\n",
                   encoding="utf-8")
    out.with_name(out.stem + "_table.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
